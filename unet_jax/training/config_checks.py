"""The values of a training config, checked before anything is built or computed.

A bad number otherwise fails late or not at all: ``eval_every=0`` is a ``ZeroDivisionError``
at the first step, ``num_steps=-1`` trains nothing and exits cleanly, a negative learning rate
climbs the loss. :func:`check_config` finds every such value at once and raises one
``ValueError`` listing them, each line naming the field as it is set on the command line
(``--config.eval_every``), the value seen and what would be valid. Fields a config does not
have are not checked (each source has its own section of ``config.data``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import ml_collections

from unet_jax.geometry import as_sizes

# A rule: whether a value is valid, and what a valid value is (for the message).
Rule = tuple[Callable[[Any], bool], str]


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int) -> Rule:
  return (lambda v: _is_int(v) and v >= low), f"an integer ≥ {low}"


def number(low: float, high: float | None = None, *, open_low: bool = False,
           open_high: bool = False) -> Rule:
  """A finite number in ``[low, high]`` (``(`` / ``)`` where ``open_low`` / ``open_high``)."""
  def ok(v) -> bool:
    return (_is_finite(v) and (v > low if open_low else v >= low)
            and (high is None or (v < high if open_high else v <= high)))
  if high is None:
    return ok, f"a finite number {'>' if open_low else '≥'} {low:g}"
  return ok, (f"a number in {'(' if open_low else '['}{low:g}, {high:g}"
              f"{')' if open_high else ']'}")


def optional(rule: Rule, meaning: str) -> Rule:
  ok, valid = rule
  return (lambda v: v is None or ok(v)), f"{valid}, or None ({meaning})"


def size() -> Rule:
  def ok(v) -> bool:
    for spatial_dims in (2, 3):
      try:
        if min(as_sizes(v, spatial_dims)) >= 1:
          return True
      except ValueError:
        pass
    return False
  return ok, ("(height, width) or (depth, height, width): integers ≥ 1, or one integer for a "
              "square or a cube")


def widths() -> Rule:
  ok = lambda v: (isinstance(v, (tuple, list)) and len(v) >= 2
                  and all(_is_int(n) and n >= 1 for n in v))
  return ok, "at least two integers ≥ 1, one per level (top level first)"


def one_of(*choices: str) -> Rule:
  return (lambda v: v in choices), " or ".join(repr(c) for c in choices)


RULES: dict[str, Rule] = {
    "num_steps": integer(1),
    "batch_size": integer(1),
    "log_every": integer(1),
    "eval_every": integer(1),
    "checkpoint.every": integer(1),
    "checkpoint.max_to_keep": integer(1),
    "checkpoint.keep_best": integer(0),
    "checkpoint.best_mode": one_of("max", "min"),
    "data.max_pixels": optional(integer(1), "178,956,970, Pillow's limit"),
    "model.activation": optional(one_of("softmax", "sigmoid"),
                                 "sigmoid for one class, softmax otherwise"),
    "checkpoint.restore_step": optional(integer(0), "resume from the latest checkpoint"),
    "optimizer.learning_rate": number(0, open_low=True),
    "optimizer.warmup_steps": integer(0),
    "optimizer.momentum": number(0, 1, open_high=True),
    "optimizer.weight_decay": number(0),
    "optimizer.grad_clip_norm": optional(number(0), "no clipping; 0 also turns it off"),
    "loss.ce_weight": number(0),
    "loss.dice_weight": number(0),
    "model.in_channels": integer(1),
    "model.num_classes": integer(1),
    "model.features": widths(),
    "model.dropout": number(0, 1, open_high=True),
    "data.seed": integer(0),
    "data.channels": integer(1),
    "data.num_train": integer(1),
    "data.num_val": integer(1),
    "data.image_size": size(),
    "data.tile_size": size(),
    "data.num_threads": integer(0),
    "data.num_workers": integer(0),
    "data.prefetch": integer(0),
    "data.augment.shift": integer(0),
    "data.augment.elastic_sigma": number(0),
    "data.augment.elastic_grid": integer(2),
    "data.augment.elastic_spacing": optional(number(0, open_low=True),
                                             "elastic_grid control points per axis"),
    "data.sparse_labels.every": integer(0),
    "data.sparse_labels.axis": integer(0),
    "data.sparse_labels.offset": integer(0),
    "data.synthetic3d.num_train": integer(1),
    "data.synthetic3d.num_val": integer(1),
    "data.synthetic3d.size": size(),
    "data.synthetic3d.seed": integer(0),
    "model.spatial_dims": one_of(2, 3),
    "data.cache_mb": number(0),
    "data.augment.brightness": number(0, 1),
    "data.augment.contrast": number(0, 1),
    "data.weight_map.w0": number(0),
    "data.weight_map.sigma": number(0, open_low=True),
    "data.folder.split_seed": integer(0),
}


def check_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
  """Raise one ``ValueError`` listing every invalid value of ``config`` (a training config,
  as in ``configs/``); ``num_devices``, when given, must divide ``batch_size``."""
  problems = []
  for field, (ok, valid) in RULES.items():
    found, value = _lookup(config, field)
    if found and not ok(value):
      problems.append(f"--config.{field} is {value!r}; it must be {valid}")
  problems += _agreement(config, num_devices)
  if problems:
    raise ValueError(f"{len(problems)} invalid config value(s):\n  " + "\n  ".join(problems))


def _agreement(config: ml_collections.ConfigDict, num_devices: int | None) -> list[str]:
  """Problems between fields that are each valid alone."""
  problems = []
  batch, classes = config.get("batch_size"), config.get("model", {}).get("num_classes")
  data = config.get("data", {})
  if num_devices and _is_int(batch) and batch >= 1 and batch % num_devices:
    problems.append(f"--config.batch_size: the global batch size {batch} does not divide "
                    f"evenly over {num_devices} devices; use a multiple of {num_devices}")
  names = data.get("class_names")
  if names and _is_int(classes) and classes >= 2 and len(names) != classes:
    problems.append(f"--config.data.class_names has {len(names)} name(s) {tuple(names)} but "
                    f"--config.model.num_classes is {classes}; give one name per class")
  activation = config.get("model", {}).get("activation")
  problems += _volume_agreement(config)
  if names and classes == 1 and len(names) != 2:
    problems.append(f"--config.data.class_names has {len(names)} name(s) {tuple(names)}; a "
                    f"binary model (--config.model.num_classes=1) is scored as two classes: "
                    f"give two names, background first")
  multilabel = activation == "sigmoid" and _is_int(classes) and classes >= 2
  class_masks = tuple(data.get("folder", {}).get("class_masks") or ())
  if class_masks and data.get("source") == "folder" and not (
      multilabel and len(class_masks) == classes):
    problems.append(f"--config.data.folder.class_masks lists {len(class_masks)} class mask "
                    f"folder(s), which is multi-label data: it needs "
                    f"--config.model.activation=sigmoid and --config.model.num_classes="
                    f"{len(class_masks)} (got {activation!r} and {classes!r})")
  if multilabel and data.get("weight_map", {}).get("enabled"):
    problems.append("--config.data.weight_map.enabled: the border weight map separates "
                    "touching objects of one class; it is not defined for multi-label "
                    "models (--config.model.activation=sigmoid with several classes)")
  in_channels = config.get("model", {}).get("in_channels")
  if "channels" in data and in_channels is not None and data.channels != in_channels:
    problems.append(f"--config.data.channels is {data.channels!r}: the data has "
                    f"{data.channels!r} channel(s) but the model takes {in_channels!r} "
                    f"(--config.model.in_channels); set both to the same value")
  weight_map = data.get("weight_map", {})
  foreground = weight_map.get("foreground")
  if (weight_map.get("enabled") and _is_int(classes) and classes >= 1
      and not (_is_int(foreground) and 0 <= foreground < max(classes, 2))):
    problems.append(f"--config.data.weight_map.foreground is {foreground!r}; it must be a "
                    f"class, an integer in 0 … {max(classes, 2) - 1}")
  folder = data.get("folder", {})
  held_out, _ = number(0, 1, open_low=True, open_high=True)
  if ("val_fraction" in folder and data.get("source") == "folder"
      and not folder.get("val_dir") and not held_out(folder.val_fraction)):
    problems.append(f"--config.data.folder.val_fraction is {folder.get('val_fraction')!r}; "
                    f"without data.folder.val_dir it must be a number in (0, 1), the share "
                    f"of the pairs held out for validation")
  return problems


def _volume_agreement(config: ml_collections.ConfigDict) -> list[str]:
  """Problems between the model's spatial dimensions, the data and the loss."""
  problems = []
  model, data = config.get("model", {}), config.get("data", {})
  spatial_dims, source = model.get("spatial_dims", 2), data.get("source")
  if spatial_dims not in (2, 3):
    return problems
  volumes = ("volumes", "synthetic3d")
  if source is not None and (source in volumes) != (spatial_dims == 3):
    kinds = ("volumes", "a volume source (volumes, synthetic3d)") if spatial_dims == 3 else (
        "images", "an image source")
    problems.append(f"--config.data.source is {source!r} but --config.model.spatial_dims is "
                    f"{spatial_dims}: a model of {kinds[0]} needs {kinds[1]}")
  tile = data.get("tile_size")
  if tile is not None and size()[0](tile):
    try:
      as_sizes(tile, spatial_dims)
    except ValueError:
      axes = "(depth, height, width)" if spatial_dims == 3 else "(height, width)"
      problems.append(f"--config.data.tile_size is {tile!r}; it must be {axes} or one "
                      f"integer for a model with spatial_dims={spatial_dims}")
  if spatial_dims == 3 and data.get("weight_map", {}).get("enabled"):
    problems.append("--config.data.weight_map.enabled: the border weight map is 2-D; for "
                    "volumes weight the classes instead (--config.loss.class_weights)")
  class_weights = config.get("loss", {}).get("class_weights")
  classes, activation = model.get("num_classes"), model.get("activation")
  if class_weights is not None and _is_int(classes):
    if activation == "sigmoid" and classes >= 2:
      problems.append("--config.loss.class_weights: not defined for multi-label models "
                      "(--config.model.activation=sigmoid with several classes)")
    elif not (isinstance(class_weights, (tuple, list))
              and len(class_weights) == max(classes, 2)
              and all(_is_finite(w) and w >= 0 for w in class_weights)):
      problems.append(f"--config.loss.class_weights is {class_weights!r}; it must be "
                      f"{max(classes, 2)} finite numbers ≥ 0, one per class (background first)")
  return problems


def _lookup(config: ml_collections.ConfigDict, field: str) -> tuple[bool, Any]:
  """``(True, value)`` of a dotted ``field``, ``(False, None)`` where the config lacks it."""
  value: Any = config
  for key in field.split("."):
    if not isinstance(value, (ml_collections.ConfigDict, dict)) or key not in value:
      return False, None
    value = value[key]
  return True, value
