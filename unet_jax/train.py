"""Training: the train state, the per-device steps, and ``train_and_evaluate``.

``train_step`` and ``eval_step`` are written for one device: they see that device's shard of
the global batch, reduce gradients, losses, metrics and BatchNorm statistics over the
``"data"`` axis, and are mapped over every device of every host by
``parallel.data_parallel`` (``jax.jit(jax.shard_map(...))``).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from unet_jax import losses, metrics, parallel
from unet_jax.checkpoint import Checkpointer
from unet_jax.data import pipeline
from unet_jax.model import PRESETS, UNet
from unet_jax.report import Reporter
from unet_jax.signals import GracefulStop

AXIS = parallel.AXIS


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
  key: jax.Array


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every ``UNet`` keyword argument of ``config.model`` (a preset plus overrides), as JSON."""
  if config.preset not in PRESETS:
    raise ValueError(f"unknown model preset {config.preset!r}; known: {sorted(PRESETS)}")
  kwargs = {**PRESETS[config.preset].keywords, **config.to_dict()}
  kwargs.pop("preset")
  kwargs["features"] = list(kwargs["features"])
  return kwargs


def create_model(kwargs: dict[str, Any], *, seed: int = 0, norm_axis_name: str | None = None
                 ) -> UNet:
  return UNet(**kwargs, norm_axis_name=norm_axis_name, rngs=nnx.Rngs(seed))


def create_optimizer(config: ml_collections.ConfigDict, num_steps: int
                     ) -> optax.GradientTransformation:
  """The optimiser and learning-rate schedule of ``config.optimizer``."""
  lr = config.learning_rate
  schedules = {
      "constant": lambda: optax.constant_schedule(lr),
      "cosine": lambda: optax.cosine_decay_schedule(lr, num_steps),
      "warmup_cosine": lambda: optax.warmup_cosine_decay_schedule(
          0.0, lr, config.warmup_steps, max(num_steps, config.warmup_steps + 1)),
  }
  optimizers = {
      "sgd": lambda s: optax.sgd(s, momentum=config.momentum or None),
      "adam": lambda s: optax.adam(s),
      "adamw": lambda s: optax.adamw(s, weight_decay=config.weight_decay),
  }
  if config.schedule not in schedules:
    raise ValueError(f"unknown schedule {config.schedule!r}; known: {sorted(schedules)}")
  if config.name not in optimizers:
    raise ValueError(f"unknown optimizer {config.name!r}; known: {sorted(optimizers)}")
  chain = [optimizers[config.name](schedules[config.schedule]())]
  if config.grad_clip_norm:
    chain.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
  return optax.chain(*chain)


def create_train_state(model: UNet, tx: optax.GradientTransformation, seed: int
                       ) -> tuple[TrainState, nnx.GraphDef, nnx.GraphDef]:
  """The initial state, and the model's structure in training and in evaluation mode."""
  model.train()
  train_graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params), key=jax.random.key_data(jax.random.key(seed)))
  return state, train_graphdef, eval_graphdef


def _loss(logits, batch, config: ml_collections.ConfigDict) -> jax.Array:
  """This device's share of the global loss: averaging it over devices gives the loss of
  the whole global batch (a weighted mean over all its pixels, not a mean of means)."""
  labels = batch["label"]
  valid = (labels != pipeline.IGNORE).astype(jnp.float32)
  weights = batch.get("weight", jnp.ones_like(valid)) * valid
  local_total = weights.sum()
  mean_total = jax.lax.pmean(local_total, AXIS)
  ce = losses.weighted_cross_entropy(logits, jnp.where(valid > 0, labels, 0), weights=weights)
  ce = ce * local_total / jnp.maximum(mean_total, 1e-12)
  if config.name == "cross_entropy":
    return ce
  dice = losses.dice_loss(logits, labels, ignore_index=pipeline.IGNORE)
  if config.name == "dice":
    return dice
  if config.name == "dice_ce":
    return config.ce_weight * ce + config.dice_weight * dice
  raise ValueError(f"unknown loss {config.name!r}; known: cross_entropy, dice, dice_ce")


def compute_metrics(logits, labels, *, num_classes: int) -> jax.Array:
  """The global confusion matrix of a batch (summed over devices)."""
  return jax.lax.psum(metrics.confusion_matrix(logits, labels, num_classes=num_classes,
                                               ignore_index=pipeline.IGNORE), AXIS)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, loss_config: ml_collections.ConfigDict,
               num_classes: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's shard of the batch."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step),
                           jax.lax.axis_index(AXIS))

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    logits = model(batch["image"], rngs=nnx.Rngs(dropout=key))
    return _loss(logits, batch, loss_config), (logits, nnx.state(model, nnx.BatchStat))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  measurements = {"loss": jax.lax.pmean(loss, AXIS), "grad_norm": optax.global_norm(grads),
                  "param_norm": optax.global_norm(params),
                  "confusion": compute_metrics(logits, batch["label"], num_classes=num_classes)}
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state)
  return state, measurements


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
              loss_config: ml_collections.ConfigDict, num_classes: int
              ) -> dict[str, jax.Array]:
  """Loss (summed over the batch's examples) and confusion matrix in evaluation mode."""
  logits = nnx.merge(graphdef, state.params, state.batch_stats)(batch["image"])
  examples = batch["image"].shape[0]
  return {"loss_sum": jax.lax.psum(_loss(logits, batch, loss_config) * examples, AXIS),
          "examples": jax.lax.psum(examples, AXIS),
          "confusion": compute_metrics(logits, batch["label"], num_classes=num_classes)}


