"""Import PyTorch-named state dicts saved as ``.npz`` into the variables of a :class:`~jaxnoise.models.Model`.

Name mapping: ``a.b.c.<leaf>`` -> layer path ``a/b/c``. The target model decides what each leaf becomes:
conv ``weight`` (out, in, kh, kw) -> ``kernel`` (kh, kw, in, out); linear ``weight`` (out, in) -> ``kernel``
(in, out); ``bias`` -> ``bias``; BatchNorm ``weight`` -> ``scale``, ``running_mean``/``running_var`` ->
``batch_stats`` ``mean``/``var``; ``num_batches_tracked`` is dropped. Every problem (missing, unexpected or
mis-shaped keys) is collected and reported in one error.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxnoise.io import write_atomic
from jaxnoise.models.base import Model, Variables


class WeightsMismatchError(ValueError):
    """The weights file does not match the model's architecture."""


def _target(flat_params, flat_stats, layer: str, leaf: str):
    """(collection, path, transform) for one PyTorch leaf of layer ``layer``; None if the model has no such leaf."""
    is_bn = f"{layer}/scale" in flat_params
    if leaf == "weight":
        if is_bn:
            return "params", f"{layer}/scale", lambda a: a
        path = f"{layer}/kernel"
        if path not in flat_params:
            return None
        ndim = len(flat_params[path].shape)
        return "params", path, (lambda a: a.transpose(2, 3, 1, 0)) if ndim == 4 else (lambda a: a.T)
    if leaf == "bias":
        return ("params", f"{layer}/bias", lambda a: a) if f"{layer}/bias" in flat_params else None
    if leaf in ("running_mean", "running_var"):
        path = f"{layer}/{'mean' if leaf == 'running_mean' else 'var'}"
        return ("batch_stats", path, lambda a: a) if path in flat_stats else None
    return None


def convert_torch_state(model: Model, state: dict[str, np.ndarray], source: str = "state dict") -> Variables:
    """Converts a PyTorch-named ``{name: array}`` into ``model``'s variables, checking every key and shape.

    Args:
      model: the target model.
      state: PyTorch state-dict names to arrays (PyTorch layouts).
      source: where ``state`` came from, for error messages.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` as float32 numpy arrays.

    Raises:
      WeightsMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    flat = {c: traverse_util.flatten_dict(abstract.get(c, {}), sep="/") for c in ("params", "batch_stats")}
    out = {"params": {}, "batch_stats": {}}
    unexpected, misshaped, misshaped_paths = [], [], set()
    for name, array in state.items():
        layer, _, leaf = name.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        target = _target(flat["params"], flat["batch_stats"], layer.replace(".", "/"), leaf)
        if target is None:
            unexpected.append(name)
            continue
        collection, path, transform = target
        value = transform(np.asarray(array, np.float32))
        want = tuple(flat[collection][path].shape)
        if value.shape != want:
            misshaped.append(f"{name}: file {tuple(np.shape(array))} -> {value.shape}, model {path} wants {want}")
            misshaped_paths.add((collection, path))
            continue
        out[collection][path] = value
    missing = [f"{c}/{p}" for c in flat for p in flat[c] if p not in out[c] and (c, p) not in misshaped_paths]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match model {model.name} ({model.config}):"]
        for title, items in (("missing in file", missing), ("unexpected in file", unexpected),
                             ("wrong shape", misshaped)):
            if items:
                shown = items[:10] + ([f"... and {len(items) - 10} more"] if len(items) > 10 else [])
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        lines.append("Check the model name/depth and num_classes against the weights file.")
        raise WeightsMismatchError("\n".join(lines))
    return {c: traverse_util.unflatten_dict(out[c], sep="/") for c in out}


def load_torch_npz(model: Model, path: str | os.PathLike) -> Variables:
    """Loads a PyTorch-named ``.npz`` state dict into ``model``'s variables.

    Examples:
      >>> model = get_model("resnet20")
      >>> variables = load_torch_npz(model, "../shared/pretrained/resnet20_cifar10.npz")
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as f:
            state: dict[str, Any] = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise WeightsMismatchError(f"{path!r} is not a readable .npz file ({e}); it may be truncated or corrupt.") \
            from e
    return convert_torch_state(model, state, source=repr(path))


TORCH_MISSING = ("converting a PyTorch .pth checkpoint needs torch, which jaxnoise does not depend on: install it "
                 "(CPU is enough: pip install torch --index-url https://download.pytorch.org/whl/cpu) in the "
                 "environment that runs `jaxnoise convert-torch`.")


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch checkpoint as ``{state-dict name: float/int numpy array}``.

    Accepts a ``state_dict()`` saved with ``torch.save``, or a training checkpoint holding one under
    ``"state_dict"``, ``"model"`` or ``"model_state_dict"``; the ``module.`` prefix of ``nn.DataParallel`` /
    DDP checkpoints is removed. Loaded with ``torch.load(..., map_location="cpu", weights_only=True)``: no pickled
    code is run. torch is imported here only, lazily.

    Raises:
      ImportError: torch is not installed (the message says how to install it).
      FileNotFoundError: ``path`` does not exist.
      WeightsMismatchError: the file holds no state dict of tensors.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist.")
    try:
        import torch  # noqa: PLC0415 - optional, only for this conversion
    except ImportError as e:
        raise ImportError(TORCH_MISSING) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
        raise WeightsMismatchError(f"{path!r} cannot be read by torch.load(weights_only=True) "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:200]}).") from e
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"{path!r} does not hold a state dict of tensors (got {type(obj).__name__}): save "
                                   f"model.state_dict() with torch.save.")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def torch_checkpoint_to_npz(path: str | os.PathLike, out: str | os.PathLike, model: Model | None = None, *,
                            overwrite: bool = False) -> dict[str, np.ndarray]:
    """Converts a PyTorch checkpoint (:func:`read_torch_checkpoint`) to the PyTorch-named ``.npz`` that
    :func:`load_torch_npz` reads (float tensors as float32; ``num_batches_tracked`` dropped).

    Args:
      path: the ``.pth``/``.pt`` file.
      out: the ``.npz`` to write (atomically; an existing file only with ``overwrite``).
      model: when given, the state dict is checked against it first (every key and shape, one error listing all
        problems), so a file for another architecture is never written.
      overwrite: replace an existing ``out``.

    Returns:
      The arrays written.
    """
    out = os.fspath(out)
    if not out.endswith(".npz"):
        raise ValueError(f"the output {out!r} must end with .npz.")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out!r} exists; pass overwrite (--overwrite) to replace it.")
    state = read_torch_checkpoint(path)
    arrays = {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in state.items()
              if not k.endswith("num_batches_tracked")}
    if model is not None:
        convert_torch_state(model, arrays, source=repr(os.fspath(path)))
    write_atomic(out, lambda f: np.savez(f, **arrays), binary=True)
    return arrays
