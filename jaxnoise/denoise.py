"""Denoising blocks inserted into a frozen model (Azizi et al. 2024), with the placement as array data.

A **denoised model** (:func:`denoised`) is a ``jaxnoise.models.Model`` that runs the backbone unchanged and, at
each candidate site (a named feature: the stem, every residual block output, ``pre_logits``), adds a small
block's correction::

    out_s = h_s + gate_s * delta_s(h_s)

* ``gate_s`` is the placement: a float32 scalar leaf ``params["denoise"][...site...]["gate"]`` (1 placed, 0 not).
  It is data, so one compiled program serves every placement and ``jax.vmap`` runs many placements at once
  (:func:`with_placement`). With ``gate_s = 0`` the output is ``h_s`` exactly.
* ``delta_s`` is zero when the block is fresh (its last layer is zero-initialised), so a freshly inserted block
  leaves the network's outputs bit-identical.
* Blocks are **digital** (the paper's dedicated engine): built with ``Scope.digital_dense``/``digital_conv``,
  they register as digital layers, so no weight noise, quantization, device mapping or weight decay reaches them
  and they have no activation-noise site. (Their leaves are named ``w``/``b``, as in checkpoints written before
  the layer registry.) They are inserted as the model's ``taps`` (one per site), an argument of the model, not a
  change to its forward function. The backbone keeps its parameter paths and site names, hence its noise keys:
  inserting a block changes no noise draw elsewhere.

Kinds (``DenoiserConfig.kind``):

* ``residual``: bottleneck ``1x1 conv C->b, ReLU, 3x3 conv b->b, ReLU, 1x1 conv b->C`` (dense layers on 2-D
  features), biases throughout; ``delta = last layer``.
* ``probabilistic``: the same trunk, plus two per-channel heads on the globally pooled bottleneck that predict
  the noise left at the site, mean ``m_c`` and log-variance ``v_c`` (in the units of ``h``); it denoises with
  them: ``delta = -m + g * r``, where ``r`` is the trunk's correction and ``g = s2 / (s2 + var_c)`` the
  fraction of the channel's variance that the block believes is noise (``s2 = exp(v)``, ``var_c`` the spatial
  variance of the input channel, or ``h^2`` for 2-D features). With ``nll_weight > 0`` the loss
  (:func:`denoiser_loss`) fits ``(m, s2)`` to the actual noise ``h_noisy - h_clean`` by Gaussian likelihood.

Training (:func:`denoiser_loss`, :func:`train_denoisers`): only the block parameters (not the gates) are trained,
the backbone is frozen (``jaxnoise.train`` with ``trainable=is_denoiser_param``: bitwise unchanged) and its
BatchNorm runs in inference mode; loss = cross-entropy under activation noise (optionally weight noise) plus an
optional feature-matching term to the clean backbone.

References:
  Azizi, Sadeghi, Kamal, Pedram, "Efficient Noise Mitigation for Enhancing Inference Accuracy in DNNs on
  Mixed-Signal Accelerators", arXiv:2409.18553 (2024). The block's exact form is not published; the bottleneck and
  the probabilistic (mean/variance) variant follow the paper's description (``../shared/PAPERS.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxnoise import _checks, engine, methods
from jaxnoise import noise as noise_lib
from jaxnoise import train as train_lib
from jaxnoise.models.base import Model
from jaxnoise.models.layers import Scope, he_normal, ones, zeros

KINDS = ("residual", "probabilistic")
DENOISE_KEY = "denoise"  # the params subtree of the blocks
GATE = "gate"


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
    """Shape of the denoising blocks.

    Attributes:
      kind: ``"residual"`` or ``"probabilistic"`` (module docstring).
      reduction: the bottleneck width of a block at a site with ``C`` channels is
        ``max(min_width, ceil(C / reduction))``: its parameter cost falls roughly as ``1 / reduction``.
      min_width: smallest bottleneck width.
    """

    kind: str = "residual"
    reduction: int = 4
    min_width: int = 4

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown denoiser kind {self.kind!r}; choose one of {KINDS}.")
        for name in ("reduction", "min_width"):
            _checks.positive_int(getattr(self, name), f"DenoiserConfig.{name}")

    def width(self, channels: int) -> int:
        """Bottleneck width at a site with ``channels`` channels."""
        return max(int(self.min_width), -(-int(channels) // int(self.reduction)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# The blocks


BLOCK_LEAVES = ("w", "b")   # the blocks' kernel and bias leaf names (checkpoints since the first blocks)


def _dense(s: Scope, name: str, x, features: int, init=he_normal):
    return s.digital_dense(name, x, features, init=init, leaves=BLOCK_LEAVES)


def _conv3x3(s: Scope, name: str, x, features: int):
    return s.digital_conv(name, x, features, kernel_size=3, padding=1, init=he_normal, leaves=BLOCK_LEAVES)


def _trunk(s: Scope, h, width: int):
    """Bottleneck: 1x1 C->b, ReLU, 3x3 (or dense) b->b, ReLU. Returns the bottleneck activations."""
    u = jax.nn.relu(_dense(s, "down", h, width))
    if h.ndim == 4:
        return jax.nn.relu(_conv3x3(s, "mid", u, width))
    return jax.nn.relu(_dense(s, "mid", u, width))


def block_delta(s: Scope, h: jax.Array, config: DenoiserConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One block's correction ``delta(h)`` (zero when fresh) and its auxiliary outputs.

    Args:
      s: the block's scope (its parameters live under it).
      h: the feature, (B, H, W, C) or (B, C).
      config: the block shape.

    Returns:
      ``(delta, aux)``: delta like ``h``; aux ``{}`` for ``residual``, and for ``probabilistic``
      ``{"mean", "log_var"}`` of shape (B, C), the predicted per-channel noise mean and log-variance.
    """
    c = h.shape[-1]
    u = _trunk(s, h, config.width(c))
    r = _dense(s, "up", u, c, init=zeros)
    if config.kind == "residual":
        return r, {}
    pooled = jnp.mean(u, axis=(1, 2)) if h.ndim == 4 else u
    mean = _dense(s, "noise_mean", pooled, c, init=zeros)
    log_var = _dense(s, "noise_log_var", pooled, c, init=zeros)
    if h.ndim == 4:
        var_signal = jnp.var(h, axis=(1, 2))[:, None, None, :]
        m, v = mean[:, None, None, :], log_var[:, None, None, :]
    else:
        var_signal = jnp.square(h)
        m, v = mean, log_var
    s2 = jnp.exp(v)
    gain = s2 / (s2 + var_signal + 1e-12)
    return -m + gain * r, {"mean": mean, "log_var": log_var}


