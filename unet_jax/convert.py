"""``unet_jax.convert``, kept stable: the code lives in ``unet_jax.interop.convert``.

``import unet_jax.convert`` gives that module itself, and ``python -m unet_jax.convert`` runs its command.
"""

import importlib
import sys

if __name__ == "__main__":
  sys.exit(importlib.import_module("unet_jax.interop.convert").main())
else:
  sys.modules[__name__] = importlib.import_module("unet_jax.interop.convert")
