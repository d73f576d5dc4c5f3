"""The ISBI 2012 challenge's scoring against hand-made cases and independent computations."""

import itertools

import numpy as np
import pytest
from skimage.measure import label as connected_regions
from skimage.metrics import variation_of_information

from unet_jax import metrics, warping


def two_cells(membrane_width=1):
  """Two 4×2 cells (1) on either side of a vertical membrane (0) of the given width."""
  label = np.ones((4, 4 + membrane_width), int)
  label[:, 2:2 + membrane_width] = 0
  return label


def quarters():
  """Four 3×3 cells split by a one-pixel cross of membrane: a 7×7 label."""
  label = np.ones((7, 7), int)
  label[3, :] = label[:, 3] = 0
  return label


def random_segments(rng, shape=(6, 6), ids=4):
  """Segment ids with some boundary pixels (0), not necessarily connected."""
  return rng.integers(0, ids, shape)


def brute_force_rand_counts(true_segments, predicted_segments):
  """Ordered pairs of true-cell pixels, a pixel paired with itself included; a predicted
  boundary pixel is in no segment but its own."""
  inside = [(t, p) for t, p in zip(true_segments.ravel(), predicted_segments.ravel()) if t > 0]
  counts = np.zeros(3)
  for (i, (t_i, p_i)), (j, (t_j, p_j)) in itertools.product(enumerate(inside), repeat=2):
    same_true = t_i == t_j
    same_predicted = i == j or (p_i == p_j and p_i > 0)
    counts += [same_true and same_predicted, same_true, same_predicted]
  return counts


def test_rand_pair_counts_equal_brute_force_pair_counting():
  rng = np.random.default_rng(0)
  for _ in range(5):
    true_segments, predicted = random_segments(rng), random_segments(rng)
    expected = brute_force_rand_counts(true_segments, predicted)
    counts = metrics.rand_pair_counts(true_segments, predicted)
    np.testing.assert_array_equal(counts, expected)
    same_both, same_true, same_predicted = expected
    precision, recall = same_both / same_predicted, same_both / same_true
    assert metrics.rand_f_score(counts) == pytest.approx(
        2 * precision * recall / (precision + recall))


def test_a_missing_membrane_merges_two_cells_by_a_computable_amount():
  label = two_cells()
  true_segments = metrics.cell_segments(label == 1)
  # Pairs inside the two 8-pixel cells: 8² + 8² = 128 in one true cell; with the membrane
  # missed both cells are one predicted segment: 16² = 256 pairs. P = 1/2, R = 1, F = 2/3.
  merged = np.ones_like(label)
  np.testing.assert_array_equal(metrics.rand_pair_counts(true_segments, merged),
                                [128, 128, 256])
  # A map that cannot tell membrane from cell: at every threshold the two cells merge, or
  # (at thresholds ≤ 0.2) no pixel is a cell, F = 2 · 1 · 1/8 / (1 + 1/8) = 2/9.
  scores = metrics.challenge_scores(np.full(label.shape, 0.2), label, warping=False)
  assert scores["rand_error"] == pytest.approx(1 / 3)
  assert scores["rand_threshold"] == 1.0


def test_a_perfect_prediction_has_no_error():
  label = quarters()
  scores = metrics.challenge_scores((label == 0).astype(np.float32), label)
  assert scores["pixel_error"] == 0 and scores["rand_error"] == 0
  assert scores["v_rand_thinned"] == 1 and scores["v_info_thinned"] == 1
  assert scores["warping_error"] == 0


def test_the_sweep_finds_a_best_threshold_other_than_one_half():
  label = quarters()
  # An under-confident map: membrane at 0.35, cells at 0.1. The argmax (0.5) misses every
  # membrane pixel; thresholds 0.2 and 0.3 separate them exactly.
  probability = np.where(label == 0, 0.35, 0.1)
  assert metrics.rand_error(probability >= 0.5, label) > 0
  sweep = metrics.challenge_sweep(probability, label)
  assert sweep["rand_f_score"][sweep["thresholds"] == 0.5] < 1
  np.testing.assert_array_equal(np.flatnonzero(sweep["rand_f_score"] == 1), [2, 3])
  scores = metrics.challenge_scores(probability, label)
  for name in ("pixel", "rand", "v_rand", "v_info", "warping"):
    assert scores[f"{name}_threshold"] == 0.3, name  # of the equals, the largest
  assert scores["pixel_error"] == 0 and scores["rand_error"] == 0


