"""Test setup: 8 simulated CPU devices, full fp32 matmuls, and a persistent compile cache."""

import os

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("UNET_JAX_TEST_CACHE", os.path.expanduser("~/.cache/unet_jax_tests")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
