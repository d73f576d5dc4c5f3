"""Score a U-Net on a folder of images and label masks: pixel error, IoU, Dice, Rand error.

A 3-D model (``spatial_dims=3``) scores volumes instead (TIFF stacks, NIfTI, ``.npy``; see
``evaluate_volume_file``): ``--masks`` is then a folder of label volumes with the same stems.

Each image is predicted whole with overlap-tile (``unet_jax.predict``) and compared with the
mask of the same file stem (``a.png`` ↔ ``a.png``/``a.tif``/...; the pages of a multi-page
TIFF pair with the pages of its mask). Totals come from the summed confusion matrix, so they
are exact over all pixels; the Rand error total is the mean over images.

Scores follow the model's head (``unet_jax.heads``): a binary (one-channel sigmoid) model is
scored as background/foreground; a multi-label model per class, against a masks folder with
one subfolder of binary masks per class (``masks/<class name>/<stem>.png``, class names as
training logged them, or ``0``, ``1``, ...). Per-class IoU and Dice carry the class names the
training run logged (``iou_cell``), and ``foreground_dice`` averages the classes after the
background. Command line::

  python -m unet_jax.evaluate --checkpoint workdir/ --best --images val/images \
      --masks val/masks --output results.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

from unet_jax import heads, metrics
from unet_jax.inference import images, predict


def parse_mask_map(text: str) -> dict[int, int]:
  """``"0:0,255:1"`` → ``{0: 0, 255: 1}`` (mask value → class)."""
  try:
    pairs = [item.split(":") for item in text.split(",") if item.strip()]
    mapping = {int(value): int(label) for value, label in pairs}
  except ValueError:
    raise ValueError(f"--mask-map must look like '0:0,255:1' (value:class, ...), got "
                     f"{text!r}") from None
  if not mapping:
    raise ValueError("--mask-map is empty")
  return mapping


def mask_to_classes(mask: np.ndarray, num_classes: int, mapping: dict[int, int] | None = None,
                    *, name: str = "mask") -> np.ndarray:
  """Class ids ``[H, W]`` of a mask image.

  Without ``mapping``: a binary {0, 255} mask becomes {0, 1} for a two-class model; a mask of
  values below ``num_classes`` is taken as class ids. With it, every value must be mapped.
  """
  if mask.ndim == 3:
    if np.any(mask[..., :3] != mask[..., :1]):
      raise ValueError(f"{name}: colour masks are not supported; save class ids or gray "
                       f"values (and use --mask-map)")
    mask = mask[..., 0]
  values = np.unique(mask)
  if mapping is None:
    if num_classes == 2 and set(values.tolist()) <= {0, 255}:
      mapping = {0: 0, 255: 1}
    elif values.min() >= 0 and values.max() < num_classes:
      return mask.astype(np.int32)
    else:
      raise ValueError(f"{name}: mask values {_some(values)} are neither {{0, 255}} nor class "
                       f"ids below {num_classes}; pass --mask-map, e.g. '0:0,128:1,255:2'")
  unknown = [v for v in values.tolist() if v not in mapping]
  if unknown:
    raise ValueError(f"{name}: mask values {_some(unknown)} are not in the mask map {mapping}")
  bad = {v: c for v, c in mapping.items() if not 0 <= c < num_classes}
  if bad:
    raise ValueError(f"mask map {bad}: classes must be in 0..{num_classes - 1}")
  lookup = np.zeros(int(values.max()) + 1, np.int32)
  for value, label in mapping.items():
    if 0 <= value < len(lookup):
      lookup[value] = label
  return lookup[mask]


def _finite(tree):
  """NaN → None, so the JSON is standard."""
  if isinstance(tree, dict):
    return {k: _finite(v) for k, v in tree.items()}
  return None if isinstance(tree, float) and not np.isfinite(tree) else tree


def _some(values) -> str:
  values = list(values)
  return ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")


def class_folders(masks: pathlib.Path, class_names: list[str]) -> list[pathlib.Path]:
  """A multi-label model's masks: one subfolder per class, by name (or index)."""
  folders = []
  for index, name in enumerate(class_names):
    found = [masks / name, masks / str(index)]
    folder = next((f for f in found if f.is_dir()), None)
    if folder is None:
      raise FileNotFoundError(f"a multi-label model needs one folder of binary masks per "
                              f"class; {masks} has no {name}/ (or {index}/) for class "
                              f"{index}")
    folders.append(folder)
  return folders


