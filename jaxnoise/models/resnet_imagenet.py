"""ImageNet ResNets (He et al. 2016) in torchvision's layout: ResNet-18/34 (basic blocks) and ResNet-50/101/152
(bottleneck blocks, stride on the 3x3 convolution as torchvision's "v1.5"), with option-B (1x1 conv + BN) projection
shortcuts.

PyTorch/torchvision naming (``layer2/0/downsample/0`` conv, ``.../downsample/1`` BN, ``fc``), so a torchvision
``state_dict()`` exported to npz (``jaxnoise convert-torch``) loads with :func:`jaxnoise.models.load_torch_npz`.
Features: ``stem`` (after the max pool), every residual block output ``layerS/B`` and ``pre_logits`` (after global
average pooling). The input resolution is a parameter (``input_shape``); global pooling makes any size >= 32 work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxnoise.models.base import Model
from jaxnoise.models.layers import Scope

# depth -> (block kind, blocks per stage), as torchvision.models.resnet{depth}.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def _downsample(s: Scope, x, out: int, stride: int):
    if stride != 1 or x.shape[-1] != out:
        d = s.child("downsample")
        return d.batch_norm("1", d.conv("0", x, out, 1, stride, padding=0))
    return x


def basic_block(s: Scope, x, planes: int, stride: int):
    y = jax.nn.relu(s.batch_norm("bn1", s.conv("conv1", x, planes, 3, stride)))
    y = s.inner("mid", y)   # between conv1 and conv2 (a tap point, not a returned feature)
    y = s.batch_norm("bn2", s.conv("conv2", y, planes, 3, 1))
    return jax.nn.relu(y + _downsample(s, x, planes, stride))


def bottleneck_block(s: Scope, x, planes: int, stride: int):
    """1x1 (planes) -> 3x3 (planes, stride) -> 1x1 (4 planes), torchvision's ``Bottleneck``."""
    y = jax.nn.relu(s.batch_norm("bn1", s.conv("conv1", x, planes, 1, 1, padding=0)))
    y = s.inner("mid1", y)   # tap points inside the branch: after conv1, after conv2
    y = jax.nn.relu(s.batch_norm("bn2", s.conv("conv2", y, planes, 3, stride)))
    y = s.inner("mid2", y)
    y = s.batch_norm("bn3", s.conv("conv3", y, planes * 4, 1, 1, padding=0))
    return jax.nn.relu(y + _downsample(s, x, planes * 4, stride))


def max_pool_3x3_s2(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


def forward(s: Scope, x, *, blocks=(2, 2, 2, 2), num_classes: int = 1000, block: str = "basic"):
    block_fn = basic_block if block == "basic" else bottleneck_block
    feats = {}
    x = jax.nn.relu(s.batch_norm("bn1", s.conv("conv1", x, 64, 7, 2, padding=3)))
    x = max_pool_3x3_s2(x)
    x = feats["stem"] = s.feature("stem", x)
    for stage, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        layer = s.child(f"layer{stage}")
        for b in range(n):
            x = block_fn(layer.child(b), x, planes, 2 if stage > 1 and b == 0 else 1)
            x = feats[f"layer{stage}/{b}"] = s.feature(f"layer{stage}/{b}", x)
    x = jnp.mean(x, axis=(1, 2))
    x = feats["pre_logits"] = s.feature("pre_logits", x)
    return s.dense("fc", x, num_classes), feats


def resnet_imagenet(depth: int = 50, num_classes: int = 1000, input_shape=(224, 224, 3)) -> Model:
    """torchvision's ResNet-``depth`` (18, 34, 50, 101 or 152); ``input_shape`` (H, W, 3) sets the resolution."""
    if depth not in DEPTHS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(DEPTHS)} (torchvision's), got {depth}.")
    kind, blocks = DEPTHS[depth]
    fwd = functools.partial(forward, blocks=blocks, num_classes=num_classes, block=kind)
    return Model(f"resnet{depth}", fwd, tuple(input_shape), num_classes, {"num_classes": num_classes})


def resnet18(num_classes: int = 1000, input_shape=(224, 224, 3)) -> Model:
    """ImageNet ResNet-18 (11,689,512 parameters at 1000 classes, as torchvision's)."""
    return resnet_imagenet(18, num_classes, input_shape)


def resnet50(num_classes: int = 1000, input_shape=(224, 224, 3)) -> Model:
    """ImageNet ResNet-50, bottleneck blocks (25,557,032 parameters at 1000 classes, as torchvision's)."""
    return resnet_imagenet(50, num_classes, input_shape)
