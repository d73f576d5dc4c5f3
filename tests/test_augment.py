"""Augmentation: the elastic field, elastic tiles, flips and rotations, jitter and shifts."""

import numpy as np
import pytest

from unet_jax.data import augment, pipeline

INPUT, OUTPUT = (60, 60), (20, 20)  # a depth-2 unpadded U-Net's tile: 20 px margin per side


def _example(size=(80, 90), seed=0):
  """Blobs of classes 0/1/2 whose image is the label itself (grey 0, 0.5, 1), so alignment
  of image and label can be read back from any tile."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 3, (size[0] // 10 + 1, size[1] // 10 + 1))
  label = np.kron(coarse, np.ones((10, 10), np.int64))[:size[0], :size[1]].astype(np.int32)
  image = (label / 2.0).astype(np.float32)[..., None]
  weight = (1.0 + label).astype(np.float32)
  return {"image": image, "label": label, "weight": weight}


def _tile(example, seed, **options):
  return pipeline.random_tile(example, np.random.default_rng(seed), input_hw=INPUT,
                              output_hw=OUTPUT, **options)


def test_displacement_field_passes_through_the_grid_and_is_deterministic():
  field = augment.displacement_field(np.random.default_rng(3), (41, 61), sigma=10.0, grid=3)
  coarse = np.random.default_rng(3).normal(0.0, 10.0, (2, 3, 3))
  assert field.shape == (2, 41, 61)
  np.testing.assert_allclose(field[:, ::20, ::30], coarse, atol=1e-9)  # the control points
  np.testing.assert_array_equal(
      field, augment.displacement_field(np.random.default_rng(3), (41, 61)))
  assert np.abs(np.diff(field, axis=1)).max() < 5.0  # smooth: no jumps between neighbours
  with pytest.raises(ValueError, match="elastic_grid must be >= 2"):
    augment.displacement_field(np.random.default_rng(0), (8, 8), grid=1)


def test_elastic_with_zero_sigma_is_the_plain_tile():
  """Same position, no displacement: the window, margins and crops line up exactly."""
  example = _example()
  for seed in range(5):
    plain = _tile(example, seed, flip=False, rotate=False)
    warped = _tile(example, seed, flip=False, rotate=False, elastic=True, elastic_sigma=0.0)
    np.testing.assert_allclose(warped["image"], plain["image"], atol=1e-5)
    np.testing.assert_array_equal(warped["label"], plain["label"])
    np.testing.assert_array_equal(warped["weight"], plain["weight"])


def test_elastic_moves_pixels_keeps_labels_and_alignment():
  example = _example()
  plain = _tile(example, 1, flip=False, rotate=False)
  warped = _tile(example, 1, flip=False, rotate=False, elastic=True, elastic_sigma=10.0)
  assert warped["image"].shape == (*INPUT, 1) and warped["image"].dtype == np.float32
  assert warped["label"].shape == warped["weight"].shape == OUTPUT
  assert warped["label"].dtype == np.int32
  assert (warped["label"] != plain["label"]).mean() > 0.05  # it moved
  assert set(np.unique(warped["label"])) <= {0, 1, 2, pipeline.IGNORE}  # no new classes
  assert set(np.unique(warped["weight"])) <= {0.0, 1.0, 2.0, 3.0}  # nearest, never blended
  valid = warped["label"] != pipeline.IGNORE
  np.testing.assert_array_equal(warped["weight"][valid], 1.0 + warped["label"][valid])
  # The image is the label drawn in grey: the deformed image, at the output window, agrees
  # with the deformed label except along the blobs' edges (cubic vs nearest sampling).
  margin = (INPUT[0] - OUTPUT[0]) // 2
  center = warped["image"][margin:margin + OUTPUT[0], margin:margin + OUTPUT[1], 0]
  assert (np.round(center * 2)[valid] == warped["label"][valid]).mean() > 0.9
  assert 0.0 <= warped["image"].min() and warped["image"].max() <= 1.0


def test_random_tiles_are_deterministic_with_every_augmentation():
  example = _example()
  options = dict(flip=True, rotate=True, shift=5, elastic=True, brightness=0.2, contrast=0.2)
  first, again = _tile(example, 7, **options), _tile(example, 7, **options)
  for key in ("image", "label", "weight"):
    np.testing.assert_array_equal(first[key], again[key])
  other = _tile(example, 8, **options)
  assert not np.array_equal(first["image"], other["image"])


def test_flip_rotate_transforms_image_label_and_weight_alike():
  example = _example()
  margin = (INPUT[0] - OUTPUT[0]) // 2
  turned = set()
  for seed in range(12):
    tile = _tile(example, seed, flip=True, rotate=True)
    center = tile["image"][margin:margin + OUTPUT[0], margin:margin + OUTPUT[1], 0]
    np.testing.assert_array_equal(np.round(center * 2), tile["label"])
    np.testing.assert_array_equal(tile["weight"], 1.0 + tile["label"])
    plain = _tile(example, seed, flip=False, rotate=False)
    turned.add(not np.array_equal(plain["label"], tile["label"]))
  assert turned == {True, False}


def test_non_square_tiles_only_turn_by_180_degrees():
  example = _example()
  for seed in range(8):
    tile = pipeline.random_tile(example, np.random.default_rng(seed), input_hw=(60, 76),
                                output_hw=(20, 36), flip=True, rotate=True)
    assert tile["image"].shape == (60, 76, 1) and tile["label"].shape == (20, 36)


def test_jitter_changes_grey_values_within_range():
  image = np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(10, 10, 1)
  rng = np.random.default_rng(0)
  assert augment.jitter(image, rng, brightness=0.0, contrast=0.0) is image
  out = augment.jitter(image, rng, brightness=0.3, contrast=0.3)
  assert out.dtype == np.float32 and out.shape == image.shape
  assert 0.0 <= out.min() and out.max() <= 1.0 and not np.allclose(out, image)
  np.testing.assert_array_equal(
      augment.jitter(image, np.random.default_rng(5), brightness=0.3, contrast=0.3),
      augment.jitter(image, np.random.default_rng(5), brightness=0.3, contrast=0.3))


def test_shift_moves_the_window_past_the_edges_with_ignored_labels():
  example = _example(size=(20, 20))  # exactly the output size: no room for a random crop
  offsets = set()
  for seed in range(20):
    tile = _tile(example, seed, flip=False, rotate=False, shift=4)
    ignored = tile["label"] == pipeline.IGNORE
    assert set(np.unique(tile["label"][~ignored])) <= {0, 1, 2}
    offsets.add(int(ignored.sum()))
    assert ignored.sum() <= 20 * 20 - 16 * 16
  assert 0 in offsets and len(offsets) > 3
