"""The CPU layer's operations: the U-Net's heavy operations written the way XLA's CPU backend
compiles them well. ``OPS`` bundles them as a ``unet_jax.ops.Ops``.

Each function here computes what its stock counterpart (``unet_jax.ops.STOCK``) computes (the
tests check values and gradients against it); only the formulation differs. They use custom
gradients, so they support reverse-mode differentiation but not ``jvp``, and the native
kernels are CPU-only custom calls that ``jax.export`` cannot serialise: a model keeps the
stock operations unless it is asked for these. ``docs/performance.md`` has the measurements
behind each.

* ``conv_general_dilated``: a drop-in for ``jax.lax.conv_general_dilated`` (``nnx.Conv``
  takes it as an argument). Stride-1, undilated 2-D convolutions get a custom gradient whose
  input gradient is, on CPU and for layers with few pixels per output channel (the deep end of
  the U-Net), one matrix product followed by a scatter of its columns (col2im). XLA's own input
  gradient transposes and flips the whole kernel first, which on a 3×3×1024×1024 kernel costs
  more than the convolution. Where the rows are fewer still (the bottleneck), the kernel
  gradient is one product too, of the stacked windows with the output gradient, which writes
  the kernel's layout directly instead of transposing XLA's result. Otherwise, the kernel
  gradient of a padded convolution is taken as the unpadded one of the padded input (the
  same sums, up to twice as fast on CPU). Everything else, and every other backend, goes to
  ``lax``. (A one-channel first layer as an elementwise sum of shifted copies was faster, but
  gave wrong gradients inside a jitted train step: ``docs/performance.md``.)
* ``max_pool_2x2``: 2×2 max-pooling as a reshape and a max, with a custom gradient (to the
  first maximum of each window, as in PyTorch) that is one elementwise pass, instead of
  ``reduce_window`` with a ``select_and_scatter`` gradient.
* ``batch_norm_train``: training-mode batch normalisation with its closed-form gradient (two
  sums and one elementwise pass) instead of what automatic differentiation derives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from unet_jax.cpu import native
from unet_jax.ops import Ops, batch_statistics

# The dot-based input gradient pays for a ``rows × kh·kw·C_in`` intermediate; XLA's pays for
# a transposed, flipped copy of the kernel. Measured on CPU, the product wins while the rows
# (batch × output pixels) are at most about three times the output channels.
DOT_INPUT_GRAD_MAX_ROWS_PER_CHANNEL = 3
# The kernel gradient as one product of the stacked windows (``rows × kh·kw·C_in``) with the
# output gradient writes the kernel's layout directly; XLA's writes it transposed and copies
# it back, which dominates for the deepest layers. Measured on CPU, the product wins while the
# rows are at most half the output channels.
DOT_KERNEL_GRAD_MAX_ROWS_PER_CHANNEL = 0.5

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
  """``jax.lax.conv_general_dilated`` with a faster gradient for stride-1 2-D convolutions.

  Takes the same arguments. Calls that are not a stride-1, undilated, ungrouped 2-D
  convolution in NHWC/HWIO layout, or that pass extra keyword arguments, go to ``lax``
  unchanged.
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


def _forward(x, kernel, padding, precision):
  xla = functools.partial(_lax_conv, padding=padding, precision=precision)
  n, h, w, _ = x.shape
  kh, kw, _, o = kernel.shape
  rows = n * (h + sum(padding[0]) - kh + 1) * (w + sum(padding[1]) - kw + 1)
  if _use_native(kernel, rows, o, x, kernel):
    cpu = lambda x, kernel: native.conv_forward(_pad(x, padding), kernel)
  else:
    cpu = None
  return _on_cpu(cpu, xla, x, kernel)


def _on_cpu(cpu, default, *args):
  """``cpu(*args)`` on the CPU backend and ``default(*args)`` elsewhere; ``default`` alone
  when there is no CPU formulation."""
  if cpu is None:
    return default(*args)
  return lax.platform_dependent(*args, cpu=cpu, default=default)


def _pad(x, padding):
  return jnp.pad(x, ((0, 0), *padding, (0, 0))) if any(map(any, padding)) else x


# The native kernels (``unet_jax.native``) keep a kernel's worth of weights or gradient in
# cache and win where that is small and the image large (the top of the U-Net); measured on
# CPU, from 256 channels on, XLA's convolutions are as fast or faster.
NATIVE_MAX_KERNEL_CHANNELS = 128 * 128  # C_in × C_out
NATIVE_MIN_ROWS = 2048  # batch × output pixels


