"""Read and write PyTorch checkpoints safely, without torch and without running pickled code.

``load_state_dict`` understands the zip format written by ``torch.save`` (torch >= 1.6)
and safetensors files. The pickle inside a torch checkpoint is read by an unpickler
that only resolves an explicit whitelist of globals, each mapped to a local stand-in,
so a checkpoint can never make this module import torch or call anything else.

Reading is bounded by the file's size: every tensor view must lie inside its storage, and
the bytes read and copied out (storages, tensors, the pickle) may not exceed
``EXPANSION_LIMIT`` (64) times the size of the file unless ``max_bytes`` raises the limit. A
plain checkpoint needs about twice its size; only a view that repeats elements (stride 0)
or a compressed storage can ask for more, and a few hundred bytes can ask for gigabytes that
way. Compressed zip entries are never decompressed past what the limit allows.
"""

from __future__ import annotations

import collections
import io
import json
import math
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


EXPANSION_LIMIT = 64  # bytes read or copied out per byte of the file, unless max_bytes is given


class _StorageType:
  """Stand-in for ``torch.FloatStorage`` & co.: only remembers the element dtype."""

  def __init__(self, dtype: np.dtype) -> None:
    self.dtype = dtype


class _Storage:
  """A storage named by the pickle; its bytes are read from the archive when a tensor that
  is kept needs them."""

  __hash__ = None

  def __init__(self, entry: str, dtype: np.dtype, numel: int) -> None:
    self.entry, self.dtype, self.nbytes = entry, dtype, numel * dtype.itemsize


class _TensorView:
  """Stand-in for a tensor while the pickle is read: its storage and layout, checked and
  copied out once the tensor's name is known."""
  __hash__ = None  # like a tensor in a checkpoint, never a set member or a dict key

  def __init__(self, storage, offset, size, stride, dtype=None) -> None:
    if not isinstance(storage, _Storage):
      raise CheckpointFormatError(f"tensor record names {storage!r}, not a storage")
    self.storage, self.dtype = storage, dtype if dtype is not None else storage.dtype
    self.offset, self.size = int(offset), tuple(int(n) for n in size)
    self.stride = tuple(int(s) for s in stride)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
  """Stand-in for ``torch._utils._rebuild_tensor_v2/_v3``: records the view."""
  if len(rest) > 2:
    raise CheckpointFormatError(f"tensor record has {6 + len(rest)} fields, expected 6 to 8")
  dtype = rest[0] if rest and isinstance(rest[0], np.dtype) else None  # v3: untyped bytes
  return _TensorView(storage, offset, size, stride, dtype)


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
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f"refusing to load {self._path}: it asks to call {module}.{name}, which is not "
          "part of a tensor checkpoint; only tensors, dicts and lists can be loaded") from None

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointFormatError(f"unknown persistent id {pid!r}; expected ('storage', ...)")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f"storage {key!r} has unknown type {storage_type!r}")
    if int(numel) < 0:
      raise CheckpointFormatError(f"storage {key!r} has {numel} elements")
    if key not in self._storages:
      self._storages[key] = _Storage(f"{self._prefix}data/{key}", storage_type.dtype, int(numel))
    return self._storages[key]


