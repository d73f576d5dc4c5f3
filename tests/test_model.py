"""Tests for the U-Net modules and presets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from unet_jax import model as unet
from unet_jax.model import BatchNorm, count_params, crop_and_concat, upsample_bilinear

TINY = (4, 8, 16, 32, 64)  # depth 4, like the paper, at 1/16 of its widths
SMALL = (2, 4, 8)  # depth 2


def _abstract(preset, *args, **kwargs):
  """The model's structure and shapes, without allocating its parameters."""
  return nnx.eval_shape(lambda: preset(*args, rngs=nnx.Rngs(0), **kwargs))


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _modules(model, kind):
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, kind)]


# ----------------------------------------------------------------------------------------------
# Parameter counts.


def test_walkthrough_param_count():
  # DoubleConv(i, o) with bias and BatchNorm: 9·i·o + o + 9·o·o + o + 2·2·o.
  #   encoder: (1, 64) 37,824 + (64, 128) 221,952 + (128, 256) 886,272
  #            + (256, 512) 3,542,016 + (512, 1024) 14,161,920 = 18,849,984
  # Up(i → o): 2×2 up-convolution 4·i·o + o, then DoubleConv(2·o, o):
  #   (1024 → 512) 2,097,664 + 7,080,960   (512 → 256) 524,544 + 1,771,008
  #   (256 → 128) 131,200 + 443,136         (128 → 64) 32,832 + 110,976   = 12,192,320
  # 1×1 head: 64·2 + 2 = 130.
  # Total: 18,849,984 + 12,192,320 + 130 = 31,042,434.
  assert count_params(_abstract(unet.walkthrough, 1, 2)) == 31_042_434


def test_paper_param_count():
  # The walkthrough without its 18 BatchNorms: each has 2·o parameters, summing to
  # 2·2·(64 + 128 + 256 + 512 + 1024) + 2·2·(512 + 256 + 128 + 64) = 7,936 + 3,840 = 11,776.
  # Total: 31,042,434 − 11,776 = 31,030,658.
  assert count_params(_abstract(unet.paper, 1, 2)) == 31_030_658


def test_milesial_transpose_param_count():
  # milesial/Pytorch-UNet, UNet(n_channels=3, n_classes=2, bilinear=False).
  # DoubleConv(i, o) without bias, with BatchNorm: 9·i·o + 9·o·o + 2·2·o.
  #   encoder: (3, 64) 38,848 + (64, 128) 221,696 + (128, 256) 885,760
  #            + (256, 512) 3,540,992 + (512, 1024) 14,159,872 = 18,847,168
  # up-convolutions (with bias): 2,097,664 + 524,544 + 131,200 + 32,832 = 2,786,240
  # decoder DoubleConvs: 7,079,936 + 1,770,496 + 442,880 + 110,848 = 9,404,160
  # 1×1 head with bias: 130.
  # Total: 18,847,168 + 2,786,240 + 9,404,160 + 130 = 31,037,698.
  assert count_params(_abstract(unet.milesial, 3, 2)) == 31_037_698


def test_milesial_bilinear_param_count():
  # milesial/Pytorch-UNet, UNet(n_channels=3, n_classes=2, bilinear=True): the bottom width
  # and the decoder widths are halved and there are no up-convolutions.
  #   encoder: 38,848 + 221,696 + 885,760 + 3,540,992 + (512, 512) 4,720,640 = 9,407,936
  # DoubleConv(i, o, mid) without bias: 9·i·mid + 2·mid + 9·mid·o + 2·o:
  #   (1024, 256, 512) 5,899,776 + (512, 128, 256) 1,475,328 + (256, 64, 128) 369,024
  #   + (128, 64, 64) 110,848 = 7,854,976
  # 1×1 head with bias: 130.
  # Total: 9,407,936 + 7,854,976 + 130 = 17,263,042.
  model = _abstract(unet.milesial, 3, 2, upsample="bilinear")
  assert count_params(model) == 17_263_042
  assert model.downs[-1].conv.conv2.kernel.shape == (3, 3, 512, 512)
  assert model.ups[0].conv.conv1.kernel.shape == (3, 3, 1024, 512)
  assert model.ups[0].conv.conv2.kernel.shape == (3, 3, 512, 256)
  assert model.ups[-1].conv.conv2.kernel.shape == (3, 3, 64, 64)


def test_paper_has_23_convolution_layers_and_no_batch_norm():
  model = _abstract(unet.paper, 1, 2)
  # 9 DoubleConvs × 2 + 4 up-convolutions + the 1×1 head = 23, as the paper states.
  assert len(_modules(model, nnx.Conv)) == 19
  assert len(_modules(model, nnx.ConvTranspose)) == 4
  assert not _modules(model, (BatchNorm, nnx.BatchNorm))
  assert model.dropout is not None and model.dropout.rate == 0.5


