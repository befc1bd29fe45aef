"""Experiment protocols: stage lists for :mod:`jaxnoise.experiment`, registered by name on import."""

from jaxnoise.protocols import consistency_quantized  # noqa: F401

__all__ = ["consistency_quantized"]
