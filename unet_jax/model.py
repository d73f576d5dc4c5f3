"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) as Flax NNX modules, NHWC (NDHWC in 3-D).

Read ``UNet.__call__`` beside Figure 1 of the paper: a contracting path that keeps its skips,
the bottleneck, an expanding path that pops them (up-sample, crop-and-concat, two 3×3
convolutions), and a 1×1 head. The same blocks build the 3-D U-Net of Çiçek et al. (MICCAI
2016) with ``spatial_dims=3``: 3×3×3 convolutions, 2×2×2 pooling and up-convolutions, volumes
``[N, D, H, W, C]``. Four presets are ``functools.partial``s of ``UNet``:

* ``paper``: every convolution unpadded, no normalisation, dropout at the end of the
  contracting path: 572×572 → 388×388, 23 convolution layers.
* ``walkthrough``: the widely read PyTorch walkthrough's model: unpadded encoder, padded
  decoder, BatchNorm: 572×572 → 448×448, 31,042,434 parameters (1 channel in, 2 classes).
* ``milesial``: milesial/Pytorch-UNet: padded convolutions without bias, BatchNorm, and either
  transposed or (``upsample="bilinear"``) bilinear up-sampling with halved decoder widths.
* ``cicek3d``: Çiçek et al.'s 3-D U-Net: unpadded 3×3×3 convolutions with BatchNorm, channels
  doubled inside each level before pooling, up-convolutions that keep the width and have no
  bias: 132×132×116 → 44×44×28, 19,069,955 parameters besides BatchNorm's (3 channels in, 3
  classes).

