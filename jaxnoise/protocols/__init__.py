"""Experiment protocols: stage lists for :mod:`jaxnoise.experiment`, registered by name on import."""

from jaxnoise.protocols import consistency_float, consistency_quantized, denoise_placement, device_drift  # noqa: F401

__all__ = ["consistency_float", "consistency_quantized", "denoise_placement", "device_drift"]
