"""CIFAR ResNet-(6n+2) of He et al. (2016, section 4.2) with option-A (parameter-free) shortcuts.

Matches the PyTorch naming and layout of akamaster/pytorch_resnet_cifar10 (see ``../shared/pretrained/README.md``),
so its weights load exactly with :func:`jaxnoise.models.load_torch_npz`. Features: ``stem``, every residual block
output ``layerS/B`` and ``pre_logits`` (after global average pooling).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxnoise.models.base import Model
from jaxnoise.models.layers import Scope

# Depths named ``resnet{depth}`` without the ``_cifar`` suffix: He et al. (2016) table 6. Others: ``resnet{depth}_cifar``.
CIFAR_SHORT_DEPTHS = (20, 32, 44, 56, 110, 1202)


def _shortcut_a(x, planes: int):
    """Option A: every second pixel, channels zero-padded by planes // 4 on each side."""
    x = x[:, ::2, ::2, :]
    pad = planes // 4
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad, pad)))


def basic_block(s: Scope, x, planes: int, stride: int):
    y = jax.nn.relu(s.batch_norm("bn1", s.conv("conv1", x, planes, 3, stride)))
    y = s.inner("mid", y)   # the residual branch between conv1 and conv2 (a tap point, not a returned feature)
    y = s.batch_norm("bn2", s.conv("conv2", y, planes, 3, 1))
    shortcut = x if stride == 1 and x.shape[-1] == planes else _shortcut_a(x, planes)
    return jax.nn.relu(y + shortcut)


def forward(s: Scope, x, *, depth: int, num_classes: int, width: int = 16):
    n = (depth - 2) // 6
    feats = {}
    x = jax.nn.relu(s.batch_norm("bn1", s.conv("conv1", x, width, 3, 1)))
    x = feats["stem"] = s.feature("stem", x)
    for stage, planes in enumerate((width, 2 * width, 4 * width), start=1):
        layer = s.child(f"layer{stage}")
        for b in range(n):
            stride = 2 if stage > 1 and b == 0 else 1
            x = basic_block(layer.child(b), x, planes, stride)
            x = feats[f"layer{stage}/{b}"] = s.feature(f"layer{stage}/{b}", x)
    x = jnp.mean(x, axis=(1, 2))
    x = feats["pre_logits"] = s.feature("pre_logits", x)
    return s.dense("linear", x, num_classes), feats


def resnet_cifar(depth: int = 20, num_classes: int = 10, input_shape=(32, 32, 3)) -> Model:
    """ResNet-``depth`` for CIFAR; ``depth`` = 6n + 2 (20, 32, 44, 56, 110). Named ``resnet{depth}`` for the depths
    of :data:`CIFAR_SHORT_DEPTHS`, ``resnet{depth}_cifar`` otherwise (``resnet50`` is the ImageNet ResNet-50)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}.")
    name = f"resnet{depth}" if depth in CIFAR_SHORT_DEPTHS else f"resnet{depth}_cifar"
    return Model(name, functools.partial(forward, depth=depth, num_classes=num_classes),
                 tuple(input_shape), num_classes, {"depth": depth, "num_classes": num_classes})
