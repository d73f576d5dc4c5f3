"""Any folder of images and masks: ``DIR/images/NAME.ext`` paired with ``DIR/masks/NAME.ext``.

Files are paired by stem (the name without its extension, so ``a.jpg`` pairs with ``a.png``;
``data.folder.mask_suffix`` handles masks named like ``a_mask.png``). Images may be PNG,
JPEG, TIFF, BMP, GIF or WebP, of any size, grey, grey+alpha, RGB or RGBA (converted to
``data.channels``, see :mod:`unet_jax.data.decode`). Masks hold one value per pixel: {0, 255}
binary, palette indices or integer classes, mapped to classes by ``data.folder.mask_values``
(entry ``k``: the value, or a tuple of values, of class ``k``) and ``ignore_values`` (→
``IGNORE``).

Multi-label data (a model with ``activation="sigmoid"`` and several classes, whose classes
may overlap): set ``data.folder.class_masks`` to the class names; each class then has a folder
of binary masks, ``DIR/masks/<class>/NAME.ext`` (nonzero = the pixel belongs to the class;
``ignore_values`` still mark pixels no loss counts), and the labels hold the classes of a pixel
as bits (``unet_jax.heads.pack``)::

  DIR/images/a.png   DIR/masks/cell/a.png   DIR/masks/organelle/a.png

Validation is either a separate folder of the same layout (``data.folder.val_dir``) or a
fraction of the stems (``val_fraction``): the stems are sorted, shuffled with a fixed seed
(``split_seed``) and the last ``round(fraction · n)`` are held out, so the split does not
depend on the order of the files on disk nor on the training seed.

Pairing, empty folders and duplicate stems are checked when the source is made; each file is
read (and its mask values checked) when its example is first asked for. Entries that are not
images are left out (:mod:`unet_jax.data.listing`: hidden names, broken links, link loops,
directories, other file types) and one warning line says which and why.
"""

from __future__ import annotations

import functools
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from unet_jax import heads
from unet_jax.data import decode, listing

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def find_pairs(directory: str | os.PathLike, *, images: str = "images", masks: str = "masks",
               mask_suffix: str = "") -> list[tuple[pathlib.Path, pathlib.Path]]:
  """``(image, mask)`` paths of ``directory``, sorted by stem.

  Raises:
    FileNotFoundError: if a folder is missing.
    ValueError: if a folder holds no images, two files share a stem, or an image has no mask
      (or a mask no image); the message lists the files concerned.

  Warns (``UserWarning``, one line) when entries of either folder were left out.
  """
  directory = pathlib.Path(directory)
  image_listing, mask_listing = _listed(directory / images), _listed(directory / masks)
  skipped = [found.summary() for found in (image_listing, mask_listing) if found.skipped]
  if skipped:
    warnings.warn("; ".join(skipped), UserWarning, stacklevel=2)
  image_files = listing.by_stem(image_listing)
  mask_files = {stem[:-len(mask_suffix)] if mask_suffix and stem.endswith(mask_suffix) else stem:
                path for stem, path in listing.by_stem(mask_listing).items()}
  lonely_images = sorted(set(image_files) - set(mask_files))
  lonely_masks = sorted(set(mask_files) - set(image_files))
  if lonely_images or lonely_masks:
    raise ValueError(
        f"{directory}: every image needs a mask with the same stem"
        f"{f' + {mask_suffix!r}' if mask_suffix else ''}. Images without a mask: "
        f"{listing.some((image_files[s].name for s in lonely_images), 10)}; masks without an "
        f"image: {listing.some((mask_files[s].name for s in lonely_masks), 10)}")
  return [(image_files[stem], mask_files[stem]) for stem in sorted(image_files)]


def _listed(folder: pathlib.Path) -> listing.Listing:
  """The images of ``folder`` and the entries left out; errors for a missing or empty one."""
  return listing.require_files(folder, lambda f: listing.list_folder(f, SUFFIXES),
                               what="images")


def find_class_pairs(directory: str | os.PathLike, classes: Sequence[str], *,
                     images: str = "images", masks: str = "masks", mask_suffix: str = ""
                     ) -> list[tuple[pathlib.Path, tuple[pathlib.Path, ...]]]:
  """``(image, (mask of class 0, mask of class 1, ...))`` of a multi-label ``directory``
  (``DIR/masks/<class>/``), sorted by stem; the errors of :func:`find_pairs`, per class."""
  per_class = [find_pairs(directory, images=images, masks=f"{masks}/{name}",
                          mask_suffix=mask_suffix) for name in classes]
  return [(pairs[0][0], tuple(mask for _, mask in pairs)) for pairs in zip(*per_class)]