def _block_scope(root: Scope, site: str) -> Scope:
    s = root.child(DENOISE_KEY)
    for part in site.split("/"):
        s = s.child(part)
    return s


# ----------------------------------------------------------------------------------------------------------------
# The denoised model


@dataclasses.dataclass(frozen=True)
class DenoisedModel(Model):
    """A :class:`~jaxnoise.models.Model` with denoising blocks at ``candidate_sites`` (see the module docstring).

    Attributes (beyond ``Model``'s):
      backbone: the plain model.
      candidate_sites: sites that carry a block (its gate decides whether it acts), in forward order.
      denoiser: the block shape.
    """

    backbone: Model | None = None
    candidate_sites: tuple[str, ...] = ()
    denoiser: DenoiserConfig = DenoiserConfig()


def denoised(model: Model, sites: Sequence[str] | None = None,
             config: DenoiserConfig | None = None) -> DenoisedModel:
    """The model with a denoising block at every site of ``sites`` (all gates 1 after ``init``).

    Args:
      model: the backbone (any ``jaxnoise.models`` model).
      sites: names from ``model.tap_names``; default ``model.feature_names`` (for the CIFAR ResNets: ``stem``,
        every residual block output, ``pre_logits``). ``tap_names`` adds the points inside each residual branch
        (``"layer1/0/mid"``: after conv1, before conv2), where a block cleans the branch before its second MVM.
      config: the block shape (default :class:`DenoiserConfig`).

    Returns:
      A :class:`DenoisedModel`. Its variables are the backbone's plus ``params["denoise"]``; build them with
      :func:`init_variables` from trained backbone variables.

    Examples:
      >>> dmodel = denoised(model)                                   # a block at every feature
      >>> dvars = init_variables(dmodel, variables, jax.random.key(0))
      >>> dvars = with_placement(dmodel, dvars, {"layer3/0": 1.0})   # only one block acts
    """
    config = config or DenoiserConfig()
    if isinstance(model, DenoisedModel):
        raise ValueError("model already has denoising blocks: pass its backbone (dmodel.backbone).")
    available = tuple(model.tap_names)
    sites = tuple(model.feature_names) if sites is None else _checks.names(
        sites, "sites", example=available[0] if available else None)
    if not sites:
        raise ValueError(f"sites is empty: choose among {list(available)}.")
    unknown = [s for s in sites if s not in available]
    if unknown:
        raise ValueError(f"unknown denoiser sites {unknown} for {model.name}; choose among {list(available)}.")
    if len(set(sites)) != len(sites):
        raise ValueError(f"sites {list(sites)} lists a site twice.")
    ordered = tuple(s for s in available if s in sites)

    def block(root: Scope, name: str, h):
        s = _block_scope(root, name)
        gate = s.param(GATE, (), ones)
        delta, extra = block_delta(s, h, config)
        if extra:   # Output.aux of the pass
            root.tap_outputs[name] = {"input": h, **extra}
        return h + gate.astype(h.dtype) * delta

    # Every Model field of the backbone carries over (quantization, learned input ranges, ...); name, config and taps
    # become the denoised model's own.
    inherited = {f.name: getattr(model, f.name) for f in dataclasses.fields(Model)}
    return DenoisedModel(**{**inherited, "name": f"{model.name}+denoise", "input_shape": tuple(model.input_shape),
                            "config": {**dict(model.config), "backbone": model.name, "denoiser": config.to_dict(),
                                       "denoiser_sites": list(ordered)},
                            "taps": {**dict(model.taps or {}), **{site: block for site in ordered}}},
                         backbone=model, candidate_sites=ordered, denoiser=config)


