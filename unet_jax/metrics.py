"""Segmentation metrics from a confusion matrix: per-class IoU and Dice, pixel error.

``confusion_matrix`` runs inside jitted (and data-parallel) steps; its counts add up over
devices and batches, and ``summarize`` turns the total into metrics on the host, so every
metric is exact over a whole evaluation set rather than an average of per-batch ratios.
``mask_confusion_matrix`` and ``mask_metrics`` do the same for class-id masks on the host, and
``rand_error`` scores the cells of one predicted membrane mask (say, the argmax decision).

``challenge_scores`` scores a membrane probability map as the ISBI 2012 challenge does, over a
sweep of thresholds: pixel error and foreground-restricted Rand error (1 − maximal F-score),
V_rand and V_info after border thinning, and the warping error (``unet_jax.warping``);
``challenge_sweep`` and the functions it is made of give the per-threshold figures.
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


# Scoring as the ISBI 2012 challenge does: the organisers' definitions (Arganda-Carreras et al.,
# Front. Neuroanat. 9:142, 2015; the challenge's evaluation page) as their Fiji scripts compute
# them (trainableSegmentation.metrics: RandError, VariationOfInformation, PixelError).

CHALLENGE_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 11), 1)


def cell_segments(cells: np.ndarray) -> np.ndarray:
  """Segment ids ``[H, W]`` of a cell mask ``[H, W]`` (bool): each 4-connected region of cells
  gets its own id from 1, boundary pixels get 0. 4-connectivity is the challenge's: a
  one-pixel diagonal membrane separates two cells."""
  from skimage.measure import label as connected_regions
  return connected_regions(np.asarray(cells, bool), connectivity=1)


def thin_boundaries(cells: np.ndarray) -> np.ndarray:
  """Segment ids ``[H, W]`` of a cell mask ``[H, W]`` after thinning its boundaries to one pixel.

  The border thinning of V_rand and V_info (thinned): the boundary pixels are flooded from the
  4-connected cells (a watershed of the binary map, 4-connectivity, as the organisers'
  scripts do it), so each joins its nearest cell, and where two floods meet a one-pixel line
  stays boundary (id 0). Which of two equidistant pixels becomes the line may differ from
  their flooding order. A mask without any cell is one segment, as there.
  """
  from skimage.segmentation import watershed
  cells = np.asarray(cells, bool)
  segments = cell_segments(cells)
  if not segments.any():
    return np.ones(cells.shape, np.int32)
  return watershed((~cells).astype(np.uint8), segments, connectivity=1, watershed_line=True)


def _overlaps(true_segments: np.ndarray, predicted_segments: np.ndarray):
  """Pixel counts over the pixels of true cells: per (true cell, predicted segment) pair, per
  true cell, per predicted segment. A predicted boundary pixel (id 0) inside a true cell is a
  segment of its own, as in the challenge's scripts."""
  from skimage.metrics import contingency_table
  inside = np.asarray(true_segments) > 0
  if not inside.any():
    return np.zeros(0), np.zeros(0), np.zeros(0)
  predicted = np.asarray(predicted_segments)[inside].astype(np.int64)
  boundary = predicted == 0
  predicted[boundary] = predicted.max() + 1 + np.arange(np.count_nonzero(boundary))
  table = contingency_table(np.asarray(true_segments)[inside], predicted).tocsr()
  return table.data, np.asarray(table.sum(axis=1)).ravel(), np.asarray(table.sum(axis=0)).ravel()


def rand_pair_counts(true_segments: np.ndarray, predicted_segments: np.ndarray) -> np.ndarray:
  """Pixel-pair counts ``[in one segment in both, in one true cell, in one predicted segment]``
  (float64) of the foreground-restricted Rand index, for ``[H, W]`` segment ids (0 = boundary).

  Only pixels inside true cells take part; a predicted boundary pixel there is a segment of
  its own. Pairs are ordered and a pixel pairs with itself (the challenge's N² normalisation):
  the counts are sums of squared overlap sizes. Counts of several slices add up (pairs are
  formed within a slice).
  """
  joint, true, predicted = _overlaps(true_segments, predicted_segments)
  return np.array([np.sum(joint**2), np.sum(true**2), np.sum(predicted**2)], np.float64)


def rand_f_score(counts: np.ndarray) -> float:
  """The foreground-restricted Rand F-score ``2PR / (P + R)`` of ``rand_pair_counts``.

  P = pairs in one segment in both / pairs in one predicted segment (V_rand merge: merges
  lower it); R = the same / pairs in one true cell (V_rand split: splits lower it). NaN when
  no pixel is inside a true cell.
  """
  same_both, same_true, same_predicted = np.asarray(counts, np.float64)
  if same_true == 0:
    return float("nan")
  precision, recall = same_both / same_predicted, same_both / same_true
  return float(2 * precision * recall / (precision + recall))


