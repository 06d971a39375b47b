"""fcn_jax: Fully Convolutional Networks for Semantic Segmentation in JAX/Flax."""

__version__ = '0.1.0'