def is_denoiser_param(path: str) -> bool:
    """True for the trainable block leaves (``denoise/.../w|b``), False for gates and the backbone."""
    return path.startswith(DENOISE_KEY + "/") and not path.endswith("/" + GATE)


def init_variables(dmodel: DenoisedModel, backbone_variables: Mapping[str, Any], key: jax.Array,
                   placement: Any = None) -> dict[str, Any]:
    """The backbone's variables plus fresh blocks (keys by path from ``key``) and the gates of ``placement``.

    Args:
      dmodel: from :func:`denoised`.
      backbone_variables: trained ``{"params", "batch_stats"}`` of ``dmodel.backbone``.
      key: initialisation key of the blocks.
      placement: see :func:`with_placement`; None places a block at every candidate site.

    Returns:
      ``{"params": backbone params + {"denoise": ...}, "batch_stats": backbone statistics}``.
    """
    fresh = dmodel.init(key)
    params = dict(backbone_variables["params"])
    if DENOISE_KEY in params:
        raise ValueError(f"the backbone variables already hold a {DENOISE_KEY!r} subtree: pass the plain "
                         f"backbone's variables.")
    params[DENOISE_KEY] = fresh["params"][DENOISE_KEY]
    variables = {"params": params, "batch_stats": backbone_variables.get("batch_stats", {}) or {}}
    return variables if placement is None else with_placement(dmodel, variables, placement)


