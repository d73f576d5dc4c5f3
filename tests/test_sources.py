"""The data sources: folder (several file formats), TFDS (mock data), ISBI 2012 (PNG and TIFF),
and the errors each gives for bad input."""

import pathlib
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from unet_jax.data import decode, folder, isbi2012, pipeline, tfds_source
from unet_jax.geometry import Geometry

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from configs import folder as folder_config  # noqa: E402
from configs import isbi2012 as isbi_config  # noqa: E402
from configs import oxford_pets as pets_config  # noqa: E402

ISBI_DIR = pathlib.Path(isbi_config.default_data_dir() or "/nonexistent")


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _folder_data(root, count=5, size=(20, 24), seed=0):
  """``count`` grey images with binary {0, 255} masks; returns the arrays written."""
  rng = np.random.default_rng(seed)
  written = {}
  for i in range(count):
    image = rng.integers(0, 256, size, dtype=np.uint8)
    mask = np.where(rng.random(size) < 0.3, 255, 0).astype(np.uint8)
    _save(root / "images" / f"im{i}.png", image)
    _save(root / "masks" / f"im{i}.png", mask)
    written[f"im{i}"] = (image, mask)
  return written


def _folder_config(root, **fields):
  config = folder_config.get_config("tiny").data
  config.folder.dir = str(root)
  config.channels = 1
  for key, value in fields.items():
    config.folder[key] = value
  return config


# --- folder ------------------------------------------------------------------------------------

def test_folder_reads_binary_masks_and_splits_by_fraction(tmp_path):
  written = _folder_data(tmp_path, count=10)
  config = _folder_config(tmp_path, val_fraction=0.3)
  train = pipeline.make_source(config, "train")
  val = pipeline.make_source(config, "validation")
  assert (len(train), len(val)) == (7, 3)
  stems = [p[0].stem for p in train.pairs] + [p[0].stem for p in val.pairs]
  assert sorted(stems) == sorted(written)  # disjoint, and together every pair
  assert [p[0].stem for p in pipeline.make_source(config, "validation").pairs] == [
      p[0].stem for p in val.pairs]  # the same split every time
  example = train[0]
  image, mask = written[train.pairs[0][0].stem]
  assert example["image"].dtype == np.float32 and example["image"].shape == (20, 24, 1)
  np.testing.assert_allclose(example["image"][..., 0], image / 255.0, atol=1e-6)
  assert example["label"].dtype == np.int32
  np.testing.assert_array_equal(example["label"], (mask == 255).astype(np.int32))


def test_folder_with_a_separate_validation_directory(tmp_path):
  _folder_data(tmp_path / "train", count=3)
  _folder_data(tmp_path / "val", count=2, seed=1)
  config = _folder_config(tmp_path / "train", val_dir=str(tmp_path / "val"))
  assert len(pipeline.make_source(config, "train")) == 3
  assert len(pipeline.make_source(config, "validation")) == 2


