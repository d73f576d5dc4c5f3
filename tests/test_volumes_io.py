"""Volume files (TIFF stacks, NIfTI, .npy), intensities, and the folder-of-volumes source."""

import pickle
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest
import tifffile

from unet_jax.data import decode, folder, volumes
from unet_jax.data.decode import IGNORE

SHAPE = (6, 9, 11)  # D, H, W: different along every axis, so a swapped axis shows


def _ramp(dtype=np.uint16, shape=SHAPE):
  return np.arange(np.prod(shape)).reshape(shape).astype(dtype)


def test_volume_stem_handles_the_double_suffix():
  assert volumes.volume_stem("/d/a.nii.gz") == "a"
  assert volumes.volume_stem("b.NII.GZ") == "b"
  assert volumes.volume_stem("c.d.tif") == "c.d"


@pytest.mark.parametrize("suffix", [".tif", ".nii.gz", ".nii", ".npy"])
def test_round_trip_grey_and_channels(tmp_path, suffix):
  grey = _ramp()
  probabilities = np.random.default_rng(0).random((*SHAPE, 2), dtype=np.float32)
  for name, array in (("grey", grey), ("channels", probabilities)):
    path = tmp_path / f"{name}{suffix}"
    volumes.write_volume(path, array)
    read = volumes.read_volume(path)
    assert read.dtype == array.dtype and read.shape == array.shape
    np.testing.assert_array_equal(read, array)
  assert sorted(p.name for p in tmp_path.iterdir()) == [f"channels{suffix}", f"grey{suffix}"]


def test_tiff_axes_bring_depth_first_and_channels_last(tmp_path):
  zcyx = np.stack([_ramp(), 2 * _ramp()], axis=1)  # ImageJ hyperstack: channels between
  tifffile.imwrite(tmp_path / "ij.tif", zcyx, imagej=True, metadata={"axes": "ZCYX"})
  np.testing.assert_array_equal(volumes.read_volume(tmp_path / "ij.tif"),
                                zcyx.transpose(0, 2, 3, 1))
  tifffile.imwrite(tmp_path / "pages.tif", _ramp())  # plain multi-page stack
  np.testing.assert_array_equal(volumes.read_volume(tmp_path / "pages.tif"), _ramp())
  tifffile.imwrite(tmp_path / "one.tif", _ramp()[0])
  with pytest.raises(ValueError, match=r"one\.tif.*depth axis.*'YX'"):
    volumes.read_volume(tmp_path / "one.tif")
  tifffile.imwrite(tmp_path / "tz.tif", np.zeros((2, 3, 9, 11), np.uint8), imagej=True,
                   metadata={"axes": "TZYX"})
  with pytest.raises(ValueError, match=r"tz\.tif.*depth axis"):
    volumes.read_volume(tmp_path / "tz.tif")


def test_nifti_is_read_as_zyx_and_written_back_with_the_reference_affine(tmp_path):
  x, y, z = np.meshgrid(np.arange(11), np.arange(9), np.arange(6), indexing="ij")
  xyz = (100 * x + 10 * y + z).astype(np.int16)  # shape (11, 9, 6): x, y, z
  affine = np.diag([0.5, 0.75, 2.0, 1.0])
  affine[:3, 3] = (10.0, -5.0, 3.0)
  nib.save(nib.Nifti1Image(xyz, affine), tmp_path / "ct.nii.gz")

  voxels, meta = volumes.read_volume(tmp_path / "ct.nii.gz", with_meta=True)
  assert voxels.shape == (6, 9, 11)
  assert voxels[4, 7, 2] == 100 * 2 + 10 * 7 + 4  # [z, y, x]
  np.testing.assert_array_equal(voxels, xyz.transpose(2, 1, 0))
  assert meta.spacing == (2.0, 0.75, 0.5)
  np.testing.assert_allclose(meta.affine, affine)

  mask = (voxels % 3).astype(np.uint8)
  volumes.write_volume(tmp_path / "mask.nii.gz", mask, reference=tmp_path / "ct.nii.gz")
  written = nib.load(tmp_path / "mask.nii.gz")
  np.testing.assert_allclose(written.affine, affine)
  assert written.get_data_dtype() == np.uint8  # not the reference's int16
  np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask.transpose(2, 1, 0))
  np.testing.assert_array_equal(volumes.read_volume(tmp_path / "mask.nii.gz"), mask)
  with pytest.raises(ValueError, match=r"small\.nii: the volume is \(6, 9, 10\) .*/ct\.nii\.gz "
                                       r"is \(6, 9, 11\)"):
    volumes.write_volume(tmp_path / "small.nii", mask[..., :10], reference=meta)
  volumes.write_volume(tmp_path / "plain.nii", mask)
  np.testing.assert_allclose(nib.load(tmp_path / "plain.nii").affine, np.eye(4))