def placement_array(dmodel: DenoisedModel, placement: Any) -> jax.Array:
    """The placement as a float32 vector over ``dmodel.candidate_sites``.

    Args:
      placement: a sequence of site names (placed = 1), a ``{site: gate}`` mapping (others 0), or an array of
        shape (n_sites,) (or (..., n_sites) for batches of placements).
    """
    sites = dmodel.candidate_sites
    if isinstance(placement, str):
        raise ValueError(f"placement={placement!r} is a bare string, which would be read per character: pass a tuple "
                         f"of sites, placement=({placement!r},), or {{site: gate}}.")
    if isinstance(placement, Mapping):
        unknown = set(placement) - set(sites)
        if unknown:
            raise ValueError(f"placement names sites without a block: {sorted(unknown)}; candidates: {list(sites)}.")
        return jnp.asarray([placement.get(s, 0.0) for s in sites], jnp.float32)
    if isinstance(placement, (list, tuple)) and all(isinstance(p, str) for p in placement):
        unknown = set(placement) - set(sites)
        if unknown:
            raise ValueError(f"placement names sites without a block: {sorted(unknown)}; candidates: {list(sites)}.")
        return jnp.asarray([1.0 if s in placement else 0.0 for s in sites], jnp.float32)
    arr = jnp.asarray(placement, jnp.float32)
    if arr.ndim < 1 or arr.shape[-1] != len(sites):
        raise ValueError(f"a placement array needs a last axis of {len(sites)} (one gate per candidate site "
                         f"{list(sites)}), got shape {arr.shape}.")
    return arr


def with_placement(dmodel: DenoisedModel, variables: Mapping[str, Any], placement: Any) -> dict[str, Any]:
    """``variables`` with the gates set from ``placement`` (traceable: vmap it over a batch of placements).

    Args:
      dmodel: the denoised model.
      variables: its variables.
      placement: see :func:`placement_array` (one placement).

    Returns:
      New variables; the backbone leaves are the same objects.
    """
    gates = placement_array(dmodel, placement)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    for i, site in enumerate(dmodel.candidate_sites):
        flat[f"{DENOISE_KEY}/{site}/{GATE}"] = gates[..., i]
    return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}


