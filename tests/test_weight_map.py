"""Tests for the U-Net border weight map (Ronneberger et al. 2015, eq. 2)."""

import math

import numpy as np
import pytest
from scipy import ndimage

from unet_jax.weight_map import border_cutoff, weight_map


def _two_cells_with_gap() -> np.ndarray:
  """Two 16x12 cells separated by a 1 px vertical gap at column 16; symmetric in both axes."""
  label = np.zeros((32, 33), np.int32)
  label[8:24, 4:16] = 1
  label[8:24, 17:29] = 1
  return label


def _brute_force(label: np.ndarray, *, w0: float, sigma: float) -> np.ndarray:
  """Eq. 2 with exact distances from every pixel to every pixel of every cell."""
  cells, num_cells = ndimage.label(label == 1)
  rows, cols = np.indices(label.shape)
  pixels = np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.float64)
  per_cell = []
  for index in range(1, num_cells + 1):
    members = pixels[cells.ravel() == index]
    gaps = np.linalg.norm(pixels[:, None, :] - members[None, :, :], axis=-1)
    per_cell.append(gaps.min(axis=1))
  distances = np.sort(np.stack(per_cell, axis=-1), axis=-1)
  d1, d2 = distances[:, 0], distances[:, 1]
  border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
  values, counts = np.unique(label, return_counts=True)
  w_c = dict(zip(values.tolist(), (counts.max() / counts).tolist()))
  w = np.vectorize(w_c.get)(label).astype(np.float64)
  return w + np.where(label.ravel() == 1, 0.0, border).reshape(label.shape)


def test_gap_between_two_cells_gets_high_weight_and_far_pixels_only_class_weight():
  w = weight_map(_two_cells_with_gap(), w0=10.0, sigma=5.0, class_weights=[1.0, 1.0])
  # Mid-gap: d1 = d2 = 1 px.
  np.testing.assert_allclose(w[16, 16], 1.0 + 10.0 * math.exp(-4.0 / 50.0), rtol=1e-6)
  # Corner: d1 = |(8, 4)|, d2 = |(8, 17)|, so the border term is ~2e-7.
  np.testing.assert_allclose(w[0, 0], 1.0, atol=1e-5)
  # Cell interiors carry no border term.
  np.testing.assert_array_equal(w[8:24, 4:16], 1.0)


def test_symmetric_mask_gives_symmetric_map():
  w = weight_map(_two_cells_with_gap())
  np.testing.assert_allclose(w, w[:, ::-1], rtol=1e-6)
  np.testing.assert_allclose(w, w[::-1, :], rtol=1e-6)


def test_matches_brute_force_formula():
  label = np.zeros((24, 28), np.int32)
  label[2:9, 3:12] = 1
  label[11:20, 2:8] = 1
  label[10:22, 10:25] = 1
  label[4, 18] = 1  # a one-pixel cell
  w0, sigma = 10.0, 3.0
  expected = _brute_force(label, w0=w0, sigma=sigma)
  w = weight_map(label, w0=w0, sigma=sigma)
  assert w.dtype == np.float32 and w.shape == label.shape
  # The cutoff drops border terms below 1e-6 * w0.
  np.testing.assert_allclose(w, expected, rtol=1e-6, atol=2e-5)
  # One pixel by hand: (9, 5) lies 1 px below cell 1 and 2 px above cell 2; background is the
  # majority class, so w_c = 1 there.
  assert np.sum(label == 0) > np.sum(label == 1)
  hand = 1.0 + w0 * math.exp(-((1.0 + 2.0) ** 2) / (2 * sigma**2))
  np.testing.assert_allclose(w[9, 5], hand, rtol=1e-6)


def test_default_class_weights_are_inverse_frequency_with_majority_at_one():
  label = _two_cells_with_gap()
  w = weight_map(label, w0=0.0)
  n0, n1 = np.sum(label == 0), np.sum(label == 1)
  assert n0 > n1
  expected = np.where(label == 0, 1.0, n0 / n1)
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  # Each class then carries the same total weight.
  np.testing.assert_allclose(w[label == 0].sum(), w[label == 1].sum(), rtol=1e-5)


@pytest.mark.parametrize(
    "label",
    [
        np.zeros((20, 20), np.int32),  # no cells
        np.ones((20, 20), np.int32),  # all foreground: one cell
        np.pad(np.ones((6, 6), np.int32), 7),  # one cell
    ],
    ids=["no_cells", "all_foreground", "one_cell"],
)
def test_fewer_than_two_cells_gives_class_weights_only(label):
  w = weight_map(label, class_weights=[2.0, 0.5])
  np.testing.assert_array_equal(w, np.where(label == 1, 0.5, 2.0).astype(np.float32))
  np.testing.assert_array_equal(weight_map(label, w0=0.0), weight_map(label))


def test_foreground_value_selects_the_cells():
  label = _two_cells_with_gap()
  swapped = weight_map(np.where(label == 1, 7, 3), foreground=7, class_weights=[0] * 3 + [1] * 5)
  np.testing.assert_allclose(swapped, weight_map(label, class_weights=[1.0, 1.0]), rtol=1e-6)


def test_border_cutoff_value():
  np.testing.assert_allclose(border_cutoff(5.0), 5.0 * math.sqrt(2 * math.log(1e6)))
  assert 26.0 < border_cutoff(5.0) < 27.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(label=np.zeros((4, 4, 1), np.int32)), "2-D"),
        (dict(label=np.zeros((4, 4), np.float32)), "integer"),
        (dict(label=np.full((4, 4), 2), class_weights=[1.0, 1.0]), "class_weights"),
        (dict(label=np.zeros((4, 4), np.int32), sigma=0.0), "sigma"),
        (dict(label=np.zeros((4, 4), np.int32), w0=-1.0), "w0"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
  label = kwargs.pop("label")
  with pytest.raises(ValueError, match=match):
    weight_map(label, **kwargs)
