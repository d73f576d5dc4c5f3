"""The data-parallel step, resume, non-finite losses, bad batch sizes and config overrides."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

from unet_jax import losses, training
from unet_jax.training import parallel
from unet_jax.training.checkpoint import read_tree
from unet_jax.data import pipeline
from unet_jax.model import milesial

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from configs import default  # noqa: E402


def tiny_config(**overrides):
  config = default.get_config("tiny")
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def test_data_parallel_step_equals_single_device_step():
  """8 devices, synchronised BatchNorm and a weighted, partly ignored loss give the same
  update as one plain step on the whole global batch."""
  assert jax.device_count() == 8
  kwargs = dict(in_channels=1, num_classes=3, features=(4, 8, 16))
  tx = optax.sgd(0.1, momentum=0.9)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 1)).astype(np.float32),
           "label": rng.integers(-1, 3, size=(16, 32, 32)).astype(np.int32),
           "weight": rng.uniform(0.5, 5.0, size=(16, 32, 32)).astype(np.float32)}
  loss_config = tiny_config().loss

  mesh = parallel.make_mesh()
  model = milesial(**kwargs, norm_axis_name="data", rngs=nnx.Rngs(0))
  state, graphdef, _ = training.create_train_state(model, tx, seed=0)
  step = parallel.data_parallel(
      lambda s, b: training.train_step(s, b, graphdef=graphdef, tx=tx, loss_config=loss_config,
                                    num_classes=3), mesh, batch_argnums=(1,))
  state, measurements = step(parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh))

  reference = milesial(**kwargs, rngs=nnx.Rngs(0))
  reference.train()
  params = nnx.state(reference, nnx.Param)

  def loss_fn(model):
    logits = model(jnp.asarray(batch["image"]))
    labels = jnp.asarray(batch["label"])
    weights = jnp.asarray(batch["weight"]) * (labels >= 0)
    return losses.weighted_cross_entropy(logits, jnp.where(labels >= 0, labels, 0),
                                         weights=weights)

  loss, grads = nnx.value_and_grad(loss_fn)(reference)
  updates, _ = tx.update(grads, tx.init(params), params)
  nnx.update(reference, optax.apply_updates(params, updates))

  np.testing.assert_allclose(measurements["loss"], loss, rtol=1e-5)
  expected = jax.tree.leaves(nnx.state(reference, nnx.Param))
  for got, want in zip(jax.tree.leaves(state.params), expected, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  expected_stats = jax.tree.leaves(nnx.state(reference, nnx.BatchStat))
  for got, want in zip(jax.tree.leaves(state.batch_stats), expected_stats, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert int(state.step) == 1


def test_train_step_is_the_same_bit_for_bit_when_repeated():
  """The same state and batch give the same parameters, to the bit, on the CPU: the native
  kernels (used here: 16 output channels, 2 × 44 × 44 output pixels) sum in a fixed order."""
  kwargs = dict(in_channels=1, num_classes=2, features=(16, 32))
  tx = optax.sgd(0.1, momentum=0.9)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(2, 48, 48, 1)).astype(np.float32),
           "label": rng.integers(0, 2, size=(2, 48, 48)).astype(np.int32)}
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = milesial(**kwargs, norm_axis_name="data", rngs=nnx.Rngs(0))
  state, graphdef, _ = training.create_train_state(model, tx, seed=0)
  step = parallel.data_parallel(
      lambda s, b: training.train_step(s, b, graphdef=graphdef, tx=tx,
                                    loss_config=tiny_config().loss, num_classes=2),
      mesh, batch_argnums=(1,))
  state, batch = parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh)

  def three_steps():
    s = state
    for _ in range(3):
      s, _ = step(s, batch)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(s.params)]

  first = three_steps()
  for _ in range(4):
    for got, want in zip(three_steps(), first, strict=True):
      np.testing.assert_array_equal(got, want)


def _final_params(workdir):
  checkpoints = pathlib.Path(workdir) / "checkpoints"
  last = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  restored = read_tree(checkpoints / str(last) / "state")
  return last, restored


def _patch_iterator(monkeypatch, at_index, action):
  """Make the training iterator call ``action(batch)`` when it yields batch ``at_index``."""
  real_iterator = pipeline.train_iterator

  class Patched:
    def __init__(self, iterator):
      self.iterator = iterator

    def __next__(self):
      batch = next(self.iterator)
      return action(batch) if self.iterator.get_state()["next_index"] == at_index else batch

    def get_state(self):
      return self.iterator.get_state()

  monkeypatch.setattr(pipeline, "train_iterator",
                      lambda *args, **kwargs: Patched(real_iterator(*args, **kwargs)))


def test_train_and_evaluate_writes_outputs_and_resumes_exactly(tmp_path, monkeypatch):
  config = tiny_config(num_steps=6, eval_every=3)
  config.checkpoint.every = 2
  final = training.train_and_evaluate(config, str(tmp_path / "straight"))
  assert 0.0 <= final["pixel_error"] <= 1.0 and "iou_cell" in final
  for name in ("config.json", "metrics.jsonl", "predictions.png"):
    assert (tmp_path / "straight" / name).is_file(), name
  assert list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))
  lines = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
  assert {l["split"] for l in lines} == {"train", "eval"}

  # The same run, killed while fetching the data of step 5, then started again.
  def crash(batch):
    raise KeyboardInterrupt("simulated crash")

  with monkeypatch.context() as patch:
    _patch_iterator(patch, 5, crash)
    with pytest.raises(KeyboardInterrupt):
      training.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert _final_params(tmp_path / "resumed")[0] == 4
  training.train_and_evaluate(config, str(tmp_path / "resumed"))

  step_a, straight = _final_params(tmp_path / "straight")
  step_b, resumed = _final_params(tmp_path / "resumed")
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path, monkeypatch):
  config = tiny_config(num_steps=6, eval_every=100)
  config.checkpoint.every = 1
  _patch_iterator(monkeypatch, 4, lambda batch: {**batch, "image": batch["image"] * 3e38})
  with pytest.raises(training.NonFiniteLossError, match=r"at step 4"):
    training.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 3]  # max_to_keep=2; nothing at or after the bad step
  for step in steps:
    restored = read_tree(tmp_path / "checkpoints" / str(step) / "state")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored)), step


def _sparse_sync_config(**overrides):
  """Sync points only at steps 3 and 6: steps 1, 2, 4 and 5 run with device reads refused."""
  config = tiny_config(num_steps=6, eval_every=6, log_every=3, **overrides)
  config.checkpoint.every = 100
  return config


@pytest.fixture
def strict_reads(monkeypatch):
  """Make every read of a device array fail inside the loop's guarded steps.

  The loop runs the steps between sync points under ``jax.transfer_guard_device_to_host
  ("disallow")``, which JAX enforces on GPUs and TPUs but not on the CPU (whose buffers are
  host memory); here a read (``float``, ``np.asarray``, ``device_get``) fails there too.
  """
  from jax._src.array import ArrayImpl
  guarded = []
  real_guard, real_value = jax.transfer_guard_device_to_host, ArrayImpl._value

  class Guard:
    def __init__(self, level):
      self.inner = real_guard(level)

    def __enter__(self):
      guarded.append(True)
      return self.inner.__enter__()

    def __exit__(self, *exc):
      guarded.pop()
      return self.inner.__exit__(*exc)

  def value(self):
    if guarded:
      raise RuntimeError("Disallowed device-to-host transfer between sync points")
    return real_value.fget(self)

  monkeypatch.setattr(jax, "transfer_guard_device_to_host", Guard)
  monkeypatch.setattr(ArrayImpl, "_value", property(value))


def test_the_loop_reads_nothing_from_the_devices_between_sync_points(tmp_path, strict_reads):
  final = training.train_and_evaluate(_sparse_sync_config(), str(tmp_path))
  assert np.isfinite(final["loss"])
  logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
  assert logged == [3, 6, 6]  # train at 3 and 6, eval at 6


def test_a_read_between_sync_points_fails_loudly(tmp_path, monkeypatch, strict_reads):
  from unet_jax.training import report
  original = report.Reporter.train_step

  def reads_every_step(self, step, measurements):
    float(measurements["loss"])  # what a careless per-step logger would do
    return original(self, step, measurements)

  monkeypatch.setattr(report.Reporter, "train_step", reads_every_step)
  with pytest.raises(Exception, match=r"[Dd]isallowed device-to-host transfer"):
    training.train_and_evaluate(_sparse_sync_config(), str(tmp_path))


def test_bad_labels_in_a_later_batch_stop_the_run_naming_the_step(tmp_path, monkeypatch):
  _patch_iterator(monkeypatch, 5, lambda batch: {**batch, "label": batch["label"] * 0 + 7})
  with pytest.raises(ValueError, match=r"labels of step 5 hold values outside the model's "
                                       r"classes 0\.\.1"):
    training.train_and_evaluate(_sparse_sync_config(), str(tmp_path))
  assert not (tmp_path / "checkpoints" / "6").exists()


def test_indivisible_global_batch_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"batch size 6 does not divide evenly over 8 devices"):
    training.train_and_evaluate(tiny_config(batch_size=6), str(tmp_path))


def _run_train_py(*args, **env_overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_overrides)
  return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                        text=True, timeout=300, env=env, cwd=ROOT)


def test_command_line_overrides_reach_the_run(tmp_path):
  cache = tmp_path / "xla_cache"
  result = _run_train_py(f"--config={ROOT}/configs/default.py:tiny", "--config.num_steps=2",
                         "--config.optimizer.learning_rate=0.01", f"--workdir={tmp_path}",
                         f"--compilation_cache={cache}",
                         JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "final validation:" in result.stdout
  assert "CPU layer on (native kernels:" in result.stderr  # the entry point says what it set
  assert any(cache.iterdir())  # the compiled steps, for the next run of the same command
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["train"]["num_steps"] == 2
  assert saved["train"]["optimizer"]["learning_rate"] == 0.01
  assert saved["model"]["features"] == [4, 8, 16]


def test_unknown_config_key_is_a_clear_error(tmp_path):
  result = _run_train_py(f"--config={ROOT}/configs/default.py:tiny", "--config.num_stepz=2",
                         f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert "num_stepz" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_the_reporter_gets_tensorboardx_without_importing_torch():
  """Where torch is installed, tensorboardX is imported with torch hidden, and torch stays
  importable afterwards."""
  pytest.importorskip("torch", reason="the case only arises where torch is installed")
  code = ("import sys\n"
          "from unet_jax.training import report\n"
          "writer = report._summary_writer_class()\n"
          "assert writer.__name__ == 'SummaryWriter'\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\n"
          "import torch\n"
          "assert torch.ones(2).sum().item() == 2.0\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
