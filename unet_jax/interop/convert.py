"""PyTorch U-Net checkpoints ⇄ Flax, for the walkthrough's and milesial's module layouts.

``load_pytorch(path)`` reads a ``.pth``/``.pt`` (never executing pickled code, no torch
needed) or ``.safetensors`` file, detects the layout from its key names, infers the
architecture from its tensor shapes and returns a ready ``UNet`` with its config. The other
way, ``to_pytorch(model, layout)`` returns a state dict that ``torch.nn.Module.load_state_dict``
accepts.

Layouts (module names in the PyTorch state dict):

* ``walkthrough``: ``layer1..5`` (``Sequential(conv, bn, relu, conv, bn, relu)``),
  ``decoder4..1.{up, conv_relu}``, ``last``.
* ``milesial``: ``inc.double_conv``, ``down1..4.maxpool_conv.1.double_conv``,
  ``up1..4.{up, conv.double_conv}``, ``outc.conv``; ``num_batches_tracked`` is dropped, and
  ``mask_values`` (the mask value of each class) goes to the config, where prediction writes
  masks with it. The model pads up-sampled maps to their skips as milesial's does
  (``skip_fit="pad"``), so it takes any image size, and a one-channel head is a binary
  sigmoid (``activation="sigmoid"``), as milesial trains it.

Command line::

  python -m unet_jax.convert model.pth out/               # → out/state (orbax), out/config.json
  python -m unet_jax.convert out/ back/ --to-pytorch      # → back/model.safetensors (+ .pth)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax import heads
from unet_jax.interop import pth
from unet_jax.model import UNet

LAYOUTS = ("walkthrough", "milesial")
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_IGNORED_KEYS = ("mask_values",)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Index of each layer inside the PyTorch Sequential(conv, bn, relu, conv, bn, relu).
_DOUBLE_CONV = (("0", "conv1"), ("1", "norm1"), ("3", "conv2"), ("4", "norm2"))
_LAYOUT_DEFAULTS = {
    "walkthrough": dict(encoder_padding="valid", decoder_padding="same",
                        concat_order="up_skip"),
    "milesial": dict(encoder_padding="same", decoder_padding="same", concat_order="skip_up",
                     skip_fit="pad"),
}
# Entries of a converted model's config.json that describe its data, not the network.
METADATA_KEYS = ("layout", "mask_values", "class_names")


def _module_pairs(layout: str, depth: int, upsample: str) -> list[tuple[str, tuple, str]]:
  """``(torch prefix, flax path, kind)`` for every layer, kind ∈ {conv, transpose, norm}."""
  def double_conv(torch_prefix, flax_path):
    return [(f"{torch_prefix}.{index}", flax_path + (name,), name[:-1])
            for index, name in _DOUBLE_CONV]

  if layout == "walkthrough":
    pairs = double_conv("layer1", ("inc",))
    for k in range(1, depth + 1):
      pairs += double_conv(f"layer{k + 1}", ("downs", k - 1, "conv"))
    for i in range(depth):
      pairs.append((f"decoder{depth - i}.up", ("ups", i, "up"), "transpose"))
      pairs += double_conv(f"decoder{depth - i}.conv_relu", ("ups", i, "conv"))
    return pairs + [("last", ("head",), "conv")]
  pairs = double_conv("inc.double_conv", ("inc",))
  for k in range(1, depth + 1):
    pairs += double_conv(f"down{k}.maxpool_conv.1.double_conv", ("downs", k - 1, "conv"))
  for i in range(depth):
    if upsample == "transpose":
      pairs.append((f"up{i + 1}.up", ("ups", i, "up"), "transpose"))
    pairs += double_conv(f"up{i + 1}.conv.double_conv", ("ups", i, "conv"))
  return pairs + [("outc.conv", ("head",), "conv")]


# torch name → (flax name, torch → flax, flax → torch), per kind of layer.
_TENSORS = {
    "conv": {"weight": ("kernel", lambda w: w.transpose(2, 3, 1, 0),
                        lambda k: k.transpose(3, 2, 0, 1)),
             "bias": ("bias", None, None)},
    # ConvTranspose2d stores (in, out, kH, kW) and flips the kernel relative to
    # lax.conv_transpose without transpose_kernel.
    "transpose": {"weight": ("kernel", lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1],
                             lambda k: k[::-1, ::-1].transpose(2, 3, 0, 1)),
                  "bias": ("bias", None, None)},
    "norm": {"weight": ("scale", None, None), "bias": ("bias", None, None),
             "running_mean": ("mean", None, None), "running_var": ("var", None, None)},
}


def unwrap(checkpoint: Any) -> dict[str, Any]:
  """The state dict inside a checkpoint: unwraps ``{"state_dict": ...}``-style training
  checkpoints and strips ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile)."""
  while isinstance(checkpoint, Mapping):
    inner = next((checkpoint[k] for k in _WRAPPER_KEYS
                  if isinstance(checkpoint.get(k), Mapping)), None)
    if inner is None:
      break
    checkpoint = inner
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"expected a state dict (a mapping of names to tensors), got "
                     f"{type(checkpoint).__name__}")
  state = {}
  for key, value in checkpoint.items():
    for prefix in ("module.", "_orig_mod."):
      key = key[len(prefix):] if key.startswith(prefix) else key
    state[key] = value
  return state


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """``"walkthrough"`` or ``"milesial"``, from the module names; ``ValueError`` otherwise."""
  keys = set(state_dict)
  if "layer1.0.weight" in keys and "last.weight" in keys:
    return "walkthrough"
  if "inc.double_conv.0.weight" in keys and "outc.conv.weight" in keys:
    return "milesial"
  sample = ", ".join(sorted(keys)[:8])
  raise ValueError(f"unrecognised checkpoint layout (keys: {sample}{', ...' if len(keys) > 8 else ''}); "
                   f"known layouts: walkthrough (layer1..5, decoder4..1, last) and milesial "
                   f"(inc, down1..4, up1..4, outc)")


def infer_config(state_dict: Mapping[str, Any], layout: str) -> dict[str, Any]:
  """``UNet`` keyword arguments that reproduce the checkpoint's architecture."""
  def shape(key):
    if key not in state_dict:
      raise ValueError(f"{layout} checkpoint has no {key!r}; cannot infer the architecture")
    return np.shape(state_dict[key])

  if layout == "walkthrough":
    depth = sum(1 for k in state_dict if k.startswith("layer") and k.endswith(".0.weight")) - 1
    features = [shape(f"layer{k + 1}.0.weight")[0] for k in range(depth + 1)]
    first, head, norm_key = "layer1.0", "last", "layer1.1.running_mean"
    upsample = "transpose"
  elif layout == "milesial":
    depth = sum(1 for k in state_dict
                if k.startswith("down") and k.endswith("maxpool_conv.1.double_conv.0.weight"))
    upsample = "transpose" if "up1.up.weight" in state_dict else "bilinear"
    features = [shape("inc.double_conv.0.weight")[0]] + [
        shape(f"down{k}.maxpool_conv.1.double_conv.3.weight")[0] for k in range(1, depth + 1)]
    if upsample == "bilinear":
      features[-1] *= 2
    first, head, norm_key = "inc.double_conv.0", "outc.conv", "inc.double_conv.1.running_mean"
  else:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  num_classes = int(shape(f"{head}.weight")[0])
  # A one-channel head is binary (milesial trains it with a sigmoid): heads.resolve's default.
  return dict(in_channels=int(shape(f"{first}.weight")[1]), num_classes=num_classes,
              activation=heads.resolve(None, num_classes),
              features=[int(f) for f in features], upsample=upsample,
              norm="batch" if norm_key in state_dict else None,
              use_bias=f"{first}.bias" in state_dict, **_LAYOUT_DEFAULTS[layout])


