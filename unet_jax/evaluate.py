"""``unet_jax.evaluate``, kept stable: the code lives in ``unet_jax.inference.evaluate``.

``import unet_jax.evaluate`` gives that module itself, and ``python -m unet_jax.evaluate`` runs its command.
"""

import importlib
import sys

if __name__ == "__main__":
  sys.exit(importlib.import_module("unet_jax.inference.evaluate").main())
else:
  sys.modules[__name__] = importlib.import_module("unet_jax.inference.evaluate")
