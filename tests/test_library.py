"""The package is a good guest: importing it changes nothing, and the default model is stock JAX
(forward-mode AD, ``vmap``, higher-order gradients, ``jax.export`` for every platform), with the
CPU layer an opt-in that gives the same numbers."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unet_jax import cpu, model as unet, ops

IMPORT_EVERYTHING = textwrap.dedent("""
    import gc, json, os, pathlib, pkgutil, subprocess, sys
    import numpy as np
    import jax

    def resident_mb():
      return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def kept_after_free():
      before = resident_mb()
      block = np.ones(50_000_000)  # 400 MB
      del block
      gc.collect()
      return resident_mb() - before

    def refuse(*args, **kwargs):
      raise AssertionError(f"a subprocess was started while importing: {args[:1]}")

    environ, config = dict(os.environ), dict(jax.config.values)
    kept_before = kept_after_free()
    subprocess.Popen.__init__ = refuse  # no compiler (nor anything else) may run
    import unet_jax
    names = sorted(m.name for m in pkgutil.walk_packages(unet_jax.__path__, "unet_jax."))
    for name in names:
      __import__(name)
    from jax._src import xla_bridge
    print(json.dumps({
        "modules": len(names),
        "environ": sorted(k for k in set(environ) | set(os.environ)
                          if environ.get(k) != os.environ.get(k)),
        "config": sorted(k for k in set(config) | set(jax.config.values)
                         if repr(config.get(k)) != repr(jax.config.values.get(k))),
        "backends_started": bool(xla_bridge._backends),
        "kept_mb": [kept_before, kept_after_free()],
    }))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_importing_every_module_changes_nothing_in_the_process(tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "UNET_JAX_"))}
  env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  import json
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["modules"] >= 30  # every room, every shim
  assert report["environ"] == [] and report["config"] == []
  assert not report["backends_started"]
  before, after = report["kept_mb"]
  assert after < 50, f"a freed 400 MB array kept {after:.0f} MB resident (before: {before:.0f})"
  assert not list(home.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def _tiny(preset=unet.walkthrough, **kwargs):
  return preset(1, 2, features=(2, 4, 8), rngs=nnx.Rngs(0), **kwargs)


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _train_mode_fn(net):
  """Logits as a pure function of (params, image) in training mode (BatchNorm on the batch)."""
  net.train()
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)
  return (lambda params, x: nnx.merge(graphdef, params, rest, copy=True)(x)), params


@pytest.mark.parametrize("preset,size", [(unet.walkthrough, 44), (unet.milesial, 16),
                                         (unet.paper, 44)])
def test_forward_mode_agrees_with_reverse_mode(preset, size):
  """``<u, J v>`` by ``jvp`` equals ``<Jᵀ u, v>`` by ``vjp``, through every layer."""
  net = _tiny(preset, **({"dropout": 0.0} if preset is unet.paper else {}))
  f, params = _train_mode_fn(net)
  x, v = _normal((2, size, size, 1), 0), _normal((2, size, size, 1), 1)
  y, jv = jax.jvp(lambda x: f(params, x), (x,), (v,))
  u = _normal(y.shape, 2)
  (jtu,) = jax.vjp(lambda x: f(params, x), x)[1](u)
  np.testing.assert_allclose(jnp.vdot(u, jv), jnp.vdot(jtu, v), rtol=2e-4)


def test_jacfwd_equals_jacrev_on_a_small_model():
  net = _tiny(unet.milesial)
  net.eval()
  x = _normal((1, 16, 16, 1), 0)
  f = lambda x: net(x)[0, 4:8, 4:8].sum(axis=(0, 1))  # two outputs
  forward, reverse = jax.jacfwd(f)(x), jax.jacrev(f)(x)
  assert forward.shape == (2, 1, 16, 16, 1)
  np.testing.assert_allclose(forward, reverse, rtol=1e-4, atol=1e-6)


