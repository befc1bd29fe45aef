"""Noise-aware training losses: clean, forward-noise (noise injection) and consistency regularisation.

Every factory returns a :class:`Loss` for :func:`jaxnoise.train.make_train_step` / :func:`jaxnoise.train.train`,
callable as::

    loss_fn(params, batch_stats, images, labels, key, hparams) -> (loss, (logits, new_batch_stats, metrics))

* ``key`` is the step's loss key; noise draw ``k`` of the step uses ``fold_in(key, k)`` (the forward pass key of
  ``Model.apply``: weight noise from ``weight_key``, activation noise from ``activation_key``). Forward-noise and
  consistency draw the *same* noise for the same key, so ``lambda = 0`` reproduces forward-noise exactly.
* ``hparams`` is a dict of float32 scalars, passed to the jitted step as array data: a new ``eta_train`` or
  ``lambda`` reuses the compiled step. A :class:`Loss` carries its method ``name``, its defaults ``hparams`` and a
  JSON-ready description ``config`` (all recorded in checkpoint metadata); a plain function is a loss too
  (:func:`as_loss`: its ``__name__``, no config, no hyperparameters).

**K noise draws per step** (``n_draws``): the K noisy forward passes run in chunks of ``draw_batch_size``, each
chunk one ``vmap`` over its draws, the chunks unrolled in the one compiled step (``draw_batch_size = K``: a
single ``vmap``; ``1``: K plain passes one after another). On CPU a ``vmap`` over draws with different kernels
lowers to a grouped convolution that is much slower than sequential passes, and a ``lax.map``/``scan`` over draws
made the convolution gradients ~20x slower still (``python benchmarks/train_step.py --scan-check``), so the default
is 1 on CPU and K elsewhere (:func:`default_draw_batch_size`). The loss is the mean over draws of the per-draw loss.

**BatchNorm under K draws** (the choice, tested in ``tests/test_methods.py``): every draw is a full training-mode
forward pass, so each noisy network normalises with the batch statistics of *its own* noisy activations (that is
how a chip's network behaves on a batch). The running statistics kept after the step are the mean over the K draws
of the per-draw updated running statistics; because the update is an exponential moving average, this equals one
update with the batch mean and variance averaged over the draws. The running statistics therefore track the noisy
networks the model will be deployed on. The clean pass of the consistency loss also runs in training mode (its
features are then comparable with the noisy ones) but its statistics are discarded.

References:
  Joshi et al., "Accurate deep neural network inference using computational phase-change memory", Nature
  Communications 11, 2473 (2020) (forward-noise training with sigma = eta * max|W|).
  Hou, Zhang, Wang, Wu, "Improving model robustness to weight noise via consistency regularization", Machine
  Learning: Science and Technology 5, 035065 (2024).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnoise import _checks
from jaxnoise import analog as analog_lib
from jaxnoise import noise as noise_lib

METHODS = ("clean", "forward_noise", "consistency")
DISTANCES = {
    "nmse": "sum((f_noisy - f_clean)^2) / stop_gradient((sum(f_noisy^2) + sum(f_clean^2)) / 2), sums over the "
            "batch and the feature: the MSE normalised by the features' energy, so every site counts on the "
            "same scale",
    "cosine": "1 - cos(f_noisy, f_clean) per example (features flattened), mean over the batch",
    "logit_kl": "KL(softmax(clean logits) || softmax(noisy logits)) per example, mean over the batch; site 'logits'",
}
LOGITS_SITE = "logits"  # the model output, usable as a consistency site
NMSE_EPS = 1e-8

LossFn = Callable[..., tuple[jax.Array, tuple[jax.Array, Any, dict[str, jax.Array]]]]


@dataclasses.dataclass(frozen=True, eq=False)
class Loss:
    """A training loss and what describes it.

    A frozen dataclass compared and hashed by identity (the compiled train step is cached per loss object), not a
    NamedTuple: a tuple would be a JAX pytree and its dict ``config`` would make it unhashable.

    Attributes:
      fn: ``fn(params, batch_stats, images, labels, key, hparams) -> (loss, (logits, new_batch_stats, metrics))``.
      name: the method (``"clean"``, ``"forward_noise"``, ``"consistency"``, ``"denoiser"``, ...).
      config: a JSON-ready description (noise kinds and samplers, sites, distance, ...), recorded in checkpoints.
      hparams: the default hyperparameters ``{name: float}``; the step receives them as float32 arrays.

    Example::

      >>> import jax.numpy as jnp
      >>> def mse(params, batch_stats, images, labels, key, hparams):
      ...     out = images @ params["w"]
      ...     return jnp.mean((out - labels) ** 2) * hparams["scale"], (out, batch_stats, {})
      >>> loss = Loss(mse, "mse", {"kind": "toy"}, {"scale": 1.0})
      >>> float(loss({"w": jnp.ones((2, 1))}, {}, jnp.ones((3, 2)), jnp.zeros((3, 1)), None, {"scale": 0.5})[0])
      2.0
      >>> loss.replace(hparams={"scale": 2.0}).hparams
      {'scale': 2.0}
    """

    fn: LossFn
    name: str
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"Loss.fn must be the loss function, got a {type(self.fn).__name__}.")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Loss.name must be a non-empty string (the method), got {self.name!r}.")

    def __call__(self, params, batch_stats, images, labels, key, hparams):
        return self.fn(params, batch_stats, images, labels, key, hparams)

    def replace(self, **changes: Any) -> Loss:
        """A new loss with fields replaced (a new object: a new compiled step)."""
        return dataclasses.replace(self, **changes)


def as_loss(loss_fn: Loss | LossFn) -> Loss:
    """``loss_fn`` as a :class:`Loss`: itself, or a plain function wrapped (name = its ``__name__``, no config,
    no hyperparameters)."""
    if isinstance(loss_fn, Loss):
        return loss_fn
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be a jaxnoise.methods.Loss or a function, got a {type(loss_fn).__name__}.")
    return Loss(loss_fn, getattr(loss_fn, "__name__", None) or type(loss_fn).__name__, None, {})


def default_draw_batch_size(n_draws: int, backend: str | None = None) -> int:
    """Noise draws evaluated at once: 1 on CPU (sequential ``lax.map``), all ``n_draws`` on GPU/TPU (``vmap``)."""
    backend = backend or jax.default_backend()
    return 1 if backend == "cpu" else int(n_draws)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch, integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def feature_distance(noisy: jax.Array, clean: jax.Array, distance: str = "nmse") -> jax.Array:
    """Distance between a batch of noisy features and the clean target features, averaged over the batch.

    Args:
      noisy: features of the noisy network, shape (batch, ...).
      clean: the target (clean) features, same shape; the caller applies ``stop_gradient``.
      distance: a key of ``DISTANCES``.

    Returns:
      A scalar. ``nmse`` and ``cosine`` are 0 when ``noisy == clean`` and scale-free (multiplying both features
      by a constant does not change them); ``logit_kl`` treats its inputs as logits.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown consistency distance {distance!r}; choose one of {sorted(DISTANCES)}.")
    a = noisy.reshape(noisy.shape[0], -1).astype(jnp.float32)
    b = clean.reshape(clean.shape[0], -1).astype(jnp.float32)
    if distance == "nmse":
        # The normaliser is the mean energy of the two features over the batch, held constant: it equals the
        # clean energy when the features agree, and stays finite when a clean (post-ReLU) feature is all zeros,
        # where dividing by the clean energy alone blew training up.
        energy = jax.lax.stop_gradient(0.5 * (jnp.sum(a ** 2) + jnp.sum(b ** 2)))
        return jnp.sum((a - b) ** 2) / (energy + NMSE_EPS)
    if distance == "cosine":
        cos = jnp.sum(a * b, axis=1) / (jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1) + NMSE_EPS)
        return jnp.mean(1.0 - cos)
    p_log = jax.nn.log_softmax(b, axis=-1)
    q_log = jax.nn.log_softmax(a, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1))


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _check_scalar(value: Any, name: str, *, minimum: float = 0.0) -> float:
    """A finite plain number >= ``minimum`` (``jaxnoise._checks.number``)."""
    return _checks.number(value, name, minimum=minimum)


