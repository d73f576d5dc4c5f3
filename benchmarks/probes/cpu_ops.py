"""Each of the CPU layer's operations (``unet_jax.cpu.ops``) against the plain ``lax`` formulation it replaces, on this machine.

  python benchmarks/cpu_ops.py --output cpu_ops.json
  python benchmarks/cpu_ops.py --tiny          # seconds: small shapes, for a smoke test

Times, at the shapes where each matters in the U-Net's train step (batch 2, 188×188 input):

* the 2×2 up-convolution's forward and backward pass: ``lax.conv_transpose`` against
  ``unet_jax.ops.up_conv_2x2``;
* 2×2 max-pooling's forward and backward pass: ``nnx.max_pool`` against ``ops.max_pool_2x2``;
* training-mode BatchNorm's forward and backward pass: automatic differentiation of the
  formula against ``ops.batch_norm_train``;
* a deep 3×3 convolution's input gradient: XLA's against ``ops.conv_general_dilated``'s
  (one product, then col2im);
* a padded 3×3 convolution's kernel gradient: XLA's against the unpadded gradient of the
  padded input;
* a bottleneck 3×3 convolution's kernel gradient: XLA's against one product of the stacked
  windows;
* the forward pass of a 3×3 convolution of a one-channel image (the first layer): XLA's
  against the elementwise sum of shifted copies;
* XLA's own forward and weight gradient of an unpadded 3×3 convolution, in a fresh process
  with and without the CPU layer's XLA option (``unet_jax.cpu.xla``) (``UNET_JAX_XLA_DEFAULTS=0``).

Each line checks that the two formulations agree, and reports medians in milliseconds.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from unet_jax import cpu
from unet_jax import ops as stock
from unet_jax.cpu import native, ops, xla as xla_defaults

cpu.configure_process("on")  # before JAX starts a backend; UNET_JAX_XLA_DEFAULTS=0 declines

NHWC = ("NHWC", "HWIO", "NHWC")


def median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _normal(rng, shape):
  return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def _forward_backward(fn):
  """``run(g, *args)``: the forward pass of ``fn`` and the pullback of the cotangent ``g``."""
  def run(g, *args):
    out, pullback = jax.vjp(fn, *args)
    return out, pullback(g)
  return jax.jit(run)


def _cotangent(fn, *args):
  """A fixed pseudo-random cotangent for ``fn``'s output, drawn once, outside the timing (not
  ones: with ones, BatchNorm's input gradient is zero up to rounding and compares as noise)."""
  out = jax.eval_shape(fn, *args)
  return jax.random.normal(jax.random.key(0), out.shape, out.dtype)


def _compare(name, shape, plain, ours, args, repeats) -> dict:
  want, got = plain(*args), ours(*args)
  diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
             for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))
  if diff > 1e-4:
    raise AssertionError(f"{name} at {shape}: the formulations differ by {diff:.1e}")
  plain_ms = median_ms(plain, *args, repeats=repeats)
  ours_ms = median_ms(ours, *args, repeats=repeats)
  return {"op": name, "shape": shape, "lax_ms": plain_ms, "unet_jax_ms": ours_ms,
          "speedup": plain_ms / ours_ms, "max_relative_difference": diff}


def op_cases(tiny: bool, repeats: int) -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  up = [(2, 4, 4, 16, 8)] if tiny else [(2, 4, 4, 1024, 512), (2, 28, 28, 256, 128),
                                         (2, 60, 60, 128, 64)]
  for n, h, w, c, o in up:
    x, k = _normal(rng, (n, h, w, c)), _normal(rng, (2, 2, c, o))
    plain = _forward_backward(lambda x, k: lax.conv_transpose(x, k, (2, 2), "VALID",
                                                               dimension_numbers=NHWC))
    rows.append(_compare("2×2 up-convolution, forward + backward", [n, h, w, c, o], plain,
                         _forward_backward(stock.up_conv_2x2),
                         (_cotangent(stock.up_conv_2x2, x, k), x, k), repeats))
  pools = [(2, 8, 8, 4)] if tiny else [(2, 184, 184, 64), (2, 88, 88, 128)]
  for shape in pools:
    x = _normal(rng, shape)
    plain = _forward_backward(lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2)))
    rows.append(_compare("2×2 max-pool, forward + backward", list(shape), plain,
                         _forward_backward(ops.max_pool_2x2),
                         (_cotangent(ops.max_pool_2x2, x), x), repeats))
  norms = [(2, 8, 8, 4)] if tiny else [(2, 186, 186, 16), (2, 186, 186, 64)]
  for shape in norms:
    x, scale, bias = _normal(rng, shape), _normal(rng, shape[-1:]), _normal(rng, shape[-1:])

    def plain_bn(x, scale, bias):
      mean = x.mean(axis=(0, 1, 2))
      var = jnp.square(x - mean).mean(axis=(0, 1, 2))
      return (x - mean) * lax.rsqrt(var + 1e-5) * scale + bias

    ours_bn = lambda x, scale, bias: ops.batch_norm_train(x, scale, bias, epsilon=1e-5)[0]
    rows.append(_compare("BatchNorm (training), forward + backward", list(shape),
                         _forward_backward(plain_bn), _forward_backward(ours_bn),
                         (_cotangent(plain_bn, x, scale, bias), x, scale, bias), repeats))
  deep = [(2, 6, 6, 8, 32)] if tiny else [(2, 12, 12, 1024, 1024), (2, 20, 20, 512, 512),
                                           (2, 24, 24, 256, 512)]
  for n, h, w, c, o in deep:
    x, k = _normal(rng, (n, h, w, c)), _normal(rng, (3, 3, c, o))
    g = _normal(rng, (n, h - 2, w - 2, o))
    plain = jax.jit(lambda x, k, g: jax.vjp(
        lambda x: lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=NHWC),
        x)[1](g))
    ours = jax.jit(lambda x, k, g: jax.vjp(
        lambda x: ops.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=NHWC),
        x)[1](g))
    rows.append(_compare("3×3 convolution, input gradient", [n, h, w, c, o], plain, ours,
                         (x, k, g), repeats))
  padded = [(2, 10, 10, 4, 4)] if tiny else [(2, 128, 128, 32, 16), (2, 160, 160, 64, 64),
                                              (2, 80, 80, 256, 128)]
  rows += _kernel_grad_rows("3×3 padded convolution, kernel gradient", padded, "SAME", rng,
                            repeats)
  bottleneck = [(2, 5, 5, 8, 32)] if tiny else [(2, 6, 6, 1024, 1024), (2, 10, 10, 256, 512)]
  rows += _kernel_grad_rows("3×3 convolution, kernel gradient", bottleneck, "VALID", rng,
                            repeats)
  first = [(2, 12, 12, 1, 4)] if tiny else [(2, 188, 188, 1, 16), (2, 188, 188, 1, 64)]
  for n, h, w, c, o in first:
    x, k = _normal(rng, (n, h, w, c)), _normal(rng, (3, 3, c, o))
    forward = lambda conv: jax.jit(lambda x, k: conv(x, k, (1, 1), "VALID",
                                                     dimension_numbers=NHWC))
    rows.append(_compare("3×3 convolution, forward (first layer)", [n, h, w, c, o],
                         forward(lax.conv_general_dilated), forward(ops.conv_general_dilated),
                         (x, k), repeats))
  return rows


