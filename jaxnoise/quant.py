"""Quantization of weights and activations (fake quantization), as pure functions of the noise core.

An n-bit symmetric uniform quantizer with step ``s`` maps ``w`` to ``W_q = s * round(clip(w / s, -Q_n, Q_p))``:
signed levels ``-Q_n .. Q_p`` with ``Q_n = Q_p = 2**(n-1) - 1`` (4 bits: -7..7), unsigned ``0 .. 2**n - 1`` (after a
ReLU). Rounding is to nearest (ties to even), with a straight-through gradient: ``dW_q/dw`` is 1 inside the clipping
range and 0 outside. The step is either

* **fixed** from a statistic of the (stop-gradient) weights, per tensor or per output channel (last axis):
  ``"max"`` (``max|w| / Q_p``: nothing clipped), ``"percentile"`` (the ``percentile``-th percentile of ``|w|`` over
  ``Q_p``; the authors' group clips 4-bit weights at the 80th) or ``"std"`` (``k std(w) / Q_p``); or
* **learned** (``"lsq"``, Esser et al., "Learned Step Size Quantization", ICLR 2020): a trainable parameter
  ``w_step`` beside the kernel, whose gradient is LSQ's ``(round(v) - v)`` inside the range and ``-Q_n``/``Q_p``
  outside (``v = w / s``), scaled by ``g = 1 / sqrt(N Q_p)`` (N the weights per step). It starts from a fixed rule
  (``weight_step_init``) or LSQ's own ``2 mean|w| / sqrt(Q_p)``.

Activations (the input of every selected analog MVM) use LSQ with a learned ``a_step`` per layer, unsigned unless the
layer is listed in ``act_signed_paths`` (the first layer sees signed, normalised images).

How it composes: ``Model.apply`` quantizes the kernels (:func:`quantize_params`) *before* weight noise, so every
weight-noise kind acts on ``W_q`` and ``additive_rel_max`` is relative to ``max|W_q|`` of each layer's quantized
weights, the convention of the authors' group (``../shared/PAPERS.md``). One chip is one noise draw on the quantized
weights. Steps are parameters (``params[...]["w_step"]``, ``["a_step"]``): saved and restored with the checkpoint
and never weight-decayed (only ``kernel`` leaves are). :func:`init_steps` adds them to pretrained variables.

Examples:
  >>> q = QuantSpec(weight_bits=4, act_bits=4, act_signed_paths=("^conv1$",))
  >>> model = jaxnoise.models.get_model("resnet20", quant=q)
  >>> variables = init_steps(model, pretrained_variables, calibration_images)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxnoise import _checks

WEIGHT_STEP_RULES: dict[str, str] = {
    "max": "s = max|w| / Q_p (no clipping)",
    "percentile": "s = percentile(|w|, p) / Q_p (clips the largest 100 - p % of |w|)",
    "std": "s = k std(w) / Q_p",
    "lsq": "s learned (LSQ, Esser et al. 2020), a trainable w_step per tensor or channel",
}
STEP_INITS = ("max", "percentile", "std", "lsq")   # how a learned step starts ("lsq": 2 mean|x| / sqrt(Q_p))
DEFAULT_WEIGHT_PATHS = (r"(^|/)kernel$",)
WEIGHT_STEP = "w_step"
ACT_STEP = "a_step"
MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: Any, name: str = "bits") -> int:
    """``bits`` as an int in [2, 16], or a ValueError that says so."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        if isinstance(bits, (float, np.floating)) and float(bits).is_integer():
            hint = f" (write {int(bits)})"
        else:
            hint = ""
        raise ValueError(f"{name}={bits!r}: a bit width is an integer from {MIN_BITS} to {MAX_BITS}{hint}.")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{name}={bits!r}: a bit width is an integer from {MIN_BITS} to {MAX_BITS} (a 1-bit "
                         f"symmetric quantizer has no level but 0; more than 16 bits is float for this purpose).")
    return int(bits)


