"""Synthetic volumes of cells: the offline 3-D data.

The 3-D counterpart of :mod:`~unet_jax.data.synthetic`: a tissue as serial-section EM or a
membrane-stained light-sheet volume shows it, bright textured cells packed face to face,
separated by thin dark membrane sheets, with dark organelles inside the cells that must not be
taken for membrane. :class:`SyntheticCells3D` draws volumes with that structure, so a 3-D U-Net
can be trained and tested without downloading anything:

* **cells**: the 3-D Voronoi tessellation of a jittered grid of seed points reaching past every
  face, evaluated on a smoothly warped voxel grid so that the cell walls curve;
* **membranes**: every voxel closer than :math:`h(x)` to a cell wall, with the half-thickness
  :math:`h` a smooth random field in ``[0.5, 1.5]`` voxels, i.e. membrane sheets 1–3 voxels
  thick; the distance to the wall is the bisector distance to the three nearest seeds, exact
  for Voronoi cells in any dimension;
* **appearance**: per-cell brightness, smoothed-noise texture, a few dark ellipsoidal
  organelles (labelled as interior), Gaussian blur, Gaussian noise, and a random global
  brightness and contrast.

The label is 1 for cell interior (foreground, about 70–85 % of the voxels at the default cell
size) and 0 for membrane. Every example is a pure function of ``(seed, index)``.

Configuration: the ``config.data.synthetic3d`` section read by :func:`from_config`::

  synthetic3d = ml_collections.ConfigDict(dict(
      num_train=64,         # training volumes
      num_val=4,            # validation volumes, drawn with seed + 10_000
      size=(48, 48, 48),    # (D, H, W) of each volume, each >= 16
      seed=0,               # training seed, >= 0
      cell_size=22.0,       # mean cell diameter in voxels (the seed-grid spacing), >= 6
  ))
"""

from __future__ import annotations

import numbers

import ml_collections
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from unet_jax.data.synthetic import _check_int, example_rng

# A wall of half-thickness h around a cell of diameter D covers ~6h/D of it in 3-D (4h/D in
# 2-D): cells must be wider than in 2-D for the same membrane share. With h ~ 1 voxel, 22-voxel
# cells put ~24 % of the voxels on membranes (20-28 % over examples), near ISBI 2012's 20 %.
DEFAULT_CELL_SIZE = 22.0
_MIN_CELL_SIZE = 6.0
# Each example draws its spacing from cell_size times this range.
_SPACING_SPREAD = (0.85, 1.15)
# Membrane half-thickness h(x): a membrane is 2h thick, so 1-3 voxels.
_HALF_THICKNESS = (0.5, 1.5)
_MIN_SIZE = 16
# Seeds the validation split, as the 2-D source does, so its volumes are not training volumes.
VALIDATION_SEED_OFFSET = 10_000


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
  """Zero-mean, unit-variance random field varying over about ``scale`` voxels, ``shape``.

  Drawn on a coarse grid of spacing ``scale`` and interpolated linearly, one axis at a time
  (interpolating only the voxels kept is what makes it cheap in 3-D).
  """
  field = rng.standard_normal(tuple(int(np.ceil(n / scale)) + 2 for n in shape))
  for axis, n in enumerate(shape):
    # weights[i, k]: the hat function of coarse node k (at (k - 1) * scale) at voxel i.
    nodes = np.arange(field.shape[axis])
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n)[:, None] / scale + 1.0 - nodes))
    field = np.moveaxis(np.tensordot(weights, field, axes=(1, axis)), 0, axis)
  return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
  """A uniformly random 3 × 3 rotation matrix."""
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  q *= np.sign(np.diag(r))
  return q if np.linalg.det(q) > 0 else -q