def information_f_score(true_segments: np.ndarray, predicted_segments: np.ndarray) -> float:
  """V_info, the foreground-restricted information-theoretic score of ``[H, W]`` segment ids.

  Over the pixels inside true cells T (a predicted boundary pixel there is a segment of its
  own), with the predicted segments S: V_info split = I(S; T) / H(S) and V_info merge =
  I(S; T) / H(T), and V_info = their F-score, 2 I / (H(S) + H(T)). As in the organisers'
  scripts, a slice where either side is a single segment (an entropy of 0) scores 0; so does
  one with no mutual information.
  """
  joint, true, predicted = _overlaps(true_segments, predicted_segments)
  total = true.sum()

  def entropy(counts):
    p = counts[counts > 0] / total
    return float(-np.sum(p * np.log(p)))

  h_true, h_predicted = entropy(true), entropy(predicted)
  mutual = h_true + h_predicted - entropy(joint)
  if h_true == 0 or h_predicted == 0 or mutual <= 0:
    return 0.0
  return 2 * mutual / (h_true + h_predicted)


def pixel_counts(cells: np.ndarray, true_cells: np.ndarray) -> np.ndarray:
  """Counts ``[true positives, false positives, false negatives]`` (float64) of cell pixels."""
  cells, true_cells = np.asarray(cells, bool), np.asarray(true_cells, bool)
  return np.array([np.sum(cells & true_cells), np.sum(cells & ~true_cells),
                   np.sum(~cells & true_cells)], np.float64)


def pixel_f_score(counts: np.ndarray) -> float:
  """The F-score of cell pixels from ``pixel_counts`` (the challenge's pixel similarity):
  precision or recall is 1 when there is nothing to get wrong, as in its scripts."""
  true_positive, false_positive, false_negative = np.asarray(counts, np.float64)
  precision = true_positive / (true_positive + false_positive) if false_positive else 1.0
  recall = true_positive / (true_positive + false_negative) if false_negative else 1.0
  return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def _challenge_inputs(membrane_probability, label, thresholds):
  probability = np.asarray(membrane_probability, np.float64)
  label = np.asarray(label)
  if probability.shape != label.shape or probability.ndim not in (2, 3) or not probability.size:
    raise ValueError(f"membrane_probability and label must be [H, W] or [N, H, W] arrays of one "
                     f"shape; got {probability.shape} and {label.shape}")
  if not np.all(np.isfinite(probability)):
    raise ValueError(f"membrane_probability holds {np.count_nonzero(~np.isfinite(probability))} "
                     f"NaN or infinite values; it must lie in [0, 1] (softmax channel 0)")
  if probability.min() < 0 or probability.max() > 1:
    raise ValueError(f"membrane_probability must lie in [0, 1] (softmax channel 0, the membrane "
                     f"class); got values from {probability.min()} to {probability.max()}")
  values = np.unique(label)
  if not np.isin(values, (0, 1)).all():
    raise ValueError(f"label must hold 0 (membrane) and 1 (cell) only; got values "
                     f"{values[:10].tolist()} (a 0/255 mask: pass mask // 255)")
  label = label.astype(np.int64).reshape((-1, *label.shape[-2:]))
  empty = [i for i, slice_label in enumerate(label) if not slice_label.any()]
  if empty:
    raise ValueError(f"label slice(s) {empty} have no cell pixel (value 1): the challenge's "
                     f"scores count pairs of cell pixels, so there is nothing to score")
  thresholds = np.asarray(thresholds, np.float64)
  if thresholds.ndim != 1 or not thresholds.size or not np.all(
      (thresholds >= 0) & (thresholds <= 1)):
    raise ValueError(f"thresholds must be a non-empty list of numbers in [0, 1]; got "
                     f"{thresholds.tolist()}")
  return probability.reshape(label.shape), label, thresholds


