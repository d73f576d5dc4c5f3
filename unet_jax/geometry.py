"""The geometry of U-Net: which input sizes work, what comes out, and where to crop.

A U-Net of depth ``D`` applies, per spatial dimension and independently for each axis (height
and width; depth, height and width for volumes, whose sizes may all differ):

* encoder level ``k`` (``k = 0 .. D-1``): two 3×3 (3×3×3) convolutions (each takes 2 px when
  unpadded), then a 2×2 (2×2×2) max-pool (which, cropping skips, must see an even size so that
  no pixel is dropped);
* the bottleneck: two 3×3 convolutions;
* decoder level ``k`` (``k = D-1 .. 0``): 2× up-sampling, then the skip and the up-sampled map
  are brought to one size, then two 3×3 convolutions.

How the decoder brings them to one size is ``skip_fit``:

* ``"crop"`` (the paper): the skip is center-cropped to the up-sampled size. An input size is
  *valid* when every pooled size is even (no row or column is dropped), every size stays
  positive, and every up-sampled map fits inside its skip. The paper's network (all
  convolutions unpadded) maps 572 → 388; the walkthrough's (unpadded encoder, padded decoder)
  maps 572 → 448.
* ``"pad"`` (milesial/Pytorch-UNet): pooling floors odd sizes, and the up-sampled map is
  zero-padded to the skip's size (``dy // 2`` rows before, the rest after; columns alike), so
  any size whose pooled sizes stay ≥ 1 is valid: with padded convolutions, any size ≥ ``2**D``,
  and the output has the input's size.

Everything is per axis, so one ``Geometry`` answers for images and volumes alike:
``check_shape(height, width)`` or ``check_shape(depth, height, width)``. Çiçek et al.'s 3-D
U-Net (depth 3, unpadded) maps 132×132×116 → 44×44×28.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Literal

Padding = Literal["valid", "same"]
SkipFit = Literal["crop", "pad"]
_PADDINGS = ("valid", "same")
_SKIP_FITS = ("crop", "pad")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Spatial bookkeeping of a U-Net, one dimension at a time.

  Attributes:
    depth: number of 2×2 max-pools (the paper: 4).
    encoder_padding: ``"valid"`` (each 3×3 conv takes 2 px) or ``"same"``.
    decoder_padding: the same choice for the decoder's convolutions.
    skip_fit: ``"crop"`` (crop the skip to the up-sampled map; the paper) or ``"pad"`` (pad
      the up-sampled map to the skip, flooring odd sizes when pooling; milesial).
  """

  depth: int = 4
  encoder_padding: Padding = "valid"
  decoder_padding: Padding = "valid"
  skip_fit: SkipFit = "crop"

  def __post_init__(self):
    if not isinstance(self.depth, int) or self.depth < 1:
      raise ValueError(f"depth must be a positive integer, got {self.depth!r}")
    for name in ("encoder_padding", "decoder_padding"):
      value = getattr(self, name)
      if value not in _PADDINGS:
        raise ValueError(f"{name} must be one of {_PADDINGS}, got {value!r}")
    if self.skip_fit not in _SKIP_FITS:
      raise ValueError(f"skip_fit must be one of {_SKIP_FITS}, got {self.skip_fit!r}")

  @property
  def _encoder_shrink(self) -> int:
    return 4 if self.encoder_padding == "valid" else 0

  @property
  def _decoder_shrink(self) -> int:
    return 4 if self.decoder_padding == "valid" else 0

  def trace(self, size: int) -> dict[str, list[int]] | None:
    """Sizes through the network for one dimension, or ``None`` if ``size`` is not valid.

    Returns a dict with ``skips`` (encoder outputs, top level first), ``bottleneck`` (one
    item), ``ups`` (up-sampled sizes, deepest first) and ``decoder`` (decoder outputs, deepest
    first; the last is the network's output size).
    """
    size = _as_size(size)
    if size is None or size < 1:
      return None
    pad = self.skip_fit == "pad"
    skips, x = [], size
    for _ in range(self.depth):
      x -= self._encoder_shrink
      if x < 2 or (x % 2 and not pad):
        return None
      skips.append(x)
      x //= 2
    x -= self._encoder_shrink
    if x < 1:
      return None
    bottleneck, ups, decoder = [x], [], []
    for skip in reversed(skips):
      x *= 2
      if x > skip:
        return None
      if pad:
        x = skip
      ups.append(x)
      x -= self._decoder_shrink
      if x < 1:
        return None
      decoder.append(x)
    return {"skips": skips, "bottleneck": bottleneck, "ups": ups, "decoder": decoder}

  def is_valid(self, size: int) -> bool:
    """Whether ``size`` (one dimension) goes through the network without dropping pixels."""
    return self.trace(size) is not None

  def output_size(self, size: int) -> int:
    """Output size for a valid input size (one dimension); raises ``ValueError`` otherwise."""
    self.check(size)
    return self.trace(size)["decoder"][-1]

  def nearest_valid(self, size: int) -> tuple[int | None, int]:
    """The largest valid size ≤ ``size`` (``None`` if there is none) and the smallest ≥ it."""
    below = next((n for n in range(size, 0, -1) if self.is_valid(n)), None)
    above = next(n for n in range(max(size, 1), 2**31) if self.is_valid(n))
    return below, above

  def valid_sizes(self, low: int, high: int) -> list[int]:
    """All valid input sizes in ``[low, high]``."""
    return [n for n in range(max(low, 1), high + 1) if self.is_valid(n)]

  def min_input_size(self) -> int:
    """The smallest valid input size."""
    return self.nearest_valid(1)[1]

  def input_size_for(self, output: int) -> int:
    """The smallest valid input size whose output is at least ``output`` pixels."""
    n = self.min_input_size()
    step = 2**self.depth
    while self.trace(n)["decoder"][-1] < output:
      n += step
    return n

  def _nearest_text(self, size: int) -> str:
    size = _as_size(size)
    below, above = self.nearest_valid(size) if size is not None and size > 0 else (
        None, self.min_input_size())
    return ", ".join(str(n) for n in (below, above) if n is not None)

  def _describe(self) -> str:
    fit = ", padding up-sampled maps to their skips" if self.skip_fit == "pad" else ""
    return (f"a depth-{self.depth} U-Net with {self.encoder_padding!r} encoder and "
            f"{self.decoder_padding!r} decoder convolutions{fit}")

  def _rule(self, spatial_dims: int = 2) -> str:
    pool = "×".join("2" * spatial_dims)
    if self.skip_fit == "pad":
      return f"every size must stay positive through the {pool} max-pools"
    return f"every {pool} max-pool must see an even size and every size must stay positive"

  def check(self, size: int, *, name: str = "input") -> None:
    """Raise a ``ValueError`` naming the nearest valid sizes if ``size`` is not valid."""
    if not self.is_valid(size):
      raise ValueError(
          f"{size} is not a valid {name} size for {self._describe()} ({self._rule()}); "
          f"nearest valid sizes: {self._nearest_text(size)}")

  def check_shape(self, *sizes: int) -> tuple[int, ...]:
    """Validate an input of spatial sizes ``(H, W)`` or ``(D, H, W)`` and return the output's.

    Each axis is checked on its own, so anisotropic volumes work. The error names the whole
    shape and every axis that is not valid, e.g. ``573×573 is not a valid input: height 573
    (nearest valid sizes 572, 588); ...``.
    """
    if not sizes:
      raise ValueError("check_shape needs at least one spatial size, e.g. (height, width)")
    names = _AXIS_NAMES.get(len(sizes)) or tuple(f"axis {k}" for k in range(len(sizes)))
    problems = [f"{name} {size} (nearest valid sizes {self._nearest_text(size)})"
                for name, size in zip(names, sizes) if not self.is_valid(size)]
    if problems:
      rule = self._rule(len(sizes))
      what = "image" if len(sizes) == 2 else "volume" if len(sizes) == 3 else "input"
      raise ValueError(
          f"{'×'.join(map(str, sizes))} is not a valid input for {self._describe()}: "
          f"{'; '.join(problems)}. {rule[0].upper()}{rule[1:]}; pad or tile the {what} "
          f"(see unet_jax.geometry).")
    return tuple(self.output_size(size) for size in sizes)


