"""Graceful stop: SIGINT or SIGTERM asks the training loop to save a checkpoint and exit.

A second SIGINT interrupts at once. With several processes, the request is shared so that
every process stops after the same step (the checkpoint save is collective): the processes
agree at the loop's sync points (log, eval and checkpoint steps) only, so that no collective
runs between them; a signal is acted on at the next sync point.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class GracefulStop:
  """Context manager; ``requested()`` says whether any process received a stop signal."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self) -> GracefulStop:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signal_name = signal.Signals(signum).name

  def requested(self, *, sync: bool = True) -> bool:
    """Whether to stop now. With several processes, only a ``sync`` step can say yes (all
    processes then agree through one collective); other steps say no without one."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    if not sync:
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))
