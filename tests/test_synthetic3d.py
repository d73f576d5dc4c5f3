"""Tests for the synthetic 3-D cell volumes."""

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from unet_jax.data import synthetic3d
from unet_jax.data.synthetic3d import SyntheticCells3D

SIZE = (24, 32, 40)


@pytest.fixture(scope="module")
def dataset() -> SyntheticCells3D:
  return SyntheticCells3D(4, size=SIZE, seed=3, channels=2, cell_size=14)


@pytest.fixture(scope="module")
def cubes() -> list[dict[str, np.ndarray]]:
  """Volumes at the default cell size, on which the membrane share is stated."""
  source = SyntheticCells3D(3, size=(40, 40, 40), seed=5)
  return [source[index] for index in range(len(source))]


def test_shapes_dtypes_and_ranges(dataset):
  assert len(dataset) == 4
  example = dataset[0]
  assert set(example) == {"image", "label"}
  image, label = example["image"], example["label"]
  assert image.shape == SIZE + (2,) and image.dtype == np.float32
  assert label.shape == SIZE and label.dtype == np.int32
  assert 0.0 <= image.min() and image.max() <= 1.0
  np.testing.assert_array_equal(image[..., 0], image[..., 1])
  assert set(np.unique(label).tolist()) == {0, 1}


def test_deterministic_per_seed_and_index(dataset):
  again = SyntheticCells3D(4, size=SIZE, seed=3, channels=2, cell_size=14)
  # Access order does not matter: index 2 first here, index 0 first in the fixture.
  for index in (2, 0):
    first, second = dataset[index], again[index]
    np.testing.assert_array_equal(first["image"], second["image"])
    np.testing.assert_array_equal(first["label"], second["label"])


def test_different_indices_and_seeds_differ(dataset):
  assert not np.array_equal(dataset[0]["label"], dataset[1]["label"])
  assert not np.allclose(dataset[0]["image"], dataset[1]["image"])
  other_seed = SyntheticCells3D(4, size=SIZE, seed=4, channels=2, cell_size=14)
  assert not np.array_equal(dataset[0]["label"], other_seed[0]["label"])


def test_anisotropic_volume_has_cells_along_every_axis():
  size = (16, 48, 24)
  example = SyntheticCells3D(1, size=size, seed=1, cell_size=10)[0]
  label = example["label"]
  assert example["image"].shape == size + (1,) and label.shape == size
  # The walls are 3-D: each axis crosses membranes, so no axis sees one cell throughout.
  for axis in range(3):
    assert (label == 0).any(axis=axis).mean() > 0.5, axis


def test_membranes_foreground_and_cells(cubes):
  for example in cubes:
    image, label = example["image"][..., 0], example["label"]
    assert 0.70 < label.mean() < 0.85, label.mean()
    # Membranes are dark against the cells.
    assert image[label == 0].mean() < image[label == 1].mean() - 0.1
    # Membrane sheets close around the cells: separate 6-connected interiors.
    _, num_cells = ndimage.label(label)
    assert num_cells >= 10, num_cells


def test_cell_size_sets_the_membrane_share():
  def membrane_share(cell_size):
    source = SyntheticCells3D(2, size=(32, 32, 32), seed=9, cell_size=cell_size)
    return np.mean([1.0 - source[index]["label"].mean() for index in range(len(source))])

  assert membrane_share(10) > membrane_share(24) + 0.1


def test_out_of_range_index_raises(dataset):
  for index in (-1, 4, 100):
    with pytest.raises(IndexError, match=r"0 \.\. 3"):
      dataset[index]
  with pytest.raises(TypeError, match="integer"):
    dataset[1.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_examples=-1), "num_examples"),
        (dict(num_examples=2.5), "num_examples"),
        (dict(num_examples=4, size=(8, 32, 32)), "depth"),
        (dict(num_examples=4, size=(32, 8, 32)), "height"),
        (dict(num_examples=4, size=(32, 32, 8)), "width"),
        (dict(num_examples=4, size=(32, 32)), "size"),
        (dict(num_examples=4, size=32), "size"),
        (dict(num_examples=4, seed=-2), "seed"),
        (dict(num_examples=4, channels=0), "channels"),
        (dict(num_examples=4, cell_size=3), "cell_size"),
        (dict(num_examples=4, cell_size=float("nan")), "cell_size"),
        (dict(num_examples=4, cell_size="14"), "cell_size"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SyntheticCells3D(**kwargs)


def test_properties_and_repr():
  source = SyntheticCells3D(5, size=(16, 20, 24), seed=2, channels=3, cell_size=12.5)
  assert (source.size, source.seed, source.channels, source.cell_size) == (
      (16, 20, 24), 2, 3, 12.5)
  assert repr(source) == ("SyntheticCells3D(num_examples=5, size=(16, 20, 24), seed=2, "
                          "channels=3, cell_size=12.5)")


def test_from_config_train_and_validation_are_disjoint():
  config = ml_collections.ConfigDict(dict(num_train=3, num_val=2, size=(16, 24, 16), seed=7,
                                          cell_size=12.0))
  train = synthetic3d.from_config(config, "train", channels=2)
  val = synthetic3d.from_config(config, "validation", channels=2)
  assert (len(train), len(val)) == (3, 2)
  assert train.size == val.size == (16, 24, 16) and train.channels == val.channels == 2
  assert train.cell_size == val.cell_size == 12.0
  assert (train.seed, val.seed) == (7, 7 + 10_000)
  assert not np.array_equal(train[0]["label"], val[0]["label"])
  with pytest.raises(ValueError, match="split"):
    synthetic3d.from_config(config, "test", channels=1)


def test_works_as_grain_source(dataset):
  grain = pytest.importorskip("grain")
  source = grain.MapDataset.source(dataset)
  assert len(source) == len(dataset)
  np.testing.assert_array_equal(source[2]["label"], dataset[2]["label"])