def test_npy_holding_python_objects_or_pickles_is_refused(tmp_path):
  objects = np.empty(SHAPE, object)
  np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
  with pytest.raises(ValueError, match=r"objects\.npy holds Python objects"):
    volumes.read_volume(tmp_path / "objects.npy")
  (tmp_path / "pickled.npy").write_bytes(pickle.dumps(_ramp()))
  with pytest.raises(ValueError, match=r"cannot read .*pickled\.npy"):
    volumes.read_volume(tmp_path / "pickled.npy")
  np.savez(tmp_path / "archive.npz", a=_ramp())
  (tmp_path / "archive.npz").rename(tmp_path / "archive.npy")
  with pytest.raises(ValueError, match=r"cannot read .*archive\.npy"):
    volumes.read_volume(tmp_path / "archive.npy")
  np.save(tmp_path / "flat.npy", np.zeros((9, 11), np.uint8))
  with pytest.raises(ValueError, match=r"flat\.npy.*\[D, H, W\].*\(9, 11\)"):
    volumes.read_volume(tmp_path / "flat.npy")


def test_voxel_limit_is_checked_before_any_data_is_read(tmp_path, monkeypatch):
  # Headers that claim 8e9 voxels and files that hold none: reading the data would fail
  # with a different error, so the refusal must come from the header.
  with open(tmp_path / "huge.npy", "wb") as f:
    np.lib.format.write_array_header_1_0(
        f, {"descr": "|u1", "fortran_order": False, "shape": (2000, 2000, 2000)})
  header = nib.Nifti1Header()
  header.set_data_shape((2000, 2000, 2000))
  header.set_data_dtype(np.uint8)
  (tmp_path / "huge.nii").write_bytes(header.binaryblock + bytes(4))
  for name in ("huge.npy", "huge.nii"):
    with pytest.raises(decode.ImageTooLargeError, match="8,000,000,000"):
      volumes.read_volume(tmp_path / name)

  volumes.write_volume(tmp_path / "small.tif", _ramp())
  monkeypatch.setattr(tifffile.TiffPageSeries, "asarray",
                      lambda *a, **k: pytest.fail("data read before the limit was checked"))
  with pytest.raises(decode.ImageTooLargeError, match="594 pixels"):
    volumes.read_volume(tmp_path / "small.tif", max_voxels=593)
  monkeypatch.setattr(decode, "_max_pixels", 593)  # the process-wide default
  with pytest.raises(decode.ImageTooLargeError):
    volumes.read_volume(tmp_path / "small.tif")
  assert volumes.read_volume_meta(tmp_path / "small.tif").shape == SHAPE


