r"""Inference of an exported U-Net: ONNX in onnxruntime (CPU) against JAX, the same image.

  python benchmarks/export_inference.py --preset milesial --width 64 --size 572 --output onnx.json

One model, one image (``--batch`` of them, ``--size``² pixels). The contenders, timed in
turns after warm-up (medians of ``--repeats`` turns, ``--iters`` calls each):

* ``jax``: the model's jitted evaluation-mode forward pass, as ``python -m unet_jax.predict``
  runs it (with the CPU layer where JAX runs on the CPU, as the command does);
* ``jax_stablehlo``: the StableHLO export, deserialised and called (``unet_jax.export.load``);
* ``onnxruntime``: the ONNX export (``jax2onnx``) in an onnxruntime CPU session, with its
  default threads.

``ratio`` is each time divided by JAX's: below 1, faster than JAX. The outputs are compared
too (max-abs difference against JAX's logits).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax import cpu, export, model


def _seconds(fn, iters: int) -> float:
  fn()
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="milesial", choices=sorted(model.PRESETS))
  parser.add_argument("--width", type=int, default=64, help="top-level width (64: full)")
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--size", type=int, default=572, help="square input size")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--cpu-layer", choices=cpu.MODES, default="auto")
  parser.add_argument("--output", help="write the results as JSON here")
  args = parser.parse_args(argv)
  ops, _, _ = cpu.setup(args.cpu_layer)
  import onnxruntime as ort

  features = tuple(args.width * 2**k for k in range(args.depth + 1))
  net = model.PRESETS[args.preset](1, 2, features=features, rngs=nnx.Rngs(0))
  net.eval()
  size = net.geometry.nearest_valid(args.size)[1]
  image = np.random.default_rng(0).uniform(0, 1, (args.batch, size, size, 1)).astype(np.float32)
  with tempfile.TemporaryDirectory() as folder:
    onnx_path = export.export_onnx(net, f"{folder}/model.onnx", size=(size, size))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (spec, exported), = export.export_stablehlo(net, platforms=("cpu",),
                                                sizes=[(size, size)]).items()
    stablehlo = jax.export.deserialize(exported.serialize()).call
  live = model.use_ops(nnx.clone(net), ops)
  forward = jax.jit(lambda x: live(x))
  x = jnp.asarray(image)
  contenders = {
      "jax": lambda: jax.block_until_ready(forward(x)),
      "jax_stablehlo": lambda: jax.block_until_ready(stablehlo(x)),
      "onnxruntime": lambda: session.run(["logits"], {"image": image}),
  }
  reference = np.asarray(forward(x))
  differences = {"jax_stablehlo": float(np.abs(np.asarray(stablehlo(x)) - reference).max()),
                 "onnxruntime": float(np.abs(session.run(["logits"], {"image": image})[0]
                                             - reference).max())}
  times = {name: [] for name in contenders}
  for fn in contenders.values():  # warm-up
    fn()
  for _ in range(args.repeats):
    for name, fn in contenders.items():
      times[name].append(_seconds(fn, args.iters))
  medians = {name: statistics.median(t) for name, t in times.items()}
  report = {
      "environment": {"python": platform.python_version(), "jax": jax.__version__,
                      "onnxruntime": ort.__version__, "backend": jax.default_backend(),
                      "cpu_layer": ops.name, "processor": platform.processor(),
                      "args": vars(args)},
      "input": [args.batch, size, size, 1], "features": list(features),
      "seconds": medians, "all_seconds": times,
      "ratio_to_jax": {name: medians[name] / medians["jax"] for name in medians},
      "max_abs_difference_to_jax": differences,
  }
  print(f"| contender | seconds per call | ratio to jax | max-abs difference |")
  print("| --- | --- | --- | --- |")
  for name in contenders:
    print(f"| {name} | {medians[name]:.4g} | {report['ratio_to_jax'][name]:.2f} | "
          f"{differences.get(name, 0.0):.2g} |")
  print(f"\n{args.preset} {features[0]}..{features[-1]}, input {args.batch}×{size}×{size}×1; "
        f"JAX {jax.__version__} on {jax.default_backend()} ({ops.name} operations), "
        f"onnxruntime {ort.__version__}", file=sys.stderr)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
