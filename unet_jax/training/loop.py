"""The training loop: ``train_and_evaluate``.

The loop keeps the accelerators busy: between two sync points (log, eval and checkpoint steps,
and the last step) nothing is read back from the devices, and no collective runs outside the
step; those steps run under ``jax.transfer_guard_device_to_host("disallow")``, so on GPUs
and TPUs an accidental read fails loudly instead of stalling the pipeline (JAX does not guard
the CPU, whose buffers are host memory; the tests check the loop there by other means). The step itself records
problems (a non-finite loss, gradient or parameter norm, non-finite pixels, labels outside the
classes) into a small device-side record of the first step at which each occurred; the loop
reads it at every sync point and before every checkpoint, so no damaged state is ever saved
and the error names the step where things went wrong.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from unet_jax import heads, metrics
from unet_jax.data import pipeline
from unet_jax.ops import STOCK, Ops
from unet_jax.training import parallel
from unet_jax.training.checkpoint import Checkpointer
from unet_jax.training.lock import hold_workdir
from unet_jax.training.config_checks import check_config
from unet_jax.training.report import Reporter
from unet_jax.training.signals import GracefulStop
from unet_jax.training.steps import (AXIS, create_model, create_optimizer, create_train_state,
                                     eval_step, model_kwargs, predict_step, train_step)


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN or infinite."""


def evaluate(eval_fn, state, batches, mesh, class_names=None) -> dict[str, float]:
  totals = None
  for batch in batches:
    out = jax.device_get(eval_fn(state, parallel.shard_batch(batch, mesh)))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  summary = metrics.summarize(totals["confusion"], class_names=class_names)
  return {"loss": float(totals["loss_sum"] / totals["examples"]), **summary}


def check_batch(batch: dict[str, np.ndarray], *, num_classes: int, channels: int) -> None:
  """A clear error for data the model cannot train on (host-side; the loop runs it on the
  first batch, and the step counts the same problems on device for every batch).
  ``num_classes`` bounds the labels: ``heads.label_limit`` of the model."""
  image, label = batch["image"], batch["label"]
  _check_channels(batch, channels)
  if not np.isfinite(image).all():
    raise ValueError("the input batch contains NaN or infinite pixel values")
  bad = label[(label != pipeline.IGNORE) & ((label < 0) | (label >= num_classes))]
  if bad.size:
    raise ValueError(f"label values {sorted(set(bad.tolist()))[:10]} are outside the model's "
                     f"classes 0..{num_classes - 1} (and the ignore value {pipeline.IGNORE}); "
                     f"set model.num_classes or map the mask values to classes")


# The device-side record of problems: the first step at which each occurred (0: none yet).
PROBLEMS = ("non-finite measurements", "non-finite pixels", "labels outside the classes")


@jax.jit
def watch(record: jax.Array, measurements: dict[str, jax.Array], step) -> jax.Array:
  """Note ``step`` in ``record`` for each problem that ``measurements`` shows for the first time."""
  finite = jnp.isfinite(jnp.stack([measurements[k] for k in ("loss", "grad_norm", "param_norm")]))
  seen = jnp.stack([~finite.all(), measurements["bad_pixels"] > 0,
                    measurements["bad_labels"] > 0])
  return jnp.where((record == 0) & seen, jnp.asarray(step, record.dtype), record)


def check_record(record: jax.Array, *, num_classes: int) -> None:
  """Raise for the first problem in ``record`` (this reads it back from the devices)."""
  nonfinite, pixels, labels = (int(x) for x in np.asarray(jax.device_get(record)))
  if pixels:
    raise ValueError(f"the input batch of step {pixels} contains NaN or infinite pixel values; "
                     f"the run stopped and the last checkpoint before that step is intact")
  if labels:
    raise ValueError(f"the labels of step {labels} hold values outside the model's classes "
                     f"0..{num_classes - 1} (and the ignore value {pipeline.IGNORE}); set "
                     f"model.num_classes or map the mask values to classes")
  if nonfinite:
    raise NonFiniteLossError(
        f"non-finite training measurements (loss, gradient or parameter norm) at step "
        f"{nonfinite}. The run stopped; the last checkpoint written before this step is "
        f"intact. Lower the learning rate, enable gradient clipping "
        f"(optimizer.grad_clip_norm) or check the input data.")


