r"""Augmentation of training tiles, the paper's way (Ronneberger et al. 2015, Sec. 3.1).

"We primarily need shift and rotation invariance as well as robustness to deformations and
gray value variations" — with few training images, the paper's key augmentation is a random
**elastic deformation**: displacement vectors drawn on a coarse 3×3 grid from a Gaussian with
10 px standard deviation, interpolated bicubically to every pixel. Here:

* :func:`displacement_field` draws the ``grid × grid`` vectors (``elastic_grid``, σ =
  ``elastic_sigma``) spanning the input tile and interpolates them with a natural cubic spline
  in each direction (the separable form of bicubic interpolation);
* :func:`elastic_deform` samples the image at the displaced positions with a cubic spline
  (``scipy.ndimage.map_coordinates(order=3, mode="reflect")``) and the label and weight map
  with nearest-neighbour interpolation (``order=0``), which never invents a class or a weight;
* :func:`flip_rotate`: a mirror and a multiple of 90° (180° only for non-square tiles), the 8
  symmetries of the square;
* :func:`jitter`: brightness and contrast, the "gray value variations";
* shifts of the tile beyond the image edges are drawn by ``pipeline.random_tile``.

**Where elastic deformation happens.** The field is drawn for the input tile, and the image is
sampled from a window of the *whole example* around it, grown by the largest displacement: the
tile then shows real context, not a reflection of its own edge, and only a window a little
larger than the tile is interpolated, never the whole image. The label and the weight map are
sampled at the same displaced positions, so they stay aligned with the image; the weight map
was computed on the whole, undeformed label before (a deformed membrane keeps the weight it had,
which spares recomputing the map for every tile). Positions that land outside the image get
the mirrored image, as in the overlap-tile strategy, and ``IGNORE`` labels.

**Cost** (host-side numpy/scipy, one 572×572 grey tile with its 388×388 label and weight map,
σ = 10 px, measured on a 2-core CPU with the machine otherwise quiet; median of 25): 34 ms
per tile with the elastic deformation (19 ms of it the cubic-spline sampling, 3 ms the
field), against 1 ms for a plain cut with flips, rotation and jitter. Each further image
channel adds ~21 ms (77 ms for RGB). This runs in grain's worker threads or processes
(``data.num_threads``, ``data.num_workers``); an on-device (JAX) implementation is not
provided: the host keeps up with the configs measured by
``benchmarks/pipeline_throughput.py``, and ``data.num_workers`` adds processes where it would
not.

All randomness comes from the ``np.random.Generator`` passed in (grain's ``random_map`` gives
one per example, derived from the dataset seed and the example's index), so a tile is a pure
function of ``(example, generator state)``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from unet_jax.data.decode import IGNORE

_SPLINE_SUPPORT = 2  # a cubic B-spline reads 2 px on each side of a position


def _spline_weights(size: int, grid: int) -> np.ndarray:
  """``[size, grid]``: how much each of ``grid`` evenly spread control points contributes to
  each pixel under natural cubic-spline interpolation."""
  return CubicSpline(np.linspace(0.0, size - 1.0, grid), np.eye(grid), bc_type="natural")(
      np.arange(size, dtype=np.float64))


def displacement_field(rng: np.random.Generator, shape: tuple[int, int], *, sigma: float = 10.0,
                       grid: int = 3) -> np.ndarray:
  """Smooth random displacements ``[2, H, W]`` (rows, then columns) in pixels.

  Args:
    rng: the source of randomness.
    shape: ``(H, W)`` of the tile.
    sigma: standard deviation of the control-point displacements (the paper: 10 px).
    grid: control points per side, spread from edge to edge (the paper: 3).
  """
  if grid < 2:
    raise ValueError(f"elastic_grid must be >= 2 control points per side, got {grid}")
  if not sigma >= 0:
    raise ValueError(f"elastic_sigma must be >= 0 pixels, got {sigma}")
  coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
  rows, cols = _spline_weights(shape[0], grid), _spline_weights(shape[1], grid)
  # einsum, not a BLAS matmul: this thin product is 10x slower through a threaded BLAS.
  return np.einsum("kyj,xj->kyx", np.einsum("yi,kij->kyj", rows, coarse), cols)


def field_margin(field: np.ndarray) -> int:
  """Pixels to add around the tile so that every displaced position, and the spline's reach
  around it, stays inside the sampled window."""
  return int(math.ceil(np.abs(field).max())) + _SPLINE_SUPPORT


def elastic_deform(window: dict[str, np.ndarray], field: np.ndarray, *, margin: int,
                   output_hw: tuple[int, int]) -> dict[str, np.ndarray]:
  """Deform a tile cut with ``margin`` extra pixels on every side.

  Args:
    window: ``image [h + 2m, w + 2m, C]`` around the input tile, and ``label`` (and optionally
      ``weight``) ``[H' + 2m, W' + 2m]`` around the output window, both as cut by
      ``pipeline.cut_tile`` with the tile's sizes grown by ``2 * margin``.
    field: ``[2, h, w]`` displacements for the input tile.
    margin: ``m``, at least :func:`field_margin` of ``field``.
    output_hw: ``(H', W')``, the model's output size; its window is centered in the input.

  Returns:
    ``image [h, w, C]`` (cubic, clipped to [0, 1]), ``label`` and ``weight`` ``[H', W']``
    (nearest).
  """
  height, width = field.shape[1:]
  positions = np.mgrid[0:height, 0:width].astype(np.float64) + margin + field
  image = window["image"]
  deformed = np.empty((image.shape[-1], height, width), np.float32)
  for c in range(image.shape[-1]):
    ndimage.map_coordinates(image[..., c], positions, output=deformed[c], order=3,
                            mode="reflect")
  tile = {"image": np.moveaxis(np.clip(deformed, 0.0, 1.0, out=deformed), 0, -1)}
  # Output pixel (a, b) sits at (a + top, b + left) of the input tile; in the label window,
  # which starts `margin` before the output window, its displaced position is a + margin + d.
  top, left = (height - output_hw[0]) // 2, (width - output_hw[1]) // 2
  inner = positions[:, top:top + output_hw[0], left:left + output_hw[1]]
  inner -= np.array([top, left], np.float64)[:, None, None]
  for key, outside in (("label", IGNORE), ("weight", 0.0)):
    if key in window:
      tile[key] = ndimage.map_coordinates(window[key], inner, order=0, mode="constant",
                                          cval=outside)
  return tile


def flip_rotate(tile: dict[str, np.ndarray], rng: np.random.Generator, *, flip: bool,
                rotate: bool) -> dict[str, np.ndarray]:
  """A random left-right mirror and a random multiple of 90° (of 180° for non-square tiles),
  applied alike to every ``[H, W, ...]`` array of ``tile``."""
  if flip and rng.random() < 0.5:
    tile = {k: v[:, ::-1] for k, v in tile.items()}
  if rotate:
    square = tile["image"].shape[0] == tile["image"].shape[1]
    turns = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
    tile = {k: np.rot90(v, turns, axes=(0, 1)) for k, v in tile.items()}
  return tile


def jitter(image: np.ndarray, rng: np.random.Generator, *, brightness: float,
           contrast: float) -> np.ndarray:
  """``(image - mean) · c + mean + b``, clipped to [0, 1], with ``c ~ U[1 - contrast,
  1 + contrast]`` and ``b ~ U[-brightness, brightness]``."""
  if not (brightness or contrast):
    return image
  scale = rng.uniform(1.0 - contrast, 1.0 + contrast)
  offset = rng.uniform(-brightness, brightness)
  mean = image.mean(dtype=np.float64)
  return np.clip((image - mean) * scale + mean + offset, 0.0, 1.0).astype(np.float32)
