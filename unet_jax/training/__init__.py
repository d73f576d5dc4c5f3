"""Training: the steps and the loop, checkpoints, reporting, signals, data parallelism
(``parallel``) and multi-host start-up (``distributed``)."""

from unet_jax.training.loop import (NonFiniteLossError, check_batch, check_record, evaluate,
                                    train_and_evaluate)
from unet_jax.training.steps import (AXIS, TrainState, compute_metrics, create_model,
                                     create_optimizer, create_train_state, eval_step,
                                     model_kwargs, predict_step, train_step)

__all__ = ["AXIS", "NonFiniteLossError", "TrainState", "check_batch", "check_record",
           "compute_metrics", "create_model", "create_optimizer", "create_train_state",
           "eval_step", "evaluate", "model_kwargs", "predict_step", "train_and_evaluate",
           "train_step"]
