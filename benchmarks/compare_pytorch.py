r"""unet-jax against PyTorch: the same U-Net, weights, data and optimiser, in one process.

Command (the baseline: the walkthrough's full-width model, 188×188, batch 2):

  python benchmarks/compare_pytorch.py --output compare.json
  python benchmarks/compare_pytorch.py --presets walkthrough,paper --widths 64,16 \
      --size 188 --batch 2 --repeats 7 --torch-compile --output compare.json

For each preset and width, both frameworks get the same architecture (``--widths 64`` is
64..1024, ``16`` is 16..256), the same initial weights (copied from the Flax model and checked
by comparing eval-mode logits), the same input and labels, and SGD with momentum 0.99 on the
pixel-wise cross-entropy. After warm-up the two are timed in turns (JAX repeat, PyTorch
repeat, JAX repeat, ...), so that load from elsewhere on the machine hits both alike; each
repeat makes one untimed call (the switch from the other framework lands there) and then
times ``--iters`` calls. The table shows medians. ``ratio`` is JAX time / PyTorch time:
above 1, JAX is slower.

* JAX's training step is the package's own: ``unet_jax.training.train_step`` wrapped by
  ``parallel.data_parallel`` on a one-device mesh, with the state donated, which is what
  ``train.py`` runs.
* Like ``train.py``, the script turns on the CPU layer (``unet_jax.cpu``) when JAX runs on the
  CPU: ``jax`` is the model with the layer's operations, and ``jax_stock`` the same model with
  stock JAX operations, timed in the same turns (``--no-stock`` skips it). ``--cpu-layer off``
  runs the whole process without the layer (no process settings either): then ``jax`` is
  stock JAX. It also computes a confusion matrix and gradient and parameter norms,
  which PyTorch's loop does not; ``--jax-step plain`` times a bare ``jax.jit`` step (loss,
  gradients, SGD, BatchNorm statistics, donated state) instead.
* Inference is the eval-mode forward pass: ``jax.jit`` of the merged model, and PyTorch's
  ``model.eval()`` under ``torch.no_grad()``.
* ``compile_s`` is JAX's first call (tracing and XLA compilation) less one steady step.
* Peak memory: on GPUs, each framework's allocator statistics; on CPUs, the process's peak
  resident memory during one step above its level before it (Linux: the peak is reset through
  ``/proc/self/clear_refs`` and freed heap memory returned with ``malloc_trim`` first). JAX's
  ``xla_temp_bytes`` is XLA's own compiled memory analysis: the step's scratch memory.
* Both frameworks run in one process, so both get the ``malloc`` options that the CPU layer
  sets (``unet_jax.cpu.malloc``; recorded in the JSON); ``UNET_JAX_MALLOC_DEFAULTS=0``
  measures both under glibc's defaults instead.
* On CPUs, the round trip of a cache line between two cores (``probes/core_latency.py``) is
  measured before every turn and printed: a JAX step slows down by a third when its two
  cores do not share a cache (hundreds of nanoseconds instead of tens), PyTorch's by a tenth,
  and a virtual machine's host may move its CPUs in mid-run.
* GFLOP/s use ``unet_jax.flops`` (a training step counts as three forward passes).
* ``--torch-compile`` adds ``torch.compile(model)``; a failure is reported, not raised.
* PyTorch runs with its default thread count (recorded in the output) unless
  ``--torch-threads`` says otherwise. Its OpenMP threads wait for each other at the end of
  every operation, so on a machine busy with other work PyTorch slows down far more than JAX:
  time on a quiet machine.

Step time through the real input pipeline, rather than a batch held in memory, is measured by
``benchmarks/pipeline_throughput.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import re
import statistics
import sys
import time

# Without this JAX takes 75% of a GPU's memory up front, and PyTorch could not run beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx

from unet_jax import cpu, flops, model, ops as ops_lib, training
from unet_jax.cpu import native
from unet_jax.training import parallel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "probes"))
import core_latency  # noqa: E402
from memory import package_train_step
from process_stats import minor_faults, peak_memory
from torch_unet import TorchUNet, torch_twin


# --- the contenders ---------------------------------------------------------------------

class JaxRunner:
  """The Flax model's training step (the package's, or a bare jit) and eval forward pass."""

  def __init__(self, net: model.UNet, options: dict, batch: dict, args, *,
               ops: ops_lib.Ops, name: str = "jax"):
    self.name, self.device = name, "jax-gpu" if jax.default_backend() == "gpu" else "cpu"
    model.use_ops(net, ops)
    tx = optax.sgd(args.learning_rate, momentum=0.99)
    self.mesh = parallel.make_mesh(jax.devices()[:1])
    self.step, state, eval_graphdef = package_train_step(net, tx, self.mesh, seed=args.seed)
    self.state = parallel.replicate(state, self.mesh)
    self.batch = parallel.shard_batch(batch, self.mesh)
    if args.jax_step == "plain":  # a model without the norm axis: it runs outside shard_map
      plain = nnx.eval_shape(lambda: model.UNet(**options, ops=ops, rngs=nnx.Rngs(0)))
      plain.train()
      self.step = jax.jit(functools.partial(plain_train_step, graphdef=nnx.graphdef(plain),
                                            tx=tx), donate_argnums=(0,))
    self.forward = jax.jit(lambda params, stats, x: nnx.merge(eval_graphdef, params, stats)(x))

  def train(self):
    self.state, measurements = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, measurements))

  def infer(self):
    jax.block_until_ready(self.forward(self.state.params, self.state.batch_stats,
                                       self.batch["image"]))

  def xla_temp_bytes(self) -> int | None:
    analysis = self.step.lower(self.state, self.batch).compile().memory_analysis()
    return getattr(analysis, "temp_size_in_bytes", None)


def plain_train_step(state: training.TrainState, batch, *, graphdef, tx):
  """Loss, gradients, SGD and BatchNorm statistics: what PyTorch's loop does, nothing more."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)

  def loss_fn(params):
    net = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    logits = net(batch["image"], rngs=nnx.Rngs(dropout=key))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, nnx.state(net, nnx.BatchStat)

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state), loss


