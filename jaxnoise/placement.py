"""Where to put denoising blocks: per-site sensitivity, vmapped candidate training/evaluation, budgeted search.

The exploration algorithm of Azizi et al. (2024) as far as it is known (``../shared/PAPERS.md``): noise ``z`` at the
output ``h_l`` of layer ``l`` costs about ``z^T dL/dh_l``, so blocks go where the loss is most sensitive, until
the parameter budget is spent; then a refinement. Here:

* :func:`removal_sensitivity`: the Monte Carlo accuracy gained when the noise of the MVMs feeding one insertion
  site is removed (a row of noise masks per site, vmapped, every row on the same chips: paired differences);
* :func:`gradient_sensitivity`: ``E ||dCE_i/dh_s||`` per example under noise at each insertion site;
* :func:`evaluate_placements` / :func:`train_candidates`: many placements (and their block parameters) evaluated
  or trained at once with ``jax.vmap``, the backbone shared (unbatched), the noise draws common to all;
* :func:`search`: greedy (beam width 1) or beam search over sites under a parameter budget; each round trains
  every one-site extension of the kept placements briefly (warm-started from its parent) and evaluates them;
  returns every evaluated placement and the Pareto front (parameter overhead vs Monte Carlo accuracy);
* baselines on the same budget: :func:`every_block_placement`, :func:`random_placement`,
  :func:`most_sensitive_placement`.

Placements are float vectors over ``dmodel.candidate_sites`` (``jaxnoise.denoise.placement_array``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnoise import _checks, denoise, methods, robustness
from jaxnoise import data as data_lib
from jaxnoise import noise as noise_lib
from jaxnoise import train as train_lib
from jaxnoise.models.base import Model
from jaxnoise.models.layers import Scope

STRATEGIES = ("greedy", "beam")


# ----------------------------------------------------------------------------------------------------------------
# Site structure


def site_groups(model: Model) -> dict[str, tuple[str, ...]]:
    """For each named feature, the activation-noise sites (MVM outputs) computed since the previous feature.

    These are the MVMs whose noise a block at that feature sees first: for a CIFAR ResNet, ``stem`` owns
    ``conv1`` and ``layerS/B`` owns ``layerS/B/conv1`` and ``layerS/B/conv2``; ``pre_logits`` owns none.
    """
    events: list[tuple[str, str]] = []

    class Recorder(noise_lib.SiteContext):
        def __call__(self, name, y):
            events.append(("site", name))
            return super().__call__(name, y)

    def tap(root, name, x):
        events.append(("feature", name))
        return x

    def run(v, x):
        scope = Scope(v["params"], v["batch_stats"], sites=Recorder(), tap=tap)
        return model.forward(scope, x)[0]

    variables = jax.eval_shape(model.init, jax.random.key(0))
    jax.eval_shape(run, variables, jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.float32))
    groups: dict[str, tuple[str, ...]] = {}
    pending: list[str] = []
    features = set(model.feature_names)   # inner tap points (model.tap_names) do not end a group
    for kind, name in events:
        if kind == "site":
            pending.append(name)
        elif name in features:
            groups[name] = tuple(pending)
            pending = []
    return groups


# ----------------------------------------------------------------------------------------------------------------
# Vmapped evaluation of variants


def evaluate_variants(model: Model, variables: Mapping[str, Any], images: Any, labels: Any,
                      spec: noise_lib.NoiseSpec, variant_fn: Callable, variant_data: Any, *, key: jax.Array | int,
                      n_chips: int, batch_size: int = 500, preprocess: Callable | None = None,
                      chip_batch_size: int | None = None, variant_batch_size: int | None = None) -> np.ndarray:
    """Per-chip accuracies of V variants of one model, on common chips: (V, n_chips).

    Variant ``k`` is ``variant_fn(variables, spec, variant_data[k]) -> (variables_k, spec_k)`` (traceable; e.g. a
    placement's gates or a noise mask). Chip ``i`` has key ``fold_in(key, i)`` in every variant, so variants see
    the same noise draws (paired comparisons), exactly as :func:`jaxnoise.robustness.evaluate` would.

    Args:
      model, variables, images, labels, spec, key, n_chips, batch_size, preprocess, chip_batch_size: as in
        :func:`jaxnoise.robustness.evaluate`.
      variant_fn: the variant map; keep the same function object across calls to reuse the compiled program.
      variant_data: a pytree whose leaves have a leading axis V.
      variant_batch_size: None vmaps all variants at once; an integer maps them in chunks of that size
        (``jax.lax.map``), e.g. 1 for one after another inside the program.

    Returns:
      float64 array (V, n_chips).

    Raises:
      ValueError: the input errors of :func:`jaxnoise.robustness.evaluate`, raised before anything is traced (no
        key, a spec that is not a ``NoiseSpec`` or whose selectors name nothing, incomplete variables, counts that
        are not integers >= 1); ``InsufficientMemoryError`` when the V x chip chunk would not fit.
    """
    mc = robustness.MonteCarlo(model, images, labels, batch_size=batch_size, chip_batch_size=chip_batch_size,
                               preprocess=preprocess, caller="evaluate_variants")
    return mc.variants(variables, spec, variant_fn, variant_data, key=key, n_chips=n_chips,
                       variant_batch_size=variant_batch_size)


def _variant_fn(kind: str, model: Model) -> Callable:
    """The variant map of ``kind`` for ``model``, one function object per (kind, model), kept on the model
    (``_checks.object_cache``), so that :func:`evaluate_variants` reuses its compiled program (cached by the
    function object).

    ``"gates"``: variant data ``(placement, block_params)`` of a denoised model; ``"noise_mask"``: a row of
    activation-noise multipliers over ``model.sites``.
    """
    cache = _checks.object_cache(model, "placement.variant_fns")
    if kind in cache:
        return cache[kind]
    if kind == "gates":
        def fn(variables, spec, d):
            placement, block_params = d
            params = dict(variables["params"])
            if block_params is not None:
                params[denoise.DENOISE_KEY] = block_params
            return denoise.with_placement(model, {**variables, "params": params}, placement), spec
    else:
        sites = tuple(model.sites)

        def fn(variables, spec, row):
            base = dict(spec.act_mask or {})
            mask = {s: row[i] * base.get(s, 1.0) for i, s in enumerate(sites)}
            return variables, spec.replace(act_mask=mask)
    cache[kind] = fn
    return fn


def evaluate_placements(dmodel: denoise.DenoisedModel, variables: Mapping[str, Any], placements: Any,
                        images: Any, labels: Any, spec: noise_lib.NoiseSpec, *, key: jax.Array | int, n_chips: int,
                        block_params: Any = None, batch_size: int = 500, preprocess: Callable | None = None,
                        chip_batch_size: int | None = None, variant_batch_size: int | None = None) -> np.ndarray:
    """Per-chip accuracies of several placements at once: (V, n_chips), vmapped, on common chips.

    Args:
      dmodel: the denoised model; ``variables`` its variables.
      placements: (V, n_sites) gates (:func:`jaxnoise.denoise.placement_array` of each).
      block_params: optional ``params["denoise"]`` subtrees stacked on a leading axis V (e.g. from
        :func:`train_candidates`); None uses those of ``variables`` for every placement.
      others: as in :func:`evaluate_variants`.
    """
    placements = denoise.placement_array(dmodel, placements)
    if placements.ndim != 2:
        raise ValueError(f"placements must be (V, {len(dmodel.candidate_sites)}), got {placements.shape}.")
    return evaluate_variants(dmodel, variables, images, labels, spec, _variant_fn("gates", dmodel),
                             (placements, block_params), key=key, n_chips=n_chips, batch_size=batch_size,
                             preprocess=preprocess, chip_batch_size=chip_batch_size,
                             variant_batch_size=variant_batch_size)


def removal_sensitivity(model: Model, variables: Mapping[str, Any], images: Any, labels: Any,
                        spec: noise_lib.NoiseSpec, *, key: jax.Array | int, n_chips: int,
                        sites: Sequence[str] | None = None, batch_size: int = 500,
                        preprocess: Callable | None = None, chip_batch_size: int | None = None,
                        variant_batch_size: int | None = None) -> dict[str, Any]:
    """Accuracy gained when the activation noise feeding one insertion site is removed, for every site.

    Row 0 is the fully noisy model; row ``1 + j`` zeroes the noise of the MVMs of ``site_groups(model)[site_j]``.
    All rows run in one vmapped program on the same chips, so each gain is a paired difference.

    Args:
      model: the (plain) model; ``spec`` must have activation noise.
      sites: named features (default all that own at least one MVM).
      others: as in :func:`evaluate_variants`.

    Returns:
      ``{"noisy": summary, "sites": {site: {"gain": mean, "ci95": paired 95% CI, "per_chip": [...],
      "noise_sites": [...]}}}`` (accuracies as fractions; the CI of a gain is clipped to [-1, 1]; every
      ``ci95`` is None with one chip).
    """
    robustness.check_spec_type(spec, "spec", "removal_sensitivity")
    if spec is None or not spec.has_activation_noise:
        raise ValueError("removal_sensitivity removes activation noise: give a spec with act_kind set.")
    groups = site_groups(model)
    sites = (tuple(s for s in groups if groups[s]) if sites is None
             else _checks.names(sites, "sites", example=next(iter(groups), "stem"), allow_empty=False))
    unknown = [s for s in sites if s not in groups]
    if unknown:
        raise ValueError(f"unknown sites {unknown}; choose among {list(groups)}.")
    noise_sites = tuple(model.sites)
    rows = np.ones((1 + len(sites), len(noise_sites)), np.float32)
    for j, s in enumerate(sites):
        for ns in groups[s]:
            rows[1 + j, noise_sites.index(ns)] = 0.0
    acc = evaluate_variants(model, variables, images, labels, spec, _variant_fn("noise_mask", model), rows, key=key,
                            n_chips=n_chips, batch_size=batch_size, preprocess=preprocess,
                            chip_batch_size=chip_batch_size, variant_batch_size=variant_batch_size)
    out = {"noisy": robustness.summarize(acc[0]), "noisy_per_chip": acc[0].tolist(), "sites": {}}
    for j, s in enumerate(sites):
        diff = acc[1 + j] - acc[0]
        summ = robustness.summarize(diff, bounds=(-1.0, 1.0))  # a paired difference of accuracies
        out["sites"][s] = {"gain": summ["mean"], "ci95": summ["ci95"], "per_chip": acc[1 + j].tolist(),
                           "noise_sites": list(groups[s])}
    return out


def gradient_sensitivity(model: Model, variables: Mapping[str, Any], images: Any, labels: Any,
                         spec: noise_lib.NoiseSpec | None, *, key: jax.Array | int, n_draws: int = 4,
                         sites: Sequence[str] | None = None, batch_size: int = 256,
                         preprocess: Callable | None = None) -> dict[str, float]:
    """Mean per-example gradient norm ``E ||dCE_i / dh_s||`` at each named feature, under noise.

    The first-order damage of noise ``z`` added at ``h_s`` is ``z . dCE/dh_s``; the sites with the largest
    norms are where a block should help most (Azizi et al.'s Taylor argument). Averaged over ``n_draws`` noise
    draws (draw ``k``: key ``fold_in(key, k)``) and over the images (one batch of at most ``batch_size``).

    Returns:
      ``{site: mean gradient norm}`` in forward order.
    """
    where = "gradient_sensitivity"
    robustness.check_spec_type(spec, "spec", where)
    key = robustness.check_key(spec, key, where)
    if key is None:
        key = _checks.as_key(0)  # a clean model draws nothing: the key is unused
    n_draws = _checks.positive_int(n_draws, "n_draws")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    robustness.check_inputs(model, variables, [spec], where=where)
    available = tuple(model.feature_names)
    sites = available if sites is None else _checks.names(sites, "sites", example=available[0] if available else None,
                                                          allow_empty=False)
    unknown = [s for s in sites if s not in available]
    if unknown:
        raise ValueError(f"unknown sites {unknown}; choose among {list(available)}.")
    x = np.asarray(images[:batch_size])
    y = jnp.asarray(np.asarray(labels[:batch_size]), jnp.int32)
    x = jnp.asarray(x) if preprocess is None else preprocess(jnp.asarray(x))
    base = _checks.as_key(key)
    shapes = denoise.feature_shapes(model)

    def per_draw(k, x, y):  # data as arguments, not closed-over constants (XLA would constant-fold the convs)
        offsets = {s: jnp.zeros((x.shape[0],) + shapes[s], jnp.float32) for s in sites}

        def loss(offsets):
            def tap(root, name, h):
                return h + offsets[name] if name in offsets else h
            logits = model.apply(variables, x, key=k if spec is not None else None, noise=spec, tap=tap).logits
            logp = jax.nn.log_softmax(logits)
            return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=-1))  # sum: per-example gradients

        g = jax.grad(loss)(offsets)
        return {s: jnp.mean(jnp.sqrt(jnp.sum(jnp.square(g[s].reshape(g[s].shape[0], -1)), axis=1)))
                for s in sites}

    fn = jax.jit(per_draw)
    totals = {s: 0.0 for s in sites}
    for k in range(int(n_draws)):
        out = fn(jax.random.fold_in(base, k), x, y)
        for s in sites:
            totals[s] += float(out[s]) / n_draws
    return totals


# ----------------------------------------------------------------------------------------------------------------
# Vmapped training of candidates


def train_candidates(dmodel: denoise.DenoisedModel, variables: Mapping[str, Any], placements: Any,
                     dataset: Any, loss_fn: Callable, *, steps: int, key: jax.Array | int,
                     batch_size: int = 64, learning_rate: float = 0.01, momentum: float = 0.9,
                     block_params: Any = None, hparams: Mapping[str, float] | None = None,
                     split: Any = None) -> tuple[Any, np.ndarray]:
    """Trains V placements' blocks at once (one vmapped step): the backbone is shared and frozen.

    Every candidate sees the same batches, augmentations and noise draws (common random numbers), so their
    differences come from the placement. SGD with momentum and a cosine schedule over ``steps``; no weight decay.

    Args:
      dmodel, variables: the denoised model and its variables (backbone + fresh blocks).
      placements: (V, n_sites) gates.
      dataset: provides ``augment``, ``preprocess`` and (unless ``split``) ``train``.
      loss_fn: from :func:`jaxnoise.denoise.denoiser_loss`.
      steps: optimizer steps.
      key: base key (batches: ``name_key(key, "data")``; step ``s``: ``train.step_keys(name_key(key, "step"), s)``).
      block_params: ``params["denoise"]`` stacked on a leading V axis to warm-start from; None: those of
        ``variables`` for every candidate.
      hparams: loss hyperparameters (default ``loss_fn.hparams``).
      split: the training split (default ``dataset.train``).

    Returns:
      ``(block_params, final_losses)``: the trained subtrees stacked (V, ...) and each candidate's mean loss over
      the last ``min(10, steps)`` steps.
    """
    placements = denoise.placement_array(dmodel, placements)
    v = int(placements.shape[0])
    if key is None:
        raise ValueError("train_candidates needs key=... (a PRNG key or an int seed: batches and noise draws).")
    key = _checks.as_key(key)
    steps = _checks.positive_int(steps, "steps")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    backbone_params, fresh = denoise.split_params(variables["params"])
    if block_params is None:
        block_params = jax.tree.map(lambda a: jnp.broadcast_to(a, (v,) + a.shape), fresh)
    batch_stats = variables.get("batch_stats", {}) or {}
    hparams = methods.resolve_hparams(loss_fn, hparams)
    step = _candidate_step(dmodel, loss_fn, dataset, float(momentum))
    opt_state = jax.vmap(optax.trace(decay=float(momentum)).init)(block_params)
    split = dataset.train if split is None else split
    step_key = noise_lib.name_key(key, "step")
    lr, total = jnp.float32(learning_rate), jnp.float32(steps)
    data_key = noise_lib.name_key(key, "data")
    losses = []
    s, epoch = 0, 0
    while s < steps:
        for images, labels in data_lib.epoch_batches(data_key, split, batch_size, epoch):
            block_params, opt_state, loss = step(block_params, opt_state, backbone_params, batch_stats, placements,
                                                 jnp.asarray(images), jnp.asarray(labels), step_key, jnp.int32(s),
                                                 lr, total, hparams)
            losses.append(loss)
            s += 1
            if s >= steps:
                break
        epoch += 1
    tail = np.mean(np.stack([np.asarray(loss) for loss in losses[-min(10, steps):]]), axis=0)
    return block_params, tail


def _candidate_step(dmodel, loss_fn, dataset, momentum: float):
    """The jitted vmapped step of :func:`train_candidates`, cached per (model, loss, dataset, momentum): settings
    that change between calls (placements, learning rate, steps, keys, hyperparameters) are arguments."""
    cache = _checks.object_cache(dmodel, "placement.candidate_steps")   # lives and dies with the model
    cache_key = (id(loss_fn), id(dataset), momentum)
    entry = cache.get(cache_key)
    if entry is not None and entry[0] is loss_fn and entry[1] is dataset:
        return entry[2]
    tracer = optax.trace(decay=momentum)

    def one(blocks, opt, gates, backbone_params, batch_stats, x, labels, loss_key, lr_s, hparams):
        def loss_of(blocks):
            params = {**backbone_params, denoise.DENOISE_KEY: blocks}
            params = denoise.with_placement(dmodel, {"params": params}, gates)["params"]
            loss, _ = loss_fn(params, batch_stats, x, labels, loss_key, hparams)
            return loss
        loss, grads = jax.value_and_grad(loss_of)(blocks)
        velocity, opt = tracer.update(grads, opt)  # PyTorch-style momentum: v = m v + g; p -= lr v
        return jax.tree.map(lambda p, u: p - lr_s * u, blocks, velocity), opt, loss

    @jax.jit
    def step(blocks, opt, backbone_params, batch_stats, placements, images, labels, step_key, s, lr, total, hparams):
        aug_key, loss_key = train_lib.step_keys(step_key, s)
        x = dataset.preprocess(dataset.augment(aug_key, images))
        lr_s = lr * 0.5 * (1 + jnp.cos(jnp.pi * s / total))  # cosine decay to 0 over the run
        return jax.vmap(one, in_axes=(0, 0, 0, None, None, None, None, None, None, None))(
            blocks, opt, placements, backbone_params, batch_stats, x, labels, loss_key, lr_s, hparams)

    cache[cache_key] = (loss_fn, dataset, step)
    return step


# ----------------------------------------------------------------------------------------------------------------
# Search and baselines


def site_params(dmodel: denoise.DenoisedModel) -> np.ndarray:
    """Block parameters of each candidate site (the cost vector of a placement), int64."""
    costs = denoise.site_costs(dmodel)
    return np.asarray([costs[s]["params"] for s in dmodel.candidate_sites], np.int64)


def pareto_front(points: Sequence[Mapping[str, Any]], cost: str = "param_overhead",
                 value: str = "mean") -> list[dict[str, Any]]:
    """The non-dominated points (lower ``cost``, higher ``value``), sorted by cost."""
    pts = sorted(points, key=lambda p: (p[cost], -p[value]))
    front, best = [], -math.inf
    for p in pts:
        if p[value] > best:
            front.append(dict(p))
            best = p[value]
    return front


@dataclasses.dataclass
class SearchResult:
    """Everything a placement search evaluated.

    Attributes:
      evaluated: one record per evaluated placement: ``{"round", "sites", "gates", "params",
        "param_overhead", "mean", "ci95", "per_chip", "train_loss"}`` (accuracies as fractions).
      best: the record of the best placement found (highest mean accuracy within the budget).
      pareto: :func:`pareto_front` of ``evaluated``.
      best_block_params: the trained ``params["denoise"]`` of ``best`` (a warm start for the final training).
      config: the search settings.
    """

    evaluated: list[dict[str, Any]]
    best: dict[str, Any]
    pareto: list[dict[str, Any]]
    best_block_params: Any
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"evaluated": self.evaluated, "best": self.best, "pareto": self.pareto, "config": self.config}


def search(dmodel: denoise.DenoisedModel, variables: Mapping[str, Any], dataset: Any, loss_fn: Callable,
           eval_images: Any, eval_labels: Any, spec: noise_lib.NoiseSpec, *, budget: float,
           key: jax.Array | int, strategy: str = "greedy", beam_width: int = 2,
           candidates: Sequence[str] | None = None, steps: int = 50, batch_size: int = 64,
           learning_rate: float = 0.01, n_chips: int = 4, eval_batch_size: int = 500,
           max_rounds: int | None = None, split: Any = None, hparams: Mapping[str, float] | None = None,
           log: Callable[[str], None] | None = None) -> SearchResult:
    """Budgeted greedy/beam search for a placement (module docstring).

    Round ``r`` extends each kept placement by one candidate site whose block still fits
    ``params <= budget * backbone params``; all extensions of the round are trained together
    (:func:`train_candidates`, ``steps`` steps, warm-started from the parent's trained blocks) and evaluated
    together (:func:`evaluate_placements`, ``n_chips`` common chips on ``eval_images``). The ``beam_width`` best
    (1 for greedy) are kept. The search stops when nothing fits, when no extension beats the best so far, or
    after ``max_rounds`` rounds.

    Args:
      dmodel, variables: the denoised model and variables with fresh blocks at every candidate site.
      dataset: training data (augment/preprocess; ``split`` or ``dataset.train`` for the batches).
      loss_fn: from :func:`jaxnoise.denoise.denoiser_loss`.
      eval_images, eval_labels: held-out selection data (raw; ``dataset.preprocess`` is applied). Never the
        test split.
      spec: the evaluation noise.
      budget: the parameter budget as a fraction of the backbone's parameters (0.025 = 2.5%).
      key: the search key (training uses ``name_key(key, "train/<round>")``, evaluation ``name_key(key, "eval")``
        for every round: the same chips throughout).
      strategy: ``"greedy"`` or ``"beam"``.
      beam_width: placements kept per round (beam only).
      candidates: sites allowed (default every candidate site of ``dmodel``), e.g. the top-k by sensitivity.
      steps, batch_size, learning_rate: the brief training of each candidate.
      n_chips, eval_batch_size: the selection Monte Carlo.
      max_rounds: cap on rounds (None: until the budget or no gain).
      log: called with one line per round.

    Returns:
      A :class:`SearchResult`; ``evaluated[0]`` is the empty placement (the plain noisy model).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {strategy!r}; choose one of {STRATEGIES}.")
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget!r} must be a positive fraction of the backbone's parameters (0.025).")
    width = 1 if strategy == "greedy" else _checks.positive_int(beam_width, "beam_width")
    if key is None:
        raise ValueError("search needs key=... (a PRNG key or an int seed: training and evaluation draws).")
    key = _checks.as_key(key)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("n_chips", n_chips),
                        ("eval_batch_size", eval_batch_size)):
        _checks.positive_int(value, name)
    if max_rounds is not None:
        _checks.positive_int(max_rounds, "max_rounds", "or None: until the budget or no gain")
    robustness.check_spec_type(spec, "spec", "search")
    sites = dmodel.candidate_sites
    candidates = (tuple(sites) if candidates is None
                  else _checks.names(candidates, "candidates", example=sites[0] if sites else None, allow_empty=False))
    unknown = [c for c in candidates if c not in sites]
    if unknown:
        raise ValueError(f"candidates {unknown} have no block in dmodel; choose among {list(sites)}.")
    costs = site_params(dmodel)
    total = dmodel.backbone.param_count()
    limit = budget * total
    eval_key = noise_lib.name_key(key, "eval")
    log = log or (lambda line: None)
    _, fresh = denoise.split_params(variables["params"])

    def record(round_, gates, per_chip, loss):
        summ = robustness.summarize(per_chip)
        params = int(np.dot(gates > 0, costs))
        return {"round": round_, "sites": [s for s, g in zip(sites, gates) if g > 0], "gates": gates.tolist(),
                "params": params, "param_overhead": params / total, "mean": summ["mean"], "ci95": summ["ci95"],
                "per_chip": list(map(float, per_chip)), "train_loss": loss}

    empty = np.zeros(len(sites), np.float32)
    acc0 = evaluate_placements(dmodel, variables, empty[None], eval_images, eval_labels, spec, key=eval_key,
                               n_chips=n_chips, batch_size=eval_batch_size, preprocess=dataset.preprocess)
    evaluated = [record(0, empty, acc0[0], None)]
    beams = [(empty, fresh, evaluated[0])]
    best, best_params = evaluated[0], fresh
    log(f"round 0: no blocks, accuracy {100 * best['mean']:.2f}%")
    round_ = 0
    while max_rounds is None or round_ < max_rounds:
        round_ += 1
        cands, parents, seen = [], [], set()
        for gates, blocks, _ in beams:
            used = float(np.dot(gates > 0, costs))
            for c in candidates:
                i = sites.index(c)
                if gates[i] > 0 or used + costs[i] > limit:
                    continue
                new = gates.copy()
                new[i] = 1.0
                sig = tuple(new.tolist())
                if sig in seen:
                    continue
                seen.add(sig)
                cands.append(new)
                parents.append(blocks)
        if not cands:
            log(f"round {round_}: no site fits the budget; stop")
            break
        t0 = time.time()
        placements = np.stack(cands)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parents)
        trained, losses = train_candidates(dmodel, variables, placements, dataset, loss_fn, steps=steps,
                                           key=noise_lib.name_key(key, f"train/{round_}"), batch_size=batch_size,
                                           learning_rate=learning_rate, block_params=stacked, hparams=hparams,
                                           split=split)
        acc = evaluate_placements(dmodel, variables, placements, eval_images, eval_labels, spec, key=eval_key,
                                  n_chips=n_chips, block_params=trained, batch_size=eval_batch_size,
                                  preprocess=dataset.preprocess)
        recs = [record(round_, placements[k], acc[k], float(losses[k])) for k in range(len(cands))]
        evaluated.extend(recs)
        order = np.argsort([-r["mean"] for r in recs])[:width]
        beams = [(placements[k], jax.tree.map(lambda a, k=k: a[k], trained), recs[k]) for k in order]
        top = recs[order[0]]
        log(f"round {round_}: {len(cands)} candidates in {time.time() - t0:.0f} s; best {top['sites']} "
            f"{100 * top['mean']:.2f}% ({100 * top['param_overhead']:.2f}% params)")
        if top["mean"] <= best["mean"]:
            log(f"round {round_}: no gain over {100 * best['mean']:.2f}%; stop")
            break
        best, best_params = top, beams[0][1]
    config = {"budget": budget, "strategy": strategy, "beam_width": width, "candidates": list(candidates),
              "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "n_chips": n_chips,
              "n_eval_images": int(len(eval_labels)), "max_rounds": max_rounds}
    return SearchResult(evaluated, best, pareto_front(evaluated), best_params, config)