def test_intensity_modes():
  ramp = _ramp(np.uint16)
  np.testing.assert_allclose(volumes.to_unit_volume(ramp, 1, name="v", intensity="auto")[..., 0],
                             ramp / 65535, rtol=1e-6)
  unit = volumes.to_unit_volume(ramp, 1, name="v", intensity="minmax")
  assert unit.dtype == np.float32 and unit.shape == (*SHAPE, 1)
  assert unit.min() == 0.0 and unit.max() == 1.0
  np.testing.assert_allclose(unit[..., 0], ramp / ramp.max(), rtol=1e-6)

  ct = _ramp(np.int16) - 1000
  ct[0, 0, 0] = 30000  # one extreme voxel
  auto = volumes.to_unit_volume(ct, 1, name="ct")
  np.testing.assert_array_equal(auto, volumes.to_unit_volume(ct, 1, name="ct",
                                                             intensity="percentile"))
  low, high = np.percentile(ct.astype(np.float32), volumes.PERCENTILES)
  assert high < 30000  # the extreme voxel is past the upper percentile ...
  assert auto[0, 0, 0, 0] == 1.0 and auto.min() == 0.0  # ... and clipped to 1
  np.testing.assert_allclose(auto[3, 4, 5, 0], (ct[3, 4, 5] - low) / (high - low), rtol=1e-5)
  minmax = volumes.to_unit_volume(ct, 1, name="ct", intensity="minmax")
  assert minmax[3, 4, 5, 0] < auto[3, 4, 5, 0]  # one outlier squeezes a min-max scaling

  two = np.stack([ramp, 10 * ramp], axis=-1).astype(np.float32)  # each channel its own range
  np.testing.assert_allclose(*volumes.to_unit_volume(two, 2, name="v",
                                                     intensity="minmax").transpose(3, 0, 1, 2))
  np.testing.assert_array_equal(volumes.to_unit_volume(np.zeros(SHAPE, np.float32), 1, name="v"),
                                0.0)
  with pytest.raises(ValueError, match=r"v: floating-point pixels must lie in \[0, 1\]"):
    volumes.to_unit_volume(two, 2, name="v", intensity="dtype")
  nan = np.zeros(SHAPE, np.float32)
  nan[1, 2, 3] = np.nan
  with pytest.raises(ValueError, match="1 of 594 voxel values are NaN"):
    volumes.to_unit_volume(nan, 1, name="v")
  with pytest.raises(ValueError, match="intensity must be one of"):
    volumes.to_unit_volume(ramp, 1, name="v", intensity="zscore")


def test_channel_conversion():
  grey = volumes.to_unit_volume(_ramp(np.uint8), 3, name="v")
  assert grey.shape == (*SHAPE, 3)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  with pytest.raises(ValueError, match="v: cannot convert a 2-channel volume to 3 channels"):
    volumes.to_unit_volume(np.zeros((*SHAPE, 2), np.uint8), 3, name="v")


def test_write_is_atomic_and_checks_its_input(tmp_path, monkeypatch):
  volumes.write_volume(tmp_path / "m.npy", _ramp())
  monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):
    volumes.write_volume(tmp_path / "m.npy", np.zeros(SHAPE, np.uint8))
  assert [p.name for p in tmp_path.iterdir()] == ["m.npy"]  # no half-written file left
  np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), _ramp())
  with pytest.raises(ValueError, match=r"x\.tif: a volume to write must be"):
    volumes.write_volume(tmp_path / "x.tif", np.zeros((9, 11), np.uint8))
  with pytest.raises(ValueError, match=r"x\.tif: cannot write a volume of dtype complex64"):
    volumes.write_volume(tmp_path / "x.tif", np.zeros(SHAPE, np.complex64))
  with pytest.raises(ValueError, match=r"x\.png: not a volume file"):
    volumes.write_volume(tmp_path / "x.png", np.zeros(SHAPE, np.uint8))


def test_missing_nibabel_says_how_to_install_it(tmp_path, monkeypatch):
  volumes.write_volume(tmp_path / "a.nii.gz", _ramp())
  monkeypatch.setitem(sys.modules, "nibabel", None)  # `import nibabel` now fails
  for call in (lambda: volumes.read_volume(tmp_path / "a.nii.gz"),
               lambda: volumes.write_volume(tmp_path / "b.nii", _ramp())):
    with pytest.raises(ImportError, match=r'nibabel: pip install "unet-jax\[volumes\]"'):
      call()
  volumes.write_volume(tmp_path / "a.tif", _ramp())  # the other formats need no nibabel
  np.testing.assert_array_equal(volumes.read_volume(tmp_path / "a.tif"), _ramp())


