"""Several processes joined by jax.distributed over 127.0.0.1, as on a cluster.

Each process gets its own CPU devices (``JAX_NUM_CPU_DEVICES``) and cross-process collectives
go through gloo, the same runtime path as a GPU cluster or a TPU pod.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from unet_jax.training.checkpoint import read_tree

ROOT = pathlib.Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, *, devices, process_id=None, num_processes=None, port=None, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
  args = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/default.py:tiny",
          f"--workdir={workdir}", "--config.num_steps=4", "--config.checkpoint.every=2",
          # SGD: Adam's first steps move every weight by ~lr·sign(g), which turns summation-
          # order noise in near-zero gradients into visible differences.
          "--config.optimizer.name=sgd", "--config.optimizer.momentum=0.9",
          "--config.optimizer.learning_rate=0.05", *extra]
  if num_processes:
    args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
             f"--process_id={process_id}", "--heartbeat_timeout=10"]
  return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _final_state(workdir):
  checkpoints = pathlib.Path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  return steps[-1], read_tree(checkpoints / str(steps[-1]) / "state")


def _train_two_processes(workdir, *extra):
  port = _free_port()
  procs = [_launch(workdir, devices=2, process_id=i, num_processes=2, port=port, extra=extra)
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


def test_two_processes_equal_one_process_with_as_many_devices(tmp_path):
  """Two processes of 2 devices reach the parameters of one process of 4; then, with the
  newest checkpoint damaged, process 0 verifies, moves it away and tells process 1 to resume
  from the step before (one test: each two-process run costs most of a minute)."""
  single = _launch(tmp_path / "single", devices=4)
  out, err = single.communicate(timeout=300)
  assert single.returncode == 0, err[-3000:]

  outputs = _train_two_processes(tmp_path / "multi")
  # Only process 0 reports.
  assert "final validation" in outputs[0][0]
  assert "train:" in outputs[0][1] and "train:" not in outputs[1][1]

  step_a, a = _final_state(tmp_path / "single")
  step_b, b = _final_state(tmp_path / "multi")
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a["batch_stats"]), jax.tree.leaves(b["batch_stats"]),
                  strict=True):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)

  from test_integrity import _data_file, _flip
  from unet_jax.training.checkpoint import DIGESTS
  checkpoints = tmp_path / "multi" / "checkpoints"
  assert all((checkpoints / str(step) / DIGESTS).is_file() for step in (2, 4))
  _flip(_data_file(checkpoints / "4"))
  outputs = _train_two_processes(tmp_path / "multi", "--config.num_steps=6")
  assert "Resuming from step 2" in outputs[0][1]
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert steps[-1] == 6 and (checkpoints / "6" / DIGESTS).is_file()
  assert (tmp_path / "multi" / "checkpoints-damaged" / "4").is_dir()
  assert not (tmp_path / "multi" / "train.lock").exists()


def test_a_dead_process_makes_the_others_exit(tmp_path):
  port = _free_port()
  extra = ("--config.num_steps=100000", "--config.eval_every=100000",
           "--config.checkpoint.every=100000")
  procs = [_launch(tmp_path, devices=1, process_id=i, num_processes=2, port=port, extra=extra)
           for i in range(2)]
  try:
    time.sleep(20)  # both joined and training
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    procs[0].wait(timeout=120)
    elapsed = time.monotonic() - start
    assert procs[0].returncode != 0
    assert elapsed < 120
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.communicate()