def from_pytorch(state_dict: Mapping[str, Any], *, layout: str | None = None,
                 allow_nonfinite: bool = False, **overrides) -> tuple[UNet, dict[str, Any]]:
  """A ``UNet`` holding a PyTorch state dict's weights, and its config.

  Args:
    state_dict: names → arrays (numpy, or anything ``np.asarray`` takes).
    layout: ``"walkthrough"`` or ``"milesial"``; detected from the names when ``None``.
    allow_nonfinite: accept tensors holding NaN or infinity (refused by default).
    **overrides: extra ``UNet`` options (``dtype``, ``remat``, ``dropout``, ...).

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped key at once, or naming the
      tensors that hold NaN or infinity.
  """
  state_dict = unwrap(state_dict)
  layout = layout or detect_layout(state_dict)
  config = {**infer_config(state_dict, layout), **overrides}
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet(**config, rngs=nnx.Rngs(0))))
  pure = nnx.to_pure_dict(abstract)
  missing, mis_shaped, nonfinite, used = [], [], [], set()
  for prefix, path, kind in _module_pairs(layout, len(config["features"]) - 1, config["upsample"]):
    node = _get(pure, path)
    for torch_name, (flax_name, to_flax, _) in _TENSORS[kind].items():
      if flax_name not in node:
        continue
      key = f"{prefix}.{torch_name}"
      if key not in state_dict:
        missing.append(key)
        continue
      used.add(key)
      # A copy, never a view: the caller's tensors (e.g. torch's) may change in place later.
      value = np.asarray(state_dict[key], dtype=np.float32)
      value = np.array(to_flax(value) if to_flax else value, copy=True, order="C")
      nonfinite += _nonfinite(key, value)
      if value.shape != node[flax_name].shape:
        mis_shaped.append(f"{key}: got {value.shape}, expected {node[flax_name].shape} (Flax layout)")
        continue
      node[flax_name] = jnp.asarray(value, node[flax_name].dtype)
  unexpected = [k for k in state_dict if k not in used and k not in _IGNORED_KEYS
                and not k.endswith(_IGNORED_SUFFIXES)]
  if missing or unexpected or mis_shaped:
    raise ValueError(f"cannot load this {layout} checkpoint into a U-Net with {config}:\n"
                     + _listing("missing", missing) + _listing("unexpected", unexpected)
                     + _listing("mis-shaped", mis_shaped))
  if nonfinite and not allow_nonfinite:
    _refuse_nonfinite(nonfinite, "the checkpoint")
  nnx.replace_by_pure_dict(abstract, pure)
  metadata = {"layout": layout}
  if "mask_values" in state_dict:
    metadata["mask_values"] = _mask_values(state_dict["mask_values"])
  return nnx.merge(graphdef, abstract), {**metadata, **config}


