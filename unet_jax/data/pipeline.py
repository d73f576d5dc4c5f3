"""From a source of whole images to batches of tiles, with grain.

Sources (``config.data.source``, each parameterised by the section of ``config.data`` with
its name): ``synthetic`` (:mod:`~unet_jax.data.synthetic`), ``isbi2012``
(:mod:`~unet_jax.data.isbi2012`), ``folder`` (:mod:`~unet_jax.data.folder`) and ``tfds``
(:mod:`~unet_jax.data.tfds_source`) for images; ``synthetic3d``
(:mod:`~unet_jax.data.synthetic3d`) and ``volumes`` (:mod:`~unet_jax.data.volumes`) for
volumes. Each is random access and gives whole examples ``{"image": float32 [H, W, C] in
[0, 1], "label": int32 [H, W]}``, or ``[D, H, W, C]`` and ``[D, H, W]`` for volumes, where
everything below works per axis alike. ``data.sparse_labels`` (``every`` > 1, ``axis``,
``offset``) keeps the training labels of every ``every``-th slice only, as in Çiçek et al.'s
sparse annotation (validation stays dense). ``data.cache_mb`` keeps whole examples in memory
once read (:class:`Cached`), for sources slow to read or draw.

Training tiles are cut the paper's way (overlap-tile): a random output window of the model's
output size, and around it the input window of the model's input size, mirror-padded where
it crosses the image border; the label (and the weight map) are cut to the output window.
Images smaller than a tile are padded, never resized. The weight map is computed on the
whole label first, then cut and deformed with it. Augmentation (:mod:`~unet_jax.data.augment`)
is configured by ``config.data.augment``. Each process reads only its own share of every
global batch, prepared by grain threads (``data.num_threads``) and, optionally, worker
processes (``data.num_workers``). Validation cuts tiles that cover every pixel of every
validation image exactly once, so its metrics are over whole images.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from unet_jax.data import augment, folder, isbi2012, tfds_source
from unet_jax.data.decode import IGNORE
from unet_jax.data.synthetic import SyntheticEM
from unet_jax.geometry import Geometry, as_hw, as_sizes, crop_offsets
from unet_jax.weight_map import weight_map

__all__ = ["IGNORE", "make_source", "tile_shapes", "cut_tile", "random_tile", "covering_tiles",
           "WithWeightMap", "Cached", "train_dataset", "train_iterator", "eval_batches"]

def _volumes(config, split, *, channels):
  from unet_jax.data import volumes
  return volumes.from_config(config, split, channels=channels)


def _synthetic3d(config, split, *, channels):
  from unet_jax.data import synthetic3d
  return synthetic3d.from_config(config, split, channels=channels)


_FROM_CONFIG = {"isbi2012": isbi2012.from_config, "folder": folder.from_config,
                "tfds": tfds_source.from_config, "volumes": _volumes,
                "synthetic3d": _synthetic3d}
SOURCES = ("synthetic", *_FROM_CONFIG)
VOLUME_SOURCES = ("volumes", "synthetic3d")  # whole examples are volumes [D, H, W, C]


def make_source(config: ml_collections.ConfigDict, split: str):
  """The random-access source of whole ``{"image", "label"}`` examples for ``split``
  (``"train"`` or ``"validation"``) of ``config`` (a ``config.data``)."""
  if config.source == "synthetic":
    count = config.num_train if split == "train" else config.num_val
    # Disjoint seeds keep validation images out of the training set.
    seed = config.seed if split == "train" else config.seed + 10_000
    return SyntheticEM(count, size=as_hw(config.image_size), seed=seed,
                       channels=config.channels,
                       labels=config.get("synthetic_labels", "membrane"))
  if config.source not in _FROM_CONFIG:
    raise ValueError(f"unknown data source {config.source!r}; known sources: {SOURCES}")
  if config.source not in config:
    raise ValueError(f"data.source is {config.source!r} but config.data has no "
                     f"{config.source!r} section with its settings (see configs/isbi2012.py, "
                     f"configs/folder.py and configs/oxford_pets.py)")
  source = _FROM_CONFIG[config.source](config[config.source], split, channels=config.channels)
  if not len(source):
    raise ValueError(f"the {split} split of {source!r} is empty")
  sparse = config.get("sparse_labels")
  if split == "train" and sparse is not None and sparse.get("every", 0) > 1:
    from unet_jax.data import volumes
    source = volumes.SparseLabels(source, axis=sparse.get("axis", 0), every=sparse.every,
                                  offset=sparse.get("offset", 0))
  return source


def tile_shapes(config: ml_collections.ConfigDict, geometry: Geometry, spatial_dims: int = 2
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(input_size, output_size)`` of a training tile, one size per spatial axis (``(H, W)``,
  or ``(D, H, W)`` for ``spatial_dims=3``), ``config.tile_size`` checked against the model's
  ``geometry`` before any data is read.

  Raises:
    ValueError: naming the nearest valid sizes when the tile is not a valid model input.
  """
  try:
    tile = as_sizes(config.tile_size, spatial_dims)
  except ValueError:
    tile = tuple(np.ravel(config.tile_size))
  if len(tile) != spatial_dims:
    axes = "(depth, height, width)" if spatial_dims == 3 else "(height, width)"
    raise ValueError(f"data.tile_size must be {axes} for a model with spatial_dims="
                     f"{spatial_dims}, got {tile}")
  try:
    output_size = geometry.check_shape(*tile)
  except ValueError as error:
    raise ValueError(f"data.tile_size {tile} is not a valid model input: {error}") from None
  return tile, output_size


