"""Volumes through the training pipeline: 3-D tiles, augmentation, losses, config checks and a
data-parallel 3-D run that resumes exactly."""

import pathlib
import sys

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from unet_jax import losses, training
from unet_jax.data import augment, pipeline
from unet_jax.data.decode import IGNORE
from unet_jax.geometry import Geometry
from unet_jax.model import milesial
from unet_jax.training import parallel
from unet_jax.training.checkpoint import read_tree
from unet_jax.training.config_checks import check_config

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from configs import volume  # noqa: E402


def _volume(shape=(12, 14, 16), channels=1, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(size=(*shape, channels)).astype(np.float32),
          "label": rng.integers(0, 2, size=shape).astype(np.int32)}


def test_cut_tile_mirrors_the_input_and_ignores_labels_beyond_the_volume():
  example = _volume()
  tile = pipeline.cut_tile(example, -1, 2, 10, input_hw=(8, 10, 12), output_hw=(4, 6, 8))
  assert tile["image"].shape == (8, 10, 12, 1) and tile["label"].shape == (4, 6, 8)
  # The input starts 2 voxels before the output on every axis: depth -3 mirrors to depth 2.
  np.testing.assert_array_equal(tile["image"][0, 2, 2], example["image"][2, 2, 10])
  np.testing.assert_array_equal(tile["label"][1:, :, :6], example["label"][0:3, 2:8, 10:16])
  assert (tile["label"][0] == IGNORE).all() and (tile["label"][:, :, 6:] == IGNORE).all()


def test_covering_tiles_cover_every_voxel_once():
  example = _volume((7, 9, 5))
  example["label"] = np.arange(7 * 9 * 5, dtype=np.int32).reshape(7, 9, 5)
  tiles = pipeline.covering_tiles(example, input_hw=(6, 6, 6), output_hw=(4, 4, 4))
  assert len(tiles) == 2 * 3 * 2
  seen = np.concatenate([t["label"].ravel() for t in tiles])
  assert sorted(seen[seen != IGNORE].tolist()) == list(range(7 * 9 * 5))


def test_tile_shapes_reads_volume_tiles_and_names_bad_axes():
  config = ml_collections.ConfigDict({"tile_size": (116, 132, 132)})
  geometry = Geometry(3, "valid", "valid")
  assert pipeline.tile_shapes(config, geometry, 3) == ((116, 132, 132), (28, 44, 44))
  config.tile_size = (132,)  # how ml_collections hands over --config.data.tile_size=132
  assert pipeline.tile_shapes(config, geometry, 3) == ((132,) * 3, (44,) * 3)
  config.tile_size = (116, 133, 132)
  with pytest.raises(ValueError, match="height 133"):
    pipeline.tile_shapes(config, geometry, 3)
  config.tile_size = (132, 132)
  with pytest.raises(ValueError, match=r"\(depth, height, width\)"):
    pipeline.tile_shapes(config, geometry, 3)


def test_displacement_field_in_3d_follows_the_paper_grid():
  assert augment.grid_for_spacing((116, 132, 132), 32) == (5, 6, 6)
  assert augment.grid_for_spacing((20, 40, 8), 32) == (2, 3, 2)
  field = augment.displacement_field(np.random.default_rng(0), (20, 24, 28), sigma=4.0,
                                     grid=(2, 3, 3))
  assert field.shape == (3, 20, 24, 28)
  # Smooth (a cubic spline: its slope changes little from voxel to voxel), and it moves voxels.
  for axis in (1, 2, 3):
    assert np.abs(np.diff(field, n=2, axis=axis)).max() < 0.5
  assert np.abs(field).max() > 1.0
  with pytest.raises(ValueError, match="3 axes"):
    augment.displacement_field(np.random.default_rng(0), (8, 8, 8), grid=(3, 3))


