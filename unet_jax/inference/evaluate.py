"""Score a U-Net on a folder of images and label masks: pixel error, IoU, Dice, Rand error.

Each image is predicted whole with overlap-tile (``unet_jax.predict``) and compared with the
mask of the same file stem (``a.png`` ↔ ``a.png``/``a.tif``/...; the pages of a multi-page
TIFF pair with the pages of its mask). Totals come from the summed confusion matrix, so they
are exact over all pixels; the Rand error total is the mean over images. Command line::

  python -m unet_jax.evaluate --checkpoint workdir/ --images val/images --masks val/masks \
      --output results.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from unet_jax import metrics
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


def find_mask(image: pathlib.Path, masks: pathlib.Path) -> pathlib.Path:
  """The file in ``masks`` with the stem of ``image``."""
  found = [p for p in sorted(masks.glob(f"{image.stem}.*"))
           if p.suffix.lower() in images.IMAGE_SUFFIXES]
  if not found:
    raise FileNotFoundError(f"no mask for {image.name} in {masks} (expected {image.stem} with "
                            f"one of {', '.join(images.IMAGE_SUFFIXES)})")
  return found[0]


def evaluate_file(model, image_path: pathlib.Path, mask_path: pathlib.Path, *,
                  mask_map: dict[int, int] | None = None, foreground: int = 1,
                  **options) -> dict[str, tuple[dict[str, float], np.ndarray]]:
  """``{page name: (metrics, confusion matrix)}`` for every page of an image file."""
  pages, labels = images.read_image(image_path), images.read_image(mask_path, mask=True)
  if len(pages) != len(labels):
    raise ValueError(f"{image_path} has {len(pages)} page(s), its mask {mask_path} "
                     f"{len(labels)}")
  results = {}
  for name, page, label in zip(images.page_names(image_path.stem, len(pages)), pages, labels):
    image = images.match_channels(images.to_float(page, name=str(image_path)),
                                  model.in_channels, name=str(image_path))
    label = mask_to_classes(label, model.num_classes, mask_map, name=str(mask_path))
    if label.shape != image.shape[:2]:
      raise ValueError(f"{mask_path} is {label.shape[0]}×{label.shape[1]} but {image_path} is "
                       f"{image.shape[0]}×{image.shape[1]}")
    classes = predict.predict_image(model, image, **options).argmax(axis=-1)
    confusion = metrics.mask_confusion_matrix(classes, label, num_classes=model.num_classes)
    scores = metrics.summarize(confusion)
    scores["rand_error"] = metrics.rand_error(classes, label, foreground=foreground)
    results[name] = scores, confusion
  return results


def format_table(rows: dict[str, dict[str, float]], num_classes: int) -> str:
  """One line per image (and the total): pixel error, IoU per class, mean IoU, mean Dice,
  Rand error."""
  columns = (["pixel_error"] + [f"iou_{c}" for c in range(num_classes)]
             + ["mean_iou", "mean_dice", "rand_error"])
  width = max([5] + [len(name) for name in rows])
  lines = [f"{'image':<{width}}  " + "  ".join(f"{c:>11}" for c in columns)]
  for name, scores in rows.items():
    lines.append(f"{name:<{width}}  " + "  ".join(f"{scores[c]:>11.4f}" for c in columns))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m unet_jax.evaluate",
      description="Predict each image with overlap-tile and score it against its mask.")
  predict.add_prediction_flags(parser)
  parser.add_argument("--images", required=True, help="folder (or file) of images")
  parser.add_argument("--masks", required=True, help="folder of masks with the same stems")
  parser.add_argument("--mask-map", default=None, help="mask value → class, e.g. "
                      "'0:0,255:1' (default: {0,255} → {0,1} for two classes, else class ids)")
  parser.add_argument("--foreground", type=int, default=1,
                      help="the class whose connected regions the Rand error compares")
  parser.add_argument("--output", default=None, help="write the results to this JSON file")
  args = parser.parse_args(argv)
  masks = pathlib.Path(args.masks)
  try:
    mask_map = parse_mask_map(args.mask_map) if args.mask_map else None
    image_paths, unsupported = images.list_images(args.images)
    if not masks.is_dir():
      raise FileNotFoundError(f"the masks folder {masks} does not exist")
  except (OSError, ValueError) as error:
    parser.exit(2, f"error: {error}\n")
  model = predict.load_for_cli(parser, args.checkpoint, cpu_layer=args.cpu_layer)
  failures = {str(p): "unsupported file type" for p in unsupported}
  rows, total = {}, np.zeros((model.num_classes,) * 2, np.int64)
  for path in image_paths:
    try:
      results = evaluate_file(model, path, find_mask(path, masks), mask_map=mask_map,
                              foreground=args.foreground, tile_size=args.tile_size,
                              batch_size=args.batch_size, overlap=args.overlap, tta=args.tta)
    except Exception as error:  # one bad file must not stop the others
      failures[str(path)] = f"{type(error).__name__}: {error}"
      continue
    for name, (scores, confusion) in results.items():
      rows[name] = scores
      total += confusion
  if rows:
    rand = [s["rand_error"] for s in rows.values() if np.isfinite(s["rand_error"])]
    rows_total = {**metrics.summarize(total),
                  "rand_error": float(np.mean(rand)) if rand else float("nan")}
    print(format_table({**rows, "total": rows_total}, model.num_classes))
  else:
    rows_total = {}
  if args.output:
    results = {"checkpoint": args.checkpoint, "images": rows, "total": rows_total,
               "failed": failures}
    pathlib.Path(args.output).write_text(json.dumps(_finite(results), indent=2) + "\n")
  return predict.report_failures(failures)


if __name__ == "__main__":
  sys.exit(main())