def test_norm_and_bias_per_preset():
  walkthrough = _abstract(unet.walkthrough, 1, 2)
  assert len(_modules(walkthrough, BatchNorm)) == 18
  assert all(c.bias is not None for c in _modules(walkthrough, nnx.Conv))
  milesial = _abstract(unet.milesial, 3, 2, upsample="bilinear")
  assert len(_modules(milesial, BatchNorm)) == 18
  assert not _modules(milesial, nnx.ConvTranspose)
  convs = _modules(milesial, nnx.Conv)
  assert len(convs) == 19
  # Only the 1×1 head has a bias, as in milesial/Pytorch-UNet.
  assert [c.kernel_size for c in convs if c.bias is not None] == [(1, 1)]


# ----------------------------------------------------------------------------------------------
# Output shapes.


@pytest.mark.parametrize("preset, kwargs, in_shape, out_shape", [
    (unet.paper, {}, (2, 188, 204, 1), (2, 4, 20, 3)),
    (unet.paper, {}, (1, 188, 188, 1), (1, 4, 4, 3)),
    (unet.walkthrough, {}, (2, 140, 156, 1), (2, 16, 32, 3)),
    (unet.milesial, {}, (2, 32, 48, 1), (2, 32, 48, 3)),
    (unet.milesial, {"upsample": "bilinear"}, (3, 48, 16, 1), (3, 48, 16, 3)),
])
def test_output_shapes(preset, kwargs, in_shape, out_shape):
  model = preset(1, 3, features=TINY, rngs=nnx.Rngs(0), **kwargs)
  model.eval()
  assert model.output_shape(*in_shape[1:3]) == out_shape[1:3]
  y = nnx.jit(lambda m, x: m(x))(model, jnp.zeros(in_shape))
  assert y.shape == out_shape
  assert y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()


# ----------------------------------------------------------------------------------------------
# Invalid inputs and options.


def test_invalid_height_names_nearest_sizes():
  model = unet.paper(1, 2, features=TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError) as info:
    model(jnp.zeros((1, 573, 572, 1)))
  message = str(info.value)
  assert "573×572 is not a valid input" in message
  assert "572, 588" in message
  with pytest.raises(ValueError, match="572, 588"):
    model.output_shape(573, 572)


def test_wrong_channel_count_names_channels():
  model = unet.milesial(3, 2, features=TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"3 input channel\(s\).*with 1"):
    model(jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.zeros((1, 3, 32, 32)))  # NCHW


def test_unbatched_input_suggests_adding_batch_axis():
  model = unet.milesial(3, 2, features=TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"x\[None\]"):
    model(jnp.zeros((32, 32, 3)))


@pytest.mark.parametrize("kwargs", [
    dict(upsample="nearest"), dict(norm="layer"), dict(dropout=1.0), dict(dropout=-0.1),
    dict(features=(8,)), dict(features=(8, 0)), dict(concat_order="up_down"),
    dict(features=(4, 6, 9), upsample="bilinear"), dict(in_channels=0), dict(num_classes=0)])
def test_invalid_options(kwargs):
  kwargs = {"features": SMALL, **kwargs}
  with pytest.raises(ValueError):
    unet.UNet(rngs=nnx.Rngs(0), **kwargs)


# ----------------------------------------------------------------------------------------------
# Training and evaluation modes.


def _batch_stats(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))


def test_batch_norm_stats_update_only_in_train_mode():
  model = unet.walkthrough(1, 2, features=SMALL, rngs=nnx.Rngs(0))
  x = _images((2, 36, 40, 1))
  forward = nnx.jit(lambda m, x: m(x))
  before = _batch_stats(model)
  forward(model, x)  # modules start in train mode
  after_train = _batch_stats(model)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, after_train)
  assert all(jax.tree.leaves(changed))

  model.eval()
  y1 = forward(model, x)
  y2 = forward(model, x)
  jax.tree.map(np.testing.assert_array_equal, _batch_stats(model), after_train)
  np.testing.assert_array_equal(y1, y2)
  # Eval uses the running statistics, so one image's output does not depend on its batch.
  np.testing.assert_allclose(forward(model, x[:1]), y1[:1], rtol=1e-5, atol=1e-6)