def test_folder_formats_channels_palette_integer_and_ignored_masks(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
  rgba = np.concatenate([rgb, np.full((10, 12, 1), 128, np.uint8)], axis=-1)
  grey16 = rng.integers(0, 65536, (10, 12), dtype=np.uint16)
  classes = rng.integers(0, 3, (10, 12)).astype(np.uint8)
  classes[0, :4] = 255  # "void" pixels
  _save(tmp_path / "images" / "rgb.jpg", rgb)
  _save(tmp_path / "images" / "rgba.png", rgba)
  Image.fromarray(grey16).save(tmp_path / "images" / "grey16.png")
  tifffile.imwrite(tmp_path / "images" / "tif.tiff", rgb)
  palette = Image.fromarray(classes).convert("P")  # "L" → "P" keeps the values as indices
  palette.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255, 255, 255] * 253)
  (tmp_path / "masks").mkdir()
  palette.save(tmp_path / "masks" / "rgb.png")
  _save(tmp_path / "masks" / "rgba.png", classes)
  _save(tmp_path / "masks" / "grey16.png", classes)
  tifffile.imwrite(tmp_path / "masks" / "tif.tif", classes.astype(np.int32))

  for channels in (1, 3):
    pairs = folder.find_pairs(tmp_path)
    source = folder.FolderSource(pairs, channels=channels,
                                 table=decode.class_table((0, 1, 2), (255,)))
    examples = {p[0].stem: source[i] for i, p in enumerate(pairs)}
    expected_label = classes.astype(np.int32)
    expected_label[0, :4] = pipeline.IGNORE
    for stem, example in examples.items():
      assert example["image"].shape == (10, 12, channels), stem
      assert 0.0 <= example["image"].min() and example["image"].max() <= 1.0
      np.testing.assert_array_equal(example["label"], expected_label, err_msg=stem)
    if channels == 3:
      np.testing.assert_allclose(examples["rgba"]["image"], rgb / 255.0, atol=1e-6)  # alpha dropped
      np.testing.assert_allclose(examples["tif"]["image"], rgb / 255.0, atol=1e-6)
      grey = examples["grey16"]["image"]
      np.testing.assert_allclose(grey, np.repeat(grey16[..., None] / 65535.0, 3, -1), atol=1e-6)
    else:
      luma = (rgb / 255.0) @ np.array([0.299, 0.587, 0.114])
      np.testing.assert_allclose(examples["rgba"]["image"][..., 0], luma, atol=1e-5)


def test_folder_mask_suffix_and_many_to_one_map(tmp_path):
  _save(tmp_path / "images" / "a.png", np.zeros((6, 6), np.uint8))
  _save(tmp_path / "masks" / "a_mask.png", np.array([[0, 1, 2, 3, 0, 0]] * 6, np.uint8))
  pairs = folder.find_pairs(tmp_path, mask_suffix="_mask")
  source = folder.FolderSource(pairs, channels=1, table=decode.class_table((0, (1, 2), 3)))
  np.testing.assert_array_equal(source[0]["label"][0], [0, 1, 1, 2, 0, 0])


def test_folder_pairing_errors_name_the_files(tmp_path):
  _folder_data(tmp_path, count=2)
  _save(tmp_path / "images" / "lonely.png", np.zeros((4, 4), np.uint8))
  _save(tmp_path / "masks" / "orphan.png", np.zeros((4, 4), np.uint8))
  with pytest.raises(ValueError, match=r"Images without a mask: lonely\.png; masks without an "
                                       r"image: orphan\.png"):
    folder.find_pairs(tmp_path)