def test_random_volume_tiles_are_augmented_consistently():
  example = _volume((20, 24, 24), channels=2)
  # The label is a function of the image, so every augmentation must carry both alike.
  example["label"] = (example["image"][..., 0] > 0.5).astype(np.int32)
  seen_flips = set()
  for seed in range(6):
    tile = pipeline.random_tile(example, np.random.default_rng(seed), input_hw=(12, 16, 16),
                                output_hw=(8, 12, 12), flip=True, rotate=True)
    assert tile["image"].shape == (12, 16, 16, 2) and tile["label"].shape == (8, 12, 12)
    inner = tile["image"][2:10, 2:14, 2:14, 0]
    np.testing.assert_array_equal(tile["label"], (inner > 0.5).astype(np.int32))
    seen_flips.add(tile["image"].tobytes())
  assert len(seen_flips) == 6
  tile = pipeline.random_tile(example, np.random.default_rng(0), input_hw=(12, 16, 16),
                              output_hw=(8, 12, 12), elastic=True, elastic_sigma=2.0,
                              elastic_spacing=8.0)
  assert tile["image"].shape == (12, 16, 16, 2) and tile["label"].shape == (8, 12, 12)
  assert set(np.unique(tile["label"])) <= {IGNORE, 0, 1}
  again = pipeline.random_tile(example, np.random.default_rng(0), input_hw=(12, 16, 16),
                               output_hw=(8, 12, 12), elastic=True, elastic_sigma=2.0,
                               elastic_spacing=8.0)
  np.testing.assert_array_equal(tile["image"], again["image"])


def test_dice_sums_over_the_three_axes_of_a_volume():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 4, 5, 6))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  t = np.eye(3)[labels]
  axes = (1, 2, 3)
  dice = (2 * (p * t).sum(axes) + 1) / (p.sum(axes) + t.sum(axes) + 1)
  np.testing.assert_allclose(losses.dice_loss(logits, labels, spatial_dims=3),
                             np.mean(1 - dice), rtol=1e-5)
  # Read as images (each depth slice an example), the same arrays give another value.
  assert abs(losses.dice_loss(logits, labels) - np.mean(1 - dice)) > 1e-3
  with pytest.raises(ValueError, match="spatial_dims must be 2"):
    losses.dice_loss(logits, labels, spatial_dims=4)


def test_class_weights_weight_the_cross_entropy_per_class():
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(8, 8, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(-1, 2, size=(8, 8, 8, 8)).astype(np.int32)}
  model = milesial(1, 2, features=(4, 8), spatial_dims=3, norm_axis_name="data",
                   rngs=nnx.Rngs(0))
  tx = optax.sgd(0.0)
  state, graphdef, _ = training.create_train_state(model, tx, seed=0)
  mesh = parallel.make_mesh()

  def loss_of(class_weights):
    config = ml_collections.ConfigDict({"name": "cross_entropy",
                                        "class_weights": class_weights})
    step = parallel.data_parallel(
        lambda s, b: training.train_step(s, b, graphdef=graphdef, tx=tx, loss_config=config,
                                         num_classes=2), mesh, batch_argnums=(1,))
    _, measurements = step(parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh))
    return float(measurements["loss"])

  reference = milesial(1, 2, features=(4, 8), spatial_dims=3, rngs=nnx.Rngs(0))
  reference.train()
  logits = reference(batch["image"])
  labels, valid = np.maximum(batch["label"], 0), batch["label"] != IGNORE
  expected = losses.weighted_cross_entropy(logits, labels,
                                           weights=valid * np.array([0.25, 1.0])[labels])
  np.testing.assert_allclose(loss_of((0.25, 1.0)), expected, rtol=1e-5)
  assert abs(loss_of((0.25, 1.0)) - loss_of(None)) > 1e-4


def test_config_checks_volume_agreement():
  check_config(volume.get_config())
  check_config(volume.get_config("cpu,sparse"))
  config = volume.get_config("cpu")
  config.model.spatial_dims = 2
  with pytest.raises(ValueError, match="needs an image source"):
    check_config(config)
  config = volume.get_config()
  config.data.tile_size = (132, 132)
  config.data.weight_map.enabled = True
  config.loss.class_weights = (1.0,)
  with pytest.raises(ValueError, match="invalid config") as error:
    check_config(config)
  for text in ("tile_size", "weight_map", "class_weights"):
    assert text in str(error.value)
  with pytest.raises(ValueError, match="unknown variant"):
    volume.get_config("gpu")


