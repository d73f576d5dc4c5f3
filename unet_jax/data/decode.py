"""From image and mask files (or arrays) to the pipeline's ``image`` and ``label`` arrays.

Every source returns the same two arrays, whatever it reads:

* ``image``: float32 ``[H, W, C]`` in ``[0, 1]`` with the configured ``C``. Integer pixels are
  divided by their type's maximum (255 for 8-bit, 65535 for 16-bit), so a 16-bit image that
  uses 12 bits looks dark, as it would in any viewer. Channels are converted by dropping an
  alpha channel (grey+alpha → grey, RGBA → RGB), repeating grey (1 → 3) or taking the luma
  (3 → 1, ITU-R 601: 0.299 R + 0.587 G + 0.114 B). Any other pair of counts is an error,
  except equal counts, which pass unchanged.
* ``label``: int32 ``[H, W]`` class ids, ``IGNORE`` (-1) for pixels that losses and metrics
  skip. Mask pixel values become classes through a value → class table: ``mask_values[k]`` is
  the value (or a tuple of values) of class ``k``, and ``ignore_values`` lists values that
  become ``IGNORE``. A binary {0, 255} mask is ``mask_values=(0, 255)``; a palette PNG is read
  as its palette indices; an integer class image with classes 0 … 4 is ``(0, 1, 2, 3, 4)``.

Every error names the file (or the example) and what was wrong with it.

No reader decodes a file larger than ``max_pixels()`` pixels (all pages of a TIFF together;
by default ``MAX_PIXELS``, about 179 million, the size at which Pillow refuses an image): the
size is read from the file's header and checked before anything is decoded, so a small
compressed file that claims a huge image is refused without allocating it. The limit is one
setting for every format: ``set_max_pixels`` changes it for the process (entry points pass
their flag or config value there), and each reader's ``max_pixels`` argument for one call.
"""

from __future__ import annotations

import math
import os
import pathlib
import threading
from collections.abc import Mapping, Sequence

import numpy as np

IGNORE = -1  # label of pixels that losses and metrics skip

# Pillow refuses images past twice its MAX_IMAGE_PIXELS (89,478,485): the same default here.
MAX_PIXELS = 2 * 89_478_485

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_TIFF_SUFFIXES = (".tif", ".tiff")
_max_pixels = MAX_PIXELS
_pillow_limit = threading.Lock()


class ImageTooLargeError(ValueError):
  """An image file holds more pixels than the reader is allowed to decode."""


def set_max_pixels(pixels: int) -> None:
  """Set the largest image, in pixels per file, that every reader of this package decodes."""
  global _max_pixels
  if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
    raise ValueError(f"max_pixels must be a whole number ≥ 1, got {pixels!r}")
  _max_pixels = pixels


def max_pixels() -> int:
  """The largest image, in pixels per file, that readers decode (``set_max_pixels``)."""
  return _max_pixels


def check_pixels(path: str | os.PathLike, pixels: int, limit: int | None = None) -> None:
  """Refuse a file of ``pixels`` pixels (from its header) past ``limit`` (``max_pixels()``)."""
  limit = _max_pixels if limit is None else limit
  if pixels > limit:
    raise ImageTooLargeError(
        f"{path}: the image has {pixels:,} pixels, more than the limit of {limit:,}; a small "
        f"compressed file can claim a huge image. If the image is genuine, raise the limit "
        f"(max_pixels=..., or unet_jax.data.decode.set_max_pixels, or the entry point's "
        f"max-pixels option)")


def tiff_pixels(shape: Sequence[int], axes: str) -> int:
  """Pixels in a tifffile series or page of ``shape`` and ``axes`` (samples not counted)."""
  return math.prod(n for n, axis in zip(shape, axes) if axis != "S")


def open_pillow(path: str | os.PathLike, *, max_pixels: int | None = None):
  """``PIL.Image.open(path)``, refused before decoding if past the pixel limit.

  Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``) still applies below it; where
  ``max_pixels`` allows a larger image, Pillow's is lifted for that one call.
  """
  from PIL import Image
  limit = _max_pixels if max_pixels is None else max_pixels
  try:
    image = Image.open(path)
  except Image.DecompressionBombError as error:
    pillow = Image.MAX_IMAGE_PIXELS
    if limit <= 2 * pillow:
      raise ImageTooLargeError(f"{path}: {error} Raise max_pixels (now {limit:,}) if the "
                               f"image is genuine") from None
    with _pillow_limit:  # a process-wide setting of Pillow, restored at once
      Image.MAX_IMAGE_PIXELS = None
      try:
        image = Image.open(path)
      finally:
        Image.MAX_IMAGE_PIXELS = pillow
  try:
    check_pixels(path, image.width * image.height, limit)
  except ImageTooLargeError:
    image.close()
    raise
  return image


def read_file(path: str | os.PathLike, *, mask: bool = False,
              max_pixels: int | None = None) -> np.ndarray:
  """The pixels of an image file: ``[H, W]`` or ``[H, W, C]``, in the file's own dtype.

  TIFFs (including multi-page stacks, ``[N, H, W]``) are read with tifffile, every other
  format with Pillow. A palette image gives its palette indices when ``mask`` is true and its
  colours otherwise. A file of more than ``max_pixels`` pixels (default: ``max_pixels()``)
  is refused before it is decoded.

  Raises:
    ValueError: naming the file, if it is missing, truncated, not an image, or too large
      (``ImageTooLargeError``).
  """
  path = pathlib.Path(path)
  try:
    if path.suffix.lower() in _TIFF_SUFFIXES:
      import tifffile
      with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        check_pixels(path, tiff_pixels(series.shape, series.axes), max_pixels)
        return np.asarray(tif.asarray())
    with open_pillow(path, max_pixels=max_pixels) as image:
      image.load()
      if image.mode == "P" and not mask:
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
      elif image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B", "F"):
        image = image.convert("RGB")  # CMYK, YCbCr, ...
      return np.asarray(image)
  except ImageTooLargeError:
    raise
  except Exception as error:  # Pillow and tifffile raise many types for a bad file
    raise ValueError(f"cannot read {path}: {type(error).__name__}: {error} (is the file "
                     f"truncated, empty or not an image?)") from error