def test_folder_empty_and_missing_directories(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  with pytest.raises(ValueError, match=r"images holds no images .* \(it is empty\)"):
    folder.find_pairs(tmp_path)
  (tmp_path / "images" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match=r"it holds: notes\.txt"):
    folder.find_pairs(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"nowhere.images does not exist"):
    folder.find_pairs(tmp_path / "nowhere")


def test_folder_duplicate_stems_are_refused(tmp_path):
  _folder_data(tmp_path, count=1)
  _save(tmp_path / "images" / "im0.jpg", np.zeros((4, 4), np.uint8))
  with pytest.raises(ValueError, match=r"im0\.jpg and im0\.png have the same stem"):
    folder.find_pairs(tmp_path)


def test_unexpected_mask_values_are_listed(tmp_path):
  _save(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
  _save(tmp_path / "masks" / "a.png", np.array([[0, 255, 7, 9]] * 4, np.uint8))
  source = folder.FolderSource(folder.find_pairs(tmp_path), channels=1,
                               table=decode.class_table((0, 255)))
  with pytest.raises(ValueError, match=r"masks.a\.png: mask values 7, 9 are not in the value"):
    source[0]


def test_truncated_and_unreadable_files_are_named(tmp_path):
  _folder_data(tmp_path, count=2, size=(64, 64))
  data = (tmp_path / "images" / "im0.png").read_bytes()
  (tmp_path / "images" / "im0.png").write_bytes(data[:len(data) // 2])
  (tmp_path / "masks" / "im1.png").write_bytes(b"not an image")
  source = folder.FolderSource(folder.find_pairs(tmp_path), channels=1,
                               table=decode.class_table((0, 255)))
  with pytest.raises(ValueError, match=r"cannot read .*im0\.png.*truncated"):
    source[0]
  with pytest.raises(ValueError, match=r"cannot read .*masks.im1\.png"):
    source[1]


def test_unconvertible_channels_and_mismatched_sizes(tmp_path):
  _save(tmp_path / "images" / "a.png", np.zeros((4, 5, 3), np.uint8))
  _save(tmp_path / "masks" / "a.png", np.zeros((4, 5), np.uint8))
  pairs = folder.find_pairs(tmp_path)
  with pytest.raises(ValueError, match=r"a\.png: cannot convert a 3-channel image to 2 channels"):
    folder.FolderSource(pairs, channels=2, table={0: 0})[0]
  _save(tmp_path / "masks" / "a.png", np.zeros((5, 4), np.uint8))
  with pytest.raises(ValueError, match=r"the image is 4×5 but the mask is 5×4"):
    folder.FolderSource(pairs, channels=3, table={0: 0})[0]


def test_class_table_refuses_conflicts():
  with pytest.raises(ValueError, match=r"mask value 255 is mapped twice"):
    decode.class_table((0, 255), (255,))
  with pytest.raises(ValueError, match=r"mask_values is empty"):
    decode.class_table(())


def test_invalid_tile_size_names_the_nearest_valid_sizes():
  config = isbi_config.get_config().data
  config.tile_size = (573, 572)
  with pytest.raises(ValueError, match=r"tile_size \(573, 572\) is not a valid model input: "
                                       r".*height 573 \(nearest valid sizes 572, 588\)"):
    pipeline.tile_shapes(config, Geometry(4, "valid", "valid"))
  config.tile_size = (572, 572)
  assert pipeline.tile_shapes(config, Geometry(4, "valid", "valid")) == ((572, 572), (388, 388))


def test_unknown_source_and_missing_section():
  config = folder_config.get_config("tiny").data
  config.source = "nope"
  with pytest.raises(ValueError, match=r"unknown data source 'nope'; known sources: "):
    pipeline.make_source(config, "train")
  config.source = "isbi2012"
  with pytest.raises(ValueError, match=r"config.data has no 'isbi2012' section"):
    pipeline.make_source(config, "train")


# --- TFDS --------------------------------------------------------------------------------------

def _pet_records(num=3):
  """Pet-like records whose mask is a trimap consistent with the image's size."""
  rng = np.random.default_rng(0)
  records = []
  for i in range(num):
    h, w = 20 + i, 30 - i
    trimap = rng.integers(1, 4, (h, w, 1)).astype(np.uint8)
    records.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                    "segmentation_mask": trimap, "label": i % 37, "file_name": f"pet{i}.jpg"})
  return records


def test_tfds_oxford_pets_through_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  records = _pet_records()
  calls = []

  def as_data_source(self, split, **kwargs):
    calls.append((self.name, split))
    return records

  config = pets_config.get_config("tiny").data
  config.tfds.data_dir = str(tmp_path)
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    source = pipeline.make_source(config, "train")
    pipeline.make_source(config, "validation")
  assert calls == [("oxford_iiit_pet", "train"), ("oxford_iiit_pet", "test[:500]")]
  assert len(source) == 3
  for record, example in zip(records, (source[i] for i in range(3))):
    assert example["image"].shape == record["image"].shape
    np.testing.assert_allclose(example["image"], record["image"] / 255.0, atol=1e-6)
    trimap = record["segmentation_mask"][..., 0]
    expected = np.select([trimap == 2, trimap == 1, trimap == 3], [0, 1, 2])
    np.testing.assert_array_equal(example["label"], expected)


def test_tfds_keys_are_configurable_and_checked(tmp_path):
  import tensorflow_datasets as tfds
  records = [{"img": np.zeros((8, 8, 1), np.uint8), "mask": np.ones((8, 8), np.uint8)}]
  config = pets_config.get_config("tiny").data
  config.channels = 3
  config.tfds.update(image_key="img", mask_key="mask", mask_values=(0, 1))
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: records):
    source = pipeline.make_source(config, "train")
    assert source[0]["image"].shape == (8, 8, 3) and (source[0]["label"] == 1).all()
    config.tfds.image_key = "picture"
    with pytest.raises(KeyError, match=r"has no feature \['picture'\]; its features are "
                                       r"\['img', 'mask'\]"):
      pipeline.make_source(config, "train")[0]


def test_tfds_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ValueError, match=r"(?s)cannot open TFDS dataset 'oxford_iiit_pet'.*"
                                       r"pip install -e \"\.\[tf\]\""):
    tfds_source.TFDSSource("oxford_iiit_pet", "train", data_dir=str(tmp_path),
                           image_key="image", mask_key="segmentation_mask", channels=3,
                           table={1: 1})


