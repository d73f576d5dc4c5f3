"""``unet_jax.cpu.native``: the compiled CPU convolutions agree with XLA's, and everything falls
back. What may be loaded from the cache is tested in ``test_native_trust.py``."""

import hashlib
import os
import pathlib
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from unet_jax.cpu import native, ops

NHWC = ("NHWC", "HWIO", "NHWC")
needs_native = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native.available(),
    reason=f"the native kernels are not in use here: {native.status()}")


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@needs_native
@pytest.mark.parametrize("n,h,w,c,o,kh,kw", [
    (2, 9, 31, 16, 16, 3, 3),   # a row that is not a whole number of tiles
    (1, 3, 25, 16, 16, 3, 3),   # 23 pixels a row: no full tile, every smaller one (8, 4, 2, 1)
    (2, 5, 14, 1, 16, 3, 3),    # one input channel: partial sums over alternate pixels
    (1, 4, 13, 2, 32, 3, 3),    # two input channels, an odd number of pixels a row
    (1, 7, 8, 3, 32, 3, 3),     # input channels that are not a multiple of 16
    (2, 6, 9, 20, 48, 2, 3),    # 48 = 32 + 16 output channels; a non-square kernel
    (1, 5, 70, 8, 64, 1, 1),    # 1×1; 64 channels at once
    (1, 4, 5, 24, 80, 3, 3),    # 80 = 64 + 16
])
def test_kernels_match_xla(n, h, w, c, o, kh, kw):
  x, k = _normal((n, h, w, c), 0), _normal((kh, kw, c, o), 1)
  g = _normal((n, h - kh + 1, w - kw + 1, o), 2)
  want = lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=NHWC)
  np.testing.assert_allclose(jax.jit(native.conv_forward)(x, k), want, rtol=1e-5, atol=1e-5)
  want_grad = jax.vjp(lambda k: lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                                         dimension_numbers=NHWC), k)[1](g)[0]
  got_grad = jax.jit(lambda x, g: native.conv_kernel_grad(x, g, k.shape))(x, g)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)


@needs_native
def test_kernel_gradient_is_the_same_bit_for_bit_on_every_call():
  # Many rows, shared out over the threads differently from call to call: the blocks of rows
  # and their order of summation must not depend on which thread took which.
  x, g = _normal((2, 66, 40, 32), 0), _normal((2, 64, 38, 32), 1)
  grad = jax.jit(lambda x, g: native.conv_kernel_grad(x, g, (3, 3, 32, 32)))
  first = np.asarray(grad(x, g))
  for _ in range(12):
    np.testing.assert_array_equal(np.asarray(grad(x, g)), first)


