r"""Memory of the training step with and without rematerialisation and bf16, from XLA itself.

Command (the paper's network at 572×572; about 4 compilations per variant, minutes on a CPU):

  python benchmarks/memory.py --output memory.json
  python benchmarks/memory.py --budget-gb 16          # largest batch that fits in 16 GiB
  python benchmarks/memory.py --size 44 --width 4 --depth 2 --variants off-fp32,on-bf16  # seconds

Nothing is executed: each variant of the package's training step (``training.train_step`` mapped by
``parallel.data_parallel`` on one device, state donated) is compiled for the backend at hand,
and XLA's ``compiled.memory_analysis()`` reports its buffers. That is deterministic, works on
CPUs as on GPUs, and needs no memory of the size it reports. ``peak_bytes`` is
``arguments + outputs - aliased + temp``: with the state donated, the outputs reuse the
arguments' memory. It leaves out the allocator's own overheads and fragmentation.

Variants are ``remat``(on|off)-dtype(fp32|bf16): ``remat=True`` recomputes each level's
activations in the backward pass; ``bf16`` computes in bfloat16 with float32 parameters. The
largest batch within ``--budget-gb`` (default: the GPU's memory; none on CPUs) is found by
fitting ``peak(batch) = a + b·batch`` to batches 1 and 2, and is then checked by compiling it.
XLA's CPU backend computes bf16 convolutions in float32, so bf16's savings only show on GPUs.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from unet_jax import model, training
from unet_jax.training import parallel

VARIANTS = ("off-fp32", "on-fp32", "off-bf16", "on-bf16")


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


def compile_step(options: dict, size: int, batch: int, mesh) -> dict:
  """Compile the training step for ``[batch, size, size, C]`` and return its memory figures."""
  net = nnx.eval_shape(lambda: model.UNet(**options, norm_axis_name=parallel.AXIS,
                                          rngs=nnx.Rngs(0)))
  step, state, _ = package_train_step(net, optax.sgd(1e-3, momentum=0.99), mesh)
  out_h, out_w = net.output_shape(size, size)
  sharding = parallel.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((batch, size, size, options["in_channels"]), jnp.float32,
                                sharding=sharding)
  labels = jax.ShapeDtypeStruct((batch, out_h, out_w), jnp.int32, sharding=sharding)
  start = time.perf_counter()
  compiled = step.lower(state, {"image": images, "label": labels}).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  figures = {name: int(getattr(stats, f"{name}_size_in_bytes"))
             for name in ("temp", "argument", "output", "alias")}
  figures["peak_bytes"] = (figures["argument"] + figures["output"] - figures["alias"]
                           + figures["temp"])
  return {"batch": batch, "compile_s": seconds, **figures}


def largest_batch(options: dict, size: int, budget: int, mesh, one: dict, two: dict,
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


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="paper", choices=sorted(model.PRESETS))
  parser.add_argument("--width", type=int, default=64, help="top-level width (64 → 64..1024)")
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--size", type=int, default=572)
  parser.add_argument("--in-channels", type=int, default=1)
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, from {', '.join(VARIANTS)}")
  parser.add_argument("--budget-gb", type=float, default=None,
                      help="memory budget in GiB (default: the GPU's; none on CPUs)")
  parser.add_argument("--output", help="write the results as JSON here")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  mesh = parallel.make_mesh(jax.devices()[:1])
  budget = int(args.budget_gb * 2**30) if args.budget_gb else device_budget()
  results = []
  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      raise SystemExit(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
    remat, dtype = variant.split("-")
    options = {**model.PRESETS[args.preset].keywords, "in_channels": args.in_channels,
               "features": tuple(args.width * 2**k for k in range(args.depth + 1)),
               "remat": remat == "on", "dtype": jnp.bfloat16 if dtype == "bf16" else None}
    one = compile_step(options, args.size, 1, mesh)
    entry = {"variant": variant, "remat": remat == "on", "dtype": dtype, "batch_1": one}
    if budget:
      two = compile_step(options, args.size, 2, mesh)
      entry["largest_batch"] = largest_batch(options, args.size, budget, mesh, one, two)
    results.append(entry)
    print(f"done: {variant}", file=sys.stderr)
  report = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "preset": args.preset, "size": args.size, "width": args.width, "depth": args.depth,
            "budget_bytes": budget, "results": results}
  print(markdown_table(report))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(report, f, indent=1)
  return report


def markdown_table(report: dict) -> str:
  mib = lambda n: f"{n / 2**20:,.1f}"
  rows = [f"{report['preset']} U-Net, {report['size']}×{report['size']}, batch 1, "
          f"{report['backend']} ({report['device']}); MiB from XLA's memory analysis",
          "", "| remat | dtype | temp | peak | compile (s) | largest batch |",
          "| --- | --- | --- | --- | --- | --- |"]
  for entry in report["results"]:
    one, fit = entry["batch_1"], entry.get("largest_batch")
    rows.append(f"| {entry['remat']} | {entry['dtype']} | {mib(one['temp'])} | "
                f"{mib(one['peak_bytes'])} | {one['compile_s']:.1f} | "
                f"{fit['batch'] if fit else 'no budget'} |")
  return "\n".join(rows)


if __name__ == "__main__":
  main()
