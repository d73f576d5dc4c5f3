"""Checkpoint retention and the overlap-tile cut of training examples."""

import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.training.checkpoint import Checkpointer
from unet_jax.data import pipeline
from unet_jax.geometry import Geometry


def test_keeps_the_latest_and_the_best(tmp_path):
  checkpointer = Checkpointer(tmp_path, max_to_keep=2, keep_best=1, best_metric="iou",
                              best_mode="max", async_save=False)
  scores = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.4}
  for step, score in scores.items():
    checkpointer.save(step, {"w": jnp.full((3,), float(step))}, {"next_index": step},
                      {"iou": score})
  checkpointer.wait()
  assert sorted(checkpointer.all_steps()) == [2, 4, 5]  # best (0.9) + the last two
  state, data = checkpointer.restore({"w": jnp.zeros(3)}, step=2)
  np.testing.assert_array_equal(state["w"], [2.0, 2.0, 2.0])
  assert data == {"next_index": 2}
  checkpointer.close()


def test_best_metric_must_be_reported(tmp_path):
  checkpointer = Checkpointer(tmp_path, best_metric="iou_cell", async_save=False)
  with pytest.raises(ValueError, match="best_metric 'iou_cell' is not among"):
    checkpointer.save(1, {"w": jnp.zeros(2)}, {}, {"iou_1": 0.5})
  checkpointer.close()


def test_restoring_from_an_empty_directory_names_it(tmp_path):
  checkpointer = Checkpointer(tmp_path / "empty", async_save=False)
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
    checkpointer.restore({"w": jnp.zeros(2)})


def test_overlap_tile_aligns_label_with_the_center_of_the_input():
  """For an unpadded model the label window is the center of the (mirror-padded) input."""
  geometry = Geometry(2, "valid", "valid")
  input_size = geometry.min_input_size()
  output_size = geometry.output_size(input_size)
  margin = (input_size - output_size) // 2
  height, width = 30, 41
  coords = np.arange(height * width, dtype=np.float32).reshape(height, width)
  example = {"image": coords[..., None], "label": coords.astype(np.int32),
             "weight": coords + 0.5}
  for top, left in [(0, 0), (3, 7), (height - output_size, width - output_size)]:
    tile = pipeline.cut_tile(example, top, left, input_hw=(input_size, input_size),
                             output_hw=(output_size, output_size))
    assert tile["image"].shape == (input_size, input_size, 1)
    assert tile["label"].shape == tile["weight"].shape == (output_size, output_size)
    center = tile["image"][margin:margin + output_size, margin:margin + output_size, 0]
    np.testing.assert_array_equal(center, tile["label"])
    np.testing.assert_array_equal(tile["label"], coords[top:top + output_size,
                                                         left:left + output_size])
  # At the border, the input continues as a mirror image of the inside.
  tile = pipeline.cut_tile(example, 0, 0, input_hw=(input_size, input_size),
                           output_hw=(output_size, output_size))
  np.testing.assert_array_equal(tile["image"][margin - 1, margin:, 0],
                                tile["image"][margin, margin:, 0])


def test_images_smaller_than_the_output_are_padded_not_resized():
  example = {"image": np.ones((5, 6, 1), np.float32), "label": np.ones((5, 6), np.int32)}
  tile = pipeline.cut_tile(example, 0, 0, input_hw=(16, 16), output_hw=(8, 8))
  assert tile["label"].shape == (8, 8)
  assert (tile["label"][:5, :6] == 1).all()
  assert (tile["label"][5:] == pipeline.IGNORE).all() and (tile["label"][:, 6:] == pipeline.IGNORE).all()


def test_random_tiles_are_deterministic_and_keep_label_values():
  example = {"image": np.random.default_rng(0).random((40, 40, 1)).astype(np.float32),
             "label": np.random.default_rng(1).integers(0, 2, (40, 40)).astype(np.int32)}
  tiles = [pipeline.random_tile(example, np.random.default_rng(7), input_hw=(24, 24),
                                output_hw=(24, 24)) for _ in range(2)]
  for key in ("image", "label"):
    np.testing.assert_array_equal(tiles[0][key], tiles[1][key])
  assert set(np.unique(tiles[0]["label"])) <= {0, 1}