def _cells(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float
           ) -> tuple[np.ndarray, np.ndarray, int]:
  """``(to_wall [D, H, W], cell [D, H, W] int, num_cells)``: the distance of every voxel
  to the nearest wall of its (warped) Voronoi cell, and the cell it lies in."""
  # Seeds on a jittered grid reaching one spacing past every face, so border cells are whole.
  axes = [np.arange(-spacing, n + spacing, spacing) for n in shape]
  seeds = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
  seeds = seeds + rng.uniform(-0.45, 0.45, seeds.shape) * spacing

  # Warping the query grid, not the seeds, is what bends the otherwise flat Voronoi walls.
  warp = 0.12 * spacing
  points = np.indices(shape, dtype=np.float32)
  for axis in range(3):
    points[axis] += warp * _smooth_field(rng, shape, 2.0 * spacing)
  points = points.reshape(3, -1).T
  distances, nearest = cKDTree(seeds).query(points, k=3)

  # Distance from x to the bisector plane of seeds s0 (nearest) and sj is
  # (|x-sj|^2 - |x-s0|^2) / (2 |s0 - sj|); the wall is the closer of the two candidates.
  gaps = np.linalg.norm(seeds[nearest[:, 1:]] - seeds[nearest[:, :1]], axis=-1)
  to_wall = (distances[:, 1:] ** 2 - distances[:, :1] ** 2) / (2.0 * gaps)
  to_wall = to_wall.min(axis=-1).reshape(shape)
  return to_wall, nearest[:, 0].reshape(shape), seeds.shape[0]


def _add_organelles(rng: np.random.Generator, image: np.ndarray, spacing: float) -> None:
  """Darkens ``image`` [D, H, W] in place with random ellipsoids (soft 1-voxel rim)."""
  shape = image.shape
  num_blobs = rng.poisson(0.5 * image.size / spacing**3)
  for _ in range(num_blobs):
    centre = rng.uniform(0, shape)
    radii = rng.uniform(1.5, 0.3 * spacing, 3)
    rotation = _random_rotation(rng)
    reach = int(np.ceil(radii.max())) + 1
    window = tuple(slice(max(int(c) - reach, 0), min(int(c) + reach + 1, n))
                   for c, n in zip(centre, shape))
    offsets = np.ix_(*(np.arange(w.start, w.stop) - c for w, c in zip(window, centre)))
    # Coordinates in the ellipsoid's own axes, scaled so its surface is the unit sphere.
    r2 = sum((sum(rotation[i, j] * offsets[j] for j in range(3)) / radii[i]) ** 2
             for i in range(3))
    # (1 - r) * radius is roughly the distance to the surface in voxels: a 1-voxel soft rim.
    coverage = np.clip((1.0 - np.sqrt(r2)) * radii.min() + 0.5, 0.0, 1.0)
    image[window] += coverage * (rng.uniform(0.25, 0.45) - image[window])


