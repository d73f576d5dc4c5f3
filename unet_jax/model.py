"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) as Flax NNX modules, NHWC.

Read ``UNet.__call__`` beside Figure 1 of the paper: a contracting path that keeps its skips,
the bottleneck, an expanding path that pops them (up-sample, crop-and-concat, two 3×3
convolutions), and a 1×1 head. Three presets are ``functools.partial``s of ``UNet``:

* ``paper``: every convolution unpadded, no normalisation, dropout at the end of the
  contracting path: 572×572 → 388×388, 23 convolution layers.
* ``walkthrough``: the widely read PyTorch walkthrough's model: unpadded encoder, padded
  decoder, BatchNorm: 572×572 → 448×448, 31,042,434 parameters (1 channel in, 2 classes).
* ``milesial``: milesial/Pytorch-UNet: padded convolutions without bias, BatchNorm, and either
  transposed or (``upsample="bilinear"``) bilinear up-sampling with halved decoder widths.

Every layer computes with stock JAX operations (``unet_jax.ops.STOCK``), so a model runs the
same on any backend, exports with ``jax.export``, and supports ``jvp``, ``vmap`` and gradients
of gradients. ``use_ops`` switches a model to another formulation of the same operations (the
CPU layer, ``unet_jax.cpu``) without touching its parameters.
"""

from __future__ import annotations

import functools
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

# The paper: "drawing the initial weights from a Gaussian distribution with a standard
# deviation of sqrt(2/N), where N denotes the number of incoming nodes of one neuron".
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


class BatchNorm(nnx.Module):
  """Batch normalisation over ``N, H, W`` with PyTorch's running-statistics semantics.

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
    y, mean, var = self.ops.batch_norm_train(x, self.scale[...], self.bias[...],
                                        epsilon=self.epsilon, axis_name=self.axis_name)
    count = x.shape[0] * x.shape[1] * x.shape[2]
    if self.axis_name is not None:
      count = count * jax.lax.psum(1, self.axis_name)
    unbiased = var * count / max(count - 1, 1) if isinstance(count, int) else (
        var * count / jnp.maximum(count - 1, 1))
    m = self.momentum
    self.mean[...] = m * self.mean[...] + (1 - m) * mean
    self.var[...] = m * self.var[...] + (1 - m) * unbiased
    return y.astype(self.dtype or x.dtype)


class DoubleConv(nnx.Module):
  """(3×3 convolution → [BatchNorm] → ReLU) × 2."""

  def __init__(self, in_channels: int, out_channels: int, *, mid_channels: int | None = None,
               padding: Padding = "valid", norm: str | None = "batch", use_bias: bool = True,
               norm_axis_name: str | None = None, dtype=None, param_dtype=jnp.float32,
               ops: ops_lib.Ops = ops_lib.STOCK, rngs: nnx.Rngs):
    mid_channels = mid_channels or out_channels
    conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding=padding.upper(),
                             use_bias=use_bias, kernel_init=he_normal, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs,
                             conv_general_dilated=ops.conv_general_dilated)
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
  """One level of the contracting path: 2×2 max-pool, then ``DoubleConv``.

  An odd last row or column is dropped before pooling (``floor``, as PyTorch's ``max_pool2d``);
  models that crop their skips only ever see even sizes here (``unet_jax.geometry``).
  """

  def __init__(self, in_channels: int, out_channels: int, *, remat: bool = False, **kwargs):
    self.conv = DoubleConv(in_channels, out_channels, **kwargs)
    self.remat, self.ops = remat, kwargs.get("ops", ops_lib.STOCK)

  def forward(self, x: jax.Array) -> jax.Array:
    height, width = x.shape[1], x.shape[2]
    if isinstance(height, int) and isinstance(width, int) and (height % 2 or width % 2):
      x = x[:, :height - height % 2, :width - width % 2]
    return self.conv(self.ops.max_pool_2x2(x))

  def __call__(self, x: jax.Array) -> jax.Array:
    forward = type(self).forward
    return nnx.remat(forward)(self, x) if self.remat else forward(self, x)


