"""Pure-function models: ``apply(variables, x, *, key=None, noise=None, train=False) -> (logits, features)``.

Models import the noise core only. ``get_model(name)`` builds one by name.

ResNet names are unambiguous: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` and ``resnet152`` are
torchvision's ImageNet ResNets (:mod:`jaxnoise.models.resnet_imagenet`); the CIFAR ResNet-(6n+2) family of He et al.
(option-A shortcuts, :mod:`jaxnoise.models.resnet_cifar`) is ``resnet{depth}_cifar`` for any depth 6n+2, and keeps
its short names for the depths of He et al.'s CIFAR table (``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
``resnet110``, ``resnet1202``). Any other ``resnet{N}`` is refused with the names to use.
"""

from __future__ import annotations

import re

from jaxnoise.models.base import Chip, Model, Output, Variables
from jaxnoise.models.layers import Scope
from jaxnoise.models.resnet_cifar import CIFAR_SHORT_DEPTHS, resnet_cifar
from jaxnoise.models.resnet_imagenet import DEPTHS as IMAGENET_DEPTHS
from jaxnoise.models.resnet_imagenet import resnet18, resnet50, resnet_imagenet
from jaxnoise.models.small import cnn, mlp
from jaxnoise.models.torch_import import (
    WeightsMismatchError,
    convert_torch_state,
    load_torch_npz,
    read_torch_checkpoint,
    torch_checkpoint_to_npz,
)

IMAGENET_MODELS = tuple(f"resnet{d}" for d in IMAGENET_DEPTHS)
CIFAR_MODELS = tuple(f"resnet{d}" for d in CIFAR_SHORT_DEPTHS)
MODELS = ("mlp", "cnn", *CIFAR_MODELS, *IMAGENET_MODELS)


def get_model(name: str, *, quant=None, input_ranges=None, **kwargs) -> Model:
    """Builds a model by name.

    Args:
      name: ``mlp``, ``cnn`` (digits-sized, 8x8x1 by default); the CIFAR ResNets ``resnet20``, ``resnet32``,
        ``resnet44``, ``resnet56``, ``resnet110``, ``resnet1202`` or ``resnet{6n+2}_cifar`` (32x32x3); the ImageNet
        ResNets ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152`` (torchvision layout,
        224x224x3 by default; ``input_shape=(H, W, 3)`` for another resolution).
      quant: a :class:`jaxnoise.quant.QuantSpec` (or its ``to_config()`` dict, as checkpoints record it) to
        quantize weights and activations; None: float.
      input_ranges: ``{layer: (T_in, T_out)}``: learned input ranges (:meth:`Model.with_input_ranges`, as
        checkpoints record them); None: none.
      **kwargs: ``num_classes``, ``input_shape`` and model-specific options.

    Raises:
      ValueError: for an unknown or ambiguous name, listing the known ones.
    """
    model = _build(name, **kwargs)
    model = model if quant is None else model.with_quant(quant)
    return model if not input_ranges else model.with_input_ranges(input_ranges)


def _build(name: str, **kwargs) -> Model:
    if name == "mlp":
        return mlp(**kwargs)
    if name == "cnn":
        return cnn(**kwargs)
    m = re.fullmatch(r"resnet(\d+)(_cifar|_imagenet)?", name)
    if m:
        depth, family = int(m.group(1)), m.group(2)
        cifar_ok = depth >= 8 and (depth - 2) % 6 == 0
        if family == "_imagenet" or (family is None and depth in IMAGENET_DEPTHS):
            if depth in IMAGENET_DEPTHS:
                return resnet_imagenet(depth, **kwargs)
        elif family == "_cifar" or (family is None and depth in CIFAR_SHORT_DEPTHS):
            if cifar_ok:
                return resnet_cifar(depth, **kwargs)
        elif cifar_ok:   # a bare 6n+2 depth that is not a short name
            raise ValueError(f"model name {name!r} is ambiguous: the CIFAR ResNet of depth {depth} is "
                             f"'resnet{depth}_cifar'; ImageNet ResNets are {', '.join(IMAGENET_MODELS)}.")
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} (CIFAR ResNets of any depth 6n+2: "
                     f"resnet{{depth}}_cifar, e.g. resnet50_cifar).")


__all__ = ["CIFAR_MODELS", "Chip", "IMAGENET_MODELS", "MODELS", "Model", "Output", "Scope", "Variables", "WeightsMismatchError", "cnn",
           "convert_torch_state", "get_model", "load_torch_npz", "mlp", "read_torch_checkpoint", "torch_checkpoint_to_npz", "resnet18", "resnet50", "resnet_cifar",
           "resnet_imagenet"]
