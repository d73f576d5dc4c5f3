"""Reading, converting and writing image files for prediction and evaluation.

``unet_jax.predict`` and ``unet_jax.evaluate`` read whatever images a user points them at, so
these helpers are more lenient than the training pipeline's (``unet_jax.data.decode``):

* ``to_float`` keeps floating-point pixels as they are (any finite value), where the
  pipeline requires ``[0, 1]``; signed integers are refused rather than scaled;
* ``match_channels`` repeats gray over any number of channels, where the pipeline only
  expands gray to RGB;
* ``read_image`` returns every page of a multi-page TIFF as its own image and refuses
  unsupported file types by name.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import numpy as np

from unet_jax.data import decode, listing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Class colours of the overlay (class 0 is left uncoloured).
_PALETTE = np.array([(0, 0, 0), (255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0),
                     (200, 64, 255), (0, 220, 220), (255, 128, 0)], np.float32)


def to_float(image: np.ndarray, *, name: str = "image") -> np.ndarray:
  """``image`` as float32: unsigned integers scaled to ``[0, 1]`` (uint8 / 255, as the
  training data), floats kept; NaN or infinite values are an error."""
  image = np.asarray(image)
  if image.dtype == bool or np.issubdtype(image.dtype, np.unsignedinteger):
    scale = 1 if image.dtype == bool else np.iinfo(image.dtype).max
    return image.astype(np.float32) / np.float32(scale)
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"{name}: unsupported pixel type {image.dtype}; give uint8, uint16 or "
                     f"floats in [0, 1]")
  image = image.astype(np.float32)
  bad = np.count_nonzero(~np.isfinite(image))
  if bad:
    raise ValueError(f"{name} has {bad} NaN or infinite value(s) out of {image.size}; the "
                     f"network needs finite pixels")
  return image


def match_channels(image: np.ndarray, channels: int, *, name: str = "image") -> np.ndarray:
  """``[H, W, channels]`` from ``[H, W]`` or ``[H, W, C]``: drops an alpha channel (C = 2
  or 4), turns RGB into gray (ITU-R 601 luma) or repeats gray over the channels."""
  image = image[..., None] if image.ndim == 2 else image
  have = image.shape[-1]
  if have != channels and have in (2, 4):
    image, have = image[..., :-1], have - 1
  if have == channels:
    return image
  if have == 1:
    return np.repeat(image, channels, axis=-1)
  if have == 3 and channels == 1:
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return luma[..., None]
  raise ValueError(f"{name} has {image.shape[-1]} channel(s) and the model takes {channels}; "
                   f"only gray, gray+alpha, RGB and RGBA images can be converted")


def read_image(path: str | os.PathLike, *, mask: bool = False,
               max_pixels: int | None = None) -> list[np.ndarray]:
  """The pages of an image file as arrays ``[H, W]`` or ``[H, W, C]`` (one page, except for
  multi-page TIFFs, which need ``tifffile``). A palette image gives its colours, or with
  ``mask`` its palette indices. A file of more than ``max_pixels`` pixels, all pages together
  (default: ``unet_jax.data.decode.max_pixels()``), is refused from its header, before it is
  decoded (``decode.ImageTooLargeError``)."""
  path = pathlib.Path(path)
  if path.suffix.lower() not in IMAGE_SUFFIXES:
    raise ValueError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; supported: "
                     f"{', '.join(IMAGE_SUFFIXES)}")
  if path.suffix.lower() in (".tif", ".tiff"):
    try:
      import tifffile
    except ImportError:
      raise ImportError(f"{path}: reading TIFF files needs tifffile (pip install "
                        f"tifffile)") from None
    with tifffile.TiffFile(path) as tif:
      decode.check_pixels(path, sum(decode.tiff_pixels(page.shape, page.axes)
                                    for page in tif.pages), max_pixels)
      pages = [page.asarray() for page in tif.pages]
    # Planar TIFFs store [C, H, W].
    return [p.transpose(1, 2, 0) if p.ndim == 3 and p.shape[0] <= 4 < p.shape[-1] else p
            for p in pages]
  with decode.open_pillow(path, max_pixels=max_pixels) as picture:
    if picture.mode in ("P", "PA") and not mask:
      picture = picture.convert("RGBA" if "transparency" in picture.info else "RGB")
    elif picture.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
      picture = picture.convert("L" if picture.mode == "1" else "RGB")
    array = np.asarray(picture)
  if array.dtype == np.int32:  # 16-bit PNGs may open as 32-bit integers
    if array.min() < 0 or array.max() > 65535:
      raise ValueError(f"{path}: 32-bit integer pixels outside 0..65535 are not supported")
    array = array.astype(np.uint16)
  return [array.astype(array.dtype.newbyteorder("="))]


def list_images(path: str | os.PathLike) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """``(images, unsupported)``: a file, or the files of a folder (not recursive, links
  followed; see :mod:`unet_jax.data.listing`); ``ValueError`` when there is no image at all.

  Of a folder, ``unsupported`` are its other regular files; when anything was left out
  (those, hidden names, broken links, link loops, directories) one ``UserWarning`` line says
  what and why.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(listing.missing(path))
  if not path.is_dir():
    if not path.is_file():
      raise ValueError(f"{path} is neither an image file nor a folder")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
      raise ValueError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                       f"supported: {', '.join(IMAGE_SUFFIXES)}")
    return [path], []
  found = listing.list_folder(path, IMAGE_SUFFIXES)
  if not found.files:
    raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}"
                     f"{f'; it holds: {found.entries()}' if found.skipped else ' (it is empty)'}")
  if found.skipped:
    warnings.warn(found.summary(), UserWarning, stacklevel=2)
  return found.files, found.unsupported


def page_names(stem: str, count: int) -> list[str]:
  """``stem`` for a one-page file, ``stem_page000``, ``stem_page001``, ... otherwise."""
  return [stem] if count == 1 else [f"{stem}_page{i:03d}" for i in range(count)]


def class_mask(classes: np.ndarray, num_classes: int) -> np.ndarray:
  """The PNG we write for a ``[H, W]`` class map: 0/255 for two classes (the convention of
  binary masks), class ids (uint8, or uint16 past 256 classes) otherwise."""
  if num_classes == 2:
    return (classes * 255).astype(np.uint8)
  return classes.astype(np.uint8 if num_classes <= 256 else np.uint16)


def overlay(image: np.ndarray, classes: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
  """uint8 ``[H, W, 3]``: the (contrast-stretched, gray) image with classes ≥ 1 tinted."""
  gray = image.mean(axis=-1) if image.ndim == 3 else image
  gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-6)
  rgb = np.repeat(gray[..., None] * 255, 3, axis=-1)
  colour = _PALETTE[(classes - 1) % (len(_PALETTE) - 1) + 1]
  tinted = np.where((classes > 0)[..., None], (1 - alpha) * rgb + alpha * colour, rgb)
  return tinted.round().astype(np.uint8)
