"""``unet_jax.train``, kept stable: training lives in ``unet_jax.training``.

``import unet_jax.train`` gives that package itself (``train_and_evaluate``, the steps, the
train state).
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("unet_jax.training")
