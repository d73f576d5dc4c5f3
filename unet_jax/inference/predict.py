"""Overlap-tile prediction (Ronneberger et al. 2015, Fig. 2) for images and volumes of any
size; CLI.

The image (volume) is mirrored beyond its border, cut into tiles of one valid input size, the
tiles go through the network in fixed-size batches, and the outputs are stitched back. Images
and volumes share one implementation, per axis (``unet_jax.inference.tiling``):

* unpadded models (``'valid'`` encoder and decoder) predict each output pixel from its full
  context, so the outputs tile exactly, as in the paper. Tiles step by the output size
  rounded down to a multiple of ``2**depth``, so every tile sees the same 2×2 max-pool grid
  and the result equals one pass over the whole (mirrored) image;
* models with padded convolutions (``'same'`` anywhere, e.g. the walkthrough's decoder) see
  zeros at every tile edge, so their tiles overlap by ``overlap`` and are blended with a
  Gaussian window that trusts each tile's centre most. Extra mirrored context around the image
  keeps its border pixels away from tile edges too;
* models that pad up-sampled maps to their skips (``skip_fit="pad"``, milesial's) take any
  size, and by default see each image whole in one pass (up to ``WHOLE_IMAGE_LIMIT`` pixels
  per side), exactly as milesial's own ``predict.py`` does; ``tile_size="image"`` asks for
  that pass explicitly, for any model that accepts the image's size. Volumes are always tiled.

``predict_image`` takes a 2-D U-Net and ``[H, W(, C)]``; ``predict_volume`` a
``UNet(spatial_dims=3)`` and ``[D, H, W(, C)]``, holding one batch of tiles on the device and
the result on the host. Probabilities and decisions follow the model's head
(``unet_jax.heads``): softmax classes, a binary sigmoid, or one sigmoid per class
(multi-label); test-time augmentation and blending average the probabilities of that kind.

All tiles of every image go through one jitted function (``predict_tiles``): it compiles once
per model, tile size, batch size and device set, never per image. With several devices each
batch is split over them. Command line (images, or volumes for a 3-D checkpoint)::

  python -m unet_jax.predict --checkpoint workdir/ --input images/ --output predictions/
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from unet_jax import heads
from unet_jax.geometry import Geometry
from unet_jax.inference import tiling
from unet_jax.inference.images import (IMAGE_SUFFIXES, class_mask,  # noqa: F401
                                      list_images, match_channels, overlay, page_names,
                                      read_image, to_float)
# The tiling core, importable from here as before it moved.
from unet_jax.inference.tiling import (DEFAULT_OUTPUT, AxisPlan, blends,  # noqa: F401
                                       check_batch_size, cut_tiles, default_tile_size,
                                       gaussian_window, mirror_indices, plan_axis,
                                       predict_tiles)

WHOLE_IMAGE_LIMIT = 2048  # pad-to-skip models see images up to this size per side whole
WHOLE = "image"  # tile_size that asks for one pass over the whole image
_mirror = mirror_indices  # its name here before the core moved


def predict_image(model: nnx.Module, image: np.ndarray, *,
                  tile_size: int | Sequence[int] | None = None, batch_size: int = 4,
                  overlap: float = 0.5, tta: bool = False,
                  devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """Probabilities ``[H, W, num_classes]`` (float32) of a U-Net for one image: softmax
  class probabilities, or per-channel sigmoids for binary and multi-label models
  (``unet_jax.heads.decide`` turns them into classes).

  Args:
    model: a ``UNet`` (used in eval mode; the model passed in is not changed).
    image: ``[H, W]`` or ``[H, W, in_channels]``, any size ≥ 1×1; uint8 / uint16 are scaled
      to ``[0, 1]``, floats used as they are.
    tile_size: the tile's input size, an int or ``(height, width)``; it must be a valid input
      size of the model. ``"image"``: one pass over the whole image, which must then be a
      valid input size. Default: the whole image for models that pad up-sampled maps to
      their skips (any size ≤ ``WHOLE_IMAGE_LIMIT`` per side); otherwise per axis, a tile
      whose output covers ``min(size, 388)``.
    batch_size: tiles per network call, rounded up to a multiple of the device count; the
      last batch is padded, so every call has the same shape.
    overlap: fraction of the output tile shared by neighbouring tiles, for models with
      padded convolutions (unpadded models tile exactly and ignore it).
    tta: average over flips (and quarter turns, for square tiles).
    devices: devices the batch is split over (default: all local devices).
  """
  _check_dims(model, 2, "predict_image", "predict_volume")
  image = _check_array(to_float(image), model.in_channels, spatial_dims=2)
  check_batch_size(batch_size)
  if _whole(model.geometry, tile_size, image.shape[:2]):
    try:
      model.geometry.check_shape(*image.shape[:2])
    except ValueError as error:
      raise ValueError(f"tile_size {WHOLE!r} (the whole image): {error}") from None
    return tiling.predict_whole(model, image, tta=tta, devices=devices)
  tile = tiling.tile_shape(model.geometry, tile_size, image.shape[:2])
  return tiling.overlap_tile(model, image, tile, batch_size=batch_size, overlap=overlap,
                             tta=tta, devices=devices)


def predict_volume(model: nnx.Module, volume: np.ndarray, *,
                   tile_size: int | Sequence[int] | None = None, batch_size: int = 1,
                   overlap: float = 0.5, tta: bool = False,
                   devices: Sequence[jax.Device] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """Probabilities ``[D, H, W, num_classes]`` (float32) of a 3-D U-Net for one volume, tiled
  as ``predict_image`` tiles images: exactly for unpadded models (the result equals one pass
  over the whole mirrored volume), blended with a 3-D Gaussian window for padded ones.

  Memory: the device holds the model and one batch of tiles (and its activations) at a time;
  the host holds the volume as float32, the result (``D·H·W·classes·4`` bytes: 1 GiB for a
  512³ volume and two classes) and, for blending models, the summed weights (``D·H·W·4``
  bytes). Tiles are gathered from the volume through mirrored indices, batch by batch; no
  padded copy of the volume is made.

  Args:
    model: a ``UNet(spatial_dims=3)`` (used in eval mode; the model passed in is not changed).
    volume: ``[D, H, W]`` or ``[D, H, W, in_channels]``, any size ≥ 1×1×1; uint8 / uint16 are
      scaled to ``[0, 1]``, floats used as they are.
    tile_size: the tile's input size, an int (a cube) or ``(depth, height, width)``, each a
      valid input size of the model. Default: per axis, a tile whose output covers
      ``min(size, 64)`` voxels, taken from the ladder 16, 32, 64 so few shapes compile.
    batch_size: tiles per network call, rounded up to a multiple of the device count; the
      last batch is padded, so every call has the same shape.
    overlap: fraction of the output tile shared by neighbouring tiles, for models with
      padded convolutions (unpadded models tile exactly and ignore it).
    tta: average over the 8 combinations of flips along depth, height and width.
    devices: devices each batch is split over (default: all local devices).
    progress: called as ``progress(tiles_done, tiles_total)`` after each batch.
  """
  _check_dims(model, 3, "predict_volume", "predict_image")
  volume = _check_array(to_float(volume, name="volume"), model.in_channels, spatial_dims=3)
  check_batch_size(batch_size)
  tile = tiling.tile_shape(model.geometry, tile_size, volume.shape[:3])
  return tiling.overlap_tile(model, volume, tile, batch_size=batch_size, overlap=overlap,
                             tta=tta, devices=devices, progress=progress)


def _check_dims(model: nnx.Module, dims: int, function: str, other: str) -> None:
  have = getattr(model, "spatial_dims", 2)
  if have != dims:
    raise ValueError(f"{function} needs a {dims}-D U-Net (spatial_dims={dims}); this one has "
                     f"spatial_dims={have}: use {other}")


def _check_array(array: np.ndarray, channels: int, *, spatial_dims: int) -> np.ndarray:
  """``array`` with a channel axis, checked against the model's channels."""
  what, axes = ("image", "H, W") if spatial_dims == 2 else ("volume", "D, H, W")
  array = array[..., None] if array.ndim == spatial_dims else array
  if array.ndim != spatial_dims + 1:
    hint = ("; a 2-D array is an image: use predict_image with a 2-D U-Net"
            if spatial_dims == 3 and array.ndim == 2 else "")
    raise ValueError(f"expected {'an' if what == 'image' else 'a'} {what} [{axes}] or "
                     f"[{axes}, C], got shape {array.shape}{hint}")
  if min(array.shape[:-1]) < 1:
    raise ValueError(f"the {what} is empty (shape {array.shape}); it needs at least "
                     f"{'×'.join('1' * spatial_dims)} {'pixels' if what == 'image' else 'voxels'}")
  if array.shape[-1] != channels:
    raise ValueError(f"this U-Net takes {channels} channel(s), the {what} has "
                     f"{array.shape[-1]} (shape {array.shape}); see match_channels")
  return array


