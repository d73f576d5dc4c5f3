"""Tests for the segmentation losses."""

import math

import jax
import numpy as np
import optax
import pytest

from unet_jax import losses

NUM_CLASSES = 3

# Eager JAX compiles each primitive separately for every new shape; compiling each loss whole
# keeps the suite fast. test_jit_equals_eager covers the eager path.
weighted_cross_entropy = jax.jit(losses.weighted_cross_entropy, static_argnames="ignore_index")
dice_loss = jax.jit(losses.dice_loss, static_argnames="ignore_index")
dice_ce_loss = jax.jit(losses.dice_ce_loss, static_argnames="ignore_index")


def _batch(seed: int = 0, shape=(2, 8, 8)):
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal(shape + (NUM_CLASSES,)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, shape).astype(np.int32)
  weights = rng.uniform(0.5, 5.0, shape).astype(np.float32)
  return logits, labels, weights


def _one_hot(labels: np.ndarray) -> np.ndarray:
  return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def test_perfect_prediction_has_near_zero_losses():
  _, labels, weights = _batch()
  logits = 30.0 * _one_hot(labels)
  assert weighted_cross_entropy(logits, labels, weights=weights) < 1e-6
  assert dice_loss(logits, labels) < 1e-6
  assert dice_ce_loss(logits, labels, weights=weights) < 1e-6


def test_disjoint_prediction_has_dice_near_one():
  _, labels, _ = _batch(shape=(2, 16, 16))
  logits = 30.0 * _one_hot((labels + 1) % NUM_CLASSES)
  # Every class is present, so each D_c = 1 - s / (P_c + T_c + s) with P_c + T_c > 100.
  assert 0.99 < dice_loss(logits, labels) <= 1.0
  assert weighted_cross_entropy(logits, labels) > 29.0


def test_uniform_weights_equal_unweighted_mean():
  logits, labels, _ = _batch()
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  np.testing.assert_allclose(weighted_cross_entropy(logits, labels), plain, rtol=1e-6)
  for level in (1.0, 7.5):
    weights = np.full(labels.shape, level, np.float32)
    np.testing.assert_allclose(
        weighted_cross_entropy(logits, labels, weights=weights), plain, rtol=1e-6
    )


def test_hand_computed_two_pixel_case():
  logits = np.array([[[[0.0, 0.0], [2.0, 0.0]]]], np.float32)  # [1, H=1, W=2, C=2]
  labels = np.array([[[0, 1]]], np.int32)
  weights = np.array([[[1.0, 3.0]]], np.float32)
  ce_a, ce_b = math.log(2.0), math.log(1.0 + math.e**2)
  np.testing.assert_allclose(
      weighted_cross_entropy(logits, labels, weights=weights), (ce_a + 3 * ce_b) / 4, rtol=1e-6
  )
  q = 1.0 / (1.0 + math.exp(-2.0))  # p_0 at the second pixel
  dice_0 = 1 - (2 * 0.5 + 1) / ((0.5 + q) + 1 + 1)
  dice_1 = 1 - (2 * (1 - q) + 1) / ((0.5 + 1 - q) + 1 + 1)
  np.testing.assert_allclose(
      dice_loss(logits, labels, smooth=1.0), (dice_0 + dice_1) / 2, rtol=1e-6
  )
  np.testing.assert_allclose(
      dice_ce_loss(logits, labels, weights=weights, ce_weight=0.5, dice_weight=2.0),
      0.5 * (ce_a + 3 * ce_b) / 4 + 2.0 * (dice_0 + dice_1) / 2,
      rtol=1e-6,
  )


def test_dice_matches_optax_with_half_smoothing():
  logits, labels, _ = _batch()
  targets = _one_hot(labels)
  reference = optax.losses.dice_loss(logits, targets, smooth=0.5, axis=(1, 2)).mean()
  np.testing.assert_allclose(dice_loss(logits, labels, smooth=1.0), reference, rtol=1e-5)


def test_ignore_index_equals_zero_weights_and_blocks_gradient():
  logits, labels, weights = _batch()
  ignored = np.zeros(labels.shape, bool)
  ignored[:, :3] = True
  marked = np.where(ignored, 255, labels)
  ce = weighted_cross_entropy(logits, marked, weights=weights, ignore_index=255)
  zeroed = weighted_cross_entropy(logits, labels, weights=np.where(ignored, 0.0, weights))
  assert np.isfinite(ce)
  np.testing.assert_allclose(ce, zeroed, rtol=1e-6)
  # Dice on the kept rows only equals Dice with the ignored rows masked out.
  np.testing.assert_allclose(
      dice_loss(logits, marked, ignore_index=255), dice_loss(logits[:, 3:], labels[:, 3:]),
      rtol=1e-6,
  )
  grad = jax.jit(jax.grad(lambda z: dice_ce_loss(z, marked, weights=weights, ignore_index=255)))(
      logits
  )
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[:, :3], 0.0)
  assert np.any(grad[:, 3:] != 0.0)


def test_everything_ignored_gives_zero_loss_and_zero_gradient():
  logits, labels, _ = _batch()
  marked = np.full(labels.shape, -1, np.int32)
  loss, grad = jax.value_and_grad(weighted_cross_entropy)(logits, marked, ignore_index=-1)
  assert loss == 0.0
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(
    "loss_fn", [losses.weighted_cross_entropy, losses.dice_loss, losses.dice_ce_loss]
)
def test_gradients_are_finite_and_nonzero(loss_fn):
  logits, labels, _ = _batch()
  grad = jax.jit(jax.grad(loss_fn))(logits, labels)
  assert grad.shape == logits.shape
  assert np.all(np.isfinite(grad))
  assert np.abs(grad).max() > 1e-4


def test_jit_equals_eager():
  logits, labels, weights = _batch()
  eager = losses.dice_ce_loss(logits, labels, weights=weights, ignore_index=2, dice_weight=0.3)
  jitted = jax.jit(
      lambda z, y, w: losses.dice_ce_loss(z, y, weights=w, ignore_index=2, dice_weight=0.3)
  )(logits, labels, weights)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_leading_dimensions_are_free():
  logits, labels, weights = _batch(shape=(2, 3, 4, 5))
  flat = (logits.reshape(6, 4, 5, NUM_CLASSES), labels.reshape(6, 4, 5))
  np.testing.assert_allclose(
      weighted_cross_entropy(logits, labels, weights=weights),
      weighted_cross_entropy(*flat, weights=weights.reshape(6, 4, 5)),
      rtol=1e-6,
  )
  np.testing.assert_allclose(dice_loss(logits, labels), dice_loss(*flat), rtol=1e-6)
  single = dice_loss(logits[0, 0], labels[0, 0])  # no leading dimensions at all
  assert single.shape == ()


def test_mismatched_shapes_raise():
  logits, labels, _ = _batch()
  with pytest.raises(ValueError, match="labels"):
    losses.weighted_cross_entropy(logits, labels[..., :-1])
  with pytest.raises(ValueError, match="labels"):
    losses.dice_loss(logits[0, 0, 0], labels[0, 0, 0])