def entropy(values):
  _, counts = np.unique(values, return_counts=True, axis=0)
  p = counts / counts.sum()
  return -np.sum(p * np.log2(p))


def test_information_f_score_equals_plain_entropies_and_scikit_image():
  rng = np.random.default_rng(1)
  for _ in range(5):
    true_segments, predicted = random_segments(rng), random_segments(rng)
    inside = true_segments > 0
    t = true_segments[inside]
    s = predicted[inside].copy()
    s[s == 0] = 100 + np.arange(np.count_nonzero(s == 0))  # each boundary pixel on its own
    h_t, h_s = entropy(t), entropy(s)
    mutual = h_t + h_s - entropy(np.stack([t, s], axis=1))
    expected = 2 * mutual / (h_t + h_s)
    assert metrics.information_f_score(true_segments, predicted) == pytest.approx(expected)
    # scikit-image's conditional entropies [H(S | T), H(T | S)], in bits: I = H(T) − H(T | S).
    _, h_t_given_s = variation_of_information(t, s)
    assert 2 * (h_t - h_t_given_s) / (h_t + h_s) == pytest.approx(expected)


def test_thinning_leaves_one_pixel_lines_between_cells():
  label = two_cells(membrane_width=3)
  thinned = metrics.thin_boundaries(label == 1)
  np.testing.assert_array_equal(thinned[:, 3], 0)  # the middle column stays boundary
  np.testing.assert_array_equal(thinned[:, :3], 1)  # the rest joins the nearest cell
  np.testing.assert_array_equal(thinned[:, 4:], 2)
  np.testing.assert_array_equal(metrics.thin_boundaries(np.zeros((3, 3), bool)), 1)


def test_thinned_scores_forgive_thick_membranes_but_not_gaps():
  label = two_cells(membrane_width=1)
  label = np.pad(label, ((0, 0), (1, 1)), constant_values=1)  # membrane at column 3
  thick = label.copy()
  thick[:, 2:5] = 0  # the membrane drawn three pixels wide, centred on the true one
  gap = label.copy()
  gap[1, 3] = 1
  for name, prediction in (("thick", thick), ("gap", gap)):
    sweep = metrics.challenge_sweep((prediction == 0).astype(float), label,
                                    thresholds=[0.5])
    if name == "thick":
      assert sweep["rand_f_score"][0] < 1  # the thick pixels are cell pixels of the truth
      assert sweep["v_rand_thinned"][0] == 1 and sweep["v_info_thinned"][0] == 1
    else:
      assert sweep["v_rand_thinned"][0] < 1 and sweep["v_info_thinned"][0] < 1


def test_a_stack_pools_pixels_and_pairs_and_averages_thinned_scores():
  good = quarters()
  merged = quarters()
  merged[3, :] = 1  # the horizontal membrane missed: the four cells merge
  label = np.stack([good, good])
  probability = np.stack([good == 0, merged == 0]).astype(float)
  sweep = metrics.challenge_sweep(probability, label, thresholds=[0.5])
  slices = [metrics.challenge_sweep(p, l, thresholds=[0.5]) for p, l in zip(probability, label)]
  counts = sum(metrics.rand_pair_counts(metrics.cell_segments(l == 1),
                                        metrics.cell_segments(p < 0.5))
               for p, l in zip(probability, label))
  assert sweep["rand_f_score"][0] == pytest.approx(metrics.rand_f_score(counts))
  assert sweep["rand_f_score"][0] != pytest.approx(
      np.mean([s["rand_f_score"][0] for s in slices]))
  for name in ("v_rand_thinned", "v_info_thinned"):
    assert sweep[name][0] == pytest.approx(np.mean([s[name][0] for s in slices]))
  tp, fp, fn = 2 * 36, 7, 0  # 36 cell pixels per slice; 7 membrane pixels called cells
  assert sweep["pixel_f_score"][0] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def textbook_simple(ring):
  """Simple for 4-connected cells and 8-connected background: exactly one 4-component of
  cells among the 8 neighbours touches the centre by an edge, and the background neighbours
  form exactly one 8-component."""
  patch = np.zeros((3, 3), bool)
  for bit, (dy, dx) in enumerate(warping._RING):
    patch[1 + dy, 1 + dx] = bool(ring >> bit & 1)
  cells = connected_regions(patch, connectivity=1)
  touching = {cells[0, 1], cells[1, 0], cells[1, 2], cells[2, 1]} - {0}
  background = ~patch
  background[1, 1] = False
  return len(touching) == 1 and connected_regions(background, connectivity=2).max() == 1