def placement_of(dmodel: DenoisedModel, variables: Mapping[str, Any]) -> np.ndarray:
    """The gates of ``variables`` as a float vector over ``dmodel.candidate_sites``."""
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return np.asarray([float(flat[f"{DENOISE_KEY}/{s}/{GATE}"]) for s in dmodel.candidate_sites], np.float32)


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(backbone_params, denoise_subtree)``."""
    params = dict(params)
    return {k: v for k, v in params.items() if k != DENOISE_KEY}, params.get(DENOISE_KEY, {})


# ----------------------------------------------------------------------------------------------------------------
# Counts


def feature_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """Shape of the value at each tap point (``model.tap_names``: the features and the inner points) for one
    example: (H, W, C) or (C,)."""
    variables = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.float32)
    shapes: dict[str, tuple[int, ...]] = {}

    def run(v, x):
        def tap(root, name, h):
            shapes[name] = tuple(h.shape[1:])
            return h
        return model.apply(v, x, tap=tap)[0]

    jax.eval_shape(run, variables, x)
    return shapes


def block_shapes(dmodel: DenoisedModel, sites: Sequence[str] | None = None) -> list[engine.BlockShape]:
    """The :class:`jaxnoise.engine.BlockShape` of the block at each site (default: every candidate)."""
    shapes = feature_shapes(dmodel.backbone)
    out = []
    for site in (dmodel.candidate_sites if sites is None else sites):
        shape = shapes[site]
        spatial = len(shape) == 3
        h, w = (shape[0], shape[1]) if spatial else (1, 1)
        c = shape[-1]
        out.append(engine.BlockShape(site=site, height=h, width=w, channels=c, bottleneck=dmodel.denoiser.width(c),
                                     kind=dmodel.denoiser.kind, spatial=spatial))
    return out


def site_costs(dmodel: DenoisedModel) -> dict[str, dict[str, int]]:
    """``{site: {"params", "macs"}}`` of the block at each candidate site, counted from its parameter shapes.

    ``params``: every ``w``/``b`` leaf of the block (the gate excluded). ``macs`` per image: each weight ``w`` of
    a layer applied at every position of the feature map (``H * W * prod(w.shape)``), except the probabilistic
    heads, which act once on the pooled bottleneck (``prod(w.shape)``); elementwise operations are not MACs.
    """
    abstract = jax.eval_shape(dmodel.init, jax.random.key(0))["params"][DENOISE_KEY]
    flat = traverse_util.flatten_dict(abstract, sep="/")
    shapes = feature_shapes(dmodel.backbone)
    out = {}
    for site in dmodel.candidate_sites:
        positions = int(np.prod(shapes[site][:-1])) if len(shapes[site]) == 3 else 1
        params = macs = 0
        for path, leaf in flat.items():
            if not path.startswith(site + "/") or path.count("/") != site.count("/") + 2:
                continue
            layer, name = path.split("/")[-2:]
            size = int(np.prod(leaf.shape))
            params += size
            if name == "w":
                macs += size if layer.startswith("noise_") else positions * size
        out[site] = {"params": params, "macs": macs}
    return out


def analog_layers(model: Model) -> list[engine.AnalogLayer]:
    """The backbone's analog MVM layers (every activation site) as :class:`jaxnoise.engine.AnalogLayer`."""
    variables = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.float32)
    captured = jax.eval_shape(lambda v, x: model.apply(v, x, capture_mvm=True), variables, x).captured
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    layers = []
    for site, y in captured.outputs.items():
        kernel = flat[f"{site}/kernel"]
        rows = int(np.prod(kernel.shape[:-1]))
        mvms = int(np.prod(y.shape[1:-1])) if len(y.shape) > 2 else 1
        layers.append(engine.AnalogLayer(name=site, rows=rows, cols=int(kernel.shape[-1]), mvms_per_image=mvms))
    return layers


def backbone_mvm_macs(model: Model) -> int:
    """MACs per image of the model's analog MVMs (every conv/dense kernel at every output position)."""
    return int(sum(layer.rows * layer.cols * layer.mvms_per_image for layer in analog_layers(model)))


def overhead(dmodel: DenoisedModel, placement: Any) -> dict[str, float]:
    """Parameter and MAC overhead of a placement relative to the backbone.

    Returns:
      ``{"params", "macs", "param_overhead", "mac_overhead"}``: block parameters (gates excluded), block MACs
      per image, and their ratios to the backbone's trainable parameters (``Model.param_count``) and analog MVM
      MACs per image.
    """
    gates = np.asarray(placement_array(dmodel, placement))
    costs = site_costs(dmodel)
    params = sum(costs[s]["params"] for s, g in zip(dmodel.candidate_sites, gates) if g)
    macs = sum(costs[s]["macs"] for s, g in zip(dmodel.candidate_sites, gates) if g)
    backbone_macs = backbone_mvm_macs(dmodel.backbone)
    return {"params": int(params), "macs": int(macs), "param_overhead": params / dmodel.backbone.param_count(),
            "mac_overhead": macs / backbone_macs}


# ----------------------------------------------------------------------------------------------------------------
# Training