def predict_step(state: TrainState, images: jax.Array, *, graphdef: nnx.GraphDef) -> jax.Array:
  """Class probabilities for this device's images (evaluation mode)."""
  return jax.nn.softmax(nnx.merge(graphdef, state.params, state.batch_stats)(images), axis=-1)


def evaluate(eval_fn, state, batches, mesh, class_names=None) -> dict[str, float]:
  totals = None
  for batch in batches:
    out = jax.device_get(eval_fn(state, parallel.shard_batch(batch, mesh)))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  summary = metrics.summarize(totals["confusion"], class_names=class_names)
  return {"loss": float(totals["loss_sum"] / totals["examples"]), **summary}


def check_batch(batch: dict[str, np.ndarray], *, num_classes: int, channels: int) -> None:
  """A clear error for data the model cannot train on (cheap host-side checks)."""
  image, label = batch["image"], batch["label"]
  if image.shape[-1] != channels:
    raise ValueError(f"the data has {image.shape[-1]} channel(s) but the model takes "
                     f"{channels}; set model.in_channels or the data's channels")
  if not np.isfinite(image).all():
    raise ValueError("the input batch contains NaN or infinite pixel values")
  bad = label[(label != pipeline.IGNORE) & ((label < 0) | (label >= num_classes))]
  if bad.size:
    raise ValueError(f"label values {sorted(set(bad.tolist()))[:10]} are outside the model's "
                     f"classes 0..{num_classes - 1} (and the ignore value {pipeline.IGNORE}); "
                     f"set model.num_classes or map the mask values to classes")


def _writable(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{jax.process_index()}"
    probe.write_text("")
    probe.unlink()
  except OSError as error:
    raise ValueError(f"the workdir {workdir} cannot be written: {error}") from error


def check_finite(step: int, measurements: dict[str, Any]) -> None:
  values = {k: float(v) for k, v in measurements.items() if k != "confusion"}
  bad = {k: v for k, v in values.items() if not np.isfinite(v)}
  if bad:
    raise NonFiniteLossError(
        f"non-finite training measurements at step {step}: {bad}. The run stopped; the last "
        f"checkpoint written before this step is intact. Lower the learning rate, enable "
        f"gradient clipping (optimizer.grad_clip_norm) or check the input data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Returns the final validation metrics.
  """
  workdir = pathlib.Path(workdir).absolute()
  _writable(workdir)
  mesh = parallel.make_mesh()
  local_batch = parallel.local_batch_size(config.batch_size, mesh)
  kwargs = model_kwargs(config.model)
  model = create_model(kwargs, seed=config.seed, norm_axis_name=AXIS)
  input_hw, output_hw = pipeline.tile_shapes(config.data, model.geometry)
  tx = create_optimizer(config.optimizer, config.num_steps)
  state, train_graphdef, eval_graphdef = create_train_state(model, tx, config.seed)
  state = parallel.replicate(state, mesh)
  step_kwargs = dict(loss_config=config.loss, num_classes=kwargs["num_classes"])
  p_train = parallel.data_parallel(
      functools.partial(train_step, graphdef=train_graphdef, tx=tx, **step_kwargs), mesh,
      batch_argnums=(1,), donate_argnums=(0,))
  p_eval = parallel.data_parallel(
      functools.partial(eval_step, graphdef=eval_graphdef, **step_kwargs), mesh,
      batch_argnums=(1,))
  p_predict = parallel.data_parallel(functools.partial(predict_step, graphdef=eval_graphdef),
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
  reporter = Reporter(workdir, config, kwargs, start_step=start)

  previous, final = None, {}
  try:
    with GracefulStop() as stop:
      for step in range(start + 1, config.num_steps + 1):
        batch = next(iterator)
        check_batch(batch, num_classes=kwargs["num_classes"], channels=kwargs["in_channels"])
        state, measurements = p_train(state, parallel.shard_batch(batch, mesh))
        if previous is not None:  # checked one step late, so the device is never idle
          check_finite(step - 1, previous)
        previous = measurements
        reporter.train_step(step, measurements)
        stopping = stop.requested()
        if step % config.eval_every == 0 or step == config.num_steps:
          check_finite(step, measurements)
          batches = eval_batches()
          final = evaluate_now(state, batches)
          reporter.eval(step, final, state, p_predict, batches, mesh)
          checkpointer.save(step, state, iterator.get_state(), final)
        elif step % config.checkpoint.every == 0 or stopping:
          check_finite(step, measurements)
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


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