def _window(array: np.ndarray, corner: Sequence[int], sizes: Sequence[int], **pad
            ) -> np.ndarray:
  """The window of ``sizes`` at ``corner`` over the leading ``len(sizes)`` axes of ``array``,
  padded (``np.pad(**pad)``) where it leaves the array."""
  before = [max(-c, 0) for c in corner]
  after = [max(c + n - extent, 0) for c, n, extent in zip(corner, sizes, array.shape)]
  if any(before) or any(after):
    widths = tuple(zip(before, after)) + ((0, 0),) * (array.ndim - len(sizes))
    array = np.pad(array, widths, **pad)
    corner = [c + b for c, b in zip(corner, before)]
  return array[tuple(slice(c, c + n) for c, n in zip(corner, sizes))]


def cut_tile(example: dict[str, np.ndarray], *corner: int, input_hw: Sequence[int],
             output_hw: Sequence[int]) -> dict[str, np.ndarray]:
  """The input window around the output window at ``corner`` (``top, left``, or ``front,
  top, left`` for volumes; mirror-padded), and the label and weight cut to the output window
  (padded with ``IGNORE`` / 0 beyond the image). ``input_hw`` and ``output_hw`` give one size
  per spatial axis. The corner may be negative or put the window past the far edges."""
  margins = [crop_offsets(i, o)[0] for i, o in zip(input_hw, output_hw)]
  tile = {"image": _window(example["image"], [c - m for c, m in zip(corner, margins)],
                           input_hw, mode="symmetric")}
  tile["label"] = _window(example["label"], corner, output_hw, constant_values=IGNORE)
  if "weight" in example:
    tile["weight"] = _window(example["weight"], corner, output_hw, constant_values=0)
  return tile