def denoiser_loss(dmodel: DenoisedModel, *, act_eta_train: float, act_kind: str | None = "additive",
                  act_ref: Mapping[str, Any] | None = None, act_mask: Mapping[str, Any] | None = None,
                  eta_train: float = 0.0, weight_kind: str | None = None, weight_paths: Sequence[str] | None = None,
                  feature_weight: float = 0.0, feature_sites: Sequence[str] | str | None = None,
                  nll_weight: float = 0.0, kl_weight: float = 0.0, act_eta_spread: float = 0.0,
                  sampler: str | None = None) -> methods.Loss:
    """The loss of denoiser training: frozen backbone in inference mode, one noise draw per step.

    ``loss = CE(noisy denoised logits, y) + feature_weight * mean_s nmse(f_s(noisy denoised), f_s(clean backbone))
    + kl_weight * KL(softmax(clean backbone logits) || softmax(noisy denoised logits)) + nll_weight * mean_s
    NLL_s``, where ``NLL_s`` (probabilistic blocks only) is the Gaussian negative log-likelihood of the noise
    reaching the block, ``h_in - h_clean``, under the block's predicted per-channel mean and variance, weighted by
    the gates. The clean backbone runs only when a term needs it.

    With ``act_eta_spread = r > 0`` each step draws its activation-noise scale uniformly from
    ``act_eta_train * [1 - r, 1 + r]`` (key ``name_key(key, "jaxnoise/denoise/act_eta")``, independent of the
    noise draws), so the blocks learn a range of levels instead of one.

    Args:
      dmodel: the denoised model.
      act_eta_train: activation-noise scale of training (``hparams["act_eta_train"]``).
      act_kind: a key of ``jaxnoise.noise.ACTIVATION_KINDS`` (None: no activation noise).
      act_ref: calibrated ``{site: r_site}`` (additive noise).
      act_mask: optional ``{site: multiplier}`` of the activation noise (``NoiseSpec.act_mask``).
      eta_train: weight-noise scale (``hparams["eta_train"]``, when ``weight_kind`` is set).
      weight_kind: optional weight noise on the backbone (blocks are digital and never noisy).
      weight_paths: regexes of the noisy backbone parameters.
      feature_weight: default weight of the feature-matching term (``hparams["feature_weight"]``).
      feature_sites: tap points matched; default every candidate site. ``"placed"``: the placed blocks' outputs,
        i.e. the mean over candidate sites weighted by their gates (read from ``params``, so one loss serves
        vmapped placements; with gates 0/1 it is the mean over the placed sites).
      nll_weight: default weight of the noise-likelihood term (``hparams["nll_weight"]``).
      kl_weight: default weight of the KL term to the clean backbone's predictions (``hparams["kl_weight"]``).
      act_eta_spread: relative half-width of the per-step activation-noise scale, in [0, 1) (0: fixed).
      sampler: the normals of the training noise (``NoiseSpec.sampler``; None: the backend's default,
        ``"threefry/icdf16"`` for activation noise on CPU). ``"threefry/erfinv"`` gives the draws of the code
        before samplers could be chosen.

    Returns:
      ``loss_fn(params, batch_stats, images, labels, key, hparams)`` for ``jaxnoise.train`` (it returns
      ``batch_stats`` unchanged), metrics ``{"ce"}`` plus ``"feature"``, ``"kl"``, ``"nll"`` when they are
      computed and ``"act_eta"`` when it is drawn.
    """
    if not isinstance(dmodel, DenoisedModel):
        raise ValueError("denoiser_loss needs a denoised model: build it with jaxnoise.denoise.denoised(model).")
    spec = noise_lib.NoiseSpec(act_kind=act_kind, act_ref=act_ref, act_mask=act_mask, weight_kind=weight_kind,
                               sampler=sampler, **({} if weight_paths is None else
                                  {"weight_paths": _checks.names(weight_paths, "weight_paths", example="kernel")}))
    placed_only = isinstance(feature_sites, str) and feature_sites == "placed"
    feature_sites = (tuple(dmodel.candidate_sites) if feature_sites is None or placed_only
                     else _checks.names(feature_sites, "feature_sites", example=dmodel.candidate_sites[0]))
    unknown = [s for s in feature_sites if s not in dmodel.backbone.tap_names]
    if unknown:
        raise ValueError(f"unknown feature sites {unknown}; choose among {list(dmodel.backbone.tap_names)}.")
    if nll_weight and dmodel.denoiser.kind != "probabilistic":
        raise ValueError("nll_weight > 0 needs probabilistic blocks (DenoiserConfig(kind='probabilistic')): "
                         "residual blocks predict no noise distribution.")
    # The selectors must name parts of the backbone (weight_paths, act_mask sites, act_ref of additive noise).
    noise_lib.check_spec(spec, jax.eval_shape(dmodel.backbone.init, jax.random.key(0))["params"],
                         dmodel.backbone.sites, analog_paths=dmodel.backbone.analog_weight_paths)
    act_eta_spread = _checks.number(act_eta_spread, "act_eta_spread")
    if act_eta_spread >= 1.0:
        raise ValueError(f"act_eta_spread={act_eta_spread} must be < 1: the scale is drawn from "
                         f"act_eta_train * [1 - spread, 1 + spread], which must stay positive.")
    if act_eta_spread and not act_kind:
        raise ValueError("act_eta_spread > 0 needs activation noise (act_kind).")
    defaults = {"feature_weight": _checks.number(feature_weight, "feature_weight"),
                "nll_weight": _checks.number(nll_weight, "nll_weight"),
                "kl_weight": _checks.number(kl_weight, "kl_weight")}
    if act_kind:
        defaults["act_eta_train"] = _checks.number(act_eta_train, "act_eta_train")
    if weight_kind:
        defaults["eta_train"] = _checks.number(eta_train, "eta_train")
    need_clean = bool(feature_weight) or bool(nll_weight) or bool(kl_weight)
    sites_list = dmodel.candidate_sites

    def loss_fn(params, batch_stats, images, labels, key, hparams):
        metrics = {}
        act_eta = hparams["act_eta_train"] if act_kind else 0.0
        if act_eta_spread:
            u = jax.random.uniform(noise_lib.name_key(key, "jaxnoise/denoise/act_eta"), (), minval=-1.0, maxval=1.0)
            act_eta = act_eta * (1.0 + act_eta_spread * u)
            metrics["act_eta"] = act_eta
        noisy_spec = spec.replace(act_eta=act_eta, weight_eta=hparams["eta_train"] if weight_kind else 0.0)
        variables = {"params": params, "batch_stats": batch_stats}
        noisy_at, noisy_tap = _recorder()   # values at every tap point (inner ones are not returned features)
        out = dmodel.apply(variables, images, key=key, noise=noisy_spec, tap=noisy_tap)
        logits = out.logits
        ce = methods.cross_entropy(logits, labels)
        loss = ce
        metrics["ce"] = ce
        if need_clean:
            backbone_params, _ = split_params(params)
            clean, clean_tap = _recorder()
            clean_logits = dmodel.backbone.apply(
                jax.lax.stop_gradient({"params": backbone_params, "batch_stats": batch_stats}), images,
                tap=clean_tap).logits
            if feature_weight:
                dists = [methods.feature_distance(noisy_at[s], clean[s]) for s in feature_sites]
                if placed_only:   # gate-weighted: the placed blocks' outputs only
                    flat_p = traverse_util.flatten_dict(params, sep="/")
                    g = [jax.lax.stop_gradient(flat_p[f"{DENOISE_KEY}/{s}/{GATE}"]) for s in feature_sites]
                    fm = sum(gi * d for gi, d in zip(g, dists)) / jnp.maximum(sum(g), 1.0)
                else:
                    fm = sum(dists) / len(dists)
                loss = loss + hparams["feature_weight"] * fm
                metrics["feature"] = fm
            if kl_weight:
                p_clean = jax.nn.softmax(clean_logits)
                kl = jnp.mean(jnp.sum(p_clean * (jax.nn.log_softmax(clean_logits) - jax.nn.log_softmax(logits)),
                                      axis=-1))
                loss = loss + hparams["kl_weight"] * kl
                metrics["kl"] = kl
            if nll_weight and dmodel.denoiser.kind == "probabilistic":
                aux = out.aux
                flat = traverse_util.flatten_dict(params, sep="/")
                terms = []
                for s in sites_list:
                    a = aux[s]
                    noise_in = jax.lax.stop_gradient(a["input"] - clean[s])
                    if noise_in.ndim == 4:  # per (image, channel): mean square over positions
                        resid2 = jnp.mean(jnp.square(noise_in - a["mean"][:, None, None, :]), axis=(1, 2))
                    else:
                        resid2 = jnp.square(noise_in - a["mean"])
                    # Gaussian NLL of the noise under (mean, exp(log_var)), constant dropped.
                    nll = 0.5 * jnp.mean(resid2 * jnp.exp(-a["log_var"]) + a["log_var"])
                    terms.append(jax.lax.stop_gradient(flat[f"{DENOISE_KEY}/{s}/{GATE}"]) * nll)
                nll = sum(terms) / len(terms)
                loss = loss + hparams["nll_weight"] * nll
                metrics["nll"] = nll
        return loss, (logits, batch_stats, metrics)

    return methods.Loss(loss_fn, "denoiser",
                        {"noise": {"act_kind": act_kind, "weight_kind": weight_kind,
                                   "weight_paths": list(spec.weight_paths), "prng": methods.sampler_record(spec)},
                         "feature_sites": "placed" if placed_only else list(feature_sites),
                         "denoiser": dmodel.denoiser.to_dict(),
                         "act_eta_spread": act_eta_spread}, defaults)


