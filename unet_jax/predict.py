"""``unet_jax.predict``, kept stable: the code lives in ``unet_jax.inference.predict``.

``import unet_jax.predict`` gives that module itself, and ``python -m unet_jax.predict`` runs its command.
"""

import importlib
import sys

if __name__ == "__main__":
  sys.exit(importlib.import_module("unet_jax.inference.predict").main())
else:
  sys.modules[__name__] = importlib.import_module("unet_jax.inference.predict")
