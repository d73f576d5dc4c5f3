r"""Each 3×3 convolution of a U-Net, JAX against PyTorch: forward, input gradient, weight gradient.

  python benchmarks/conv_layers.py --preset walkthrough --width 64 --size 188 --batch 2
  python benchmarks/conv_layers.py --width 16 --output layers.json

Where ``compare_pytorch.py`` times whole training steps, this script says where the time
goes. It records the shape and padding of every 3×3 convolution the model runs on a
``--size``² input (by watching the model's own convolution calls), then times, per layer and
in one process, each framework's

* forward convolution;
* input gradient (the gradient with respect to the layer's input);
* weight gradient (with respect to the kernel).

JAX runs ``unet_jax.cpu.ops.conv_general_dilated`` (the CPU layer's) under ``jax.jit``, one
compiled function per pass, after warm-up. PyTorch runs ``conv2d`` and
``aten.convolution_backward`` with one output requested at a time, eagerly, with its default
threads. Each figure is the median of ``--repeats`` calls in milliseconds; the totals row
sums the layers, and ``ratio`` is JAX ÷ PyTorch (above 1, JAX is slower). The first layer's
input gradient is listed though no training step needs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax import cpu
from unet_jax.cpu import native, ops, xla as xla_defaults
from unet_jax.model import PRESETS

_NHWC = ("NHWC", "HWIO", "NHWC")
PASSES = ("forward", "input_grad", "weight_grad")


def conv_layers(preset: str, width: int, depth: int, size: int, batch: int,
                in_channels: int) -> list[dict]:
  """Input shape, kernel shape and padding of each 3×3 convolution, in the order they run."""
  features = tuple(width * 2**k for k in range(depth + 1))
  net = PRESETS[preset](in_channels, 2, features=features, dropout=0.0, rngs=nnx.Rngs(0))
  net.eval()
  seen = []

  def record(lhs, rhs, window_strides, padding, **kwargs):
    if rhs.shape[:2] == (3, 3):
      if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
      seen.append({"input": [batch, *lhs.shape[1:]], "kernel": list(rhs.shape),
                   "padding": [list(map(int, p)) for p in padding]})
    return ops.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)

  for _, module in net.iter_modules():
    if isinstance(module, nnx.Conv) and module.kernel_size == (3, 3):
      module.conv_general_dilated = record
  jax.eval_shape(lambda x: net(x), jax.ShapeDtypeStruct((1, size, size, in_channels),
                                                         jnp.float32))
  return seen


def _median_ms(fn, repeats: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _arrays(layer: dict, seed: int = 0):
  n, h, w, c = layer["input"]
  kh, kw, _, o = layer["kernel"]
  (top, bottom), (left, right) = layer["padding"]
  out = (h + top + bottom - kh + 1, w + left + right - kw + 1)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, h, w, c), dtype=np.float32)
  k = (rng.standard_normal((kh, kw, c, o)) / np.sqrt(kh * kw * c)).astype(np.float32)
  g = rng.standard_normal((n, *out, o), dtype=np.float32)
  return x, k, g


def time_jax(layer: dict, repeats: int) -> dict:
  x, k, g = map(jnp.asarray, _arrays(layer))
  padding = tuple(map(tuple, layer["padding"]))
  conv = lambda x, k: ops.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_NHWC)
  passes = {
      "forward": jax.jit(conv),
      "input_grad": jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]),
      "weight_grad": jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]),
  }
  args = {"forward": (x, k), "input_grad": (x, k, g), "weight_grad": (x, k, g)}
  return {name: _median_ms(lambda: jax.block_until_ready(fn(*args[name])), repeats)
          for name, fn in passes.items()}


def time_torch(layer: dict, repeats: int) -> dict:
  import torch

  x, k, g = _arrays(layer)
  x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  k = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())
  g = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
  (top, bottom), (left, right) = layer["padding"]
  if top != bottom or left != right:  # PyTorch pads symmetrically: pad the input instead
    x = torch.nn.functional.pad(x, (left, right, top, bottom))
    top = bottom = left = right = 0
  pad = [top, left]

  def backward(mask):
    return torch.ops.aten.convolution_backward(g, x, k, None, [1, 1], pad, [1, 1], False,
                                               [0, 0], 1, mask)

  with torch.no_grad():
    return {"forward": _median_ms(lambda: torch.nn.functional.conv2d(x, k, padding=pad),
                                  repeats),
            "input_grad": _median_ms(lambda: backward([True, False, False]), repeats),
            "weight_grad": _median_ms(lambda: backward([False, True, False]), repeats)}


def markdown(rows: list[dict], totals: dict, with_torch: bool) -> str:
  head = "| input [N, H, W, C_in] | C_out | padding |"
  rule = "| --- | --- | --- |"
  for name in PASSES:
    head += f" {name} JAX |" + (f" {name} PyTorch | ratio |" if with_torch else "")
    rule += " --- |" + (" --- | --- |" if with_torch else "")
  lines = [head, rule]
  for row in [*rows, totals]:
    if row is totals:
      cells = "| **total** | | |"
    else:
      (top, bottom), (left, right) = row["padding"]
      pad = str(top) if len({top, bottom, left, right}) == 1 else str(row["padding"])
      cells = f"| {'×'.join(map(str, row['input']))} | {row['kernel'][3]} | {pad} |"
    for name in PASSES:
      cells += f" {row['jax'][name]:.2f} |"
      if with_torch:
        cells += f" {row['torch'][name]:.2f} | {row['jax'][name] / row['torch'][name]:.2f} |"
    lines.append(cells)
  return "\n".join(lines)


def main() -> None:
  cpu.configure_process("on")  # an entry point: the CPU layer's settings, before JAX starts
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="walkthrough", choices=sorted(PRESETS))
  parser.add_argument("--width", type=int, default=64, help="channels of the top level")
  parser.add_argument("--depth", type=int, default=4, help="number of max-pools")
  parser.add_argument("--size", type=int, default=188)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--in-channels", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--no-torch", action="store_true", help="time JAX only")
  parser.add_argument("--output", help="write the rows as JSON here")
  args = parser.parse_args()

  with_torch = not args.no_torch
  if with_torch:
    try:
      import torch
    except ImportError:
      sys.exit("PyTorch is not installed: pip install torch, or pass --no-torch")
    torch_threads = torch.get_num_threads()
  layers = conv_layers(args.preset, args.width, args.depth, args.size, args.batch,
                       args.in_channels)
  print(f"jax {jax.__version__}, Python {platform.python_version()}, backend "
        f"{jax.default_backend()}, XLA defaults applied: {xla_defaults.applied()}, native "
        f"kernels: {native.status()}"
        + (f"; torch {torch.__version__}, {torch_threads} threads" if with_torch else ""),
        flush=True)
  print(f"{args.preset}, width {args.width}, {args.size}×{args.size}, batch {args.batch}: "
        f"{len(layers)} convolutions (milliseconds, medians of {args.repeats})", flush=True)
  rows = []
  for i, layer in enumerate(layers):
    row = {**layer, "jax": time_jax(layer, args.repeats)}
    if with_torch:
      row["torch"] = time_torch(layer, args.repeats)
    rows.append(row)
    print(f"  layer {i + 1}/{len(layers)}: {layer['input']} → {layer['kernel'][3]}",
          file=sys.stderr, flush=True)
  totals = {side: {name: sum(row[side][name] for row in rows) for name in PASSES}
            for side in (("jax", "torch") if with_torch else ("jax",))}
  print(markdown(rows, totals, with_torch))
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"jax": jax.__version__, "python": platform.python_version(),
                 "native_kernels": native.status(),
                 "preset": args.preset, "width": args.width, "size": args.size,
                 "batch": args.batch, "torch_threads": torch_threads if with_torch else None,
                 "layers": rows, "totals": totals}, f, indent=1)


if __name__ == "__main__":
  main()
