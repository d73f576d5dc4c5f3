"""A trained U-Net out of JAX: StableHLO (``jax.export``) and ONNX (``jax2onnx``).

Both export the evaluation-mode forward pass: ``[N, H, W, C]`` float32 images (NHWC) to
``[N, H', W', classes]`` float32 logits. Beside the artefacts, ``export.json`` says what a
caller must do first (channels, value scaling, layout, sizes) and how to read the output
(softmax over the last axis, class names).

* **StableHLO**: serialised ``jax.export.Exported`` for the platforms asked (default cpu, cuda
  and tpu), with a symbolic batch. Where the model's geometry allows it (padded convolutions
  everywhere) height and width are symbolic too, any multiple of ``2**depth``; an unpadded
  model (``paper``, ``walkthrough``) is exported at fixed sizes, one file each, which
  ``export.json`` lists. ``load(path)`` runs them with JAX alone, without this package's model
  code.
* **ONNX**: through ``jax2onnx``, at ``OPSET``, with a dynamic batch and fixed height and width
  (one file per size). Max-pooling is written as a reshape and a maximum, which computes the
  same values and which ONNX runtimes accept (a ``MaxPool`` over an NHWC window is refused by
  onnxruntime).

Only the stock operations export: a model switched to the CPU layer is switched back first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("stablehlo", "onnx")
PLATFORMS = ("cpu", "cuda", "tpu")
OPSET = 21
MANIFEST = "export.json"
# Unpadded models are exported at one fixed size unless told otherwise: the paper's tile.
DEFAULT_SIZE = 572


def _max_pool_2x2_reshaped(x: jax.Array) -> jax.Array:
  """2×2 max-pooling as a reshape and a maximum (the values of ``ops.max_pool_2x2``)."""
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _inference_copy(model, *, for_onnx: bool):
  """An evaluation-mode copy of ``model`` with stock operations (and, for ONNX, the reshaped
  max-pooling)."""
  from flax import nnx

  from unet_jax import ops
  from unet_jax.model import use_ops
  copy = nnx.clone(model)
  chosen = ops.STOCK
  if for_onnx:
    chosen = dataclasses.replace(ops.STOCK, name="onnx", max_pool_2x2=_max_pool_2x2_reshaped)
  use_ops(copy, chosen)
  copy.eval()
  return copy


def _check_2d(model) -> None:
  if getattr(model, "spatial_dims", 2) != 2:
    raise ValueError(f"export covers 2-D U-Nets (images [N, H, W, C]); this model is "
                     f"{model.spatial_dims}-D: use jax.export on its forward pass directly")


def symbolic_sizes(model) -> bool:
  """Whether height and width can be symbolic: every convolution padded (then any multiple of
  ``2**depth`` is a valid size)."""
  geometry = model.geometry
  return geometry.encoder_padding == "same" and geometry.decoder_padding == "same"


def _check_sizes(model, sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  checked = []
  for height, width in sizes:
    model.output_shape(height, width)  # a clear ValueError naming the nearest valid sizes
    checked.append((int(height), int(width)))
  return checked


def default_sizes(model) -> list[tuple[int, int]]:
  """One fixed size for an unpadded model: the smallest valid size ≥ 572 on both axes."""
  size = model.geometry.nearest_valid(DEFAULT_SIZE)[1]
  return [(size, size)]


def export_stablehlo(model, *, platforms: Sequence[str] = PLATFORMS,
                     sizes: Sequence[tuple[int, int]] | None = None
                     ) -> dict[str, jax.export.Exported]:
  """``jax.export`` of the eval-mode forward pass, keyed by ``"b,H,W"``-style input specs.

  With ``sizes`` (``[(H, W), ...]``), one export per size with a symbolic batch; without, a
  single export with symbolic batch, height and width when ``symbolic_sizes(model)``, else
  one at ``default_sizes(model)``.
  """
  _check_2d(model)
  net = _inference_copy(model, for_onnx=False)
  channels = model.in_channels
  if sizes is None and symbolic_sizes(model):
    m = 2**model.geometry.depth
    specs = {f"b, {m}*h, {m}*w, {channels}": None}
  else:
    fixed = _check_sizes(model, sizes) if sizes else default_sizes(model)
    specs = {f"b, {h}, {w}, {channels}": (h, w) for h, w in fixed}
  exported = {}
  for spec in specs:
    shape = jax.export.symbolic_shape(spec)
    exported[spec] = jax.export.export(jax.jit(lambda x: net(x)), platforms=tuple(platforms))(
        jax.ShapeDtypeStruct(shape, jnp.float32))
  return exported


def export_onnx(model, path: str | pathlib.Path, *, size: tuple[int, int],
                opset: int = OPSET) -> pathlib.Path:
  """Write the eval-mode forward pass at ``size`` with a dynamic batch as ONNX to ``path``."""
  try:
    from jax2onnx import to_onnx
  except ImportError as error:
    raise ImportError("ONNX export needs jax2onnx and onnx: pip install -e '.[onnx]' && "
                      "pip install --no-deps 'jax2onnx>=0.17' (see the README)") from error
  (height, width), = _check_sizes(model, [size])
  _check_2d(model)
  net = _inference_copy(model, for_onnx=True)
  path = pathlib.Path(path)
  to_onnx(lambda x: net(x), inputs=[("batch", height, width, model.in_channels)],
          model_name="unet", opset=opset, input_names=["image"], output_names=["logits"],
          return_mode="file", output_path=str(path))
  return path


def manifest(model, *, fmt: str, files: dict[str, str], class_names: Sequence[str] | None,
             config: dict[str, Any], symbolic: bool, platforms: Sequence[str] = (),
             opset: int | None = None) -> dict[str, Any]:
  """What a caller of the exported model needs to know, as JSON."""
  names = list(class_names) if class_names else (
      ["background", "foreground"] if model.num_classes == 2 or (
          model.num_classes == 1 and model.activation == "sigmoid")
      else [f"class_{k}" for k in range(model.num_classes)])
  m = 2**model.geometry.depth
  sizes = (f"any multiple of {m} (height and width independently)" if symbolic
           else "the fixed sizes of the files listed")
  return {
      "format": fmt,
      "files": files,
      "platforms": list(platforms) if fmt == "stablehlo" else None,
      "onnx_opset": opset if fmt == "onnx" else None,
      "input": {"name": "image", "layout": "NHWC", "dtype": "float32",
                "channels": model.in_channels, "sizes": sizes,
                "scaling": "unsigned-integer images divided by their type's maximum "
                           "(uint8 / 255, uint16 / 65535) into [0, 1]; float images as they "
                           "are; grey images as one channel, colour as RGB"},
      "output": {"name": "logits", "layout": "NHWC", "dtype": "float32",
                 "classes": model.num_classes, "class_names": names,
                 "activation": model.activation, "head": _head_text(model),
                 "size": "smaller than the input for unpadded convolutions: "
                         "see unet_jax.geometry, or run a probe image"},
      "model": config,
      "versions": {"jax": jax.__version__, "unet_jax": _version()},
  }


def _head_text(model) -> str:
  if model.activation == "softmax":
    return "softmax over the last axis; the class is the argmax"
  if model.num_classes == 1:
    return ("binary: sigmoid of the one channel is the foreground probability; foreground "
            "where it exceeds 0.5 (the logit exceeds 0)")
  return ("multi-label: a sigmoid per channel; a pixel belongs to class c where channel c's "
          "probability exceeds 0.5")


def _version() -> str:
  from importlib import metadata
  try:
    return metadata.version("unet-jax")
  except metadata.PackageNotFoundError:
    return "unknown"


def load(path: str | pathlib.Path) -> Callable[[Any], jax.Array]:
  """A callable ``images [N, H, W, C] → logits`` from a StableHLO export (a ``.stablehlo`` file
  or the directory written by the command line), run by JAX without the model's code.

  With several fixed-size files, the call picks the one that matches the image's size.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    info = json.loads((path / MANIFEST).read_text())
    if info["format"] != "stablehlo":
      raise ValueError(f"{path} holds a {info['format']} export; load() runs StableHLO (use "
                       f"onnxruntime for ONNX)")
    files = [path / name for name in info["files"].values()]
  else:
    files = [path]
  calls = {}
  for file in files:
    exported = jax.export.deserialize(bytearray(file.read_bytes()))
    shape = exported.in_avals[0].shape
    key = tuple(d if isinstance(d, int) else None for d in shape[1:3])
    calls[key] = exported.call

  def call(images):
    images = jnp.asarray(images, jnp.float32)
    hw = tuple(images.shape[1:3])
    for key, fn in calls.items():
      if all(k is None or k == s for k, s in zip(key, hw)):
        return fn(images)
    sizes = ", ".join(f"{h}×{w}" for h, w in calls)
    raise ValueError(f"no exported size matches images of {hw[0]}×{hw[1]}; this export takes "
                     f"{sizes}")

  return call


