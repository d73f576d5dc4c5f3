"""XLA options that ``import unet_jax`` sets, before JAX starts its backends.

One option, for the CPU backend only:
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``. From jaxlib 0.10 on, XLA
hands unpadded convolutions on CPU to YNNPACK, whose kernels run this U-Net's train step far
slower than the Eigen ones XLA otherwise uses (``docs/performance.md``: the forward pass of a
2×188×188×64→64 layer 4×, its weight gradient 2–4×). Results are the same either way.

The option is added to the ``XLA_FLAGS`` environment variable when ``unet_jax`` is imported,
and only if all of these hold:

* ``UNET_JAX_XLA_DEFAULTS`` is not ``0`` (set it to ``0`` to keep XLA's own defaults);
* ``XLA_FLAGS`` does not already set ``--xla_cpu_experimental_ynn_fusion_type`` (yours wins);
* the installed jaxlib is 0.10 or newer (older ones do not know the option, and XLA refuses
  unknown options);
* JAX has not started a backend yet (``XLA_FLAGS`` is read once, at that moment), so import
  ``unet_jax`` before running JAX code.

``applied()`` says whether the option took effect in this process.
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_applied = False


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
  """Add ``FLAG`` to ``XLA_FLAGS`` if the conditions in the module docstring hold."""
  global _applied
  flags = os.environ.get("XLA_FLAGS", "")
  if (os.environ.get("UNET_JAX_XLA_DEFAULTS", "1") == "0"
      or "xla_cpu_experimental_ynn_fusion_type" in flags
      or _jaxlib_version() < (0, 10) or _backends_started()):
    return _applied
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  _applied = True
  return True


def applied() -> bool:
  """Whether ``import unet_jax`` added ``FLAG`` in this process."""
  return _applied
