"""jaxnoise: noise-robust neural networks for analog and compute-in-memory accelerators, in pure-function JAX."""

__version__ = "0.1.0"
