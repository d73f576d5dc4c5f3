"""Multi-process start-up: one process per host (or per GPU), joined by ``jax.distributed``.

On TPU pods and SLURM clusters ``jax.distributed.initialize()`` finds its peers by itself;
elsewhere pass the coordinator's ``host:port``, the number of processes and this process's id,
as flags or as the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID``.
"""

from __future__ import annotations

import os

import jax
from absl import flags


def define_flags() -> None:
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process training.")
  flags.DEFINE_integer("num_processes", None, "Total number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes - 1.")
  flags.DEFINE_boolean("auto_distributed", False,
                       "Call jax.distributed.initialize() with no arguments (TPU pods, SLURM).")
  flags.DEFINE_integer("heartbeat_timeout", 60,
                       "Seconds without a heartbeat after which the other processes give up on "
                       "a process that died, and exit with an error instead of hanging.")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               heartbeat_timeout: int = 60) -> None:
  """Join the other processes; a no-op for a single process.

  On CPU, cross-process collectives go through gloo (the default CPU backend has none).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if not auto and coordinator_address is None and num_processes in (None, 1):
    return
  if not auto:
    missing = [name for name, value in (("coordinator_address", coordinator_address),
                                        ("num_processes", num_processes),
                                        ("process_id", process_id)) if value is None]
    if missing:
      raise ValueError(f"multi-process training needs coordinator_address, num_processes and "
                       f"process_id; missing: {', '.join(missing)}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout)


def initialize_from_flags() -> None:
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id, auto=f.auto_distributed,
             heartbeat_timeout=f.heartbeat_timeout)
