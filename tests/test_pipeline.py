"""Batching with grain: deterministic batches, per-host shares, iterator resume (threads and
worker processes), errors from inside the pipeline, evaluation tiles, and the configs."""

import json
import pathlib
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from unet_jax import training
from unet_jax.data import pipeline
from unet_jax.geometry import Geometry

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from configs import default, folder as folder_config, isbi2012 as isbi_config  # noqa: E402
from configs import oxford_pets as pets_config  # noqa: E402

TILE = dict(input_hw=(76, 76), output_hw=(36, 36))  # isbi2012:tiny's depth-2 unpadded model


def _isbi_config(directory, slices=8, size=(48, 56)):
  """isbi2012:tiny on a small TIFF stack written to ``directory``."""
  rng = np.random.default_rng(0)
  tifffile.imwrite(directory / "train-volume.tif",
                   rng.integers(0, 256, (slices, *size), dtype=np.uint8))
  labels = np.full((slices, *size), 255, np.uint8)
  labels[:, ::9] = labels[:, :, ::11] = 0  # membranes between rectangular cells
  tifffile.imwrite(directory / "train-labels.tif", labels)
  config = isbi_config.get_config("tiny")
  config.data.isbi2012.update(dir=str(directory), train_slices=(0, slices - 2),
                              val_slices=(slices - 2, slices))
  return config


def _indexed_folder(directory, count):
  """Images whose every pixel is their index, so a tile tells which example it came from."""
  for i in range(count):
    for sub in ("images", "masks"):
      (directory / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((36, 36), i, np.uint8)).save(directory / "images" / f"{i:02d}.png")
    Image.fromarray(np.zeros((36, 36), np.uint8)).save(directory / "masks" / f"{i:02d}.png")
  config = folder_config.get_config("tiny").data
  config.folder.update(dir=str(directory), val_fraction=0.25)
  config.channels = 1
  config.augment.update(elastic=False, shift=0, brightness=0.0, contrast=0.0)
  return config


def _equal_batches(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_batches_are_deterministic_with_weight_map_and_elastic(tmp_path):
  config = _isbi_config(tmp_path).data
  dataset = pipeline.train_dataset(config, **TILE, local_batch=3)
  batch = dataset[5]
  assert batch["image"].shape == (3, 76, 76, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == batch["weight"].shape == (3, 36, 36)
  assert set(np.unique(batch["label"])) <= {0, 1, pipeline.IGNORE}
  assert (batch["weight"][batch["label"] == 0] > 1.0).all()  # membranes weigh more
  _equal_batches([batch], [pipeline.train_dataset(config, **TILE, local_batch=3)[5]])
  assert not np.array_equal(dataset[6]["image"], batch["image"])


def test_each_process_reads_its_own_share(tmp_path):
  config = _indexed_folder(tmp_path, 8)  # 6 training images
  seen = []
  for process in range(2):
    dataset = pipeline.train_dataset(config, input_hw=(36, 36), output_hw=(36, 36),
                                     local_batch=1, process_index=process, process_count=2)
    seen.append({int(round(dataset[s]["image"][0, 0, 0, 0] * 255)) for s in range(3)})
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 6  # one epoch: every training image exactly once


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_resumes_from_its_state(tmp_path, num_workers):
  config = _indexed_folder(tmp_path, 8)
  config.num_workers = num_workers
  config.augment.update(elastic=True, brightness=0.1, contrast=0.1)
  dataset = pipeline.train_dataset(config, input_hw=(36, 36), output_hw=(36, 36), local_batch=2)
  iterator = pipeline.train_iterator(dataset, config)
  first = [next(iterator) for _ in range(2)]
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  state = json.loads(json.dumps(state))  # as a checkpoint stores it
  resumed = pipeline.train_iterator(dataset, config, state)
  _equal_batches([next(resumed) for _ in range(3)], expected)
  _equal_batches(first + expected, [dataset[s] for s in range(5)])  # batch s = dataset[s]


def test_a_bad_file_stops_the_iterator_with_its_name(tmp_path):
  config = _indexed_folder(tmp_path, 4)
  config.folder.val_fraction = 0.5
  (tmp_path / "masks" / "00.png").write_bytes(b"\x89PNG broken")
  (tmp_path / "masks" / "01.png").write_bytes(b"\x89PNG broken")
  (tmp_path / "masks" / "02.png").write_bytes(b"\x89PNG broken")
  dataset = pipeline.train_dataset(config, input_hw=(36, 36), output_hw=(36, 36), local_batch=2)
  with pytest.raises(ValueError, match=r"cannot read .*masks.0[0-2]\.png"):
    next(pipeline.train_iterator(dataset, config))


def test_eval_batches_cover_every_validation_pixel_once(tmp_path):
  config = _isbi_config(tmp_path, size=(48, 56)).data  # 2 slices of 48×56 → 2×2 tiles each
  batches = list(pipeline.eval_batches(config, **TILE, local_batch=3))
  assert len(batches) == 3 and batches[0]["image"].shape == (3, 76, 76, 1)
  assert sum(int((b["label"] != pipeline.IGNORE).sum()) for b in batches) == 2 * 48 * 56
  shares = [list(pipeline.eval_batches(config, **TILE, local_batch=2, process_index=p,
                                       process_count=3)) for p in range(3)]
  assert [len(s) for s in shares] == [2, 2, 2]  # 8 tiles → 3, 3, 2: the same step count
  assert sum(int((b["label"] != pipeline.IGNORE).sum()) for s in shares for b in s) == 2 * 48 * 56


def _keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    keys.add(prefix + key)
    if hasattr(value, "items"):
      keys |= _keys(value, f"{prefix}{key}.")
  return keys


@pytest.mark.parametrize("module,variant", [(isbi_config, ""), (isbi_config, "small"),
                                            (isbi_config, "tiny"), (folder_config, ""),
                                            (folder_config, "tiny"), (pets_config, ""),
                                            (pets_config, "tiny")])
def test_configs_have_every_field_of_the_default(module, variant):
  config = module.get_config(variant)
  source_specific = {"data.num_train", "data.num_val", "data.image_size",
                     "data.synthetic_labels"}  # synthetic only
  assert _keys(default.get_config()) - source_specific <= _keys(config)
  assert config.data.source in config.data
  assert len(config.data.class_names) == config.model.num_classes
  kwargs = training.model_kwargs(config.model)
  geometry = Geometry(len(kwargs["features"]) - 1, kwargs["encoder_padding"],
                      kwargs["decoder_padding"])
  pipeline.tile_shapes(config.data, geometry)  # a valid model input
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("huge")


@pytest.mark.slow
def test_isbi_tiny_config_trains_end_to_end(tmp_path):
  config = _isbi_config(tmp_path)
  final = training.train_and_evaluate(config, str(tmp_path / "work"))
  assert 0.0 <= final["pixel_error"] <= 1.0 and "iou_membrane" in final