class TorchRunner:
  """PyTorch's eager (or ``torch.compile``d) training step and eval forward pass."""

  def __init__(self, twin: TorchUNet, batch: dict, args, *, compiled: bool = False):
    self.name = "torch_compile" if compiled else "torch"
    self.device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    self.net = twin.to(self.device)
    self.image = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(self.device)
    self.label = torch.from_numpy(batch["label"].astype(np.int64)).to(self.device)
    self.optimizer = torch.optim.SGD(self.net.parameters(), lr=args.learning_rate, momentum=0.99)
    self.model = torch.compile(self.net) if compiled else self.net

  def _sync(self):
    if self.device == "cuda":
      torch.cuda.synchronize()

  def train(self):
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(self.model(self.image), self.label).backward()
    self.optimizer.step()
    self._sync()

  def infer(self):
    self.model.eval()
    with torch.no_grad():
      self.model(self.image)
    self._sync()


# --- measuring --------------------------------------------------------------------------

def _seconds(fn, iters: int) -> float:
  """Seconds per call over ``iters`` calls, after one untimed call.

  The untimed call absorbs the switch from the other framework (its threads going idle, the
  caches refilled with this one's data), which would otherwise land on every timed step.
  """
  fn()
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def benchmark_case(preset: str, width: int, args) -> dict:
  """Every contender on one preset and width: timings, GFLOP/s, memory and the JAX/torch ratio."""
  features = tuple(width * 2**k for k in range(args.depth + 1))
  options = {**model.PRESETS[preset].keywords, "in_channels": args.in_channels,
             "num_classes": args.num_classes, "features": features}
  net = model.UNet(**options, norm_axis_name=parallel.AXIS, rngs=nnx.Rngs(args.seed))
  out_hw = net.output_shape(args.size, args.size)
  rng = np.random.default_rng(args.seed)
  batch = {"image": rng.standard_normal((args.batch, args.size, args.size, args.in_channels),
                                        dtype=np.float32),
           "label": rng.integers(0, args.num_classes, (args.batch, *out_hw), dtype=np.int32)}
  parity = _parity(net, torch_twin(net), batch["image"])
  runners, results = _ready_runners(net, options, batch, args)
  times = {(r.name, phase): [] for r in runners for phase in ("train", "infer")}
  faults = {key: 0 for key in times}
  count_faults = minor_faults() is not None
  round_trips = []
  for _ in range(args.repeats):  # interleaved: a slow spell on the machine hits everyone
    if jax.default_backend() == "cpu":  # where the cores sit, turn by turn (core_latency.py)
      round_trips.append(core_latency.round_trip_ns())
    for phase in ("train", "infer"):
      for runner in runners:
        before = minor_faults() if count_faults else 0
        times[runner.name, phase].append(_seconds(getattr(runner, phase), args.iters))
        if count_faults:
          # The process-wide count can step back by a few when a worker thread exits during
          # the turn (the kernel moves its faults to the process total on exit): clamp.
          faults[runner.name, phase] += max(minor_faults() - before, 0)
  counts = {"train": flops.train_step_flops(net, args.size, args.size, batch=args.batch),
            "infer": flops.forward_flops(net, args.size, args.size, batch=args.batch).model}
  for runner in runners:
    out = results[runner.name]
    for phase, key in (("train", "train_step"), ("infer", "inference")):
      out[f"{key}_s"] = statistics.median(times[runner.name, phase])
      out[f"{key}_all_s"] = times[runner.name, phase]
      out[f"{key}_gflops_per_s"] = counts[phase] / out[f"{key}_s"] / 1e9
      if count_faults:  # the untimed call of each turn included
        out[f"{key}_page_faults_per_call"] = (faults[runner.name, phase]
                                              / (args.repeats * (args.iters + 1)))
      out[f"{key}_peak_bytes"], out["memory_method"] = peak_memory(getattr(runner, phase),
                                                                   runner.device)
    if runner.name != "torch":  # trace and compile: the first call less a steady step
      out["compile_s"] = max(out["first_call_s"] - out["train_step_s"], 0.0)
  results["jax"]["xla_temp_bytes"] = runners[0].xla_temp_bytes()
  ratio = {key: results["jax"][f"{key}_s"] / results["torch"][f"{key}_s"]
           for key in ("train_step", "inference")}
  if "jax_stock" in results:
    ratio.update({f"{key}_stock": results["jax_stock"][f"{key}_s"] / results["torch"][f"{key}_s"]
                  for key in ("train_step", "inference")})
  return {"preset": preset, "features": list(features), "input": [args.size, args.size],
          "output": list(out_hw), "batch": args.batch, "params": model.count_params(net),
          "gflop": {"train_step": counts["train"] / 1e9, "inference": counts["infer"] / 1e9},
          "parity_max_abs_diff": parity, "ratio": ratio, "core_round_trip_ns": round_trips,
          **results}


