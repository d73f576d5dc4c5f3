"""The overlap-tile core (Ronneberger et al. 2015, Fig. 2) for any number of spatial axes.

Images ``[H, W, C]`` and volumes ``[D, H, W, C]`` are tiled by the same code, one axis at a
time (``plan_axis``): the array is mirrored beyond its border, cut into tiles of one valid
input size, the tiles go through the network in batches of one fixed shape, and the outputs
are stitched back on the host (``Stitcher``):

* unpadded models (``'valid'`` encoder and decoder) predict each output voxel from its full
  context, so the outputs tile exactly. Tiles step by the output size rounded down to a
  multiple of ``2**depth``, so every tile sees the same max-pool grid and the result equals
  one pass over the whole (mirrored) array;
* models with padded convolutions (``'same'`` anywhere) see zeros at every tile edge, so their
  tiles overlap by ``overlap`` and are blended with a Gaussian window (``gaussian_window``)
  that trusts each tile's centre most. Extra mirrored context around the array keeps its
  border voxels away from tile edges too.

Tiles are cut lazily: each batch gathers its tiles from the array with mirrored indices
(``cut_tiles``), so no padded copy of the array is ever made, and the device holds one batch
at a time. ``unet_jax.inference.predict`` builds ``predict_image`` and ``predict_volume`` on
this module.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax import heads
from unet_jax.geometry import Geometry, crop_offsets
from unet_jax.training import parallel

DEFAULT_OUTPUT = 388  # the paper's output tile
# Default tile outputs per number of spatial axes: a few sizes only, so a folder of odd-sized
# inputs compiles few shapes. Volumes take smaller tiles: a 3-D tile's activations grow with
# the cube of its side.
OUTPUT_LADDERS = {2: (64, 128, 256, DEFAULT_OUTPUT), 3: (16, 32, 64)}


@dataclasses.dataclass(frozen=True)
class AxisPlan:
  """Where the tiles go along one axis; positions in pixels (voxels) of the input.

  Attributes:
    input_size, output_size: the tile's input and output sizes.
    margin: input pixels before the tile's output window.
    stride: step between tiles (a multiple of ``2**depth``).
    context: output pixels predicted beyond each edge (0 for unpadded models).
    starts: where each tile's output window starts (the first at ``-context``).
  """

  input_size: int
  output_size: int
  margin: int
  stride: int
  context: int
  starts: tuple[int, ...]


def blends(geometry: Geometry) -> bool:
  """Whether tiles must overlap and be blended (any ``'same'`` convolution)."""
  return "same" in (geometry.encoder_padding, geometry.decoder_padding)


def plan_axis(geometry: Geometry, size: int, tile: int, *, overlap: float = 0.5) -> AxisPlan:
  """The tiles covering ``size`` pixels with input tiles of ``tile`` pixels.

  ``overlap`` (a fraction of the output tile) applies to models that blend; unpadded models
  tile exactly.
  """
  geometry.check(tile, name="tile")
  output = geometry.output_size(tile)
  grid = 2**geometry.depth
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap must be in [0, 1), got {overlap}")
  if blends(geometry):
    stride = int(output * (1 - overlap)) // grid * grid
    context = -(-(output - stride) // (2 * grid)) * grid  # half the overlap, on the grid
  else:
    stride, context = output // grid * grid, 0
  if stride < grid:
    needed = int(np.ceil(grid / (1 - overlap))) if blends(geometry) else grid
    raise ValueError(
        f"a {tile}-pixel tile gives a {output}-pixel output, too small to step by a multiple "
        f"of {grid} (2**depth){' with overlap ' + str(overlap) if blends(geometry) else ''}; "
        f"use a tile of at least {geometry.input_size_for(needed)} pixels")
  count = 1 + max(0, -(-(size + 2 * context - output) // stride))
  return AxisPlan(tile, output, crop_offsets(tile, output)[0], stride, context,
                  tuple(-context + i * stride for i in range(count)))


def default_tile_size(geometry: Geometry, size: int, *, spatial_dims: int = 2) -> int:
  """A tile whose output covers ``min(size, largest)`` pixels, from a short ladder of
  sizes (``OUTPUT_LADDERS``: up to 388 for images, 64 for volumes)."""
  ladder = OUTPUT_LADDERS[spatial_dims]
  target = min(size, ladder[-1])
  return geometry.input_size_for(next(o for o in ladder if o >= target))


def tile_shape(geometry: Geometry, tile_size, shape: Sequence[int]) -> tuple[int, ...]:
  """The input tile per axis of an array of spatial ``shape``: ``tile_size`` (an int for
  every axis, or one per axis), checked valid; by default ``default_tile_size`` per axis."""
  if tile_size is None:
    return tuple(default_tile_size(geometry, n, spatial_dims=len(shape)) for n in shape)
  names = "(height, width)" if len(shape) == 2 else "(depth, height, width)"
  if isinstance(tile_size, str) or np.ndim(tile_size) > 1 or (
      np.ndim(tile_size) == 1 and len(tile_size) != len(shape)):
    raise ValueError(f"tile_size must be an int or {names}, got {tile_size!r}")
  tile = (tile_size,) * len(shape) if np.ndim(tile_size) == 0 else tuple(tile_size)
  try:
    geometry.check_shape(*tile)
  except ValueError as error:
    raise ValueError(f"tile_size {tile_size!r}: {error}") from None
  return tuple(int(t) for t in tile)


def check_batch_size(batch_size) -> None:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 1):
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def gaussian_window(*sizes: int) -> np.ndarray:
  """Blending weights of shape ``sizes`` (``[H, W]`` or ``[D, H, W]``): a Gaussian with σ = 1/8
  of the tile along each axis, peak 1 (nnU-Net's)."""
  def axis(n):
    x = np.arange(n) - (n - 1) / 2
    return np.exp(-x**2 / (2 * (n / 8) ** 2))
  return functools.reduce(np.multiply.outer, map(axis, sizes)).astype(np.float32)


def _symmetries(spatial: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
  """(quarter turns in the first two spatial axes, axes to flip) of a ``[B, *spatial, C]``
  batch. Images: the 8 symmetries of a square, or the 4 that keep a rectangle's shape;
  volumes: the 8 combinations of flips along depth, height and width."""
  if len(spatial) == 2:
    return [(turns, flip) for turns in ((0, 1, 2, 3) if spatial[0] == spatial[1] else (0, 2))
            for flip in ((), (2,))]
  return [(0, axes) for k in range(len(spatial) + 1)
          for axes in itertools.combinations(range(1, len(spatial) + 1), k)]


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("tta",))
def predict_tiles(graphdef: nnx.GraphDef, state: nnx.State, tiles: jax.Array, *,
                  tta: bool = False) -> jax.Array:
  """Probabilities ``[B, *output, classes]`` for input tiles ``[B, *input, channels]`` (images
  ``[B, h, w, C]`` or volumes ``[B, d, h, w, C]``), of the model's kind (``unet_jax.heads``:
  softmax, or sigmoid per channel).

  With ``tta`` the probabilities are averaged over the tile's symmetries (``_symmetries``:
  flips and, for square image tiles, quarter turns), each mapped back before averaging.
  """
  model = nnx.merge(graphdef, state)
  if not tta:
    return heads.probabilities(model(tiles), model.activation)
  total = 0.0
  transforms = _symmetries(tiles.shape[1:-1])
  for turns, flip in transforms:
    x = jnp.flip(jnp.rot90(tiles, turns, axes=(1, 2)), flip)
    y = heads.probabilities(model(x), model.activation)
    total = total + jnp.rot90(jnp.flip(y, flip), -turns, axes=(1, 2))
  return total / len(transforms)


def mirror_indices(index: np.ndarray, size: int) -> np.ndarray:
  """Indices into ``size`` pixels mirrored beyond both ends, as ``np.pad(mode="symmetric")``
  repeated as often as needed (any width, even for a 1-pixel image)."""
  index = np.mod(index, 2 * size)
  return np.where(index >= size, 2 * size - 1 - index, index)


def cut_tiles(array: np.ndarray, plans: Sequence[AxisPlan], positions: list[tuple[int, ...]],
              batch: int) -> np.ndarray:
  """Input tiles ``[batch, *input, C]`` around the output windows at ``positions`` (the
  array mirrored beyond its border, read through indices: no padded copy); zeros after the
  last position."""
  tiles = np.zeros((batch, *(p.input_size for p in plans), array.shape[-1]), np.float32)
  for i, starts in enumerate(positions):
    index = [mirror_indices(np.arange(p.input_size) + start - p.margin, n)
             for p, start, n in zip(plans, starts, array.shape)]
    tiles[i] = array[np.ix_(*index)]
  return tiles


class Stitcher:
  """Writes tile outputs into the result (unpadded models) or blends them (padded ones).

  Holds the result ``[*shape, classes]`` float32 and, when blending, the summed weights
  ``[*shape]`` float32; tile outputs beyond the array's border are dropped as they come.
  """

  def __init__(self, plans: Sequence[AxisPlan], shape: Sequence[int], num_classes: int, *,
               blend: bool):
    self.plans, self.shape, self.blend = plans, tuple(shape), blend
    self.total = np.zeros((*self.shape, num_classes), np.float32)
    if blend:
      self.weight = np.zeros(self.shape, np.float32)
      self.window = gaussian_window(*(p.output_size for p in plans))

  def add(self, positions: list[tuple[int, ...]], probabilities: jax.Array) -> None:
    probabilities = np.asarray(probabilities)
    for starts, tile in zip(positions, probabilities):
      target, source = [], []
      for start, plan, n in zip(starts, self.plans, self.shape):
        low, high = max(start, 0), min(start + plan.output_size, n)
        target.append(slice(low, high))
        source.append(slice(low - start, high - start))
      target, source = tuple(target), tuple(source)
      if self.blend:
        window = self.window[source]
        self.total[target] += tile[source] * window[..., None]
        self.weight[target] += window
      else:  # neighbours agree on their few shared pixels
        self.total[target] = tile[source]

  def result(self) -> np.ndarray:
    if self.blend:
      np.divide(self.total, self.weight[..., None], out=self.total)
    return self.total


def replicated_eval(model: nnx.Module, devices: Sequence[jax.Device] | None
                    ) -> tuple[jax.sharding.Mesh, nnx.GraphDef, nnx.State]:
  """A 1-D mesh over ``devices`` (default: all local devices) and ``nnx.split`` of an
  eval-mode view of ``model`` (left as it is), its state replicated on the mesh."""
  mesh = parallel.make_mesh(list(devices) if devices is not None else jax.local_devices())
  view = nnx.merge(*nnx.split(model))
  view.eval()
  graphdef, state = nnx.split(view)
  return mesh, graphdef, jax.device_put(state, parallel.replicated(mesh))


def predict_whole(model: nnx.Module, array: np.ndarray, *, tta: bool = False,
                  devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """Probabilities ``[*output, classes]`` of one pass over ``array`` ``[*spatial, C]``, which
  must be a valid input size (the batch is padded to one item per device)."""
  mesh, graphdef, state = replicated_eval(model, devices)
  tiles = np.zeros((mesh.size, *array.shape), np.float32)
  tiles[0] = array
  tiles = jax.device_put(tiles, parallel.batch_sharding(mesh))
  return np.asarray(predict_tiles(graphdef, state, tiles, tta=tta)[0])


def overlap_tile(model: nnx.Module, array: np.ndarray, tile: Sequence[int], *,
                 batch_size: int, overlap: float = 0.5, tta: bool = False,
                 devices: Sequence[jax.Device] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """Probabilities ``[*spatial, classes]`` float32 of ``model`` for ``array`` ``[*spatial,
  C]`` (float32, checked), tiled with input tiles of shape ``tile`` (valid sizes).

  Batches of ``batch_size`` tiles (rounded up to a multiple of the device count, the last one
  padded) are cut on the host, run on the devices one at a time, and stitched on the host
  while the next batch runs. ``progress(done, total)`` is called with tile counts after each
  batch.
  """
  geometry = model.geometry
  mesh, graphdef, state = replicated_eval(model, devices)
  plans = [plan_axis(geometry, n, t, overlap=overlap) for n, t in zip(array.shape, tile)]
  batch = -(-batch_size // mesh.size) * mesh.size
  stitcher = Stitcher(plans, array.shape[:-1], model.num_classes, blend=blends(geometry))
  positions = list(itertools.product(*(p.starts for p in plans)))
  pending = None
  for first in range(0, len(positions), batch):
    chunk = positions[first:first + batch]
    tiles = jax.device_put(cut_tiles(array, plans, chunk, batch), parallel.batch_sharding(mesh))
    probabilities = predict_tiles(graphdef, state, tiles, tta=tta)
    if pending is not None:  # gather the previous batch while this one runs
      stitcher.add(*pending)
      if progress is not None:
        progress(first, len(positions))
    pending = chunk, probabilities
  stitcher.add(*pending)
  if progress is not None:
    progress(len(positions), len(positions))
  return stitcher.result()
