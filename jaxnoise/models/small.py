"""Small models for the embedded digits dataset and fast tests: an MLP and a CNN (known-answer problems for the
estimators are in ``jaxnoise.testing``)."""

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

