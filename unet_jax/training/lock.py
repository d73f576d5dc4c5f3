"""One training run per workdir: a lock file that names its holder.

Two runs writing the same checkpoints would overwrite each other's steps, so the training loop
takes ``WORKDIR/train.lock`` before anything else. The file is created atomically
(``O_CREAT | O_EXCL``) and holds JSON: the host, the process id, its start time and command
line. A second run stops at once with a message naming the holder. A lock left behind by a
process that is gone (same host, process no longer running) is taken over with a notice; a
lock held from another host is respected, since its process cannot be checked from here.
With several processes, process 0 holds the lock for the whole run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Iterator

LOCK_NAME = "train.lock"
_held: set[pathlib.Path] = set()  # lock files this process holds


class WorkdirInUseError(ValueError):
  """Another training run holds the workdir (a ValueError: the entry point reports it as a
  user error, not a traceback)."""


class WorkdirLock:
  """``WORKDIR/train.lock``, held between ``acquire()`` and ``release()`` (or as a context
  manager)."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir).absolute() / LOCK_NAME
    self._record: dict | None = None

  def acquire(self) -> None:
    """Take the lock, or raise ``WorkdirInUseError`` naming the run that holds it."""
    if self.path in _held:
      raise WorkdirInUseError(f"this process already trains in {self.path.parent} "
                              f"(it holds {self.path}); one run per workdir")
    record = _this_process()
    for _ in range(3):  # tries again after a stale lock is removed, or the holder left
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read_holder(self.path)
        if holder == {}:  # released in the meantime
          continue
        if not _stale(holder):
          raise WorkdirInUseError(_in_use_message(self.path, holder)) from None
        self._take_over(holder)
        continue
      with os.fdopen(fd, "w") as file:
        json.dump(record, file)
        file.flush()
        os.fsync(file.fileno())
      self._record = record
      _held.add(self.path)
      return
    raise WorkdirInUseError(_in_use_message(self.path, _read_holder(self.path)))

  def release(self) -> None:
    """Remove the lock file if it is still this run's."""
    if self._record is None:
      return
    _held.discard(self.path)
    record, self._record = self._record, None
    if _read_holder(self.path) == record:  # never remove a lock another run took over
      self.path.unlink(missing_ok=True)

  def _take_over(self, holder: dict) -> None:
    warnings.warn(f"taking over the lock {self.path}: its holder ({_describe(holder)}) no longer "
                  f"runs on this host", RuntimeWarning, stacklevel=3)
    if _read_holder(self.path) == holder:  # not replaced in the meantime by a live run
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold_workdir(workdir: str | os.PathLike) -> Iterator[None]:
  """Hold ``workdir``'s lock for the duration of a run; process 0 takes it on behalf of all
  processes, and if it cannot, every process raises ``WorkdirInUseError``."""
  import jax

  lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except (WorkdirInUseError, OSError) as raised:  # the other processes must hear of it
      error = raised
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    refused = bool(np.any(multihost_utils.process_allgather(np.array(error is not None))))
    if refused and error is None:
      path = pathlib.Path(workdir).absolute() / LOCK_NAME
      error = WorkdirInUseError(f"process 0 could not take the lock {path}; its error says "
                                f"why")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _this_process() -> dict:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid,
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": shlex.join(sys.argv), "process_start": _process_start(pid)}


def _process_start(pid: int) -> int | None:
  """The start time of process ``pid`` in clock ticks since boot (Linux), which tells a
  reused process id from the original; ``None`` where unknown."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces


def _read_holder(path: pathlib.Path) -> dict | None:
  """The lock's JSON, or ``None`` if it cannot be read; a holder may be writing it right now,
  so an unreadable file is read again for up to a second."""
  for attempt in range(6):
    try:
      holder = json.loads(path.read_text())
      if isinstance(holder, dict):
        return holder
    except FileNotFoundError:  # released
      return {}
    except (OSError, ValueError):
      pass
    if attempt < 5:
      time.sleep(0.2)
  return None


def _stale(holder: dict | None) -> bool:
  """Whether ``holder`` is a process of this host that no longer runs."""
  if not holder or holder.get("host") != socket.gethostname():
    return False
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  if pid == os.getpid():  # a previous run in a container that reuses process ids
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    pass
  recorded, current = holder.get("process_start"), _process_start(pid)
  return recorded is not None and current is not None and recorded != current


def _describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')}")


def _in_use_message(path: pathlib.Path, holder: dict | None) -> str:
  workdir = path.parent
  if holder is None:
    return (f"the workdir {workdir} is locked by {path}, which does not say who holds it (it "
            f"is not the JSON a training run writes). If no training run uses this workdir, "
            f"delete {path} and run again.")
  command = f", command: {holder['command']}" if holder.get("command") else ""
  if holder.get("host") != socket.gethostname():
    return (f"the workdir {workdir} is in use by a training run on another machine "
            f"({_describe(holder)}{command}); this host cannot check whether that process "
            f"still runs. Wait for it to finish, or use another workdir; if that run is gone, "
            f"delete {path} and run again.")
  return (f"the workdir {workdir} is in use by another training run ({_describe(holder)}"
          f"{command}). Wait for it to finish or stop it (a stopped run saves a checkpoint and "
          f"releases the workdir), or use another workdir. If that process is gone, delete "
          f"{path} and run again.")
