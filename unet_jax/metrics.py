"""Segmentation metrics from a confusion matrix: per-class IoU and Dice, pixel error.

``confusion_matrix`` runs inside jitted (and data-parallel) steps; its counts add up over
devices and batches, and ``summarize`` turns the total into metrics on the host, so every
metric is exact over a whole evaluation set rather than an average of per-batch ratios.
``mask_confusion_matrix`` and ``mask_metrics`` do the same for class-id masks on the host, and
``rand_error`` scores the cells of a membrane map the way ISBI 2012 did.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import heads


def confusion_matrix(logits: jax.Array, labels: jax.Array, *, num_classes: int,
                     ignore_index: int | None = None, activation: str = "softmax"
                     ) -> jax.Array:
  """Counts ``[K, K]`` (row: true class, column: predicted class).

  Args:
    logits: ``[..., H, W, C]`` network outputs.
    labels: ``[..., H, W]`` integer labels (``unet_jax.heads``); ``ignore_index`` and
      out-of-range values are not counted.
    num_classes: ``K``, the classes of a decision: ``C`` for a softmax model, 2 for a binary
      one (``heads.metric_classes``).
    activation: the model's; a multi-label model (sigmoid, ``C > 1``) gets one 2×2 matrix per
      class, ``[C, 2, 2]``.
  """
  if heads.is_multilabel(activation, logits.shape[-1]):
    return _multilabel_confusion(logits, labels, ignore_index)
  if activation == "sigmoid":
    predictions = (logits[..., 0] > 0).astype(jnp.int32).reshape(-1)
  else:
    predictions = jnp.argmax(logits, axis=-1).reshape(-1)
  labels = labels.reshape(-1).astype(jnp.int32)
  counted = (labels >= 0) & (labels < num_classes)
  if ignore_index is not None:
    counted &= labels != ignore_index
  index = jnp.where(counted, labels * num_classes + predictions, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(counted.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def _multilabel_confusion(logits, labels, ignore_index):
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  counted = (labels >= 0) & (labels < 2**num_classes)
  if ignore_index is not None:
    counted &= labels != ignore_index
  truth = heads.unpack(jnp.where(counted, labels, 0), num_classes).astype(jnp.int32)
  predicted = (logits > 0).astype(jnp.int32)
  cell = (truth * 2 + predicted).reshape(-1, num_classes)  # index into each class's 2×2
  weight = counted.reshape(-1, 1).astype(jnp.int32)
  counts = jax.nn.one_hot(cell, 4, dtype=jnp.int32) * weight[..., None]
  return counts.sum(axis=0).reshape(num_classes, 2, 2)


def summarize(confusion: np.ndarray, *, class_names: tuple[str, ...] | None = None
              ) -> dict[str, float]:
  """Pixel error, mean and per-class IoU and Dice from a confusion matrix.

  IoU_c = TP_c / (TP_c + FP_c + FN_c); Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c); a class
  absent from both labels and predictions gets IoU = Dice = 1. ``mean_iou`` and ``mean_dice``
  average every class, background included; ``foreground_iou`` and ``foreground_dice``
  average the classes after the first (class 0 is the background).

  A ``[C, 2, 2]`` stack (a multi-label model's, one matrix per class) gives each class's IoU
  and Dice of its positive decisions, their means over the classes (no background), and the
  pixel error over all (pixel, class) decisions.
  """
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim == 3:
    return _summarize_multilabel(confusion, class_names)
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
  if num_classes > 1:
    metrics["foreground_iou"] = float(iou[1:].mean())
    metrics["foreground_dice"] = float(dice[1:].mean())
  for name, class_iou, class_dice in zip(names, iou, dice):
    metrics[f"iou_{name}"] = float(class_iou)
    metrics[f"dice_{name}"] = float(class_dice)
  return metrics


def _summarize_multilabel(confusion: np.ndarray, class_names) -> dict[str, float]:
  names = class_names or tuple(str(c) for c in range(confusion.shape[0]))
  true_positive = confusion[:, 1, 1]
  union = true_positive + confusion[:, 0, 1] + confusion[:, 1, 0]
  iou = np.where(union > 0, true_positive / np.maximum(union, 1), 1.0)
  dice = np.where(union > 0, 2 * true_positive / np.maximum(union + true_positive, 1), 1.0)
  total = confusion.sum()
  wrong = confusion[:, 0, 1].sum() + confusion[:, 1, 0].sum()
  metrics = {"pixel_error": float(wrong / total) if total else float("nan"),
             "mean_iou": float(iou.mean()), "mean_dice": float(dice.mean()),
             "foreground_iou": float(iou.mean()), "foreground_dice": float(dice.mean())}
  for name, class_iou, class_dice in zip(names, iou, dice):
    metrics[f"iou_{name}"] = float(class_iou)
    metrics[f"dice_{name}"] = float(class_dice)
  return metrics


def mask_confusion_matrix(predicted: np.ndarray, label: np.ndarray, *, num_classes: int,
                          ignore_index: int | None = None) -> np.ndarray:
  """``confusion_matrix`` for class-id masks on the host: int64 ``[C, C]`` counts.

  Args:
    predicted: ``[H, W]`` predicted classes.
    label: ``[H, W]`` true classes; ``ignore_index`` and out-of-range values are not counted.
  """
  predicted, label = np.asarray(predicted), np.asarray(label)
  if predicted.shape != label.shape:
    raise ValueError(f"prediction and label shapes differ: {predicted.shape} vs {label.shape}")
  predicted = predicted.reshape(-1).astype(np.int64)
  label = label.reshape(-1).astype(np.int64)
  counted = (label >= 0) & (label < num_classes) & (predicted >= 0) & (predicted < num_classes)
  if ignore_index is not None:
    counted &= label != ignore_index
  index = label[counted] * num_classes + predicted[counted]
  return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def mask_metrics(predicted: np.ndarray, label: np.ndarray, *, num_classes: int,
                 ignore_index: int | None = None,
                 class_names: tuple[str, ...] | None = None) -> dict[str, float]:
  """Pixel error, per-class and mean IoU and Dice of one predicted ``[H, W]`` class mask
  against its label mask (see ``summarize``)."""
  confusion = mask_confusion_matrix(predicted, label, num_classes=num_classes,
                                    ignore_index=ignore_index)
  return summarize(confusion, class_names=class_names)


def rand_error(predicted: np.ndarray, label: np.ndarray, *, foreground: int = 1,
               connectivity: int = 1) -> float:
  """The ISBI 2012 foreground-restricted Rand error of a predicted class mask.

  Both masks become segmentations: each connected region of ``foreground`` pixels (a cell)
  gets its own id, everything else gets 0. ``connectivity=1`` joins a pixel to its 4 edge
  neighbours, so a one-pixel diagonal membrane separates two cells (as the border weight map
  assumes); ``connectivity=2`` adds the diagonal neighbours. The score is
  ``skimage.metrics.adapted_rand_error`` (Arganda-Carreras et al., Front. Neuroanat. 2015):
  1 − the F-score of "same region" pixel pairs, counted over the pixels that are foreground
  in the label. Background pixels of the label are ignored; predicted background inside a
  true cell counts as one more region (id 0), so it is penalised as a merge.

  Returns:
    0 for a perfect segmentation, up to 1; NaN when no cell of the label has two pixels.
  """
  from skimage.measure import label as connected_regions
  from skimage.metrics import adapted_rand_error

  predicted, label = np.asarray(predicted), np.asarray(label)
  if predicted.shape != label.shape:
    raise ValueError(f"prediction and label shapes differ: {predicted.shape} vs {label.shape}")
  regions_true = connected_regions(label == foreground, connectivity=connectivity)
  if not np.any(np.bincount(regions_true.reshape(-1))[1:] > 1):
    return float("nan")
  regions_test = connected_regions(predicted == foreground, connectivity=connectivity)
  return float(adapted_rand_error(regions_true, regions_test)[0])
