"""Pure-function models: ``apply(variables, x, *, key=None, noise=None, train=False) -> (logits, features)``.

Models import the noise core only. ``get_model(name)`` builds one by name.
"""

from __future__ import annotations

import re

from jaxnoise.models.base import Model, Variables
from jaxnoise.models.layers import Scope
from jaxnoise.models.resnet_cifar import resnet_cifar
from jaxnoise.models.resnet_imagenet import resnet18
from jaxnoise.models.small import cnn, mlp
from jaxnoise.models.torch_import import WeightsMismatchError, convert_torch_state, load_torch_npz

MODELS = ("mlp", "cnn", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18")


def get_model(name: str, *, quant=None, **kwargs) -> Model:
    """Builds a model by name.

    Args:
      name: ``mlp``, ``cnn`` (digits-sized, 8x8x1 by default), ``resnet{6n+2}`` (CIFAR, 32x32x3) or
        ``resnet18`` (ImageNet, 224x224x3).
      quant: a :class:`jaxnoise.quant.QuantSpec` (or its ``to_config()`` dict, as checkpoints record it) to
        quantize weights and activations; None: float.
      **kwargs: ``num_classes``, ``input_shape`` and model-specific options.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    model = _build(name, **kwargs)
    return model if quant is None else model.with_quant(quant)


def _build(name: str, **kwargs) -> Model:
    if name == "mlp":
        return mlp(**kwargs)
    if name == "cnn":
        return cnn(**kwargs)
    if name == "resnet18":
        return resnet18(**kwargs)
    m = re.fullmatch(r"resnet(\d+)", name)
    if m and (int(m.group(1)) - 2) % 6 == 0 and int(m.group(1)) >= 8:
        return resnet_cifar(int(m.group(1)), **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} (CIFAR ResNets: any depth 6n+2).")


__all__ = ["MODELS", "Model", "Scope", "Variables", "WeightsMismatchError", "cnn", "convert_torch_state",
           "get_model", "load_torch_npz", "mlp", "resnet18", "resnet_cifar"]
