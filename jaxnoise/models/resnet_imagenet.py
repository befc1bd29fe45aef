"""ResNet-18 for ImageNet (He et al. 2016) with option-B (1x1 conv + BN) projection shortcuts.

PyTorch/torchvision naming (``layer2/0/downsample/0`` conv, ``.../downsample/1`` BN, ``fc``), so torchvision
state dicts exported to npz load with :func:`jaxnoise.models.load_torch_npz`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxnoise.models.base import Model
from jaxnoise.models.layers import Scope


def basic_block(s: Scope, x, planes: int, stride: int):
    y = jax.nn.relu(s.batch_norm("bn1", s.conv("conv1", x, planes, 3, stride)))
    y = s.batch_norm("bn2", s.conv("conv2", y, planes, 3, 1))
    if stride != 1 or x.shape[-1] != planes:
        d = s.child("downsample")
        x = d.batch_norm("1", d.conv("0", x, planes, 1, stride, padding=0))
    return jax.nn.relu(y + x)


def max_pool_3x3_s2(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


def forward(s: Scope, x, *, blocks=(2, 2, 2, 2), num_classes: int = 1000):
    feats = {}
    x = jax.nn.relu(s.batch_norm("bn1", s.conv("conv1", x, 64, 7, 2, padding=3)))
    x = max_pool_3x3_s2(x)
    x = feats["stem"] = s.feature("stem", x)
    for stage, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        layer = s.child(f"layer{stage}")
        for b in range(n):
            x = basic_block(layer.child(b), x, planes, 2 if stage > 1 and b == 0 else 1)
            x = feats[f"layer{stage}/{b}"] = s.feature(f"layer{stage}/{b}", x)
    x = jnp.mean(x, axis=(1, 2))
    x = feats["pre_logits"] = s.feature("pre_logits", x)
    return s.dense("fc", x, num_classes), feats


def resnet18(num_classes: int = 1000, input_shape=(224, 224, 3)) -> Model:
    """ImageNet ResNet-18 (11.7M parameters at 1000 classes)."""
    return Model("resnet18", functools.partial(forward, num_classes=num_classes), tuple(input_shape), num_classes,
                 {"num_classes": num_classes})