def random_tile(example: dict[str, np.ndarray], rng: np.random.Generator, *,
                input_hw: Sequence[int], output_hw: Sequence[int], flip: bool = True,
                rotate: bool = True, shift: int = 0, elastic: bool = False,
                elastic_sigma: float = 10.0, elastic_grid: int = 3,
                elastic_spacing: float | None = None, brightness: float = 0.0,
                contrast: float = 0.0) -> dict[str, np.ndarray]:
  """A random overlap tile of ``example`` (an image, or a volume), augmented (the keywords are
  ``data.augment``).

  The output window lies anywhere in the image, and up to ``shift`` px beyond its edges
  (whose labels are ``IGNORE``); then, as enabled: elastic deformation (σ =
  ``elastic_sigma`` px on a grid of ``elastic_grid`` control points per axis, or of points
  ``elastic_spacing`` px apart), a mirror, rotations by 90°, brightness and contrast jitter
  (see :mod:`unet_jax.data.augment`).
  """
  corner = [int(rng.integers(-shift, max(n - o, 0) + shift + 1))
            for n, o in zip(example["label"].shape, output_hw)]
  if elastic:
    grid = (augment.grid_for_spacing(input_hw, elastic_spacing) if elastic_spacing
            else elastic_grid)
    field = augment.displacement_field(rng, input_hw, sigma=elastic_sigma, grid=grid)
    m = augment.field_margin(field)
    # Growing both windows by 2m keeps them centered on each other (same crop offsets).
    window = cut_tile(example, *(c - m for c in corner),
                      input_hw=tuple(n + 2 * m for n in input_hw),
                      output_hw=tuple(n + 2 * m for n in output_hw))
    tile = augment.elastic_deform(window, field, margin=m, output_hw=output_hw)
  else:
    tile = cut_tile(example, *corner, input_hw=input_hw, output_hw=output_hw)
  tile = augment.flip_rotate(tile, rng, flip=flip, rotate=rotate)
  tile["image"] = augment.jitter(tile["image"], rng, brightness=brightness, contrast=contrast)
  return {k: np.ascontiguousarray(v) for k, v in tile.items()}


def _corners(shape: Sequence[int], output_hw: Sequence[int]) -> list[tuple[int, ...]]:
  """Output-window corners covering ``shape`` exactly once, the last axis fastest."""
  return list(itertools.product(*(range(0, n, o) for n, o in zip(shape, output_hw))))


def covering_tiles(example: dict[str, np.ndarray], *, input_hw, output_hw
                   ) -> list[dict[str, np.ndarray]]:
  """Tiles whose output windows cover every pixel of ``example`` exactly once, in rows (the
  last row and column reach past the far edges, where the labels are ``IGNORE``)."""
  return [cut_tile(example, *corner, input_hw=input_hw, output_hw=output_hw)
          for corner in _corners(example["label"].shape, output_hw)]


class WithWeightMap:
  """``source``'s examples with the paper's ``weight`` map of their whole label added.

  The map depends only on the label, so it is computed once per example and kept for later
  epochs (for the first ``cache_size`` examples seen; in each worker process).
  """

  def __init__(self, source, config: ml_collections.ConfigDict, *, cache_size: int = 256):
    self.source, self.config, self.cache_size = source, config, cache_size
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self.source[index]
    weight = self._cache.get(index)
    if weight is None:
      weight = weight_map(example["label"], w0=self.config.w0, sigma=self.config.sigma,
                          foreground=self.config.foreground)
      if len(self._cache) < self.cache_size:
        self._cache[index] = weight
    return {**example, "weight": weight}

  def __repr__(self) -> str:
    return f"WithWeightMap({self.source!r})"


class Cached:
  """``source``'s examples kept in memory once read, up to ``max_bytes`` in all (the first
  examples asked for; in each worker process): for sources that are slow to read or draw
  and small enough to hold, such as synthetic volumes (``data.cache_mb``)."""

  def __init__(self, source, *, max_bytes: int):
    self.source, self.max_bytes, self.used = source, max_bytes, 0
    self._cache: dict[int, dict[str, np.ndarray]] = {}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self._cache.get(index)
    if example is None:
      example = self.source[index]
      size = sum(v.nbytes for v in example.values())
      if self.used + size <= self.max_bytes:
        self._cache[index], self.used = example, self.used + size
    return example

  def __repr__(self) -> str:
    return f"Cached({self.source!r}, max_bytes={self.max_bytes})"