class FolderSource:
  """Random-access ``{"image": float32 [H, W, C], "label": int32 [H, W]}`` from file pairs.

  Args:
    pairs: ``(image path, mask path)`` for each example, e.g. from :func:`find_pairs`; for
      multi-label data ``(image path, (mask path per class))`` (:func:`find_class_pairs`).
    channels: image channels to return.
    table: mask value → class (or ``IGNORE``), from :func:`decode.class_table`; with one
      mask per class, only its ``IGNORE`` entries are used (any other nonzero value means
      "in the class").
  """

  def __init__(self, pairs: Sequence[tuple[pathlib.Path, pathlib.Path]], *, channels: int,
               table: Mapping[int, int]):
    self.pairs = list(pairs)
    self.channels = channels
    self.table = dict(table)

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    image_path, mask_path = self.pairs[index]
    image = decode.to_image(decode.read_file(image_path), self.channels, name=str(image_path))
    if isinstance(mask_path, tuple):
      return {"image": image, "label": self._class_masks(image, image_path, mask_path)}
    label = decode.to_label(decode.read_file(mask_path, mask=True), self.table,
                            name=str(mask_path))
    decode.check_same_size(image, label, name=f"{image_path} / {mask_path.name}")
    return {"image": image, "label": label}

  def _class_masks(self, image, image_path, mask_paths) -> np.ndarray:
    ignored = [value for value, label in self.table.items() if label == decode.IGNORE]
    members, ignore = [], None
    for path in mask_paths:
      mask = decode.read_file(path, mask=True)
      mask = mask[..., 0] if mask.ndim == 3 else mask
      decode.check_same_size(image, mask, name=f"{image_path} / {path.name}")
      skip = np.isin(mask, ignored)
      ignore = skip if ignore is None else ignore | skip
      members.append((mask != 0) & ~skip)
    label = heads.pack(np.stack(members, axis=-1))
    label[ignore] = decode.IGNORE
    return label

  def __repr__(self) -> str:
    return f"FolderSource({len(self.pairs)} pairs, channels={self.channels})"


def split_pairs(pairs: Sequence, split: str, *, val_fraction: float, seed: int) -> list:
  """The ``"train"`` or ``"validation"`` share of ``pairs`` (see the module docstring)."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.folder.val_fraction must be in (0, 1) when val_dir is not set, "
                     f"got {val_fraction}")
  num_val = int(round(val_fraction * len(pairs)))
  if num_val < 1 or num_val >= len(pairs):
    raise ValueError(f"val_fraction {val_fraction} of {len(pairs)} pairs leaves "
                     f"{num_val} for validation and {len(pairs) - num_val} for training; "
                     f"both need at least one (add images or set data.folder.val_dir)")
  order = np.random.default_rng(seed).permutation(len(pairs))
  chosen = order[len(pairs) - num_val:] if split == "validation" else order[:len(pairs) - num_val]
  return [pairs[i] for i in sorted(chosen)]


def from_config(config: ml_collections.ConfigDict, split: str, *, channels: int) -> FolderSource:
  """The ``data.folder`` source of ``split`` (``"train"`` or ``"validation"``)."""
  if split not in ("train", "validation"):
    raise ValueError(f"unknown split {split!r}; a folder source has 'train' and 'validation'")
  if not config.dir:
    raise ValueError("data.folder.dir is empty: set it to a folder holding images/ and masks/")
  layout = dict(images=config.images, masks=config.masks, mask_suffix=config.mask_suffix)
  classes = tuple(config.get("class_masks") or ())
  find = (functools.partial(find_class_pairs, classes=classes) if classes else find_pairs)
  if config.val_dir:
    pairs = find(config.dir if split == "train" else config.val_dir, **layout)
  else:
    pairs = split_pairs(find(config.dir, **layout), split,
                        val_fraction=config.val_fraction, seed=config.split_seed)
  return FolderSource(pairs, channels=channels,
                      table=decode.class_table(config.mask_values, config.ignore_values))