def find_mask(image: pathlib.Path, masks: pathlib.Path) -> pathlib.Path:
  """The file in ``masks`` with the stem of ``image``."""
  found = [p for p in sorted(masks.glob(f"{image.stem}.*"))
           if p.suffix.lower() in images.IMAGE_SUFFIXES]
  if not found:
    raise FileNotFoundError(f"no mask for {image.name} in {masks} (expected {image.stem} with "
                            f"one of {', '.join(images.IMAGE_SUFFIXES)})")
  return found[0]


def class_names_for(model, names: tuple[str, ...] | None) -> tuple[str, ...]:
  """The names of the classes a decision is scored in: the checkpoint's, else numbers."""
  count = (model.num_classes if heads.is_multilabel(model.activation, model.num_classes)
           else heads.metric_classes(model.activation, model.num_classes))
  if names and len(names) == count:
    return tuple(names)
  return tuple(str(c) for c in range(count))


def evaluate_file(model, image_path: pathlib.Path, mask_path: pathlib.Path | list, *,
                  mask_map: dict[int, int] | None = None, foreground: int = 1,
                  class_names: tuple[str, ...] | None = None,
                  **options) -> dict[str, tuple[dict[str, float], np.ndarray]]:
  """``{page name: (metrics, confusion matrix)}`` for every page of an image file.

  ``mask_path`` is one mask file, or for a multi-label model one binary mask file per class.
  """
  multilabel = heads.is_multilabel(model.activation, model.num_classes)
  names = class_names_for(model, class_names)
  mask_paths = list(mask_path) if multilabel else [mask_path]
  pages = images.read_image(image_path)
  label_pages = [images.read_image(p, mask=True) for p in mask_paths]
  for path, labels in zip(mask_paths, label_pages):
    if len(pages) != len(labels):
      raise ValueError(f"{image_path} has {len(pages)} page(s), its mask {path} {len(labels)}")
  results = {}
  for index, name in enumerate(images.page_names(image_path.stem, len(pages))):
    image = images.match_channels(images.to_float(pages[index], name=str(image_path)),
                                  model.in_channels, name=str(image_path))
    classes_of = 2 if multilabel else heads.metric_classes(model.activation, model.num_classes)
    labels = [mask_to_classes(pages_[index], classes_of, mask_map, name=str(path))
              for path, pages_ in zip(mask_paths, label_pages)]
    for path, label in zip(mask_paths, labels):
      if label.shape != image.shape[:2]:
        raise ValueError(f"{path} is {label.shape[0]}×{label.shape[1]} but {image_path} is "
                         f"{image.shape[0]}×{image.shape[1]}")
    decisions = heads.decide(predict.predict_image(model, image, **options), model.activation)
    if multilabel:
      confusion = np.stack([metrics.mask_confusion_matrix(decisions[..., c].astype(np.int32),
                                                          label, num_classes=2)
                            for c, label in enumerate(labels)])
      scores = metrics.summarize(confusion, class_names=names)
    else:
      confusion = metrics.mask_confusion_matrix(decisions, labels[0], num_classes=classes_of)
      scores = metrics.summarize(confusion, class_names=names)
      scores["rand_error"] = metrics.rand_error(decisions, labels[0], foreground=foreground)
    results[name] = scores, confusion
  return results


def find_label_volume(volume: pathlib.Path, labels: pathlib.Path,
                      label_files: list[pathlib.Path]) -> pathlib.Path:
  """The first of ``label_files`` (the volumes of the folder ``labels``, listed once by the
  caller) with the volume stem of ``volume`` (``a.nii.gz`` ↔ ``a.tif``)."""
  from unet_jax.data import volumes
  stem = volumes.volume_stem(volume)
  found = [p for p in label_files if volumes.volume_stem(p) == stem]
  if not found:
    raise FileNotFoundError(f"no label volume for {volume.name} in {labels} (expected {stem} "
                            f"with one of {', '.join(volumes.VOLUME_SUFFIXES)})")
  return found[0]


