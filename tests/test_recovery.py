"""Kill -9 and resume, graceful stop on SIGTERM, and damaged checkpoints."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from unet_jax import training
from unet_jax.training.checkpoint import read_tree

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from configs import default  # noqa: E402

ARGS = ["--config.num_steps=10", "--config.eval_every=5", "--config.checkpoint.every=1",
        "--config.optimizer.name=sgd", "--config.optimizer.momentum=0.9",
        "--config.optimizer.learning_rate=0.05"]


def _start(workdir, cache, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache))
  return subprocess.Popen(
      [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/default.py:tiny",
       f"--workdir={workdir}", *ARGS, *extra], env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _steps(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _params(workdir):
  last = _steps(workdir)[-1]
  return last, read_tree(pathlib.Path(workdir) / "checkpoints" / str(last) / "state")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_reaches_the_same_parameters(tmp_path):
  cache = tmp_path / "cache"
  straight = _start(tmp_path / "straight", cache)
  assert straight.wait(timeout=300) == 0, straight.communicate()[1][-2000:]

  rng = random.Random(1234)
  workdir = tmp_path / "killed"
  kills = 0
  for attempt in range(4):
    process = _start(workdir, cache)
    if attempt == 0:
      # Kill while an async save is in flight: as soon as a temporary directory appears.
      deadline = time.monotonic() + 120
      while time.monotonic() < deadline and process.poll() is None:
        if any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").glob("*")
               if (workdir / "checkpoints").exists()):
          break
        time.sleep(0.01)
    else:
      time.sleep(rng.uniform(2.0, 8.0))
    if process.poll() is None:
      process.send_signal(signal.SIGKILL)
      kills += 1
    process.communicate()
  assert kills >= 2
  final = _start(workdir, cache)
  out, err = final.communicate(timeout=300)
  assert final.returncode == 0, err[-2000:]

  step_a, a = _params(tmp_path / "straight")
  step_b, b = _params(workdir)
  assert step_a == step_b == 10
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  process = _start(tmp_path, tmp_path / "cache", "--config.num_steps=100000",
                   "--config.checkpoint.every=100000", "--config.eval_every=100000")
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err[-2000:]
  assert "SIGTERM received: saved step" in out
  saved = int(out.split("saved step ")[1].split()[0])
  assert _steps(tmp_path) == [saved] and saved >= 3


def _tiny(**overrides):
  config = default.get_config("tiny")
  config.update(overrides)
  return config


def test_damaged_checkpoint_names_itself_and_an_older_one_can_be_restored(tmp_path):
  config = _tiny(num_steps=4)
  training.train_and_evaluate(config, str(tmp_path))
  assert _steps(tmp_path) == [2, 4]
  (tmp_path / "checkpoints" / "4" / "unet_jax_digests.json").unlink()  # as saved before digests
  for path in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  config = _tiny(num_steps=6)
  with pytest.raises(ValueError, match=r"cannot restore the checkpoint at step 4 in .*checkpoints"
                                       r"(.|\n)*restore_step"):
    training.train_and_evaluate(config, str(tmp_path))
  config.checkpoint.restore_step = 2
  final = training.train_and_evaluate(config, str(tmp_path))
  assert final and _steps(tmp_path) == [4, 6]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(read_tree(
      tmp_path / "checkpoints" / "6" / "state")))
