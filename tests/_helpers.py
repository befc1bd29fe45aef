"""Helpers shared by test modules and the subprocess children (not collected: no ``test_`` prefix)."""

import os

import jax
import numpy as np


def he_variables(model, seed=0):
    """Variables initialised like ``model.init`` does (He-normal kernels, BatchNorm at identity, running mean 0
    and var 1), in numpy: without ``model.init``'s eager compilations, which dominate small tests on CPU."""
    rng = np.random.default_rng(seed)

    def init(path, s):
        leaf = path[-1].key
        if leaf == "kernel":
            return (rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(s.dtype)
        return np.full(s.shape, leaf in ("scale", "var"), s.dtype)
    return jax.tree_util.tree_map_with_path(init, jax.eval_shape(model.init, jax.random.key(0)))


PEER_VENV = "a venv with torch and aihwkit 1.2.0 (../shared/wheels; benchmarks/peer_torch.py says how to make one)"


def require_aihwkit(what: str, test_file: str):
    """The ``torch`` module, or a skip of the calling test module unless torch and aihwkit import (they are not in
    the project's venv or CI). ``what`` names the check and ``test_file`` (``__file__``) its module in the skip
    line. Call at module level."""
    import pytest
    try:
        import aihwkit  # noqa: F401
        import torch
    except Exception as e:   # ImportError, or OSError when aihwkit's libopenblas is missing
        pytest.skip(f"{what} needs torch and aihwkit 1.2.0 ({type(e).__name__}: {e}); run it with the python of "
                    f"{PEER_VENV}: PYTHONPATH=. python -m pytest tests/{os.path.basename(test_file)}",
                    allow_module_level=True)
    return torch
