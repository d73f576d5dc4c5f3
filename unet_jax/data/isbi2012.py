"""ISBI 2012 EM segmentation (the paper's first benchmark), from PNG slices or TIFF stacks.

Serial-section EM of the Drosophila first-instar larva ventral nerve cord (Cardona et al.
2010; Arganda-Carreras et al. 2015): 30 training slices of 512×512 with membrane labels and
30 unlabelled test slices. Two layouts of the same data are read:

* **PNG slices** (as redistributed by zhixuhao/unet)::

    DIR/train/image/0.png … 29.png   DIR/train/label/0.png … 29.png   DIR/test/image/0.png …

* **the challenge's TIFF stacks**: ``DIR/train-volume.tif``, ``DIR/train-labels.tif`` and
  ``DIR/test-volume.tif``, each a multi-page stack ``[slices, H, W]``, read with tifffile.

Labels are 255 = cell interior and 0 = membrane; they become classes 1 = cell and
0 = membrane (the synthetic source's convention). The train stack is split by slice range,
train 0–24 and validation 25–29 by default (``data.isbi2012.train_slices`` /
``val_slices``, half-open ranges). The ``"test"`` stack has no labels: its examples hold only
``image``, for prediction.

The data directory is ``data.isbi2012.dir``; ``configs/isbi2012.py`` sets it from the
environment variable ``UNET_JAX_ISBI_DIR``, else ``../shared/data/isbi2012`` beside the
repository when that exists. The data are research-use: cite both papers above.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Sequence

import ml_collections
import numpy as np

from unet_jax.data import decode

LABEL_TABLE = {0: 0, 255: 1}  # membrane, cell
STACKS = ("train", "test")
_FORMATS = ("auto", "png", "tiff")


class ISBI2012:
  """Random-access ISBI 2012 slices: ``{"image": float32 [H, W, C], "label": int32 [H, W]}``.

  All selected slices are read when the source is made (30 × 512×512 bytes at most), so a
  missing or bad file is reported before training starts.

  Args:
    directory: the data directory, in either layout (see the module docstring).
    stack: ``"train"`` (labelled) or ``"test"`` (images only).
    slices: the slice indices to keep, e.g. ``range(0, 25)``; all slices when ``None``.
    file_format: ``"png"``, ``"tiff"`` or ``"auto"`` (PNG slices when ``DIR/train/image`` or
      ``DIR/test/image`` exists, else TIFF stacks).
    channels: image channels to return (the slices are grey).
  """

  def __init__(self, directory: str | os.PathLike, stack: str = "train", *,
               slices: Sequence[int] | None = None, file_format: str = "auto",
               channels: int = 1):
    self.directory = pathlib.Path(directory)
    if stack not in STACKS:
      raise ValueError(f"ISBI 2012 stack must be one of {STACKS}, got {stack!r}")
    if file_format not in _FORMATS:
      raise ValueError(f"ISBI 2012 file_format must be one of {_FORMATS}, got {file_format!r}")
    if not self.directory.is_dir():
      raise FileNotFoundError(
          f"ISBI 2012 data directory {self.directory} does not exist; set "
          f"data.isbi2012.dir or the UNET_JAX_ISBI_DIR environment variable to a folder with "
          f"train/image/*.png + train/label/*.png or train-volume.tif + train-labels.tif")
    if file_format == "auto":
      file_format = "png" if (self.directory / stack / "image").is_dir() else "tiff"
      if file_format == "tiff" and not (self.directory / f"{stack}-volume.tif").is_file():
        raise FileNotFoundError(
            f"{self.directory} holds neither ISBI 2012 layout: no {stack}/image/ folder of "
            f"PNG slices and no {stack}-volume.tif stack")
    read = self._read_png if file_format == "png" else self._read_tiff
    images, labels, names, label_names = read(stack)
    count = len(images)
    slices = list(range(count)) if slices is None else [int(i) for i in slices]
    outside = [i for i in slices if not 0 <= i < count]
    if outside or not slices:
      raise ValueError(f"ISBI 2012 slices {outside or slices} are not in the {stack} stack of "
                       f"{self.directory}, which has slices 0 … {count - 1}")
    self.slices = slices
    self.names = [names[i] for i in slices]
    self._images = [decode.to_image(images[i], channels, name=names[i]) for i in slices]
    self._labels = None
    if labels is not None:
      self._labels = [decode.to_label(labels[i], LABEL_TABLE, name=label_names[i])
                      for i in slices]
      for name, image, label in zip(self.names, self._images, self._labels):
        decode.check_same_size(image, label, name=name)

  def _read_png(self, stack: str):
    image_dir = self.directory / stack / "image"
    files = _numbered_pngs(image_dir)
    if stack == "test":
      return [decode.read_file(f) for f in files], None, [str(f) for f in files], None
    label_dir = self.directory / stack / "label"
    labels = _numbered_pngs(label_dir)
    image_names, label_names = {f.name for f in files}, {f.name for f in labels}
    if image_names != label_names:
      raise ValueError(
          f"ISBI 2012: {image_dir} and {label_dir} do not hold the same slices: images without "
          f"a label: {sorted(image_names - label_names)}; labels without an image: "
          f"{sorted(label_names - image_names)}")
    return ([decode.read_file(f) for f in files], [decode.read_file(f, mask=True) for f in labels],
            [str(f) for f in files], [str(f) for f in labels])

  def _read_tiff(self, stack: str):
    volume = self.directory / f"{stack}-volume.tif"
    images = _read_stack(volume)
    names = [f"{volume}[{i}]" for i in range(len(images))]
    if stack == "test":
      return images, None, names, None
    labels_path = self.directory / f"{stack}-labels.tif"
    labels = _read_stack(labels_path)
    if labels.shape != images.shape[:3]:
      raise ValueError(f"ISBI 2012: {labels_path} has shape {labels.shape} but {volume} has "
                       f"{images.shape}; the label stack must match the image stack")
    return images, labels, names, [f"{labels_path}[{i}]" for i in range(len(labels))]

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = {"image": self._images[index]}
    if self._labels is not None:
      example["label"] = self._labels[index]
    return example

  def __repr__(self) -> str:
    return f"ISBI2012({str(self.directory)!r}, slices={self.slices})"


def _numbered_pngs(directory: pathlib.Path) -> list[pathlib.Path]:
  """``directory/0.png, 1.png, …`` in slice order (numerically, not as text)."""
  if not directory.is_dir():
    raise FileNotFoundError(f"ISBI 2012: {directory} does not exist (expected N.png slices)")
  files = [f for f in directory.iterdir() if re.fullmatch(r"\d+\.png", f.name)]
  if not files:
    raise ValueError(f"ISBI 2012: {directory} holds no slices named 0.png, 1.png, …")
  return sorted(files, key=lambda f: int(f.stem))


def _read_stack(path: pathlib.Path) -> np.ndarray:
  if not path.is_file():
    raise FileNotFoundError(f"ISBI 2012: {path} does not exist")
  stack = decode.read_file(path)
  if stack.ndim == 2:
    stack = stack[None]
  if stack.ndim not in (3, 4):
    raise ValueError(f"{path}: expected a stack of slices [N, H, W], got shape {stack.shape}")
  return stack


def from_config(config: ml_collections.ConfigDict, split: str, *, channels: int) -> ISBI2012:
  """The ``data.isbi2012`` source of ``split``: ``"train"`` and ``"validation"`` are slice
  ranges of the train stack, ``"test"`` is the unlabelled test stack."""
  ranges = {"train": config.train_slices, "validation": config.val_slices, "test": None}
  if split not in ranges:
    raise ValueError(f"unknown split {split!r}; ISBI 2012 has {tuple(ranges)}")
  slices = None if ranges[split] is None else range(*ranges[split])
  stack = "test" if split == "test" else "train"
  if not config.dir:
    raise ValueError("data.isbi2012.dir is empty: set it (or UNET_JAX_ISBI_DIR) to the ISBI "
                     "2012 data directory")
  return ISBI2012(config.dir, stack, slices=slices, file_format=config.file_format,
                  channels=channels)