def _whole(geometry: Geometry, tile_size, image_hw) -> bool:
  """Whether to predict the image in one pass: asked for, or the default for pad-to-skip
  models on images of at most ``WHOLE_IMAGE_LIMIT`` pixels per side."""
  if isinstance(tile_size, str):
    if tile_size != WHOLE:
      raise ValueError(f"tile_size must be an int, (height, width) or {WHOLE!r}, got "
                       f"{tile_size!r}")
    return True
  return (tile_size is None and geometry.skip_fit == "pad"
          and max(image_hw) <= WHOLE_IMAGE_LIMIT)


def mask_image(classes: np.ndarray, mask_values: Sequence) -> np.ndarray:
  """A ``[H, W]`` class map written with the mask value of each class, as milesial's
  ``mask_to_image`` does: ``[0, 1]`` → 0/255, gray values → uint8/uint16, RGB triples → RGB."""
  values = np.asarray(mask_values)
  if classes.size and classes.max() >= len(values):
    raise ValueError(f"class {int(classes.max())} has no mask value: mask_values lists "
                     f"{len(values)} ({mask_values})")
  if values.ndim == 1 and set(values.tolist()) <= {0, 1}:
    values = values * 255
  dtype = np.uint8 if values.max() <= 255 else np.uint16
  return values.astype(dtype)[classes]


