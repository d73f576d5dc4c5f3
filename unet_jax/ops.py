"""The operations the U-Net's layers compute, and the one place where a backend may swap them.

``Ops`` names the three operations that dominate a U-Net's train step: the 3×3 convolution,
2×2 max-pooling and training-mode batch normalisation. ``STOCK``, the default of every model,
is plain JAX: ``lax.conv_general_dilated``, ``lax.reduce_window`` and the textbook
normalisation formula, differentiated by JAX itself. It runs the same on every backend,
exports with ``jax.export`` for any platform, and supports every transformation (``jvp``,
``vmap``, gradients of gradients). Its functions take any number of spatial axes
(``[N, *spatial, C]``), so 3-D models compute with them as well.

``unet_jax.cpu.OPS`` computes the same values faster on XLA's CPU backend, with custom
gradients and optional native kernels; a model uses it only when asked
(``unet_jax.cpu.enable(model)``, or ``UNet(..., ops=unet_jax.cpu.OPS)``).

Another ``Ops`` is a set of 2-D formulations (``[N, H, W, C]``): ``formulation`` hands a layer
with other than two spatial axes ``STOCK`` instead.

The 2×2 up-convolution needs no such choice: ``up_conv_2x2`` is one matrix product and a
reshape: exact, portable, and on the CPU far faster to differentiate than
``lax.conv_transpose`` (``docs/performance.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Ops:
  """A set of formulations of the network's heavy operations (all give the same values).

  Attributes:
    name: a short name, shown in reports.
    conv_general_dilated: a drop-in for ``jax.lax.conv_general_dilated`` (what ``nnx.Conv``
      calls).
    max_pool_2x2: ``[N, H, W, C] → [N, H // 2, W // 2, C]``, the gradient to the first
      maximum of each window (as PyTorch).
    batch_norm_train: ``(x, scale, bias, *, epsilon, axis_name) → (y, mean, var)`` as
      ``batch_norm_train`` below.

  Only ``STOCK``'s functions are required to take other than two spatial axes (see
  ``formulation``).
  """

  name: str
  conv_general_dilated: Callable
  max_pool_2x2: Callable
  batch_norm_train: Callable


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max-pooling with stride 2 of ``[N, H, W, C]``; an odd last row or column is dropped.

  Any number of spatial axes works (``[N, D, H, W, C]``: 2×2×2 windows), each halved with
  its odd last element dropped. JAX differentiates ``reduce_window``'s maximum to the first
  maximum of each window in row-major order, as PyTorch's ``max_pool2d``/``max_pool3d`` do.
  """
  # A Python scalar: JAX then recognises the maximum and differentiates it (a traced initial
  # value would make a generic reduction, which has no derivative).
  init = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else int(jnp.iinfo(x.dtype).min)
  window = (1, *(2,) * (x.ndim - 2), 1)
  return lax.reduce_window(x, init, lax.max, window, window, "VALID")


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float,
                     axis_name: str | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch normalisation of ``[N, H, W, C]`` over ``N, H, W`` (of
  ``[N, *spatial, C]`` over every axis but the channels).

  Returns ``(y, mean, var)``: ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` in
  float32, and the batch mean and biased variance for the running statistics (reduced over
  ``axis_name`` as well when it is given: synchronised BatchNorm). ``mean`` and ``var`` carry
  no gradient; ``y`` is differentiated through them.
  """
  x32 = x.astype(jnp.float32)
  mean, var = batch_statistics(x32, axis_name)
  y = (x32 - mean) * lax.rsqrt(var + epsilon) * scale + bias
  return y, lax.stop_gradient(mean), lax.stop_gradient(var)


def batch_statistics(x32: jax.Array, axis_name: str | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance of ``[N, H, W, C]`` over ``N, H, W`` (of ``[N, *spatial, C]``
  over every axis but the channels), and over ``axis_name`` when it is given."""
  axes = tuple(range(x32.ndim - 1))
  mean = x32.mean(axis=axes)
  if axis_name is not None:
    mean = lax.pmean(mean, axis_name)
  var = jnp.square(x32 - mean).mean(axis=axes)
  if axis_name is not None:
    var = lax.pmean(var, axis_name)
  return mean, var


STOCK = Ops("stock", conv_general_dilated=lax.conv_general_dilated, max_pool_2x2=max_pool_2x2,
            batch_norm_train=batch_norm_train)


def formulation(ops: Ops, spatial_dims: int) -> Ops:
  """The operations a layer with ``spatial_dims`` spatial axes computes with: ``ops`` for 2-D
  layers, ``STOCK`` otherwise (other formulations, such as the CPU layer's, are 2-D ones)."""
  return ops if spatial_dims == 2 else STOCK


def up_conv_2x2(x: jax.Array, kernel: jax.Array, *, precision=None) -> jax.Array:
  """The 2×2, stride-2, unpadded transposed convolution of ``[N, H, W, C]`` → ``[N, 2H, 2W, O]``.

  ``kernel`` is ``[2, 2, C, O]``, laid out as ``nnx.ConvTranspose`` keeps it, and the result
  equals ``lax.conv_transpose(x, kernel, (2, 2), "VALID")``: output pixel ``(2i + a, 2j + b)``
  is ``x[i, j] @ kernel[1 - a, 1 - b]``. The windows do not overlap, so nothing is summed.
  """
  n, h, w, _ = x.shape
  y = lax.dot_general(x, kernel, (((3,), (2,)), ((), ())), precision=precision)
  # y[..., a, b, :] holds kernel[a, b]'s contribution, which lands at offset (1 - a, 1 - b):
  # flip the two small axes here, where the result is copied anyway, not the kernel.
  return y[:, :, :, ::-1, ::-1].transpose(0, 1, 3, 2, 4, 5).reshape(
      n, 2 * h, 2 * w, kernel.shape[-1])