def to_image(pixels: np.ndarray, channels: int, *, name: str) -> np.ndarray:
  """``pixels`` (``[H, W]`` or ``[H, W, C]``, any numeric dtype) as float32 ``[H, W, channels]``
  in ``[0, 1]``; ``name`` (a file or an example) is used in error messages."""
  pixels = np.asarray(pixels)
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.ndim != 3:
    raise ValueError(f"{name}: an image must be [H, W] or [H, W, C], got shape {pixels.shape}")
  image = _to_unit_float(pixels, name=name)
  have = image.shape[-1]
  if have == channels:
    return image
  if have in (2, 4):  # grey + alpha, RGBA: the alpha channel carries no image content
    image, have = image[..., :have - 1], have - 1
  if have == channels:
    return np.ascontiguousarray(image)
  if have == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if have == 3 and channels == 1:
    return (image @ _LUMA)[..., None]
  raise ValueError(
      f"{name}: cannot convert a {pixels.shape[-1]}-channel image to {channels} channels; "
      f"conversions made: grey(+alpha) → 1 or 3, RGB(A) → 1 or 3, or any count to itself. "
      f"Set data.channels (and model.in_channels) to match the images.")


def _to_unit_float(pixels: np.ndarray, *, name: str) -> np.ndarray:
  if pixels.dtype == np.bool_:
    return pixels.astype(np.float32)
  if np.issubdtype(pixels.dtype, np.integer):
    return (pixels.astype(np.float32) / np.iinfo(pixels.dtype).max).clip(0.0, 1.0)
  if np.issubdtype(pixels.dtype, np.floating):
    bad = np.count_nonzero(~np.isfinite(pixels))
    if bad:
      raise ValueError(f"{name}: {bad:,} of {pixels.size:,} pixel values are NaN or infinite; "
                       f"the network needs finite pixels in [0, 1]. Repair or replace the "
                       f"image")
    low, high = float(pixels.min()), float(pixels.max())
    if not (0.0 <= low and high <= 1.0):
      raise ValueError(f"{name}: floating-point pixels must lie in [0, 1], got values in "
                       f"[{low:g}, {high:g}]; rescale the image or store it as integers")
    return pixels.astype(np.float32)
  raise ValueError(f"{name}: unsupported pixel type {pixels.dtype}")


def class_table(mask_values: Sequence[int | Sequence[int]], ignore_values: Sequence[int] = ()
                ) -> dict[int, int]:
  """The value → class map: ``mask_values[k]`` (a value or a tuple of values) → class ``k``,
  each of ``ignore_values`` → ``IGNORE``."""
  table: dict[int, int] = {}
  entries = [(k, v) for k, values in enumerate(mask_values)
             for v in (values if isinstance(values, Sequence) else (values,))]
  entries += [(IGNORE, v) for v in ignore_values]
  if not any(k != IGNORE for k, _ in entries):
    raise ValueError("mask_values is empty: list the mask value of every class, e.g. (0, 255)")
  for cls, value in entries:
    if int(value) in table:
      raise ValueError(f"mask value {value} is mapped twice (to {table[int(value)]} and to "
                       f"{cls}); check mask_values={tuple(mask_values)} and "
                       f"ignore_values={tuple(ignore_values)}")
    table[int(value)] = cls
  return table


def to_label(mask: np.ndarray, table: Mapping[int, int], *, name: str) -> np.ndarray:
  """``mask`` (``[H, W]`` integer values; ``[H, W, 1]`` or equal RGB channels accepted) as int32
  class ids ``[H, W]`` through ``table``; ``name`` is used in error messages.

  Raises:
    ValueError: listing the values of ``mask`` that ``table`` does not map.
  """
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] in (2, 4):  # grey + alpha, RGBA: drop the alpha
    mask = mask[..., :-1]
  if mask.ndim == 3 and (mask.shape[-1] == 1 or (mask == mask[..., :1]).all()):
    mask = mask[..., 0]
  if mask.ndim != 2:
    raise ValueError(f"{name}: a mask must be one channel of class values [H, W], got shape "
                     f"{mask.shape} (colour masks: save them as palette or integer images)")
  if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
    raise ValueError(f"{name}: mask values must be integers, got dtype {mask.dtype}")
  keys = np.array(sorted(table))
  classes = np.array([table[k] for k in keys], np.int32)
  index = np.minimum(np.searchsorted(keys, mask), len(keys) - 1)
  known = keys[index] == mask
  if not known.all():
    unexpected = np.unique(mask[~known]).tolist()
    shown = ", ".join(map(str, unexpected[:20])) + (" …" if len(unexpected) > 20 else "")
    raise ValueError(
        f"{name}: mask values {shown} are not in the value → class map {dict(table)} "
        f"({IGNORE} = ignore); add them to mask_values or ignore_values")
  return classes[index]


def check_same_size(image: np.ndarray, label: np.ndarray, *, name: str) -> None:
  if image.shape[:2] != label.shape:
    raise ValueError(f"{name}: the image is {image.shape[0]}×{image.shape[1]} but the mask is "
                     f"{label.shape[0]}×{label.shape[1]}; they must be the same size")
