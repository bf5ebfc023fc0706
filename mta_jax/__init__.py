"""mta_jax: meta-learned tool selection (MetaToolAgent, arXiv 2601.12680) in JAX/Flax."""

__version__ = "0.1.0"
