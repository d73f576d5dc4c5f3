"""Process-level measurements for the benchmarks: a call's peak memory, and page faults.

``peak_memory(run, device)``: on GPUs, the framework allocator's statistics; on CPUs, the
process's peak resident memory during one call above its level before it (Linux: the peak is
reset through ``/proc/self/clear_refs``, freed heap memory is returned with ``malloc_trim``
first, and ``unet_jax.cpu.malloc`` is suspended meanwhile, since it keeps freed memory
resident). ``minor_faults()``: the process's minor page faults so far.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re

from unet_jax.cpu import malloc as malloc_defaults


def _rss_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _can_reset_rss_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_memory(run, device: str) -> tuple[int | None, str]:
  """Peak memory of one call of ``run`` above the level before it, and how it was measured."""
  if device == "cuda":
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
  if device == "jax-gpu":  # the allocator's peak cannot be reset: it covers the whole process
    import jax
    run()
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use"), "jax memory_stats peak_bytes_in_use (process lifetime)"
  if not _can_reset_rss_peak():
    return None, "unavailable (needs Linux /proc/self/clear_refs)"
  with malloc_defaults.suspended():  # else freed memory stays resident and is reused unseen
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
      ctypes.CDLL("libc.so.6").malloc_trim(0)
    _can_reset_rss_peak()
    before = _rss_bytes("VmRSS")
    run()
    return _rss_bytes("VmHWM") - before, "process peak RSS above the level before the step"


def minor_faults() -> int | None:
  """The process's minor page faults so far (Linux), or None."""
  try:
    with open("/proc/self/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[7])
  except (OSError, IndexError, ValueError):
    return None
