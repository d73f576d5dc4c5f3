"""Small files that ask for huge memory are refused before the memory is taken: tensor views
and compressed storages in ``.pth`` files, lying safetensors headers, images whose header
claims more pixels than the limit. Each case checks the error and the peak of Python's
allocations (numpy's included) while the file is read."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from unet_jax.data import decode
from unet_jax.inference import images
from unet_jax.interop.pth import CheckpointFormatError, load_state_dict

MiB = 1 << 20


def _peak(read, *args, **kwargs):
  """``(result or raised exception, peak bytes allocated)`` of ``read(*args, **kwargs)``."""
  tracemalloc.start()
  try:
    outcome = read(*args, **kwargs)
  except Exception as error:  # noqa: BLE001 (the caller checks which)
    outcome = error
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  return outcome, peak


def _tensor_record(numel: int, size: tuple[int, ...], stride: tuple[int, ...],
                   offset: int = 0, name: str = "w") -> bytes:
  """A torch ``data.pkl`` (protocol 0, as torch's own records) of ``{name: tensor}``: a
  float32 view of storage ``0`` of ``numel`` elements."""
  ints = lambda values: "".join(f"I{v}\n" for v in values)
  return (f"}}V{name}\nctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\nFloatStorage\nV0\n"
          f"Vcpu\nI{numel}\ntQI{offset}\n({ints(size)}t({ints(stride)}tI00\n"
          f"ccollections\nOrderedDict\n)RtRs.").encode()


def _pth(path, data_pkl: bytes, storage: bytes | None = None, *, zeros: int = 0,
         compress_pickle: bool = False):
  """A torch zip checkpoint; its storage is ``storage``, or ``zeros`` zero bytes deflated."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:  # fast
    z.writestr("archive/data.pkl", data_pkl,
               zipfile.ZIP_DEFLATED if compress_pickle else zipfile.ZIP_STORED)
    z.writestr("archive/byteorder", "little")
    if storage is not None:
      z.writestr("archive/data/0", storage, zipfile.ZIP_STORED)
    else:
      with z.open("archive/data/0", "w") as member:
        chunk = bytes(4 * MiB)
        for _ in range(zeros // len(chunk)):
          member.write(chunk)
  return path


def test_a_stride_0_view_of_16_floats_claiming_40000_by_40000_is_refused(tmp_path):
  path = _pth(tmp_path / "broadcast.pth", _tensor_record(16, (40000, 40000), (0, 0)),
              np.arange(16, dtype="<f4").tobytes())
  assert path.stat().st_size < 1000
  error, peak = _peak(load_state_dict, path)
  assert isinstance(error, CheckpointFormatError), error
  message = str(error)
  assert "'w'" in message and "stride=(0, 0)" in message and "6,400,000,000 bytes" in message
  assert "max_bytes" in message and "broadcast.pth" in message
  assert peak < 4 * MiB


def test_a_repeating_view_loads_when_max_bytes_allows_it(tmp_path):
  path = _pth(tmp_path / "repeat.pth", _tensor_record(16, (300, 300), (0, 0), offset=3),
              np.arange(16, dtype="<f4").tobytes())
  with pytest.raises(CheckpointFormatError, match="'w'.* 360,000 bytes.*max_bytes"):
    load_state_dict(path)
  with pytest.raises(CheckpointFormatError, match="'w'"):
    load_state_dict(path, max_bytes=300_000)
  loaded = load_state_dict(path, max_bytes=400_000)["w"]
  assert loaded.shape == (300, 300) and (loaded == 3.0).all() and loaded.flags.writeable


def test_nested_tensors_are_named_by_their_place(tmp_path):
  torch = pytest.importorskip("torch", reason="writes the checkpoint with torch.save")
  path = tmp_path / "nested.pth"
  torch.save({"state_dict": {"enc.weight": torch.zeros(16).as_strided((3000, 3000), (0, 0))},
              "layers": [torch.ones(2)]}, path)
  with pytest.raises(CheckpointFormatError, match="tensor 'state_dict.enc.weight'"):
    load_state_dict(path)
  loaded = load_state_dict(path, max_bytes=50 * MiB)
  assert loaded["state_dict"]["enc.weight"].shape == (3000, 3000)
  assert loaded["layers"][0].tolist() == [1.0, 1.0]


def test_a_view_past_its_storage_names_the_tensor(tmp_path):
  path = _pth(tmp_path / "past.pth", _tensor_record(4, (3,), (2,), name="decoder.bias"),
              np.arange(4, dtype="<f4").tobytes())
  with pytest.raises(CheckpointFormatError,
                     match=r"'decoder.bias' \(offset=0, size=\(3,\), stride=\(2,\)\) reaches "
                           r"past its storage of 4 elements"):
    load_state_dict(path)


def test_a_deflated_storage_of_1_gib_in_a_small_file_is_refused_before_decompression(tmp_path):
  numel = (1 << 30) // 4
  path = _pth(tmp_path / "bomb.pth", _tensor_record(numel, (numel,), (1,)), zeros=1 << 30)
  assert path.stat().st_size < 8 * MiB
  error, peak = _peak(load_state_dict, path)
  assert isinstance(error, CheckpointFormatError), error
  assert "storage file archive/data/0 of tensor 'w'" in str(error)
  assert "1,073,741,824 bytes" in str(error) and "max_bytes" in str(error)
  assert peak < 4 * MiB


def test_no_more_of_a_storage_is_decompressed_than_its_tensors_need(tmp_path):
  # The storage says 16 floats; its zip entry holds 64 MiB (deflated to a few hundred KiB).
  path = _pth(tmp_path / "long.pth", _tensor_record(16, (16,), (1,)), zeros=64 * MiB)
  loaded, peak = _peak(load_state_dict, path)
  assert loaded["w"].tolist() == [0.0] * 16
  assert peak < 4 * MiB


def test_a_pickle_that_inflates_past_the_limit_is_refused(tmp_path):
  padded = _tensor_record(4, (4,), (1,)) + bytes(64 * MiB)  # the unpickler stops at '.'
  path = _pth(tmp_path / "pickle.pth", padded, np.zeros(4, "<f4").tobytes(),
              compress_pickle=True)
  error, peak = _peak(load_state_dict, path)
  assert isinstance(error, CheckpointFormatError)
  assert f"the pickle archive/data.pkl needs {len(padded):,} bytes" in str(error)
  assert peak < 4 * MiB


def _safetensors(path, header: dict, data: bytes, *, claimed_length: int | None = None):
  text = json.dumps(header).encode()
  length = len(text) if claimed_length is None else claimed_length
  path.write_bytes(struct.pack("<Q", length) + text + data)
  return path


def test_a_true_safetensors_header_loads(tmp_path):
  path = _safetensors(tmp_path / "ok.safetensors",
                      {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}},
                      np.arange(16, dtype="<f4").tobytes())
  assert load_state_dict(path)["w"].tolist() == np.arange(16.0).reshape(4, 4).tolist()


@pytest.mark.parametrize("entry,message", [
    ({"dtype": "F32", "shape": [40000, 40000], "data_offsets": [0, 64]},
     r"'w' \(F32, shape \[40000, 40000\]\) needs 6,400,000,000 bytes, but its data_offsets "
     r"\[0, 64\) give 64"),
    ({"dtype": "F32", "shape": [250_000_000_000], "data_offsets": [0, 10**12]},
     r"'w' is said to lie at bytes \[0, 1000000000000\) of the data, which holds 64 bytes"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [48, 32]}, r"'w' is said to lie at bytes"),
    ({"dtype": "F32", "shape": [-4, -4], "data_offsets": [0, 64]}, r"'w' has a bad header"),
    ({"dtype": "F33", "shape": [16], "data_offsets": [0, 64]}, r"'w' has a bad header"),
    ({"dtype": "F32", "shape": [16]}, r"'w' has a bad header"),
], ids=["shape-larger-than-span", "span-past-the-file", "span-backwards", "negative-shape",
        "unknown-dtype", "no-offsets"])