def write_prediction(probabilities: np.ndarray, image: np.ndarray, output: pathlib.Path,
                     name: str, *, activation: str, class_names: Sequence[str] | None = None,
                     mask_values: Sequence | None = None, save_probabilities: bool = False
                     ) -> dict[str, pathlib.Path]:
  """Write one image's results; returns ``{what: path}``.

  * ``<name>_mask.png``: the class map (0/255 for two classes or a binary model, class ids
    otherwise, or each class's ``mask_values``); a multi-label model writes
    ``<name>_mask_<class>.png`` (0/255) per class instead;
  * ``<name>_overlay.png``: the image with the predicted classes tinted;
  * ``<name>_probabilities.npy`` with ``save_probabilities``: ``[H, W, C]`` float32, softmax
    or sigmoid as the model's head.
  """
  from PIL import Image
  num_classes = probabilities.shape[-1]
  decisions = heads.decide(probabilities, activation)
  files = {}
  if decisions.ndim == probabilities.ndim:  # multi-label: one mask per class
    names = class_names or [str(c) for c in range(num_classes)]
    for c, class_name in enumerate(names):
      files[f"mask_{class_name}"] = output / f"{name}_mask_{class_name}.png"
      Image.fromarray(decisions[..., c].astype(np.uint8) * 255).save(files[f"mask_{class_name}"])
    shown = heads.pack(decisions)
  else:
    files["mask"] = output / f"{name}_mask.png"
    mask = (mask_image(decisions, mask_values) if mask_values is not None
            else class_mask(decisions, heads.metric_classes(activation, num_classes)))
    Image.fromarray(mask).save(files["mask"])
    shown = decisions
  files["overlay"] = output / f"{name}_overlay.png"
  Image.fromarray(overlay(image, shown)).save(files["overlay"])
  if save_probabilities:
    files["probabilities"] = output / f"{name}_probabilities.npy"
    np.save(files["probabilities"], probabilities)
  return files


def predict_file(model: nnx.Module, path: pathlib.Path, output: pathlib.Path, *,
                 name: str | None = None, save_probabilities: bool = False,
                 class_names: Sequence[str] | None = None, mask_values: Sequence | None = None,
                 **options) -> list[pathlib.Path]:
  """Predict every page of an image file and write its results (``write_prediction``);
  return the written paths."""
  pages = read_image(path)
  written = []
  for page, page_name in zip(pages, page_names(name or path.stem, len(pages))):
    image = match_channels(to_float(page, name=str(path)), model.in_channels, name=str(path))
    probabilities = predict_image(model, image, **options)
    written += write_prediction(probabilities, image, output, page_name,
                                activation=model.activation, class_names=class_names,
                                mask_values=mask_values,
                                save_probabilities=save_probabilities).values()
  return written