def evaluate_volume_file(model, volume_path: pathlib.Path, label_path: pathlib.Path, *,
                         mask_map: dict[int, int] | None = None, foreground: int = 1,
                         class_names: tuple[str, ...] | None = None, intensity: str = "auto",
                         **options) -> dict[str, tuple[dict[str, float], np.ndarray]]:
  """``{stem: (metrics, confusion matrix)}`` for one volume of a 3-D model.

  The volume is read and scaled as training does (``volumes.to_unit_volume``, ``intensity``)
  and predicted whole with overlap-tile (``predict_volume``; ``options``); the label volume's
  values are classes, or go through ``mask_map`` (value → class). Voxels labelled with a
  negative value (sparse annotation) are not scored. The Rand error compares the 6-connected
  regions of ``foreground``.
  """
  from unet_jax.data import volumes
  if heads.is_multilabel(model.activation, model.num_classes):
    raise ValueError("scoring volumes of a multi-label model is not supported; score each "
                     "class's mask written by `python -m unet_jax.predict` instead")
  classes = heads.metric_classes(model.activation, model.num_classes)
  names = class_names_for(model, class_names)
  volume = volumes.to_unit_volume(volumes.read_volume(volume_path), model.in_channels,
                                  name=str(volume_path), intensity=intensity)
  raw = np.asarray(volumes.read_volume(label_path))
  label = volumes.to_label_volume(raw, None, np.unique(raw[raw < 0]).tolist(),
                                  name=str(label_path))
  del raw
  scored = label >= 0  # negative: unlabelled (sparse annotation)
  if scored.any():
    label[scored] = mask_to_classes(label[scored], classes, mask_map, name=str(label_path))
  if label.shape != volume.shape[:3]:
    raise ValueError(f"{label_path} is {'×'.join(map(str, label.shape))} but {volume_path} is "
                     f"{'×'.join(map(str, volume.shape[:3]))} (D×H×W)")
  decisions = heads.decide(predict.predict_volume(model, volume, **options), model.activation)
  confusion = metrics.mask_confusion_matrix(decisions, label, num_classes=classes)
  scores = metrics.summarize(confusion, class_names=names)
  scores["rand_error"] = metrics.rand_error(np.where(scored, decisions, 0),
                                            np.where(scored, label, 0), foreground=foreground)
  return {volumes.volume_stem(volume_path): (scores, confusion)}


def columns_for(names: tuple[str, ...], multilabel: bool) -> list[str]:
  """The table's columns: pixel error, IoU per class, Dice per foreground class, foreground
  Dice, mean Dice (all classes), and the Rand error (not for multi-label models)."""
  foreground = names if multilabel else names[1:]
  columns = (["pixel_error"] + [f"iou_{c}" for c in names] + [f"dice_{c}" for c in foreground]
             + ["foreground_dice", "mean_dice"])
  return columns if multilabel else columns + ["rand_error"]