def _recorder():
    """``(values, tap)``: a tap hook that records the value flowing on at every tap point into ``values``."""
    values: dict[str, jax.Array] = {}

    def tap(root, name, h):
        values[name] = h
        return h

    return values, tap


def train_denoisers(dmodel: DenoisedModel, dataset: Any, config: train_lib.TrainConfig, *, workdir: str,
                    variables: Mapping[str, Any], loss_fn: train_lib.LossFn, progress: bool = True,
                    max_steps: int | None = None, metadata: Mapping[str, Any] | None = None,
                    hparams: Mapping[str, float] | None = None,
                    portable_checkpoint: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains the placed blocks of ``variables`` with the backbone (and the gates) frozen, via ``jaxnoise.train``.

    Checkpoints, resume and ``metrics.jsonl`` are those of :func:`jaxnoise.train.train` (its ``test_accuracy``
    is the noise-free accuracy of the denoised model). The placement is recorded in the metadata.

    Args:
      dmodel: the denoised model.
      dataset: a ``jaxnoise.data.Dataset``.
      config: the schedule (SGD with momentum; weight decay applies to ``kernel`` leaves only, so not to blocks).
      workdir: the run directory.
      variables: from :func:`init_variables` (with the placement set).
      loss_fn: from :func:`denoiser_loss`.
      progress, max_steps, metadata, hparams, portable_checkpoint: as in :func:`jaxnoise.train.train` (the
        portable checkpoint then holds the blocks and their optimizer slots only: the backbone is frozen).

    Returns:
      ``(variables, history)``.
    """
    gates = placement_of(dmodel, variables)
    meta = {"placement": dict(zip(dmodel.candidate_sites, map(float, gates))),
            "overhead": overhead(dmodel, gates), **(metadata or {})}
    return train_lib.train(dmodel, dataset, config, workdir=workdir, variables=variables, loss_fn=loss_fn,
                           progress=progress, max_steps=max_steps, metadata=meta, hparams=hparams,
                           trainable=is_denoiser_param, portable_checkpoint=portable_checkpoint)


__all__ = ["DENOISE_KEY", "DenoisedModel", "DenoiserConfig", "GATE", "KINDS", "analog_layers", "block_delta",
           "block_shapes", "denoised", "denoiser_loss", "feature_shapes", "init_variables", "is_denoiser_param",
           "overhead", "placement_array", "placement_of", "site_costs", "split_params", "train_denoisers",
           "with_placement"]