def _writable(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{jax.process_index()}"
    probe.write_text("")
    probe.unlink()
  except OSError as error:
    raise ValueError(f"the workdir {workdir} cannot be written: {error}") from error


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       ops: Ops = STOCK) -> dict[str, float]:
  """Train ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  ``ops`` is the formulation of the model's operations (``unet_jax.ops.STOCK``, or the CPU
  layer's ``unet_jax.cpu.OPS``, which ``train.py`` chooses on a CPU). Returns the final
  validation metrics.
  """
  check_config(config, num_devices=jax.device_count())
  workdir = pathlib.Path(workdir).absolute()
  _writable(workdir)
  with hold_workdir(workdir):  # one run per workdir
    return _train(config, workdir, ops)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, ops: Ops
           ) -> dict[str, float]:
  """``train_and_evaluate`` once the workdir is this run's."""
  mesh = parallel.make_mesh()
  local_batch = parallel.local_batch_size(config.batch_size, mesh)
  kwargs = model_kwargs(config.model)
  num_classes = kwargs["num_classes"]
  model = create_model(kwargs, seed=config.seed, norm_axis_name=AXIS, ops=ops)
  input_hw, output_hw = pipeline.tile_shapes(config.data, model.geometry, model.spatial_dims)
  tx = create_optimizer(config.optimizer, config.num_steps)
  state, train_graphdef, eval_graphdef = create_train_state(model, tx, config.seed)
  state = parallel.replicate(state, mesh)
  activation = model.activation
  label_limit = heads.label_limit(activation, num_classes)
  step_kwargs = dict(loss_config=config.loss, num_classes=num_classes, activation=activation)
  p_train = parallel.data_parallel(
      functools.partial(train_step, graphdef=train_graphdef, tx=tx, **step_kwargs), mesh,
      batch_argnums=(1,), donate_argnums=(0,))
  p_eval = parallel.data_parallel(
      functools.partial(eval_step, graphdef=eval_graphdef, **step_kwargs), mesh,
      batch_argnums=(1,))
  p_predict = parallel.data_parallel(
      functools.partial(predict_step, graphdef=eval_graphdef, activation=activation),
      mesh, batch_argnums=(1,), out_specs=P(AXIS))

  checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=config.checkpoint.max_to_keep,
                              keep_best=config.checkpoint.keep_best,
                              best_metric=config.checkpoint.best_metric,
                              best_mode=config.checkpoint.best_mode)
  data_state, restore_step = None, config.checkpoint.get("restore_step")
  if restore_step is not None or checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(jax.tree.map(_abstract, state), restore_step)
    if restore_step is not None:  # going back: later checkpoints belong to another timeline
      checkpointer.discard_after(restore_step)
  start = int(state.step)
  share = dict(input_hw=input_hw, output_hw=output_hw, local_batch=local_batch,
               process_index=jax.process_index(), process_count=jax.process_count())
  dataset = pipeline.train_dataset(config.data, **share)
  iterator = pipeline.train_iterator(dataset, config.data, data_state)
  eval_batches = lambda: list(pipeline.eval_batches(config.data, **share))
  evaluate_now = lambda state, batches: evaluate(p_eval, state, batches, mesh,
                                                 config.data.class_names)
  reporter = Reporter(workdir, config, {**kwargs, "activation": activation}, start_step=start)
  record = parallel.replicate(np.zeros(len(PROBLEMS), np.int32), mesh)
  check = functools.partial(check_record, num_classes=label_limit)

  final = {}
  try:
    with GracefulStop() as stop:
      for step in range(start + 1, config.num_steps + 1):
        evaluating = step % config.eval_every == 0 or step == config.num_steps
        sync = evaluating or step % config.log_every == 0 or step % config.checkpoint.every == 0
        batch = next(iterator)
        if step == start + 1:
          check_batch(batch, num_classes=label_limit, channels=kwargs["in_channels"])
        with contextlib.nullcontext() if sync else jax.transfer_guard_device_to_host("disallow"):
          _check_channels(batch, kwargs["in_channels"])
          state, measurements = p_train(state, parallel.shard_batch(batch, mesh))
          record = watch(record, measurements, step)
          reporter.train_step(step, measurements)
        stopping = stop.requested(sync=sync)
        if sync or stopping:
          check(record)
        if evaluating:
          batches = eval_batches()
          final = evaluate_now(state, batches)
          reporter.eval(step, final, state, p_predict, batches, mesh)
          checkpointer.save(step, state, iterator.get_state(), final)
        elif step % config.checkpoint.every == 0 or stopping:
          checkpointer.save(step, state, iterator.get_state(), force=True)
        if stopping:
          reporter.message(f"{stop.signal_name or 'stop'} received: saved step {step} to "
                           f"{checkpointer.directory}; run the same command to resume")
          return final
    if not final:  # resumed at or past the last step: report where the run stands
      final = evaluate_now(state, eval_batches())
  finally:
    checkpointer.close()
    reporter.close()
  return final


def _check_channels(batch: dict[str, np.ndarray], channels: int) -> None:
  if batch["image"].shape[-1] != channels:
    raise ValueError(f"the data has {batch['image'].shape[-1]} channel(s) but the model takes "
                     f"{channels}; set model.in_channels or the data's channels")


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
