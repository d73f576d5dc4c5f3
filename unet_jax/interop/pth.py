"""Read and write PyTorch checkpoints safely, without torch and without running pickled code.

``load_state_dict`` understands the zip format written by ``torch.save`` (torch >= 1.6)
and safetensors files. The pickle inside a torch checkpoint is read by an unpickler
that only resolves an explicit whitelist of globals, each mapped to a local stand-in,
so a checkpoint can never make this module import torch or call anything else.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import uuid
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "load_state_dict",
    "save_pth",
    "save_safetensors",
]


class UnsafeCheckpointError(ValueError):
  """The checkpoint asks to run code that a plain tensor checkpoint never needs."""


class CheckpointFormatError(ValueError):
  """The file is not a readable torch (zip) or safetensors checkpoint."""


# torch dtype name -> numpy dtype; covers legacy ``torch.<X>Storage`` classes and ``torch.<dtype>``.
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dt) for names, dt in [
        (("float64", "double", "DoubleStorage"), np.float64),
        (("float32", "float", "FloatStorage"), np.float32),
        (("float16", "half", "HalfStorage"), np.float16),
        (("bfloat16", "BFloat16Storage"), ml_dtypes.bfloat16),
        (("int64", "long", "LongStorage"), np.int64),
        (("int32", "int", "IntStorage"), np.int32),
        (("int16", "short", "ShortStorage"), np.int16),
        (("int8", "CharStorage"), np.int8),
        (("uint8", "ByteStorage", "UntypedStorage"), np.uint8),
        (("uint16",), np.uint16),
        (("uint32",), np.uint32),
        (("uint64",), np.uint64),
        (("bool", "BoolStorage"), np.bool_),
        (("complex64", "cfloat", "ComplexFloatStorage"), np.complex64),
        (("complex128", "cdouble", "ComplexDoubleStorage"), np.complex128),
    ] for name in names
}
# torch < 1.6 starts its pickle stream with this number, pickled as LONG1 (0x1950a86a20f9469cfc6c).
_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class _StorageType:
  """Stand-in for ``torch.FloatStorage`` & co.: only remembers the element dtype."""

  def __init__(self, dtype: np.dtype) -> None:
    self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
  """Stand-in for ``torch._utils._rebuild_tensor_v2/_v3``: copies the view out of storage."""
  if len(rest) > 2:
    raise CheckpointFormatError(f"tensor record has {6 + len(rest)} fields, expected 6 to 8")
  if rest and isinstance(rest[0], np.dtype) and rest[0] != storage.dtype:  # v3: untyped bytes
    storage = storage.view(rest[0])
  offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise CheckpointFormatError(f"bad tensor layout: offset={offset} size={size} stride={stride}")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if 0 not in size and last >= storage.size:
    raise CheckpointFormatError(f"tensor view (offset={offset}, size={size}, stride={stride}) "
                                f"reaches past its storage of {storage.size} elements")
  if 0 in size:
    return np.zeros(size, dtype=storage.dtype)
  it = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:],
                                         shape=size,
                                         strides=[s * it for s in stride],
                                         writeable=False)
  return np.array(view, order="C", copy=True)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  """Stand-in for ``torch._utils._rebuild_parameter[_with_state]``: a parameter is its data."""
  return data


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
  """Stand-in for ``_codecs.encode``, which protocol-2 pickles use to store ``bytes``."""
  if encoding not in ("latin1", "latin-1"):
    raise UnsafeCheckpointError(f"bytes encoded as {encoding!r}; only latin1 is accepted")
  return text.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _StorageType(_DTYPES["UntypedStorage"]),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1_bytes,
}
for _name, _dt in _DTYPES.items():
  if _name.endswith("Storage"):
    _SAFE_GLOBALS[("torch", _name)] = _SAFE_GLOBALS[("torch.cuda", _name)] = _StorageType(_dt)
  else:
    _SAFE_GLOBALS[("torch", _name)] = _dt


class _SafeUnpickler(pickle.Unpickler):
  """Unpickler for ``data.pkl`` that resolves only whitelisted globals to local stand-ins."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str) -> None:
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._path = archive, prefix, path
    self._big_endian = False
    byteorder = prefix + "byteorder"
    if byteorder in archive.namelist():
      self._big_endian = archive.read(byteorder).strip() == b"big"
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f"refusing to load {self._path}: it asks to call {module}.{name}, which is not "
          "part of a tensor checkpoint; only tensors, dicts and lists can be loaded") from None

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointFormatError(f"unknown persistent id {pid!r}; expected ('storage', ...)")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f"storage {key!r} has unknown type {storage_type!r}")
    if key not in self._storages:
      entry = f"{self._prefix}data/{key}"
      nbytes = int(numel) * storage_type.dtype.itemsize
      try:
        info = self._archive.getinfo(entry)
      except KeyError:
        raise CheckpointFormatError(f"storage file {entry} is missing") from None
      if nbytes < 0 or info.file_size < nbytes:
        raise CheckpointFormatError(
            f"storage file {entry} holds {info.file_size} bytes, expected {nbytes}")
      buf = np.frombuffer(self._archive.read(entry)[:nbytes], dtype=storage_type.dtype)
      self._storages[key] = buf.byteswap() if self._big_endian else buf
    return self._storages[key]


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointFormatError(
          f"{path} is a zip file but not a torch checkpoint: expected exactly one "
          f"'<folder>/data.pkl' entry, found {len(pickles)}")
    prefix = pickles[0][:-len("data.pkl")]
    return _SafeUnpickler(archive.read(pickles[0]), archive, prefix, path).load()


