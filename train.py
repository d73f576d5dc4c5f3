"""Train a U-Net: ``python train.py [--config=configs/FILE.py[:variant]] [--workdir=DIR]``.

Every number lives in the config; override any of them on the command line, e.g.
``--config.num_steps=200 --config.optimizer.learning_rate=1e-3``. Re-running the same command
with the same workdir resumes from its latest checkpoint.

As the entry point, this script owns the process: it turns on JAX's persistent compilation
cache and, where JAX runs on the CPU, the CPU layer (``unet_jax.cpu``; ``--cpu_layer=off``
keeps stock JAX), and says on stderr what it set.
"""

import pathlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from unet_jax import cpu, training
from unet_jax.cpu.native import cache_dir
from unet_jax.training import config_checks, distributed

_HERE = pathlib.Path(__file__).parent
config_flags.DEFINE_config_file("config", str(_HERE / "configs" / "default.py"),
                                "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, logs and predictions.")
flags.DEFINE_string("compilation_cache", str(cache_dir() / "xla"),
                    "Directory where JAX keeps compiled steps between runs, so that a rerun or "
                    "a resumed run skips compiling them; empty: no cache.")
flags.DEFINE_enum("cpu_layer", "auto", cpu.MODES,
                  "The CPU layer (faster CPU operations and process settings): auto turns it "
                  "on when JAX runs on the CPU; off keeps stock JAX everywhere.")
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax reports every file it writes at INFO
  try:  # before the CPU layer builds or JAX starts: a bad value costs nothing
    config_checks.check_config(flags.FLAGS.config)
  except ValueError as error:
    sys.exit(f"error: {error}")
  settings = cpu.configure_process(flags.FLAGS.cpu_layer)  # before JAX starts a backend
  max_pixels = flags.FLAGS.config.data.get("max_pixels")
  if max_pixels is not None:  # a process-wide reader setting: entry points own those
    from unet_jax.data import decode
    decode.set_max_pixels(max_pixels)
    print(f"images over {max_pixels:,} pixels are refused (data.max_pixels)", file=sys.stderr)
  if flags.FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", flags.FLAGS.compilation_cache)
  distributed.initialize_from_flags()
  ops, why = cpu.select_ops(flags.FLAGS.cpu_layer)
  if jax.process_index() == 0:
    cpu.report(ops, why, settings)
    if flags.FLAGS.compilation_cache:
      print(f"compiled steps are cached in {flags.FLAGS.compilation_cache}", file=sys.stderr)
  try:
    metrics = training.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, ops=ops)
  except (ValueError, FileNotFoundError, training.NonFiniteLossError) as error:
    sys.exit(f"error: {error}")
  if metrics:
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("dice_"))
    print(f"final validation: {summary}")


if __name__ == "__main__":
  app.run(main)