def to_pytorch(model: UNet, layout: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict (numpy arrays, float32) for ``model`` in the given layout.

  BatchNorm layers get ``num_batches_tracked = 0``, which PyTorch requires and does not use
  with its default momentum.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  pure = nnx.to_pure_dict(nnx.state(model))
  state = {}
  for prefix, path, kind in _module_pairs(layout, len(model.features) - 1,
                                             "transpose" if model.ups[0].up else "bilinear"):
    node = _get(pure, path)
    for torch_name, (flax_name, _, to_torch) in _TENSORS[kind].items():
      if flax_name in node:
        value = np.asarray(node[flax_name], dtype=np.float32)
        state[f"{prefix}.{torch_name}"] = np.ascontiguousarray(to_torch(value) if to_torch else value)
    if kind == "norm" and node:
      state[f"{prefix}.num_batches_tracked"] = np.array(0, dtype=np.int64)
  return state


def load_pytorch(path: str | os.PathLike, *, layout: str | None = None,
                 allow_nonfinite: bool = False, max_bytes: int | None = None,
                 **overrides) -> tuple[UNet, dict[str, Any]]:
  """Read a ``.pth``/``.pt``/``.safetensors`` file and return ``(model, config)``; tensors
  holding NaN or infinity are refused unless ``allow_nonfinite``, and a file that would put
  more than ``max_bytes`` in memory (default: 64× its size) is refused before reading it."""
  return from_pytorch(pth.load_state_dict(path, max_bytes=max_bytes), layout=layout,
                      allow_nonfinite=allow_nonfinite, **overrides)


def require_finite(tree: Any, *, source: str) -> None:
  """Raise ``ValueError`` naming each array of ``tree`` (nested dicts of arrays, e.g.
  ``nnx.to_pure_dict(state)``) that holds NaN or infinity; ``source`` says where it is from."""
  nonfinite = []
  for keys, value in jax.tree_util.tree_leaves_with_path(tree):
    name = "/".join(str(getattr(key, "key", key)) for key in keys)
    nonfinite += _nonfinite(name, np.asarray(value, np.float32))
  if nonfinite:
    _refuse_nonfinite(nonfinite, source)


def _nonfinite(name: str, value: np.ndarray) -> list[str]:
  count = value.size - np.count_nonzero(np.isfinite(value))
  return [f"{name} ({count} of {value.size} values)"] if count else []


def _refuse_nonfinite(nonfinite: list[str], source: str) -> None:
  shown = ", ".join(nonfinite[:5]) + (f" and {len(nonfinite) - 5} more"
                                      if len(nonfinite) > 5 else "")
  raise ValueError(f"{source} holds NaN or infinite values in {len(nonfinite)} tensor(s): "
                   f"{shown}. A model with them predicts nonsense (typically one class "
                   f"everywhere). To load it anyway, pass allow_nonfinite=True "
                   f"(--allow-nonfinite on the command line).")


def _mask_values(values: Any) -> list:
  """milesial's ``mask_values`` (the mask pixel value of each class: ints, or RGB lists) as
  JSON; what a predicted class is written as."""
  values = np.asarray(values).tolist()
  if not isinstance(values, list):
    raise ValueError(f"mask_values must be a list of mask values, got {values!r}")
  return values


def _get(tree: dict, path: tuple) -> dict:
  """The node at ``path``; empty for a layer the model does not have (e.g. no BatchNorm)."""
  for part in path:
    if part not in tree:
      return {}
    tree = tree[part]
  return tree


def _listing(what: str, keys: list[str]) -> str:
  return f"  {what} ({len(keys)}): {', '.join(keys)}\n" if keys else ""


def save_flax(model: UNet, config: Mapping[str, Any], directory: str | os.PathLike) -> None:
  """Write ``directory/state`` (orbax) and ``directory/config.json``."""
  import orbax.checkpoint as ocp
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "state", nnx.state(model), force=True)
  checkpointer.wait_until_finished()
  (directory / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")


def load_flax(directory: str | os.PathLike, *,
              allow_nonfinite: bool = False) -> tuple[UNet, dict[str, Any]]:
  """Read a model written by ``save_flax`` (or by the ``convert`` command line); parameters
  holding NaN or infinity are refused unless ``allow_nonfinite``."""
  import orbax.checkpoint as ocp
  directory = pathlib.Path(directory).absolute()
  config_file = directory / "config.json"
  if not config_file.is_file() or not (directory / "state").is_dir():
    raise FileNotFoundError(f"{directory} is not a converted model: expected config.json and "
                            f"state/ inside it (written by python -m unet_jax.convert)")
  config = json.loads(config_file.read_text())
  kwargs = {k: v for k, v in config.items() if k not in METADATA_KEYS}
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet(**kwargs, rngs=nnx.Rngs(0))))
  state = ocp.StandardCheckpointer().restore(directory / "state", abstract)
  if not allow_nonfinite:
    require_finite(nnx.to_pure_dict(state), source=str(directory))
  return nnx.merge(graphdef, state), config


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m unet_jax.convert",
      description="Convert a PyTorch U-Net checkpoint to Flax (orbax + config.json), or back.")
  parser.add_argument("input", help="a .pth/.pt/.safetensors file, or with --to-pytorch a "
                      "directory written by this command")
  parser.add_argument("output_dir")
  parser.add_argument("--layout", choices=LAYOUTS, default=None,
                      help="PyTorch module layout (default: detected from the key names)")
  parser.add_argument("--to-pytorch", action="store_true",
                      help="write OUTPUT_DIR/model.safetensors (and model.pth if torch is "
                      "installed) from a converted Flax model")
  parser.add_argument("--allow-nonfinite", action="store_true",
                      help="convert weights that hold NaN or infinity (refused by default)")
  parser.add_argument("--max-bytes", type=int, default=None,
                      help="memory a .pth file may expand to (default: 64x its size; stride-0 "
                      "views and compressed storages beyond it are refused)")
  args = parser.parse_args(argv)
  try:
    if args.to_pytorch:
      model, config = load_flax(args.input, allow_nonfinite=args.allow_nonfinite)
      layout = args.layout or config.get("layout") or "walkthrough"
      state = to_pytorch(model, layout)
      out = pathlib.Path(args.output_dir)
      out.mkdir(parents=True, exist_ok=True)
      pth.save_safetensors(state, out / "model.safetensors")
      written = [out / "model.safetensors"]
      try:
        pth.save_pth(state, out / "model.pth")
        written.append(out / "model.pth")
      except ImportError:
        pass
      print(f"wrote {', '.join(map(str, written))} ({layout} layout)")
    else:
      model, config = load_pytorch(args.input, layout=args.layout,
                                   allow_nonfinite=args.allow_nonfinite,
                                   max_bytes=args.max_bytes)
      save_flax(model, config, args.output_dir)
      n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
      print(f"converted {args.input} ({config['layout']} layout, {n:,} parameters, "
            f"features {config['features']}, {config['num_classes']} classes) → {args.output_dir}")
  except (ValueError, OSError) as error:
    parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
  main()