def _looks_like_safetensors(head: bytes, size: int) -> bool:
  if len(head) < 9:
    return False
  (n,) = struct.unpack("<Q", head[:8])
  return 2 <= n <= size - 8 and head[8:9] == b"{"


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Load a torch zip checkpoint (``torch.save``, torch >= 1.6) or a safetensors file.

    Every tensor becomes a contiguous ``np.ndarray`` (bfloat16 via ``ml_dtypes``); other
    values such as ``mask_values=[0, 1]`` stay plain Python values. Keys are not renamed and
    nested dicts (e.g. ``{"state_dict": ...}``) are not unwrapped.

    Raises:
        UnsafeCheckpointError: the pickle asks for anything beyond tensors and containers.
        CheckpointFormatError: the file is empty, truncated, legacy (torch < 1.6) or not a checkpoint.
    """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      head = f.read(16)
    size = os.path.getsize(path)
  except OSError as e:
    raise CheckpointFormatError(f"cannot read checkpoint {path}: {e}") from e
  try:
    if head.startswith(b"PK\x03\x04"):
      obj = _load_zip(path)
    elif _looks_like_safetensors(head, size) or path.endswith(".safetensors"):
      from safetensors.numpy import load_file

      obj = load_file(path)
    elif head.startswith(b"\x80") and _LEGACY_MAGIC in head:
      raise CheckpointFormatError(
          f"{path} uses the legacy torch (< 1.6) format, which cannot be read safely; "
          "re-save it with a newer torch: torch.save(torch.load(p), p)")
    else:
      raise CheckpointFormatError(
          f"{path} is not a checkpoint ({'empty file' if size == 0 else f'starts with {head[:8]!r}'}); "
          "expected a torch zip checkpoint (torch.save, torch >= 1.6) or a .safetensors file")
  except UnsafeCheckpointError:
    raise
  except CheckpointFormatError as e:
    if path in str(e):
      raise
    raise CheckpointFormatError(f"{path}: {e}") from e
  except Exception as e:  # truncated zip, broken pickle, bad safetensors header, ...
    raise CheckpointFormatError(f"{path} is damaged or truncated: {type(e).__name__}: {e}") from e
  if not isinstance(obj, dict):
    raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
  return obj


def _atomic_write(path: str | os.PathLike, write) -> None:
  """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it into place."""
  path = os.path.abspath(os.fspath(path))
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Write a flat ``name -> np.ndarray`` mapping to a safetensors file, atomically."""
  from safetensors.numpy import save_file

  bad = [k for k, v in state_dict.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
  if bad:
    raise TypeError(
        f"cannot save {os.fspath(path)} as safetensors: entries {bad} are not str -> np.ndarray; "
        "safetensors holds only arrays, so drop or convert these entries first")
  arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
  _atomic_write(path, lambda tmp: save_file(arrays, tmp))


def _to_torch(value: Any, torch: Any, where: str) -> Any:
  if isinstance(value, (np.ndarray, np.generic)):
    arr = np.array(value, copy=True, order="C")
    if arr.dtype == ml_dtypes.bfloat16:
      return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
  if isinstance(value, Mapping):
    cls = type(value) if isinstance(value, dict) else dict
    return cls((k, _to_torch(v, torch, f"{where}[{k!r}]")) for k, v in value.items())
  if isinstance(value, (list, tuple)):
    items = [_to_torch(v, torch, f"{where}[{i}]") for i, v in enumerate(value)]
    return items if isinstance(value, list) else tuple(items)
  if value is None or isinstance(value, (str, int, float, bool)):
    return value
  raise TypeError(
      f"{where} is a {type(value).__name__}; only arrays, dicts, lists and scalars are saved")


def save_pth(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Write ``state_dict`` with ``torch.save`` (arrays become tensors), atomically. Needs torch."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        'save_pth needs PyTorch: pip install "unet-jax[test]" (or pip install torch)') from e
  converted = _to_torch(state_dict, torch, "state_dict")
  _atomic_write(path, lambda tmp: torch.save(converted, tmp))