def _use_native(kernel, rows, out_channels, *arrays) -> bool:
  """Whether this convolution pass can run on ``unet_jax.native``'s kernels."""
  return (out_channels % 16 == 0 and rows >= NATIVE_MIN_ROWS
          and kernel.shape[2] * kernel.shape[3] <= NATIVE_MAX_KERNEL_CHANNELS
          and all(a.dtype == jnp.float32 for a in arrays)
          and jax.default_backend() == "cpu" and native.available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, padding, precision):
  return _forward(x, kernel, padding, precision)


def _conv_fwd(x, kernel, padding, precision):
  return _forward(x, kernel, padding, precision), (x, kernel)


def _conv_bwd(padding, precision, residuals, g):
  x, kernel = residuals
  kh, kw, c, o = kernel.shape
  rows = g.shape[0] * g.shape[1] * g.shape[2]
  # The kernel gradient of a padded convolution is the unpadded one of the padded input:
  # the same sums, which XLA's CPU backend computes up to twice as fast.
  padded = _pad(x, padding)
  valid = ((0, 0), (0, 0))
  xla_kernel_grad = lambda padded, kernel, g: jax.vjp(
      lambda k: _lax_conv(padded, k, valid, precision), kernel)[1](g)[0]
  if rows <= DOT_KERNEL_GRAD_MAX_ROWS_PER_CHANNEL * o:
    cpu = functools.partial(_kernel_grad_dot, precision=precision)
  elif _use_native(kernel, rows, o, x, kernel, g):
    cpu = lambda padded, kernel, g: native.conv_kernel_grad(padded, g, kernel.shape)
  else:
    cpu = None
  kernel_grad = _on_cpu(cpu, xla_kernel_grad, padded, kernel, g)

  xla_input_grad = lambda x, kernel, g: jax.vjp(
      lambda x: _lax_conv(x, kernel, padding, precision), x)[1](g)[0]
  (top, bottom), (left, right) = padding
  if rows <= DOT_INPUT_GRAD_MAX_ROWS_PER_CHANNEL * o:
    cpu = functools.partial(_input_grad_dot, padding=padding, precision=precision)
  elif max(top, bottom) < kh and max(left, right) < kw and _use_native(kernel, rows, c, x,
                                                                        kernel, g):
    cpu = functools.partial(_input_grad_native, padding=padding)
  else:
    cpu = None
  input_grad = _on_cpu(cpu, xla_input_grad, x, kernel, g)
  return input_grad, kernel_grad


_conv.defvjp(_conv_fwd, _conv_bwd)


