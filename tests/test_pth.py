"""Tests for unet_jax.pth: safe torch/safetensors checkpoint reading and writing."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from unet_jax.interop.pth import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    load_state_dict,
    save_pth,
    save_safetensors,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NEEDS_TORCH = "torch is needed to write reference checkpoints"


def _to_numpy(t):
  import torch

  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _assert_same(loaded, expected_tensor):
  want = _to_numpy(expected_tensor)
  assert isinstance(loaded, np.ndarray)
  assert loaded.dtype == want.dtype
  assert loaded.shape == want.shape
  assert loaded.flags["C_CONTIGUOUS"]
  assert loaded.tobytes() == want.tobytes()  # bit-exact, C order (NaN-safe, -0.0-aware)


def _reference_state_dict():
  torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
  g = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=g)
  return OrderedDict([
      ("conv.weight", torch.randn(3, 2, 3, 3, generator=g).to(torch.bfloat16)),
      ("half", torch.randn(5, generator=g).half()),
      ("double", torch.randn(2, 3, generator=g, dtype=torch.float64)),
      ("bn.num_batches_tracked", torch.tensor(7, dtype=torch.int64)),
      ("ints", torch.tensor([-3, 0, 2**40], dtype=torch.int64)),
      ("int8", torch.tensor([-128, 5, 127], dtype=torch.int8)),
      ("uint8", torch.tensor([0, 200, 255], dtype=torch.uint8)),
      ("int32", torch.tensor([[1, -2], [3, 4]], dtype=torch.int32)),
      ("mask", torch.tensor([True, False, True])),
      ("scalar", torch.tensor(2.5)),
      ("base", base),
      ("transposed", base.t()),
      ("rows", base[1:3]),
      ("cols", base[:, 2:5]),
      ("param", torch.nn.Parameter(torch.randn(3, generator=g))),
      ("empty", torch.zeros(0, 4)),
      ("mask_values", [0, 1]),
  ])


def test_round_trip_matches_torch_exactly(tmp_path):
  torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
  sd = _reference_state_dict()
  assert sd["transposed"].untyped_storage().data_ptr() == sd["base"].untyped_storage().data_ptr()
  assert not sd["transposed"].is_contiguous()
  path = tmp_path / "model.pth"
  torch.save(sd, path)

  loaded = load_state_dict(path)

  assert isinstance(loaded, OrderedDict)
  assert list(loaded) == list(sd)
  assert loaded["mask_values"] == [0, 1]
  assert loaded["conv.weight"].dtype == ml_dtypes.bfloat16
  assert loaded["scalar"].shape == ()
  for key, value in sd.items():
    if isinstance(value, torch.Tensor):
      _assert_same(loaded[key], value)
  # views are independent copies, not aliases of one shared buffer
  loaded["rows"][0, 0] = 123.0
  assert loaded["base"][1, 0] != 123.0


def test_big_endian_and_nested_and_unsigned(tmp_path):
  torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
  sd = {
      "state_dict": {
          "w": torch.arange(6, dtype=torch.int32).reshape(2, 3)
      },
      "u16": torch.tensor([1, 65535], dtype=torch.uint16),
      "layers": [torch.ones(2)]
  }
  path = tmp_path / "nested.pth"
  torch.save(sd, path)
  loaded = load_state_dict(path)
  np.testing.assert_array_equal(loaded["state_dict"]["w"], np.arange(6).reshape(2, 3))
  assert loaded["u16"].dtype == np.uint16 and loaded["u16"].tolist() == [1, 65535]
  np.testing.assert_array_equal(loaded["layers"][0], np.ones(2, np.float32))

  # rewrite the archive as if it came from a big-endian machine
  big = tmp_path / "big.pth"
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(big, "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith("/byteorder"):
        data = b"big"
      elif info.filename.endswith("/data/0"):  # the int32 storage
        data = np.frombuffer(data, "<i4").astype(">i4").tobytes()
      dst.writestr(info, data)
  np.testing.assert_array_equal(load_state_dict(big)["state_dict"]["w"], np.arange(6).reshape(2, 3))


def test_loader_works_without_torch(tmp_path):
  torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
  path = tmp_path / "model.pth"
  torch.save(
      OrderedDict(w=torch.arange(6.0).reshape(2, 3).t(), b=torch.ones(2, dtype=torch.bfloat16)),
      path)
  script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        from unet_jax.interop.pth import load_state_dict
        sd = load_state_dict({str(path)!r})
        assert sd["w"].tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]], sd["w"]
        assert str(sd["b"].dtype) == "bfloat16" and sd["b"].tolist() == [1.0, 1.0]
        assert sys.modules["torch"] is None
        print("ok")
        """)
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run([sys.executable, "-c", script],
                          capture_output=True,
                          text=True,
                          env=env,
                          cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "ok"


def _write_zip_checkpoint(path: Path, data_pkl: bytes, folder: str = "archive") -> None:
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{folder}/data.pkl", data_pkl)
    z.writestr(f"{folder}/byteorder", "little")
    z.writestr(f"{folder}/version", "3\n")


class _SystemPayload:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_planted_os_system_payload_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps(OrderedDict(w=_SystemPayload(f"touch {marker}")), protocol=2)
  path = tmp_path / "evil.pth"
  _write_zip_checkpoint(path, payload)

  with pytest.raises(UnsafeCheckpointError, match=r"system") as excinfo:
    load_state_dict(path)
  assert str(path) in str(excinfo.value)
  assert not marker.exists()


def test_hand_written_global_payloads_are_refused(tmp_path):
  marker = tmp_path / "pwned"
  cases = {
      "os.system":
          b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.",
      "builtins.eval":
          b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR.",
      "subprocess.call":
          b"csubprocess\ncall\n((Vtouch\nV" + str(marker).encode() + b"\nltR.",
  }
  for name, payload in cases.items():
    path = tmp_path / f"{name}.pth"
    _write_zip_checkpoint(path, payload, folder=path.stem)
    with pytest.raises(UnsafeCheckpointError, match=name.replace(".", r"\.")):
      load_state_dict(path)
    assert not marker.exists(), name


def test_payload_hidden_inside_a_tensor_record_is_refused(tmp_path):
  # a real-looking tensor whose storage type is swapped for a dangerous global
  payload = (
      b"\x80\x02ccollections\nOrderedDict\n)R(Vw\nctorch._utils\n_rebuild_tensor_v2\n"
      b"((Vstorage\ncposix\nsystem\nV0\nVcpu\nK\x01tQK\x00)))\x89ccollections\nOrderedDict\n)RtRu.")
  path = tmp_path / "evil.pth"
  _write_zip_checkpoint(path, payload)
  with pytest.raises(UnsafeCheckpointError, match=r"posix\.system"):
    load_state_dict(path)


def test_safetensors_round_trip(tmp_path):
  sd = {
      "w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
      "bf": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
      "idx": np.array([1, 2, 3], dtype=np.int64),
      "t": np.arange(6, dtype=np.float16).reshape(2, 3).T,  # non-contiguous input
  }
  path = tmp_path / "weights.safetensors"
  save_safetensors(sd, path)
  loaded = load_state_dict(path)
  assert sorted(loaded) == sorted(sd)
  for k, v in sd.items():
    assert loaded[k].dtype == v.dtype
    np.testing.assert_array_equal(loaded[k], v)
  assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]  # no temp files left

  # detected by content even without the suffix
  plain = tmp_path / "weights.bin"
  os.replace(path, plain)
  np.testing.assert_array_equal(load_state_dict(plain)["w"], sd["w"])


