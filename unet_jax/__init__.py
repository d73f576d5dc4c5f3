"""unet-jax: the U-Net of Ronneberger et al. (2015) in JAX and Flax NNX.

Importing the package or any of its modules changes nothing in the process: no environment
variable, JAX option or allocator setting. Process tuning for CPU training lives in
``unet_jax.cpu`` and is applied by the entry points only (``train.py``, the command-line tools,
the benchmarks).
"""
