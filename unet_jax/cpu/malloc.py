"""glibc ``malloc`` options of the CPU layer, so that CPU train steps reuse memory.

XLA's CPU runtime allocates each step's scratch memory anew (one block: 47 MiB for the
walkthrough's network at quarter width, 188×188, batch 2) and frees it at the end of the step.
With glibc's default options a block that large is a fresh ``mmap``, and every page of it is
faulted in and zeroed by the kernel on first touch, every step: 12,000 page faults a step,
which cost about a quarter of that step (``docs/performance.md``). These options make glibc
keep freed memory and hand it out again:

* ``M_MMAP_MAX = 0``: large blocks come from the heap, not from ``mmap``;
* ``M_TRIM_THRESHOLD = -1``: freed memory at the top of the heap is not returned to the
  operating system.

A block larger than 64 MiB allocated from one of XLA's worker threads would still be a fresh
``mmap`` (glibc's per-thread arenas cannot grow past 64 MiB; funnelling every thread into the
main heap instead, ``M_ARENA_MAX = 1``, made steps slower), so ``unet_jax.cpu.xla``
also has single-device steps run on the calling thread, which allocates from the main heap:
that is what makes the options work for a full-width U-Net (297 MiB of scratch).

The price is that the process keeps its peak memory (the scratch of its largest step) until it
exits instead of returning it between steps. Results do not change. PyTorch's CPU tensors come
from the same ``malloc``, so a PyTorch model in the same process gets the same benefit (the
benchmarks compare both frameworks under the same options).

Entry points set the options (``unet_jax.cpu.configure_process``; importing this module sets
nothing), and only if all of these hold:

* ``UNET_JAX_MALLOC_DEFAULTS`` is not ``0`` (set it to ``0`` to keep glibc's defaults);
* the process runs on Linux with glibc, and no other allocator is preloaded (``LD_PRELOAD``
  naming jemalloc, tcmalloc or mimalloc: those manage memory their own way);
* no JAX accelerator plugin (CUDA, ROCm, TPU) is installed, unless ``JAX_PLATFORMS`` is
  ``cpu``: on accelerator hosts the scratch memory lives on the device;
* the option is not already set through glibc's environment variables (``MALLOC_MMAP_MAX_``,
  ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``): yours win, option by option.

``applied()`` lists the options that took effect in this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import platform
import pkgutil

# mallopt(3) parameter numbers, from glibc's <malloc.h>; the environment variables and
# GLIBC_TUNABLES names that set the same options at start-up.
OPTIONS = {
    "M_MMAP_MAX": (-4, 0, "MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max"),
    "M_TRIM_THRESHOLD": (-1, -1, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
}
# glibc's own values (mallopt(3)), for suspended().
GLIBC_DEFAULTS = {"M_MMAP_MAX": 65536, "M_TRIM_THRESHOLD": 128 * 1024}
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_applied: list[str] = []


def _libc():
  if platform.system() != "Linux":
    return None
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # glibc only  # noqa: B018
    return libc
  except (OSError, AttributeError):
    return None


def _mallopt(libc, name: str, value: int) -> bool:
  return libc.mallopt(ctypes.c_int(OPTIONS[name][0]), ctypes.c_int(value)) == 1


def _accelerator_plugin_installed() -> bool:
  try:  # PJRT plugins register in the jax_plugins namespace (jax_plugins.xla_cuda12, ...)
    import jax_plugins
    if any(pkgutil.iter_modules(jax_plugins.__path__)):
      return True
  except ImportError:
    pass
  for name in _ACCELERATOR_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def apply() -> list[str]:
  """Set ``OPTIONS`` with ``mallopt`` if the conditions in the module docstring hold; returns
  the options set in this process."""
  if _applied or os.environ.get("UNET_JAX_MALLOC_DEFAULTS", "1") == "0":
    return list(_applied)
  if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
    return []
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms != "cpu" and _accelerator_plugin_installed():
    return []
  libc = _libc()
  if libc is None:
    return []
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  for name, (_, value, variable, tunable) in OPTIONS.items():
    if variable not in os.environ and tunable not in tunables and _mallopt(libc, name, value):
      _applied.append(name)
  return list(_applied)


def applied() -> list[str]:
  """The options ``apply()`` set in this process (empty if none)."""
  return list(_applied)


@contextlib.contextmanager
def suspended():
  """glibc's default values for the options set here, inside the ``with`` block.

  For measuring a step's peak resident memory: with the options in effect, freed memory stays
  resident, and a step that reuses it adds nothing to the process's resident size.
  """
  libc = _libc() if _applied else None
  if libc is None:
    yield
    return
  for name in _applied:
    _mallopt(libc, name, GLIBC_DEFAULTS[name])
  try:
    yield
  finally:
    for name in _applied:
      _mallopt(libc, name, OPTIONS[name][1])
