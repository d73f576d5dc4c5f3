"""One training run per workdir: the lock file, its holder, stale locks and release."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from unet_jax import training
from unet_jax.training import lock
from unet_jax.training.lock import LOCK_NAME, WorkdirInUseError, WorkdirLock, hold_workdir

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from configs import default  # noqa: E402

# Another process that takes the lock and keeps it until its standard input closes.
HOLDER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("lock", {str(pathlib.Path(lock.__file__))!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
held = module.WorkdirLock(sys.argv[1])
held.acquire()
print("held", flush=True)
sys.stdin.read()
held.release()
"""


@pytest.fixture
def holder(tmp_path):
  """A live process holding ``tmp_path``'s lock."""
  process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  assert process.stdout.readline().strip() == "held"
  yield process
  process.stdin.close()
  process.wait(timeout=30)


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_the_lock_file_names_its_holder_and_release_removes_it(tmp_path):
  with WorkdirLock(tmp_path):
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert record["started"] and record["command"]
  assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_run_stops_at_once_naming_the_holder(tmp_path, holder):
  record = json.loads((tmp_path / LOCK_NAME).read_text())
  start = time.monotonic()
  with pytest.raises(WorkdirInUseError) as error:
    WorkdirLock(tmp_path).acquire()
  assert time.monotonic() - start < 1
  message = str(error.value)
  for part in (f"PID {holder.pid}", f"host {socket.gethostname()}", record["started"],
               "Wait for it to finish", f"delete {tmp_path / LOCK_NAME}"):
    assert part in message, (part, message)
  assert json.loads((tmp_path / LOCK_NAME).read_text()) == record  # left alone


def test_the_training_loop_refuses_a_held_workdir_before_any_work(tmp_path, holder):
  with pytest.raises(WorkdirInUseError, match=f"PID {holder.pid}"):
    training.train_and_evaluate(default.get_config("tiny"), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_a_stale_lock_of_this_host_is_taken_over_with_a_notice(tmp_path):
  dead = _dead_pid()
  (tmp_path / LOCK_NAME).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": dead, "started": "2020-01-01T00:00:00+00:00"}))
  with pytest.warns(RuntimeWarning, match=f"taking over .*PID {dead}.* no longer runs"):
    held = WorkdirLock(tmp_path)
    held.acquire()
  assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
  held.release()
  assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_process_id_does_not_keep_a_lock_alive(tmp_path):
  """The recorded start time tells the holder from a later process with its id (Linux)."""
  if lock._process_start(os.getpid()) is None:
    pytest.skip("process start times are read from /proc")
  (tmp_path / LOCK_NAME).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": os.getppid(), "process_start": 1}))
  with pytest.warns(RuntimeWarning, match="taking over"):
    with WorkdirLock(tmp_path):
      pass


def test_a_lock_from_another_host_is_respected(tmp_path):
  (tmp_path / LOCK_NAME).write_text(json.dumps(
      {"host": "node-17.cluster", "pid": _dead_pid(), "started": "2020-01-01T00:00:00+00:00"}))
  with pytest.raises(WorkdirInUseError, match="another machine .*node-17.cluster.* cannot "
                                              "check whether that process still runs"):
    WorkdirLock(tmp_path).acquire()
  assert "node-17.cluster" in (tmp_path / LOCK_NAME).read_text()


def test_an_unreadable_lock_file_is_refused_with_what_to_do(tmp_path):
  (tmp_path / LOCK_NAME).write_text("garbage")
  with pytest.raises(WorkdirInUseError, match="does not say who holds it.*delete"):
    WorkdirLock(tmp_path).acquire()


def test_the_lock_is_released_on_an_exception(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with hold_workdir(tmp_path):
      assert (tmp_path / LOCK_NAME).exists()
      raise RuntimeError("boom")
  assert not (tmp_path / LOCK_NAME).exists()
  with hold_workdir(tmp_path):  # and can be taken again
    with pytest.raises(WorkdirInUseError, match="this process already trains in"):
      WorkdirLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path):
  held = WorkdirLock(tmp_path)
  held.acquire()
  other = {"host": "elsewhere", "pid": 1}
  (tmp_path / LOCK_NAME).write_text(json.dumps(other))
  held.release()
  assert json.loads((tmp_path / LOCK_NAME).read_text()) == other


@pytest.mark.slow
def test_two_train_commands_on_one_workdir(tmp_path):
  """The second stops at once naming the first; SIGTERM stops the first, which releases."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/default.py:tiny",
             f"--workdir={tmp_path}", "--config.num_steps=100000",
             "--config.eval_every=100000", "--config.checkpoint.every=100000"]
  first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.2)
  assert (tmp_path / LOCK_NAME).exists()
  second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert second.returncode != 0
  assert f"PID {first.pid}" in second.stderr and "in use by another training run" in second.stderr
  first.send_signal(signal.SIGTERM)
  out, err = first.communicate(timeout=120)
  assert first.returncode == 0, err[-2000:]
  assert not (tmp_path / LOCK_NAME).exists()
