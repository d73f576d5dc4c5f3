"""Volumes: reading and writing 3-D images, and a folder of image and label volumes.

**Files.** A volume is a TIFF stack (``.tif``, ``.tiff``), a NIfTI file (``.nii``,
``.nii.gz``; needs nibabel: ``pip install "unet-jax[volumes]"``) or a NumPy array
(``.npy``). :func:`read_volume` returns every one of them the same way, ``[D, H, W]`` or
``[D, H, W, C]`` in the file's own dtype:

* TIFF: the axes tifffile reports decide the order: the depth axis (``Z``, else the one
  page axis ``Q``/``I``) comes first, a channel axis (``C`` or ``S``) last; axes of size 1
  other than Z, Y and X are dropped, so a one-channel stack reads as ``[D, H, W]``. A single
  page, several page axes (e.g. time and depth) or several series are refused.
* NIfTI stores voxels by (x, y, z): they are transposed to ``(z, y, x)`` = ``[D, H, W]``; a
  4th dimension becomes the channels. The affine and header come back with the array
  (``with_meta=True``) so that :func:`write_volume` can give a prediction the same place in
  the world (it transposes back).
* ``.npy``: a 3-D or 4-D array, read with ``allow_pickle=False``; a file holding Python
  objects, or anything that is not a plain ``.npy`` array, is refused. No reader runs code
  from a file.

No volume of more than ``max_voxels`` values (``D·H·W·C``, read from the file's header
before any data is) is read. The default is the limit of every image reader in this
package, ``unet_jax.data.decode.max_pixels()`` (about 179 million, e.g. 512×512×683 grey),
and ``decode.set_max_pixels`` changes both: a volume is counted like the pages of a TIFF
stack, one setting for every format.

**Intensities.** :func:`to_unit_volume` gives the float32 ``[D, H, W, C]`` in ``[0, 1]`` the
network takes. ``intensity`` says how: ``"dtype"`` divides integers by their type's maximum
(as the 2-D reader does; floats must already lie in [0, 1]); ``"minmax"`` maps each
channel's minimum and maximum to 0 and 1; ``"percentile"`` maps each channel's 0.5th and
99.5th percentiles to 0 and 1 and clips (robust to the few extreme values of CT and MRI);
``"auto"`` (default) is ``"dtype"`` for unsigned integers (microscopy) and ``"percentile"``
for signed integers and floats (CT in Hounsfield units, MRI).

**A folder of volumes** (:class:`VolumeFolder`, the ``data.volumes`` section)::

  DIR/images/NAME.<suffix>   DIR/labels/NAME.<suffix>

Files are paired by stem (``a.nii.gz`` pairs with ``a.tif``); image and label of a pair must
have the same D, H and W. Label voxels become classes through ``mask_values`` (entry ``k``:
the value, or a tuple of values, of class ``k``) and ``ignore_values`` (→ ``IGNORE``: no
loss or metric counts them). Sparse annotation arrives this way: unlabelled voxels carry a
value of their own, listed in ``ignore_values``. :class:`SparseLabels` makes sparse labels
out of full ones, keeping every ``every``-th slice, for experiments.

Fields of ``config.data.volumes``:

* ``dir``: the folder holding the two folders below.
* ``images`` (``"images"``), ``labels`` (``"labels"``): their names.
* ``mask_values`` (``None``): label value(s) of each class; ``None``: the label values are
  the classes themselves (0 … K-1).
* ``ignore_values`` (``()``): label values that become ``IGNORE``.
* ``val_dir`` (``None``): a separate validation folder of the same layout; when unset,
  ``val_fraction`` (0.2) of the stems are held out: sorted, shuffled with ``split_seed`` (0),
  the last ``round(fraction · n)`` (as ``unet_jax.data.folder`` does).
* ``intensity`` (``"auto"``): how image values become [0, 1] (above).

Pairing is checked when the source is made; each pair is read, and checked, every time its
example is asked for (volumes are large: nothing is cached).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from unet_jax.data import decode, folder, listing

VOLUME_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz", ".npy")
INTENSITIES = ("dtype", "minmax", "percentile", "auto")
PERCENTILES = (0.5, 99.5)  # of each channel, for intensity="percentile"

_DEPTH_AXES, _CHANNEL_AXES = "ZQI", "CS"  # tifffile's axis letters
_INSTALL = 'pip install "unet-jax[volumes]"'


class _Refused(ValueError):
  """A readable file that is not a volume this module takes; the message names it."""


@dataclasses.dataclass(frozen=True)
class VolumeMeta:
  """What a writer needs to line a prediction up with the volume it was made from.

  ``shape``: as :func:`read_volume` returns it, ``[D, H, W]`` or ``[D, H, W, C]``;
  ``spacing``: voxel size along D, H, W (NIfTI zooms, reversed), else ``None``;
  ``affine`` (4×4, voxel (x, y, z) → world) and ``header``: NIfTI only, else ``None``.
  """
  path: pathlib.Path
  shape: tuple[int, ...]
  dtype: np.dtype
  spacing: tuple[float, float, float] | None = None
  affine: np.ndarray | None = None
  header: Any = None


def volume_stem(path: str | os.PathLike) -> str:
  """The name without its volume suffix: ``a.nii.gz`` → ``a``, ``b.tif`` → ``b``."""
  name = pathlib.Path(path).name
  return name[:-len(".nii.gz")] if name.lower().endswith(".nii.gz") else pathlib.Path(name).stem


def _format(path: pathlib.Path) -> str:
  name = path.name.lower()
  if name.endswith((".tif", ".tiff")):
    return "tiff"
  if name.endswith((".nii", ".nii.gz")):
    return "nifti"
  if name.endswith(".npy"):
    return "npy"
  raise ValueError(f"{path}: not a volume file; volume suffixes: {', '.join(VOLUME_SUFFIXES)}")


def _nibabel():
  try:
    import nibabel
  except ImportError as error:
    raise ImportError(f"NIfTI volumes (.nii, .nii.gz) need nibabel: {_INSTALL}") from error
  return nibabel


def read_volume(path: str | os.PathLike, *, max_voxels: int | None = None,
                with_meta: bool = False) -> np.ndarray | tuple[np.ndarray, VolumeMeta]:
  """The voxels of a volume file, ``[D, H, W]`` or ``[D, H, W, C]`` in its own dtype (see the
  module docstring); with ``with_meta``, ``(voxels, VolumeMeta)``.

  Raises:
    ValueError: naming the file, if it is missing, damaged, not a volume, or holds more than
      ``max_voxels`` values (``decode.ImageTooLargeError``; default ``decode.max_pixels()``).
    ImportError: for NIfTI files when nibabel is not installed.
  """
  voxels, meta = _read(pathlib.Path(path), max_voxels, data=True)
  return (voxels, meta) if with_meta else voxels


def read_volume_meta(path: str | os.PathLike) -> VolumeMeta:
  """The :class:`VolumeMeta` of a volume file, from its header alone."""
  return _read(pathlib.Path(path), None, data=False)[1]


def _read(path: pathlib.Path, max_voxels: int | None, *, data: bool):
  kind = _format(path)
  nibabel = _nibabel() if kind == "nifti" else None
  try:
    if kind == "tiff":
      return _read_tiff(path, max_voxels, data)
    if kind == "nifti":
      return _read_nifti(nibabel, path, max_voxels, data)
    return _read_npy(path, max_voxels, data)
  except (_Refused, decode.ImageTooLargeError):
    raise
  except Exception as error:  # each library raises many types for a bad file
    raise ValueError(f"cannot read {path}: {type(error).__name__}: {error} (is the file "
                     f"truncated, empty or not a volume?)") from error


def _check_voxels(path: pathlib.Path, shape: Sequence[int], max_voxels: int | None,
                  data: bool) -> None:
  """Refuse a shape that is not a volume, and, before reading ``data``, one past the limit."""
  if len(shape) not in (3, 4) or 0 in shape:
    raise _Refused(f"{path}: a volume must be [D, H, W] or [D, H, W, C] with no empty axis, "
                   f"got shape {tuple(shape)}")
  if data:
    decode.check_pixels(path, math.prod(shape), max_voxels)


def _read_tiff(path, max_voxels, data):
  import tifffile
  with tifffile.TiffFile(path) as tif:
    if len(tif.series) != 1:
      raise _Refused(f"{path} holds {len(tif.series)} series (pages of different shapes); "
                     f"a volume is one stack of equal pages")
    series = tif.series[0]
    shape, axes = series.get_shape(False), series.get_axes(False)
    kept = [i for i, (n, a) in enumerate(zip(shape, axes)) if n > 1 or a in "ZYX"]
    named = "".join(axes[i] for i in kept)
    depth = [a for a in named if a in _DEPTH_AXES]
    depth = ["Z"] if "Z" in depth else depth
    channel = [a for a in named if a in _CHANNEL_AXES]
    other = set(named) - set("YX" + "".join(depth + channel))
    if len(depth) != 1 or len(channel) > 1 or other:
      raise _Refused(
          f"{path}: a TIFF volume needs one depth axis (Z, or one page axis), Y, X and at most "
          f"one channel axis (C or S); tifffile reads axes {axes!r} of shape {tuple(shape)}")
    order = [named.index(a) for a in depth + ["Y", "X"] + channel]
    meta = VolumeMeta(path, tuple(shape[kept[i]] for i in order), series.dtype)
    _check_voxels(path, meta.shape, max_voxels, data)
    if not data:
      return None, meta
    voxels = series.asarray().reshape([shape[i] for i in kept])
    return np.ascontiguousarray(voxels.transpose(order)), meta


def _read_nifti(nibabel, path, max_voxels, data):
  image = nibabel.load(path)
  shape = tuple(image.shape)
  if len(shape) not in (3, 4):
    raise _Refused(f"{path}: a NIfTI volume must have 3 dimensions (x, y, z) or 4 (x, y, z, "
                   f"channels), got shape {shape}")
  order = (2, 1, 0, 3)[:len(shape)]
  meta = VolumeMeta(path, tuple(shape[i] for i in order), image.get_data_dtype(),
                    spacing=tuple(float(z) for z in image.header.get_zooms()[2::-1]),
                    affine=np.array(image.affine), header=image.header)
  _check_voxels(path, meta.shape, max_voxels, data)
  if not data:
    return None, meta
  return np.ascontiguousarray(np.asanyarray(image.dataobj).transpose(order)), meta


def _read_npy(path, max_voxels, data):
  fmt = np.lib.format
  with open(path, "rb") as f:
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0)):
      raise _Refused(f"{path}: .npy format version {version} is not read (1.0 and 2.0 are)")
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read_header(f)
    if dtype.hasobject:
      raise _Refused(f"{path} holds Python objects (dtype {dtype}); reading them would run "
                     f"pickled code. Save the volume as a numeric array")
    meta = VolumeMeta(path, tuple(shape), dtype)
    _check_voxels(path, meta.shape, max_voxels, data)
    if not data:
      return None, meta
    f.seek(0)
    return np.ascontiguousarray(fmt.read_array(f, allow_pickle=False)), meta


def write_volume(path: str | os.PathLike, array: np.ndarray, *,
                 reference: VolumeMeta | str | os.PathLike | None = None) -> None:
  """Write ``array`` (``[D, H, W]`` class ids or ``[D, H, W]``/``[D, H, W, C]``
  probabilities) to ``path``, as TIFF (zlib), NIfTI or ``.npy`` by its suffix.

  The file appears whole or not at all (written beside it, then renamed). Booleans are
  written as uint8, other integers and floats in their own dtype. For NIfTI, ``reference``
  (the input volume's :class:`VolumeMeta`, or its path) gives the affine and header, so the
  prediction lies where the input lies (it must then have the input's D, H, W); without it
  the affine is the identity.
  """
  path = pathlib.Path(path)
  array = np.asarray(array)
  kind = _format(path)
  if array.dtype == np.bool_:
    array = array.astype(np.uint8)
  if not (np.issubdtype(array.dtype, np.integer) or array.dtype in (np.float32, np.float64)):
    raise ValueError(f"{path}: cannot write a volume of dtype {array.dtype}; write integers "
                     f"(class ids) or float32 (probabilities)")
  if array.ndim not in (3, 4) or 0 in array.shape:
    raise ValueError(f"{path}: a volume to write must be [D, H, W] or [D, H, W, C], got "
                     f"shape {array.shape}")
  if isinstance(reference, (str, os.PathLike)):
    reference = read_volume_meta(reference)
  if reference is not None and reference.shape[:3] != array.shape[:3]:
    raise ValueError(f"{path}: the volume is {array.shape[:3]} (D, H, W) but its reference "
                     f"{reference.path} is {reference.shape[:3]}; a prediction lines up with "
                     f"its input only at the same size")
  if kind == "nifti":
    nibabel = _nibabel()
    affine, header = (None, None) if reference is None else (reference.affine, reference.header)
    image = nibabel.Nifti1Image(array.transpose((2, 1, 0, 3)[:array.ndim]),
                                np.eye(4) if affine is None else affine, header=header,
                                dtype=array.dtype)
    _atomic_write(path, lambda tmp: nibabel.save(image, tmp))
  elif kind == "tiff":
    import tifffile
    array = array[..., 0] if array.ndim == 4 and array.shape[-1] == 1 else array
    extra = dict(planarconfig="contig") if array.ndim == 4 else {}
    _atomic_write(path, lambda tmp: tifffile.imwrite(
        tmp, array, compression="zlib", photometric="minisblack",
        metadata={"axes": "ZYX" if array.ndim == 3 else "ZYXS"}, **extra))
  else:
    _atomic_write(path, lambda tmp: np.save(tmp, array, allow_pickle=False))


def _atomic_write(path: pathlib.Path, write) -> None:
  """``write(tmp)`` to a hidden file beside ``path`` with the same suffix, then rename."""
  suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{suffix}")
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def to_unit_volume(voxels: np.ndarray, channels: int, *, name: str,
                   intensity: str = "auto") -> np.ndarray:
  """``voxels`` (``[D, H, W]`` or ``[D, H, W, C]``) as float32 ``[D, H, W, channels]`` in
  ``[0, 1]``, scaled as ``intensity`` says (see the module docstring); one channel is repeated
  to ``channels``. ``name`` (a file) is used in error messages."""
  voxels = np.asarray(voxels)
  if intensity not in INTENSITIES:
    raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
  if voxels.ndim == 3:
    voxels = voxels[..., None]
  if voxels.ndim != 4:
    raise ValueError(f"{name}: a volume must be [D, H, W] or [D, H, W, C], got shape "
                     f"{voxels.shape}")
  if intensity == "auto":
    unsigned = voxels.dtype == np.bool_ or np.issubdtype(voxels.dtype, np.unsignedinteger)
    intensity = "dtype" if unsigned else "percentile"
  if intensity == "dtype":
    unit = decode._to_unit_float(voxels, name=name)
  else:
    unit = _rescaled(voxels, PERCENTILES if intensity == "percentile" else (0.0, 100.0),
                     name=name)
  have = unit.shape[-1]
  if have == channels:
    return np.ascontiguousarray(unit)
  if have == 1:
    return np.repeat(unit, channels, axis=-1)
  raise ValueError(f"{name}: cannot convert a {have}-channel volume to {channels} channels; "
                   f"conversions made: 1 → any count (repeated), or any count to itself. Set "
                   f"data.channels (and model.in_channels) to match the volumes.")


def _rescaled(voxels: np.ndarray, percentiles: tuple[float, float], *, name: str) -> np.ndarray:
  """Each channel's ``percentiles`` mapped to 0 and 1, clipped; a flat channel becomes 0."""
  if not (np.issubdtype(voxels.dtype, np.number) or voxels.dtype == np.bool_):
    raise ValueError(f"{name}: unsupported voxel type {voxels.dtype}")
  values = voxels.astype(np.float32)
  bad = np.count_nonzero(~np.isfinite(values))
  if bad:
    raise ValueError(f"{name}: {bad:,} of {values.size:,} voxel values are NaN or infinite "
                     f"(or too large for float32); repair or replace the volume")
  flat = values.reshape(-1, values.shape[-1])
  low, high = np.percentile(flat, percentiles, axis=0).astype(np.float32)
  span = np.where(high > low, high - low, 1.0).astype(np.float32)
  return np.where(high > low, (values - low) / span, 0.0).clip(0.0, 1.0).astype(np.float32)


def to_label_volume(voxels: np.ndarray, table: dict[int, int] | None,
                    ignore_values: Sequence[int] = (), *, name: str) -> np.ndarray:
  """Label ``voxels`` (``[D, H, W]`` or ``[D, H, W, 1]``; integers, or floats holding whole
  numbers) as int32 classes ``[D, H, W]`` through ``table`` (``decode.class_table``); with
  ``table=None`` the values are the classes, ``ignore_values`` becoming ``IGNORE``."""
  voxels = np.asarray(voxels)
  if voxels.ndim == 4 and voxels.shape[-1] == 1:
    voxels = voxels[..., 0]
  if voxels.ndim != 3:
    raise ValueError(f"{name}: a label volume must be [D, H, W] (one value per voxel), got "
                     f"shape {voxels.shape}")
  if np.issubdtype(voxels.dtype, np.floating):
    if not (np.isfinite(voxels).all() and (voxels == np.round(voxels)).all()):
      raise ValueError(f"{name}: label values must be whole numbers, got fractional or "
                       f"non-finite {voxels.dtype} values")
    voxels = voxels.astype(np.int64)
  if table is not None:
    return decode.to_label(voxels.reshape(-1, voxels.shape[-1]), table,
                           name=name).reshape(voxels.shape)
  ignored = np.isin(voxels, list(ignore_values))
  wrong = np.unique(voxels[~ignored & ((voxels < 0) | (voxels > np.iinfo(np.int32).max))])
  if wrong.size:
    raise ValueError(f"{name}: label values {wrong[:20].tolist()} are not classes (0, 1, …) "
                     f"and not in ignore_values {tuple(ignore_values)}; list them there or "
                     f"set mask_values")
  return np.where(ignored, decode.IGNORE, voxels).astype(np.int32)


def list_volumes(directory: str | os.PathLike) -> listing.Listing:
  """The volume files of ``directory`` and the entries left out (:mod:`listing`'s rules)."""
  found = listing.list_folder(directory, (*VOLUME_SUFFIXES, ".gz"))  # .nii.gz ends in .gz
  files = [f for f in found.files if f.name.lower().endswith(VOLUME_SUFFIXES)]
  skipped = dict(found.skipped)
  others = [f.name for f in found.files if f not in files]
  if others:
    skipped["unsupported"] = sorted(skipped.get("unsupported", []) + others)
  return listing.Listing(found.folder, VOLUME_SUFFIXES, files, skipped)


def find_volume_pairs(directory: str | os.PathLike, *, images: str = "images",
                      labels: str = "labels") -> list[tuple[pathlib.Path, pathlib.Path]]:
  """``(image, label)`` volume paths of ``directory``, paired by :func:`volume_stem`, sorted.

  Raises:
    FileNotFoundError: if a folder is missing.
    ValueError: if a folder holds no volumes, two files share a stem, or a volume has no
      partner; the message lists the files concerned.

  Warns (``UserWarning``, one line) when entries of either folder were left out.
  """
  directory = pathlib.Path(directory)
  found = [listing.require_files(directory / name, list_volumes, what="volumes")
           for name in (images, labels)]
  skipped = [f.summary() for f in found if f.skipped]
  if skipped:
    warnings.warn("; ".join(skipped), UserWarning, stacklevel=2)
  image_files, label_files = (listing.by_stem(f, volume_stem) for f in found)
  lonely_images = sorted(set(image_files) - set(label_files))
  lonely_labels = sorted(set(label_files) - set(image_files))
  if lonely_images or lonely_labels:
    raise ValueError(
        f"{directory}: every image volume needs a label volume with the same stem. Images "
        f"without a label: {listing.some((image_files[s].name for s in lonely_images), 10)}; "
        f"labels without an image: "
        f"{listing.some((label_files[s].name for s in lonely_labels), 10)}")
  return [(image_files[stem], label_files[stem]) for stem in sorted(image_files)]


class VolumeFolder:
  """Random-access ``{"image": float32 [D, H, W, C], "label": int32 [D, H, W]}`` from pairs
  of volume files (see the module docstring).

  Args:
    pairs: ``(image path, label path)`` for each example, e.g. from
      :func:`find_volume_pairs`.
    channels: image channels to return.
    mask_values: entry ``k``: the label value (or tuple of values) of class ``k``; ``None``:
      the label values are the classes.
    ignore_values: label values that become ``IGNORE``.
    intensity: how image values become [0, 1], one of ``INTENSITIES``.
    max_voxels: the largest volume read (default ``decode.max_pixels()``).
  """

  def __init__(self, pairs: Sequence[tuple[pathlib.Path, pathlib.Path]], *, channels: int,
               mask_values: Sequence[int | Sequence[int]] | None = None,
               ignore_values: Sequence[int] = (), intensity: str = "auto",
               max_voxels: int | None = None):
    if intensity not in INTENSITIES:
      raise ValueError(f"data.volumes.intensity must be one of {INTENSITIES}, got "
                       f"{intensity!r}")
    self.pairs = list(pairs)
    self.channels = channels
    self.ignore_values = tuple(int(v) for v in ignore_values)
    self.table = (None if mask_values is None
                  else decode.class_table(mask_values, self.ignore_values))
    self.intensity = intensity
    self.max_voxels = max_voxels

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    image_path, label_path = self.pairs[index]
    voxels = read_volume(image_path, max_voxels=self.max_voxels)
    labels = read_volume(label_path, max_voxels=self.max_voxels)
    label = to_label_volume(labels, self.table, self.ignore_values, name=str(label_path))
    if voxels.shape[:3] != label.shape:
      raise ValueError(f"{image_path} / {label_path.name}: the image is "
                       f"{'×'.join(map(str, voxels.shape[:3]))} (D×H×W) but the label is "
                       f"{'×'.join(map(str, label.shape))}; they must be the same size")
    image = to_unit_volume(voxels, self.channels, name=str(image_path),
                           intensity=self.intensity)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (f"VolumeFolder({len(self.pairs)} pairs, channels={self.channels}, "
            f"intensity={self.intensity!r})")


def sparse_slices(label: np.ndarray, *, axis: int = 0, every: int = 4,
                  offset: int = 0) -> np.ndarray:
  """``label`` (``[D, H, W]``) with only the slices ``offset, offset + every, …`` along
  ``axis`` kept; every other voxel becomes ``IGNORE``. A new array."""
  label = np.asarray(label)
  if label.ndim != 3 or axis not in (0, 1, 2, -1, -2, -3):
    raise ValueError(f"sparse slices need a label [D, H, W] and an axis in 0, 1, 2; got shape "
                     f"{label.shape} and axis {axis}")
  if isinstance(every, bool) or not isinstance(every, int) or every < 1 or not (
      isinstance(offset, int) and 0 <= offset < every):
    raise ValueError(f"sparse slices need every ≥ 1 and 0 ≤ offset < every, got every={every}, "
                     f"offset={offset}")
  if offset >= label.shape[axis]:
    raise ValueError(f"a label of shape {label.shape} has {label.shape[axis]} slices along "
                     f"axis {axis}, so offset {offset} keeps none")
  kept = np.zeros(label.shape[axis], bool)
  kept[offset::every] = True
  shape = [1, 1, 1]
  shape[axis] = -1
  return np.where(kept.reshape(shape), label, decode.IGNORE).astype(label.dtype)


class SparseLabels:
  """``source`` with labels kept on every ``every``-th slice along ``axis`` (from ``offset``)
  and ``IGNORE`` elsewhere: the sparse annotation of Çiçek et al. (2016), made from full
  labels for experiments."""

  def __init__(self, source, *, axis: int = 0, every: int = 4, offset: int = 0):
    self.source, self.axis, self.every, self.offset = source, axis, every, offset

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = dict(self.source[index])
    example["label"] = sparse_slices(example["label"], axis=self.axis, every=self.every,
                                     offset=self.offset)
    return example

  def __repr__(self) -> str:
    return (f"SparseLabels({self.source!r}, axis={self.axis}, every={self.every}, "
            f"offset={self.offset})")


def from_config(config: ml_collections.ConfigDict, split: str, *, channels: int) -> VolumeFolder:
  """The ``data.volumes`` source of ``split`` (``"train"`` or ``"validation"``)."""
  if split not in ("train", "validation"):
    raise ValueError(f"unknown split {split!r}; a volume folder has 'train' and 'validation'")
  if not config.dir:
    raise ValueError("data.volumes.dir is empty: set it to a folder holding "
                     f"{config.images}/ and {config.labels}/")
  layout = dict(images=config.images, labels=config.labels)
  if config.val_dir:
    pairs = find_volume_pairs(config.dir if split == "train" else config.val_dir, **layout)
  else:
    if not 0.0 < config.val_fraction < 1.0:
      raise ValueError(f"data.volumes.val_fraction must be in (0, 1) when val_dir is not set, "
                       f"got {config.val_fraction}")
    pairs = folder.split_pairs(find_volume_pairs(config.dir, **layout), split,
                               val_fraction=config.val_fraction, seed=config.split_seed)
  mask_values = None if config.mask_values is None else tuple(config.mask_values)
  return VolumeFolder(pairs, channels=channels, mask_values=mask_values,
                      ignore_values=tuple(config.ignore_values), intensity=config.intensity)