def test_save_safetensors_rejects_non_arrays(tmp_path):
  path = tmp_path / "x.safetensors"
  with pytest.raises(TypeError, match="mask_values"):
    save_safetensors({"w": np.zeros(2), "mask_values": [0, 1]}, path)
  assert not path.exists()
  assert list(tmp_path.iterdir()) == []


def test_save_pth_round_trip(tmp_path):
  torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
  sd = OrderedDict(
      w=np.arange(12, dtype=np.float32).reshape(3, 4).T,
      bf=np.array([0.5, 3.0, -7.25], dtype=ml_dtypes.bfloat16),
      n=np.array(5, dtype=np.int64),
      flags=np.array([True, False]),
      mask_values=[0, 1],
  )
  path = tmp_path / "out.pth"
  save_pth(sd, path)

  raw = torch.load(path, weights_only=True)
  assert raw["bf"].dtype == torch.bfloat16
  assert raw["bf"].tolist() == [0.5, 3.0, -7.25]
  loaded = load_state_dict(path)
  assert list(loaded) == list(sd)
  assert loaded["mask_values"] == [0, 1]
  for k in ("w", "bf", "n", "flags"):
    assert loaded[k].dtype == sd[k].dtype, k
    np.testing.assert_array_equal(loaded[k], sd[k])
  assert [p.name for p in tmp_path.iterdir()] == ["out.pth"]