# --- ISBI 2012 ---------------------------------------------------------------------------------

def _isbi_stacks(directory, slices=6, size=(16, 20), labels=None):
  rng = np.random.default_rng(0)
  volume = rng.integers(0, 256, (slices, *size), dtype=np.uint8)
  if labels is None:
    labels = np.where(rng.random((slices, *size)) < 0.7, 255, 0).astype(np.uint8)
  tifffile.imwrite(directory / "train-volume.tif", volume)
  tifffile.imwrite(directory / "train-labels.tif", labels)
  tifffile.imwrite(directory / "test-volume.tif", volume[:2])
  return volume, labels


def test_isbi_tiff_stacks_split_by_slice_range(tmp_path):
  volume, labels = _isbi_stacks(tmp_path)
  config = isbi_config.get_config("tiny").data
  config.isbi2012.update(dir=str(tmp_path), train_slices=(0, 4), val_slices=(4, 6))
  train = pipeline.make_source(config, "train")
  val = pipeline.make_source(config, "validation")
  assert (len(train), len(val)) == (4, 2)
  np.testing.assert_allclose(val[1]["image"][..., 0], volume[5] / 255.0, atol=1e-6)
  np.testing.assert_array_equal(val[1]["label"], labels[5] == 255)
  assert val[1]["label"].dtype == np.int32
  test = pipeline.make_source(config, "test")
  assert len(test) == 2 and set(test[0]) == {"image"}


def test_isbi_bad_slices_and_labels(tmp_path):
  labels = np.full((6, 16, 20), 255, np.uint8)
  labels[2, 0, 0] = 128  # e.g. a lossy re-save
  _isbi_stacks(tmp_path, labels=labels)
  with pytest.raises(ValueError, match=r"train-labels\.tif\[2\]: mask values 128 are not in"):
    isbi2012.ISBI2012(tmp_path, "train")
  with pytest.raises(ValueError, match=r"slices \[6, 7\] are not in the train stack .* 0 … 5"):
    isbi2012.ISBI2012(tmp_path, "train", slices=range(4, 8))
  with pytest.raises(FileNotFoundError, match=r"UNET_JAX_ISBI_DIR"):
    isbi2012.ISBI2012(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"neither ISBI 2012 layout: no train/image/ "):
    isbi2012.ISBI2012(tmp_path / "empty")


@pytest.mark.skipif(not (ISBI_DIR / "train" / "image").is_dir(),
                    reason="the ISBI 2012 PNG slices are not present (set UNET_JAX_ISBI_DIR)")
def test_isbi_png_slices():
  config = isbi_config.get_config().data
  train = pipeline.make_source(config, "train")
  val = pipeline.make_source(config, "validation")
  assert (len(train), len(val)) == (25, 5)
  assert val.names[0].endswith("25.png")  # numeric order: 25, not "3" after "29"
  example = val[0]
  assert example["image"].shape == (512, 512, 1) and example["label"].shape == (512, 512)
  assert set(np.unique(example["label"])) == {0, 1}
  assert 0.6 < example["label"].mean() < 0.9  # ~78 % cell interior
  assert len(pipeline.make_source(config, "test")) == 30