def _make_folder(root, stems=("a", "b", "c"), *, image_suffix=".nii.gz", label_suffix=".tif",
                 label=None):
  (root / "images").mkdir(parents=True)
  (root / "labels").mkdir()
  for i, stem in enumerate(stems):
    volumes.write_volume(root / "images" / f"{stem}{image_suffix}", _ramp(np.uint8) + i)
    volumes.write_volume(root / "labels" / f"{stem}{label_suffix}",
                         (_ramp(np.uint8) % 3) if label is None else label)
  return root


def test_volume_folder_pairs_by_stem_and_maps_label_values(tmp_path):
  root = _make_folder(tmp_path / "d", stems=("a", "b"))
  volumes.write_volume(root / "images" / "c.npy", _ramp(np.uint8) + 2)
  volumes.write_volume(root / "labels" / "c.nii", _ramp(np.uint8) % 3)
  (root / "images" / "notes.gz").write_bytes(b"")  # not .nii.gz: left out, with a warning
  with pytest.warns(UserWarning, match=r"1 file of an unsupported type \(notes\.gz"):
    pairs = volumes.find_volume_pairs(root)
  assert [(i.name, l.name) for i, l in pairs] == [
      ("a.nii.gz", "a.tif"), ("b.nii.gz", "b.tif"), ("c.npy", "c.nii")]

  mapped = volumes.VolumeFolder(pairs, channels=1, mask_values=(0, (1, 2)))
  example = mapped[2]
  assert example["image"].shape == (*SHAPE, 1) and example["image"].dtype == np.float32
  np.testing.assert_allclose(example["image"][..., 0], (_ramp(np.uint8) + 2) / 255)
  assert example["label"].dtype == np.int32
  np.testing.assert_array_equal(example["label"], (_ramp(np.uint8) % 3 > 0).astype(np.int32))

  as_is = volumes.VolumeFolder(pairs, channels=1, ignore_values=(2,))  # values are classes
  expected = np.where(_ramp(np.uint8) % 3 == 2, IGNORE, _ramp(np.uint8) % 3)
  np.testing.assert_array_equal(as_is[0]["label"], expected)
  assert len(as_is) == 3 and "3 pairs" in repr(as_is)

  unmapped = volumes.VolumeFolder(pairs, channels=1, mask_values=(0, 1))
  with pytest.raises(ValueError, match=r"a\.tif: mask values 2 are not in"):
    unmapped[0]


def test_sparse_annotation_value_and_float_labels(tmp_path):
  label = (_ramp(np.float32) % 2).astype(np.float32)
  label[::2] = 9.0  # unlabelled slices, marked with a value of their own
  root = _make_folder(tmp_path, stems=("a",), label_suffix=".nii.gz", label=label)
  source = volumes.VolumeFolder(volumes.find_volume_pairs(root), channels=1,
                                ignore_values=(9,))
  got = source[0]["label"]
  assert (got[::2] == IGNORE).all()
  np.testing.assert_array_equal(got[1::2], label[1::2].astype(np.int32))
  volumes.write_volume(root / "labels" / "a.nii.gz", label + 0.5)
  with pytest.raises(ValueError, match=r"a\.nii\.gz: label values must be whole numbers"):
    source[0]
  volumes.write_volume(root / "labels" / "a.nii.gz", label - 12)
  with pytest.raises(ValueError, match=r"label values \[-12, -11, -3\] are not classes"):
    source[0]


def test_volume_folder_errors_name_the_files(tmp_path):
  root = _make_folder(tmp_path / "d", stems=("a", "b"))
  volumes.write_volume(root / "labels" / "b.tif", np.zeros((6, 9, 10), np.uint8))
  source = volumes.VolumeFolder(volumes.find_volume_pairs(root), channels=1)
  with pytest.raises(ValueError, match=r"b\.nii\.gz / b\.tif: the image is 6×9×11 \(D×H×W\) "
                                       r"but the label is 6×9×10"):
    source[1]
  (root / "labels" / "a.tif").write_bytes(b"not a tiff")
  with pytest.raises(ValueError, match=r"cannot read .*a\.tif"):
    source[0]
  volumes.write_volume(root / "labels" / "c.npy", _ramp())
  with pytest.raises(ValueError, match=r"Images without a label: none; labels without an "
                                       r"image: c\.npy"):
    volumes.find_volume_pairs(root)
  volumes.write_volume(root / "images" / "c.tif", _ramp())
  volumes.write_volume(root / "images" / "c.npy", _ramp())
  with pytest.raises(ValueError, match="c.npy and c.tif have the same stem"):
    volumes.find_volume_pairs(root)
  with pytest.raises(FileNotFoundError, match="nowhere/images does not exist"):
    volumes.find_volume_pairs(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="intensity must be one of"):
    volumes.VolumeFolder([], channels=1, intensity="hu")


