"""Train a U-Net: ``python train.py [--config=configs/FILE.py[:variant]] [--workdir=DIR]``.

Every number lives in the config; override any of them on the command line, e.g.
``--config.num_steps=200 --config.optimizer.learning_rate=1e-3``. Re-running the same command
with the same workdir resumes from its latest checkpoint.
"""

import pathlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from unet_jax import distributed, native, train

_HERE = pathlib.Path(__file__).parent
config_flags.DEFINE_config_file("config", str(_HERE / "configs" / "default.py"),
                                "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, logs and predictions.")
flags.DEFINE_string("compilation_cache", str(native.cache_dir() / "xla"),
                    "Directory where JAX keeps compiled steps between runs, so that a rerun or "
                    "a resumed run skips compiling them; empty: no cache.")
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax reports every file it writes at INFO
  if flags.FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", flags.FLAGS.compilation_cache)
  distributed.initialize_from_flags()
  try:
    metrics = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, FileNotFoundError, train.NonFiniteLossError) as error:
    sys.exit(f"error: {error}")
  if metrics:
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("dice_"))
    print(f"final validation: {summary}")


if __name__ == "__main__":
  app.run(main)
