"""Segmentation metrics from a confusion matrix: per-class IoU and Dice, pixel error.

``confusion_matrix`` runs inside jitted (and data-parallel) steps; its counts add up over
devices and batches, and ``summarize`` turns the total into metrics on the host, so every
metric is exact over a whole evaluation set rather than an average of per-batch ratios.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(logits: jax.Array, labels: jax.Array, *, num_classes: int,
                     ignore_index: int | None = None) -> jax.Array:
  """Counts ``[num_classes, num_classes]`` (row: true class, column: predicted class).

  Args:
    logits: ``[..., H, W, C]`` network outputs.
    labels: ``[..., H, W]`` integer classes; ``ignore_index`` and out-of-range values are
      not counted.
  """
  predictions = jnp.argmax(logits, axis=-1).reshape(-1)
  labels = labels.reshape(-1).astype(jnp.int32)
  counted = (labels >= 0) & (labels < num_classes)
  if ignore_index is not None:
    counted &= labels != ignore_index
  index = jnp.where(counted, labels * num_classes + predictions, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(counted.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def summarize(confusion: np.ndarray, *, class_names: tuple[str, ...] | None = None
              ) -> dict[str, float]:
  """Pixel error, mean and per-class IoU and Dice from a confusion matrix.

  IoU_c = TP_c / (TP_c + FP_c + FN_c); Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c); a class
  absent from both labels and predictions gets IoU = Dice = 1.
  """
  confusion = np.asarray(confusion, np.float64)
  num_classes = confusion.shape[0]
  names = class_names or tuple(str(c) for c in range(num_classes))
  true_positive = np.diag(confusion)
  false_positive = confusion.sum(axis=0) - true_positive
  false_negative = confusion.sum(axis=1) - true_positive
  union = true_positive + false_positive + false_negative
  iou = np.where(union > 0, true_positive / np.maximum(union, 1), 1.0)
  dice = np.where(union > 0, 2 * true_positive / np.maximum(union + true_positive, 1), 1.0)
  total = confusion.sum()
  metrics = {"pixel_error": float(1 - true_positive.sum() / total) if total else float("nan"),
             "mean_iou": float(iou.mean()), "mean_dice": float(dice.mean())}
  for name, class_iou, class_dice in zip(names, iou, dice):
    metrics[f"iou_{name}"] = float(class_iou)
    metrics[f"dice_{name}"] = float(class_dice)
  return metrics