class _Reader:
  """Copies the tensors out of a torch archive, within a budget of bytes."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, limit: int, why: str) -> None:
    self._archive, self._limit, self._why, self._used = archive, limit, why, 0
    self._big_endian = _read_member(archive, prefix + "byteorder", 16).strip() == b"big"
    self._bytes: dict[str, bytes] = {}
    self._done: dict[int, tuple[Any, Any]] = {}  # id -> (object, result): shared parts once

  def charge(self, nbytes: int, what: str) -> None:
    """Count ``nbytes`` against the budget before they are allocated."""
    if self._used + nbytes > self._limit:
      raise CheckpointFormatError(
          f"{what} needs {nbytes:,} bytes, which would bring what this file makes in memory "
          f"to {self._used + nbytes:,} bytes, over the limit of {self._limit:,} ({self._why}). "
          f"A view that repeats elements (stride 0) or a compressed storage can make a small "
          f"file this large. If you trust the file, raise the limit: "
          f"load_state_dict(path, max_bytes=...)")
    self._used += nbytes

  def tensors(self, obj: Any, name: str) -> Any:
    """``obj`` with every tensor view (or bare storage) replaced by its array, in place where
    mutable; ``name`` is its place in the checkpoint, for messages."""
    if not isinstance(obj, (_TensorView, _Storage, dict, list, tuple)):
      return obj
    if id(obj) in self._done:
      return self._done[id(obj)][1]
    self._done[id(obj)] = (obj, obj)  # kept alive, so that no other object takes its id
    result = obj
    if isinstance(obj, _Storage):
      result = self._array(_TensorView(obj, 0, (obj.nbytes // obj.dtype.itemsize,), (1,)), name)
    elif isinstance(obj, _TensorView):
      result = self._array(obj, name)
    elif isinstance(obj, dict):
      for key, value in obj.items():
        obj[key] = self.tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, list):
      obj[:] = [self.tensors(v, f"{name}[{i}]") for i, v in enumerate(obj)]
    else:
      result = type(obj)(self.tensors(v, f"{name}[{i}]") for i, v in enumerate(obj))
    self._done[id(obj)] = (obj, result)
    return result

  def _array(self, view: _TensorView, name: str) -> np.ndarray:
    offset, size, stride, dtype = view.offset, view.size, view.stride, view.dtype
    where = f"tensor {name!r} (offset={offset}, size={size}, stride={stride})"
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
      raise CheckpointFormatError(f"{where}: bad tensor layout; sizes and strides must be "
                                  f"as many and not negative, the offset not negative")
    if view.storage.nbytes % dtype.itemsize:
      raise CheckpointFormatError(f"{where}: its storage of {view.storage.nbytes} bytes is "
                                  f"not a whole number of {dtype} elements")
    count, length = math.prod(size), view.storage.nbytes // dtype.itemsize
    if count and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= length:
      raise CheckpointFormatError(f"{where} reaches past its storage of {length} elements")
    if not count:
      return np.zeros(size, dtype=dtype)
    storage = self._storage(view.storage, dtype, where)
    self.charge(count * dtype.itemsize, where)
    strided = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                              strides=[s * dtype.itemsize for s in stride],
                                              writeable=False)
    return np.array(strided, order="C", copy=True)

  def _storage(self, storage: _Storage, dtype: np.dtype, where: str) -> np.ndarray:
    if storage.entry not in self._bytes:
      try:
        declared = self._archive.getinfo(storage.entry).file_size
      except KeyError:
        raise CheckpointFormatError(f"storage file {storage.entry} of {where} is missing") \
            from None
      if declared < storage.nbytes:
        raise CheckpointFormatError(f"storage file {storage.entry} of {where} holds "
                                    f"{declared} bytes, expected {storage.nbytes}")
      self.charge(storage.nbytes, f"storage file {storage.entry} of {where}")
      self._bytes[storage.entry] = _read_member(self._archive, storage.entry, storage.nbytes)
    array = np.frombuffer(self._bytes[storage.entry], dtype=dtype)
    return array.byteswap() if self._big_endian else array


def _read_member(archive: zipfile.ZipFile, name: str, nbytes: int) -> bytes:
  """The first ``nbytes`` of ``name`` (b"" if absent): nothing past them is decompressed."""
  if name not in archive.NameToInfo:
    return b""
  with archive.open(name) as member:
    data = member.read(nbytes)
  if len(data) < min(nbytes, archive.getinfo(name).file_size):
    raise CheckpointFormatError(f"{name} ends after {len(data)} of its bytes")
  return data


def _load_zip(path: str, limit: int, why: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointFormatError(
          f"{path} is a zip file but not a torch checkpoint: expected exactly one "
          f"'<folder>/data.pkl' entry, found {len(pickles)}")
    prefix = pickles[0][:-len("data.pkl")]
    reader = _Reader(archive, prefix, limit, why)
    size = archive.getinfo(pickles[0]).file_size
    reader.charge(size, f"the pickle {pickles[0]}")
    data = _read_member(archive, pickles[0], size)
    return reader.tensors(_SafeUnpickler(data, archive, prefix, path).load(), "")


# safetensors dtype -> bytes per element (the dtypes safetensors.numpy reads).
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2,
                         "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8,
                         "I64": 8, "F64": 8}


def _check_safetensors(path: str, size: int) -> None:
  """Refuse a safetensors header whose tensors do not fit the bytes after it: each entry's
  span must lie inside the data and hold exactly ``prod(shape)`` elements of its dtype."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointFormatError(f"a safetensors file starts with an 8-byte header length; "
                                  f"this one has {size} bytes in all")
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
      raise CheckpointFormatError(f"its header claims {length:,} bytes, but only {size - 8:,} "
                                  f"follow the length")
    header = json.loads(f.read(length))
  if not isinstance(header, dict):
    raise CheckpointFormatError(f"its header is a {type(header).__name__}, expected an object")
  data = size - 8 - length
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
      itemsize = _SAFETENSORS_ITEMSIZE[dtype]
      if not all(isinstance(n, int) and n >= 0 for n in [*shape, begin, end]):
        raise ValueError
    except (KeyError, TypeError, ValueError):
      raise CheckpointFormatError(f"tensor {name!r} has a bad header entry {entry!r}; expected "
                                  f"a dtype of {sorted(_SAFETENSORS_ITEMSIZE)}, a shape of "
                                  f"sizes and data_offsets [begin, end]") from None
    if not begin <= end <= data:
      raise CheckpointFormatError(f"tensor {name!r} is said to lie at bytes [{begin}, {end}) "
                                  f"of the data, which holds {data:,} bytes")
    if end - begin != math.prod(shape) * itemsize:
      raise CheckpointFormatError(
          f"tensor {name!r} ({dtype}, shape {shape}) needs {math.prod(shape) * itemsize:,} "
          f"bytes, but its data_offsets [{begin}, {end}) give {end - begin:,}")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
  if len(head) < 9:
    return False
  (n,) = struct.unpack("<Q", head[:8])
  return 2 <= n <= size - 8 and head[8:9] == b"{"