def predict_volume_file(model: nnx.Module, path: pathlib.Path, output: pathlib.Path, *,
                        name: str | None = None, save_probabilities: bool = False,
                        class_names: Sequence[str] | None = None, intensity: str = "auto",
                        **options) -> list[pathlib.Path]:
  """Predict one volume file (``unet_jax.data.volumes``: TIFF stack, NIfTI or ``.npy``) and
  write its results in the input's format; return the written paths.

  * ``<name>_mask<suffix>``: the class ids ``[D, H, W]`` (uint8, uint16 past 256 classes); a
    multi-label model writes ``<name>_mask_<class><suffix>`` (0/1) per class instead;
  * ``<name>_probabilities<suffix>`` with ``save_probabilities``: ``[D, H, W, C]`` float32.

  NIfTI results carry the input's affine and header, so they lie where the input lies. The
  voxels become ``[0, 1]`` as training makes them (``volumes.to_unit_volume``, ``intensity``);
  ``options`` go to ``predict_volume``.
  """
  from unet_jax.data import volumes
  voxels, meta = volumes.read_volume(path, with_meta=True)
  volume = volumes.to_unit_volume(voxels, model.in_channels, name=str(path),
                                  intensity=intensity)
  del voxels
  probabilities = predict_volume(model, volume, **options)
  suffix = path.name[len(volumes.volume_stem(path)):]
  name = name or volumes.volume_stem(path)
  decisions = heads.decide(probabilities, model.activation)
  written = []
  if decisions.ndim == probabilities.ndim:  # multi-label: one mask per class
    names = class_names or [str(c) for c in range(model.num_classes)]
    masks = {f"{name}_mask_{n}{suffix}": decisions[..., c].astype(np.uint8)
             for c, n in enumerate(names)}
  else:
    classes = heads.metric_classes(model.activation, model.num_classes)
    masks = {f"{name}_mask{suffix}": decisions.astype(np.uint8 if classes <= 256 else np.uint16)}
  for file_name, mask in masks.items():
    written.append(output / file_name)
    volumes.write_volume(written[-1], mask, reference=meta)
  if save_probabilities:
    written.append(output / f"{name}_probabilities{suffix}")
    volumes.write_volume(written[-1], probabilities, reference=meta)
  return written


def add_prediction_flags(parser: argparse.ArgumentParser) -> None:
  """The flags shared with ``unet_jax.evaluate``."""
  parser.add_argument("--checkpoint", required=True, help="a training workdir, a converted "
                      "model directory, a hub-style folder, or a PyTorch "
                      ".pth/.pt/.safetensors file")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--step", type=_positive_int, default=None,
                     help="with a training workdir: the checkpoint of this step (default: "
                     "the latest)")
  which.add_argument("--best", action="store_true",
                     help="with a training workdir: the best checkpoint kept by training, by "
                     "the run's checkpoint.best_metric")
  parser.add_argument("--tile-size", type=_tile_size_flag, default=None,
                      help="tile input size: N, HxW or DxHxW for volumes (valid input sizes "
                      f"of the model) or '{WHOLE}' for one pass over each whole image "
                      f"(default: the whole image for pad-to-skip models up to "
                      f"{WHOLE_IMAGE_LIMIT} px per side, else tiles whose output covers "
                      "min(image, 388) per axis; min(volume, 64) for volumes)")
  parser.add_argument("--batch-size", type=_positive_int, default=4,
                      help="tiles per network call (≥ 1)")
  parser.add_argument("--overlap", type=float, default=0.5,
                      help="tile overlap for models with padded convolutions")
  parser.add_argument("--tta", action="store_true",
                      help="average over flips (and quarter turns for square tiles)")
  parser.add_argument("--allow-nonfinite", action="store_true",
                      help="load a checkpoint whose weights hold NaN or infinity (refused by "
                      "default: such a model predicts nothing useful)")
  parser.add_argument("--max-pixels", type=_positive_int, default=None,
                      help="refuse images larger than this many pixels, read from the file "
                      "header before decoding (default: 178,956,970, Pillow's limit)")
  parser.add_argument("--cpu-layer", "--cpu_layer", choices=("auto", "on", "off"),
                      default="auto", help="the CPU layer (unet_jax.cpu): faster operations "
                      "and process settings; auto: on when JAX runs on the CPU")


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
  return value


