"""One 3×3 convolution's weight gradient on XLA, in four formulations.

  python benchmarks/conv_weight_grad.py

On CPUs the weight gradient dominates the U-Net's train step; this times XLA's default
(``jax.vjp`` of the convolution) against the same convolution with batch and features
swapped, im2col followed by one matrix product, and nine shifted matrix products, for a
2×94×94×64 → 64 layer, with the forward pass for scale. Medians of 10, in milliseconds.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

N, H, W, CI, CO = 2, 94, 94, 64, 64


def conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def default(x, g):
  return jax.vjp(lambda k: conv(x, k), jnp.zeros((3, 3, CI, CO)))[1](g)[0]


def swapped(x, g):
  out = jax.lax.conv_general_dilated(x, g, (1, 1), "VALID",
                                     dimension_numbers=("CHWN", "IHWO", "NHWC"))
  return out.transpose(1, 2, 0, 3)


def im2col(x, g):
  ho, wo = g.shape[1:3]
  patches = jnp.stack([x[:, i:i + ho, j:j + wo] for i in range(3) for j in range(3)], axis=3)
  return jnp.dot(patches.reshape(-1, 9 * CI).T, g.reshape(-1, CO)).reshape(3, 3, CI, CO)


def shifted(x, g):
  ho, wo = g.shape[1:3]
  return jnp.stack([jnp.einsum("nhwc,nhwo->co", x[:, i:i + ho, j:j + wo], g)
                    for i in range(3) for j in range(3)]).reshape(3, 3, CI, CO)


def median_ms(f, *args):
  f(*args).block_until_ready()
  times = []
  for _ in range(10):
    start = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main() -> None:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((N, H, W, CI), np.float32))
  g = jnp.asarray(rng.random((N, H - 2, W - 2, CO), np.float32))
  expected = np.asarray(jax.jit(default)(x, g))
  print(f"forward: {median_ms(jax.jit(conv), x, jnp.zeros((3, 3, CI, CO))):.1f} ms")
  for f in (default, swapped, im2col, shifted):
    got = np.asarray(jax.jit(f)(x, g))
    error = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"weight gradient, {f.__name__}: {median_ms(jax.jit(f), x, g):.1f} ms "
          f"(relative difference {error:.1e})")


if __name__ == "__main__":
  main()