def load_state_dict(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, Any]:
  """Load a torch zip checkpoint (``torch.save``, torch >= 1.6) or a safetensors file.

    Every tensor becomes a contiguous ``np.ndarray`` (bfloat16 via ``ml_dtypes``); other
    values such as ``mask_values=[0, 1]`` stay plain Python values. Keys are not renamed and
    nested dicts (e.g. ``{"state_dict": ...}``) are not unwrapped.

    Args:
        path: the checkpoint.
        max_bytes: how many bytes reading a torch checkpoint may put in memory (storages,
            tensors, the pickle); by default ``EXPANSION_LIMIT`` times the file's size.

    Raises:
        UnsafeCheckpointError: the pickle asks for anything beyond tensors and containers.
        CheckpointFormatError: the file is empty, truncated, legacy (torch < 1.6) or not a
            checkpoint; a tensor lies outside its storage (or its safetensors data); or the
            tensors would take more than ``max_bytes``.
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
      if max_bytes is None:
        limit, why = EXPANSION_LIMIT * size, f"{EXPANSION_LIMIT}× the file's {size:,} bytes"
      else:
        limit, why = int(max_bytes), "max_bytes"
      obj = _load_zip(path, limit, why)
    elif _looks_like_safetensors(head, size) or path.endswith(".safetensors"):
      from safetensors.numpy import load_file

      _check_safetensors(path, size)
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
