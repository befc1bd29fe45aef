"""Known-answer problems for checking Monte Carlo estimators (as ``numpy.testing`` is for arrays): models and test
sets whose exact answer is known, used by the tests and by ``experiments/adaptive_coverage.py``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from scipy.stats import norm

from jaxnoise.models.base import Model
from jaxnoise.models.layers import Scope

__all__ = ["threshold_problem"]


def threshold_problem(n_images: int = 100):
    """A synthetic model and test set whose Monte Carlo answer is known exactly, for checking estimators.

    One unit weight ``w`` (a dense layer ``w``, no bias) and two classes. Under multiplicative weight noise at
    ``eta = 1`` (``NoiseSpec(weight_kind="multiplicative", weight_eta=1.0)``) each chip has ``w = 1 + Z`` with
    ``Z ~ N(0, 1)``. Image ``j`` (shape (1, 1, 1)) holds ``c_j = Phi^-1(u_j)``, ``u_j = ((j + 0.5) / N)^2``, label 1;
    the logits are ``[0, (w - 1) - c_j]``, so the image is classified correctly iff ``Z > c_j``. Hence
    ``P(correct_j) = 1 - u_j``, the mean accuracy over chips is exactly ``1 - mean(u_j)``, and a chip's accuracy
    is distributed as ``sqrt(U)`` for U uniform (skewed, std ~0.236 for large N).

    Returns:
      ``(model, variables, images, labels, true_mean)``.
    """
    def forward(s: Scope, x):
        z = s.dense("w", jnp.ones((x.shape[0], 1), x.dtype), 1, bias=False)[:, 0] - 1.0
        logit1 = z - x.reshape(-1)
        return jnp.stack([jnp.zeros_like(logit1), logit1], axis=-1), {}

    model = Model("threshold", forward, (1, 1, 1), 2, {"n_images": n_images})
    variables = {"params": {"w": {"kernel": jnp.ones((1, 1), jnp.float32)}}, "batch_stats": {}}
    u = ((np.arange(n_images) + 0.5) / n_images) ** 2
    images = norm.ppf(u).astype(np.float32).reshape(-1, 1, 1, 1)
    labels = np.ones(n_images, np.int32)
    return model, variables, images, labels, float(1.0 - u.mean())