def _ready_runners(net, options, batch, args) -> tuple[list, dict]:
  """The contenders, each warmed up; a failing ``torch.compile`` is recorded and dropped."""
  runners = [JaxRunner(net, options, batch, args, ops=args.ops)]
  if args.ops is not ops_lib.STOCK and args.stock:
    runners.append(JaxRunner(net, options, batch, args, ops=ops_lib.STOCK, name="jax_stock"))
  runners.append(TorchRunner(torch_twin(net), batch, args))
  if args.torch_compile:
    runners.append(TorchRunner(torch_twin(net), batch, args, compiled=True))
  results = {r.name: {} for r in runners}
  for runner in list(runners):
    try:
      _warm_up(runner, results[runner.name], args)
    except Exception as e:  # only torch.compile may fail: it is reported, not raised
      if runner.name != "torch_compile":
        raise
      results[runner.name] = {"error": f"{type(e).__name__}: {e}"[:500]}
      runners.remove(runner)
  return runners, results


def _warm_up(runner, out: dict, args) -> None:
  start = time.perf_counter()
  runner.train()
  out["first_call_s"] = time.perf_counter() - start
  start = time.perf_counter()
  runner.infer()
  out["inference_first_call_s"] = time.perf_counter() - start
  for _ in range(args.warmup):
    runner.train()
    runner.infer()


def _parity(net: model.UNet, twin: TorchUNet, image: np.ndarray) -> float:
  """Max-abs difference of the two frameworks' eval-mode logits on the benchmark's input."""
  net.eval()
  ours = np.asarray(net(jnp.asarray(image)))
  twin.eval()
  with torch.no_grad():
    theirs = twin(torch.from_numpy(image.transpose(0, 3, 1, 2).copy())).numpy()
  net.train()
  return float(np.abs(ours - theirs.transpose(0, 2, 3, 1)).max())


# --- reporting --------------------------------------------------------------------------

def environment(args) -> dict:
  import flax
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "python": platform.python_version(), "machine": platform.machine(),
          "processor": _cpu_name(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "flax": flax.__version__, "torch": torch.__version__,
          "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
          "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "native_kernels": native.status(),
          "cpu_layer": {"ops": args.ops.name, "why": args.ops_why, "settings": args.settings},
          "args": {k: v for k, v in vars(args).items()
                   if k not in ("ops", "ops_why", "settings")}}