def upsample_bilinear(x: jax.Array, scale: int = 2) -> jax.Array:
  """Bilinear up-sampling of ``[N, H, W, C]`` with ``align_corners=True`` semantics.

  PyTorch's ``nn.Upsample(mode="bilinear", align_corners=True)`` maps output pixel ``i`` to
  input coordinate ``i * (n_in - 1) / (n_out - 1)``; ``jax.image.resize`` uses half-pixel
  centres instead, so milesial checkpoints need this. Written as two small interpolation
  matrices, which XLA turns into fast dots.
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

  if not all(isinstance(n, int) for n in x.shape[1:3]):  # symbolic sizes (jax.export)
    return _interpolate(_interpolate(x, 1, scale), 2, scale)
  rows = jnp.asarray(matrix(x.shape[1]), x.dtype)
  cols = jnp.asarray(matrix(x.shape[2]), x.dtype)
  x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,nowc->nopc", cols, x, precision=jax.lax.Precision.HIGHEST)


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

  ``"transpose"`` up-samples with a 2×2 up-convolution to the skip's width (the paper halves
  the channels); ``"bilinear"`` keeps the width, and the ``DoubleConv`` halves it in its first
  convolution, as milesial/Pytorch-UNet does.
  """

  def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *,
               upsample: Upsample = "transpose", concat_order: ConcatOrder = "skip_up",
               skip_fit: SkipFit = "crop", remat: bool = False, rngs: nnx.Rngs, **kwargs):
    if upsample == "transpose":
      self.up = UpConv(in_channels, skip_channels, (2, 2), strides=(2, 2), padding="VALID",
                       kernel_init=he_normal, dtype=kwargs.get("dtype"),
                       param_dtype=kwargs.get("param_dtype", jnp.float32), rngs=rngs)
      self.conv = DoubleConv(2 * skip_channels, out_channels, rngs=rngs, **kwargs)
    else:
      self.up = None
      concat = in_channels + skip_channels
      self.conv = DoubleConv(concat, out_channels, mid_channels=concat // 2, rngs=rngs, **kwargs)
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
  """Center-crop ``skip`` to ``up``'s height and width, then concatenate on channels.

  Height and width are cropped independently and an odd size difference is allowed (the
  extra pixel is taken from the bottom/right), so non-square maps work.
  """
  skip = center_crop(skip, up.shape[1], up.shape[2])
  parts = (skip, up) if order == "skip_up" else (up, skip)
  return jnp.concatenate(parts, axis=-1)


def pad_and_concat(up: jax.Array, skip: jax.Array, *, order: ConcatOrder = "skip_up"):
  """Zero-pad ``up`` to ``skip``'s height and width, then concatenate on channels.

  The split of an odd difference is milesial/Pytorch-UNet's (``F.pad(x1, [dx // 2, dx - dx //
  2, dy // 2, dy - dy // 2])``): the extra row or column goes after.
  """
  top, bottom = pad_offsets(up.shape[1], skip.shape[1])
  left, right = pad_offsets(up.shape[2], skip.shape[2])
  if top or bottom or left or right:
    up = jnp.pad(up, ((0, 0), (top, bottom), (left, right), (0, 0)))
  parts = (skip, up) if order == "skip_up" else (up, skip)
  return jnp.concatenate(parts, axis=-1)


class UNet(nnx.Module):
  """U-Net for ``[N, H, W, in_channels]`` images → ``[N, H', W', num_classes]`` logits.

  Args:
    in_channels: channels of the input image.
    num_classes: channels of the output logits.
    features: widths of the levels, top to bottom (``len(features) - 1`` max-pools).
    encoder_padding, decoder_padding: ``"valid"`` (unpadded, the paper) or ``"same"``.
    upsample: ``"transpose"`` (2×2 up-convolution) or ``"bilinear"`` (milesial's variant,
      which halves the decoder widths).
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
               features: Sequence[int] = (64, 128, 256, 512, 1024),
               encoder_padding: Padding = "valid", decoder_padding: Padding = "valid",
               upsample: Upsample = "transpose", norm: str | None = None,
               use_bias: bool = True, dropout: float = 0.0,
               concat_order: ConcatOrder = "skip_up", skip_fit: SkipFit = "crop",
               activation: heads.Activation | None = None, remat: bool = False,
               norm_axis_name: str | None = None, dtype=None, param_dtype=jnp.float32,
               ops: ops_lib.Ops = ops_lib.STOCK, rngs: nnx.Rngs):
    _check_options(in_channels, num_classes, features, upsample, norm, dropout, concat_order)
    self.in_channels, self.num_classes, self.remat = in_channels, num_classes, remat
    self.activation = heads.resolve(activation, num_classes)
    self.features = tuple(features)
    self.geometry = Geometry(len(features) - 1, encoder_padding, decoder_padding, skip_fit)
    common = dict(norm=norm, use_bias=use_bias, norm_axis_name=norm_axis_name, dtype=dtype,
                  param_dtype=param_dtype, ops=ops, rngs=rngs)
    halve = 2 if upsample == "bilinear" else 1
    widths = list(features[:-1]) + [features[-1] // halve]
    self.inc = DoubleConv(in_channels, widths[0], padding=encoder_padding, **common)
    self.downs = nnx.List([Down(widths[k - 1], widths[k], padding=encoder_padding,
                                remat=remat, **common) for k in range(1, len(widths))])
    self.dropout = nnx.Dropout(dropout) if dropout else None
    ups, channels = [], widths[-1]
    for k in reversed(range(len(features) - 1)):
      out = features[k] if upsample == "transpose" or k == 0 else features[k - 1]
      ups.append(Up(channels, features[k], out, upsample=upsample, concat_order=concat_order,
                    skip_fit=skip_fit, padding=decoder_padding, remat=remat, **common))
      channels = out
    self.ups = nnx.List(ups)
    self.head = nnx.Conv(features[0], num_classes, (1, 1), kernel_init=he_normal, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits ``[N, H', W', num_classes]`` (float32) for images ``[N, H, W, in_channels]``.

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

  def check_input(self, shape: Sequence[int]) -> tuple[int, int] | None:
    """Raise a clear ``ValueError`` unless ``shape`` is a valid ``[N, H, W, C]`` input."""
    if len(shape) != 4:
      raise ValueError(f"expected images of shape [N, H, W, {self.in_channels}], got shape "
                       f"{tuple(shape)}; add a batch axis with x[None] for a single image")
    if shape[-1] != self.in_channels:
      raise ValueError(f"this U-Net takes {self.in_channels} input channel(s), got an input "
                       f"of shape {tuple(shape)} with {shape[-1]}; NHWC layout is expected")
    if not all(isinstance(size, (int, np.integer)) for size in shape[1:3]):
      return None  # symbolic sizes (jax.export): their constraints are the exporter's to state
    return self.geometry.check_shape(shape[1], shape[2])

  def output_shape(self, height: int, width: int) -> tuple[int, int]:
    """Output ``(H', W')`` for an ``H×W`` input; raises ``ValueError`` if it is not valid."""
    return self.geometry.check_shape(height, width)


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


paper = functools.partial(UNet, encoder_padding="valid", decoder_padding="valid", norm=None,
                          use_bias=True, dropout=0.5, concat_order="skip_up")
walkthrough = functools.partial(UNet, encoder_padding="valid", decoder_padding="same",
                                norm="batch", use_bias=True, concat_order="up_skip")
milesial = functools.partial(UNet, encoder_padding="same", decoder_padding="same",
                             norm="batch", use_bias=False, concat_order="skip_up",
                             skip_fit="pad")

PRESETS = {"paper": paper, "walkthrough": walkthrough, "milesial": milesial}


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
  if first.dtype is not None:
    config["dtype"] = jnp.dtype(first.dtype).name
  if jnp.dtype(first.param_dtype) != jnp.float32:
    config["param_dtype"] = jnp.dtype(first.param_dtype).name
  return config


def use_ops(model: nnx.Module, ops: ops_lib.Ops) -> nnx.Module:
  """Switch ``model`` (a ``UNet`` or any of its blocks) to ``ops`` in place; returns it.

  Parameters and values stay the same: only the formulation of the 3×3 convolutions,
  max-pooling and training-mode BatchNorm changes. Call it before splitting the model
  (``nnx.split``) or tracing it.
  """
  for _, module in nnx.iter_modules(model):
    if isinstance(module, DoubleConv):
      module.conv1.conv_general_dilated = ops.conv_general_dilated
      module.conv2.conv_general_dilated = ops.conv_general_dilated
    if isinstance(module, (BatchNorm, Down)):
      module.ops = ops
  return model


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (``nnx.Param``), as PyTorch's ``parameters()`` counts."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
