"""muddit_jax: a JAX/Flax reimplementation of Muddit (arXiv 2505.23606)."""

__version__ = "0.1.0"