def _config(**overrides):
  fields = dict(dir="", images="images", labels="labels", mask_values=None, ignore_values=(),
                val_dir=None, val_fraction=0.2, split_seed=0, intensity="auto")
  return ml_collections.ConfigDict({**fields, **overrides})


def test_from_config_splits_like_the_folder_source(tmp_path):
  stems = ("a", "b", "c", "d", "e")
  root = _make_folder(tmp_path / "d", stems=stems)
  config = _config(dir=str(root), val_fraction=0.4, split_seed=3)
  train = volumes.from_config(config, "train", channels=3)
  validation = volumes.from_config(config, "validation", channels=3)
  assert (len(train), len(validation)) == (3, 2)
  assert sorted(train.pairs + validation.pairs) == volumes.find_volume_pairs(root)
  assert validation.pairs == folder.split_pairs(volumes.find_volume_pairs(root), "validation",
                                                val_fraction=0.4, seed=3)
  assert train[0]["image"].shape == (*SHAPE, 3)

  other = _make_folder(tmp_path / "v", stems=("z",))
  separate = _config(dir=str(root), val_dir=str(other))
  assert len(volumes.from_config(separate, "train", channels=1)) == 5
  assert [i.name for i, _ in volumes.from_config(separate, "validation", channels=1).pairs] == [
      "z.nii.gz"]
  with pytest.raises(ValueError, match=r"data.volumes.val_fraction must be in \(0, 1\)"):
    volumes.from_config(_config(dir=str(root), val_fraction=0.0), "train", channels=1)
  with pytest.raises(ValueError, match="data.volumes.dir is empty"):
    volumes.from_config(_config(), "train", channels=1)
  with pytest.raises(ValueError, match="unknown split 'test'"):
    volumes.from_config(config, "test", channels=1)


class _Full:
  """Two fully labelled volumes."""

  def __len__(self):
    return 2

  def __getitem__(self, index):
    return {"image": np.zeros((*SHAPE, 1), np.float32),
            "label": (_ramp(np.int32) + index) % 4}


@pytest.mark.parametrize("axis,every,offset", [(0, 4, 0), (1, 3, 1), (2, 5, 4)])
def test_sparse_labels_keep_exactly_the_chosen_slices(axis, every, offset):
  full = _Full()
  sparse = volumes.SparseLabels(full, axis=axis, every=every, offset=offset)
  assert len(sparse) == 2
  label, original = sparse[1]["label"], full[1]["label"]
  assert label.dtype == np.int32
  for k in range(SHAPE[axis]):
    got, want = np.take(label, k, axis=axis), np.take(original, k, axis=axis)
    if k % every == offset:
      np.testing.assert_array_equal(got, want)
    else:
      assert (got == IGNORE).all(), k
  assert (full[1]["label"] >= 0).all()  # the wrapped source is left alone
  assert f"every={every}" in repr(sparse)


def test_sparse_slices_refuse_bad_settings():
  label = _ramp(np.int32)
  with pytest.raises(ValueError, match="0 ≤ offset < every, got every=3, offset=3"):
    volumes.sparse_slices(label, axis=0, every=3, offset=3)
  with pytest.raises(ValueError, match="every ≥ 1"):
    volumes.sparse_slices(label, axis=0, every=0)
  with pytest.raises(ValueError, match="axis in 0, 1, 2; got shape .* and axis 3"):
    volumes.sparse_slices(label, axis=3)
  with pytest.raises(ValueError, match="6 slices along axis 0, so offset 7 keeps none"):
    volumes.sparse_slices(label, axis=0, every=8, offset=7)
