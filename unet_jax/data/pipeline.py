"""From a source of whole images to batches of tiles, with grain.

Training tiles are cut the paper's way (overlap-tile): a random output window of the model's
output size, and around it the input window of the model's input size, mirror-padded where
it crosses the image border; the label (and the weight map) are cut to the output window.
Each process reads only its own share of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np

from unet_jax.data.synthetic import SyntheticEM
from unet_jax.geometry import crop_offsets
from unet_jax.weight_map import weight_map

IGNORE = -1  # label of padding pixels; metrics and losses skip it

SOURCES = ("synthetic",)


def make_source(config: ml_collections.ConfigDict, split: str):
  """The random-access source of whole ``{"image", "label"}`` examples for ``split``."""
  if config.source == "synthetic":
    count = config.num_train if split == "train" else config.num_val
    # Disjoint seeds keep validation images out of the training set.
    seed = config.seed if split == "train" else config.seed + 10_000
    return SyntheticEM(count, size=tuple(config.image_size), seed=seed,
                       channels=config.channels)
  raise ValueError(f"unknown data source {config.source!r}; known sources: {SOURCES}")


def cut_tile(example: dict[str, np.ndarray], top: int, left: int, *,
             input_hw: tuple[int, int], output_hw: tuple[int, int]) -> dict[str, np.ndarray]:
  """The input window around the output window at ``(top, left)`` (mirror-padded), and the
  label and weight cut to the output window (padded with ``IGNORE`` / 0 beyond the image)."""
  image, label = example["image"], example["label"]
  height, width = label.shape
  (m_top, m_bottom), (m_left, m_right) = (crop_offsets(i, o) for i, o in zip(input_hw, output_hw))
  # Pad enough for any window position, including images smaller than the output window.
  pad_h = max(0, output_hw[0] - height)
  pad_w = max(0, output_hw[1] - width)
  padded = np.pad(image, ((m_top, m_bottom + pad_h), (m_left, m_right + pad_w), (0, 0)),
                  mode="symmetric")
  tile = {"image": padded[top:top + input_hw[0], left:left + input_hw[1]]}
  spatial = ((0, pad_h), (0, pad_w))
  tile["label"] = np.pad(label, spatial, constant_values=IGNORE)[
      top:top + output_hw[0], left:left + output_hw[1]]
  if "weight" in example:
    tile["weight"] = np.pad(example["weight"], spatial)[
        top:top + output_hw[0], left:left + output_hw[1]]
  return tile


def random_tile(example: dict[str, np.ndarray], rng: np.random.Generator, *,
                input_hw: tuple[int, int], output_hw: tuple[int, int],
                flip: bool = True, rotate: bool = True) -> dict[str, np.ndarray]:
  """A random overlap tile, randomly flipped and rotated by multiples of 90°."""
  height, width = example["label"].shape
  top = int(rng.integers(0, max(height - output_hw[0], 0) + 1))
  left = int(rng.integers(0, max(width - output_hw[1], 0) + 1))
  tile = cut_tile(example, top, left, input_hw=input_hw, output_hw=output_hw)
  if flip and rng.random() < 0.5:
    tile = {k: v[:, ::-1] for k, v in tile.items()}
  if rotate and input_hw[0] == input_hw[1]:
    turns = int(rng.integers(0, 4))
    tile = {k: np.rot90(v, turns, axes=(0, 1)) for k, v in tile.items()}
  return {k: np.ascontiguousarray(v) for k, v in tile.items()}


def center_tile(example: dict[str, np.ndarray], *, input_hw, output_hw) -> dict[str, np.ndarray]:
  height, width = example["label"].shape
  top, left = max(height - output_hw[0], 0) // 2, max(width - output_hw[1], 0) // 2
  return cut_tile(example, top, left, input_hw=input_hw, output_hw=output_hw)


def _with_weight_map(config: ml_collections.ConfigDict):
  def add(example):
    label = example["label"]
    weight = weight_map(label, w0=config.w0, sigma=config.sigma, foreground=config.foreground)
    return {**example, "weight": weight}
  return add


def train_dataset(config: ml_collections.ConfigDict, *, input_hw, output_hw, local_batch: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Batches of random tiles for this process; ``dataset[step]`` is step ``step``'s batch."""
  dataset = grain.MapDataset.source(make_source(config, "train"))
  if config.weight_map.enabled:
    dataset = dataset.map(_with_weight_map(config.weight_map))
  dataset = dataset.seed(config.seed).shuffle().repeat(None)
  dataset = dataset[process_index::process_count]
  augment = config.augment
  dataset = dataset.random_map(
      lambda example, rng: random_tile(example, rng, input_hw=input_hw, output_hw=output_hw,
                                       flip=augment.flip, rotate=augment.rotate))
  return dataset.batch(local_batch, drop_remainder=True)


def train_iterator(dataset: grain.MapDataset, config: ml_collections.ConfigDict,
                   state: dict[str, Any] | None = None) -> grain.DatasetIterator:
  """A prefetching iterator over ``dataset``; ``state`` (from ``get_state``) resumes it."""
  options = grain.ReadOptions(num_threads=config.num_threads,
                              prefetch_buffer_size=config.prefetch)
  iterator = iter(dataset.to_iter_dataset(options))
  if state is not None:
    iterator.set_state(state)
  return iterator


def eval_batches(config: ml_collections.ConfigDict, *, input_hw, output_hw, local_batch: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Center tiles of every validation image, this process's share, in fixed-size batches.

  The last batch is filled with copies whose labels are ``IGNORE``, so every process runs
  the same number of identical-shape steps and nothing is counted twice.
  """
  source = make_source(config, "validation")
  if config.weight_map.enabled:
    source = grain.MapDataset.source(source).map(_with_weight_map(config.weight_map))
  indices = list(range(len(source)))[process_index::process_count]
  per_process = -(-len(source) // process_count)
  num_batches = -(-per_process // local_batch)
  tiles = [center_tile(source[i], input_hw=input_hw, output_hw=output_hw) for i in indices]
  for b in range(num_batches):
    chunk = tiles[b * local_batch:(b + 1) * local_batch]
    filler = {**tiles[0], "label": np.full_like(tiles[0]["label"], IGNORE)}
    chunk += [filler] * (local_batch - len(chunk))
    yield {k: np.stack([t[k] for t in chunk]) for k in chunk[0]}