def _check_draws(n_draws: Any, draw_batch_size: Any) -> tuple[int, int]:
    n_draws = _checks.positive_int(n_draws, "n_draws", "noise draws per training step")
    if draw_batch_size is None:
        draw_batch_size = default_draw_batch_size(n_draws)
    draw_batch_size = _checks.positive_int(draw_batch_size, "draw_batch_size",
                                           "draws run at once, or None for the backend default")
    return n_draws, min(draw_batch_size, n_draws)


def sampler_record(spec: noise_lib.NoiseSpec) -> dict[str, str | None]:
    """The samplers the training noise draws with on this backend (recorded in the loss config)."""
    return {"weight": spec.resolved_sampler("weight") if spec.weight_kind else None,
            "activation": spec.resolved_sampler("activation") if spec.act_kind else None}


def _noise_config(spec: noise_lib.NoiseSpec) -> dict[str, Any]:
    """The training noise as the loss config records it (``weight_truncate`` only when set)."""
    out = {"weight_kind": spec.weight_kind, "act_kind": spec.act_kind, "weight_paths": list(spec.weight_paths),
           "prng": sampler_record(spec)}
    if spec.weight_truncate is not None:
        out["weight_truncate"] = float(np.asarray(spec.weight_truncate))
    return out


def _train_spec(weight_kind: str | None, act_kind: str | None, act_ref: Mapping[str, Any] | None,
                weight_paths: Sequence[str] | None, device: Any = None,
                weight_truncate: float | None = None) -> noise_lib.NoiseSpec:
    if weight_kind is None and act_kind is None and device is None:
        raise ValueError("a noise-aware method needs weight_kind, act_kind or a device spec; for noise-free "
                         "training use method 'clean'.")
    if device is not None and not isinstance(device, analog_lib.AnalogSpec):
        raise ValueError(f"device must be a jaxnoise.analog.AnalogSpec (e.g. jaxnoise.analog.preset('hwa_standard')"
                         f".training()), got {type(device).__name__}.")
    kwargs = {} if weight_paths is None else {"weight_paths": _checks.names(weight_paths, "weight_paths",
                                                                             example="kernel")}
    # Validates the kinds and scales.
    return noise_lib.NoiseSpec(weight_kind=weight_kind, act_kind=act_kind, act_ref=act_ref,
                               weight_truncate=weight_truncate, **kwargs)