def test_vmap_over_batches_equals_a_loop():
  net = _tiny()
  f, params = _train_mode_fn(net)
  xs = _normal((3, 2, 44, 44, 1), 0)
  mapped = jax.vmap(f, in_axes=(None, 0))(params, xs)
  np.testing.assert_allclose(mapped, jnp.stack([f(params, x) for x in xs]), rtol=1e-5,
                             atol=1e-5)


def test_gradients_of_gradients_two_ways_agree():
  """A Hessian-vector product by reverse-over-reverse equals forward-over-reverse."""
  net = _tiny()
  f, params = _train_mode_fn(net)
  x, v = _normal((2, 44, 44, 1), 0), _normal((2, 44, 44, 1), 1)
  loss = lambda x: jnp.mean(jax.nn.log_softmax(f(params, x))[..., 1])
  grad = jax.grad(loss)
  reverse = jax.grad(lambda x: jnp.vdot(grad(x), v))(x)
  forward = jax.jvp(grad, (x,), (v,))[1]
  assert float(jnp.abs(reverse).max()) > 0
  np.testing.assert_allclose(reverse, forward, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("preset,shape", [(unet.milesial, "b, 8*h, 8*w, 1"),
                                          (unet.walkthrough, "b, 44, 60, 1")])
def test_export_for_cpu_cuda_and_tpu_round_trips(preset, shape):
  net = _tiny(preset)
  net.eval()
  exported = jax.export.export(jax.jit(lambda x: net(x)), platforms=("cpu", "cuda", "tpu"))(
      jax.ShapeDtypeStruct(jax.export.symbolic_shape(shape), jnp.float32))
  assert exported.platforms == ("cpu", "cuda", "tpu")
  restored = jax.export.deserialize(exported.serialize())
  sizes = [(16, 24), (32, 8)] if preset is unet.milesial else [(44, 60)]
  for batch, (h, w) in [(1, sizes[0]), (3, sizes[-1])]:
    x = _normal((batch, h, w, 1), batch)
    np.testing.assert_allclose(restored.call(x), net(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make,hw", [
    (lambda: _tiny(), (44, 44)),
    # Four levels, bilinear, one input channel: the case where two former CPU formulations
    # (a one-channel first layer as a sum, max-pooling gradients by comparison) went wrong
    # inside jit.
    (lambda: unet.milesial(1, 3, features=(4, 8, 16, 32, 64), upsample="bilinear",
                           rngs=nnx.Rngs(0)), (64, 48)),
], ids=["walkthrough", "milesial-bilinear"])
def test_the_cpu_layer_gives_the_stock_numbers_and_keeps_the_parameters(make, hw):
  stock_net, cpu_net = make(), cpu.enable(make())
  assert jax.tree.structure(nnx.state(stock_net)) == jax.tree.structure(nnx.state(cpu_net))
  x = _normal((2, *hw, 1), 0)
  results = []
  for net in (stock_net, cpu_net):
    f, params = _train_mode_fn(net)
    loss = lambda params: jnp.mean(jnp.sin(3 * f(params, x)))
    results.append(jax.jit(lambda p: (f(p, x), jax.grad(loss)(p)))(params))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_use_ops_switches_every_block_and_back():
  net = cpu.enable(_tiny())
  layers = [m for _, m in nnx.iter_modules(net) if isinstance(m, (unet.BatchNorm, unet.Down))]
  assert layers and all(m.ops is cpu.OPS for m in layers)
  unet.use_ops(net, ops.STOCK)
  assert all(m.ops is ops.STOCK for m in layers)
  convs = [m for _, m in nnx.iter_modules(net) if isinstance(m, unet.DoubleConv)]
  assert all(c.conv1.conv_general_dilated is jax.lax.conv_general_dilated for c in convs)


def test_the_cpu_layer_mode_is_checked_and_off_means_stock():
  with pytest.raises(ValueError, match=r"one of auto, on, off; got 'fast'"):
    cpu.select_ops("fast")
  assert cpu.select_ops("off")[0] is ops.STOCK
  assert cpu.configure_process("off") == []
