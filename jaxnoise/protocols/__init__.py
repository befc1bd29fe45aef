"""Experiment protocols: stage lists for :mod:`jaxnoise.experiment`, registered by name on import."""

from jaxnoise.protocols import (  # noqa: F401
                                consistency_float,
                                consistency_quantized,
                                denoise_ablation,
                                denoise_placement,
                                denoise_proxy,
                                device_drift,
)

__all__ = ["consistency_float", "consistency_quantized", "denoise_ablation", "denoise_placement", "denoise_proxy", "device_drift"]