def _check_against_model(model: Any, spec: noise_lib.NoiseSpec, device: Any) -> None:
    """The training noise must select parts of ``model``: weight_paths patterns, the act_ref of additive noise and
    the device's layer patterns (else a "noise-aware" run would silently train on the clean network)."""
    if not (hasattr(model, "init") and hasattr(model, "sites")):
        return  # not a jaxnoise model: nothing to check against
    params = _checks.abstract_variables(model)["params"]
    noise_lib.check_spec(spec, params, model.sites, analog_paths=model.analog_weight_paths, what="NoiseSpec")
    if device is not None:
        analog_lib.check_selectors(params, device, model.analog_layers)


def check_hparams(hparams: Mapping[str, Any], expected: Sequence[str]) -> dict[str, jax.Array]:
    """``hparams`` as float32 scalar arrays, after checking the names and values.

    Raises:
      ValueError: a missing or unknown name, or a negative / non-finite value.
    """
    names = set(hparams)
    if names != set(expected):
        raise ValueError(f"hyperparameters {sorted(names)} do not match the loss's {sorted(expected)}: "
                         f"pass exactly those (e.g. loss_fn.hparams with values replaced).")
    out = {}
    for name, value in hparams.items():
        if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, jax.core.Tracer):
            value = float(np.asarray(value))
        if not isinstance(value, jax.core.Tracer):
            _check_scalar(value, name)
        out[name] = jnp.asarray(value, jnp.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Losses


def resolve_hparams(loss_fn: Any, hparams: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
    """A loss's hyperparameters as float32 scalar arrays: ``hparams`` (default ``loss_fn.hparams``), checked
    against the names ``loss_fn.hparams`` declares (:func:`check_hparams`)."""
    declared = as_loss(loss_fn).hparams
    values = dict(declared if hparams is None else hparams)
    return check_hparams(values, tuple(declared))


def clean(model: Any) -> Loss:
    """Noise-free cross-entropy, BatchNorm in training mode.

    Args:
      model: a ``jaxnoise.models`` model.

    Returns:
      ``loss_fn(params, batch_stats, images, labels, key, hparams)``; ``key`` and ``hparams`` (``{}``) are unused.
    """
    def loss_fn(params, batch_stats, images, labels, key, hparams):
        del key, hparams  # clean training draws no noise
        out = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True)
        return cross_entropy(out.logits, labels), (out.logits, out.state, {})

    return Loss(loss_fn, "clean", {}, {})


def _pass_chip(model, draw_key, params, spec, device):
    """The chip of one training pass on ``device`` (``Model.pass_chip``), or None without one: ``apply`` then
    draws the weights from the pass key itself."""
    return None if device is None else model.pass_chip(draw_key, params, spec, device)


def _draws(per_draw: Callable, key: jax.Array, n_draws: int, draw_batch_size: int):
    """Runs ``per_draw(fold_in(key, k))`` for k < n_draws; outputs stacked on a leading axis of size K.

    The draws go in chunks of ``draw_batch_size``: each chunk is one ``vmap`` (a single call when its size is 1)
    and the chunks are unrolled in the traced program. Not ``lax.map``/``scan``: on the CPU backend the gradient
    of convolutions inside a loop ran ~20x slower than the same convolutions unrolled
    (``python benchmarks/train_step.py --scan-check``).
    """
    keys = [jax.random.fold_in(key, k) for k in range(n_draws)]
    outs = []
    for start in range(0, n_draws, draw_batch_size):
        chunk = keys[start:start + draw_batch_size]
        if len(chunk) == 1:
            outs.append(jax.tree.map(lambda x: x[None], per_draw(chunk[0])))
        else:
            outs.append(jax.vmap(per_draw)(jnp.stack(chunk)))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)


