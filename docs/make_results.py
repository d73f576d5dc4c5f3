"""Score a trained ISBI 2012 run on its hold-out slices, both ways, and draw the report's figures.

  python docs/make_results.py --workdir runs/isbi2012_small --data-dir DIR --out docs/figures

Predicts every hold-out slice (25–29 unless the run's config says otherwise) whole, with the
overlap-tile strategy, and prints two markdown tables:

- the scores of the argmax decision: pixel error (1 − accuracy), the foreground-restricted Rand
  error of the 4-connected cells, membrane IoU;
- the scores as the ISBI 2012 challenge computes them from the membrane probability
  (``unet_jax.metrics.challenge_scores``): pixel error and Rand error as 1 − the maximal
  F-score over thresholds 0.0, 0.1, …, 1.0, V_rand and V_info after border thinning, and the
  splits-and-mergers warping error, each with the threshold that reached it; then the figures
  at every threshold.

It also writes two PNGs: the training curves from ``metrics.jsonl`` and a corner of two
hold-out slices (image | label | prediction). Drawing needs matplotlib:
``pip install -e ".[docs]"``.
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

from unet_jax import metrics, warping  # noqa: E402
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


def argmax_table(probabilities: np.ndarray, labels: np.ndarray) -> str:
  """The scores of the argmax decision, as the report gave them before."""
  predicted = probabilities.argmax(-1)
  confusion = sum(metrics.mask_confusion_matrix(p, l, num_classes=2)
                  for p, l in zip(predicted, labels))
  summary = metrics.summarize(confusion, class_names=("membrane", "cell"))
  rand = np.nanmean([metrics.rand_error(p, l) for p, l in zip(predicted, labels)])
  return ("| pixel error (1 − accuracy) | Rand error | membrane IoU |\n| --- | --- | --- |\n"
          f"| {summary['pixel_error']:.4f} | {rand:.4f} | {summary['iou_membrane']:.4f} |")


def challenge_tables(membrane: np.ndarray, labels: np.ndarray) -> str:
  """The challenge's scores with the thresholds that reached them, then every threshold."""
  scores = metrics.challenge_scores(membrane, labels)
  reached = [f"{scores[name]:.{digits}f} (t = {scores[threshold]:.1f})"
             for name, threshold, digits in (
                 ("pixel_error", "pixel_threshold", 4), ("rand_error", "rand_threshold", 4),
                 ("warping_error", "warping_threshold", 6),
                 ("v_rand_thinned", "v_rand_threshold", 4),
                 ("v_info_thinned", "v_info_threshold", 4))]
  sweep = metrics.challenge_sweep(membrane, labels)
  thresholds = sweep["thresholds"]
  warping_errors = dict(zip(thresholds[1:], warping.warping_errors(
      membrane, labels, thresholds=thresholds[1:])))  # at t = 0 no pixel is a cell
  lines = ["| pixel error | Rand error | warping error | V_rand (thinned) | V_info (thinned) |",
           "| --- | --- | --- | --- | --- |",
           "| " + " | ".join(reached) + " |",
           "",
           "| t | 1 − pixel F-score | 1 − Rand F-score | warping error | V_rand (thinned) "
           "| V_info (thinned) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for i, threshold in enumerate(thresholds):
    warping_error = f"{warping_errors[threshold]:.6f}" if threshold in warping_errors else "—"
    lines.append(f"| {threshold:.1f} | {1 - sweep['pixel_f_score'][i]:.4f} | "
                 f"{1 - sweep['rand_f_score'][i]:.4f} | {warping_error} | "
                 f"{sweep['v_rand_thinned'][i]:.4f} | {sweep['v_info_thinned'][i]:.4f} |")
  return "\n".join(lines)


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

  start = time.perf_counter()
  examples = [holdout[index] for index in range(len(holdout))]
  probabilities = np.stack([predict_image(model, e["image"]) for e in examples])
  if probabilities.shape[-1] != 2:
    raise SystemExit(f"this report scores a two-class softmax model (0 = membrane, 1 = cell); "
                     f"{args.workdir} predicts {probabilities.shape[-1]} channel(s)")
  membrane = probabilities[..., 0]  # softmax channel 0: the membrane class
  labels = np.stack([e["label"] for e in examples])
  predicted = time.perf_counter()
  print(f"{len(examples)} hold-out slices, predicted in {predicted - start:.1f} s\n")
  print("Argmax decision:\n")
  print(argmax_table(probabilities, labels))
  print("\nAs the ISBI 2012 challenge scores (t: membrane probability below which a pixel is a "
        "cell):\n")
  print(challenge_tables(membrane, labels))
  print(f"\nscored in {time.perf_counter() - predicted:.1f} s")

  # A 256×256 corner of two slices: enough to judge the membranes, not a copy of the data.
  shown = [(e["image"][..., 0], e["label"], p.argmax(-1))
           for e, p in zip(examples[:2], probabilities)]
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
