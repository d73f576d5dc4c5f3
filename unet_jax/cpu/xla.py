"""XLA and JAX options of the CPU layer, which entry points set before JAX starts its backends.

Both concern the CPU backend only. ``unet_jax.cpu.configure_process`` applies them; importing
this module sets nothing.

1. ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``. From jaxlib 0.10 on,
   XLA hands unpadded convolutions on CPU to YNNPACK, whose kernels run this U-Net's train
   step far slower than the Eigen ones XLA otherwise uses (``docs/performance.md``: the
   forward pass of a 2×188×188×64→64 layer 4×, its weight gradient 2–4×). Results are the same
   either way. It is added to the ``XLA_FLAGS`` environment variable, and only if
   ``XLA_FLAGS`` does not already set ``--xla_cpu_experimental_ynn_fusion_type`` (yours wins)
   and the installed jaxlib is 0.10 or newer (older ones do not know the option, and XLA
   refuses unknown options).
2. ``jax_cpu_enable_async_dispatch = False``: a single-device computation on CPU runs on the
   thread that calls it, instead of being handed to one of XLA's worker threads while the call
   returns at once. The step's scratch memory is then allocated by that thread, from glibc's
   main heap, which ``unet_jax.cpu.malloc`` makes reuse it from step to step; allocated on
   a worker thread, a block over 64 MiB is mapped afresh every step and its pages faulted in
   (full-width U-Net, ``docs/performance.md``: 0.357 → 0.285 s a step, 0.12 → 0.004 s of
   system time). The cost: the call returns when the computation is done, so Python cannot
   queue the next step meanwhile (on a CPU, the cores are busy with this one anyway).
   Multi-device computations keep JAX's asynchronous dispatch. To keep it for single-device
   ones too, set ``UNET_JAX_XLA_DEFAULTS=0`` (which declines both options) or run with the
   CPU layer off.

Either is only set if ``UNET_JAX_XLA_DEFAULTS`` is not ``0`` (set it to ``0`` to keep XLA's
and JAX's own defaults) and JAX has not started a backend yet (both are read once, at that
moment), so an entry point applies them before it runs JAX code.

``applied()`` says whether option 1 took effect in this process, ``inline_dispatch()`` whether
option 2 did.
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
ASYNC_DISPATCH = "jax_cpu_enable_async_dispatch"
_applied = False
_inline_dispatch = False


def _jaxlib_version() -> tuple[int, ...]:
  try:
    from jaxlib import version
  except ImportError:
    return ()
  parts = []
  for part in version.__version__.split(".")[:2]:
    digits = "".join(c for c in part if c.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge
  except ImportError:
    return False
  return bool(getattr(xla_bridge, "_backends", None))


def apply() -> bool:
  """Set the options of the module docstring where its conditions hold; returns whether
  option 1 took effect."""
  global _applied, _inline_dispatch
  if os.environ.get("UNET_JAX_XLA_DEFAULTS", "1") == "0" or _backends_started():
    return _applied
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags and _jaxlib_version() >= (0, 10):
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    _applied = True
  if not _inline_dispatch:
    try:
      import jax
      jax.config.update(ASYNC_DISPATCH, False)
      _inline_dispatch = True
    except (ImportError, AttributeError, KeyError, ValueError):
      pass  # no JAX, or a JAX without the option: nothing to set
  return _applied


def applied() -> bool:
  """Whether ``apply()`` added ``FLAG`` in this process."""
  return _applied


def inline_dispatch() -> bool:
  """Whether ``apply()`` turned off JAX's asynchronous dispatch on CPU (option 2)."""
  return _inline_dispatch