def test_simple_points_follow_the_textbook_definition():
  assert [warping.is_simple(r) for r in range(256)] == [textbook_simple(r) for r in range(256)]
  assert not warping.is_simple(0)  # an isolated pixel cannot vanish
  assert warping.is_simple(0b00000001)  # the tip of a line can
  assert not warping.is_simple(0b00010001)  # a pixel joining N and S cannot


def test_warping_forgives_a_shifted_membrane_and_counts_gaps_and_cuts():
  label = np.ones((7, 9), int)
  label[:, 3] = 0
  shifted = np.ones_like(label)
  shifted[:, 4] = 0
  gap = label.copy()
  gap[3, 3] = 1  # one missing membrane pixel merges the two cells
  cut = label.copy()
  cut[4, 4:] = 0  # an extra membrane splits the right cell
  for prediction, expected in ((shifted, (0, 0)), (gap, (0, 1)), (cut, (1, 0))):
    cells = prediction == 1
    warped = warping.warp(label == 1, cells, np.ones(label.shape))
    assert warping.splits_and_mergers(warped, cells) == expected
  # The most confident disagreement is flipped first: the cut is eroded from its confident end
  # and the pixel left is the least confident one.
  columns = np.broadcast_to(np.arange(label.shape[1]), label.shape).astype(float)
  for priority, left in ((columns, (4, 4)), (-columns, (4, 8))):
    warped = warping.warp(label == 1, cut == 1, priority)
    assert [tuple(p) for p in np.argwhere(warped != (cut == 1))] == [left]
  # A ring-shaped cell cut once stays one cell: the pixel left is a hole deleted, not a split.
  ring = np.zeros((7, 7), int)
  ring[1:6, 1:6] = 1
  ring[3, 3] = 0
  opened = ring.copy()
  opened[3, 4:6] = 0
  warped = warping.warp(ring == 1, opened == 1, np.ones(ring.shape))
  assert np.count_nonzero(warped != (opened == 1)) == 1
  assert warping.splits_and_mergers(warped, opened == 1) == (0, 0)
  errors = warping.warping_errors(np.stack([shifted == 0, gap == 0]).astype(float),
                                  np.stack([label, label]), thresholds=[0.5])
  np.testing.assert_allclose(errors, [1 / (2 * label.size)])  # one merger over two slices


@pytest.mark.parametrize("probability, label, match", [
    (np.zeros((4, 4)), np.full((4, 4), 255), "0 .membrane. and 1 .cell. only"),
    (np.full((4, 4), 1.5), np.ones((4, 4)), r"\[0, 1\]"),
    (np.zeros((4, 4)), np.ones((4, 5)), "one shape"),
    (np.zeros((4, 4)), np.zeros((4, 4)), "no cell pixel"),
])
def test_bad_inputs_are_named(probability, label, match):
  with pytest.raises(ValueError, match=match):
    metrics.challenge_scores(probability, label)


def test_thresholds_are_checked():
  with pytest.raises(ValueError, match=r"numbers in \[0, 1\]"):
    metrics.challenge_sweep(np.zeros((4, 4)), np.ones((4, 4)), thresholds=[0.5, 2.0])
  with pytest.raises(ValueError, match="threshold above 0"):
    metrics.challenge_scores(np.zeros((4, 4)), np.ones((4, 4)), thresholds=[0.0])