def _draw_example(rng: np.random.Generator, shape: tuple[int, int, int], cell_size: float
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(image [D, H, W] float32 in [0, 1], label [D, H, W] int32)``."""
  spacing = cell_size * rng.uniform(*_SPACING_SPREAD)
  to_wall, cell, num_cells = _cells(rng, shape, spacing)

  low, high = _HALF_THICKNESS
  half_thickness = np.clip(
      0.5 * (low + high) + 0.35 * (high - low) * _smooth_field(rng, shape, spacing), low, high)
  # Anti-aliased membrane coverage; coverage > 1/2 exactly where to_wall < half_thickness, so
  # the image and the label agree on which voxels are membrane.
  membrane = np.clip(half_thickness + 0.5 - to_wall, 0.0, 1.0).astype(np.float32)
  label = (to_wall >= half_thickness).astype(np.int32)

  image = rng.uniform(0.55, 0.85, num_cells).astype(np.float32)[cell]
  texture = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32),
                                    rng.uniform(0.7, 1.5))
  image += rng.uniform(0.04, 0.08) * texture / (texture.std() + 1e-12)
  image += 0.04 * _smooth_field(rng, shape, 3.0 * spacing)
  _add_organelles(rng, image, spacing)

  image += membrane * (rng.uniform(0.08, 0.22) - image)
  image = ndimage.gaussian_filter(image, rng.uniform(0.4, 1.0))
  image += rng.uniform(0.015, 0.05) * rng.standard_normal(shape, np.float32)
  mean = image.mean()
  image = (image - mean) * rng.uniform(0.75, 1.25) + mean + rng.uniform(-0.1, 0.1)
  return np.clip(image, 0.0, 1.0).astype(np.float32), label


class SyntheticCells3D:
  """A random-access dataset of synthetic cell volumes and membrane labels.

  Implements ``__len__`` and ``__getitem__``, so it is a ``grain`` ``RandomAccessDataSource``
  and works with ``grain.MapDataset.source``. Examples are generated on demand and depend only
  on ``(seed, index)``: the same pair always gives the same example, in any process. On one
  core of a 2-core CPU an example takes about 0.15–0.2 s at 48 × 48 × 48 and 2 s at
  64 × 128 × 128, most of it the nearest-seed search.

  Each example is a dict with

  * ``image``: float32 ``[D, H, W, channels]`` in ``[0, 1]`` (the grey volume repeated over
    channels);
  * ``label``: int32 ``[D, H, W]``, 1 = cell interior, 0 = membrane.

  Args:
    num_examples: dataset length, ``>= 0``.
    size: ``(D, H, W)``, each ``>= 16``; the axes may differ.
    seed: non-negative integer; different seeds give independent datasets.
    channels: number of image channels, ``>= 1``.
    cell_size: mean cell diameter in voxels (the spacing of the seed grid), ``>= 6``; each
      example varies it by ±15 %. The default, 22, puts about 24 % of the voxels on membranes
      and 25–60 cells, whole or cut by the faces, in a 48³ volume.

  Raises:
    ValueError: on an invalid argument, naming it and the valid range.
  """

  def __init__(
      self,
      num_examples: int,
      *,
      size: tuple[int, int, int] = (48, 48, 48),
      seed: int = 0,
      channels: int = 1,
      cell_size: float = DEFAULT_CELL_SIZE,
  ):
    self._num_examples = _check_int("num_examples", num_examples, 0)
    if not isinstance(size, (tuple, list)) or len(size) != 3:
      raise ValueError(f"size must be a triple (D, H, W), got {size!r}")
    self._size = tuple(_check_int(f"size[{axis}] ({name})", n, _MIN_SIZE)
                       for axis, (n, name) in enumerate(zip(size, ("depth", "height", "width"))))
    self._seed = _check_int("seed", seed, 0)
    self._channels = _check_int("channels", channels, 1)
    if (isinstance(cell_size, bool) or not isinstance(cell_size, numbers.Real)
        or not np.isfinite(cell_size) or cell_size < _MIN_CELL_SIZE):
      raise ValueError(f"cell_size must be a number of voxels >= {_MIN_CELL_SIZE:g}, "
                       f"got {cell_size!r}")
    self._cell_size = float(cell_size)

  @property
  def size(self) -> tuple[int, int, int]:
    return self._size

  @property
  def seed(self) -> int:
    return self._seed

  @property
  def channels(self) -> int:
    return self._channels

  @property
  def cell_size(self) -> float:
    return self._cell_size

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = example_rng("SyntheticCells3D", index, self._num_examples, self._seed)
    image, label = _draw_example(rng, self._size, self._cell_size)
    return {"image": np.repeat(image[..., None], self._channels, axis=-1), "label": label}

  def __repr__(self) -> str:
    return (
        f"SyntheticCells3D(num_examples={self._num_examples}, size={self._size}, "
        f"seed={self._seed}, channels={self._channels}, cell_size={self._cell_size:g})"
    )


def from_config(config: ml_collections.ConfigDict, split: str, *, channels: int
                ) -> SyntheticCells3D:
  """The ``data.synthetic3d`` source of ``split`` (``"train"`` or ``"validation"``); the
  validation volumes use ``seed + 10_000``, so they are never training volumes."""
  splits = {"train": (config.num_train, config.seed),
            "validation": (config.num_val, config.seed + VALIDATION_SEED_OFFSET)}
  if split not in splits:
    raise ValueError(f"unknown split {split!r}; synthetic3d has {tuple(splits)}")
  count, seed = splits[split]
  return SyntheticCells3D(count, size=tuple(config.size), seed=seed, channels=channels,
                          cell_size=config.get("cell_size", DEFAULT_CELL_SIZE))