def test_a_safetensors_header_that_lies_is_refused(tmp_path, entry, message):
  path = _safetensors(tmp_path / "lies.safetensors", {"w": entry},
                      np.zeros(16, "<f4").tobytes())
  error, peak = _peak(load_state_dict, path)
  assert isinstance(error, CheckpointFormatError), error
  assert "lies.safetensors" in str(error)
  assert pytest.raises(CheckpointFormatError, load_state_dict, path).match(message)
  assert peak < 4 * MiB


def test_a_safetensors_header_longer_than_the_file_is_refused(tmp_path):
  path = _safetensors(tmp_path / "long.safetensors",
                      {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                      bytes(16), claimed_length=1 << 40)
  with pytest.raises(CheckpointFormatError, match="header claims 1,099,511,627,776 bytes"):
    load_state_dict(path)


def _tiled_tiff(path, side: int, *, tile: int = 1024):
  """A deflate TIFF of ``side``² zeros (uint8), written tile by tile from one compressed
  tile: a few bytes a tile on disk, ``side``² bytes once decoded."""
  import tifffile
  encoded = zlib.compress(bytes(tile * tile), 9)
  count = (side // tile) ** 2
  tifffile.imwrite(path, data=(encoded for _ in range(count)), shape=(side, side),
                   dtype=np.uint8, tile=(tile, tile), compression="zlib")
  return path


@pytest.mark.parametrize("read", [decode.read_file, images.read_image],
                         ids=["training", "prediction"])
def test_a_deflate_tiff_claiming_32768_squared_is_refused_from_its_header(tmp_path, read):
  pytest.importorskip("tifffile")
  path = _tiled_tiff(tmp_path / "claims.tif", 32768)
  assert path.stat().st_size < 2 * MiB
  error, peak = _peak(read, path)
  assert isinstance(error, decode.ImageTooLargeError), error
  assert "claims.tif: the image has 1,073,741,824 pixels, more than the limit of " \
         "178,956,970" in str(error) and "max_pixels" in str(error)
  assert peak < 16 * MiB


@pytest.mark.parametrize("read", [decode.read_file, images.read_image],
                         ids=["training", "prediction"])
def test_the_pixel_limit_is_one_setting_for_every_format(tmp_path, read, monkeypatch):
  pytest.importorskip("tifffile")
  from PIL import Image
  tiff = _tiled_tiff(tmp_path / "small.tif", 64, tile=32)  # 4,096 pixels
  png = tmp_path / "small.png"
  Image.fromarray(np.zeros((40, 100), np.uint8)).save(png)  # 4,000 pixels
  for path, pixels in [(tiff, 4096), (png, 4000)]:
    assert np.asarray(read(path, max_pixels=pixels)[0] if read is images.read_image
                      else read(path, max_pixels=pixels)).size == pixels
    with pytest.raises(decode.ImageTooLargeError, match=f"{pixels:,} pixels.*{pixels - 1:,}"):
      read(path, max_pixels=pixels - 1)
  monkeypatch.setattr(decode, "_max_pixels", decode.MAX_PIXELS)  # restored after the test
  decode.set_max_pixels(3999)
  for path in (tiff, png):
    with pytest.raises(decode.ImageTooLargeError, match="limit of 3,999"):
      read(path)
  with pytest.raises(ValueError, match="whole number ≥ 1, got 0"):
    decode.set_max_pixels(0)


def test_every_page_of_a_tiff_counts_toward_the_limit(tmp_path):
  tifffile = pytest.importorskip("tifffile")
  path = tmp_path / "stack.tif"
  tifffile.imwrite(path, np.zeros((5, 20, 30), np.uint8))  # 5 pages of 600 pixels
  assert len(images.read_image(path, max_pixels=3000)) == 5
  assert decode.read_file(path, max_pixels=3000).shape == (5, 20, 30)
  for read in (images.read_image, decode.read_file):
    with pytest.raises(decode.ImageTooLargeError, match="3,000 pixels"):
      read(path, max_pixels=2999)


def test_a_limit_above_pillows_own_lets_pillow_open_the_file(tmp_path, monkeypatch):
  from PIL import Image
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses past 2,000 pixels
  path = tmp_path / "wide.png"
  Image.fromarray(np.zeros((50, 50), np.uint8)).save(path)
  with pytest.raises(decode.ImageTooLargeError, match="wide.png.*max_pixels"):
    decode.read_file(path, max_pixels=2000)
  assert decode.read_file(path, max_pixels=10_000).shape == (50, 50)
  assert images.read_image(path, max_pixels=10_000)[0].shape == (50, 50)
  assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_tiff_with_nan_or_infinite_pixels_says_so(tmp_path, bad):
  tifffile = pytest.importorskip("tifffile")
  pixels = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
  pixels[1, 2] = bad
  path = tmp_path / "bad.tif"
  tifffile.imwrite(path, pixels)
  with pytest.raises(ValueError, match=r"bad.tif: 1 of 16 pixel values are NaN or infinite") \
      as error:
    decode.to_image(decode.read_file(path), 1, name=str(path))
  assert "[nan" not in str(error.value)  # the old message: values in [nan, nan]