def _source(config: ml_collections.ConfigDict, split: str):
  source = make_source(config, split)
  if config.get("cache_mb"):
    source = Cached(source, max_bytes=int(config.cache_mb * 2**20))
  return WithWeightMap(source, config.weight_map) if config.weight_map.enabled else source


def train_dataset(config: ml_collections.ConfigDict, *, input_hw, output_hw, local_batch: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Batches of random tiles for this process; ``dataset[step]`` is step ``step``'s batch."""
  dataset = grain.MapDataset.source(_source(config, "train"))
  dataset = dataset.seed(config.seed).shuffle().repeat(None)
  options = config.augment.to_dict()
  dataset = dataset.random_map(
      lambda example, rng: random_tile(example, rng, input_hw=input_hw, output_hw=output_hw,
                                       **options))
  # Global batch s is examples [s·G, (s+1)·G); process p takes its contiguous part
  # [s·G + p·L, s·G + (p+1)·L). The global batches, and the augmentation (seeded by the global
  # index), do not depend on how many processes share them; each reads only its own part.
  dataset = dataset.batch(local_batch, drop_remainder=True)
  return dataset[process_index::process_count]


def train_iterator(dataset: grain.MapDataset, config: ml_collections.ConfigDict,
                   state: dict[str, Any] | None = None) -> grain.DatasetIterator:
  """A prefetching iterator over ``dataset``; ``state`` (from ``get_state``) resumes it.

  ``config.num_threads`` threads prepare tiles; with ``config.num_workers > 0`` that many
  worker processes do (each with those threads), which sidesteps the GIL for the
  augmentation. The iterator's state depends on ``num_workers``: resume with the same value.
  """
  options = grain.ReadOptions(num_threads=config.num_threads,
                              prefetch_buffer_size=config.prefetch)
  dataset = dataset.to_iter_dataset(options)
  num_workers = config.get("num_workers", 0)
  if num_workers:
    _parse_grain_flags()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  iterator = iter(dataset)
  if state is not None:
    iterator.set_state(state)
  return iterator


def _parse_grain_flags() -> None:
  """grain's worker processes read absl flags, which only ``app.run`` parses; outside it (in a
  notebook, a test, a benchmark) take their defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def eval_batches(config: ml_collections.ConfigDict, *, input_hw, output_hw, local_batch: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Tiles covering every validation image (:func:`covering_tiles`), this process's share
  (every ``process_count``-th tile), in fixed-size batches made as they are needed.

  The last batch is filled with copies whose labels are ``IGNORE``, so every process runs
  the same number of identical-shape steps and nothing is counted twice. With several
  processes, the number of tiles is counted first from every image's size.
  """
  source = _source(config, "validation")
  tiles = (tile for i in range(len(source))
           for tile in covering_tiles(source[i], input_hw=input_hw, output_hw=output_hw))
  mine = itertools.islice(tiles, process_index, None, process_count)
  num_batches = None
  if process_count > 1:
    labels = source.source if isinstance(source, WithWeightMap) else source
    total = sum(len(_corners(labels[i]["label"].shape, output_hw)) for i in range(len(labels)))
    num_batches = math.ceil(math.ceil(total / process_count) / local_batch)
  filler, produced = None, 0
  while num_batches is None or produced < num_batches:
    chunk = list(itertools.islice(mine, local_batch))
    if not chunk and num_batches is None:
      return
    if len(chunk) < local_batch:
      if filler is None:
        first = chunk[0] if chunk else covering_tiles(source[0], input_hw=input_hw,
                                                      output_hw=output_hw)[0]
        filler = {**first, "label": np.full_like(first["label"], IGNORE)}
      chunk += [filler] * (local_batch - len(chunk))
    yield {k: np.stack([t[k] for t in chunk]) for k in chunk[0]}
    produced += 1