def challenge_sweep(membrane_probability: np.ndarray, label: np.ndarray, *,
                    thresholds=CHALLENGE_THRESHOLDS) -> dict[str, np.ndarray]:
  """The challenge's F-scores at each threshold of a membrane probability map.

  At threshold t a pixel is a cell where its membrane probability is below t (the
  challenge's rule, cell map > 1 − t, on the map it took, 1 = cell); t = 0.5 is the argmax
  decision. Over the slices of a stack, pixel and Rand counts are pooled (pairs formed within
  each slice), while V_rand and V_info (thinned) average the slices' scores — each as the
  organisers' scripts do it.

  Args:
    membrane_probability: ``[H, W]`` or ``[N, H, W]`` floats in [0, 1] (softmax channel 0).
    label: the same shape, 0 = membrane, 1 = cell.
    thresholds: ``[T]`` values in [0, 1].

  Returns:
    ``[T]`` arrays: ``thresholds``, ``pixel_f_score`` (of cell pixels), ``rand_f_score``
    (foreground-restricted, cells as 4-connected regions), ``v_rand_thinned`` and
    ``v_info_thinned`` (prediction boundaries thinned with ``thin_boundaries``).
  """
  probability, label, thresholds = _challenge_inputs(membrane_probability, label, thresholds)
  true_segments = [cell_segments(slice_label == 1) for slice_label in label]
  rows = []
  for threshold in thresholds:
    pixels, pairs, v_rand, v_info = np.zeros(3), np.zeros(3), [], []
    for slice_probability, slice_label, segments in zip(probability, label, true_segments):
      cells = slice_probability < threshold
      pixels += pixel_counts(cells, slice_label == 1)
      pairs += rand_pair_counts(segments, cell_segments(cells))
      thinned = thin_boundaries(cells)
      v_rand.append(rand_f_score(rand_pair_counts(segments, thinned)))
      v_info.append(information_f_score(segments, thinned))
    rows.append((pixel_f_score(pixels), rand_f_score(pairs), np.mean(v_rand), np.mean(v_info)))
  columns = np.array(rows, np.float64).T
  return dict(thresholds=thresholds, pixel_f_score=columns[0], rand_f_score=columns[1],
              v_rand_thinned=columns[2], v_info_thinned=columns[3])


def _best(values: np.ndarray, thresholds: np.ndarray, *, largest: bool) -> int:
  """Index of the best value; among equals the largest threshold, which is the one the
  challenge's scripts keep (they sweep their cell map upward, our threshold downward)."""
  values = values if largest else -values
  return max(range(len(values)), key=lambda i: (values[i], thresholds[i]))


def challenge_scores(membrane_probability: np.ndarray, label: np.ndarray, *,
                     thresholds=CHALLENGE_THRESHOLDS, warping: bool = True) -> dict[str, float]:
  """Scores of a membrane probability map as the ISBI 2012 challenge computes them.

  - ``pixel_error``: 1 − the maximal F-score of cell pixels over the thresholds (not 1 −
    accuracy, which ``summarize`` reports);
  - ``rand_error``: 1 − the maximal foreground-restricted Rand F-score (``rand_f_score``);
  - ``v_rand_thinned`` and ``v_info_thinned``: the maximal scores after border thinning
    (higher is better; the later leaderboard ranks by V_rand);
  - ``warping_error`` (if ``warping``): the minimal splits-and-mergers warping error
    (``unet_jax.warping``); the threshold that gives no cell at all is left out of its sweep.

  Each comes with the threshold that reached it (``pixel_threshold``, ``rand_threshold``,
  ``v_rand_threshold``, ``v_info_threshold``, ``warping_threshold``), a membrane
  probability: cells are the pixels below it. Inputs and pooling as ``challenge_sweep``.
  """
  sweep = challenge_sweep(membrane_probability, label, thresholds=thresholds)
  thresholds = sweep["thresholds"]
  scores = {}
  for name, column, threshold_name in (("pixel_error", "pixel_f_score", "pixel_threshold"),
                                       ("rand_error", "rand_f_score", "rand_threshold")):
    best = _best(sweep[column], thresholds, largest=True)
    scores[name], scores[threshold_name] = 1 - sweep[column][best], thresholds[best]
  for name, threshold_name in (("v_rand_thinned", "v_rand_threshold"),
                               ("v_info_thinned", "v_info_threshold")):
    best = _best(sweep[name], thresholds, largest=True)
    scores[name], scores[threshold_name] = sweep[name][best], thresholds[best]
  if warping:
    from unet_jax import warping as warping_error
    kept = thresholds[thresholds > 0]
    if not kept.size:
      raise ValueError(f"the warping error needs a threshold above 0 (at 0 no pixel is a cell); "
                       f"got thresholds {thresholds.tolist()}, or pass warping=False")
    errors = warping_error.warping_errors(membrane_probability, label, thresholds=kept)
    best = _best(errors, kept, largest=False)
    scores["warping_error"], scores["warping_threshold"] = errors[best], kept[best]
  return {name: float(value) for name, value in scores.items()}
