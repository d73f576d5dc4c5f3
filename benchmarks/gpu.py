r"""Training throughput of the paper's U-Net at 572×572 on one GPU: JAX in fp32 and bf16, and
PyTorch eager AMP (bf16, channels_last), in one run.

Command (one H100; a few minutes, mostly XLA compiling each case; no new case starts after
``--max-seconds``):

  python benchmarks/gpu.py --output gpu.json
  python benchmarks/gpu.py --batches 1,4,8,16 --dtypes bf16 --peak-tflops bf16=989
  python benchmarks/gpu.py --smoke       # seconds on a CPU: tiny widths and inputs

Without a GPU the smoke sizes are used automatically, so the script can be checked anywhere.
JAX runs the package's training step (``training.train_step`` mapped by ``parallel.data_parallel``
over the GPUs, state donated, SGD with momentum 0.99, cross-entropy), compiled ahead of time so
that the compile time is its own column; ``bf16`` is ``UNet(dtype=jnp.bfloat16)`` with float32
parameters. Model FLOP utilisation (MFU) divides ``unet_jax.flops.train_step_flops`` per second
by the card's dense peak for the arithmetic used: XLA computes float32 convolutions in TF32 on
Ampere and later unless ``--precision highest``, so fp32 is held against the TF32 peak.
PyTorch's fp32 (``--torch-dtypes fp32``) likewise uses TF32 convolutions, cuDNN's default,
and full float32 with ``--precision highest``.
Peak memory: for JAX, XLA's compiled memory analysis of the step (arguments + outputs -
donated + scratch; the allocator's own peak cannot be reset between cases, so it is kept
apart as ``allocator_peak_bytes_so_far``); for PyTorch, ``max_memory_allocated`` during the
case. A case that runs out of memory is reported, not raised.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

# Without this JAX takes 75% of the GPU's memory up front, and PyTorch could not run beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unet_jax import flops, model
from unet_jax.training import parallel
from unet_jax.geometry import Geometry

from memory import package_train_step

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets; the first name found in the
# device's name is used, so the more specific names come first.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0},  # SXM
    "H200": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
SMOKE = dict(width=4, depth=2, size=44, batches="1,2", steps=2, repeats=1, warmup=1)


def peak_tflops(device_kind: str, override: str | None) -> dict[str, float]:
  """The card's peaks from ``PEAK_TFLOPS``, updated by ``--peak-tflops bf16=989,tf32=495``."""
  peaks = next((dict(v) for k, v in PEAK_TFLOPS.items() if k in device_kind), {})
  for item in filter(None, (override or "").split(",")):
    name, _, value = item.partition("=")
    peaks[name.strip()] = float(value)
  return peaks


def _time_steps(run, args) -> tuple[float, list[float]]:
  """Median seconds per step over ``repeats`` blocks of ``steps`` steps."""
  blocks = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    run(args.steps)
    blocks.append((time.perf_counter() - start) / args.steps)
  return statistics.median(blocks), blocks


def jax_case(dtype: str, data: dict, args) -> dict:
  net = model.paper(in_channels=1, num_classes=2, features=args.features,
                    dtype=jnp.bfloat16 if dtype == "bf16" else None,
                    norm_axis_name=parallel.AXIS, rngs=nnx.Rngs(0))
  mesh = parallel.make_mesh()
  step, state, _ = package_train_step(net, optax.sgd(1e-3, momentum=0.99), mesh)
  state = parallel.replicate(state, mesh)
  inputs = parallel.shard_batch(data, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, inputs).compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def run(n):
    for _ in range(n):
      holder[0], measurements = compiled(holder[0], inputs)
    jax.block_until_ready((holder[0], measurements))

  run(args.warmup)
  step_s, blocks = _time_steps(run, args)
  stats = jax.devices()[0].memory_stats() or {}
  analysis = compiled.memory_analysis()
  return {"framework": "jax", "compile_s": compile_s, "step_s": step_s, "blocks_s": blocks,
          "peak_memory_bytes": (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes),
          "xla_temp_bytes": analysis.temp_size_in_bytes,
          "allocator_peak_bytes_so_far": stats.get("peak_bytes_in_use")}


def torch_case(dtype: str, data: dict, args) -> dict:
  import torch
  import torch.nn.functional as F
  from torch_unet import torch_twin

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  torch.backends.cudnn.allow_tf32 = args.precision != "highest"
  net = model.paper(in_channels=1, num_classes=2, features=args.features, rngs=nnx.Rngs(0))
  twin = torch_twin(net).to(device, memory_format=torch.channels_last).train()
  image = torch.from_numpy(data["image"].transpose(0, 3, 1, 2).copy()).to(
      device, memory_format=torch.channels_last)
  label = torch.from_numpy(data["label"].astype(np.int64)).to(device)
  optimizer = torch.optim.SGD(twin.parameters(), lr=1e-3, momentum=0.99)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def run(n):
    for _ in range(n):
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = F.cross_entropy(twin(image), label)
      loss.backward()
      optimizer.step()
    sync()

  start = time.perf_counter()
  run(1)
  first_call_s = time.perf_counter() - start
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  run(args.warmup)
  step_s, blocks = _time_steps(run, args)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return {"framework": "torch", "device": device, "amp": dtype == "bf16",
          "first_call_s": first_call_s, "step_s": step_s, "blocks_s": blocks,
          "peak_memory_bytes": peak, "channels_last": True}


def torch_available(smoke: bool) -> str | None:
  """Why PyTorch is skipped, or ``None`` if it runs (on CUDA; on the CPU only for --smoke)."""
  try:
    import torch
  except ImportError:
    return "torch is not installed"
  if not torch.cuda.is_available() and not smoke:
    return f"torch {torch.__version__} has no CUDA device"
  return None


