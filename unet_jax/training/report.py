"""What a training run shows and leaves behind: a progress bar, eval lines, TensorBoard
scalars and image grids, ``metrics.jsonl`` and a PNG of validation predictions.

Only process 0 writes; on the others every method is a no-op.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from unet_jax import heads, metrics
from unet_jax.training import parallel


def _summary_writer_class():
  """tensorboardX's ``SummaryWriter``, imported without importing PyTorch.

  tensorboardX imports torch whenever it is installed, only so that it can take torch tensors;
  we hand it numbers and numpy arrays. Where torch is installed and not yet imported, that
  import alone cost a training run 3 s and 200 MB, so it is hidden for the moment of
  importing tensorboardX (as if torch were not installed, which tensorboardX supports) and
  then made importable again.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class Reporter:

  def __init__(self, workdir: pathlib.Path, config, model_kwargs: dict[str, Any], *,
               start_step: int):
    self.enabled = jax.process_index() == 0
    self.workdir, self.log_every = workdir, config.log_every
    self.num_classes = model_kwargs["num_classes"]
    self.activation = heads.resolve(model_kwargs.get("activation"), self.num_classes)
    self.class_names = config.data.class_names
    if not self.enabled:
      return
    SummaryWriter = _summary_writer_class()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(
        {"model": model_kwargs, "train": config.to_dict()}, indent=2, default=str) + "\n")
    self.writer = SummaryWriter(str(workdir / "tensorboard"))
    self.jsonl = open(workdir / "metrics.jsonl", "a")
    self.bar = tqdm(total=config.num_steps, initial=start_step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=1.0)
    self.window_start, self.window_steps = time.perf_counter(), 0

  def _record(self, step: int, split: str, values: dict[str, float]) -> None:
    for name, value in values.items():
      self.writer.add_scalar(f"{split}/{name}", value, step)
    self.jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    self.jsonl.flush()

  def train_step(self, step: int, measurements: dict[str, jax.Array]) -> None:
    if not self.enabled:
      return
    self.bar.update(1)
    self.window_steps += 1
    if step % self.log_every:
      return
    values = {k: float(v) for k, v in measurements.items()
              if k not in ("confusion", "bad_pixels", "bad_labels")}
    values.update(metrics.summarize(np.asarray(measurements["confusion"]),
                                    class_names=self.class_names))
    elapsed = time.perf_counter() - self.window_start
    values["steps_per_second"] = self.window_steps / max(elapsed, 1e-9)
    self.window_start, self.window_steps = time.perf_counter(), 0
    self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    self._record(step, "train", values)

  def eval(self, step: int, values: dict[str, float], state, predict_fn, batches, mesh) -> None:
    """Log eval metrics, and an image grid of the first validation batch."""
    batch = next(iter(batches))
    probabilities = predict_fn(state, parallel.shard_batch({"image": batch["image"]}, mesh)["image"])
    if not self.enabled:
      return
    shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items()
                      if k in ("loss", "pixel_error", "foreground_dice")
                      or k.startswith("iou_"))
    self.bar.write(f"eval @ step {step}: {shown}")
    self._record(step, "eval", values)
    local = np.concatenate([np.asarray(s.data) for s in probabilities.addressable_shards])
    shown_classes = heads.decide(local, self.activation)
    if shown_classes.ndim == local.ndim:  # multi-label: show the bit sets, as the labels
      shown_classes = heads.pack(shown_classes)
    grid = image_grid(batch["image"], batch["label"], shown_classes,
                      heads.label_limit(self.activation, self.num_classes))
    self.writer.add_image("eval/input_label_prediction", grid, step, dataformats="HWC")
    Image.fromarray(grid).save(self.workdir / "predictions.png")

  def message(self, text: str) -> None:
    if self.enabled:
      self.bar.write(text)

  def close(self) -> None:
    if self.enabled:
      self.bar.close()
      self.writer.close()
      self.jsonl.close()


def image_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
               num_classes: int, *, rows: int = 4) -> np.ndarray:
  """uint8 ``[H, W, 3]``: one row per example: input | label | prediction.

  Inputs larger than the outputs (unpadded models) are center-cropped to the output size;
  ignored label pixels are shown in red. Volumes show their middle slice.
  """
  rows_out = []
  for image, label, prediction in list(zip(images, labels, predictions))[:rows]:
    if label.ndim == 3:
      middle = label.shape[0] // 2
      image = image[(image.shape[0] - label.shape[0]) // 2 + middle]
      label, prediction = label[middle], prediction[middle]
    h, w = label.shape
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    gray = image[top:top + h, left:left + w].mean(-1)
    gray = (gray - gray.min()) / max(gray.max() - gray.min(), 1e-6)
    scale = 255 / max(num_classes - 1, 1)
    panels = [np.repeat(gray[..., None] * 255, 3, -1)]
    for classes in (label, prediction):
      panel = np.repeat((np.clip(classes, 0, None) * scale)[..., None], 3, -1)
      panel[classes < 0] = (255, 0, 0)
      panels.append(panel)
    rows_out.append(np.concatenate(panels, axis=1))
  return np.concatenate(rows_out, axis=0).astype(np.uint8)
