"""unet-jax: the U-Net of Ronneberger et al. (2015) in JAX and Flax NNX."""

from unet_jax import malloc_defaults, xla_defaults

malloc_defaults.apply()
xla_defaults.apply()