def _cpu_name() -> str:
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      found = re.search(r"model name\s*:\s*(.+)", f.read())
      if found:
        return found.group(1).strip()
  return platform.processor()


def _fmt(value, digits=3):
  return "n/a" if value is None else f"{value:.{digits}g}"


def markdown_table(results: list[dict]) -> str:
  rows = ["| preset | widths | input | batch | framework | train step (s) | ratio | inference (s) "
          "| ratio | compile (s) | train GFLOP/s | train peak (MB) | page faults / step |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for case in results:
    for name in ("jax", "jax_stock", "torch", "torch_compile"):
      out = case.get(name)
      if out is None:
        continue
      head = (f"| {case['preset']} | {case['features'][0]}..{case['features'][-1]} | "
              f"{case['input'][0]}×{case['input'][1]} | {case['batch']} | {name} |")
      if "error" in out:
        rows.append(f"{head} failed: {out['error'][:80]} | | | | | | | |")
        continue
      torch_out = case["torch"]
      train_ratio = out["train_step_s"] / torch_out["train_step_s"]
      infer_ratio = out["inference_s"] / torch_out["inference_s"]
      peak = out.get("train_step_peak_bytes")
      compile_s = out.get("compile_s")
      rows.append(f"{head} {_fmt(out['train_step_s'])} | {train_ratio:.2f} | "
                  f"{_fmt(out['inference_s'])} | {infer_ratio:.2f} | {_fmt(compile_s)} | "
                  f"{_fmt(out['train_step_gflops_per_s'])} | "
                  f"{_fmt(None if peak is None else peak / 2**20, 4)} | "
                  f"{_fmt(out.get('train_step_page_faults_per_call'), 4)} |")
  return "\n".join(rows)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default="walkthrough", help="comma-separated: walkthrough,paper")
  parser.add_argument("--widths", default="64", help="top-level widths, comma-separated; each "
                      "level doubles it (64 → 64..1024, 16 → 16..256)")
  parser.add_argument("--depth", type=int, default=4, help="max-pools (the paper: 4)")
  parser.add_argument("--size", type=int, default=188, help="square input size (188 is the "
                      "smallest the paper's network takes)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5, help="timed repeats per framework")
  parser.add_argument("--iters", type=int, default=2,
                      help="timed steps per repeat, after one untimed step")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  parser.add_argument("--in-channels", type=int, default=1)
  parser.add_argument("--num-classes", type=int, default=2)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--jax-step", choices=("package", "plain"), default="package")
  parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
  parser.add_argument("--cpu-layer", choices=cpu.MODES, default="auto",
                      help="the CPU layer, as train.py takes it (auto: on when JAX runs on "
                      "the CPU)")
  parser.add_argument("--no-stock", dest="stock", action="store_false",
                      help="with the CPU layer on, do not also time stock JAX")
  parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: "
                      "PyTorch's own choice)")
  parser.add_argument("--output", help="write the results as JSON here")
  return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  args.ops, args.ops_why, args.settings = cpu.setup(args.cpu_layer)  # before JAX starts
  torch.manual_seed(args.seed)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  results = []
  for preset in args.presets.split(","):
    if preset not in ("walkthrough", "paper"):
      raise SystemExit(f"--presets: {preset!r} is not one of walkthrough, paper")
    for width in (int(w) for w in args.widths.split(",")):
      results.append(benchmark_case(preset, width, args))
      print(f"done: {preset} width {width}", file=sys.stderr)
  report = {"environment": environment(args), "results": results}
  print(markdown_table(results))
  print(f"\nratio = JAX / PyTorch time (above 1: JAX slower). jax: the model with "
        f"{args.ops.name} operations"
        + ("; jax_stock: with stock JAX operations, same process" if args.stock
           and args.ops is not ops_lib.STOCK else "")
        + f". torch threads: {report['environment']['torch_threads']}; memory: "
        f"{results[0]['jax']['memory_method']}; process settings (both frameworks): "
        f"{'; '.join(args.settings) or 'none'}")
  for case in results:
    trips = [t for t in case["core_round_trip_ns"] if t is not None]
    if trips:
      print(f"core-to-core round trip before each turn, {case['preset']} "
            f"{case['features'][0]}..{case['features'][-1]}: "
            f"{', '.join(f'{t:.0f}' for t in trips)} ns")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(report, f, indent=1)
  return results


if __name__ == "__main__":
  main()
