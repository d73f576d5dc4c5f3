"""The U-Net's compute-heavy operations, written the way XLA compiles them well.

Each function here computes exactly what its textbook counterpart computes (the tests check
values and gradients against ``jax.lax``); only the formulation differs, where XLA's CPU
backend is slow on the plain one. ``docs/performance.md`` has the measurements behind each.

* ``conv_general_dilated``: a drop-in for ``jax.lax.conv_general_dilated`` (``nnx.Conv``
  takes it as an argument). Stride-1, undilated 2-D convolutions get a custom gradient whose
  input gradient is, on CPU and for layers with few pixels per output channel (the deep end of
  the U-Net), one matrix product followed by a scatter of its columns (col2im). XLA's own input
  gradient transposes and flips the whole kernel first, which on a 3×3×1024×1024 kernel costs
  more than the convolution. The kernel gradient of a padded convolution is taken as the
  unpadded one of the padded input (the same sums, up to twice as fast on CPU). Everything
  else, and every other backend, goes to ``lax``.
* ``up_conv_2x2``: the 2×2, stride-2 transposed convolution as one matrix product and a
  reshape. The windows do not overlap, so nothing is summed; XLA's ``conv_transpose`` gradient
  is a dilated convolution that the CPU backend runs 20–40 times slower.
* ``max_pool_2x2``: 2×2 max-pooling as a reshape and a max, which XLA fuses with its gradient,
  instead of ``reduce_window`` with a ``select_and_scatter`` gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# The dot-based input gradient pays for a ``rows × kh·kw·C_in`` intermediate; XLA's pays for
# a transposed, flipped copy of the kernel. Measured on CPU, the product wins while the rows
# (batch × output pixels) are at most about three times the output channels.
DOT_INPUT_GRAD_MAX_ROWS_PER_CHANNEL = 3

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
  """``jax.lax.conv_general_dilated`` with a faster gradient for stride-1 2-D convolutions.

  Takes the same arguments. Calls that are not a stride-1, undilated, ungrouped 2-D
  convolution in NHWC/HWIO layout, or that pass extra keyword
  arguments, go to ``lax`` unchanged.
  """
  call_lax = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  if (kwargs or lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1
      or batch_group_count != 1 or preferred_element_type is not None
      or tuple(window_strides) != (1, 1)
      or any(d not in (None, 1, (1, 1)) and tuple(d) != (1, 1)
             for d in (lhs_dilation, rhs_dilation))):
    return call_lax(**kwargs)
  if dimension_numbers is not None and (
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return call_lax()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, padding, precision)


def _lax_conv(x, kernel, padding, precision):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, padding, precision):
  return _lax_conv(x, kernel, padding, precision)


def _conv_fwd(x, kernel, padding, precision):
  return _lax_conv(x, kernel, padding, precision), (x, kernel)


def _conv_bwd(padding, precision, residuals, g):
  x, kernel = residuals
  # The kernel gradient of a padded convolution is the unpadded one of the padded input:
  # the same sums, which XLA's CPU backend computes up to twice as fast.
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0))) if any(map(any, padding)) else x
  valid = ((0, 0), (0, 0))
  kernel_grad = jax.vjp(lambda k: _lax_conv(padded, k, valid, precision), kernel)[1](g)[0]
  xla_input_grad = lambda x, kernel, g: jax.vjp(
      lambda x: _lax_conv(x, kernel, padding, precision), x)[1](g)[0]
  rows = g.shape[0] * g.shape[1] * g.shape[2]
  if rows > DOT_INPUT_GRAD_MAX_ROWS_PER_CHANNEL * g.shape[3]:
    return xla_input_grad(x, kernel, g), kernel_grad
  input_grad = lax.platform_dependent(
      x, kernel, g, cpu=functools.partial(_input_grad_dot, padding=padding, precision=precision),
      default=xla_input_grad)
  return input_grad, kernel_grad


_conv.defvjp(_conv_fwd, _conv_bwd)


def _input_grad_dot(x, kernel, g, *, padding, precision):
  """Input gradient of a stride-1 NHWC/HWIO convolution: one product, then col2im."""
  n, ho, wo, o = g.shape
  kh, kw, c, _ = kernel.shape
  columns = lax.dot_general(g.reshape(-1, o), kernel.reshape(-1, o), (((1,), (1,)), ((), ())),
                            precision=precision).reshape(n, ho, wo, kh, kw, c)
  padded = sum(jnp.pad(columns[:, :, :, a, b], ((0, 0), (a, kh - 1 - a), (b, kw - 1 - b), (0, 0)))
               for a in range(kh) for b in range(kw))
  (top, _), (left, _) = padding
  return lax.dynamic_slice(padded, (0, top, left, 0), x.shape).astype(x.dtype)


def up_conv_2x2(x: jax.Array, kernel: jax.Array, *, precision=None) -> jax.Array:
  """The 2×2, stride-2, unpadded transposed convolution of ``[N, H, W, C]`` → ``[N, 2H, 2W, O]``.

  ``kernel`` is ``[2, 2, C, O]``, laid out as ``nnx.ConvTranspose`` keeps it, and the result
  equals ``lax.conv_transpose(x, kernel, (2, 2), "VALID")``: output pixel ``(2i + a, 2j + b)``
  is ``x[i, j] @ kernel[1 - a, 1 - b]``.
  """
  n, h, w, _ = x.shape
  y = lax.dot_general(x, kernel, (((3,), (2,)), ((), ())), precision=precision)
  # y[..., a, b, :] holds kernel[a, b]'s contribution, which lands at offset (1 - a, 1 - b):
  # flip the two small axes here, where the result is copied anyway, not the kernel.
  return y[:, :, :, ::-1, ::-1].transpose(0, 1, 3, 2, 4, 5).reshape(
      n, 2 * h, 2 * w, kernel.shape[-1])


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max-pooling with stride 2 of ``[N, H, W, C]``; an odd last row or column is dropped.

  The values equal ``nnx.max_pool(x, (2, 2), strides=(2, 2))``. The gradient goes to the
  maximum of each window, shared equally between exact ties; behind a ReLU the only likely
  ties are zeros, which the ReLU gives no gradient anyway.
  """
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