def tiny_volume_config(tmp_path=None, **overrides):
  config = volume.get_config("cpu")
  config.model.features = (4, 8)
  config.data.synthetic3d.update(num_train=8, num_val=2, size=(16, 20, 20))
  config.data.tile_size = (16, 16, 16)
  config.data.augment.elastic = True
  config.data.augment.elastic_spacing = 8.0
  config.data.num_threads = 1
  config.loss.class_weights = (0.5, 1.0)
  config.loss.name = "dice_ce"
  config.batch_size, config.num_steps = 8, 4
  config.log_every = config.eval_every = config.checkpoint.every = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def test_a_3d_run_trains_evaluates_and_resumes_exactly(tmp_path):
  config = tiny_volume_config()
  final = training.train_and_evaluate(config, str(tmp_path / "straight"))
  assert 0.0 <= final["iou_cell"] <= 1.0 and 0.0 <= final["pixel_error"] <= 1.0
  assert (tmp_path / "straight" / "predictions.png").is_file()

  # The same run stopped after step 2, then started again with the full length.
  training.train_and_evaluate(tiny_volume_config(num_steps=2), str(tmp_path / "resumed"))
  training.train_and_evaluate(config, str(tmp_path / "resumed"))
  straight = read_tree(tmp_path / "straight" / "checkpoints" / "4" / "state")
  resumed = read_tree(tmp_path / "resumed" / "checkpoints" / "4" / "state")
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def test_cached_sources_draw_each_example_once_within_the_budget():
  calls = []

  class Counting:
    def __len__(self):
      return 3

    def __getitem__(self, index):
      calls.append(index)
      return _volume((4, 4, 4), seed=index)  # 64·4 + 64·4 = 512 bytes

  cached = pipeline.Cached(Counting(), max_bytes=1024)
  first = [cached[i]["image"] for i in (0, 1, 2)]
  again = [cached[i]["image"] for i in (0, 1, 2)]
  assert calls == [0, 1, 2, 2]  # examples 0 and 1 fill the budget; 2 is drawn every time
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)


def test_sparse_labels_train_only_on_the_labelled_slices():
  """With every 4th slice labelled, the loss is the loss of those slices alone, and the
  logits of unlabelled slices get no gradient (Çiçek et al.'s sparse annotation)."""
  from unet_jax.data import volumes
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 9, 6, 7, 2)).astype(np.float32)
  dense = rng.integers(0, 2, size=(2, 9, 6, 7)).astype(np.int32)
  sparse = np.stack([volumes.sparse_slices(label, axis=0, every=4, offset=1) for label in dense])
  kept = [1, 5]
  assert (sparse[:, kept] == dense[:, kept]).all() and (np.delete(sparse, kept, 1) == IGNORE).all()
  for loss in (losses.weighted_cross_entropy,
               lambda z, y, **k: losses.dice_ce_loss(z, y, spatial_dims=3, **k)):
    np.testing.assert_allclose(loss(logits, sparse, ignore_index=IGNORE),
                               loss(logits[:, kept], dense[:, kept]), rtol=1e-5)
    grad = jax.grad(lambda z: loss(z, sparse, ignore_index=IGNORE))(logits)
    assert np.abs(np.delete(np.asarray(grad), kept, 1)).max() == 0
    assert np.abs(np.asarray(grad)[:, kept]).max() > 0


def test_sparse_labels_config_reaches_the_training_source_only():
  config = volume.get_config("cpu,sparse").data
  config.synthetic3d.update(num_train=2, num_val=1, size=(16, 16, 16))
  train, validation = (pipeline.make_source(config, split) for split in ("train", "validation"))
  labels = train[0]["label"]
  assert (labels[0::4] != IGNORE).all() and (np.delete(labels, range(0, 16, 4), 0) == IGNORE).all()
  assert (validation[0]["label"] != IGNORE).all()