def _kernel_grad_rows(name, shapes, padding, rng, repeats) -> list[dict]:
  rows = []
  for n, h, w, c, o in shapes:
    x, k = _normal(rng, (n, h, w, c)), _normal(rng, (3, 3, c, o))
    out = (h, w) if padding == "SAME" else (h - 2, w - 2)
    g = _normal(rng, (n, *out, o))
    grad = lambda conv: jax.jit(lambda x, k, g: jax.vjp(
        lambda k: conv(x, k, (1, 1), padding, dimension_numbers=NHWC), k)[1](g))
    rows.append(_compare(name, [n, h, w, c, o], grad(lax.conv_general_dilated),
                         grad(ops.conv_general_dilated), (x, k, g), repeats))
  return rows


def _xla_conv_child(shape: list[int], repeats: int) -> None:
  n, h, w, c, o = shape
  rng = np.random.default_rng(0)
  x, k = _normal(rng, (n, h, w, c)), _normal(rng, (3, 3, c, o))
  conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=NHWC)
  y = conv(x, k)
  weight_grad = jax.jit(lambda x, g: jax.vjp(lambda k: conv(x, k), k)[1](g))
  print(json.dumps({"forward_ms": median_ms(jax.jit(conv), x, k, repeats=repeats),
                    "weight_grad_ms": median_ms(weight_grad, x, jnp.ones_like(y),
                                                repeats=repeats),
                    "xla_defaults_applied": xla_defaults.applied()}))


def xla_default_cases(tiny: bool, repeats: int) -> list[dict]:
  rows = []
  for shape in [[2, 10, 10, 4, 4]] if tiny else [[2, 188, 188, 64, 64], [2, 12, 12, 1024, 1024]]:
    result = {}
    for label, value in (("xla", "0"), ("unet_jax", "1")):
      env = {**os.environ, "UNET_JAX_XLA_DEFAULTS": value}
      env.pop("XLA_FLAGS", None)
      out = subprocess.run([sys.executable, __file__, "--child", json.dumps(shape),
                            "--repeats", str(repeats)], env=env, capture_output=True,
                           text=True, check=True)
      result[label] = json.loads(out.stdout.strip().splitlines()[-1])
    for key, name in (("forward_ms", "XLA 3×3 convolution, forward"),
                      ("weight_grad_ms", "XLA 3×3 convolution, weight gradient")):
      rows.append({"op": name, "shape": shape, "lax_ms": result["xla"][key],
                   "unet_jax_ms": result["unet_jax"][key],
                   "speedup": result["xla"][key] / result["unet_jax"][key],
                   "xla_defaults_applied": result["unet_jax"]["xla_defaults_applied"]})
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| operation | shape | plain (ms) | unet_jax (ms) | speedup |",
           "| --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['op']} | {'×'.join(map(str, r['shape']))} | {r['lax_ms']:.2f} | "
                 f"{r['unet_jax_ms']:.2f} | {r['speedup']:.1f}× |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="small shapes, for a smoke test")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--output", help="write the rows as JSON here")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _xla_conv_child(json.loads(args.child), args.repeats)
    return
  print(f"jax {jax.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, XLA defaults applied: {xla_defaults.applied()}, native "
        f"kernels: {native.status()}", flush=True)
  rows = op_cases(args.tiny, args.repeats) + xla_default_cases(args.tiny, args.repeats)
  print(markdown(rows))
  print("shapes: [N, H, W, C_in, C_out] of the input (pool: [N, H, W, C]); plain: lax / nnx "
        "(XLA rows: XLA's defaults); speedup = plain / unet_jax")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"jax": jax.__version__, "python": platform.python_version(), "rows": rows},
                f, indent=1)


if __name__ == "__main__":
  main()
