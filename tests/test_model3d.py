"""Tests for the 3-D U-Net (``spatial_dims=3``) and the ``cicek3d`` preset (Çiçek et al. 2016)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from unet_jax import cpu, model as unet
from unet_jax.geometry import Geometry, center_crop
from unet_jax.model import (BatchNorm, UNet, config_of, count_params, crop_and_concat,
                            pad_and_concat, upsample_bilinear)

TINY = (2, 4, 8)  # depth 2
CICEK = dict(halve_encoder_mid=True, upconv_width="keep", upconv_bias=False)


def _volumes(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _modules(model, kind):
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, kind)]


def _model3d(in_channels=1, num_classes=2, features=TINY, **kwargs):
  return UNet(in_channels, num_classes, features=features, spatial_dims=3, rngs=nnx.Rngs(0),
              **kwargs)


# ----------------------------------------------------------------------------------------------
# The paper's network.


def test_cicek3d_param_count():
  """19,069,955 parameters besides BatchNorm's, as Çiçek et al. state; 19,074,627 in all.

  DoubleConv(i → mid → o), 3×3×3 convolutions with bias: 27·i·mid + mid + 27·mid·o + o.
    analysis:  (3 → 32 → 64) 2,624 + 55,360          (64 → 64 → 128) 110,656 + 221,312
               (128 → 128 → 256) 442,496 + 884,992   (256 → 256 → 512) 1,769,728 + 3,539,456
               = 7,026,624
  2×2×2 up-convolutions keeping the width, without bias: 8·512² + 8·256² + 8·128²
               = 2,097,152 + 524,288 + 131,072 = 2,752,512
  synthesis:   (512 + 256 → 256 → 256) 5,308,672 + 1,769,728
               (256 + 128 → 128 → 128) 1,327,232 + 442,496
               (128 + 64 → 64 → 64) 331,840 + 110,656 = 9,290,624
  1×1×1 head:  64·3 + 3 = 195
  Total: 7,026,624 + 2,752,512 + 9,290,624 + 195 = 19,069,955.
  BatchNorm after each of the 14 convolutions, scale and offset: 2·(32 + 64 + 64 + 128 + 128
  + 256 + 256 + 512 + 256 + 256 + 128 + 128 + 64 + 64) = 2·2,336 = 4,672.
  """
  model = nnx.eval_shape(lambda: unet.cicek3d(3, 3, rngs=nnx.Rngs(0)))
  norms = _modules(model, BatchNorm)
  batch_norm = sum(n.scale.size + n.bias.size for n in norms)
  assert len(norms) == 14 and batch_norm == 4_672
  assert count_params(model) - batch_norm == 19_069_955
  assert count_params(model) == 19_069_955 + 4_672
  assert [u.up.kernel.shape for u in model.ups] == [(2, 2, 2, 512, 512), (2, 2, 2, 256, 256),
                                                    (2, 2, 2, 128, 128)]
  assert all(u.up.bias is None for u in model.ups)
  assert model.inc.conv1.kernel.shape == (3, 3, 3, 3, 32)
  assert model.ups[0].conv.conv1.kernel.shape == (3, 3, 3, 768, 256)
  assert model.head.kernel.shape == (1, 1, 1, 64, 3)
  assert len(_modules(model, nnx.Conv)) == 15  # 14 3×3×3 convolutions and the head


def test_cicek3d_count_needs_width_keeping_bias_free_up_convolutions():
  """The arithmetic behind the preset: the other readings of the paper miss the count."""
  count = lambda **kw: count_params(nnx.eval_shape(
      lambda: unet.cicek3d(3, 3, rngs=nnx.Rngs(0), **kw))) - 4_672
  assert count(upconv_bias=True) == 19_069_955 + 896  # 512 + 256 + 128 biases
  # Halving up-convolutions (512 → 256, as Ronneberger et al.): 8·(512·256 + 256·128 +
  # 128·64) = 1,376,256, and the first synthesis convolutions see 512, 256, 128 channels.
  assert count(upconv_width="skip") == 7_026_624 + 1_376_256 + 6_968_192 + 195


def test_cicek3d_geometry_per_axis():
  model = nnx.eval_shape(lambda: unet.cicek3d(3, 3, rngs=nnx.Rngs(0)))
  assert model.output_shape(132, 132, 116) == (44, 44, 28)
  geometry = model.geometry
  # Each axis on its own: 132 → 128 | 64 → 60 | 30 → 26 | 13 → 9, up 18 → 14, 28 → 24,
  # 48 → 44; 116 → 112 | 56 → 52 | 26 → 22 | 11 → 7, up 14 → 10, 20 → 16, 32 → 28.
  assert geometry.trace(132) == {"skips": [128, 60, 26], "bottleneck": [9],
                                 "ups": [18, 28, 48], "decoder": [14, 24, 44]}
  assert geometry.trace(116) == {"skips": [112, 52, 22], "bottleneck": [7],
                                 "ups": [14, 20, 32], "decoder": [10, 16, 28]}
  with pytest.raises(ValueError, match=r"132×133×116 is not a valid input.*height 133 "
                                       r"\(nearest valid sizes 132, 140\).*2×2×2"):
    model.output_shape(132, 133, 116)


@pytest.mark.parametrize("features,size,out", [
    ((4, 8, 16, 32), (92, 100, 108), (4, 12, 20)),
    pytest.param((8, 16, 32, 64), (132, 132, 116), (44, 44, 28), marks=pytest.mark.slow,
                 id="the-papers-size"),
])
def test_cicek3d_shaped_forward(features, size, out):
  model = unet.cicek3d(3, 3, features=features, rngs=nnx.Rngs(0))
  model.eval()
  y = nnx.jit(lambda m, x: m(x))(model, _volumes((1, *size, 3)))
  assert y.shape == (1, *out, 3)
  assert np.isfinite(np.asarray(y)).all()


def test_cicek3d_config_round_trips():
  model = nnx.eval_shape(lambda: unet.cicek3d(3, 3, rngs=nnx.Rngs(0)))
  config = config_of(model)
  assert {k: config[k] for k in ("spatial_dims", "halve_encoder_mid", "upconv_width",
                                 "upconv_bias")} == {"spatial_dims": 3, **CICEK}
  rebuilt = nnx.eval_shape(lambda: UNet(**config, rngs=nnx.Rngs(1)))
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nnx.state(m))
  assert shapes(rebuilt) == shapes(model)
  assert "cicek3d" in unet.PRESETS


def test_2d_configs_are_unchanged_and_load_as_2d():
  model = nnx.eval_shape(lambda: unet.walkthrough(1, 2, features=TINY, rngs=nnx.Rngs(0)))
  config = config_of(model)
  assert sorted(config) == sorted([
      "in_channels", "num_classes", "features", "encoder_padding", "decoder_padding",
      "upsample", "norm", "use_bias", "dropout", "concat_order", "skip_fit", "activation",
      "remat"])
  rebuilt = UNet(**config, rngs=nnx.Rngs(0))
  assert rebuilt.spatial_dims == 2 and rebuilt.head.kernel.shape == (1, 1, 2, 2)


# ----------------------------------------------------------------------------------------------
# Shapes for every option that changes them.


@pytest.mark.parametrize("kwargs, in_size, out_size", [
    (dict(), (44, 52, 60), (4, 12, 20)),
    (dict(CICEK, norm="batch"), (44, 60, 48), (4, 20, 8)),
    (dict(upsample="bilinear"), (44, 52, 60), (4, 12, 20)),
    # 32 → 28 | 14 → 10 | 5 → 1, up 2, 4 (padded decoder keeps each size).
    (dict(decoder_padding="same", concat_order="up_skip"), (32, 40, 36), (4, 12, 8)),
    (dict(encoder_padding="same", decoder_padding="same"), (8, 12, 16), (8, 12, 16)),
    # Pad-to-skip: odd sizes floor when pooling (5 → 2 → 1), the up-sampled map is padded.
    (dict(encoder_padding="same", decoder_padding="same", skip_fit="pad"), (5, 7, 11),
     (5, 7, 11)),
    (dict(encoder_padding="same", decoder_padding="same", skip_fit="pad", upsample="bilinear"),
     (9, 6, 13), (9, 6, 13)),
], ids=["valid", "cicek", "trilinear", "walkthrough-like", "same", "pad-odd", "pad-trilinear"])
def test_output_shapes(kwargs, in_size, out_size):
  model = _model3d(1, 3, **kwargs)
  model.eval()
  assert model.output_shape(*in_size) == out_size
  y = nnx.jit(lambda m, x: m(x))(model, _volumes((2, *in_size, 1)))
  assert y.shape == (2, *out_size, 3) and y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()


# ----------------------------------------------------------------------------------------------
# Invalid inputs and options.


def test_invalid_volume_names_each_axis_and_the_nearest_sizes():
  model = _model3d()
  with pytest.raises(ValueError) as info:
    model(jnp.zeros((1, 45, 44, 50, 1)))
  message = str(info.value)
  assert "45×44×50 is not a valid input" in message
  assert "depth 45 (nearest valid sizes 44, 48)" in message
  assert "width 50 (nearest valid sizes 48, 52)" in message
  assert "height" not in message
  assert "volume" in message


def test_wrong_rank_and_channels_are_explained():
  model = _model3d(3)
  with pytest.raises(ValueError, match=r"volumes of shape \[N, D, H, W, 3\].*x\[None\]"):
    model(jnp.zeros((44, 44, 44, 3)))
  with pytest.raises(ValueError, match=r"3 input channel\(s\).*NDHWC"):
    model(jnp.zeros((1, 44, 44, 44, 1)))
  with pytest.raises(ValueError, match="spatial_dims=3: give the input's .depth, height, "
                                       "width., got 2 size"):
    model.output_shape(44, 44)
  with pytest.raises(ValueError, match=r"images of shape \[N, H, W, 1\].*spatial_dims=2"):
    UNet(1, 2, features=TINY, rngs=nnx.Rngs(0))(jnp.zeros((1, 44, 44, 44, 1)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(spatial_dims=1), "spatial_dims must be 2 .images. or 3 .volumes., got 1"),
    (dict(spatial_dims=True), "got True"),
    (dict(upconv_width="half"), "upconv_width must be 'skip' or 'keep', got 'half'"),
    (dict(upsample="bilinear", upconv_bias=False), "bilinear up-sampling has none"),
    (dict(halve_encoder_mid=True, features=(2, 3, 8)), r"widths must be even; got \[2, 3, 8\]"),
])
def test_invalid_options(kwargs, match):
  kwargs = {"features": TINY, "spatial_dims": 3, **kwargs}
  with pytest.raises(ValueError, match=match):
    UNet(rngs=nnx.Rngs(0), **kwargs)


# ----------------------------------------------------------------------------------------------
# Building blocks in 3-D.


def test_geometry_and_center_crop_per_axis():
  geometry = Geometry(2)
  assert geometry.check_shape(44, 60, 52) == (4, 20, 12)
  assert geometry.check_shape(44, 60) == (4, 20)  # the 2-D API is the same call
  x = np.arange(1 * 7 * 9 * 10 * 2).reshape(1, 7, 9, 10, 2)
  np.testing.assert_array_equal(center_crop(x, 4, 9, 5), x[:, 1:5, :, 2:7])
  np.testing.assert_array_equal(center_crop(x, 4, 5), x[:, :, 2:6, 2:7])  # the last two axes


@pytest.mark.parametrize("order", ["skip_up", "up_skip"])
def test_crop_and_pad_and_concat_in_3d(order):
  up = -jnp.ones((1, 2, 3, 4, 1))
  skip = jnp.arange(1 * 5 * 4 * 7 * 2, dtype=jnp.float32).reshape(1, 5, 4, 7, 2)
  cropped = crop_and_concat(up, skip, order=order)
  # 5 → 2 removes (1, 2), 4 → 3 removes (0, 1), 7 → 4 removes (1, 2).
  window = skip[:, 1:3, 0:3, 1:5]
  np.testing.assert_array_equal(cropped[..., :2] if order == "skip_up" else cropped[..., 1:],
                                window)
  padded = pad_and_concat(up, skip, order=order)
  assert padded.shape == (1, 5, 4, 7, 3)
  up_part = np.asarray(padded[..., 2] if order == "skip_up" else padded[..., 0])
  # 2 → 5 adds (1, 2), 3 → 4 adds (0, 1), 4 → 7 adds (1, 2), milesial's split on every axis.
  expected = np.zeros((1, 5, 4, 7))
  expected[:, 1:3, 0:3, 1:5] = -1
  np.testing.assert_array_equal(up_part, expected)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 2), (1, 1, 3, 2, 1), (1, 1, 1, 1, 1)])
def test_trilinear_upsampling_matches_pytorch_align_corners(shape):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  y = upsample_bilinear(jnp.asarray(x))
  reference = F.interpolate(torch.from_numpy(x).permute(0, 4, 1, 2, 3), scale_factor=2,
                            mode="trilinear", align_corners=True).permute(0, 2, 3, 4, 1)
  np.testing.assert_allclose(y, reference.numpy(), rtol=1e-5, atol=1e-6)


def test_batch_norm_over_volumes_matches_pytorch():
  x = _volumes((2, 3, 4, 5, 3)) * 2.0 + 1.0
  ours = BatchNorm(3, momentum=0.9)
  y = ours(x)
  theirs = torch.nn.BatchNorm3d(3, momentum=0.1)
  y_torch = theirs(torch.from_numpy(np.array(x)).permute(0, 4, 1, 2, 3))
  np.testing.assert_allclose(y, y_torch.detach().permute(0, 2, 3, 4, 1).numpy(), rtol=1e-5,
                             atol=1e-5)
  # Statistics over N, D, H, W (120 values per channel); the running variance is unbiased.
  flat = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(ours.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(ours.mean[...], theirs.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours.var[...], theirs.running_var.numpy(), rtol=1e-5)


def test_batch_norm_stats_update_only_in_train_mode_in_3d():
  model = _model3d(norm="batch", encoder_padding="same", decoder_padding="same")
  x = _volumes((2, 8, 4, 12, 1))
  forward = nnx.jit(lambda m, x: m(x))
  stats = lambda: jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  before = stats()
  forward(model, x)
  after = stats()
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after)))
  model.eval()
  y = forward(model, x)
  jax.tree.map(np.testing.assert_array_equal, stats(), after)
  np.testing.assert_allclose(forward(model, x[:1]), y[:1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Transformations, precision and memory options.


def _train_mode_fn(net):
  net.train()
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)
  return (lambda params, x: nnx.merge(graphdef, params, rest, copy=True)(x)), params


@pytest.mark.parametrize("kwargs, size", [
    (dict(CICEK, features=(2, 4), norm="batch"), (20, 24, 20)),
    (dict(features=(2, 4), norm="batch", encoder_padding="same", decoder_padding="same",
          skip_fit="pad", upsample="bilinear"), (5, 6, 3)),
], ids=["cicek", "pad-trilinear"])
def test_forward_mode_agrees_with_reverse_mode(kwargs, size):
  """``<u, J v>`` by ``jvp`` equals ``<Jᵀ u, v>`` by ``vjp`` through every 3-D layer."""
  f, params = _train_mode_fn(_model3d(**kwargs))
  x, v = _volumes((2, *size, 1), 0), _volumes((2, *size, 1), 1)
  y, jv = jax.jit(lambda x, v: jax.jvp(lambda x: f(params, x), (x,), (v,)))(x, v)
  u = _volumes(y.shape, 2)
  (jtu,) = jax.jit(lambda x, u: jax.vjp(lambda x: f(params, x), x)[1](u))(x, u)
  np.testing.assert_allclose(jnp.vdot(u, jv), jnp.vdot(jtu, v), rtol=2e-4)


def test_vmap_over_batches_equals_a_loop():
  f, params = _train_mode_fn(_model3d(features=(2, 4), norm="batch"))
  xs = _volumes((3, 2, 20, 20, 24, 1))
  mapped = jax.jit(jax.vmap(f, in_axes=(None, 0)))(params, xs)
  assert mapped.shape == (3, 2, 4, 4, 8, 2)
  one = jax.jit(f)
  np.testing.assert_allclose(mapped, jnp.stack([one(params, x) for x in xs]), rtol=1e-5,
                             atol=1e-5)


def test_remat_gives_same_loss_and_gradients():
  x = _volumes((2, 20, 24, 20, 1))

  def loss_and_grads(remat):
    model = _model3d(features=(2, 4), norm="batch", remat=remat)
    return nnx.jit(lambda m: nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m))(model)

  (loss, grads), (loss_r, grads_r) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r,
               grads)


def test_bfloat16_compute_and_dropout():
  make = functools.partial(_model3d, features=(2, 4), encoder_padding="same",
                           decoder_padding="same", dropout=0.5)
  fp32, bf16 = make(), make(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  x = _volumes((1, 8, 6, 4, 1))
  forward = nnx.jit(lambda m, x, rngs: m(x, rngs=rngs))
  a, b = forward(fp32, x, nnx.Rngs(dropout=1)), forward(fp32, x, nnx.Rngs(dropout=2))
  assert not np.allclose(a, b)  # dropout is on in training mode
  for model in (fp32, bf16):
    model.eval()
  y32, y16 = forward(fp32, x, nnx.Rngs(dropout=1)), forward(bf16, x, nnx.Rngs(dropout=1))
  np.testing.assert_array_equal(y32, forward(fp32, x, nnx.Rngs(dropout=2)))
  assert y16.dtype == jnp.float32 and not np.array_equal(y32, y16)
  np.testing.assert_allclose(y16, y32, atol=0.05 * float(jnp.abs(y32).max()))


def test_the_cpu_layer_leaves_3d_layers_stock():
  """``cpu.enable`` on a 3-D model: its formulations are 2-D, so the numbers stay stock."""
  make = lambda: _model3d(features=(2, 4), norm="batch")
  stock_net, cpu_net = make(), cpu.enable(make())
  convs = _modules(cpu_net, unet.DoubleConv)
  assert all(c.conv1.conv_general_dilated is jax.lax.conv_general_dilated for c in convs)
  x = _volumes((2, 20, 20, 24, 1))
  results = []
  for net in (stock_net, cpu_net):
    f, params = _train_mode_fn(net)
    loss = lambda params: jnp.mean(jnp.sin(3 * f(params, x)))
    results.append(jax.jit(lambda p: (f(p, x), jax.grad(loss)(p)))(params))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Parity with PyTorch's 3-D layers.


def _torch_double_conv(cin, mid, cout, padding, bias):
  return torch.nn.Sequential(
      torch.nn.Conv3d(cin, mid, 3, padding=padding, bias=bias), torch.nn.BatchNorm3d(mid),
      torch.nn.ReLU(), torch.nn.Conv3d(mid, cout, 3, padding=padding, bias=bias),
      torch.nn.BatchNorm3d(cout), torch.nn.ReLU())


class _TorchUNet3d(torch.nn.Module):
  """A 3-D U-Net of ``Conv3d``, ``BatchNorm3d``, ``MaxPool3d`` and ``ConvTranspose3d`` (or
  trilinear ``align_corners=True`` up-sampling), concatenating ``[skip, up]``."""

  def __init__(self, net: UNet, *, padding: int, bias: bool, transpose: bool, crop: bool):
    super().__init__()
    blocks = [net.inc] + [d.conv for d in net.downs] + [u.conv for u in net.ups]
    convs = [_torch_double_conv(b.conv1.in_features, b.conv1.out_features,
                                b.conv2.out_features, padding, bias) for b in blocks]
    self.encoder = torch.nn.ModuleList(convs[:len(net.downs) + 1])
    self.decoder = torch.nn.ModuleList(convs[len(net.downs) + 1:])
    self.ups = torch.nn.ModuleList(
        [torch.nn.ConvTranspose3d(u.up.in_features, u.up.out_features, 2, stride=2,
                                  bias=u.up.bias is not None) for u in net.ups]
        if transpose else [])
    self.pool, self.crop = torch.nn.MaxPool3d(2), crop
    self.head = torch.nn.Conv3d(net.head.in_features, net.head.out_features, 1)
    self._copy_from(net, blocks)

  @torch.no_grad()
  def _copy_from(self, net, blocks):
    tensor = lambda a: torch.from_numpy(np.array(a))
    for block, seq in zip(blocks, list(self.encoder) + list(self.decoder), strict=True):
      for conv, norm, t_conv, t_norm in ((block.conv1, block.norm1, seq[0], seq[1]),
                                         (block.conv2, block.norm2, seq[3], seq[4])):
        t_conv.weight.copy_(tensor(conv.kernel[...].transpose(4, 3, 0, 1, 2)))
        if conv.bias is not None:
          t_conv.bias.copy_(tensor(conv.bias[...]))
        for ours, theirs in ((norm.scale, t_norm.weight), (norm.bias, t_norm.bias),
                             (norm.mean, t_norm.running_mean), (norm.var, t_norm.running_var)):
          theirs.copy_(tensor(ours[...]))
    for up, t_up in zip(net.ups, self.ups):
      # ConvTranspose3d keeps (in, out, kD, kH, kW), flipped against lax.conv_transpose.
      t_up.weight.copy_(tensor(up.up.kernel[...][::-1, ::-1, ::-1].transpose(3, 4, 0, 1, 2)))
      if up.up.bias is not None:
        t_up.bias.copy_(tensor(up.up.bias[...]))
    self.head.weight.copy_(tensor(net.head.kernel[...].transpose(4, 3, 0, 1, 2)))
    self.head.bias.copy_(tensor(net.head.bias[...]))

  def forward(self, x):
    skips = []
    for k, block in enumerate(self.encoder):
      if k:
        skips.append(x)
        x = self.pool(x)
      x = block(x)
    for k, block in enumerate(self.decoder):
      skip = skips.pop()
      x = (self.ups[k](x) if len(self.ups) else
           F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True))
      if self.crop:
        starts = [(s - u) // 2 for s, u in zip(skip.shape[2:], x.shape[2:])]
        skip = skip[:, :, starts[0]:starts[0] + x.shape[2], starts[1]:starts[1] + x.shape[3],
                    starts[2]:starts[2] + x.shape[4]]
      else:
        pads = []
        for s, u in reversed(list(zip(skip.shape[2:], x.shape[2:]))):
          pads += [(s - u) // 2, s - u - (s - u) // 2]
        x = F.pad(x, pads)
      x = block(torch.cat([skip, x], dim=1))
    return self.head(x)


@pytest.mark.parametrize("kwargs, size", [
    (dict(CICEK, norm="batch"), (44, 52, 60)),
    (dict(norm="batch", use_bias=False, encoder_padding="same", decoder_padding="same",
          skip_fit="pad", upsample="bilinear"), (9, 6, 11)),
], ids=["cicek", "pad-trilinear"])
def test_eval_logits_match_pytorch_3d_layers(kwargs, size):
  net = _model3d(2, 3, features=(4, 8, 16), **kwargs)
  rng = np.random.default_rng(1)
  for norm in _modules(net, BatchNorm):  # statistics that are not the identity
    n = norm.mean.shape[0]
    norm.mean[...] = jnp.asarray(rng.normal(0, 0.5, n), jnp.float32)
    norm.var[...] = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32)
    norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)
  net.eval()
  reference = _TorchUNet3d(net, padding=1 if kwargs.get("encoder_padding") == "same" else 0,
                           bias=kwargs.get("use_bias", True),
                           transpose=kwargs.get("upsample") != "bilinear",
                           crop=kwargs.get("skip_fit") != "pad").eval()
  x = _volumes((2, *size, 2))
  y = net(x)
  with torch.no_grad():
    y_torch = reference(torch.from_numpy(np.array(x)).permute(0, 4, 1, 2, 3))
  assert y.shape == (2, *net.output_shape(*size), 3)
  np.testing.assert_allclose(y, y_torch.permute(0, 2, 3, 4, 1).numpy(), rtol=1e-4, atol=1e-4)
