"""vllama-jax: Video-LLaMA in JAX/Flax."""

__version__ = "0.1.0"