Every layer computes with stock JAX operations (``unet_jax.ops.STOCK``), so a model runs the
same on any backend, exports with ``jax.export``, and supports ``jvp``, ``vmap`` and gradients
of gradients. ``use_ops`` switches a model to another formulation of the same operations (the
CPU layer, ``unet_jax.cpu``) without touching its parameters; such formulations are 2-D, and
3-D layers keep the stock operations (``unet_jax.ops.formulation``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax import heads
from unet_jax import ops as ops_lib
from unet_jax.geometry import Geometry, Padding, SkipFit, center_crop, pad_offsets

Upsample = Literal["transpose", "bilinear"]
ConcatOrder = Literal["skip_up", "up_skip"]
UpconvWidth = Literal["skip", "keep"]

# The paper: "drawing the initial weights from a Gaussian distribution with a standard
# deviation of sqrt(2/N), where N denotes the number of incoming nodes of one neuron".
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


class BatchNorm(nnx.Module):
  """Batch normalisation over ``N, H, W`` (``N, D, H, W`` for volumes: every axis but the
  channels) with PyTorch's running-statistics semantics.

  Flax's own ``nnx.BatchNorm`` keeps the biased variance as its running estimate; PyTorch
  keeps the unbiased one. This module keeps PyTorch's, so converted checkpoints train on
  identically, and reduces the batch statistics over ``axis_name`` (synchronised BatchNorm)
  when it is set and the module runs inside a mapped function.

  ``momentum`` follows Flax: ``running = momentum * running + (1 - momentum) * batch``
  (PyTorch's ``momentum=0.1`` is ``0.9`` here).
  """

  def __init__(self, features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
               axis_name: str | None = None, dtype=None, param_dtype=jnp.float32,
               ops: ops_lib.Ops = ops_lib.STOCK):
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.momentum, self.epsilon, self.axis_name = momentum, epsilon, axis_name
    self.dtype, self.ops = dtype, ops
    self.use_running_average = False

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.use_running_average:
      x32 = x.astype(jnp.float32)
      y = (x32 - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.epsilon)
      y = y * self.scale[...] + self.bias[...]
      return y.astype(self.dtype or x.dtype)
    train = ops_lib.formulation(self.ops, x.ndim - 2).batch_norm_train
    y, mean, var = train(x, self.scale[...], self.bias[...], epsilon=self.epsilon,
                         axis_name=self.axis_name)
    count = math.prod(x.shape[:-1])
    if self.axis_name is not None:
      count = count * jax.lax.psum(1, self.axis_name)
    unbiased = var * count / max(count - 1, 1) if isinstance(count, int) else (
        var * count / jnp.maximum(count - 1, 1))
    m = self.momentum
    self.mean[...] = m * self.mean[...] + (1 - m) * mean
    self.var[...] = m * self.var[...] + (1 - m) * unbiased
    return y.astype(self.dtype or x.dtype)


class DoubleConv(nnx.Module):
  """(3×3 convolution → [BatchNorm] → ReLU) × 2; 3×3×3 convolutions if ``spatial_dims=3``."""

  def __init__(self, in_channels: int, out_channels: int, *, mid_channels: int | None = None,
               padding: Padding = "valid", norm: str | None = "batch", use_bias: bool = True,
               norm_axis_name: str | None = None, dtype=None, param_dtype=jnp.float32,
               ops: ops_lib.Ops = ops_lib.STOCK, spatial_dims: int = 2, rngs: nnx.Rngs):
    mid_channels = mid_channels or out_channels
    conv = functools.partial(
        nnx.Conv, kernel_size=(3,) * spatial_dims, padding=padding.upper(), use_bias=use_bias,
        kernel_init=he_normal, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        conv_general_dilated=ops_lib.formulation(ops, spatial_dims).conv_general_dilated)
    batch_norm = functools.partial(BatchNorm, axis_name=norm_axis_name, dtype=dtype,
                                   param_dtype=param_dtype, ops=ops)
    self.conv1 = conv(in_channels, mid_channels)
    self.norm1 = batch_norm(mid_channels) if norm == "batch" else None
    self.conv2 = conv(mid_channels, out_channels)
    self.norm2 = batch_norm(out_channels) if norm == "batch" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv, norm in ((self.conv1, self.norm1), (self.conv2, self.norm2)):
      x = conv(x)
      x = nnx.relu(norm(x) if norm is not None else x)
    return x


class Down(nnx.Module):
  """One level of the contracting path: 2×2 (2×2×2) max-pool, then ``DoubleConv``.

  An odd last row or column (or slice) is dropped before pooling (``floor``, as PyTorch's
  ``max_pool2d``); models that crop their skips only ever see even sizes here
  (``unet_jax.geometry``).
  """

  def __init__(self, in_channels: int, out_channels: int, *, remat: bool = False, **kwargs):
    self.conv = DoubleConv(in_channels, out_channels, **kwargs)
    self.remat, self.ops = remat, kwargs.get("ops", ops_lib.STOCK)

  def forward(self, x: jax.Array) -> jax.Array:
    sizes = x.shape[1:-1]
    if all(isinstance(n, int) for n in sizes) and any(n % 2 for n in sizes):
      x = x[(slice(None), *(slice(n - n % 2) for n in sizes))]
    return self.conv(ops_lib.formulation(self.ops, x.ndim - 2).max_pool_2x2(x))

  def __call__(self, x: jax.Array) -> jax.Array:
    forward = type(self).forward
    return nnx.remat(forward)(self, x) if self.remat else forward(self, x)


def upsample_bilinear(x: jax.Array, scale: int = 2) -> jax.Array:
  """Bilinear up-sampling of ``[N, H, W, C]`` with ``align_corners=True`` semantics;
  trilinear for volumes ``[N, D, H, W, C]``.

  PyTorch's ``nn.Upsample(mode="bilinear", align_corners=True)`` maps output pixel ``i`` to
  input coordinate ``i * (n_in - 1) / (n_out - 1)``; ``jax.image.resize`` uses half-pixel
  centres instead, so milesial checkpoints need this. Written as one small interpolation
  matrix per spatial axis (linear interpolation is separable), which XLA turns into fast dots.
  """
  def matrix(n_in: int) -> np.ndarray:
    n_out = n_in * scale
    weights = np.zeros((n_out, n_in), np.float32)
    if n_in == 1:
      weights[:, 0] = 1.0
      return weights
    # In float32, as PyTorch computes the scale and the source coordinates: on a 959-pixel
    # axis, float64 coordinates would shift the weights by up to 3e-5.
    step = np.float32(n_in - 1) / np.float32(n_out - 1)
    position = (step * np.arange(n_out, dtype=np.float32)).astype(np.float32)
    low = np.clip(np.floor(position).astype(int), 0, n_in - 2)
    frac = (position - low.astype(np.float32)).astype(np.float32)
    weights[np.arange(n_out), low] += 1 - frac
    weights[np.arange(n_out), low + 1] += frac
    return weights

  axes = range(1, x.ndim - 1)
  if not all(isinstance(x.shape[axis], int) for axis in axes):  # symbolic sizes (jax.export)
    for axis in axes:
      x = _interpolate(x, axis, scale)
    return x
  names = "nabc"[:x.ndim - 1] + "z"  # batch, spatial axes, channels
  for axis in axes:
    weights = jnp.asarray(matrix(x.shape[axis]), x.dtype)
    out = names[:axis] + "o" + names[axis + 1:]
    x = jnp.einsum(f"o{names[axis]},{names}->{out}", weights, x,
                   precision=jax.lax.Precision.HIGHEST)
  return x


def _interpolate(x: jax.Array, axis: int, scale: int) -> jax.Array:
  """``align_corners=True`` linear interpolation along ``axis`` by gathering the two
  neighbours: the form that works for symbolic sizes, where the matrices cannot be built."""
  n_in = jnp.asarray(x.shape[axis], jnp.int32)
  n_out = x.shape[axis] * scale
  position = (jnp.arange(n_out, dtype=jnp.float32) * (n_in - 1).astype(jnp.float32)
              / jnp.maximum(n_in * scale - 1, 1).astype(jnp.float32))
  low = jnp.maximum(jnp.minimum(jnp.floor(position).astype(jnp.int32), n_in - 2), 0)
  high = jnp.minimum(low + 1, n_in - 1)
  frac = (position - low.astype(jnp.float32)).astype(x.dtype)
  shape = [1] * x.ndim
  shape[axis] = -1
  frac = frac.reshape(shape)
  return jnp.take(x, low, axis=axis) * (1 - frac) + jnp.take(x, high, axis=axis) * frac


class UpConv(nnx.ConvTranspose):
  """The 2×2, stride-2 up-convolution: ``nnx.ConvTranspose``'s parameters and values.

  Only the computation differs: one matrix product and a reshape (``ops.up_conv_2x2``),
  whose gradient XLA's CPU backend compiles far better than that of ``lax.conv_transpose``.
  Other shapes, the 2×2×2 up-convolution of volumes among them, compute as
  ``nnx.ConvTranspose`` does.
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if (tuple(self.kernel_size) != (2, 2) or tuple(self.strides or ()) != (2, 2)
        or self.padding != "VALID" or self.kernel_dilation not in (None, 1, (1, 1))
        or self.mask is not None or inputs.ndim != 4):
      return super().__call__(inputs)
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    y = ops_lib.up_conv_2x2(inputs, kernel, precision=self.precision)
    return y if bias is None else y + bias


class Up(nnx.Module):
  """One level of the expanding path: up-sample, crop-and-concat the skip, ``DoubleConv``.

  ``"transpose"`` up-samples with a 2×2 (2×2×2) up-convolution, by default to the skip's
  width (Ronneberger et al. halve the channels; Çiçek et al. keep them: ``upconv_channels``);
  ``"bilinear"`` keeps the width, and the ``DoubleConv`` halves it in its first convolution,
  as milesial/Pytorch-UNet does.
  """

  def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *,
               upsample: Upsample = "transpose", upconv_channels: int | None = None,
               upconv_bias: bool = True, concat_order: ConcatOrder = "skip_up",
               skip_fit: SkipFit = "crop", remat: bool = False, spatial_dims: int = 2,
               rngs: nnx.Rngs, **kwargs):
    kwargs.update(spatial_dims=spatial_dims, rngs=rngs)
    if upsample == "transpose":
      up_channels, window = upconv_channels or skip_channels, (2,) * spatial_dims
      self.up = UpConv(in_channels, up_channels, window, strides=window, padding="VALID",
                       use_bias=upconv_bias, kernel_init=he_normal, dtype=kwargs.get("dtype"),
                       param_dtype=kwargs.get("param_dtype", jnp.float32), rngs=rngs)
      self.conv = DoubleConv(skip_channels + up_channels, out_channels, **kwargs)
    else:
      self.up = None
      concat = in_channels + skip_channels
      self.conv = DoubleConv(concat, out_channels, mid_channels=concat // 2, **kwargs)
    self.concat_order, self.skip_fit, self.remat = concat_order, skip_fit, remat

  def forward(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    x = self.up(x) if self.up is not None else upsample_bilinear(x)
    if self.skip_fit == "pad":
      x = pad_and_concat(x, skip, order=self.concat_order)
    else:
      x = crop_and_concat(x, skip, order=self.concat_order)
    return self.conv(x)

  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    forward = type(self).forward
    return nnx.remat(forward)(self, x, skip) if self.remat else forward(self, x, skip)


def crop_and_concat(up: jax.Array, skip: jax.Array, *, order: ConcatOrder = "skip_up"):
  """Center-crop ``skip`` to ``up``'s height and width (and depth), then concatenate on
  channels.

  Every spatial axis is cropped on its own and an odd size difference is allowed (the extra
  pixel is taken from the bottom/right/back), so non-square maps work.
  """
  skip = center_crop(skip, *up.shape[1:-1])
  parts = (skip, up) if order == "skip_up" else (up, skip)
  return jnp.concatenate(parts, axis=-1)


def pad_and_concat(up: jax.Array, skip: jax.Array, *, order: ConcatOrder = "skip_up"):
  """Zero-pad ``up`` to ``skip``'s height and width (and depth), then concatenate on channels.

  The split of an odd difference is milesial/Pytorch-UNet's (``F.pad(x1, [dx // 2, dx - dx //
  2, dy // 2, dy - dy // 2])``), on every spatial axis: the extra row or column goes after.
  """
  pads = [pad_offsets(u, s) for u, s in zip(up.shape[1:-1], skip.shape[1:-1], strict=True)]
  if any(before or after for before, after in pads):
    up = jnp.pad(up, ((0, 0), *pads, (0, 0)))
  parts = (skip, up) if order == "skip_up" else (up, skip)
  return jnp.concatenate(parts, axis=-1)


class UNet(nnx.Module):
  """U-Net for ``[N, H, W, in_channels]`` images → ``[N, H', W', num_classes]`` logits, or
  (``spatial_dims=3``) for ``[N, D, H, W, in_channels]`` volumes → ``[N, D', H', W',
  num_classes]``.

  Args:
    in_channels: channels of the input image.
    num_classes: channels of the output logits.
    features: widths of the levels, top to bottom (``len(features) - 1`` max-pools).
    spatial_dims: ``2`` (images; the default) or ``3`` (volumes: 3×3×3 convolutions, 2×2×2
      max-pooling and up-sampling, a 1×1×1 head; Çiçek et al. 2016). Every other option
      means the same in 3-D, per axis.
    encoder_padding, decoder_padding: ``"valid"`` (unpadded, the paper) or ``"same"``.
    upsample: ``"transpose"`` (2×2 up-convolution) or ``"bilinear"`` (milesial's variant,
      which halves the decoder widths; trilinear in 3-D).
    upconv_width: the up-convolutions' output width: ``"skip"`` (the skip's width, halving
      the channels as Ronneberger et al. do) or ``"keep"`` (their input's width, as Çiçek
      et al.'s 512 → 512 before concatenating the 256-channel skip). Only for
      ``upsample="transpose"``.
    upconv_bias: bias in the up-convolutions (Çiçek et al.'s parameter count has none). Only
      for ``upsample="transpose"``.
    halve_encoder_mid: the first convolution of each contracting level (the bottom one
      included) gives half the level's width, so the channels double inside the level,
      before pooling (Çiçek et al.: 3 → 32 → 64, 64 → 64 → 128, ..., 256 → 256 → 512).
      ``False`` (the default): both convolutions give the level's width.
    norm: ``"batch"`` or ``None``.
    use_bias: bias in the 3×3 convolutions.
    dropout: dropout rate at the end of the contracting path (``0`` disables it).
    concat_order: ``"skip_up"`` (the paper, milesial) or ``"up_skip"`` (the walkthrough).
    skip_fit: how the decoder joins an up-sampled map and a larger skip: ``"crop"`` the skip
      (the paper; sizes must pool evenly) or ``"pad"`` the up-sampled map (milesial; pooling
      floors odd sizes, so a padded model takes any size ≥ ``2**depth``).
    activation: how logits become probabilities: ``"softmax"`` over the classes, or
      ``"sigmoid"`` per channel (one channel: a binary model; several: multi-label).
      ``None`` (the default) means ``"sigmoid"`` for one class and ``"softmax"`` otherwise.
      It changes no parameter and not the logits: predict, evaluate, the losses and the
      metrics read it (``unet_jax.heads``).
    remat: recompute each level's activations in the backward pass (saves memory).
    norm_axis_name: mapped axis over which BatchNorm statistics are reduced in training.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); ``param_dtype``: parameter dtype.
    ops: the formulation of the heavy operations (``unet_jax.ops.STOCK``, the default, or
      ``unet_jax.cpu.OPS``); it changes speed and supported transformations, not values or
      parameters.
    rngs: ``nnx.Rngs`` for initialisation.
  """

  def __init__(self, in_channels: int = 1, num_classes: int = 2, *,
               features: Sequence[int] = (64, 128, 256, 512, 1024), spatial_dims: int = 2,
               encoder_padding: Padding = "valid", decoder_padding: Padding = "valid",
               upsample: Upsample = "transpose", upconv_width: UpconvWidth = "skip",
               upconv_bias: bool = True, halve_encoder_mid: bool = False,
               norm: str | None = None, use_bias: bool = True, dropout: float = 0.0,
               concat_order: ConcatOrder = "skip_up", skip_fit: SkipFit = "crop",
               activation: heads.Activation | None = None, remat: bool = False,
               norm_axis_name: str | None = None, dtype=None, param_dtype=jnp.float32,
               ops: ops_lib.Ops = ops_lib.STOCK, rngs: nnx.Rngs):
    _check_options(in_channels, num_classes, features, upsample, norm, dropout, concat_order)
    halve = 2 if upsample == "bilinear" else 1
    widths = list(features[:-1]) + [features[-1] // halve]
    _check_dims_and_widths(spatial_dims, upsample, upconv_width, upconv_bias,
                           halve_encoder_mid, widths)
    self.in_channels, self.num_classes, self.remat = in_channels, num_classes, remat
    self.spatial_dims = spatial_dims
    self.activation = heads.resolve(activation, num_classes)
    self.features = tuple(features)
    self.geometry = Geometry(len(features) - 1, encoder_padding, decoder_padding, skip_fit)
    common = dict(norm=norm, use_bias=use_bias, norm_axis_name=norm_axis_name, dtype=dtype,
                  param_dtype=param_dtype, ops=ops, spatial_dims=spatial_dims, rngs=rngs)
    mid = [w // 2 if halve_encoder_mid else w for w in widths]
    self.inc = DoubleConv(in_channels, widths[0], mid_channels=mid[0], padding=encoder_padding,
                          **common)
    self.downs = nnx.List([Down(widths[k - 1], widths[k], mid_channels=mid[k],
                                padding=encoder_padding, remat=remat, **common)
                           for k in range(1, len(widths))])
    self.dropout = nnx.Dropout(dropout) if dropout else None
    ups, channels = [], widths[-1]
    for k in reversed(range(len(features) - 1)):
      out = features[k] if upsample == "transpose" or k == 0 else features[k - 1]
      ups.append(Up(channels, features[k], out, upsample=upsample,
                    upconv_channels=channels if upconv_width == "keep" else features[k],
                    upconv_bias=upconv_bias, concat_order=concat_order, skip_fit=skip_fit,
                    padding=decoder_padding, remat=remat, **common))
      channels = out
    self.ups = nnx.List(ups)
    self.head = nnx.Conv(features[0], num_classes, (1,) * spatial_dims, kernel_init=he_normal,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits ``[N, H', W', num_classes]`` (float32) for images ``[N, H, W, in_channels]``;
    ``[N, D', H', W', num_classes]`` for volumes ``[N, D, H, W, in_channels]`` in 3-D.

    ``rngs`` supplies the ``dropout`` stream in training mode when ``dropout > 0``.
    """
    self.check_input(x.shape)
    if self.dropout is not None and not self.dropout.deterministic and rngs is None:
      raise ValueError("this U-Net has dropout and is in training mode: pass "
                       "rngs=nnx.Rngs(dropout=key), or call model.eval() for inference")
    x = nnx.remat(DoubleConv.__call__)(self.inc, x) if self.remat else self.inc(x)
    skips = []
    for down in self.downs:
      skips.append(x)
      x = down(x)
    if self.dropout is not None:
      x = self.dropout(x, rngs=rngs)
    for up in self.ups:
      x = up(x, skips.pop())
    return self.head(x).astype(jnp.float32)

  def check_input(self, shape: Sequence[int]) -> tuple[int, ...] | None:
    """Raise a clear ``ValueError`` unless ``shape`` is a valid ``[N, H, W, C]`` input
    (``[N, D, H, W, C]`` in 3-D); returns the output's spatial sizes."""
    axes = "N, D, H, W" if self.spatial_dims == 3 else "N, H, W"
    if len(shape) != self.spatial_dims + 2:
      kind = "volumes" if self.spatial_dims == 3 else "images"
      hint = (f"add a batch axis with x[None] for a single {kind[:-1]}"
              if len(shape) == self.spatial_dims + 1 else
              f"this U-Net has spatial_dims={self.spatial_dims}")
      raise ValueError(f"expected {kind} of shape [{axes}, {self.in_channels}], got shape "
                       f"{tuple(shape)}; {hint}")
    if shape[-1] != self.in_channels:
      raise ValueError(f"this U-Net takes {self.in_channels} input channel(s), got an input "
                       f"of shape {tuple(shape)} with {shape[-1]}; "
                       f"{axes.replace(', ', '')}C layout is expected")
    if not all(isinstance(size, (int, np.integer)) for size in shape[1:-1]):
      return None  # symbolic sizes (jax.export): their constraints are the exporter's to state
    return self.geometry.check_shape(*shape[1:-1])

  def output_shape(self, *sizes: int) -> tuple[int, ...]:
    """Output ``(H', W')`` for an ``H×W`` input (``(D', H', W')`` for ``D×H×W`` in 3-D);
    raises ``ValueError`` if it is not valid."""
    if len(sizes) != self.spatial_dims:
      names = "depth, height, width" if self.spatial_dims == 3 else "height, width"
      raise ValueError(f"this U-Net has spatial_dims={self.spatial_dims}: give the input's "
                       f"({names}), got {len(sizes)} size(s) {tuple(sizes)}")
    return self.geometry.check_shape(*sizes)


def _check_options(in_channels, num_classes, features, upsample, norm, dropout, concat_order):
  if in_channels < 1 or num_classes < 1:
    raise ValueError(f"in_channels and num_classes must be ≥ 1, got {in_channels} and "
                     f"{num_classes}")
  if len(features) < 2 or any(f < 1 for f in features):
    raise ValueError(f"features must list ≥ 2 positive widths (top level first), got "
                     f"{tuple(features)}")
  if upsample not in ("transpose", "bilinear"):
    raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {upsample!r}")
  if upsample == "bilinear" and any(f % 2 for f in features[1:]):
    raise ValueError(f"bilinear up-sampling halves the widths, so features below the top "
                     f"level must be even; got {tuple(features)}")
  if norm not in ("batch", None):
    raise ValueError(f"norm must be 'batch' or None, got {norm!r}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout}")
  if concat_order not in ("skip_up", "up_skip"):
    raise ValueError(f"concat_order must be 'skip_up' or 'up_skip', got {concat_order!r}")


def _check_dims_and_widths(spatial_dims, upsample, upconv_width, upconv_bias,
                           halve_encoder_mid, widths):
  if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
    raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
  if upconv_width not in ("skip", "keep"):
    raise ValueError(f"upconv_width must be 'skip' or 'keep', got {upconv_width!r}")
  if upsample == "bilinear" and (upconv_width != "skip" or not upconv_bias):
    raise ValueError(f"upconv_width={upconv_width!r} and upconv_bias={upconv_bias!r} describe "
                     f"the up-convolutions of upsample='transpose'; bilinear up-sampling has "
                     f"none: leave them at 'skip' and True")
  if halve_encoder_mid and any(w % 2 for w in widths):
    raise ValueError(f"halve_encoder_mid halves each contracting level's width in its first "
                     f"convolution, so the widths must be even; got {widths}")


paper = functools.partial(UNet, encoder_padding="valid", decoder_padding="valid", norm=None,
                          use_bias=True, dropout=0.5, concat_order="skip_up")
walkthrough = functools.partial(UNet, encoder_padding="valid", decoder_padding="same",
                                norm="batch", use_bias=True, concat_order="up_skip")
milesial = functools.partial(UNet, encoder_padding="same", decoder_padding="same",
                             norm="batch", use_bias=False, concat_order="skip_up",
                             skip_fit="pad")
cicek3d = functools.partial(UNet, spatial_dims=3, features=(64, 128, 256, 512),
                            encoder_padding="valid", decoder_padding="valid", norm="batch",
                            use_bias=True, halve_encoder_mid=True, upconv_width="keep",
                            upconv_bias=False, concat_order="skip_up", skip_fit="crop")

PRESETS = {"paper": paper, "walkthrough": walkthrough, "milesial": milesial,
           "cicek3d": cicek3d}


def config_of(model: UNet) -> dict:
  """The ``UNet`` keyword arguments that rebuild ``model``'s architecture, as JSON values
  (``UNet(**config_of(model), rngs=...)`` has the same parameter tree)."""
  first, up = model.inc.conv1, model.ups[0]
  config = {"in_channels": model.in_channels, "num_classes": model.num_classes,
            "features": list(model.features),
            "encoder_padding": model.geometry.encoder_padding,
            "decoder_padding": model.geometry.decoder_padding,
            "upsample": "transpose" if up.up is not None else "bilinear",
            "norm": "batch" if model.inc.norm1 is not None else None,
            "use_bias": bool(first.use_bias),
            "dropout": float(model.dropout.rate) if model.dropout is not None else 0.0,
            "concat_order": up.concat_order, "skip_fit": model.geometry.skip_fit,
            "activation": model.activation, "remat": bool(model.remat)}
  # Options added for volumes are recorded only when they differ from their defaults, so 2-D
  # configs read as before.
  if model.spatial_dims != 2:
    config["spatial_dims"] = model.spatial_dims
  if model.inc.conv1.out_features != model.inc.conv2.out_features:
    config["halve_encoder_mid"] = True
  if up.up is not None and up.up.out_features != model.features[-2]:
    config["upconv_width"] = "keep"
  if up.up is not None and up.up.bias is None:
    config["upconv_bias"] = False
  if first.dtype is not None:
    config["dtype"] = jnp.dtype(first.dtype).name
  if jnp.dtype(first.param_dtype) != jnp.float32:
    config["param_dtype"] = jnp.dtype(first.param_dtype).name
  return config


def use_ops(model: nnx.Module, ops: ops_lib.Ops) -> nnx.Module:
  """Switch ``model`` (a ``UNet`` or any of its blocks) to ``ops`` in place; returns it.

  Parameters and values stay the same: only the formulation of the 3×3 convolutions,
  max-pooling and training-mode BatchNorm changes. 3-D layers keep the stock operations
  (``unet_jax.ops.formulation``). Call it before splitting the model (``nnx.split``) or
  tracing it.
  """
  for _, module in nnx.iter_modules(model):
    if isinstance(module, DoubleConv):
      conv = ops_lib.formulation(ops, len(module.conv1.kernel_size)).conv_general_dilated
      module.conv1.conv_general_dilated = conv
      module.conv2.conv_general_dilated = conv
    if isinstance(module, (BatchNorm, Down)):
      module.ops = ops
  return model


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (``nnx.Param``), as PyTorch's ``parameters()`` counts."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
