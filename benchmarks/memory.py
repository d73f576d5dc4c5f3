r"""Memory of the training step with and without rematerialisation and bf16, from XLA itself.

Command (the paper's network at 572×572; about 4 compilations per variant, minutes on a CPU):

  python benchmarks/memory.py --output memory.json
  python benchmarks/memory.py --budget-gb 16          # largest batch that fits in 16 GiB
  python benchmarks/memory.py --size 44 --width 4 --depth 2 --variants off-fp32,on-bf16  # seconds
  # Çiçek et al.'s 3-D U-Net at its 132×132×116 input (D,H,W = 116,132,132), timed too:
  python benchmarks/memory.py --preset cicek3d --size 116,132,132 --time 3 --output m3d.json

Unless ``--time`` asks for steps, nothing is executed: each variant of the package's training
step (``training.train_step`` mapped by ``parallel.data_parallel`` on one device, state
donated) is compiled for the backend at hand, and XLA's ``compiled.memory_analysis()``
reports its buffers. That is deterministic, works on CPUs as on GPUs, and needs no memory of
the size it reports. ``peak_bytes`` is ``arguments + outputs - aliased + temp``: with the
state donated, the outputs reuse the arguments' memory. It leaves out the allocator's own
overheads and fragmentation.

Variants are ``remat``(on|off)-dtype(fp32|bf16): ``remat=True`` recomputes each level's
activations in the backward pass; ``bf16`` computes in bfloat16 with float32 parameters. The
largest batch within ``--budget-gb`` (default: the GPU's memory; none on CPUs) is found by
fitting ``peak(batch) = a + b·batch`` to batches 1 and 2, and is then checked by compiling it.
XLA's CPU backend computes bf16 convolutions in float32, so bf16's savings only show on GPUs.

Volumes (``--preset cicek3d`` or ``--spatial-dims 3``) take the same step, with labels
``[N, D', H', W']``; ``--size`` is then ``D,H,W`` (one number: a cube). ``--width`` and
``--depth`` default to the preset's widths (``cicek3d``: 64 → 64..512, three poolings), the
channels and classes to the paper's (1 and 2 for images, Çiçek et al.'s 3 and 3 for volumes).

``--time N`` also runs the compiled step: one warm-up, then ``N`` steps, each waited for,
and reports their median time and the output pixels (voxels) trained on per second. Beside
XLA's figure it then reports how far the process's peak resident memory (Linux ``VmHWM``,
which ``getrusage`` reports as ``ru_maxrss``; reset first) rose over those steps above its
level before the state and batch were built (``process_stats.peak_memory``): on a CPU, a
cross-check of ``peak_bytes`` that includes the allocator's overheads. On a GPU it is JAX's
peak over the process's lifetime instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from process_stats import peak_memory
from unet_jax import model, training
from unet_jax.training import parallel

VARIANTS = ("off-fp32", "on-fp32", "off-bf16", "on-bf16")
# The papers' inputs: Ronneberger et al.'s 572×572 grey images, two classes; Çiçek et al.'s
# 132×132×116 (x, y, z) volumes of three channels, three classes.
PAPER_INPUT = {2: {"size": (572, 572), "in_channels": 1, "num_classes": 2},
               3: {"size": (116, 132, 132), "in_channels": 3, "num_classes": 3}}


def package_train_step(net: model.UNet, tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh, *, seed: int = 0):
  """``training.train_step`` as ``training.py`` runs it: ``data_parallel`` over ``mesh``, the state
  donated, cross-entropy loss. Returns ``(step, initial state, eval graphdef)``."""
  state, graphdef, eval_graphdef = training.create_train_state(net, tx, seed)
  step = functools.partial(training.train_step, graphdef=graphdef, tx=tx,
                           loss_config=ml_collections.ConfigDict({"name": "cross_entropy"}),
                           num_classes=net.num_classes)
  return (parallel.data_parallel(step, mesh, batch_argnums=(1,), donate_argnums=(0,)), state,
          eval_graphdef)


def _compile(options: dict, size: tuple[int, ...], batch: int, mesh):
  """The compiled training step for ``[batch, *size, C]``, its output size and memory figures."""
  net = nnx.eval_shape(lambda: model.UNet(**options, norm_axis_name=parallel.AXIS,
                                          rngs=nnx.Rngs(0)))
  step, state, _ = package_train_step(net, optax.sgd(1e-3, momentum=0.99), mesh)
  out_size = net.output_shape(*size)
  sharding = parallel.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((batch, *size, options["in_channels"]), jnp.float32,
                                sharding=sharding)
  labels = jax.ShapeDtypeStruct((batch, *out_size), jnp.int32, sharding=sharding)
  start = time.perf_counter()
  compiled = step.lower(state, {"image": images, "label": labels}).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  figures = {name: int(getattr(stats, f"{name}_size_in_bytes"))
             for name in ("temp", "argument", "output", "alias")}
  figures["peak_bytes"] = (figures["argument"] + figures["output"] - figures["alias"]
                           + figures["temp"])
  return compiled, out_size, {"batch": batch, "compile_s": seconds, **figures}


def compile_step(options: dict, size: tuple[int, ...], batch: int, mesh) -> dict:
  """Compile the training step for ``[batch, *size, C]`` and return its memory figures."""
  return _compile(options, size, batch, mesh)[2]


def time_step(options: dict, size: tuple[int, ...], batch: int, mesh, steps: int) -> dict:
  """Compile the step, run it once to warm up and ``steps`` times more, each waited for.

  Returns the memory figures of ``compile_step`` with ``step_s`` (the median), every step's
  seconds, the median CPU seconds of the process's threads a step (on a CPU that other work
  shares, steadier than ``step_s``), output pixels (voxels) per second, and the process's
  peak memory over the run above its level before (``peak_memory``: resident memory on a
  CPU)."""
  compiled, out_size, figures = _compile(options, size, batch, mesh)
  seconds, cpu_seconds = [], []

  def run():
    net = model.UNet(**options, norm_axis_name=parallel.AXIS, rngs=nnx.Rngs(0))
    state, _, _ = training.create_train_state(net, optax.sgd(1e-3, momentum=0.99), seed=0)
    state = parallel.replicate(state, mesh)
    rng = np.random.default_rng(0)
    data = parallel.shard_batch(
        {"image": rng.uniform(size=(batch, *size, options["in_channels"])).astype(np.float32),
         "label": rng.integers(0, options["num_classes"], (batch, *out_size), np.int32)}, mesh)
    for _ in range(steps + 1):
      start, cpu_start = time.perf_counter(), time.process_time()
      state, _ = compiled(state, data)
      jax.block_until_ready(state)
      seconds.append(time.perf_counter() - start)
      cpu_seconds.append(time.process_time() - cpu_start)

  device = "cpu" if jax.default_backend() == "cpu" else "jax-gpu"
  grown, how = peak_memory(run, device)
  step_s = statistics.median(seconds[1:])
  return {**figures, "warmup_s": seconds[0], "step_s": step_s, "step_all_s": seconds[1:],
          "step_cpu_s": statistics.median(cpu_seconds[1:]),
          "voxels_per_s": batch * math.prod(out_size) / step_s, "output_size": list(out_size),
          "process_peak_bytes": grown, "process_peak_how": how}


def largest_batch(options: dict, size: tuple[int, ...], budget: int, mesh, one: dict, two: dict,
                  max_steps_up: int = 8) -> dict:
  """The largest batch whose compiled peak fits ``budget`` bytes: a linear fit, then checked,
  walked down if the fit was optimistic and up if it was pessimistic (memory is not exactly
  linear in the batch: some gradients change formulation with the number of pixels)."""
  per_example = two["peak_bytes"] - one["peak_bytes"]
  fixed = one["peak_bytes"] - per_example
  devices = mesh.devices.size
  batch = max(int((budget - fixed) // max(per_example, 1)), 0)
  batch -= batch % devices
  found, above = None, None
  while batch > 0:
    check = compile_step(options, size, batch, mesh)
    if check["peak_bytes"] <= budget:
      found = (batch, check["peak_bytes"])
      break
    above = check["peak_bytes"]
    batch -= devices
  if found is None:
    return {"batch": 0, "per_example_bytes": per_example, "fixed_bytes": fixed,
            "budget_bytes": budget, "next_peak_bytes": above}
  if above is None:  # the fit may have been pessimistic: walk up until a batch does not fit
    for _ in range(max_steps_up):
      check = compile_step(options, size, found[0] + devices, mesh)
      if check["peak_bytes"] > budget:
        above = check["peak_bytes"]
        break
      found = (found[0] + devices, check["peak_bytes"])
  return {"batch": found[0], "peak_bytes": found[1], "per_example_bytes": per_example,
          "fixed_bytes": fixed, "budget_bytes": budget, "next_peak_bytes": above}


def device_budget() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def parse_size(text: str, spatial_dims: int) -> tuple[int, ...]:
  """``"572"`` → ``(572, 572)`` (a cube in 3-D); ``"116,132,132"`` → ``(116, 132, 132)``."""
  names = "D,H,W" if spatial_dims == 3 else "H,W"
  try:
    sizes = tuple(int(part) for part in text.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) == 1:
    sizes *= spatial_dims
  if len(sizes) != spatial_dims or min(sizes) < 1:
    raise SystemExit(f"--size: expected one positive size or {spatial_dims} as {names} for "
                     f"spatial_dims={spatial_dims}, got {text!r}")
  return sizes


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default=None, choices=sorted(model.PRESETS),
                      help="default: paper, or cicek3d with --spatial-dims 3")
  parser.add_argument("--spatial-dims", type=int, default=None, choices=(2, 3),
                      help="default: the preset's (3 for cicek3d, else 2)")
  parser.add_argument("--width", type=int, default=None,
                      help="top-level width (64 → 64..1024); default: the preset's")
  parser.add_argument("--depth", type=int, default=None,
                      help="poolings; default: the preset's (4; cicek3d: 3)")
  parser.add_argument("--size", default=None,
                      help="input size: 572 (square, or a cube in 3-D) or per axis, H,W or "
                           "D,H,W; default: the paper's, 572 or 116,132,132")
  parser.add_argument("--in-channels", type=int, default=None,
                      help="default: the paper's, 1 (2-D) or 3 (3-D)")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="default: the paper's, 2 (2-D) or 3 (3-D)")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, from {', '.join(VARIANTS)}")
  parser.add_argument("--budget-gb", type=float, default=None,
                      help="memory budget in GiB (default: the GPU's; none on CPUs)")
  parser.add_argument("--time", type=int, default=0, metavar="N",
                      help="also run each variant's step: one warm-up, then N timed steps")
  parser.add_argument("--output", help="write the results as JSON here")
  return parser.parse_args(argv)


def network(args) -> dict:
  """The preset, spatial dimensions, widths, channels and input size the flags ask for."""
  preset = args.preset or ("cicek3d" if args.spatial_dims == 3 else "paper")
  keywords = model.PRESETS[preset].keywords
  dims = args.spatial_dims or keywords.get("spatial_dims", 2)
  paper = PAPER_INPUT[dims]
  widths = keywords.get("features", (64, 128, 256, 512, 1024))
  width = args.width or widths[0]
  depth = len(widths) - 1 if args.depth is None else args.depth
  return {"preset": preset, "spatial_dims": dims,
          "size": parse_size(args.size, dims) if args.size else paper["size"],
          "width": width, "depth": depth,
          "features": tuple(width * 2**k for k in range(depth + 1)),
          "in_channels": args.in_channels or paper["in_channels"],
          "num_classes": args.num_classes or paper["num_classes"]}


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.time < 0:
    raise SystemExit(f"--time: the number of timed steps must be 0 or more, got {args.time}")
  net = network(args)
  size = net["size"]
  mesh = parallel.make_mesh(jax.devices()[:1])
  budget = int(args.budget_gb * 2**30) if args.budget_gb else device_budget()
  results = []
  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      raise SystemExit(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
    remat, dtype = variant.split("-")
    options = {**model.PRESETS[net["preset"]].keywords, "spatial_dims": net["spatial_dims"],
               "in_channels": net["in_channels"], "num_classes": net["num_classes"],
               "features": net["features"], "remat": remat == "on",
               "dtype": jnp.bfloat16 if dtype == "bf16" else None}
    one = (time_step(options, size, 1, mesh, args.time) if args.time
           else compile_step(options, size, 1, mesh))
    entry = {"variant": variant, "remat": remat == "on", "dtype": dtype, "batch_1": one}
    if budget:
      two = compile_step(options, size, 2, mesh)
      entry["largest_batch"] = largest_batch(options, size, budget, mesh, one, two)
    results.append(entry)
    print(f"done: {variant}", file=sys.stderr)
  report = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            **{k: v for k, v in net.items() if k != "features"}, "size": list(size),
            "features": list(net["features"]), "time_steps": args.time,
            "budget_bytes": budget, "results": results}
  print(markdown_table(report))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(report, f, indent=1)
  return report


def markdown_table(report: dict) -> str:
  mib = lambda n: f"{n / 2**20:,.1f}"
  axes = "D×H×W" if report["spatial_dims"] == 3 else "H×W"
  timed = report["time_steps"] > 0
  per_s = "voxels/s" if report["spatial_dims"] == 3 else "pixels/s"
  rows = [f"{report['preset']} U-Net, {'×'.join(map(str, report['size']))} ({axes}), batch 1, "
          f"{report['backend']} ({report['device']}); MiB from XLA's memory analysis"
          + (f"; median of {report['time_steps']} steps after a warm-up" if timed else ""),
          "", "| remat | dtype | temp | peak | compile (s) | largest batch |"
          + (f" step (s) | CPU s a step | {per_s} | peak memory growth |" if timed else ""),
          "| --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- | --- |" if timed else "")]
  for entry in report["results"]:
    one, fit = entry["batch_1"], entry.get("largest_batch")
    row = (f"| {entry['remat']} | {entry['dtype']} | {mib(one['temp'])} | "
           f"{mib(one['peak_bytes'])} | {one['compile_s']:.1f} | "
           f"{fit['batch'] if fit else 'no budget'} |")
    if timed:
      grown = one["process_peak_bytes"]
      row += (f" {one['step_s']:.3g} | {one['step_cpu_s']:.3g} | {one['voxels_per_s']:,.0f} | "
              f"{'n/a' if grown is None else mib(grown)} |")
    rows.append(row)
  return "\n".join(rows)


if __name__ == "__main__":
  main()