def levels(bits: int, signed: bool = True) -> tuple[int, int]:
    """``(Q_n, Q_p)``: the integer levels are ``-Q_n .. Q_p``; signed ``2**(b-1) - 1`` each side, unsigned
    ``0 .. 2**b - 1``."""
    bits = check_bits(bits)
    return (2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def round_ste(x: jax.Array) -> jax.Array:
    """Round to nearest (ties to even) with the identity as gradient."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def grad_scale(x: jax.Array, g: Any) -> jax.Array:
    """``x`` whose gradient is multiplied by ``g`` (LSQ's step-size gradient scale)."""
    return x * g + jax.lax.stop_gradient(x - x * g)


def fake_quant(x: jax.Array, step: jax.Array, qn: int, qp: int) -> jax.Array:
    """``step * round(clip(x / step, -qn, qp))``, straight-through in ``x`` inside the range (0 outside); its
    gradient in ``step`` is LSQ's (without the gradient scale, see :func:`lsq`). ``step`` broadcasts against
    ``x`` (a scalar, or one per output channel: the last axis)."""
    step = jnp.asarray(step, x.dtype)
    return round_ste(jnp.clip(x / step, -qn, qp)) * step


def lsq(x: jax.Array, step: jax.Array, qn: int, qp: int, n_per_step: int) -> jax.Array:
    """LSQ: :func:`fake_quant` with the step's gradient scaled by ``1 / sqrt(n_per_step * qp)`` (Esser et al.,
    eq. 4-5). ``n_per_step``: weights per step (a layer's, or a channel's), or features per example for activations."""
    g = 1.0 / np.sqrt(max(int(n_per_step), 1) * qp)
    return fake_quant(x, grad_scale(jnp.asarray(step, x.dtype), jnp.asarray(g, x.dtype)), qn, qp)


def _reduce_axes(w: jax.Array, per_channel: bool) -> tuple[int, ...] | None:
    return tuple(range(w.ndim - 1)) if per_channel else None


def step_statistic(x: jax.Array, rule: str, qp: int, *, per_channel: bool = False, percentile: float = 80.0,
                   k_std: float = 3.0) -> jax.Array:
    """The step of a fixed rule (``"max"``, ``"percentile"``, ``"std"``) or LSQ's initial step (``"lsq"``) for
    ``x`` (stop-gradient): a scalar, or one per output channel (last axis) when ``per_channel``. Never 0 (an
    all-zero tensor gets step 1, which maps it to 0 exactly)."""
    x = jax.lax.stop_gradient(x)
    axes = _reduce_axes(x, per_channel)
    a = jnp.abs(x)
    if rule == "max":
        s = jnp.max(a, axis=axes) / qp
    elif rule == "percentile":
        s = jnp.percentile(a, percentile, axis=axes) / qp
    elif rule == "std":
        s = k_std * jnp.std(x, axis=axes) / qp
    elif rule == "lsq":
        s = 2.0 * jnp.mean(a, axis=axes) / np.sqrt(qp)
    else:
        raise ValueError(f"unknown step rule {rule!r}; choose one of {', '.join(STEP_INITS)}.")
    return jnp.where(s > 0, s, jnp.ones_like(s)).astype(x.dtype)


def _selected(path: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, path) for p in patterns)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How a model's weights and MVM inputs are quantized (all static: a change recompiles).

    Attributes:
      weight_bits: bits of the weight quantizer (2-16), or None for float weights.
      weight_step: a key of :data:`WEIGHT_STEP_RULES`: ``"lsq"`` (learned, default) or a fixed rule.
      weight_step_init: for ``"lsq"``: the rule the learned step starts from (:data:`STEP_INITS`); default
        ``"percentile"`` (at ``percentile`` = 80, the authors' group's LSQ initialisation).
      per_channel: one step per output channel (the last kernel axis) instead of one per tensor.
      percentile: the percentile of ``|w|`` of the ``"percentile"`` rule.
      k_std: the multiple of ``std(w)`` of the ``"std"`` rule.
      weight_paths: regular expressions over ``/``-joined parameter paths: the quantized leaves, among the kernels
        of the model's analog layers (``Model.analog_weight_paths``, as the layers register them; default: every
        one).
      act_bits: bits of the LSQ quantizer of every selected MVM input, or None for float activations.
      act_paths: regular expressions over layer (site) names whose inputs are quantized (default: all).
      act_signed_paths: layers whose input is signed (symmetric levels); the others are unsigned (after a ReLU),
        which :func:`init_steps` checks on the calibration images.
      act_step_init: how each ``a_step`` starts (:data:`STEP_INITS`; default ``"lsq"``, 2 mean|x| / sqrt(Q_p)).
    """

    weight_bits: int | None = 4
    weight_step: str = "lsq"
    weight_step_init: str = "percentile"
    per_channel: bool = False
    percentile: float = 80.0
    k_std: float = 3.0
    weight_paths: tuple[str, ...] = DEFAULT_WEIGHT_PATHS
    act_bits: int | None = None
    act_paths: tuple[str, ...] = (".*",)
    act_signed_paths: tuple[str, ...] = ()
    act_step_init: str = "lsq"

    def __post_init__(self):
        if self.weight_bits is not None:
            check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        _checks.choice(self.weight_step, WEIGHT_STEP_RULES, "weight_step")
        _checks.choice(self.weight_step_init, STEP_INITS, "weight_step_init")
        _checks.choice(self.act_step_init, STEP_INITS, "act_step_init")
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"per_channel={self.per_channel!r}: True (a step per output channel) or False.")
        p = _checks.number(self.percentile, "percentile", minimum=0.0)
        if not 0 < p <= 100:
            raise ValueError(f"percentile={self.percentile!r}: a percentile of |w| in (0, 100].")
        _checks.positive(self.k_std, "k_std")
        for field in ("weight_paths", "act_paths", "act_signed_paths"):
            pats = _checks.names(getattr(self, field), field, example="kernel")
            for pat in pats:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ValueError(f"{field} pattern {pat!r} is not a valid regular expression: {e}") from e
            object.__setattr__(self, field, pats)

    @property
    def learned_weight_step(self) -> bool:
        return self.weight_bits is not None and self.weight_step == "lsq"

    def quantizes_input(self, site: str) -> bool:
        return self.act_bits is not None and _selected(site, self.act_paths)

    def input_signed(self, site: str) -> bool:
        return _selected(site, self.act_signed_paths)

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the quantization (result files keep it inside ``weight_noise``)."""
        out: dict[str, Any] = {"weight_bits": self.weight_bits}
        if self.weight_bits is not None:
            out.update(weight_step=self.weight_step, granularity="channel" if self.per_channel else "tensor",
                       levels=list(levels(self.weight_bits)))
            rule = self.weight_step_init if self.weight_step == "lsq" else self.weight_step
            if rule == "percentile":
                out["percentile"] = self.percentile
            if rule == "std":
                out["k_std"] = self.k_std
            if self.weight_step == "lsq":
                out["weight_step_init"] = self.weight_step_init
        out["act_bits"] = self.act_bits
        if self.act_bits is not None:
            out.update(act_step="lsq", act_step_init=self.act_step_init, act_paths=list(self.act_paths),
                       act_signed_paths=list(self.act_signed_paths))
        return out

    def to_config(self) -> dict[str, Any]:
        """The constructor arguments as JSON-ready data (``QuantSpec(**spec.to_config())`` rebuilds it)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: QuantSpec | Mapping[str, Any] | None) -> QuantSpec | None:
        if config is None or isinstance(config, QuantSpec):
            return config
        if not isinstance(config, Mapping):
            raise ValueError(f"quant must be a jaxnoise.quant.QuantSpec, a dict of its fields or None, got "
                             f"{type(config).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown QuantSpec fields {unknown}; known: {sorted(known)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _join(parent: str, leaf: str) -> str:
    return f"{parent}/{leaf}" if parent else leaf


def weight_step_shape(w_shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    return (w_shape[-1],) if spec.per_channel else ()


def quantize_weight(w: jax.Array, spec: QuantSpec, step: jax.Array | None = None) -> jax.Array:
    """One weight tensor quantized by ``spec`` (``step``: the learned step when ``spec.weight_step == "lsq"``)."""
    qn, qp = levels(spec.weight_bits)
    if spec.weight_step == "lsq":
        if step is None:
            raise ValueError("a learned (lsq) weight step needs its w_step parameter: add it with "
                             "jaxnoise.quant.init_steps(model, variables, images).")
        n = w.size // (w.shape[-1] if spec.per_channel else 1)
        return lsq(w, step, qn, qp, n)
    return fake_quant(w, step_statistic(w, spec.weight_step, qp, per_channel=spec.per_channel,
                                        percentile=spec.percentile, k_std=spec.k_std), qn, qp)


def _quantized_paths(flat: Mapping[str, Any], spec: QuantSpec, analog_paths: Any) -> list[str]:
    """The paths of ``flat`` that ``spec`` quantizes: among ``analog_paths`` (the model's analog kernels; None:
    every leaf but the steps), those ``spec.weight_paths`` selects, in tree order."""
    allowed = None if analog_paths is None else set(_checks.names(analog_paths, "analog_paths",
                                                                 example="conv1/kernel"))
    return [p for p in flat if (allowed is None or p in allowed) and not p.endswith(WEIGHT_STEP)
            and not p.endswith(ACT_STEP) and _selected(p, spec.weight_paths)]


def quantize_params(params: Mapping[str, Any], spec: QuantSpec | None, *, analog_paths: Any = None) -> Any:
    """``params`` with every kernel selected by ``spec.weight_paths`` replaced by its quantized value ``W_q``
    (same object when ``spec`` is None or quantizes no weights). Learned steps are read from the sibling
    ``w_step`` leaf. ``analog_paths``: the leaves that may be quantized, the kernels of the model's analog layers
    (``model.analog_weight_paths``; ``Model.chip_weights`` passes it); None: every leaf (a bare tree)."""
    if spec is None or spec.weight_bits is None:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    out = dict(flat)
    hit = False
    for path in _quantized_paths(flat, spec, analog_paths):
        w = flat[path]
        hit = True
        step = flat.get(_join(_parent(path), WEIGHT_STEP)) if spec.learned_weight_step else None
        if spec.learned_weight_step and step is None:
            raise ValueError(f"parameter {path!r} is quantized with a learned step but has no "
                             f"{_join(_parent(path), WEIGHT_STEP)!r}: add the steps with "
                             f"jaxnoise.quant.init_steps(model, variables, images) (pretrained weights have none).")
        out[path] = quantize_weight(w, spec, step)
    if not hit:
        raise ValueError(f"QuantSpec.weight_paths={spec.weight_paths} selects no parameter, so nothing would be "
                         f"quantized; parameter paths: {_checks.listing(flat)}.")
    return traverse_util.unflatten_dict(out, sep="/")


def init_weight_steps(params: Mapping[str, Any], spec: QuantSpec, *, overwrite: bool = False,
                      analog_paths: Any = None) -> Any:
    """``params`` with a ``w_step`` beside every quantized kernel (learned steps only; ``analog_paths`` as in
    :func:`quantize_params`), started by ``spec.weight_step_init``; existing steps are kept unless ``overwrite``."""
    if not spec.learned_weight_step:
        return params
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    qp = levels(spec.weight_bits)[1]
    for path in _quantized_paths(flat, spec, analog_paths):   # a list: the loop adds steps to flat
        w = flat[path]
        name = _join(_parent(path), WEIGHT_STEP)
        if name in flat and not overwrite:
            continue
        flat[name] = step_statistic(jnp.asarray(w), spec.weight_step_init, qp, per_channel=spec.per_channel,
                                    percentile=spec.percentile, k_std=spec.k_std).astype(jnp.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def quantize_input(x: jax.Array, step: jax.Array, bits: int, signed: bool) -> jax.Array:
    """An MVM input quantized by LSQ with its learned ``step`` (N = features per example)."""
    qn, qp = levels(bits, signed)
    return lsq(x, step, qn, qp, int(np.prod(x.shape[1:])) if x.ndim > 1 else x.size)


def init_steps(model: Any, variables: Mapping[str, Any], images: Any = None, *, overwrite: bool = False,
               batch_size: int = 256) -> dict[str, Any]:
    """``variables`` with the learned steps ``model.quant`` needs: ``w_step`` from the weights, ``a_step`` from the
    inputs each quantized layer sees on ``images`` (preprocessed, float; the inputs of the model with quantized
    weights and float activations). Steps already present are kept unless ``overwrite``.

    Raises:
      ValueError: ``images`` missing while activation steps are needed, or a layer treated as unsigned whose
        calibration input is negative (list it in ``QuantSpec.act_signed_paths``).
    """
    spec = model.quant
    if spec is None:
        raise ValueError(f"model {model.name} has no quantization (build it with get_model(..., quant=QuantSpec(...))).")
    params = init_weight_steps(variables["params"], spec, overwrite=overwrite,
                               analog_paths=model.analog_weight_paths)
    out = dict(variables)
    out["params"] = params
    if spec.act_bits is None:
        return out
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    float_acts = dataclasses.replace(model, quant=dataclasses.replace(spec, act_bits=None))
    sites = [s for s in float_acts.sites if spec.quantizes_input(s)]
    todo = [s for s in sites if overwrite or _join(s, ACT_STEP) not in flat]
    if not sites:
        raise ValueError(f"QuantSpec.act_paths={spec.act_paths} selects no layer of {model.name}; its layers: "
                         f"{_checks.listing(float_acts.sites)}.")
    if not todo:
        return out
    if images is None:
        raise ValueError("activation quantization needs calibration images to start its steps: "
                         "init_steps(model, variables, images) with a few hundred preprocessed training images.")
    images = jnp.asarray(images)
    stats: dict[str, list[Any]] = {s: [] for s in todo}
    fn = jax.jit(lambda v, x: float_acts.apply(v, x, capture_mvm=True).captured.inputs)
    for i in range(0, images.shape[0], batch_size):
        inputs = fn(out, images[i:i + batch_size])
        for s in todo:
            stats[s].append(np.asarray(inputs[s]))
    for s in todo:
        x = np.concatenate(stats[s])
        signed = spec.input_signed(s)
        if not signed and float(x.min()) < 0:
            raise ValueError(f"layer {s!r} gets negative inputs (min {float(x.min()):.3g}) but is quantized as "
                             f"unsigned: add it to QuantSpec.act_signed_paths (e.g. {('^' + re.escape(s) + '$',)}) "
                             f"or leave it out of act_paths.")
        flat[_join(s, ACT_STEP)] = step_statistic(jnp.asarray(x), spec.act_step_init, levels(spec.act_bits, signed)[1],
                                                  percentile=spec.percentile, k_std=spec.k_std).astype(jnp.float32)
    out["params"] = traverse_util.unflatten_dict(flat, sep="/")
    return out


def noise_ratios(params: Mapping[str, Any], spec: QuantSpec, eta: float, *,
                 analog_paths: Any = None) -> dict[str, dict[str, float]]:
    """Per quantized kernel: how big additive noise ``eta * max|W_q|`` is against the quantized weights.

    Returns ``{path: {"sigma_over_rms": eta max|W_q| / rms(W_q), "max_over_rms": max|W_q| / rms(W_q),
    "clip_over_percentile": Q_p s / percentile(|w|, spec.percentile), "clipped_fraction": share of |w| > Q_p s}}``
    (the last two describe where the step put the clip). For reading noise scales across conventions: on float
    weights ``max|W| / rms(W)`` is ~6, so 0.2 max|W| is more noise than signal."""
    q = quantize_params(params, spec, analog_paths=analog_paths)
    flat, qflat = (traverse_util.flatten_dict(t, sep="/") for t in (params, q))
    qp = levels(spec.weight_bits)[1]
    out = {}
    for path in _quantized_paths(qflat, spec, analog_paths):
        wq = qflat[path]
        w, wq = np.asarray(flat[path], np.float64), np.asarray(wq, np.float64)
        rms = float(np.sqrt(np.mean(wq ** 2))) or 1.0
        top = float(np.max(np.abs(wq)))
        clip = (np.max(np.abs(wq), axis=tuple(range(w.ndim - 1))) if spec.per_channel else top)
        step_clip = np.asarray(clip)   # the largest used level; the clip itself when some weight reaches it
        if spec.learned_weight_step:
            step_clip = np.asarray(flat[_join(_parent(path), WEIGHT_STEP)], np.float64) * qp
        pct = np.percentile(np.abs(w), spec.percentile, axis=_reduce_axes(w, spec.per_channel))
        out[path] = {"sigma_over_rms": eta * top / rms, "max_over_rms": top / rms,
                     "clip_over_percentile": float(np.median(step_clip / np.where(pct > 0, pct, 1.0))),
                     "clipped_fraction": float(np.mean(np.abs(w) > np.broadcast_to(step_clip, w.shape[-1:]
                                                                                   if spec.per_channel else ())))}
    return out
