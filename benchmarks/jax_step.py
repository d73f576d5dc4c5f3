"""JAX alone: the package's train step and inference, to compare JAX versions and Pythons.

  python benchmarks/jax_step.py --preset walkthrough --width 64 --size 188 --batch 2

Times the same step as ``compare_pytorch.py`` (``unet_jax.train.train_step`` through
``parallel.data_parallel`` on one device, SGD with momentum 0.99, donated state) without
needing PyTorch, so it runs on any Python the package supports. Prints medians as JSON: of
``--repeats`` steps back to back, then as many forward passes.
"""

import argparse
import functools
import json
import platform
import statistics
import sys
import time

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from unet_jax import cpu, training
from unet_jax.training import parallel
from unet_jax.model import PRESETS


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="walkthrough", choices=sorted(PRESETS))
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--size", type=int, default=188)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cpu-layer", choices=cpu.MODES, default="auto",
                      help="the CPU layer, as train.py takes it")
  args = parser.parse_args()
  ops, _, _ = cpu.setup(args.cpu_layer)  # before JAX starts a backend

  features = tuple(args.width * 2**k for k in range(5))
  model = PRESETS[args.preset](1, 2, features=features, dropout=0.0, norm_axis_name="data",
                               ops=ops, rngs=nnx.Rngs(0))
  output = model.output_shape(args.size, args.size)
  tx = optax.sgd(1e-3, momentum=0.99)
  state, graphdef, eval_graphdef = training.create_train_state(model, tx, seed=0)
  mesh = parallel.make_mesh(jax.devices()[:1])
  loss = ml_collections.ConfigDict({"name": "cross_entropy"})
  step = parallel.data_parallel(
      functools.partial(training.train_step, graphdef=graphdef, tx=tx, loss_config=loss,
                        num_classes=2), mesh, batch_argnums=(1,), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch(
      {"image": rng.normal(size=(args.batch, args.size, args.size, 1)).astype(np.float32),
       "label": rng.integers(0, 2, size=(args.batch, *output)).astype(np.int32)}, mesh)
  state = parallel.replicate(state, mesh)
  forward = jax.jit(lambda s, x: nnx.merge(eval_graphdef, s.params, s.batch_stats)(x))

  start = time.perf_counter()
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start
  jax.block_until_ready(forward(state, batch["image"]))
  # Steps back to back, then forward passes back to back, as a training loop runs them: the
  # first call after a switch finds the other's buffers in memory, so it is not timed.
  steps, forwards = [], []
  for _ in range(args.repeats + 1):
    start = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    steps.append(time.perf_counter() - start)
  for _ in range(args.repeats + 1):
    start = time.perf_counter()
    jax.block_until_ready(forward(state, batch["image"]))
    forwards.append(time.perf_counter() - start)
  steps, forwards = steps[1:], forwards[1:]
  print(json.dumps({"python": platform.python_version(), "jax": jax.__version__,
                    "cpu_layer": ops.name, "preset": args.preset, "width": args.width, "size": args.size,
                    "batch": args.batch, "train_step_s": statistics.median(steps),
                    "inference_s": statistics.median(forwards),
                    "first_call_s": compile_s}))


if __name__ == "__main__":
  sys.exit(main())
