"""``unet_jax.checkpoint``, kept stable: the code lives in ``unet_jax.training.checkpoint``.

``import unet_jax.checkpoint`` gives that module itself (``load_model``, ``Checkpointer``).
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("unet_jax.training.checkpoint")
