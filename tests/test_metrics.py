"""Metrics against hand-computed cases and scikit-image."""

import jax
import numpy as np
import pytest
from skimage.measure import label as connected_regions
from skimage.metrics import adapted_rand_error

from unet_jax import metrics


def test_mask_metrics_by_hand():
  label = np.array([[0, 0, 1, 1]])
  predicted = np.array([[0, 1, 1, 1]])
  # Confusion [[1, 1], [0, 2]]: class 0 has TP 1, FN 1; class 1 has TP 2, FP 1.
  np.testing.assert_array_equal(
      metrics.mask_confusion_matrix(predicted, label, num_classes=2), [[1, 1], [0, 2]])
  scores = metrics.mask_metrics(predicted, label, num_classes=2)
  assert scores["pixel_error"] == pytest.approx(1 / 4)
  assert scores["iou_0"] == pytest.approx(1 / 2) and scores["iou_1"] == pytest.approx(2 / 3)
  assert scores["dice_0"] == pytest.approx(2 / 3) and scores["dice_1"] == pytest.approx(4 / 5)
  assert scores["mean_iou"] == pytest.approx(7 / 12)


def test_ignored_and_out_of_range_labels_are_not_counted():
  label = np.array([[0, 1, 9, 2]])
  predicted = np.array([[0, 0, 1, 1]])
  confusion = metrics.mask_confusion_matrix(predicted, label, num_classes=2, ignore_index=1)
  np.testing.assert_array_equal(confusion, [[1, 0], [0, 0]])


def test_host_confusion_matrix_equals_the_jitted_one():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 9, 7, 3)).astype(np.float32)
  label = rng.integers(0, 3, (2, 9, 7))
  expected = jax.jit(metrics.confusion_matrix, static_argnames="num_classes")(
      logits, label, num_classes=3)
  np.testing.assert_array_equal(
      metrics.mask_confusion_matrix(logits.argmax(-1), label, num_classes=3), expected)


def cells():
  """Two 3×3 cells (class 1) split by a vertical membrane (class 0)."""
  label = np.ones((3, 7), int)
  label[:, 3] = 0
  return label


def test_rand_error_of_identical_segmentations_is_zero():
  assert metrics.rand_error(cells(), cells()) == 0.0


def test_rand_error_grows_when_a_cell_is_split_or_two_are_merged():
  split = cells()
  split[1, :3] = 0               # the left cell cut in two
  merged = np.ones((3, 7), int)  # the membrane missed
  for predicted in (split, merged):
    error = metrics.rand_error(predicted, cells())
    assert error > 0
    expected = adapted_rand_error(connected_regions(cells() == 1, connectivity=1),
                                  connected_regions(predicted == 1, connectivity=1))[0]
    assert error == pytest.approx(expected)


def test_rand_error_connectivity():
  # Two cells touching only at a corner: separate with 4-connectivity, one with 8.
  label = np.array([[1, 1, 0, 0],
                    [1, 1, 0, 0],
                    [0, 0, 1, 1],
                    [0, 0, 1, 1]])
  merged = label.copy()
  merged[1, 2] = 1                # joins the two cells by an edge
  assert metrics.rand_error(label, label, connectivity=1) == 0.0
  assert metrics.rand_error(merged, label, connectivity=1) > 0
  # With 8-connectivity the label is one cell already, so joining changes nothing.
  assert metrics.rand_error(merged, label, connectivity=2) == 0.0


def test_rand_error_without_cells_is_nan_and_shapes_must_match():
  assert np.isnan(metrics.rand_error(np.ones((3, 3)), np.zeros((3, 3))))
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.rand_error(np.ones((3, 3)), np.ones((3, 4)))
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.mask_metrics(np.ones((3, 3)), np.ones((3, 4)), num_classes=2)
