"""Helpers shared by test modules and the subprocess children (not collected: no ``test_`` prefix)."""

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
