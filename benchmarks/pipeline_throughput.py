r"""Can the input pipeline keep up with training? Its samples/s against the train step's.

Command (about a minute on a 2-core CPU):

  python benchmarks/pipeline_throughput.py                      # configs/isbi2012.py:small
  python benchmarks/pipeline_throughput.py --config=configs/isbi2012.py:small \
      --config.data.num_workers=2 --seconds=20

* **pipeline**: batches from ``pipeline.train_iterator`` exactly as ``training.py`` builds it
  (source, weight map on each whole label, random tiles with the config's augmentation,
  grain threads / worker processes, prefetch), timed for ``--seconds`` after a warm-up batch.
* **step**: the jitted, data-parallel ``training.train_step`` that ``train_and_evaluate`` runs,
  on one batch held in device memory, timed for ``--seconds`` after compilation.
* **ratio** = pipeline samples/s ÷ step samples/s: above 1 the pipeline keeps up.

The two are measured one after the other, each with the whole machine; in training they
share it, so on a CPU the ratio is an upper bound.

Last measured, on a 2-core CPU (other jobs on the machine were mostly idle: load ≈ 1.2),
``configs/isbi2012.py:small`` (220×220 tiles → 132×132, elastic deformation, flips,
rotations, jitter, the weight map; batch 4; one CPU device):

  command                                                    pipeline    step   ratio
  python benchmarks/pipeline_throughput.py                   162.9/s   11.0/s    14.8
  ... --config.data.num_workers=2 --seconds=8                274.7/s   11.0/s    24.9

(43 s for the first line, compilation included.) The pipeline keeps up with this config
~15 times over, so preparing tiles takes a few per cent of the machine. The weight maps are
computed once per slice and then cached (``pipeline.WithWeightMap``); each 572×572 tile of
the full recipe costs ~34 ms of elastic deformation (``unet_jax/data/augment.py``).
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from unet_jax import cpu, training
from unet_jax.training import parallel
from unet_jax.data import pipeline

_ROOT = pathlib.Path(__file__).resolve().parents[1]
config_flags.DEFINE_config_file("config", str(_ROOT / "configs" / "isbi2012.py") + ":small",
                                "Training configuration file.", lock_config=True)
flags.DEFINE_float("seconds", 15.0, "How long to time each side.")


def _rate(fn, *, seconds: float, samples_per_call: int) -> float:
  """Samples per second of ``fn`` (called after one untimed warm-up call)."""
  fn()
  calls, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds or calls < 2:
    fn()
    calls += 1
  return calls * samples_per_call / elapsed


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config, seconds = flags.FLAGS.config, flags.FLAGS.seconds
  ops, _, _ = cpu.setup("auto")  # as train.py: before JAX starts a backend
  mesh = parallel.make_mesh()
  local_batch = parallel.local_batch_size(config.batch_size, mesh)
  kwargs = training.model_kwargs(config.model)
  model = training.create_model(kwargs, seed=config.seed, norm_axis_name=parallel.AXIS,
                                ops=ops)
  input_hw, output_hw = pipeline.tile_shapes(config.data, model.geometry)
  dataset = pipeline.train_dataset(config.data, input_hw=input_hw, output_hw=output_hw,
                                   local_batch=local_batch)
  iterator = pipeline.train_iterator(dataset, config.data)
  batch = next(iterator)
  data_rate = _rate(lambda: next(iterator), seconds=seconds, samples_per_call=local_batch)
  print(f"pipeline: {data_rate:8.1f} samples/s  ({config.data.source}, tile "
        f"{input_hw[0]}×{input_hw[1]} → {output_hw[0]}×{output_hw[1]}, augment "
        f"{dict(config.data.augment)}, weight map {config.data.weight_map.enabled}, "
        f"{config.data.num_threads} threads, {config.data.get('num_workers', 0)} workers)")
  del iterator

  tx = training.create_optimizer(config.optimizer, config.num_steps)
  state, graphdef, _ = training.create_train_state(model, tx, config.seed)
  step = parallel.data_parallel(
      functools.partial(training.train_step, graphdef=graphdef, tx=tx, loss_config=config.loss,
                        num_classes=kwargs["num_classes"]),
      mesh, batch_argnums=(1,), donate_argnums=(0,))
  holder = {"state": parallel.replicate(state, mesh)}
  device_batch = parallel.shard_batch(batch, mesh)

  def one_step():
    holder["state"], measurements = step(holder["state"], device_batch)
    jax.block_until_ready(measurements["loss"])

  start = time.perf_counter()
  one_step()
  print(f"compiled the train step in {time.perf_counter() - start:.1f} s")
  step_rate = _rate(one_step, seconds=seconds, samples_per_call=config.batch_size)
  print(f"step:     {step_rate:8.1f} samples/s  (batch {config.batch_size}, "
        f"{jax.device_count()} × {jax.devices()[0].platform})")
  print(f"ratio:    {data_rate / step_rate:8.2f}  (pipeline ÷ step; above 1 the pipeline "
        f"keeps up)")


if __name__ == "__main__":
  sys.path.insert(0, str(_ROOT))
  app.run(main)
