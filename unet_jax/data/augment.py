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

**Volumes** (``[D, H, W, C]`` tiles) take the same steps per axis: Çiçek et al. (2016) draw
the displacement vectors on a grid with 32-voxel spacing (``elastic_spacing``, see
:func:`grid_for_spacing`) with σ = 4 voxels and interpolate them with B-splines; here, as in
2-D, a natural cubic spline per axis, then cubic (image) and nearest (label) sampling with
``scipy.ndimage.map_coordinates``, which works in any number of dimensions. Flips mirror the
width and, independently, the depth; turns are in the ``H, W`` plane, so an anisotropic depth
axis keeps its place. (``elasticdeform``, the usual N-D package for this, ships wheels built
against NumPy 1 that fail to import under NumPy 2, so it is not used.)

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
from collections.abc import Sequence

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


def displacement_field(rng: np.random.Generator, shape: Sequence[int], *, sigma: float = 10.0,
                       grid: int | Sequence[int] = 3) -> np.ndarray:
  """Smooth random displacements ``[n, *shape]`` in pixels (voxels), one component per axis
  (rows, then columns; depth, rows, columns for volumes).

  Args:
    rng: the source of randomness.
    shape: the tile's spatial sizes, ``(H, W)`` or ``(D, H, W)``.
    sigma: standard deviation of the control-point displacements (the paper: 10 px).
    grid: control points per axis, spread from edge to edge (the paper: 3); one number for
      every axis, or one per axis (see :func:`grid_for_spacing`).
  """
  grid = tuple(grid) if isinstance(grid, Sequence) else (grid,) * len(shape)
  if len(grid) != len(shape) or min(grid) < 2:
    raise ValueError(f"elastic_grid must be >= 2 control points per axis ({len(shape)} axes), "
                     f"got {grid}")
  if not sigma >= 0:
    raise ValueError(f"elastic_sigma must be >= 0 pixels, got {sigma}")
  field = rng.normal(0.0, sigma, size=(len(shape), *grid))
  for axis, (size, points) in enumerate(zip(shape, grid), start=1):
    # einsum, not a BLAS matmul: these thin products are 10x slower through a threaded BLAS.
    out = list(range(field.ndim))
    out[axis] = field.ndim
    field = np.einsum(_spline_weights(size, points), [field.ndim, axis], field,
                      list(range(field.ndim)), out)
  return field


def grid_for_spacing(shape: Sequence[int], spacing: float) -> tuple[int, ...]:
  """Control points per axis for a grid with ``spacing`` pixels between points (at least 2
  per axis, the first and last on the tile's edges): Çiçek et al. use 32 voxels."""
  if not spacing > 0:
    raise ValueError(f"elastic_spacing must be > 0 pixels, got {spacing}")
  return tuple(max(2, math.ceil((size - 1) / spacing) + 1) for size in shape)


def field_margin(field: np.ndarray) -> int:
  """Pixels to add around the tile so that every displaced position, and the spline's reach
  around it, stays inside the sampled window."""
  return int(math.ceil(np.abs(field).max())) + _SPLINE_SUPPORT


def elastic_deform(window: dict[str, np.ndarray], field: np.ndarray, *, margin: int,
                   output_hw: Sequence[int]) -> dict[str, np.ndarray]:
  """Deform a tile cut with ``margin`` extra pixels on every side.

  Args:
    window: ``image [h + 2m, w + 2m, C]`` around the input tile, and ``label`` (and optionally
      ``weight``) ``[H' + 2m, W' + 2m]`` around the output window, both as cut by
      ``pipeline.cut_tile`` with the tile's sizes grown by ``2 * margin`` (for volumes, each
      with a leading depth axis).
    field: ``[n, h, w]`` (``[n, d, h, w]``) displacements for the input tile.
    margin: ``m``, at least :func:`field_margin` of ``field``.
    output_hw: ``(H', W')`` (``(D', H', W')``), the model's output size; its window is
      centered in the input.

  Returns:
    ``image [h, w, C]`` (cubic, clipped to [0, 1]), ``label`` and ``weight`` ``[H', W']``
    (nearest); with a leading depth axis for volumes.
  """
  sizes = field.shape[1:]
  positions = np.mgrid[tuple(slice(0, n) for n in sizes)].astype(np.float64) + margin + field
  image = window["image"]
  deformed = np.empty((image.shape[-1], *sizes), np.float32)
  for c in range(image.shape[-1]):
    ndimage.map_coordinates(image[..., c], positions, output=deformed[c], order=3,
                            mode="reflect")
  tile = {"image": np.moveaxis(np.clip(deformed, 0.0, 1.0, out=deformed), 0, -1)}
  # Output pixel a sits at a + offset of the input tile; in the label window, which starts
  # `margin` before the output window, its displaced position is a + margin + d.
  offsets = [(n - o) // 2 for n, o in zip(sizes, output_hw)]
  inner = positions[(slice(None),) + tuple(slice(b, b + o) for b, o in zip(offsets, output_hw))]
  inner -= np.array(offsets, np.float64).reshape(-1, *(1,) * len(sizes))
  for key, outside in (("label", IGNORE), ("weight", 0.0)):
    if key in window:
      tile[key] = ndimage.map_coordinates(window[key], inner, order=0, mode="constant",
                                          cval=outside)
  return tile


def flip_rotate(tile: dict[str, np.ndarray], rng: np.random.Generator, *, flip: bool,
                rotate: bool) -> dict[str, np.ndarray]:
  """A random left-right mirror and a random multiple of 90° (of 180° for non-square tiles),
  applied alike to every ``[H, W, ...]`` array of ``tile``. Volumes (``tile["label"]``
  ``[D, H, W]``) turn in the ``H, W`` plane and are also mirrored along their depth."""
  spatial = tile["label"].ndim
  rows, cols = spatial - 2, spatial - 1
  if flip and rng.random() < 0.5:
    tile = {k: np.flip(v, cols) for k, v in tile.items()}
  if rotate:
    square = tile["image"].shape[rows] == tile["image"].shape[cols]
    turns = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
    tile = {k: np.rot90(v, turns, axes=(rows, cols)) for k, v in tile.items()}
  if flip and spatial == 3 and rng.random() < 0.5:
    tile = {k: v[::-1] for k, v in tile.items()}
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