def _parse_sizes(text: str | None) -> list[tuple[int, int]] | None:
  if not text:
    return None
  sizes = []
  for item in text.split(","):
    parts = item.lower().split("x")
    try:
      h, w = (int(parts[0]), int(parts[-1]))
    except ValueError:
      raise SystemExit(f"error: --sizes takes HxW items separated by commas (e.g. 572x572,"
                       f"636x636), got {item!r}") from None
    sizes.append((h, w))
  return sizes


def _class_names(checkpoint: pathlib.Path) -> list[str] | None:
  config = checkpoint / "config.json"
  if checkpoint.is_dir() and config.is_file():
    saved = json.loads(config.read_text())
    names = saved.get("train", {}).get("data", {}).get("class_names")
    return list(names) if names else None
  return None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m unet_jax.export",
      description="Export a trained or converted U-Net's eval-mode forward pass as StableHLO "
      "(jax.export) or ONNX, with export.json describing its input and output.")
  parser.add_argument("--checkpoint", required=True, help="a training workdir, a converted "
                      "model directory, a pretrained folder, or a PyTorch checkpoint file")
  choose = parser.add_mutually_exclusive_group()
  choose.add_argument("--step", type=int, help="with a training workdir: this step (default: "
                      "the latest)")
  choose.add_argument("--best", action="store_true", help="with a training workdir: the best "
                      "checkpoint kept, by the run's checkpoint.best_metric")
  parser.add_argument("--output", required=True, help="directory for the files")
  parser.add_argument("--format", choices=FORMATS, default="stablehlo")
  parser.add_argument("--platforms", default=",".join(PLATFORMS),
                      help="StableHLO: comma-separated, from cpu, cuda, rocm, tpu")
  parser.add_argument("--sizes", help="HxW[,HxW...]: fixed input sizes (one file each); "
                      "default: symbolic for padded models, 572x572 (or the nearest valid) "
                      "otherwise, and always fixed for ONNX")
  parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset")
  parser.add_argument("--allow-nonfinite", action="store_true",
                      help="export weights that hold NaN or infinity (refused by default)")
  args = parser.parse_args(argv)
  from unet_jax.training.checkpoint import best_step, load_model
  try:
    step = best_step(args.checkpoint) if args.best else args.step
    model, config = load_model(args.checkpoint, step=step,
                               allow_nonfinite=args.allow_nonfinite)
  except Exception as error:  # loading raises many types for missing or foreign files
    parser.exit(2, f"error: cannot load the checkpoint {args.checkpoint}: "
                   f"{type(error).__name__}: {error}\n")
  sizes = _parse_sizes(args.sizes)
  output = pathlib.Path(args.output)
  if output.exists() and not output.is_dir():
    parser.exit(2, f"error: --output {output} exists and is not a directory\n")
  output.mkdir(parents=True, exist_ok=True)
  platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
  try:
    files = {}
    if args.format == "stablehlo":
      for spec, exported in export_stablehlo(model, platforms=platforms, sizes=sizes).items():
        name = ("model.stablehlo" if "*h" in spec
                else "model-{}x{}.stablehlo".format(*spec.split(", ")[1:3]))
        (output / name).write_bytes(exported.serialize())
        files[spec] = name
    else:
      for h, w in (_check_sizes(model, sizes) if sizes else default_sizes(model)):
        name = f"model-{h}x{w}.onnx"
        export_onnx(model, output / name, size=(h, w), opset=args.opset)
        files[f"batch, {h}, {w}, {model.in_channels}"] = name
  except (ValueError, ImportError) as error:
    parser.exit(2, f"error: {error}\n")
  info = manifest(model, fmt=args.format, files=files,
                  class_names=_class_names(pathlib.Path(args.checkpoint)), config=config,
                  symbolic=any("*h" in spec for spec in files), platforms=platforms,
                  opset=args.opset)
  (output / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
  for spec, name in files.items():
    print(f"wrote {output / name} (input {spec})")
  print(f"wrote {output / MANIFEST}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
