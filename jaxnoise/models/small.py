"""Small models for the embedded digits dataset and fast tests: an MLP and a CNN."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxnoise.models.base import Model
from jaxnoise.models.layers import Scope


def mlp_forward(s: Scope, x, *, hidden=(128, 64), num_classes=10):
    feats = {}
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(hidden, start=1):
        x = jax.nn.relu(s.dense(f"fc{i}", x, h))
        x = feats[f"hidden{i}"] = s.feature(f"hidden{i}", x)
    x = feats["pre_logits"] = s.feature("pre_logits", x)
    return s.dense("head", x, num_classes), feats


def cnn_forward(s: Scope, x, *, channels=(16, 32, 32), num_classes=10):
    feats = {}
    for i, c in enumerate(channels, start=1):
        x = jax.nn.relu(s.batch_norm(f"bn{i}", s.conv(f"conv{i}", x, c, 3, 1 if i == 1 else 2)))
        x = feats[f"block{i}"] = s.feature(f"block{i}", x)
    x = jnp.mean(x, axis=(1, 2))
    x = feats["pre_logits"] = s.feature("pre_logits", x)
    return s.dense("head", x, num_classes), feats


def mlp(num_classes: int = 10, input_shape=(8, 8, 1), hidden=(128, 64)) -> Model:
    """MLP on flattened images: dense-ReLU layers ``fc1..`` and a ``head``; no BatchNorm."""
    return Model("mlp", functools.partial(mlp_forward, hidden=tuple(hidden), num_classes=num_classes),
                 tuple(input_shape), num_classes, {"hidden": list(hidden), "num_classes": num_classes})


def cnn(num_classes: int = 10, input_shape=(8, 8, 1), channels=(16, 32, 32)) -> Model:
    """CNN: conv-BN-ReLU blocks (stride 1, then 2), global average pool, dense ``head``."""
    return Model("cnn", functools.partial(cnn_forward, channels=tuple(channels), num_classes=num_classes),
                 tuple(input_shape), num_classes, {"channels": list(channels), "num_classes": num_classes})


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
    import numpy as np
    from scipy.stats import norm

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