_AXIS_NAMES = {1: ("size",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _as_size(size) -> int | None:
  """``size`` as a Python int (numpy integers included); ``None`` for floats and others."""
  try:
    return operator.index(size)
  except TypeError:
    return None


def as_hw(value) -> tuple[int, int]:
  """A size setting as ``(height, width)``: an integer means a square (``--config.data.
  tile_size=256``, which ml_collections may hand over as ``(256,)``)."""
  return as_sizes(value, 2)


def as_sizes(value, spatial_dims: int) -> tuple[int, ...]:
  """A size setting as one integer per spatial axis: ``(height, width)`` for images,
  ``(depth, height, width)`` for volumes; one integer (or a 1-tuple) means a square or a
  cube."""
  if _as_size(value) is not None and not isinstance(value, bool):
    return (_as_size(value),) * spatial_dims
  if (isinstance(value, (tuple, list)) and len(value) in (1, spatial_dims)
      and all(_as_size(n) is not None and not isinstance(n, bool) for n in value)):
    return tuple(_as_size(n) for n in value) * (spatial_dims // len(value))
  names = ", ".join(_AXIS_NAMES.get(spatial_dims, ("sizes",)))
  shape = "square" if spatial_dims == 2 else "cube"
  raise ValueError(f"expected ({names}) or one integer for a {shape}, got {value!r}")


def crop_offsets(source: int, target: int) -> tuple[int, int]:
  """Pixels to remove before and after to center-crop ``source`` down to ``target``.

  An odd difference puts the extra pixel after: ``crop_offsets(7, 4) == (1, 2)``.
  """
  if target > source:
    raise ValueError(f"cannot crop {source} px down to {target} px: the target is larger")
  before = (source - target) // 2
  return before, source - target - before


def center_crop(x, *sizes: int):
  """Center-crop the spatial axes of ``x`` (``[..., H, W, C]``) to ``sizes`` (``H', W'``).

  ``center_crop(x, height, width)`` crops the two axes before the channels, ``center_crop(x,
  depth, height, width)`` the three of a volume ``[..., D, H, W, C]``. Each axis is cropped
  on its own, so non-square maps and odd size differences are handled.
  """
  first = x.ndim - 1 - len(sizes)
  index = [slice(None)] * x.ndim
  for axis, size in enumerate(sizes, start=first):
    before, _ = crop_offsets(x.shape[axis], size)
    index[axis] = slice(before, before + size)
  return x[tuple(index)]


def pad_offsets(source: int, target: int) -> tuple[int, int]:
  """Pixels to add before and after to pad ``source`` up to ``target``, split as milesial's
  ``F.pad(x, [d // 2, d - d // 2])``: an odd difference puts the extra pixel after."""
  if target < source:
    raise ValueError(f"cannot pad {source} px up to {target} px: the target is smaller")
  before = (target - source) // 2
  return before, target - source - before