def _tile_size_flag(text: str):
  if text.strip().lower() == WHOLE:
    return WHOLE
  try:
    sizes = [int(part) for part in text.lower().replace("×", "x").split("x")]
  except ValueError:
    sizes = []
  if len(sizes) not in (1, 2, 3) or min(sizes) < 1:
    raise argparse.ArgumentTypeError(f"expected N, HxW, DxHxW or '{WHOLE}', got {text!r}")
  return sizes[0] if len(sizes) == 1 else tuple(sizes)


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What the command lines know of a checkpoint besides its model."""

  step: int | None
  class_names: tuple[str, ...] | None
  mask_values: list | None
  intensity: str | None = None  # a training run's data.volumes.intensity


def describe_checkpoint(path: str | pathlib.Path, config: dict, step: int | None) -> Loaded:
  """Class names (the training run's ``data.class_names``, or a converted model's
  ``class_names``), mask values (a converted milesial checkpoint's) and how volumes were
  scaled (the training run's ``data.volumes.intensity``) of a checkpoint."""
  import json
  path = pathlib.Path(path)
  data = {}
  if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
    try:
      data = json.loads((path / "config.json").read_text())["train"]["data"]
    except (KeyError, TypeError, ValueError):
      data = {}
  data = data if isinstance(data, dict) else {}
  names = config.get("class_names")
  if names is None:
    names = data.get("class_names")
  volumes = data.get("volumes")
  intensity = volumes.get("intensity") if isinstance(volumes, dict) else None
  return Loaded(step, tuple(names) if names else None, config.get("mask_values"), intensity)


@contextlib.contextmanager
def warnings_as_lines():
  """Show the warnings raised inside the block as plain ``warning: ...`` lines on stderr, the
  way a command line speaks, instead of Python's ``file:line: Category`` form."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      yield
    finally:
      for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {message}", file=sys.stderr)


def _wrong_path_hint(path: pathlib.Path) -> str:
  for parent in list(path.parents)[:3]:
    if (parent / "config.json").is_file() and (parent / "checkpoints").is_dir():
      return (f" It lies inside the training workdir {parent}: pass that folder as "
              f"--checkpoint, with --step N or --best to choose a checkpoint.")
  return (" Pass a training run's workdir (the folder holding config.json and checkpoints/), "
          "a directory written by python -m unet_jax.convert, or a .pth/.safetensors file.")


def load_for_cli(parser: argparse.ArgumentParser, checkpoint: str, *, cpu_layer: str = "auto",
                 step: int | None = None, best: bool = False, allow_nonfinite: bool = False,
                 max_pixels: int | None = None):
  """``(model, Loaded)`` of ``--checkpoint`` (``--step``/``--best`` for a training workdir),
  or exit 2 with a message naming it.

  As an entry point, it applies the CPU layer's process settings first (before JAX starts),
  switches the model to the layer's operations where ``cpu_layer`` asks for them, and reports
  both on stderr.
  """
  from unet_jax import cpu
  from unet_jax.training.checkpoint import best_step, load_model, saved_steps
  settings = cpu.configure_process(cpu_layer)
  if max_pixels is not None:
    from unet_jax.data import decode
    decode.set_max_pixels(max_pixels)
  path = pathlib.Path(checkpoint)
  is_workdir = (path / "config.json").is_file() and (path / "checkpoints").is_dir()
  if (step is not None or best) and not is_workdir:
    parser.exit(2, f"error: --step and --best choose among a training run's checkpoints, but "
                   f"{checkpoint} is not a training workdir (config.json + checkpoints/)\n")
  try:
    with warnings_as_lines():
      if best:
        step = best_step(path)
      model, config = load_model(checkpoint, step=step, allow_nonfinite=allow_nonfinite)
  except Exception as error:  # loading raises many types for missing or foreign files
    hint = _wrong_path_hint(path.absolute()) if path.is_dir() and not is_workdir else ""
    parser.exit(2, f"error: cannot load the checkpoint {checkpoint}: "
                   f"{type(error).__name__}: {error}{hint}\n")
  if is_workdir and step is None:
    step = (saved_steps(path) or [None])[-1]
  ops, why = cpu.select_ops(cpu_layer)
  cpu.report(ops, why, settings)
  if step is not None:
    print(f"checkpoint: {checkpoint} at step {step}{' (best)' if best else ''}",
          file=sys.stderr)
  model = cpu.enable(model) if ops is cpu.OPS else model
  return model, describe_checkpoint(path, config, step)


def prepare_output(parser: argparse.ArgumentParser, output: str) -> pathlib.Path:
  """The output folder, created and checked writable before any compute; exit 2 if not."""
  folder = pathlib.Path(output)
  if folder.exists() and not folder.is_dir():
    parser.exit(2, f"error: --output {output} exists and is not a folder; name a folder "
                   f"(it is created if missing)\n")
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".unet-jax-write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as error:
    parser.exit(2, f"error: cannot write to the output folder {output}: {error}\n")
  return folder


def this_process_share(paths: list) -> list:
  """The files this process handles when several processes predict together (every
  ``jax.process_count()``-th, from ``jax.process_index()``): each file is done once."""
  return paths[jax.process_index()::jax.process_count()]


def report_failures(failures: dict[str, str]) -> int:
  """Print the files that failed; the exit status (1 if any)."""
  for name, error in failures.items():
    print(f"failed: {name}: {error}", file=sys.stderr)
  if failures:
    print(f"{len(failures)} file(s) failed", file=sys.stderr)
  return 1 if failures else 0


def list_inputs(path: str | os.PathLike) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """``(files, unsupported)``: images and volumes (``unet_jax.data.volumes``) of a file or a
  folder (not recursive; see :mod:`unet_jax.data.listing`); ``ValueError`` when there is
  neither. Of a folder, ``unsupported`` are its other regular files, and one ``UserWarning``
  line says what was left out and why."""
  from unet_jax.data import listing, volumes
  path = pathlib.Path(path)
  supported = tuple(dict.fromkeys(IMAGE_SUFFIXES + volumes.VOLUME_SUFFIXES))
  if not path.exists():
    raise FileNotFoundError(listing.missing(path))
  if not path.is_dir():
    if not path.is_file():
      raise ValueError(f"{path} is neither an image or volume file nor a folder")
    if not (_is_image(path) or _is_volume(path)):
      raise ValueError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                       f"supported: {', '.join(supported)}")
    return [path], []
  found = volumes.list_volumes(path)  # images are among what it leaves out as unsupported
  images = [n for n in found.skipped.get("unsupported", []) if _is_image(path / n)]
  skipped = {reason: [n for n in names if n not in images]
             for reason, names in found.skipped.items()}
  found = listing.Listing(path, supported, sorted(found.files + [path / n for n in images]),
                          {reason: names for reason, names in skipped.items() if names})
  if not found.files:
    raise ValueError(f"no images or volumes ({', '.join(supported)}) in {path}"
                     f"{f'; it holds: {found.entries()}' if found.skipped else ' (it is empty)'}")
  if found.skipped:
    warnings.warn(found.summary(), UserWarning, stacklevel=2)
  return found.files, found.unsupported


def _is_image(path: pathlib.Path) -> bool:
  return path.suffix.lower() in IMAGE_SUFFIXES


def _is_volume(path: pathlib.Path) -> bool:
  from unet_jax.data import volumes
  return path.name.lower().endswith(volumes.VOLUME_SUFFIXES)


def _predict_path(model: nnx.Module, path: pathlib.Path, output: pathlib.Path, name: str,
                  args: argparse.Namespace, loaded: Loaded) -> None:
  """Predict one ``--input`` file as an image (a 2-D model) or a volume (a 3-D one)."""
  from tqdm import tqdm

  from unet_jax.data import volumes
  options = dict(tile_size=args.tile_size, overlap=args.overlap, tta=args.tta,
                 save_probabilities=args.save_probabilities, class_names=loaded.class_names)
  if model.spatial_dims == 2:
    if not _is_image(path):
      raise ValueError(f"a volume file, but this U-Net is 2-D and predicts images "
                       f"({', '.join(IMAGE_SUFFIXES)}); volumes need a 3-D checkpoint "
                       f"(spatial_dims=3)")
    predict_file(model, path, output, name=name, mask_values=loaded.mask_values,
                 batch_size=args.batch_size or 4, **options)
    return
  if not _is_volume(path):
    raise ValueError(f"an image file, but this U-Net is 3-D (spatial_dims=3) and predicts "
                     f"volumes ({', '.join(volumes.VOLUME_SUFFIXES)}); images need a 2-D "
                     f"checkpoint")
  with tqdm(unit="tile", desc=name, leave=False, disable=None) as bar:
    def progress(done, total):
      bar.total = total
      bar.update(done - bar.n)
    predict_volume_file(model, path, output, name=name, batch_size=args.batch_size or 1,
                        intensity=args.intensity or loaded.intensity or "auto",
                        progress=progress, **options)


def main(argv: list[str] | None = None) -> int:
  from tqdm import tqdm

  from unet_jax.data import volumes
  parser = argparse.ArgumentParser(
      prog="python -m unet_jax.predict",
      description="Segment images or volumes of any size with a U-Net (overlap-tile). For "
      "images, writes <stem>_mask.png (0/255 for two classes or a binary model, class ids "
      "otherwise, or a converted milesial model's mask values), <stem>_overlay.png and, with "
      "--save-probabilities, <stem>_probabilities.npy ([H, W, classes] float32: softmax, or "
      "sigmoid for binary and multi-label models). A multi-label model writes "
      "<stem>_mask_<class>.png per class. Multi-page TIFFs give <stem>_page000_... per page. "
      "A 3-D checkpoint (spatial_dims=3) reads volumes (TIFF stacks, NIfTI, .npy) and writes "
      "<stem>_mask.<suffix> (class ids) and, with --save-probabilities, "
      "<stem>_probabilities.<suffix> ([D, H, W, classes]) in the input's format, NIfTI with "
      "the input's affine. With several processes, each predicts its share of the files.")
  add_prediction_flags(parser)
  parser.set_defaults(batch_size=None)  # 4 image tiles or 1 volume tile per call
  parser.add_argument("--input", required=True,
                      help="an image or volume file, or a folder of them")
  parser.add_argument("--output", required=True, help="folder for the results")
  parser.add_argument("--save-probabilities", action="store_true")
  parser.add_argument("--intensity", choices=volumes.INTENSITIES, default=None,
                      help="how volume values become [0, 1] (unet_jax.data.volumes; default: "
                      "the training run's data.volumes.intensity, else auto)")
  args = parser.parse_args(argv)
  try:
    with warnings_as_lines():
      files, unsupported = list_inputs(args.input)
  except (OSError, ValueError) as error:
    parser.exit(2, f"error: {error}\n")
  output = prepare_output(parser, args.output)
  model, loaded = load_for_cli(parser, args.checkpoint, cpu_layer=args.cpu_layer,
                               step=args.step, best=args.best,
                               allow_nonfinite=args.allow_nonfinite, max_pixels=args.max_pixels)
  supported = dict.fromkeys(IMAGE_SUFFIXES + volumes.VOLUME_SUFFIXES)
  failures = {str(p): f"unsupported file type; supported: {', '.join(supported)}"
              for p in this_process_share(unsupported)}
  stem = volumes.volume_stem if model.spatial_dims == 3 else (lambda p: p.stem)
  stems = [stem(p) for p in files]
  mine = this_process_share(files)
  for path in tqdm(mine, unit="file", disable=None):
    name = stem(path) if stems.count(stem(path)) == 1 else path.name  # a.png and a.tif
    try:
      _predict_path(model, path, output, name, args, loaded)
    except Exception as error:  # one bad file must not stop the others
      failures[str(path)] = f"{type(error).__name__}: {error}"
  share = f" (process {jax.process_index()} of {jax.process_count()})" if (
      jax.process_count() > 1) else ""
  kind = "volume" if model.spatial_dims == 3 else "image"
  print(f"wrote {len(mine) - sum(1 for p in mine if str(p) in failures)} of {len(mine)} "
        f"{kind} file(s) to {output}{share}")
  return report_failures(failures)


if __name__ == "__main__":
  sys.exit(main())
