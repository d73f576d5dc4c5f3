"""Tests for the synthetic EM-like dataset."""

import numpy as np
import pytest
from scipy import ndimage

from unet_jax.data.synthetic import SyntheticEM

SIZE = (96, 128)


@pytest.fixture(scope="module")
def dataset() -> SyntheticEM:
  return SyntheticEM(8, size=SIZE, seed=3, channels=2)


def test_shapes_dtypes_and_ranges(dataset):
  assert len(dataset) == 8
  example = dataset[0]
  assert set(example) == {"image", "label"}
  image, label = example["image"], example["label"]
  assert image.shape == SIZE + (2,) and image.dtype == np.float32
  assert label.shape == SIZE and label.dtype == np.int32
  assert 0.0 <= image.min() and image.max() <= 1.0
  np.testing.assert_array_equal(image[..., 0], image[..., 1])
  assert set(np.unique(label).tolist()) == {0, 1}


def test_deterministic_per_seed_and_index(dataset):
  again = SyntheticEM(8, size=SIZE, seed=3, channels=2)
  for index in (0, 5):
    first, second = dataset[index], again[index]
    np.testing.assert_array_equal(first["image"], second["image"])
    np.testing.assert_array_equal(first["label"], second["label"])
  # Access order does not matter.
  np.testing.assert_array_equal(again[0]["label"], dataset[0]["label"])


def test_different_indices_and_seeds_differ(dataset):
  assert not np.array_equal(dataset[0]["label"], dataset[1]["label"])
  assert not np.allclose(dataset[0]["image"], dataset[1]["image"])
  other_seed = SyntheticEM(8, size=SIZE, seed=4, channels=2)
  assert not np.array_equal(dataset[0]["label"], other_seed[0]["label"])


def test_membranes_look_like_isbi(dataset):
  for index in range(len(dataset)):
    image, label = dataset[index]["image"][..., 0], dataset[index]["label"]
    membrane_fraction = 1.0 - label.mean()
    assert 0.12 < membrane_fraction < 0.30, membrane_fraction
    # Membranes are dark against the cells.
    assert image[label == 0].mean() < image[label == 1].mean() - 0.1
    # Membranes close around the cells: many separate 4-connected interiors.
    _, num_cells = ndimage.label(label)
    assert num_cells >= 15, num_cells


def test_out_of_range_index_raises(dataset):
  for index in (-1, 8, 100):
    with pytest.raises(IndexError, match=r"0 \.\. 7"):
      dataset[index]
  with pytest.raises(TypeError):
    dataset[1.0]
  assert dataset[np.int64(7)]["label"].shape == SIZE


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_examples=-1), "num_examples"),
        (dict(num_examples=2.5), "num_examples"),
        (dict(num_examples=4, size=(8, 64)), "height"),
        (dict(num_examples=4, size=(64, 8)), "width"),
        (dict(num_examples=4, size=(64,)), "size"),
        (dict(num_examples=4, seed=-2), "seed"),
        (dict(num_examples=4, channels=0), "channels"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SyntheticEM(**kwargs)


def test_works_as_grain_source(dataset):
  grain = pytest.importorskip("grain")
  source = grain.MapDataset.source(dataset)
  assert len(source) == len(dataset)
  np.testing.assert_array_equal(source[2]["label"], dataset[2]["label"])