def _kernel_grad_dot(padded, kernel, g, *, precision):
  """Kernel gradient of a stride-1, unpadded NHWC/HWIO convolution: im2col, then one product."""
  n, ho, wo, o = g.shape
  kh, kw, c, _ = kernel.shape
  windows = jnp.concatenate([padded[:, a:a + ho, b:b + wo] for a in range(kh)
                             for b in range(kw)], axis=-1)  # channels (a, b, c): HWIO order
  rows = n * ho * wo
  grad = lax.dot_general(windows.reshape(rows, kh * kw * c), g.reshape(rows, o),
                         (((0,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
  return grad.reshape(kernel.shape).astype(kernel.dtype)


def _input_grad_native(x, kernel, g, *, padding):
  """Input gradient as the native forward convolution of the output gradient, padded to the
  full correlation (less the input's own padding), with the kernel flipped and transposed."""
  del x
  kh, kw = kernel.shape[:2]
  (top, bottom), (left, right) = padding
  g = jnp.pad(g, ((0, 0), (kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right),
                  (0, 0)))
  return native.conv_forward(g, kernel[::-1, ::-1].transpose(0, 1, 3, 2))


def _input_grad_dot(x, kernel, g, *, padding, precision):
  """Input gradient of a stride-1 NHWC/HWIO convolution: one product, then col2im."""
  n, ho, wo, o = g.shape
  kh, kw, c, _ = kernel.shape
  # Accumulate in float32 (as XLA's convolutions do), also for bf16 inputs.
  columns = lax.dot_general(g.reshape(-1, o), kernel.reshape(-1, o), (((1,), (1,)), ((), ())),
                            precision=precision, preferred_element_type=jnp.float32)
  columns = columns.reshape(n, ho, wo, kh, kw, c)
  padded = sum(jnp.pad(columns[:, :, :, a, b],
                       ((0, 0), (a, kh - 1 - a), (b, kw - 1 - b), (0, 0)))
               for a in range(kh) for b in range(kw))
  (top, _), (left, _) = padding
  return lax.dynamic_slice(padded, (0, top, left, 0), x.shape).astype(x.dtype)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max-pooling with stride 2 of ``[N, H, W, C]``; an odd last row or column is dropped.

  The values equal ``nnx.max_pool(x, (2, 2), strides=(2, 2))``, and the gradient goes to the
  first maximum of each window in row-major order, as in PyTorch's ``max_pool2d``.
  """
  n, h, w, c = x.shape
  return _max_pool_2x2(x[:, :h - h % 2, :w - w % 2])


def _windows(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def _max_pool_2x2(x):
  return _windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
  # The forward pass records which element of each window is the first maximum (row-major
  # order, as PyTorch's max_pool2d), and the backward pass routes the gradient by that index.
  # Comparing the input with the maximum again in the backward pass is not safe: XLA may fuse
  # x's producer into both and round them differently, and a window whose maximum no longer
  # compares equal would lose its gradient (seen under jit, 40 % gradient errors).
  windows = _windows(x)
  out = windows.max(axis=(2, 4))
  n, h, _, w, _, c = windows.shape
  flat = windows.transpose(0, 1, 3, 5, 2, 4).reshape(n, h, w, c, 4)
  return out, jnp.argmax(flat, axis=-1).astype(jnp.int8)


def _max_pool_bwd(index, g):
  n, h, w, c = g.shape
  hit = index[..., None] == jnp.arange(4, dtype=jnp.int8)
  dx = jnp.where(hit, g[..., None], jnp.zeros((), g.dtype)).reshape(n, h, w, c, 2, 2)
  return (dx.transpose(0, 1, 4, 2, 5, 3).reshape(n, 2 * h, 2 * w, c),)


_max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float,
                     axis_name: str | None = None):
  """Training-mode batch normalisation over ``N, H, W``, with a hand-written gradient.

  Returns ``(y, mean, var)``: ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` in
  float32, and the batch mean and biased variance (reduced over ``axis_name`` as well when it
  is given: synchronised BatchNorm). ``mean`` and ``var`` are for the running statistics and
  carry no gradient; differentiate through ``y`` only.

  Automatic differentiation of the textbook formula reads the activations several times in
  the backward pass, through the mean's and the variance's paths separately. The gradient
  here is the closed form, two sums and one elementwise pass:
  ``dx = scale / σ · (dy − mean(dy) − x̂ · mean(dy · x̂))`` with the means over the whole
  (synchronised) batch.
  """
  return _batch_norm(x, scale, bias, epsilon, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, scale, bias, epsilon, axis_name):
  return _batch_norm_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
  x32 = x.astype(jnp.float32)
  mean, var = batch_statistics(x32, axis_name)
  inv = lax.rsqrt(var + epsilon)
  xhat = (x32 - mean) * inv
  y = xhat * scale + bias
  return (y, lax.stop_gradient(mean), lax.stop_gradient(var)), (xhat.astype(x.dtype), inv,
                                                                scale)


def _batch_norm_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon
  xhat, inv, scale = residuals
  dy = cotangents[0].astype(jnp.float32)  # mean and var carry no gradient (see docstring)
  # The barrier keeps XLA's algebraic simplifier from rewriting sum(dy · x̂) through
  # x̂ = (x − mean) / σ into sum(dy · x) − mean · sum(dy), which cancels catastrophically
  # when a channel's mean is large against its spread.
  xhat = lax.optimization_barrier(xhat)
  dtype, xhat = xhat.dtype, xhat.astype(jnp.float32)
  sum_dy = dy.sum(axis=(0, 1, 2))
  sum_dy_xhat = (dy * xhat).sum(axis=(0, 1, 2))
  count = xhat.shape[0] * xhat.shape[1] * xhat.shape[2]
  mean_dy, mean_dy_xhat = sum_dy / count, sum_dy_xhat / count
  if axis_name is not None:
    mean_dy, mean_dy_xhat = lax.pmean((mean_dy, mean_dy_xhat), axis_name)
  dx = (inv * scale) * (dy - mean_dy - xhat * mean_dy_xhat)
  return dx.astype(dtype), sum_dy_xhat.astype(scale.dtype), sum_dy.astype(scale.dtype)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


OPS = Ops("cpu", conv_general_dilated=conv_general_dilated, max_pool_2x2=max_pool_2x2,
          batch_norm_train=batch_norm_train)
