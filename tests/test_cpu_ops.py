"""The CPU layer's operations (``unet_jax.cpu.ops``) give the stock values and gradients, and its
process settings (``unet_jax.cpu.configure_process``) do what they say, and only when applied."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from unet_jax import cpu, ops as stock
from unet_jax.cpu import ops, xla


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _lax_conv(x, k, padding):
  return lax.conv_general_dilated(x, k, (1, 1), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _value_and_grads(conv, x, k, g, padding):
  y, pullback = jax.vjp(lambda x, k: conv(x, k, padding), x, k)
  return (y, *pullback(g))


# (batch, height, width, in, out, kernel, padding): deep-end shapes (few rows per output
# channel) take the dot-based input gradient, shallow ones XLA's; non-square, odd and
# asymmetric padding included.
CONV_CASES = [
    (2, 6, 5, 8, 32, 3, ((0, 0), (0, 0))),
    (1, 7, 9, 4, 16, 3, ((1, 1), (1, 1))),
    (2, 6, 6, 3, 24, 3, ((2, 0), (1, 2))),
    (3, 5, 4, 6, 40, 1, ((0, 0), (0, 0))),
    (2, 20, 18, 4, 4, 3, ((0, 0), (0, 0))),
    (2, 16, 12, 5, 3, 3, ((1, 1), (1, 1))),
    (2, 6, 7, 5, 30, 3, "SAME"),
    (1, 5, 6, 3, 20, 3, "VALID"),
    # At most half a row per output channel: the kernel gradient is a product on CPU.
    (1, 4, 5, 8, 64, 3, ((0, 0), (0, 0))),
    (2, 3, 4, 6, 48, 3, ((1, 0), (2, 1))),
    # One and two input channels.
    (2, 9, 7, 1, 16, 3, ((0, 0), (0, 0))),
    (1, 8, 10, 1, 5, 3, ((2, 0), (1, 2))),
    (2, 7, 6, 2, 8, 3, "SAME"),
    (1, 6, 9, 2, 4, 1, ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("n,h,w,c,o,ks,padding", CONV_CASES)
def test_conv_matches_lax_values_and_gradients(n, h, w, c, o, ks, padding):
  x, k = _normal((n, h, w, c), 0), _normal((ks, ks, c, o), 1)
  pads = lax.padtype_to_pads((h, w), (ks, ks), (1, 1), padding) if isinstance(
      padding, str) else padding
  out = (h + sum(pads[0]) - ks + 1, w + sum(pads[1]) - ks + 1)
  g = _normal((n, *out, o), 2)
  want = jax.jit(lambda x, k, g: _value_and_grads(_lax_conv, x, k, g, padding))(x, k, g)
  got = jax.jit(lambda x, k, g: _value_and_grads(
      lambda x, k, p: ops.conv_general_dilated(x, k, (1, 1), p), x, k, g, padding))(x, k, g)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial,channels,dot", [(4, 64, True), (12, 4, False)])
def test_input_gradient_formulation_follows_the_rows_per_channel(spatial, channels, dot):
  x, k = _normal((1, spatial, spatial, 8), 0), _normal((3, 3, 8, channels), 1)
  text = jax.jit(jax.grad(lambda x: ops.conv_general_dilated(
      x, k, (1, 1), ((0, 0), (0, 0))).sum())).lower(x).as_text()
  # 2×2 output pixels for 64 channels: the product; 10×10 for 4: XLA's own convolution.
  assert ("dot_general" in text) == dot


@pytest.mark.parametrize("spatial,dot", [(4, True), (12, False)])
def test_kernel_gradient_formulation_follows_the_rows_per_channel(spatial, dot):
  if jax.default_backend() != "cpu":
    pytest.skip("the product is for the CPU backend only")
  x, k = _normal((1, spatial, spatial, 8), 0), _normal((3, 3, 8, 64), 1)
  text = jax.jit(jax.grad(lambda k: ops.conv_general_dilated(
      x, k, (1, 1), ((0, 0), (0, 0))).sum())).lower(k).as_text()
  # 2×2 output pixels for 64 channels: the product; 10×10 (100 > 32): XLA's convolution.
  convolutions = [line for line in text.splitlines() if "stablehlo.convolution" in line]
  assert bool(convolutions) != dot


def test_kernel_gradient_product_in_bfloat16_keeps_the_dtype():
  x = _normal((1, 4, 4, 8), 0).astype(jnp.bfloat16)
  k = _normal((3, 3, 8, 64), 1).astype(jnp.bfloat16)
  grad = jax.grad(lambda k: ops.conv_general_dilated(
      x, k, (1, 1), "VALID").astype(jnp.float32).sum())(k)
  assert grad.dtype == jnp.bfloat16
  want = jax.grad(lambda k: _lax_conv(x.astype(jnp.float32), k, "VALID").sum())(
      k.astype(jnp.float32))
  np.testing.assert_allclose(grad.astype(jnp.float32), want, rtol=0.02, atol=0.05)


def test_conv_in_bfloat16_keeps_the_dtype():
  x, k = _normal((2, 6, 6, 4), 0).astype(jnp.bfloat16), _normal((3, 3, 4, 32), 1)
  k = k.astype(jnp.bfloat16)
  grads = jax.grad(lambda x, k: ops.conv_general_dilated(
      x, k, (1, 1), ((0, 0), (0, 0))).astype(jnp.float32).sum(), argnums=(0, 1))(x, k)
  assert [a.dtype for a in grads] == [jnp.bfloat16, jnp.bfloat16]
  want = jax.grad(lambda x: _lax_conv(x.astype(jnp.float32), k.astype(jnp.float32),
                                      "VALID").sum())(x)
  np.testing.assert_allclose(grads[0].astype(jnp.float32), want, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("kwargs", [
    dict(window_strides=(2, 2), padding="VALID"),
    dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), rhs_dilation=(2, 2)),
])
def test_conv_other_calls_go_to_lax(kwargs):
  x, k = _normal((1, 9, 9, 2), 0), _normal((3, 3, 2, 3), 1)
  want = lax.conv_general_dilated(x, k, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs)
  got = ops.conv_general_dilated(x, k, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_conv_through_nnx_conv_matches_the_default_module_and_takes_the_custom_gradient(
    padding):
  ours = nnx.Conv(3, 48, (3, 3), padding=padding, rngs=nnx.Rngs(0),
                  conv_general_dilated=ops.conv_general_dilated)
  plain = nnx.Conv(3, 48, (3, 3), padding=padding, rngs=nnx.Rngs(0))
  x = _normal((2, 5, 4, 3), 0)
  np.testing.assert_allclose(ours(x), plain(x), rtol=1e-6, atol=1e-6)
  loss = lambda m, x: jnp.sum(m(x) ** 2)
  for got, want in zip(nnx.grad(loss, argnums=(0, 1))(ours, x),
                       nnx.grad(loss, argnums=(0, 1))(plain, x)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  # nnx.Conv passes its padding as a string: the deep-end gradient must still be the product.
  text = jax.jit(jax.grad(lambda x: loss(ours, x))).lower(x).as_text()
  assert "dot_general" in text


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 4), (1, 1, 1, 2, 3)])
def test_up_conv_matches_conv_transpose(shape):
  n, h, w, c, o = shape
  x, k = _normal((n, h, w, c), 0), _normal((2, 2, c, o), 1)
  g = _normal((n, 2 * h, 2 * w, o), 2)
  transpose = lambda x, k: lax.conv_transpose(x, k, (2, 2), "VALID",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want_y, want_pull = jax.vjp(transpose, x, k)
  got_y, got_pull = jax.vjp(stock.up_conv_2x2, x, k)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  for a, b in zip(got_pull(g), want_pull(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 9, 2), (1, 1, 5, 1)])
@pytest.mark.parametrize("pool", [ops.max_pool_2x2, stock.max_pool_2x2], ids=["cpu", "stock"])
def test_max_pool_matches_reduce_window(shape, pool):
  x = _normal(shape, 0)
  want_y, want_pull = jax.vjp(lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2)), x)
  got_y, got_pull = jax.vjp(pool, x)
  np.testing.assert_array_equal(got_y, want_y)
  g = _normal(want_y.shape, 1)
  np.testing.assert_array_equal(got_pull(g)[0], want_pull(g)[0])


def _flags_after_configure(env):
  code = ("import os, jax; from unet_jax import cpu; from unet_jax.cpu import xla; "
          "cpu.configure_process('on'); jax.devices(); "
          "print(os.environ.get('XLA_FLAGS', '')); print(xla.applied()); "
          "print(xla.inline_dispatch(), "
          "jax.config.values['jax_cpu_enable_async_dispatch'])")
  env = {k: v for k, v in {**os.environ, **env}.items() if v != ""}  # "" unsets a variable
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  return out.stdout.splitlines()


@pytest.mark.skipif(xla._jaxlib_version() < (0, 10),
                    reason="jaxlib < 0.10 has no YNNPACK fusions, so nothing is set")
def test_xla_options_are_set_by_the_entry_point_call_and_can_be_declined():
  flags, applied, dispatch = _flags_after_configure({
      "XLA_FLAGS": "--xla_cpu_enable_fast_math=false", "UNET_JAX_XLA_DEFAULTS": ""})
  assert flags == "--xla_cpu_enable_fast_math=false " + xla.FLAG and applied == "True"
  assert dispatch == "True False"  # inline dispatch set: async dispatch off
  flags, applied, dispatch = _flags_after_configure({"XLA_FLAGS": "",
                                                  "UNET_JAX_XLA_DEFAULTS": "0"})
  assert flags == "" and applied == "False" and dispatch == "False True"
  mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  flags, applied, dispatch = _flags_after_configure({"XLA_FLAGS": mine,
                                                  "UNET_JAX_XLA_DEFAULTS": ""})
  assert flags == mine and applied == "False" and dispatch == "True False"


def test_inline_dispatch_leaves_results_and_multi_device_steps_alone():
  """With JAX's asynchronous dispatch off (as the CPU layer sets it), a single-device
  call returns finished results, and an eight-device ``shard_map`` with a ``psum`` still
  runs (multi-device computations keep asynchronous dispatch, so no device waits on one that
  has not started)."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from unet_jax import cpu
      from unet_jax.cpu import xla
      from unet_jax.training import parallel
      cpu.configure_process("on")
      jax.config.update("jax_num_cpu_devices", 8)
      assert xla.inline_dispatch()
      x = jnp.arange(16.0)
      print(float(jax.jit(lambda x: (x * x).sum())(x)))
      mesh = parallel.make_mesh(jax.devices())
      f = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x.sum(), parallel.AXIS), mesh=mesh,
                                in_specs=jax.P(parallel.AXIS), out_specs=jax.P()))
      print(float(f(x)))
  """)
  env = {k: v for k, v in os.environ.items() if k != "UNET_JAX_XLA_DEFAULTS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  assert out == ["1240.0", "120.0"]


@pytest.mark.skipif(xla._jaxlib_version() < (0, 10),
                    reason="jaxlib < 0.10 has no YNNPACK fusions")
def test_xla_option_keeps_convolutions_on_the_eigen_path():
  code = ("import jax, jax.numpy as jnp; from unet_jax import cpu; cpu.configure_process('on')\n"
          "f = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID',"
          " dimension_numbers=('NHWC', 'HWIO', 'NHWC')))\n"
          "print('ynn' in f.lower(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)))"
          ".compile().as_text())")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "UNET_JAX_XLA_DEFAULTS")}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  assert out.stdout.strip() == "False"


def _reference_batch_norm(x, scale, bias, epsilon=1e-5):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis=(0, 1, 2))
  var = jnp.square(x32 - mean).mean(axis=(0, 1, 2))
  return (x32 - mean) * lax.rsqrt(var + epsilon) * scale + bias


BATCH_NORMS = pytest.mark.parametrize("batch_norm_train",
                                      [ops.batch_norm_train, stock.batch_norm_train],
                                      ids=["cpu", "stock"])


@BATCH_NORMS
def test_batch_norm_values_statistics_and_gradients_match_autodiff(batch_norm_train):
  x = _normal((3, 5, 4, 6), 0) * 2.0 + 0.5
  scale, bias, w = _normal((6,), 1), _normal((6,), 2), _normal((3, 5, 4, 6), 3)
  y, mean, var = batch_norm_train(x, scale, bias, epsilon=1e-5)
  np.testing.assert_allclose(y, _reference_batch_norm(x, scale, bias), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, x.var(axis=(0, 1, 2)), rtol=1e-5)
  loss = lambda bn: lambda x, s, b: jnp.sum(bn(x, s, b) * w)
  ours = jax.grad(loss(lambda *a: batch_norm_train(*a, epsilon=1e-5)[0]),
                  argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(loss(_reference_batch_norm), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(ours, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_norm_gradient_in_bfloat16_keeps_the_dtype():
  x = (_normal((2, 4, 4, 3), 0) * 2.0).astype(jnp.bfloat16)
  scale, bias = jnp.ones((3,)), jnp.zeros((3,))
  dx = jax.grad(lambda x: jnp.sum(ops.batch_norm_train(x, scale, bias, epsilon=1e-5)[0] ** 3))(x)
  want = jax.grad(lambda x: jnp.sum(_reference_batch_norm(x, scale, bias) ** 3))(
      x.astype(jnp.float32))
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(dx.astype(jnp.float32), want, rtol=0.05, atol=0.05)


@BATCH_NORMS
def test_synchronised_batch_norm_gradient_is_the_whole_batch_gradient(batch_norm_train):
  """Per device: the gradient of the sum of every device's loss w.r.t. this device's inputs
  (what a pmean of per-device parameter gradients needs), and local scale and bias sums."""
  devices = 4
  mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:devices])
  x = _normal((8, 3, 5, 2), 0) * 3.0
  x = x.at[:2].multiply(2.0)  # shards with different statistics
  scale, bias, w = _normal((2,), 1), _normal((2,), 2), _normal((8, 3, 5, 2), 3)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                     out_specs=(P("data"), P("data"), P("data")), check_vma=False)
  def sharded(x, scale, bias, w):
    local = lambda x, s, b: jnp.sum(
        batch_norm_train(x, s, b, epsilon=1e-5, axis_name="data")[0] * w)
    dx, ds, db = jax.grad(local, argnums=(0, 1, 2))(x, scale, bias)
    return dx, ds[None], db[None]

  dx, ds, db = sharded(x, scale, bias, w)
  want = jax.grad(lambda x, s, b: jnp.sum(_reference_batch_norm(x, s, b) * w),
                  argnums=(0, 1, 2))(x, scale, bias)
  np.testing.assert_allclose(dx, want[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ds.sum(axis=0), want[1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(db.sum(axis=0), want[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", [ops.max_pool_2x2, stock.max_pool_2x2], ids=["cpu", "stock"])
def test_max_pool_gives_ties_gradient_to_the_first_maximum_like_pytorch(pool):
  window = jnp.array([[3.0, 3.0], [1.0, 3.0]])[None, :, :, None]
  grad = jax.grad(lambda x: pool(x).sum())(window)
  np.testing.assert_array_equal(grad[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])
  flat = jnp.zeros((1, 4, 4, 2))
  grad = jax.grad(lambda x: pool(x).sum())(flat)
  np.testing.assert_array_equal(grad[0, ::2, ::2], 1.0)
  assert float(grad.sum()) == 8.0


def test_compiled_gradients_match_eager_ones_through_the_whole_unet():
  """XLA may fuse a producer into both the pooling maximum and the gradient's comparison and
  round them differently; the gradients of a small BatchNorm U-Net under jit must still be
  the eager ones (they were off by up to 100 % before the pooling kept them apart)."""
  from unet_jax import model as unet

  x = _normal((2, 36, 36, 1), 0)
  grads = []
  for compiled in (False, True):
    net = unet.walkthrough(1, 2, features=(2, 4, 8), ops=ops.OPS, rngs=nnx.Rngs(0))
    step = lambda m, x: nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m)
    grads.append(jax.tree.leaves((nnx.jit(step) if compiled else step)(net, x)))
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