def test_dropout_differs_between_rngs_in_train_mode_only():
  model = unet.paper(1, 2, features=SMALL, rngs=nnx.Rngs(0))
  x = _images((1, 44, 48, 1))
  forward = nnx.jit(lambda m, x, rngs: m(x, rngs=rngs))
  a = forward(model, x, nnx.Rngs(dropout=1))
  b = forward(model, x, nnx.Rngs(dropout=2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, forward(model, x, nnx.Rngs(dropout=1)))

  model.eval()
  c = forward(model, x, nnx.Rngs(dropout=1))
  d = forward(model, x, nnx.Rngs(dropout=2))
  np.testing.assert_array_equal(c, d)
  np.testing.assert_array_equal(c, nnx.jit(lambda m, x: m(x))(model, x))


def test_batch_norm_matches_pytorch_semantics():
  bn = BatchNorm(3, momentum=0.9)
  x = _images((4, 5, 6, 3)) * 2.0 + 1.0
  y = bn(x)
  flat = np.asarray(x).reshape(-1, 3)
  mean, var = flat.mean(0), flat.var(0)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
  # Running statistics keep the unbiased variance, as PyTorch does.
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Building blocks.


@pytest.mark.parametrize("order", ["skip_up", "up_skip"])
def test_crop_and_concat(order):
  up = -jnp.arange(1 * 3 * 4 * 2, dtype=jnp.float32).reshape(1, 3, 4, 2) - 1
  skip = jnp.arange(1 * 8 * 11 * 3, dtype=jnp.float32).reshape(1, 8, 11, 3)
  out = crop_and_concat(up, skip, order=order)
  assert out.shape == (1, 3, 4, 5)
  # Height 8 → 3 removes (2, 3) rows, width 11 → 4 removes (3, 4) columns.
  window = skip[:, 2:5, 3:7, :]
  if order == "skip_up":
    np.testing.assert_array_equal(out[..., :3], window)
    np.testing.assert_array_equal(out[..., 3:], up)
  else:
    np.testing.assert_array_equal(out[..., :2], up)
    np.testing.assert_array_equal(out[..., 2:], window)


def _bilinear_align_corners_reference(x, scale=2):
  """PyTorch's ``Upsample(mode="bilinear", align_corners=True)``, pixel by pixel."""
  n, h, w, c = x.shape
  out = np.zeros((n, h * scale, w * scale, c), np.float64)

  def source(i, n_in, n_out):
    position = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    low = min(int(np.floor(position)), n_in - 1)
    high = min(low + 1, n_in - 1)
    return low, high, position - low

  for oy in range(h * scale):
    y0, y1, fy = source(oy, h, h * scale)
    for ox in range(w * scale):
      x0, x1, fx = source(ox, w, w * scale)
      out[:, oy, ox, :] = ((1 - fy) * (1 - fx) * x[:, y0, x0, :] + (1 - fy) * fx * x[:, y0, x1, :]
                           + fy * (1 - fx) * x[:, y1, x0, :] + fy * fx * x[:, y1, x1, :])
  return out


@pytest.mark.parametrize("shape", [(2, 3, 4, 2), (1, 1, 3, 1), (1, 4, 1, 2), (1, 1, 1, 1),
                                   (1, 5, 2, 1)])
def test_upsample_bilinear_matches_align_corners(shape):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  y = upsample_bilinear(jnp.asarray(x))
  assert y.shape == (shape[0], 2 * shape[1], 2 * shape[2], shape[3])
  np.testing.assert_allclose(y, _bilinear_align_corners_reference(x), rtol=1e-6, atol=1e-6)
  # align_corners keeps the corner pixels.
  np.testing.assert_allclose(y[:, 0, 0], x[:, 0, 0], atol=1e-6)
  np.testing.assert_allclose(y[:, -1, -1], x[:, -1, -1], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Precision and memory options.


def test_bfloat16_compute_keeps_float32_params_and_logits():
  make = functools.partial(unet.milesial, 1, 2, features=TINY)
  fp32, bf16 = make(rngs=nnx.Rngs(0)), make(dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  for model in (fp32, bf16):
    model.eval()
  params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(fp32), nnx.state(bf16))
  x = _images((2, 32, 32, 1))
  forward = nnx.jit(lambda m, x: m(x))
  y32, y16 = forward(fp32, x), forward(bf16, x)
  assert y16.dtype == jnp.float32
  assert not np.array_equal(y32, y16)  # the computation did run in bfloat16
  scale = float(jnp.abs(y32).max())
  np.testing.assert_allclose(y16, y32, atol=0.05 * scale)


def test_remat_gives_same_loss_and_gradients():
  x = _images((2, 36, 36, 1))

  def loss_and_grads(remat):
    model = unet.walkthrough(1, 2, features=SMALL, remat=remat, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(model, x):
      return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)

    loss, grads = step(model, x)
    return loss, grads, nnx.state(model, nnx.BatchStat)

  loss, grads, stats = loss_and_grads(False)
  loss_r, grads_r, stats_r = loss_and_grads(True)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(grads_r)) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), stats_r, stats)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------------------------
# Data parallelism.


def test_batch_norm_with_axis_name_is_synchronised():
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  x = _images((4, 5, 6, 3)) * 3.0 - 1.0
  x = x.at[:2].multiply(2.0)  # the two shards have different statistics
  graphdef, state = nnx.split(BatchNorm(3, axis_name="data"))

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")),
                     out_specs=(P("data"), P()))
  def sharded(state, x):
    bn = nnx.merge(graphdef, state)
    y = bn(x)
    return y, nnx.state(bn)

  y, new_state = sharded(state, x)
  reference = BatchNorm(3)
  y_ref = reference(x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state["mean"][...], reference.mean[...], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["var"][...], reference.var[...], rtol=1e-5)
  # Without synchronisation each shard would normalise with its own statistics.
  per_shard = np.concatenate([BatchNorm(3)(x[:2]), BatchNorm(3)(x[2:])])
  assert not np.allclose(y, per_shard, atol=1e-3)
