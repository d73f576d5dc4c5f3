"""The train state and the per-device steps.

``train_step`` and ``eval_step`` are written for one device: they see that device's shard of
the global batch, reduce gradients, losses, metrics and BatchNorm statistics over the
``"data"`` axis, and are mapped over every device of every host by
``parallel.data_parallel`` (``jax.jit(jax.shard_map(...))``). ``loop.train_and_evaluate``
drives them.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from unet_jax import heads, losses, metrics
from unet_jax.data import pipeline
from unet_jax.model import PRESETS, UNet
from unet_jax.ops import STOCK, Ops
from unet_jax.training import parallel

AXIS = parallel.AXIS


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


def create_model(kwargs: dict[str, Any], *, seed: int = 0, norm_axis_name: str | None = None,
                 ops: Ops = STOCK) -> UNet:
  return UNet(**kwargs, norm_axis_name=norm_axis_name, ops=ops, rngs=nnx.Rngs(seed))


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


def _loss(logits, batch, config: ml_collections.ConfigDict, activation: str) -> jax.Array:
  """This device's share of the global loss: averaging it over devices gives the loss of
  the whole global batch (a weighted mean over all its pixels, not a mean of means).

  The cross-entropy's pixel weights are the product of the weight map (if any), 0 for
  ``IGNORE`` labels and ``config.class_weights[label]`` (if set); images ``[B, H, W, C]`` and
  volumes ``[B, D, H, W, C]`` alike."""
  labels = batch["label"]
  valid = (labels != pipeline.IGNORE).astype(jnp.float32)
  weights = batch.get("weight", jnp.ones_like(valid)) * valid
  class_weights = config.get("class_weights")
  if class_weights is not None:  # e.g. a down-weighted background (Çiçek et al. 2016)
    weights = weights * jnp.asarray(class_weights, jnp.float32)[jnp.where(valid > 0, labels, 0)]
  local_total = weights.sum()
  mean_total = jax.lax.pmean(local_total, AXIS)
  ce = losses.weighted_cross_entropy(logits, jnp.where(valid > 0, labels, 0), weights=weights,
                                     activation=activation)
  ce = ce * local_total / jnp.maximum(mean_total, 1e-12)
  if config.name == "cross_entropy":
    return ce
  dice = losses.dice_loss(logits, labels, ignore_index=pipeline.IGNORE, activation=activation,
                          spatial_dims=logits.ndim - 2)
  if config.name == "dice":
    return dice
  if config.name == "dice_ce":
    return config.ce_weight * ce + config.dice_weight * dice
  raise ValueError(f"unknown loss {config.name!r}; known: cross_entropy, dice, dice_ce")


def compute_metrics(logits, labels, *, num_classes: int, activation: str = "softmax"
                    ) -> jax.Array:
  """The global confusion matrix of a batch (summed over devices)."""
  return jax.lax.psum(metrics.confusion_matrix(
      logits, labels, num_classes=heads.metric_classes(activation, num_classes),
      ignore_index=pipeline.IGNORE, activation=activation), AXIS)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, loss_config: ml_collections.ConfigDict,
               num_classes: int, activation: str = "softmax"
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's shard of the batch."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step),
                           jax.lax.axis_index(AXIS))

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    logits = model(batch["image"], rngs=nnx.Rngs(dropout=key))
    return (_loss(logits, batch, loss_config, activation),
            (logits, nnx.state(model, nnx.BatchStat)))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  measurements = {"loss": jax.lax.pmean(loss, AXIS), "grad_norm": optax.global_norm(grads),
                  "param_norm": optax.global_norm(params),
                  "confusion": compute_metrics(logits, batch["label"], num_classes=num_classes,
                                               activation=activation),
                  **_input_problems(batch, heads.label_limit(activation, num_classes))}
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state)
  return state, measurements


def _input_problems(batch, label_limit: int) -> dict[str, jax.Array]:
  """Counts of non-finite pixels and of labels outside ``[0, label_limit)`` in the global
  batch."""
  labels = batch["label"]
  outside = (labels != pipeline.IGNORE) & ((labels < 0) | (labels >= label_limit))
  return {"bad_pixels": jax.lax.psum(jnp.sum(~jnp.isfinite(batch["image"])), AXIS),
          "bad_labels": jax.lax.psum(jnp.sum(outside), AXIS)}


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
              loss_config: ml_collections.ConfigDict, num_classes: int,
              activation: str = "softmax") -> dict[str, jax.Array]:
  """Loss (summed over the batch's examples) and confusion matrix in evaluation mode."""
  logits = nnx.merge(graphdef, state.params, state.batch_stats)(batch["image"])
  examples = batch["image"].shape[0]
  loss = _loss(logits, batch, loss_config, activation)
  return {"loss_sum": jax.lax.psum(loss * examples, AXIS),
          "examples": jax.lax.psum(examples, AXIS),
          "confusion": compute_metrics(logits, batch["label"], num_classes=num_classes,
                                       activation=activation)}


def predict_step(state: TrainState, images: jax.Array, *, graphdef: nnx.GraphDef,
                 activation: str = "softmax") -> jax.Array:
  """Probabilities (``unet_jax.heads``) for this device's images (evaluation mode)."""
  return heads.probabilities(nnx.merge(graphdef, state.params, state.batch_stats)(images),
                             activation)