def every_block_placement(dmodel: denoise.DenoisedModel) -> np.ndarray:
    """Gates with a block after every residual block (sites named ``layerS/B``); all but ``pre_logits`` if the
    model has no such sites."""
    sites = dmodel.candidate_sites
    blocks = [bool(re.fullmatch(r"layer\d+/\d+", s)) for s in sites]
    if not any(blocks):
        blocks = [s != "pre_logits" for s in sites]
    return np.asarray(blocks, np.float32)


def random_placement(dmodel: denoise.DenoisedModel, budget: float, seed: int = 0,
                     candidates: Sequence[str] | None = None) -> np.ndarray:
    """Sites in a seeded random order, each added while the budget allows (a random budget-filling placement)."""
    sites = dmodel.candidate_sites
    candidates = tuple(sites) if candidates is None else _checks.names(candidates, "candidates")
    unknown = [c for c in candidates if c not in sites]
    if unknown:
        raise ValueError(f"candidates {unknown} have no block in dmodel; choose among {list(sites)}.")
    costs = site_params(dmodel)
    limit = budget * dmodel.backbone.param_count()
    gates = np.zeros(len(sites), np.float32)
    used = 0
    for j in np.random.default_rng(seed).permutation(len(candidates)):
        i = sites.index(candidates[j])
        if used + costs[i] <= limit:
            gates[i] = 1.0
            used += costs[i]
    return gates


def most_sensitive_placement(dmodel: denoise.DenoisedModel, scores: Mapping[str, float],
                             budget: float) -> np.ndarray:
    """The single site with the highest ``scores`` (e.g. removal gains) whose block fits the budget."""
    sites = dmodel.candidate_sites
    costs = site_params(dmodel)
    limit = budget * dmodel.backbone.param_count()
    ranked = sorted((s for s in scores if s in sites), key=lambda s: -scores[s])
    gates = np.zeros(len(sites), np.float32)
    for s in ranked:
        i = sites.index(s)
        if costs[i] <= limit:
            gates[i] = 1.0
            return gates
    raise ValueError(f"no scored site has a block within the budget {budget} (costs {dict(zip(sites, costs))}).")


__all__ = ["STRATEGIES", "SearchResult", "evaluate_placements", "evaluate_variants", "every_block_placement",
           "gradient_sensitivity", "most_sensitive_placement", "pareto_front", "random_placement",
           "removal_sensitivity", "search", "site_groups", "site_params", "train_candidates"]