def _mean_over_draws(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _noisy_spec(spec: noise_lib.NoiseSpec, hparams: Mapping[str, jax.Array]) -> noise_lib.NoiseSpec:
    return spec.replace(weight_eta=hparams["eta_train"] if spec.weight_kind else 0.0,
                        act_eta=hparams["act_eta_train"] if spec.act_kind else 0.0)


def _noise_hparams(spec: noise_lib.NoiseSpec, eta_train: float, act_eta_train: float) -> dict[str, float]:
    out = {}
    if spec.weight_kind:
        out["eta_train"] = _check_scalar(eta_train, "eta_train")
    if spec.act_kind:
        out["act_eta_train"] = _check_scalar(act_eta_train, "act_eta_train")
    return out


@_checks.renamed_kwargs(num_draws="n_draws")
def forward_noise(model: Any, *, eta_train: float = 0.1, weight_kind: str | None = "additive_rel_max",
                  act_eta_train: float = 0.0, act_kind: str | None = None,
                  act_ref: Mapping[str, Any] | None = None, weight_paths: Sequence[str] | None = None,
                  n_draws: int = 1, draw_batch_size: int | None = None,
                  device: analog_lib.AnalogSpec | None = None, weight_truncate: float | None = None) -> Loss:
    """Forward-noise (noise-injection) training: the cross-entropy of freshly drawn noisy chips.

    Every step draws ``n_draws`` chips (weight noise of ``weight_kind`` at ``eta_train``, and optionally
    activation noise of ``act_kind`` at ``act_eta_train``); the loss is the mean of their cross-entropies and the
    gradient is taken straight through the weight noise (``jaxnoise.noise.perturb_weights``), i.e. it is applied
    to the clean weights.

    Args:
      model: a ``jaxnoise.models`` model.
      eta_train: default weight-noise scale in the units of ``weight_kind`` (``hparams["eta_train"]``; for the
        default ``additive_rel_max``, sigma = eta * max|W| per tensor).
      weight_kind: a key of ``jaxnoise.noise.WEIGHT_KINDS``, or None for no weight noise.
      act_eta_train: default activation-noise scale (``hparams["act_eta_train"]``, present when ``act_kind`` is).
      act_kind: a key of ``jaxnoise.noise.ACTIVATION_KINDS``, or None.
      act_ref: the calibrated ``{site: r_site}`` of additive activation noise.
      weight_paths: regexes of the noisy parameters (default: every kernel).
      n_draws: K, the noise draws per step.
      draw_batch_size: draws run at once (one ``vmap``); None: :func:`default_draw_batch_size`.
      device: hardware-aware training under a device spec (``jaxnoise.analog``): every draw programs a fresh chip
        (PCM programming noise and/or a weight modifier) and runs every analog MVM with its I/O non-idealities
        (DAC/ADC straight-through, output noise). aihwkit trains with ``preset(...).training()`` (PCM off).
        Composes with ``weight_kind``/``act_kind``; both may be None when a device is given.
      weight_truncate: clip the weight noise's standard normal at +-k (``NoiseSpec.weight_truncate``; the
        authors' group trains with 3); None: no clip. On a quantized model the noise acts on W_q.

    Returns:
      ``loss_fn(params, batch_stats, images, labels, key, hparams)``; its logits are those of draw 0, its
      metrics ``{"ce"}`` (mean over draws) and its running statistics are averaged over draws (module docstring).

    Examples:
      >>> loss_fn = forward_noise(model, eta_train=0.1, n_draws=4)  # doctest: +SKIP
      >>> loss, aux = loss_fn(params, stats, x, y, key, {"eta_train": jnp.float32(0.2)})  # doctest: +SKIP
    """
    spec = _train_spec(weight_kind, act_kind, act_ref, weight_paths, device, weight_truncate)
    n_draws, draw_batch_size = _check_draws(n_draws, draw_batch_size)
    defaults = _noise_hparams(spec, eta_train, act_eta_train)
    _check_against_model(model, spec, device)

    def loss_fn(params, batch_stats, images, labels, key, hparams):
        noisy_spec = _noisy_spec(spec, hparams)
        variables = {"params": params, "batch_stats": batch_stats}

        def per_draw(draw_key):
            out = model.apply(variables, images, key=draw_key, noise=noisy_spec, train=True,
                              chip=_pass_chip(model, draw_key, params, noisy_spec, device))
            return cross_entropy(out.logits, labels), out.logits, out.state

        ce, logits, stats = _draws(per_draw, key, n_draws, draw_batch_size)
        loss = jnp.mean(ce)
        return loss, (logits[0], _mean_over_draws(stats), {"ce": loss})

    return Loss(loss_fn, "forward_noise",
                {"noise": _noise_config(spec), "num_draws": n_draws, "draw_batch_size": draw_batch_size,
                 "device": None if device is None else device.describe()}, defaults)


@_checks.renamed_kwargs(num_draws="n_draws")
def consistency(model: Any, *, eta_train: float = 0.1, lam: float = 1.0, sites: Sequence[str] | None = None,
                site_weights: Mapping[str, float] | None = None, distance: str = "nmse",
                weight_kind: str | None = "additive_rel_max", act_eta_train: float = 0.0,
                act_kind: str | None = None, act_ref: Mapping[str, Any] | None = None,
                weight_paths: Sequence[str] | None = None, n_draws: int = 1, draw_batch_size: int | None = None,
                teacher: Mapping[str, Any] | None = None, teacher_model: Any = None,
                device: analog_lib.AnalogSpec | None = None, weight_truncate: float | None = None) -> Loss:
    """Consistency regularisation (Hou et al. 2024): noisy cross-entropy plus a pull toward clean features.

    ``loss = mean over K draws of [CE(noisy logits, y) + lambda * sum_s w_s * d(f_s(noisy), stop_gradient(f_s(clean)))]``

    The noisy network is drawn exactly as in :func:`forward_noise` (same keys, same straight-through gradient).
    The clean features come, by default, from the same weights with the noise off, in training mode (BatchNorm
    on the batch statistics of the clean activations; those statistics are discarded). With ``teacher`` they come
    from frozen variables (e.g. the pretrained model) in inference mode. Gradients never flow into the target.

    Args:
      model: a ``jaxnoise.models`` model.
      eta_train: default weight-noise scale (``hparams["eta_train"]``), units of ``weight_kind``.
      lam: default lambda (``hparams["lambda"]``), the weight of the consistency term; 0 gives forward-noise.
      sites: the features to match: names from ``model.feature_names`` and/or ``"logits"``. Default: every
        named feature of the model (for the CIFAR ResNets: ``stem``, each residual block and ``pre_logits``), or
        ``("logits",)`` when ``distance="logit_kl"``.
      site_weights: ``{site: w_s}``; default ``1 / len(sites)`` for each, so the regulariser is the mean distance
        over sites and lambda does not depend on how many sites are chosen.
      distance: a key of ``DISTANCES`` (default ``nmse``); ``logit_kl`` only applies to the ``logits`` site.
      weight_kind, act_eta_train, act_kind, act_ref, weight_paths, n_draws, draw_batch_size: as in
        :func:`forward_noise`.
      teacher: frozen ``{"params", "batch_stats"}`` giving the clean features; None uses the trained weights.
      teacher_model: the teacher's architecture when it differs from ``model`` (it must have the same sites).
      device: train the noisy network under a device spec, as in :func:`forward_noise`; the clean target is the
        exact network.
      weight_truncate: as in :func:`forward_noise`.

    Returns:
      ``loss_fn(params, batch_stats, images, labels, key, hparams)`` with metrics ``{"ce", "consistency"}``
      (means over draws; ``consistency`` is the weighted distance before the lambda factor).

    References:
      Hou et al., Machine Learning: Science and Technology 5, 035065 (2024).
    """
    spec = _train_spec(weight_kind, act_kind, act_ref, weight_paths, device, weight_truncate)
    n_draws, draw_batch_size = _check_draws(n_draws, draw_batch_size)
    _check_against_model(model, spec, device)
    if distance not in DISTANCES:
        raise ValueError(f"unknown consistency distance {distance!r}; choose one of {sorted(DISTANCES)}.")
    available = tuple(model.feature_names) + (LOGITS_SITE,)
    if sites is None:
        sites = (LOGITS_SITE,) if distance == "logit_kl" else tuple(model.feature_names)
    sites = _checks.names(sites, "sites", example=available[0])
    if not sites:
        raise ValueError("sites is empty: choose at least one of " + ", ".join(available) + ".")
    unknown = [s for s in sites if s not in available]
    if unknown:
        raise ValueError(f"unknown consistency sites {unknown} for {model.name}; choose among {list(available)}.")
    if len(set(sites)) != len(sites):
        raise ValueError(f"sites {list(sites)} lists a site twice.")
    if distance == "logit_kl" and sites != (LOGITS_SITE,):
        raise ValueError(f"distance 'logit_kl' compares logits: use sites=('logits',), not {list(sites)}.")
    if site_weights is None:
        weights = {s: 1.0 / len(sites) for s in sites}
    else:
        _checks.mapping(site_weights, "site_weights", "site")
        extra = set(site_weights) - set(sites)
        if extra:
            raise ValueError(f"site_weights names sites that are not in sites: {sorted(extra)}.")
        weights = {s: _check_scalar(site_weights.get(s, 0.0), f"site_weights[{s!r}]") for s in sites}
    teacher_model = model if teacher_model is None else teacher_model
    if teacher is not None:
        teacher = jax.tree.map(jnp.asarray, dict(teacher))
    defaults = {**_noise_hparams(spec, eta_train, act_eta_train), "lambda": _check_scalar(lam, "lam")}

    def pick(logits, features):
        return {s: logits if s == LOGITS_SITE else features[s] for s in sites}

    def loss_fn(params, batch_stats, images, labels, key, hparams):
        noisy_spec = _noisy_spec(spec, hparams)
        variables = {"params": params, "batch_stats": batch_stats}
        if teacher is None:
            clean_logits, clean_features = model.apply(variables, images, train=True)[:2]
        else:
            clean_logits, clean_features = teacher_model.apply(teacher, images)[:2]
        targets = jax.lax.stop_gradient(pick(clean_logits, clean_features))

        def per_draw(draw_key):
            out = model.apply(variables, images, key=draw_key, noise=noisy_spec, train=True,
                              chip=_pass_chip(model, draw_key, params, noisy_spec, device))
            noisy = pick(out.logits, out.features)
            reg = sum(weights[s] * feature_distance(noisy[s], targets[s], distance) for s in sites)
            return cross_entropy(out.logits, labels), reg, out.logits, out.state

        ce, reg, logits, stats = _draws(per_draw, key, n_draws, draw_batch_size)
        ce, reg = jnp.mean(ce), jnp.mean(reg)
        loss = ce + hparams["lambda"] * reg
        return loss, (logits[0], _mean_over_draws(stats), {"ce": ce, "consistency": reg})

    return Loss(loss_fn, "consistency",
                {"noise": _noise_config(spec), "num_draws": n_draws, "draw_batch_size": draw_batch_size,
                 "sites": list(sites), "site_weights": weights, "distance": distance,
                 "target": "teacher" if teacher is not None else "same weights, noise off",
                 "device": None if device is None else device.describe()}, defaults)


def make_loss(method: str, model: Any, **kwargs: Any) -> Loss:
    """The loss of ``method`` (a key of ``METHODS``) with its keyword arguments."""
    factories = {"clean": clean, "forward_noise": forward_noise, "consistency": consistency}
    if method not in factories:
        raise ValueError(f"unknown training method {method!r}; choose one of {list(METHODS)}.")
    return factories[method](model, **kwargs)


__all__ = ["DISTANCES", "LOGITS_SITE", "METHODS", "Loss", "as_loss", "check_hparams", "clean", "consistency", "cross_entropy",
           "default_draw_batch_size", "feature_distance", "forward_noise", "make_loss", "sampler_record"]
