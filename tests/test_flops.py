"""The analytic FLOP count against hand arithmetic and against XLA's own cost analysis."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from unet_jax import flops, model

TINY = dict(in_channels=3, num_classes=2, features=(8, 16, 32))


def xla_flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):  # some jax versions return one dict per computation
    analysis = analysis[0]
  return analysis["flops"]


def test_hand_count_of_a_depth_one_paper_net():
  # 20×20×1 → 18 → 16 (4 ch), pool → 8 → 6 → 4 (8 ch), up-conv → 8×8, crop+concat → 8 → 6 → 4.
  conv = 2 * 9 * (18 * 18 * 1 * 4 + 16 * 16 * 4 * 4       # encoder
                  + 6 * 6 * 4 * 8 + 4 * 4 * 8 * 8         # bottleneck
                  + 6 * 6 * 8 * 4 + 4 * 4 * 4 * 4)        # decoder
  count = flops.forward_flops(dict(model.paper.keywords, in_channels=1, num_classes=2,
                                   features=(4, 8)), 20, 20)
  assert count.conv == conv == 161_568
  assert count.up == 2 * (4 * 4) * 4 * 8 * 4       # 4×4 input pixels, 2×2 taps, 8 → 4 ch
  assert count.head == 2 * (4 * 4) * 4 * 2
  assert count.model == count.conv + count.up + count.head
  assert flops.train_step_flops(dict(model.paper.keywords, in_channels=1, features=(4, 8)),
                                20, 20, batch=3) == 3 * 3 * count.model


def test_padded_border_taps_are_not_counted():
  # One "same" 3×3 conv on 4×4: each dimension has 3·4 − 2 = 10 (output, tap) pairs inside.
  same = flops.forward_flops(dict(features=(2, 2), encoder_padding="same",
                                  decoder_padding="same", in_channels=1), 4, 4)
  first_conv = 2 * 10 * 10 * 1 * 2
  assert same.conv > first_conv
  valid = flops.forward_flops(dict(features=(2, 2), in_channels=1), 20, 20)
  assert valid.conv % (2 * 9) == 0  # unpadded: every output sees all 9 taps


def test_model_and_its_options_give_the_same_count():
  net = model.walkthrough(**TINY, rngs=nnx.Rngs(0))
  kwargs = dict(model.walkthrough.keywords, **TINY)
  assert flops.forward_flops(net, 44, 60, batch=2) == flops.forward_flops(kwargs, 44, 60,
                                                                          batch=2)
  assert flops.forward_flops(net, 44, 60, batch=2).total == 2 * flops.forward_flops(
      net, 44, 60).total


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="not a valid input"):
    flops.forward_flops(dict(TINY), 45, 44)
  with pytest.raises(ValueError, match="unknown UNet options"):
    flops.forward_flops(dict(TINY, widths=(1, 2)), 44, 44)


# XLA counts the convolutions exactly as we do (no padding taps), plus every elementwise op of
# the graph; `elementwise` estimates those, so `total` lands within 2% and `model` just below.
FORWARD_CASES = [
    ("paper", {}, (44, 44)),
    ("walkthrough", {}, (44, 60)),
    ("milesial", {}, (32, 32)),
    ("milesial", {"upsample": "bilinear"}, (32, 48)),
    ("milesial", {"norm": None}, (32, 32)),
]


@pytest.mark.parametrize("preset,options,hw", FORWARD_CASES)
def test_forward_count_matches_xla(preset, options, hw):
  net = model.PRESETS[preset](**TINY, **options, rngs=nnx.Rngs(0))
  net.eval()
  graphdef, state = nnx.split(net)
  x = jnp.ones((2, *hw, 3))
  reference = xla_flops(lambda state, x: nnx.merge(graphdef, state)(x), state, x)
  count = flops.forward_flops(net, *hw, batch=2)
  assert count.total == pytest.approx(reference, rel=0.02)
  assert 0.9 * reference < count.model < reference


# The backward pass adds more elementwise work (BatchNorm's batch statistics, their gradients),
# and skips the input image's gradient, so "3 × forward" is looser: within 10% here, closer
# at real widths where the convolutions dominate even more.
@pytest.mark.parametrize("preset,hw", [("paper", (44, 44)), ("walkthrough", (44, 44))])
def test_train_step_count_matches_xla_gradient(preset, hw, monkeypatch):
  # The count is of the textbook computation: the stock model (the CPU layer takes a padded
  # convolution's kernel gradient on an explicitly padded input, whose zeros XLA's cost
  # analysis would count as work).
  net = model.PRESETS[preset](**TINY, rngs=nnx.Rngs(0))
  net.train()
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)
  x = jnp.ones((2, *hw, 3))
  labels = jnp.zeros((2, *net.output_shape(*hw)), jnp.int32)

  def loss(params, rest, x):
    logits = nnx.merge(graphdef, params, rest, copy=True)(x, rngs=nnx.Rngs(dropout=0))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  reference = xla_flops(jax.grad(loss), params, rest, x)
  assert flops.train_step_flops(net, *hw, batch=2) == pytest.approx(reference, rel=0.1)


def test_odd_sizes_of_a_pad_to_skip_model_match_xla():
  """milesial's model at 75×101: floored pools, up-sampled maps padded back to their skips."""
  net = model.milesial(1, 2, features=(4, 8, 16), rngs=nnx.Rngs(0))
  net.eval()
  counted = flops.forward_flops(net, 75, 101).model
  cost = jax.jit(lambda x: net(x)).lower(jnp.zeros((1, 75, 101, 1))).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert abs(counted - cost["flops"]) / cost["flops"] < 0.1


def test_three_dimensional_models_are_refused_clearly():
  with pytest.raises(ValueError, match="2-D U-Nets"):
    flops.forward_flops({"spatial_dims": 3, "features": (4, 8)}, 16, 16)