def format_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
  """One line per image (and the total), a column per entry of ``columns``."""
  width = max([5] + [len(name) for name in rows])
  widths = [max(11, len(c)) for c in columns]
  lines = [f"{'image':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
  for name, scores in rows.items():
    lines.append(f"{name:<{width}}  " + "  ".join(
        f"{scores.get(c, float('nan')):>{w}.4f}" for c, w in zip(columns, widths)))
  return "\n".join(lines)


def _printable(text: str, stream=None) -> str:
  """``text`` as ``stream`` can encode it (file names need not be valid in the locale)."""
  encoding = getattr(stream or sys.stdout, "encoding", None) or "utf-8"
  text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
  return text.encode(encoding, "backslashreplace").decode(encoding)


def main(argv: list[str] | None = None) -> int:
  from unet_jax.data import volumes
  parser = argparse.ArgumentParser(
      prog="python -m unet_jax.evaluate",
      description="Predict each image (or volume, for a 3-D checkpoint) with overlap-tile "
                  "and score it against its mask (label volume).")
  predict.add_prediction_flags(parser)
  parser.add_argument("--images", required=True, help="folder (or file) of images")
  parser.add_argument("--masks", required=True, help="folder of masks with the same stems")
  parser.add_argument("--mask-map", default=None, help="mask value → class, e.g. "
                      "'0:0,255:1' (default: {0,255} → {0,1} for two classes, else class ids)")
  parser.add_argument("--foreground", type=int, default=1,
                      help="the class whose connected regions the Rand error compares")
  parser.add_argument("--output", default=None, help="write the results to this JSON file")
  parser.set_defaults(batch_size=None)  # 4 image tiles or 1 volume tile per call
  parser.add_argument("--intensity", default=None, choices=volumes.INTENSITIES,
                      help="3-D models: how volume values become [0, 1] (unet_jax.data.volumes;"
                      " default: the training run's data.volumes.intensity, else auto)")
  args = parser.parse_args(argv)
  masks = pathlib.Path(args.masks)
  try:
    mask_map = parse_mask_map(args.mask_map) if args.mask_map else None
    with predict.warnings_as_lines():
      image_paths, unsupported = predict.list_inputs(args.images)
    if not masks.is_dir():
      raise FileNotFoundError(f"the masks folder {masks} does not exist")
    if args.output:
      _check_output_file(pathlib.Path(args.output))
  except (OSError, ValueError) as error:
    parser.exit(2, f"error: {error}\n")
  model, loaded = predict.load_for_cli(parser, args.checkpoint, cpu_layer=args.cpu_layer,
                                       step=args.step, best=args.best,
                                       allow_nonfinite=args.allow_nonfinite,
                                       max_pixels=args.max_pixels)
  multilabel = heads.is_multilabel(model.activation, model.num_classes)
  names = class_names_for(model, loaded.class_names)
  volumetric = model.spatial_dims == 3
  try:
    per_class = class_folders(masks, list(names)) if multilabel and not volumetric else None
  except OSError as error:
    parser.exit(2, f"error: {error}\n")
  failures = {str(p): "unsupported file type" for p in unsupported}
  fits = predict._is_volume if volumetric else predict._is_image  # .tif fits both
  wrong_kind = [p for p in image_paths if not fits(p)]
  for path in wrong_kind:
    failures[str(path)] = (f"a {'volume' if volumetric else 'image'} file is needed: this U-Net "
                           f"is {model.spatial_dims}-D")
  image_paths = [p for p in image_paths if p not in wrong_kind]
  options = dict(tile_size=args.tile_size, overlap=args.overlap, tta=args.tta,
                 batch_size=args.batch_size or (1 if volumetric else 4))
  label_files = sorted(volumes.list_volumes(masks).files) if volumetric else []
  rows, total = {}, None
  for path in image_paths:
    try:
      if volumetric:
        results = evaluate_volume_file(
            model, path, find_label_volume(path, masks, label_files), mask_map=mask_map,
            class_names=names, foreground=args.foreground,
            intensity=args.intensity or loaded.intensity or "auto", **options)
      else:
        mask = ([find_mask(path, folder) for folder in per_class] if multilabel
                else find_mask(path, masks))
        results = evaluate_file(model, path, mask, mask_map=mask_map, class_names=names,
                                foreground=args.foreground, **options)
    except Exception as error:  # one bad file must not stop the others
      failures[str(path)] = f"{type(error).__name__}: {error}"
      continue
    for name, (scores, confusion) in results.items():
      rows[name] = scores
      total = confusion.astype(np.int64) if total is None else total + confusion
  rows_total = {}
  if rows:
    rows_total = metrics.summarize(total, class_names=names)
    if not multilabel:
      rand = [s["rand_error"] for s in rows.values() if np.isfinite(s["rand_error"])]
      rows_total["rand_error"] = float(np.mean(rand)) if rand else float("nan")
  if args.output:  # written first: nothing printed later can lose it
    results = {"checkpoint": args.checkpoint, "step": loaded.step, "class_names": list(names),
               "images": rows, "total": rows_total, "failed": failures}
    pathlib.Path(args.output).write_text(json.dumps(_finite(results), indent=2) + "\n")
  if rows:
    table = format_table({**rows, "total": rows_total}, columns_for(names, multilabel))
    print(_printable(table))
    print("foreground_dice averages every class" if multilabel else
          "foreground_dice averages the classes after the background; mean_dice (and "
          "mean_iou in the JSON) include the background")
  return predict.report_failures({_printable(k, sys.stderr): v for k, v in failures.items()})


def _check_output_file(path: pathlib.Path) -> None:
  """Fail before any compute if the JSON cannot be written there."""
  if path.is_dir():
    raise IsADirectoryError(f"--output {path} is a folder; name a file such as "
                            f"{path / 'results.json'}")
  folder = path.parent if str(path.parent) else pathlib.Path(".")
  if not folder.is_dir():
    raise FileNotFoundError(f"--output {path}: the folder {folder} does not exist")
  if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
    raise PermissionError(f"--output {path} cannot be written (permission denied)")


if __name__ == "__main__":
  sys.exit(main())
