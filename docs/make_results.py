"""Evaluate a trained ISBI 2012 run on its hold-out slices and draw the report's figures.

  python docs/make_results.py --workdir runs/isbi2012_small --data-dir DIR --out docs/figures

Predicts every hold-out slice (25–29 unless the run's config says otherwise) whole, with the
overlap-tile strategy, and prints the pixel error, the foreground-restricted Rand error and
the membrane IoU over the hold-out (a markdown table), and writes two PNGs: the training
curves from ``metrics.jsonl`` and a corner of two hold-out slices (image | label | prediction).
Drawing needs matplotlib: ``pip install -e ".[docs]"``.
"""

import argparse
import json
import pathlib
import time

try:
  import matplotlib
except ImportError as error:
  raise SystemExit('docs/make_results.py draws with matplotlib: pip install -e ".[docs]"') from error

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from unet_jax import metrics  # noqa: E402
from unet_jax.training.checkpoint import load_model  # noqa: E402
from unet_jax.data import isbi2012  # noqa: E402
from unet_jax.inference.predict import predict_image  # noqa: E402


def curves(workdir: pathlib.Path, out: pathlib.Path) -> None:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
  left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
  left.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
  left.set_xlabel("step"), left.set_yscale("log"), left.legend()
  right.plot([r["step"] for r in evals], [r["pixel_error"] for r in evals], "o-",
             label="validation pixel error")
  right.plot([r["step"] for r in evals], [1 - r["iou_membrane"] for r in evals], "s-",
             label="1 − membrane IoU")
  right.set_xlabel("step"), right.legend()
  fig.tight_layout()
  fig.savefig(out / "isbi2012_curves.png", dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--out", default="docs/figures", type=pathlib.Path)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  model, _ = load_model(args.workdir)
  train_config = json.loads((args.workdir / "config.json").read_text())["train"]
  section = ml_collections.ConfigDict(train_config["data"]["isbi2012"])
  section.dir = args.data_dir
  holdout = isbi2012.from_config(section, "validation", channels=1)

  confusion, rand, panels = np.zeros((2, 2), np.int64), [], []
  start = time.perf_counter()
  for index in range(len(holdout)):
    example = holdout[index]
    predicted = predict_image(model, example["image"]).argmax(-1)
    confusion += metrics.mask_confusion_matrix(predicted, example["label"], num_classes=2)
    rand.append(metrics.rand_error(predicted, example["label"]))
    panels.append((example["image"][..., 0], example["label"], predicted))
  seconds = time.perf_counter() - start
  summary = metrics.summarize(confusion, class_names=("membrane", "cell"))
  print("| pixel error | Rand error | membrane IoU | hold-out slices | prediction time |")
  print("| --- | --- | --- | --- | --- |")
  print(f"| {summary['pixel_error']:.4f} | {np.nanmean(rand):.4f} | "
        f"{summary['iou_membrane']:.4f} | {len(holdout)} | {seconds:.1f} s |")

  # A 256×256 corner of two slices: enough to judge the membranes, not a copy of the data.
  shown = panels[:2]
  fig, axes = plt.subplots(len(shown), 3, figsize=(7.5, 2.6 * len(shown)))
  for row, pictures in zip(np.atleast_2d(axes), shown):
    pictures = [p[:256, :256] for p in pictures]
    for ax, picture, title in zip(row, pictures,
                                  ("hold-out slice", "label", "prediction")):
      ax.imshow(picture, cmap="gray"), ax.set_title(title), ax.axis("off")
  fig.tight_layout()
  fig.savefig(args.out / "isbi2012_holdout.png", dpi=72)
  curves(args.workdir, args.out)


if __name__ == "__main__":
  main()
