"""Data parallelism the way ``pmap`` is built today: ``jax.jit(jax.shard_map(...))``.

A step is written for one device (it sees its shard of the batch and reduces over the
``"data"`` axis with ``jax.lax.pmean``); ``data_parallel`` maps it over a 1-D mesh of every
device of every host. The training state is replicated, the batch is split on its first axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(devices: list | None = None) -> jax.sharding.Mesh:
  """A 1-D ``("data",)`` mesh over ``devices`` (default: every device of every process)."""
  devices = list(devices if devices is not None else jax.devices())
  # Auto axes: the Explicit default breaks the backward pass of convolutions.
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """The per-device batch size; a clear ``ValueError`` if the batch does not divide evenly."""
  devices = mesh.devices.size
  if global_batch_size < 1 or global_batch_size % devices:
    valid = [devices * k for k in range(1, 4)]
    raise ValueError(
        f"the global batch size {global_batch_size} does not divide evenly over {devices} "
        f"devices ({jax.process_count()} process(es)); use a multiple of {devices}, e.g. "
        f"{', '.join(map(str, valid))}")
  return global_batch_size // devices


def local_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """Examples this process must feed per step (its devices' share of the global batch)."""
  check_batch_size(global_batch_size, mesh)
  return global_batch_size * len(mesh.local_devices) // mesh.devices.size


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Place a pytree on every device of the mesh (identical on every process)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assemble each process's local batch ``[B_local, ...]`` into one global array."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def data_parallel(step: Callable, mesh: jax.sharding.Mesh, *, batch_argnums: tuple[int, ...],
                  donate_argnums: tuple[int, ...] = (), out_specs: Any = P()) -> Callable:
  """``jax.jit(jax.shard_map(step))``: arguments in ``batch_argnums`` are split over the
  ``"data"`` axis, the others replicated. Outputs are replicated by default (the step must
  reduce them over the axis itself); pass ``out_specs=P("data")`` for per-example outputs."""
  @functools.wraps(step)
  def wrapped(*args):
    in_specs = tuple(P(AXIS) if i in batch_argnums else P() for i in range(len(args)))
    mapped = jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
    return mapped(*args)
  return jax.jit(wrapped, donate_argnums=donate_argnums)