# Large enough (batch × output pixels ≥ ops.NATIVE_MIN_ROWS) for ops to choose the kernels.
@needs_native
@pytest.mark.parametrize("c,o,padding", [
    (16, 16, ((0, 0), (0, 0))),
    (32, 16, ((1, 1), (1, 1))),
    (16, 32, ((2, 0), (1, 2))),
    (8, 16, "SAME"),
])
def test_ops_take_the_native_kernels_and_match_xla(c, o, padding):
  x, k = _normal((2, 36, 34, c), 0), _normal((3, 3, c, o), 1)
  conv = lambda conv_fn: (lambda x, k: conv_fn(x, k, (1, 1), padding, dimension_numbers=NHWC))
  ours, theirs = conv(ops.conv_general_dilated), conv(lax.conv_general_dilated)
  y, pullback = jax.vjp(ours, x, k)
  want_y, want_pullback = jax.vjp(theirs, x, k)
  g = _normal(y.shape, 2)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(pullback(g), want_pullback(g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
  text = jax.jit(lambda x, k, g: jax.vjp(ours, x, k)[1](g)).lower(x, k, g).as_text()
  assert native.KERNEL_GRAD in text
  # The input gradient is a native forward convolution only where C_in is a multiple of 16.
  assert (native.FORWARD in text) == (c % 16 == 0)
  assert native.FORWARD in jax.jit(ours).lower(x, k).as_text()


@needs_native
def test_small_maps_and_wide_kernels_stay_on_xla():
  # Too few output pixels, and a kernel too large to stay in cache: XLA's convolution is faster.
  for shape, kernel in [((1, 20, 20, 16), (3, 3, 16, 16)), ((2, 40, 40, 256), (3, 3, 256, 256))]:
    x, k = _normal(shape, 0), _normal(kernel, 1)
    text = jax.jit(jax.grad(lambda x, k: ops.conv_general_dilated(
        x, k, (1, 1), "VALID").sum(), argnums=(0, 1))).lower(x, k).as_text()
    assert "unet_jax_conv" not in text


def _in_subprocess(env: dict) -> str:
  code = ("import jax, jax.numpy as jnp, numpy as np\n"
          "from jax import lax\n"
          "from unet_jax.cpu import native, ops\n"
          "x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 40, 40, 16)), "
          "jnp.float32)\n"
          "k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 16, 16)), "
          "jnp.float32)\n"
          "f = lambda x, k: ops.conv_general_dilated(x, k, (1, 1), 'VALID').sum()\n"
          "g = jax.grad(f, argnums=(0, 1))(x, k)\n"
          "h = jax.grad(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), 'VALID', "
          "dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum(), argnums=(0, 1))(x, k)\n"
          "assert all(np.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(g, h))\n"
          "text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, k).as_text()\n"
          "print(native.available(), 'unet_jax_conv' in text, native.status(), sep='|')\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()[-1]


def test_turned_off_by_the_environment():
  available, used, reason = _in_subprocess({"UNET_JAX_NATIVE": "0"}).split("|")
  assert (available, used) == ("False", "False") and "UNET_JAX_NATIVE=0" in reason


def test_without_a_compiler_the_package_falls_back_to_xla(tmp_path):
  # An empty cache and no compiler on the PATH: nothing to load, nothing to build.
  env = {"UNET_JAX_CACHE_DIR": str(tmp_path / "cache"), "PATH": str(tmp_path), "CXX": ""}
  available, used, reason = _in_subprocess(env).split("|")
  assert (available, used) == ("False", "False")
  assert "no C++ compiler" in reason or "AVX-512" in reason or "x86-64" in reason


def test_a_failed_build_is_reported_and_leaves_no_library(tmp_path):
  compiler = tmp_path / "broken-c++"
  compiler.write_text("#!/bin/sh\necho 'g++ (broken) 1.0'\n"
                      "case \"$1\" in --version) exit 0;; esac\necho 'error: no' >&2\nexit 1\n")
  compiler.chmod(0o755)
  cache = tmp_path / "cache"
  available, used, reason = _in_subprocess({"UNET_JAX_CACHE_DIR": str(cache),
                                            "CXX": str(compiler)}).split("|")
  assert (available, used) == ("False", "False")
  if "AVX-512" not in reason and "x86-64" not in reason:
    assert "compiling conv.cc failed" in reason and "error: no" in reason
    assert not list(cache.glob("*.so"))


def _built_cache(tmp_path) -> pathlib.Path:
  """A cache directory holding a freshly built library (skips where none can be built)."""
  cache = tmp_path / "cache"
  available, _, reason = _in_subprocess({"UNET_JAX_CACHE_DIR": str(cache)}).split("|")
  if available != "True":
    pytest.skip(f"the native kernels cannot be built here: {reason}")
  return cache


def test_the_cache_directory_is_private_and_the_library_is_this_users(tmp_path):
  cache = _built_cache(tmp_path)
  assert stat.S_IMODE(cache.stat().st_mode) == 0o700
  (library,) = cache.glob("conv-*.so")
  assert library.stat().st_uid == os.geteuid()
  assert not library.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
  recorded = library.with_name(library.name + ".sha256").read_text().strip()
  assert recorded == hashlib.sha256(library.read_bytes()).hexdigest()


def test_a_damaged_cached_library_is_built_again(tmp_path):
  cache = _built_cache(tmp_path)
  (library,) = cache.glob("conv-*.so")
  library.write_bytes(b"not a shared object")
  available, used, _ = _in_subprocess({"UNET_JAX_CACHE_DIR": str(cache)}).split("|")
  assert (available, used) == ("True", "True")
  assert library.read_bytes()[:4] == b"\x7fELF"
