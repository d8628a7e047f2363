"""vi_seg_jax: Bayesian segmentation of 3D medical images with variational inference in JAX."""

__version__ = "0.1.0"