def run_case(framework: str, dtype: str, batch: int, args, peaks: dict) -> dict:
  net_options = dict(model.paper.keywords, features=args.features)
  out_hw = Geometry(args.depth, "valid", "valid").check_shape(args.size, args.size)
  rng = np.random.default_rng(0)
  data = {"image": rng.standard_normal((batch, args.size, args.size, 1), dtype=np.float32),
          "label": rng.integers(0, 2, (batch, *out_hw), dtype=np.int32)}
  case = {"dtype": dtype, "batch": batch}
  try:
    case.update((jax_case if framework == "jax" else torch_case)(dtype, data, args))
  except Exception as e:  # out of memory and the like are results here
    case.update(framework=framework, error=f"{type(e).__name__}: {str(e)[:300]}")
    return case
  finally:
    gc.collect()
  kind = "bf16" if dtype == "bf16" else ("fp32" if args.precision == "highest" else "tf32")
  train_flops = flops.train_step_flops(net_options, args.size, args.size, batch=batch)
  case["images_per_s"] = batch / case["step_s"]
  case["tflops_per_s"] = train_flops / case["step_s"] / 1e12
  case["peak_kind"], case["peak_tflops"] = kind, peaks.get(kind)
  case["mfu"] = case["tflops_per_s"] / peaks[kind] if kind in peaks else None
  return case


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (automatic without a GPU)")
  parser.add_argument("--width", type=int, default=64, help="top-level width (64 → 64..1024)")
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--size", type=int, default=572)
  parser.add_argument("--batches", default="1,2,4,8", help="comma-separated global batch sizes")
  parser.add_argument("--dtypes", default="fp32,bf16", help="JAX compute dtypes: fp32,bf16")
  parser.add_argument("--torch-dtypes", default="bf16",
                      help="PyTorch: bf16 (autocast AMP), fp32; empty to skip PyTorch")
  parser.add_argument("--precision", choices=("default", "highest"), default="default",
                      help="jax_default_matmul_precision for fp32 (default allows TF32)")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=3, help="timed blocks (median reported)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--peak-tflops", help="override peaks, e.g. bf16=989,tf32=495,fp32=67")
  parser.add_argument("--max-seconds", type=float, default=420,
                      help="start no new case after this long (the rest are listed as skipped)")
  parser.add_argument("--output", help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.smoke or jax.default_backend() == "cpu":
    if not args.smoke:
      print("no GPU found: running the smoke sizes (--smoke)", file=sys.stderr)
    parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    args.smoke = True
  args.features = tuple(args.width * 2**k for k in range(args.depth + 1))
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.precision == "highest":
    jax.config.update("jax_default_matmul_precision", "highest")
  device_kind = jax.devices()[0].device_kind
  peaks = peak_tflops(device_kind, args.peak_tflops)
  torch_skip = torch_available(args.smoke)
  if torch_skip:
    print(f"PyTorch skipped: {torch_skip}", file=sys.stderr)
  for dtype in args.dtypes.split(",") + args.torch_dtypes.split(","):
    if dtype not in ("fp32", "bf16", ""):
      raise SystemExit(f"unknown dtype {dtype!r}: use fp32 or bf16")
  plan = [("jax", d, b) for d in args.dtypes.split(",") for b in _ints(args.batches)]
  if not torch_skip:
    plan += [("torch", d, b) for d in filter(None, args.torch_dtypes.split(","))
             for b in _ints(args.batches)]
  start, results, skipped = time.perf_counter(), [], []
  for framework, dtype, batch in plan:
    if time.perf_counter() - start > args.max_seconds:
      skipped.append({"framework": framework, "dtype": dtype, "batch": batch})
      continue
    results.append(run_case(framework, dtype, batch, args, peaks))
    print(f"done: {framework} {dtype} batch {batch}", file=sys.stderr)
  report = {"environment": {"device_kind": device_kind, "backend": jax.default_backend(),
                            "devices": jax.device_count(), "jax": jax.__version__,
                            "peak_tflops": peaks, "torch_skipped": torch_skip,
                            "args": {k: v for k, v in vars(args).items()}},
            "results": results, "skipped": skipped}
  print(markdown_table(report))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(report, f, indent=1)
  return report


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def markdown_table(report: dict) -> str:
  env = report["environment"]
  args = env["args"]
  rows = [f"paper U-Net {args['features'][0]}..{args['features'][-1]}, "
          f"{args['size']}×{args['size']}, {env['device_kind']} ({env['backend']})", "",
          "| framework | dtype | batch | step (ms) | images/s | TFLOP/s | MFU "
          "| compile or first step (s) | peak memory (GiB) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for case in report["results"]:
    head = f"| {case['framework']} | {case['dtype']} | {case['batch']} |"
    if "error" in case:
      rows.append(f"{head} {case['error'][:60]} | | | | | |")
      continue
    mfu = "n/a" if case["mfu"] is None else f"{case['mfu']:.1%} of {case['peak_kind']}"
    peak = case["peak_memory_bytes"]
    rows.append(f"{head} {case['step_s'] * 1e3:.1f} | {case['images_per_s']:.2f} | "
                f"{case['tflops_per_s']:.3g} | {mfu} | "
                f"{case.get('compile_s', case.get('first_call_s', 0)):.1f} | "
                f"{'n/a' if peak is None else f'{peak / 2**30:.2f}'} |")
  if report["skipped"]:
    rows.append(f"\nskipped (time limit): {report['skipped']}")
  if env["torch_skipped"]:
    rows.append(f"\nPyTorch skipped: {env['torch_skipped']}")
  return "\n".join(rows)


if __name__ == "__main__":
  main()
