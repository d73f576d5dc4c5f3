"""The CPU layer: faster CPU training for the same model, turned on explicitly.

The default model is stock JAX (``unet_jax.ops.STOCK``). On XLA's CPU backend its train step
is slower than PyTorch's; this layer closes the gap (``docs/performance.md``) with two parts:

* **Operations** (``OPS``, in ``unet_jax.cpu.ops``): the 3×3 convolution, max-pooling and
  training-mode BatchNorm with custom gradients, and native AVX-512 convolution kernels
  (``unet_jax.cpu.native``, compiled on first use). Same values and parameters; no ``jvp``
  and no ``jax.export`` (the kernels are CPU-only custom calls). ``enable(model)`` switches a
  model to them; ``select_ops(mode)`` is what entry points use.
* **Process settings** (``configure_process``): glibc ``malloc`` options
  (``unet_jax.cpu.malloc``), an XLA flag and inline dispatch of single-device steps
  (``unet_jax.cpu.xla``). They change the whole process, so only entry points apply them,
  before JAX starts a backend, and report them.

``train.py``, the predict and evaluate commands and the benchmarks call both with
``mode="auto"`` (on when the host has no accelerator and the backend is the CPU), and take
``--cpu_layer=off`` (``--cpu-layer off``) to turn it off. Importing this package changes
nothing.
"""

from __future__ import annotations

import os
import sys

from flax import nnx

from unet_jax.cpu import malloc, native, xla
from unet_jax.cpu.ops import OPS
from unet_jax.model import use_ops
from unet_jax.ops import STOCK, Ops

MODES = ("auto", "on", "off")

__all__ = ["MODES", "OPS", "configure_process", "cpu_only_host", "enable", "report",
           "select_ops", "setup"]


def enable(model: nnx.Module) -> nnx.Module:
  """Switch ``model`` to the CPU layer's operations in place (see ``model.use_ops``)."""
  return use_ops(model, OPS)


def _check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"the CPU layer's mode must be one of {', '.join(MODES)}; got {mode!r}")
  return mode


def cpu_only_host() -> bool:
  """Whether JAX will run on the CPU here: ``JAX_PLATFORMS`` (or ``jax_platforms``) names only
  ``cpu``, or no accelerator plugin is installed. Starts no backend."""
  import jax
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  if platforms.strip():
    return {p.strip().lower() for p in platforms.split(",") if p.strip()} == {"cpu"}
  return not malloc._accelerator_plugin_installed()


def configure_process(mode: str = "auto") -> list[str]:
  """Apply the layer's process settings; for entry points, before JAX starts a backend.

  Does nothing when ``mode`` is ``"off"``, or ``"auto"`` on a host with an accelerator.
  Returns what was set, one phrase each (empty if nothing).
  """
  if _check_mode(mode) == "off" or (mode == "auto" and not cpu_only_host()):
    return []
  settings = [f"glibc malloc {name}={malloc.OPTIONS[name][1]}" for name in malloc.apply()]
  xla.apply()
  if xla.applied():
    settings.append(f"XLA_FLAGS += {xla.FLAG}")
  if xla.inline_dispatch():
    settings.append("single-device CPU computations run on the calling thread")
  return settings


def select_ops(mode: str = "auto") -> tuple[Ops, str]:
  """The operations an entry point's model should use, and why, in a phrase.

  ``OPS`` when ``mode`` is ``"on"`` or ``"auto"`` and JAX's default backend is the CPU (this
  starts the backend, and compiles the native kernels once if they are not cached);
  ``STOCK`` otherwise.
  """
  if _check_mode(mode) == "off":
    return STOCK, "turned off"
  import jax
  backend = jax.default_backend()
  if backend != "cpu":
    return STOCK, f"not used: the backend is {backend}"
  native.available()
  return OPS, f"native kernels: {native.status()}"


def setup(mode: str = "auto") -> tuple[Ops, str, list[str]]:
  """``configure_process``, ``select_ops`` and ``report`` in turn, for an entry point that has
  nothing to do between them (``train.py`` starts ``jax.distributed`` there). Call it before
  JAX starts a backend; returns the operations, why, and the process settings."""
  settings = configure_process(mode)
  ops, why = select_ops(mode)
  report(ops, why, settings)
  return ops, why, settings


def report(ops: Ops, why: str, settings: list[str], *, stream=None) -> str:
  """One line for an entry point to print at start-up: what the layer does in this process."""
  state = "on" if ops is OPS else "off"
  parts = [why, *settings]
  line = (f"CPU layer {state} ({'; '.join(parts)})"
          + ("; turn it off with --cpu_layer=off" if state == "on" else ""))
  print(line, file=stream or sys.stderr, flush=True)
  return line
