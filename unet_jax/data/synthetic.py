"""Synthetic electron-microscopy-like images: the offline default data.

The paper's first task (ISBI 2012, serial-section EM of the Drosophila ventral nerve cord)
asks for a membrane map: bright, textured cell bodies packed edge to edge, separated by thin
dark membranes, with dark organelles inside the cells that must *not* be taken for membrane.
:class:`SyntheticEM` draws images with that structure, so the whole pipeline can be trained and
tested without downloading anything:

* **cells**: the Voronoi tessellation of a jittered grid of seed points, evaluated on a smoothly
  warped pixel grid so that the cell walls curve;
* **membranes**: every pixel closer than :math:`h(x)` to a cell wall, with the half-thickness
  :math:`h` a smooth random field in ``[0.5, 1.5]`` px, i.e. membranes 1–3 px wide; about 20 %
  of the pixels, as in ISBI 2012;
* **appearance**: per-cell brightness, smoothed-noise texture, a few dark elliptical organelles
  (labelled as interior), Gaussian blur, Gaussian noise, and a random global brightness and
  contrast.

The label is 1 for cell interior and 0 for membrane, the convention of ISBI 2012 after
thresholding. With ``labels="multilabel"`` it is a multi-label example instead
(``unet_jax.heads``): class 0 ``cell`` (the interior, organelles included) and class 1
``organelle``, which overlap, packed as bits. Every example is a pure function of
``(seed, index)``.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

# Mean cell diameter in pixels; with membranes 2 px wide on average this puts ~20 % of the
# pixels on membranes (a wall of width 2h around a cell of diameter D covers ~4h/D of it).
_CELL_SPACING = (16.0, 22.0)
# Membrane half-thickness h(x): a membrane is 2h wide, so 1-3 px.
_HALF_THICKNESS = (0.5, 1.5)
_MIN_SIZE = 16
LABELS = ("membrane", "multilabel")
MULTILABEL_CLASSES = ("cell", "organelle")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
  """Zero-mean, unit-variance random field varying over about ``scale`` pixels, ``[H, W]``.

  Drawn on a coarse grid and interpolated, which is much cheaper than low-pass filtering a
  full-resolution noise image with a wide kernel.
  """
  coarse_shape = tuple(int(np.ceil(n / scale)) + 2 for n in shape)
  coarse = rng.standard_normal(coarse_shape)
  zoom = tuple((n + 2 * scale) / c for n, c in zip(shape, coarse_shape))
  field = ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
  offset = int(scale)
  field = field[offset : offset + shape[0], offset : offset + shape[1]]
  return (field - field.mean()) / (field.std() + 1e-12)


def _draw_example(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, ...]:
  """``(image [H, W] float32 in [0, 1], label [H, W] int32, organelles [H, W] bool)``."""
  spacing = rng.uniform(*_CELL_SPACING)

  # Seeds on a jittered grid reaching one spacing past every edge, so border cells are whole.
  gy = np.arange(-spacing, height + spacing, spacing)
  gx = np.arange(-spacing, width + spacing, spacing)
  seeds = np.stack(np.meshgrid(gy, gx, indexing="ij"), axis=-1).reshape(-1, 2)
  seeds = seeds + rng.uniform(-0.45, 0.45, seeds.shape) * spacing

  # Warping the query grid, not the seeds, is what bends the otherwise straight Voronoi walls.
  warp = 0.12 * spacing
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  y += warp * _smooth_field(rng, (height, width), 2.0 * spacing)
  x += warp * _smooth_field(rng, (height, width), 2.0 * spacing)
  points = np.stack([y.ravel(), x.ravel()], axis=-1)
  distances, nearest = cKDTree(seeds).query(points, k=3)

  # Distance from x to the bisector of seeds s0 (nearest) and sj is (|x-sj|^2 - |x-s0|^2) /
  # (2 |s0 - sj|); the wall is the closest of the two candidate bisectors.
  gaps = np.linalg.norm(seeds[nearest[:, 1:]] - seeds[nearest[:, :1]], axis=-1)
  to_wall = (distances[:, 1:] ** 2 - distances[:, :1] ** 2) / (2.0 * gaps)
  to_wall = to_wall.min(axis=-1).reshape(height, width)

  low, high = _HALF_THICKNESS
  half_thickness = np.clip(
      0.5 * (low + high) + 0.35 * (high - low) * _smooth_field(rng, (height, width), spacing),
      low,
      high,
  )
  # Anti-aliased membrane coverage; coverage > 1/2 exactly where to_wall < half_thickness, so
  # the image and the label agree on which pixels are membrane.
  membrane = np.clip(half_thickness + 0.5 - to_wall, 0.0, 1.0)
  label = (to_wall >= half_thickness).astype(np.int32)

  cell = nearest[:, 0].reshape(height, width)
  image = rng.uniform(0.55, 0.85, seeds.shape[0])[cell]
  texture = ndimage.gaussian_filter(rng.standard_normal((height, width)), rng.uniform(0.7, 1.5))
  image += rng.uniform(0.04, 0.08) * texture / (texture.std() + 1e-12)
  image += 0.04 * _smooth_field(rng, (height, width), 3.0 * spacing)

  # Organelles: dark ellipses inside the cells, labelled interior, the classic false positive.
  organelles = np.zeros((height, width), bool)
  num_blobs = rng.poisson(0.3 * height * width / spacing**2)
  for _ in range(num_blobs):
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(1.5, 0.3 * spacing, 2)
    angle = rng.uniform(0.0, np.pi)
    reach = int(np.ceil(max(ry, rx))) + 1
    top, left = max(int(cy) - reach, 0), max(int(cx) - reach, 0)
    window = (slice(top, min(int(cy) + reach + 1, height)),
              slice(left, min(int(cx) + reach + 1, width)))
    dy = np.arange(window[0].start, window[0].stop)[:, None] - cy
    dx = np.arange(window[1].start, window[1].stop)[None, :] - cx
    u = (np.cos(angle) * dy + np.sin(angle) * dx) / ry
    v = (-np.sin(angle) * dy + np.cos(angle) * dx) / rx
    # (1 - r) * radius is roughly the distance to the rim in pixels: a 1 px soft edge.
    coverage = np.clip((1.0 - np.sqrt(u * u + v * v)) * min(ry, rx) + 0.5, 0.0, 1.0)
    image[window] += coverage * (rng.uniform(0.25, 0.45) - image[window])
    organelles[window] |= coverage > 0.5

  image += membrane * (rng.uniform(0.08, 0.22) - image)
  image = ndimage.gaussian_filter(image, rng.uniform(0.4, 1.0))
  image += rng.uniform(0.015, 0.05) * rng.standard_normal((height, width))
  mean = image.mean()
  image = (image - mean) * rng.uniform(0.75, 1.25) + mean + rng.uniform(-0.1, 0.1)
  return np.clip(image, 0.0, 1.0).astype(np.float32), label, organelles & (label == 1)


def _check_int(name: str, value: object, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def example_rng(name: str, index, num_examples: int, seed: int) -> np.random.Generator:
  """The generator that draws example `index` of a synthetic source: the same for the same
  (seed, index) in any process, in any order. Bad indices raise with the valid range."""
  if isinstance(index, bool) or not isinstance(index, numbers.Integral):
    raise TypeError(f"{name} index must be an integer, got {type(index).__name__}")
  if not 0 <= index < num_examples:
    raise IndexError(f"{name} index {index} out of range: valid indices are 0 .. "
                     f"{num_examples - 1} (negative indices are not supported)")
  return np.random.default_rng((seed, int(index)))


class SyntheticEM:
  """A random-access dataset of synthetic EM-like images and membrane labels.

  Implements ``__len__`` and ``__getitem__``, so it is a ``grain`` ``RandomAccessDataSource``
  and works with ``grain.MapDataset.source``. Examples are generated on demand, in about
  10–30 ms for 256 × 256, and depend only on ``(seed, index)``: the same pair always gives the
  same example, in any process.

  Each example is a dict with

  * ``image``: float32 ``[H, W, channels]`` in ``[0, 1]`` (the grey image repeated over
    channels);
  * ``label``: int32 ``[H, W]``, 1 = cell interior, 0 = membrane; or with
    ``labels="multilabel"`` the bits of classes ``cell`` (1) and ``organelle`` (2).

  Args:
    num_examples: dataset length, ``>= 0``.
    size: ``(H, W)``, each ``>= 16``.
    seed: non-negative integer; different seeds give independent datasets.
    channels: number of image channels, ``>= 1``.
    labels: ``"membrane"`` (two classes) or ``"multilabel"`` (``MULTILABEL_CLASSES``).

  Raises:
    ValueError: on an invalid argument, naming it and the valid range.
  """

  def __init__(
      self,
      num_examples: int,
      *,
      size: tuple[int, int] = (256, 256),
      seed: int = 0,
      channels: int = 1,
      labels: str = "membrane",
  ):
    self._num_examples = _check_int("num_examples", num_examples, 0)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
      raise ValueError(f"size must be a pair (H, W), got {size!r}")
    self._size = (
        _check_int("size[0] (height)", size[0], _MIN_SIZE),
        _check_int("size[1] (width)", size[1], _MIN_SIZE),
    )
    self._seed = _check_int("seed", seed, 0)
    self._channels = _check_int("channels", channels, 1)
    if labels not in LABELS:
      raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    self._labels = labels

  @property
  def size(self) -> tuple[int, int]:
    return self._size

  @property
  def seed(self) -> int:
    return self._seed

  @property
  def channels(self) -> int:
    return self._channels

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = example_rng("SyntheticEM", index, self._num_examples, self._seed)
    image, label, organelles = _draw_example(rng, *self._size)
    image = np.repeat(image[..., None], self._channels, axis=-1)
    if self._labels == "multilabel":
      label = (label + 2 * organelles).astype(np.int32)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (
        f"SyntheticEM(num_examples={self._num_examples}, size={self._size}, "
        f"seed={self._seed}, channels={self._channels}"
        + (f", labels={self._labels!r})" if self._labels != "membrane" else ")")
    )