def test_truncated_zip_is_a_format_error(tmp_path):
  torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
  path = tmp_path / "cut.pth"
  torch.save({"w": torch.randn(64, 64)}, path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointFormatError, match="cut.pth"):
    load_state_dict(path)


@pytest.mark.parametrize(
    "content",
    [
        b"", b"\x00",
        os.urandom(4096), b"PK\x03\x04 not really a zip",
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1"
    ],
    ids=["empty", "one-byte", "random", "fake-zip", "bad-safetensors"],
)
def test_garbage_is_a_format_error(tmp_path, content):
  path = tmp_path / "garbage.pth"
  path.write_bytes(content)
  with pytest.raises(CheckpointFormatError, match="garbage.pth"):
    load_state_dict(path)


def test_missing_file_is_a_format_error(tmp_path):
  with pytest.raises(CheckpointFormatError, match="nope.pth"):
    load_state_dict(tmp_path / "nope.pth")


def test_storage_out_of_bounds_is_a_format_error(tmp_path):
  torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
  path = tmp_path / "small.pth"
  torch.save({"w": torch.zeros(4)}, path)
  bad = tmp_path / "oob.pth"
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith("/data/0"):
        data = data[:8]  # storage says 4 floats, only 2 present
      dst.writestr(info, data)
  with pytest.raises(CheckpointFormatError, match=r"oob\.pth.*data/0"):
    load_state_dict(bad)


@pytest.mark.parametrize(
    "offset, size, stride",
    [(0, "I1000\n", "I1\n"), (3, "I2\n", "I1\n"), (0, "I2\n", "I-1\n"), (4, "", "")],
    ids=["too-long", "offset-past-end", "negative-stride", "scalar-past-end"],
)
def test_tensor_view_outside_its_storage_is_a_format_error(tmp_path, offset, size, stride):
  # a float storage of 4 elements, and a tensor record whose view would read past it
  record = (
      "}Vw\nctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI4\ntQ"
      f"I{offset}\n({size}t({stride}tI00\nccollections\nOrderedDict\n)RtRs.").encode()
  path = tmp_path / "view.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("view/data.pkl", record)
    z.writestr("view/data/0", np.arange(4, dtype="<f4").tobytes())
  with pytest.raises(CheckpointFormatError, match=r"view\.pth.*(storage|layout)"):
    load_state_dict(path)
  # the same record with an in-bounds view loads
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("view/data.pkl",
               record.replace(f"I{offset}\n({size}t({stride}t".encode(), b"I1\n(I2\nt(I2\nt"))
    z.writestr("view/data/0", np.arange(4, dtype="<f4").tobytes())
  assert load_state_dict(path)["w"].tolist() == [1.0, 3.0]


def test_legacy_format_asks_to_resave(tmp_path):
  torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
  path = tmp_path / "old.pth"
  torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(CheckpointFormatError, match=r"old\.pth.*legacy.*re-save"):
    load_state_dict(path)
