"""``unet_jax.export``, kept stable: the code lives in ``unet_jax.interop.export``.

``import unet_jax.export`` gives that module itself (``load``, ``export_stablehlo``,
``export_onnx``), and ``python -m unet_jax.export`` runs its command.
"""

import importlib
import sys

if __name__ == "__main__":
  sys.exit(importlib.import_module("unet_jax.interop.export").main())
else:
  sys.modules[__name__] = importlib.import_module("unet_jax.interop.export")
