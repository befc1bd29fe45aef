"""Protocol ``denoise_placement``: denoising blocks with a placement search (Azizi et al. 2024) on a frozen network.

As ``experiments/denoise_cifar.py`` ran it (that script now points here). Noise: additive activation noise at every
analog MVM output (every conv and the final dense layer), sigma = eta * r_site, r_site the std of the site's clean
output calibrated on ``noise.calib_images`` training images; normals drawn with ``noise.sampler``. With
``noise.weight_kind`` set, the backbone's analog kernels also get weight noise at ``noise.weight_eta`` (one draw
per chip and per training step; the blocks stay digital), in training and in every evaluation
(:func:`weight_noise`); the level is then chosen under both. Selection data:
the last ``held_out`` training images (never the test split); blocks train on the rest. Every key derives from
``key(seed)`` by name (``init``, ``level``, ``sensitivity``, ``gradient``, ``search``, ``eval``).

Stages:

* ``level``: the plain model's Monte Carlo accuracy on the held-out images over ``level.grid`` (``level.n_chips``
  chips); the target level is the eta whose drop from the noise-free accuracy is closest to
  ``level.target_drop``; the milder and harsher levels are ``level.side_factors`` times it (``level.json``).
* ``sensitivity``: per insertion site, the accuracy gained when its MVMs' noise is removed (vmapped masks, common
  chips, ``search.n_chips``) and the mean gradient norm of the loss at the site (``search.grad_draws`` draws)
  (``sensitivity.json``).
* ``search``: greedy search under ``search.budget`` (fraction of the backbone's parameters) over the
  ``search.top_k`` most sensitive sites; candidates train ``search.steps`` steps together (vmapped) and are
  evaluated together on the held-out images (``search.json``: every evaluated placement, the best, the Pareto
  front).
* ``train_<arm>``: each arm's blocks train ``train.steps`` steps with the backbone frozen (or, with
  ``train.recipe = "plateau"``, one ``train.chunk_steps`` chunk at a time until the held-out curve plateaus, at
  most ``train.max_epochs``, as ``denoise_ablation`` trains; ``curves/<arm>.jsonl``): ``searched`` (the search's
  best), ``every_block`` (a block after every residual block, the bottleneck narrowed until it fits the budget),
  ``random`` (random sites filling the budget) and ``most_sensitive`` (the single most sensitive site); the same
  init key, seed and steps. Writes ``weights/<arm>.npz`` (backbone and blocks) and ``metrics/<arm>.jsonl``.
* ``eval_plain``, ``eval_<arm>``: full test split; ``eval.n_chips`` chips for the plain model and the searched
  blocks at the target level, ``eval.side_chips`` for the baselines, ``eval.level_chips`` at the side levels
  (plain and searched), and the plain model's noise-free accuracy. Chip ``i`` has the same key in every arm.
  ``eval/<arm>.json``, written as each level finishes (a stopped evaluation resumes).
* ``report``: ``results.json`` (shared format, with the levels, sensitivity, search and engine cost),
  ``results.md`` and ``pareto.png``.

``tiny=True`` runs the same stages on digits with a one-block CNN from random weights (a budget of 200%: one
block is larger than that CNN), the top 2 sites, one search round, 4 search and training steps, at most 2 chips,
as many test images as held-out ones and the backend's default sampler (the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxnoise import checkpoint, data, denoise, engine, noise, placement, report, robustness, train
from jaxnoise import io as io_lib
from jaxnoise.models import get_model
from jaxnoise.protocols import common
from jaxnoise.stages import Stage, protocol

_command = common.command
_result = common.result

ARMS = ("searched", "every_block", "random", "most_sensitive")
TINY_CHANNELS = (8,)      # one conv block: the shortest compiles (the tests' budget)
TINY_BUDGET = 2.0          # a block costs 224 of the tiny CNN's 178 parameters
TINY_STEPS = 4
TINY_CHIPS = 2             # the level's chips: its program then serves the plain model's test evaluation
TINY_TOP_K = 2
TINY_CALIB_IMAGES = 256

BACKBONE_SETTINGS = ("tiny", "model", "pretrained", "dataset", "data_dir", "held_out", "seed", "noise")


# ---------------------------------------------------------------------------------------------------------------
# Setup: data, backbone, reference scales, denoised model


class Setup(NamedTuple):
    """What every stage shares (built once per process for the same settings)."""

    ds: data.Dataset
    model: Any
    variables: dict
    train_part: data.Split
    selection: data.Split
    ref: dict
    dmodel: denoise.DenoisedModel
    dvars: dict
    key: jax.Array



def backbone_args(config) -> tuple:
    c = config
    return bool(c.tiny), c.model, c.pretrained, common.data_args(c), int(c.seed)


def setup(config) -> Setup:
    c = config
    return _setup(backbone_args(c), int(c.held_out), common.cap(c, c.noise.calib_images, TINY_CALIB_IMAGES),
                  c.denoiser.kind, int(c.denoiser.reduction))


def denoised_model(config, reduction: int) -> denoise.DenoisedModel:
    """The backbone with a block (bottleneck C/``reduction``) at every candidate site; the same object for the same
    settings, so stages reuse each other's compiled programs."""
    return blocks_model(backbone_args(config), config.denoiser.kind, int(reduction))


@functools.lru_cache(maxsize=4)
def backbone(tiny, model_name, pretrained, data_args, seed):
    """``(dataset, model, variables)``: the pretrained network (random weights from ``seed`` in tiny mode)."""
    ds = common.load(*data_args)
    if tiny:
        model = get_model("cnn", input_shape=ds.image_shape, num_classes=ds.num_classes, channels=TINY_CHANNELS)
        return ds, model, jax.tree.map(np.asarray, model.init(jax.random.key(seed)))
    model = get_model(model_name, num_classes=ds.num_classes, **common.model_kwargs(model_name, ds))
    if not os.path.exists(pretrained):
        raise FileNotFoundError(f"pretrained weights {pretrained!r} not found: set pretrained= to the "
                                f"{model_name} .npz (CIFAR-10: ../shared/pretrained; ImageNet: a torchvision "
                                f"checkpoint converted with `jaxnoise convert-torch W.pth W.npz --model "
                                f"{model_name}`).")
    return ds, model, checkpoint.load_variables(pretrained, model)


@functools.lru_cache(maxsize=16)
def blocks_model(backbone_args: tuple, kind: str, reduction: int, inner: bool = False) -> denoise.DenoisedModel:
    """A block at every feature (``inner``: at every tap point, the residual branches' inner points included)."""
    net = backbone(*backbone_args)[1]
    return denoise.denoised(net, sites=net.tap_names if inner else None,
                            config=denoise.DenoiserConfig(kind=kind, reduction=reduction))


@functools.lru_cache(maxsize=4)
def _setup(backbone_args: tuple, held_out: int, calib_images: int, kind: str, reduction: int) -> Setup:
    ds, model, variables = backbone(*backbone_args)
    if backbone_args[0]:   # tiny: at most a fifth of the training images
        held_out = min(held_out, len(ds.train) // 5)
    train_part, held = data.holdout(ds.train, held_out)
    images = data.calibration_images(train_part, n=calib_images, seed=0)
    ref = noise.calibrate_activations(model.apply, variables, jax.jit(ds.preprocess)(jax.numpy.asarray(images)))
    dmodel = blocks_model(backbone_args, kind, reduction)
    key = jax.random.key(backbone_args[-1])
    dvars = denoise.init_variables(dmodel, variables, noise.name_key(key, "init"))
    # The selection set (level, sensitivity, search) is held in memory: decoded once when the dataset streams.
    selection = held.materialize() if hasattr(held, "materialize") else data.Split(held.images, held.labels)
    return Setup(ds, model, variables, train_part, selection, ref, dmodel, dvars, key)


def sampler(config) -> str | None:
    """The normals of every noise draw: ``noise.sampler`` ("" = the backend's default); in tiny mode the default
    (on CPU ``"threefry/icdf16"``: ``"threefry/erfinv"`` doubles the compile time of the tiny run)."""
    return None if config.tiny else (config.noise.sampler or None)


def weight_noise(config) -> tuple[str | None, float]:
    """The backbone's weight noise beside the activation noise, ``(kind, eta)``: ``noise.weight_kind`` (a key of
    ``jaxnoise.noise.WEIGHT_KINDS``; "" or absent: none) at ``noise.weight_eta``, in training and in every
    evaluation alike (level, sensitivity, search, curves, test split). The blocks are digital: never noisy.

    Raises:
      ValueError: an unknown kind, or a scale that is not a number >= 0 (or > 0 without a kind), in one line
        that names the setting; checked when the protocol's stages are built, before anything runs.
    """
    kind = str(config.noise.get("weight_kind", "") or "") or None
    eta = config.noise.get("weight_eta", 0.0)
    if kind is not None and kind not in noise.WEIGHT_KINDS:
        raise ValueError(f"noise.weight_kind={kind!r} is unknown; choose one of {sorted(noise.WEIGHT_KINDS)} "
                         f"(or \"\" for activation noise only).")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"noise.weight_eta={eta!r} must be a number >= 0 (the weight-noise scale in the units "
                         f"of noise.weight_kind).")
    if kind is None and eta:
        raise ValueError(f"noise.weight_eta={eta!r} but noise.weight_kind is unset: set noise.weight_kind "
                         f"(e.g. \"additive_rel_max\") or weight_eta=0.")
    return kind, float(eta)


def spec(config, s: Setup, eta: float) -> noise.NoiseSpec:
    """The evaluation noise at activation scale ``eta`` (with :func:`weight_noise` when the config sets it)."""
    weight_kind, weight_eta = weight_noise(config)
    return noise.NoiseSpec(weight_kind=weight_kind, weight_eta=weight_eta, act_kind="additive", act_ref=s.ref,
                           act_eta=float(eta), sampler=sampler(config))


def loss(config, s: Setup, dmodel, eta: float):
    """The blocks' training loss: ``denoiser.feature_weight`` and, when the config sets them, ``kl_weight``,
    ``nll_weight`` and ``act_eta_spread`` (:func:`jaxnoise.denoise.denoiser_loss`; absent = 0)."""
    d = config.denoiser
    weight_kind, weight_eta = weight_noise(config)
    return denoise.denoiser_loss(dmodel, act_eta_train=float(eta), act_ref=s.ref,
                                 feature_weight=float(d.feature_weight), kl_weight=float(d.get("kl_weight", 0.0)),
                                 nll_weight=float(d.get("nll_weight", 0.0)),
                                 act_eta_spread=float(d.get("act_eta_spread", 0.0)), sampler=sampler(config),
                                 weight_kind=weight_kind, eta_train=weight_eta)


def budget(config) -> float:
    return TINY_BUDGET if config.tiny else float(config.search.budget)


# ---------------------------------------------------------------------------------------------------------------
# Result records



def test_split(config, s: Setup) -> data.Split:
    """The evaluation images: the test split; in tiny mode its first ones, as many as the held-out images (one
    compiled Monte Carlo program then serves the level and the plain model's evaluation)."""
    if not config.tiny:
        return s.ds.test
    return common.head(s.ds.test, len(s.selection.labels))


def _held_out_split(s: Setup) -> str:
    return f"train[{len(s.train_part)}:] (held out)"


def act_eta(entry: dict) -> float | None:
    a = entry["activation_noise"]
    return None if a is None else float(a["eta"])


# ---------------------------------------------------------------------------------------------------------------
# Selection stages (held-out training images)


def stage_level(ctx):
    config = ctx.config
    s = setup(config)
    x, y = s.selection.images, s.selection.labels
    clean = robustness.evaluate(s.model, s.variables, x, y, None, preprocess=s.ds.preprocess)
    results, rows = [clean], []
    for eta in map(float, config.level.grid):
        r = robustness.evaluate(s.model, s.variables, x, y, spec(config, s, eta), key=noise.name_key(s.key, "level"),
                                n_chips=common.cap(config, config.level.n_chips, TINY_CHIPS),
                                batch_size=int(config.eval.batch_size), preprocess=s.ds.preprocess)
        results.append(r)
        rows.append({"eta": eta, "mean": r.mean, "drop": clean.mean - r.mean})
        ctx.log(f"level: eta {eta}: {100 * r.mean:.2f}% (drop {100 * (clean.mean - r.mean):.2f})")
    target = min(rows, key=lambda r: abs(r["drop"] - float(config.level.target_drop)))["eta"]
    sides = [round(target * float(f), 4) for f in config.level.side_factors]
    level = {"clean_selection": clean.mean, "grid": rows, "target": target, "levels": sorted([target] + sides),
             "protocol": f"plain model, {common.cap(config, config.level.n_chips, TINY_CHIPS)} chips, last {len(y)} "
                         f"training images"}
    arm = report.arm("plain", s.model, "clean", s.model.param_count(), results)
    report.write_json(ctx.result_path("level.json"), _result(config, [arm], _held_out_split(s), len(y), **level))
    return {"target": target, "levels": level["levels"]}


def level_record(ctx) -> dict:
    """The ``level`` stage's record (clean_selection, grid, target, levels, protocol)."""
    record = common.read_json(ctx.result_path("level.json"))
    return {k: record[k] for k in ("clean_selection", "grid", "target", "levels", "protocol")}


def stage_sensitivity(ctx):
    config = ctx.config
    s = setup(config)
    eta = float(ctx.summaries["level"]["target"])
    x, y = s.selection.images, s.selection.labels
    rem = placement.removal_sensitivity(s.model, s.variables, x, y, spec(config, s, eta),
                                        key=noise.name_key(s.key, "sensitivity"),
                                        n_chips=common.cap(config, config.search.n_chips, TINY_CHIPS),
                                        batch_size=int(config.eval.batch_size), preprocess=s.ds.preprocess)
    grads = placement.gradient_sensitivity(s.model, s.variables, x, y, spec(config, s, eta),
                                           key=noise.name_key(s.key, "gradient"),
                                           n_draws=int(config.search.grad_draws), preprocess=s.ds.preprocess)
    noisy = robustness.MCResult.from_per_chip(rem["noisy_per_chip"], len(y), spec(config, s, eta).describe())
    arm = report.arm("plain", s.model, "clean", s.model.param_count(), [noisy])
    report.write_json(ctx.result_path("sensitivity.json"),
                      _result(config, [arm], _held_out_split(s), len(y), eta=eta, removal=rem, gradient_norm=grads))
    for site, v in rem["sites"].items():
        ctx.log(f"sensitivity: {site}: +{100 * v['gain']:.2f} pts, grad {grads[site]:.4f}")
    return {"gains": {site: v["gain"] for site, v in rem["sites"].items()}}


def ranked_sites(gains: dict, dmodel, k: int) -> list[str]:
    """The ``k`` candidate sites of largest removal gain (every candidate site, ranked, when ``k`` is 0)."""
    order = sorted(gains, key=lambda site: -gains[site])
    ranked = [site for site in order if site in dmodel.candidate_sites]
    return ranked[:k] if k else ranked


def stage_search(ctx):
    config = ctx.config
    s = setup(config)
    eta = float(ctx.summaries["level"]["target"])
    top_k = int(config.search.top_k)
    candidates = ranked_sites(ctx.summaries["sensitivity"]["gains"], s.dmodel,
                              min(top_k, TINY_TOP_K) if config.tiny and top_k else top_k)
    max_rounds = 1 if config.tiny else (int(config.search.max_rounds) or None)
    t0 = time.time()
    result = placement.search(s.dmodel, s.dvars, s.ds, loss(config, s, s.dmodel, eta), s.selection.images,
                              s.selection.labels, spec(config, s, eta), budget=budget(config),
                              key=noise.name_key(s.key, "search"), candidates=candidates,
                              strategy=config.search.get("strategy", "greedy"),
                              beam_width=int(config.search.get("beam_width", 2)),
                              steps=common.cap(config, config.search.steps, TINY_STEPS),
                              batch_size=common.batch(config, config.search.batch_size), learning_rate=float(config.train.lr),
                              n_chips=common.cap(config, config.search.n_chips, TINY_CHIPS),
                              eval_batch_size=int(config.eval.batch_size), split=s.train_part, max_rounds=max_rounds,
                              log=lambda line: ctx.log("search: " + line))
    out = {**result.to_dict(), "seconds": time.time() - t0}
    n = len(s.selection.labels)
    desc = spec(config, s, eta).describe()
    arms = [report.arm(", ".join(e["sites"]) or "none", s.dmodel, "denoiser", s.model.param_count(),
                       [robustness.MCResult.from_per_chip(e["per_chip"], n, desc)], extra_param_count=e["params"],
                       train={"round": e["round"], "sites": e["sites"], "steps": out["config"]["steps"]})
            for e in out["evaluated"]]
    record = _result(config, arms, _held_out_split(s), n)
    record.update(out)   # evaluated, best, pareto, config (the search's settings), seconds
    report.write_json(ctx.result_path("search.json"), record)
    return {"best_sites": out["best"]["sites"], "best_gates": out["best"]["gates"], "best_mean": out["best"]["mean"]}


# ---------------------------------------------------------------------------------------------------------------
# Arms


def every_block_model(config):
    """The widest bottleneck (smallest reduction from ``denoiser.reduction``) at which a block after every residual
    block fits the budget; the narrowest (64) when none does (reported as is, over budget)."""
    for reduction in range(int(config.denoiser.reduction), 65):
        dm = denoised_model(config, reduction)
        gates = placement.every_block_placement(dm)
        if denoise.overhead(dm, gates)["param_overhead"] <= budget(config):
            break
    return dm, gates, {"reduction": reduction}


def arm_placement(ctx, name: str):
    """``(dmodel, gates, extra train info)`` of an arm (the same for the train, eval and report stages)."""
    config = ctx.config
    s = setup(config)
    reduction = {"reduction": int(config.denoiser.reduction)}
    if name == "searched":
        return s.dmodel, np.asarray(ctx.summaries["search"]["best_gates"], np.float32), reduction
    if name == "every_block":
        return every_block_model(config)
    if name == "random":
        gates = placement.random_placement(s.dmodel, budget(config), seed=int(config.seed),
                                           candidates=s.dmodel.candidate_sites[:-1])
        return s.dmodel, gates, {**reduction, "seed": int(config.seed)}
    if name == "most_sensitive":
        gains = ctx.summaries["sensitivity"]["gains"]
        return s.dmodel, placement.most_sensitive_placement(s.dmodel, gains, budget(config)), reduction
    raise ValueError(f"unknown arm {name!r}; choose among {ARMS}.")


def _train_steps(config) -> int:
    return common.cap(config, config.train.steps, TINY_STEPS)


def stage_train(name: str):
    def run(ctx):
        config = ctx.config
        s = setup(config)
        eta = float(ctx.summaries["level"]["target"])
        dm, gates, extra = arm_placement(ctx, name)
        if config.train.get("recipe", "steps") == "plateau":   # chunks until the held-out curve plateaus
            chunk, max_chunks, per_epoch = chunking(config, s, name)
            summary = train_until_plateau(ctx, s, name, dm, gates, loss(config, s, dm, eta),
                                          lr=float(config.train.lr), eta=eta, chunk=chunk, max_chunks=max_chunks,
                                          per_epoch=per_epoch, meta={"stage": f"train_{name}", "arm": name, **extra})
            return {"sites": [site for site, g in zip(dm.candidate_sites, gates) if g], **extra, **summary}
        dvars = denoise.init_variables(dm, s.variables, noise.name_key(s.key, "init"), placement=gates)
        steps, batch = _train_steps(config), common.batch(config, config.train.batch_size)
        tcfg = train.TrainConfig(epochs=-(-steps // (len(s.train_part) // batch)), batch_size=batch,
                                 learning_rate=float(config.train.lr), weight_decay=0.0, seed=int(config.seed),
                                 checkpoint_every=100, log_every=25)
        # The epoch-end clean evaluation of jaxnoise.train runs on the held-out images, never the test split.
        ds = dataclasses.replace(s.ds, train=s.train_part, test=s.selection)
        workdir = ctx.work_path("train", "")
        out, _ = denoise.train_denoisers(dm, ds, tcfg, workdir=workdir, variables=dvars,
                                         loss_fn=loss(config, s, dm, eta), progress=False, max_steps=steps,
                                         metadata={"arm": name, **extra})
        sites = [site for site, g in zip(dm.candidate_sites, gates) if g]
        checkpoint.save_npz(ctx.result_path("weights", f"{name}.npz"), out,
                            {"model": dm.name, "model_config": dict(dm.config), "stage": f"train_{name}",
                             "experiment": config.name, "sites": sites, "gates": [float(g) for g in gates],
                             "act_eta_train": eta, **extra}, overwrite=True)
        shutil.copyfile(os.path.join(workdir, train.METRICS_FILE), ctx.result_path("metrics", f"{name}.jsonl"))
        return {"sites": sites, **extra, **denoise.overhead(dm, gates)}
    return run


TINY_CHUNK_STEPS = 2
TINY_MAX_CHUNKS = 2


def chunking(config, s, name: str) -> tuple[int, int, int]:
    """``(steps per chunk, chunks at most, steps per epoch)``; in tiny mode the baseline trains 2 chunks of 2
    steps (the chunk loop), the other variants one (their losses and blocks)."""
    per_epoch = len(s.train_part) // int(config.train.batch_size)
    if config.tiny:
        return TINY_CHUNK_STEPS, TINY_MAX_CHUNKS if name == config.get("baseline") else 1, per_epoch
    chunk = int(config.train.chunk_steps) or per_epoch
    return chunk, -(-int(config.train.max_epochs) * per_epoch // chunk), per_epoch


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def stopped(curve: list[dict], patience: int, min_delta: float) -> bool:
    """True when the last ``patience`` points of ``curve`` (``{"mean"}`` each, in order) all failed to beat the
    best before them by more than ``min_delta``."""
    if len(curve) <= patience:
        return False
    best_before = max(p["mean"] for p in curve[:-patience])
    return all(p["mean"] <= best_before + min_delta for p in curve[-patience:])


def train_until_plateau(ctx, s, name: str, dm, gates, loss_fn, *, lr: float, eta: float, chunk: int,
                        max_chunks: int, per_epoch: int, meta: dict, patience: int | None = None,
                        seed: int | None = None) -> dict:
    """Trains the placed blocks of ``dm`` chunk by chunk (``chunk`` steps each, cosine schedule over
    ``max_chunks`` chunks) until :func:`stopped` says the held-out curve has plateaued (``patience`` chunks, default
    ``config.curve.patience``) or ``max_chunks`` are done.

    After each chunk the blocks are scored on the held-out images (``config.curve.n_chips`` chips at ``eta``,
    key ``name_key(s.key, "curve")``: the same chips every chunk and for every arm); the best chunk's variables
    (``weights/<name>.npz``) and the training log (``metrics/<name>.jsonl``) are written to the results dir, then
    the chunk's line to ``curves/<name>.jsonl`` there (the commit point of the chunk). Each chunk's training state
    is also kept in the results dir as a portable checkpoint (``resume/<stage work dir>/<name>.npz``: the blocks
    and their optimizer slots; :func:`jaxnoise.train.train`), deleted once the curve is complete. A stopped stage
    resumes from its work dir's checkpoints; without them (a fresh work dir, e.g. a new clone of the committed results) the training log is
    put back into the work dir and training resumes from the portable checkpoint, to the same result (data order
    and keys depend on the step only). Returns the curve's summary and the placement's overhead.

    ``seed`` (default ``config.seed``) is the training seed: the blocks' initialisation
    (``name_key(key(seed), "init")``), the data order and the training noise. The held-out chips stay those of
    ``config.seed``, so runs of different training seeds are scored on the same chips."""
    config = ctx.config
    seed = int(config.seed if seed is None else seed)
    dvars = denoise.init_variables(dm, s.variables, noise.name_key(jax.random.key(seed), "init"), placement=gates)
    total_steps = chunk * max_chunks
    tcfg = train.TrainConfig(epochs=-(-total_steps // per_epoch), batch_size=int(config.train.batch_size),
                             learning_rate=float(lr), weight_decay=0.0, seed=seed,
                             checkpoint_every=chunk, log_every=min(50, chunk))
    ds = dataclasses.replace(s.ds, train=s.train_part, test=s.selection)   # epoch evals: held-out, not test
    workdir = ctx.work_path("train", "")
    best_path = ctx.result_path("weights", f"{name}.npz")   # in the results: it outlives the work dir
    metrics_path = ctx.result_path("metrics", f"{name}.jsonl")
    curve_path = ctx.result_path("curves", f"{name}.jsonl")
    # Keyed by the stage's work dir name (settings digest and rerun count): a --rerun never resumes the old run.
    resume_path = ctx.result_path("resume", os.path.basename(os.path.normpath(ctx.stage_work_dir or ctx.work_dir)),
                                  f"{name}.npz")
    curve = read_jsonl(curve_path)
    curve_spec = spec(config, s, eta)
    n_chips = common.cap(config, config.curve.n_chips, TINY_CHIPS)
    meta = {"model": dm.name, "model_config": dict(dm.config), "experiment": config.name, "act_eta_train": eta,
            "sites": [site for site, g in zip(dm.candidate_sites, gates) if g], "gates": [float(g) for g in gates],
            **meta}
    patience = int(config.curve.patience if patience is None else patience)
    while len(curve) < max_chunks and not stopped(curve, patience, float(config.curve.min_delta)):
        k = len(curve) + 1
        work_metrics = os.path.join(workdir, train.METRICS_FILE)
        if (os.path.exists(resume_path) and os.path.exists(metrics_path) and not os.path.exists(work_metrics)
                and checkpoint.latest_step(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)) is None):
            os.makedirs(workdir, exist_ok=True)   # a fresh work dir: the log goes back with the portable state
            shutil.copyfile(metrics_path, work_metrics)
        out, _ = denoise.train_denoisers(dm, ds, tcfg, workdir=workdir, variables=dvars, loss_fn=loss_fn,
                                         progress=False, max_steps=k * chunk, metadata={"arm": name},
                                         portable_checkpoint=resume_path)
        with open(work_metrics, "rb") as f:   # right after training: the log matches the portable state
            log = f.read()
        io_lib.write_atomic(metrics_path, lambda f, log=log: f.write(log), binary=True)
        r = robustness.evaluate(dm, out, s.selection.images, s.selection.labels, curve_spec,
                                key=noise.name_key(s.key, "curve"), n_chips=n_chips,
                                batch_size=int(config.eval.batch_size), preprocess=s.ds.preprocess)
        best = max((p["mean"] for p in curve), default=-1.0)
        if r.mean > best:   # kept before the curve line: a resume after this point knows the best's weights
            checkpoint.save_npz(best_path, out, {**meta, "chunk": k, "step": k * chunk}, overwrite=True)
        point = {"chunk": k, "step": k * chunk, "epoch": k * chunk / per_epoch, "mean": r.mean,
                 "ci95": r.ci95, "n_chips": r.n_chips, "n_images": int(len(s.selection.labels)),
                 "per_chip": list(map(float, r.per_chip))}
        io_lib.append_lines(curve_path, [json.dumps(point) + "\n"])
        curve.append(point)
        ctx.log(f"{name}: chunk {k} (epoch {point['epoch']:.2f}): held-out {100 * r.mean:.2f}% "
                f"{robustness.format_ci95(r.ci95)}")
    if os.path.exists(resume_path):   # the curve is complete: nothing will resume from it
        os.remove(resume_path)
    best_point = max(curve, key=lambda p: p["mean"])
    if not os.path.exists(best_path):
        raise FileNotFoundError(f"{best_path}: the best chunk's weights of the curve {curve_path} are missing; "
                                f"--rerun train_{name} trains this variant again.")
    return {"chunks": len(curve), "best_chunk": best_point["chunk"], "best_epoch": best_point["epoch"],
            "best_held_out": best_point["mean"], **denoise.overhead(dm, gates)}


def eval_plan(config, level: dict, name: str) -> list[tuple[float, int]]:
    """``[(eta, n_chips)]`` of one arm: the target level, then (plain and searched) the side levels."""
    target = float(level["target"])
    if name in ("plain", "searched"):
        sides = [(float(e), common.cap(config, config.eval.level_chips, TINY_CHIPS)) for e in level["levels"]
                 if float(e) != target]
        return [(target, common.cap(config, config.eval.n_chips, TINY_CHIPS))] + sides
    return [(target, common.cap(config, config.eval.side_chips, TINY_CHIPS))]


def evaluate_arm(ctx, s: Setup, name: str, model, variables, plan: list[tuple[float, int]], *,
                 noise_free: bool) -> dict:
    """Evaluates one arm on the test split at every ``(eta, n_chips)`` of ``plan`` (chip ``i`` has the key
    ``fold_in(name_key(s.key, "eval"), i)`` in every arm), first noise-free when ``noise_free``; writes
    ``eval/<name>.json`` after each entry, and skips the entries it already holds (a stopped stage resumes)."""
    config = ctx.config
    test = test_split(config, s)
    path = ctx.result_path("eval", f"{name}.json")
    entries = common.read_json(path)["arms"][0]["eval"] if os.path.exists(path) else []
    if noise_free and not entries:
        entries.append(robustness.evaluate(model, variables, *common.eval_data(test), None,
                                           batch_size=int(config.eval.batch_size),
                                           preprocess=s.ds.preprocess).to_dict())
    done = {(act_eta(e), int(e["n_chips"])) for e in entries}
    for eta, n_chips in plan:
        if (eta, n_chips) in done:
            continue
        r = robustness.evaluate(model, variables, *common.eval_data(test), spec(config, s, eta),
                                key=noise.name_key(s.key, "eval"), n_chips=n_chips,
                                batch_size=int(config.eval.batch_size), preprocess=s.ds.preprocess)
        entries.append(r.to_dict())
        arm = report.arm(name, s.model, "clean" if name == "plain" else "denoiser", s.model.param_count(), entries)
        report.write_json(path, _result(config, [arm], "test", len(test)))
        ctx.log(f"eval: {name} at eta {eta}: {100 * r.mean:.2f}% {robustness.format_ci95(r.ci95)} "
                f"({n_chips} chips)")
    return {str(act_eta(e)): e["mean"] for e in entries}


def stage_eval(name: str):
    def run(ctx):
        config = ctx.config
        s = setup(config)
        if name == "plain":
            model, variables = s.model, s.variables
        else:
            model = arm_placement(ctx, name)[0]
            variables = checkpoint.load_variables(ctx.result_path("weights", f"{name}.npz"), model)
        return evaluate_arm(ctx, s, name, model, variables, eval_plan(config, level_record(ctx), name),
                            noise_free=name == "plain")
    return run


# ---------------------------------------------------------------------------------------------------------------
# Report


def stage_report(ctx):
    config = ctx.config
    s = setup(config)
    level = level_record(ctx)
    sens = common.read_json(ctx.result_path("sensitivity.json"))
    search = common.read_json(ctx.result_path("search.json"))
    plain = common.read_json(ctx.result_path("eval", "plain.json"))["arms"][0]["eval"]
    clean = plain[0]
    backbone_params = s.model.param_count()
    record_arms = [report.arm("plain", s.model, "clean", backbone_params, plain,
                              train={"pretrained": "random (tiny)" if config.tiny else config.pretrained})]
    costs = {}
    layers = denoise.analog_layers(s.model)
    steps = _train_steps(config)
    for name in config.arms:
        dm, gates, extra = arm_placement(ctx, name)
        over = denoise.overhead(dm, gates)
        sites = [site for site, g in zip(dm.candidate_sites, gates) if g]
        costs[name] = engine.placement_cost(denoise.block_shapes(dm, sites), layers, backbone_params=backbone_params)
        evals = common.read_json(ctx.result_path("eval", f"{name}.json"))["arms"][0]["eval"]
        record_arms.append(report.arm(name, s.model, "denoiser", backbone_params, evals,
                                      extra_param_count=over["params"],
                                      train={"sites": sites, "kind": config.denoiser.kind, **extra,
                                             **_length(config, ctx.summaries.get(f"train_{name}") or {}, steps),
                                             "lr": float(config.train.lr),
                                             "act_eta_train": level["target"],
                                             "batch_size": int(config.train.batch_size),
                                             "param_overhead": over["param_overhead"],
                                             "mac_overhead": over["mac_overhead"]}))
    removal = sens["removal"]
    record = _result(config, record_arms, "test", len(test_split(config, s)), levels=level, sensitivity={
        "removal_gain": {k: v["gain"] for k, v in removal["sites"].items()},
        "removal_ci95": {k: v["ci95"] for k, v in removal["sites"].items()},
        "gradient_norm": sens["gradient_norm"]})
    record["search"] = {k: search[k] for k in ("best", "pareto", "config", "seconds")}
    record["search"]["evaluated"] = [{k: v for k, v in e.items() if k != "per_chip"} for e in search["evaluated"]]
    record["engine"] = {name: {k: c[k] for k in ("totals", "mac_overhead", "latency_overhead", "param_overhead")}
                        for name, c in costs.items()}
    report.write_json(ctx.result_path("results.json"), record)
    io_lib.write_text_atomic(ctx.result_path("results.md"),
                             markdown(config, record, sens, search, costs, clean["mean"], backbone_params))
    plot_pareto(record, search, clean["mean"], backbone_params, ctx.result_path("pareto.png"))
    target = level["target"]
    return {a["name"]: next((e["mean"] for e in a["eval"] if act_eta(e) == target), None) for a in record_arms}


def _length(config, summary: dict, steps: int) -> dict:
    """How long an arm trained: its steps, or with the plateau recipe its chunks and best epoch."""
    if config.train.get("recipe", "steps") == "plateau":
        return {"recipe": "plateau", "chunks": summary.get("chunks"), "best_epoch": summary.get("best_epoch")}
    return {"train_steps": steps}


# The paper's headline (Azizi et al. 2024, abstract): 2.03% more parameters cut the average accuracy drop under
# noise from 31.7% to 1.15% (CIFAR-10 and ImageNet models; their noise model, not this one).
PAPER_POINT = {"param_overhead": 0.0203, "drop_before": 0.317, "drop_after": 0.0115}


def markdown(config, record, sens, search, costs, clean_acc: float, backbone_params: int) -> str:
    level = record["levels"]
    target = level["target"]
    model = "cnn (tiny)" if config.tiny else config.model
    lines = [f"# Denoising blocks on {model} ({record['dataset']['name']} test split, additive activation noise)", "",
             f"Command: `{record['command']}`", "",
             f"Clean accuracy of the pretrained model: {100 * clean_acc:.2f}%. Noise levels (picked on the held-out "
             f"training images, {level['protocol']}): target eta {target} (plain drop closest to "
             f"{100 * float(config.level.target_drop):.0f} points), side levels "
             f"{[e for e in level['levels'] if e != target]}.",
             "", "| arm | sites | params (% of backbone) | eta | n_chips | mean (%) | 95% CI (%) | p5 (%) | "
             "drop recovered |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    plain_at = {act_eta(e): e for e in record["arms"][0]["eval"] if e["activation_noise"] is not None}
    for a in record["arms"]:
        for e in a["eval"]:
            if e["activation_noise"] is None:
                continue
            eta = act_eta(e)
            rec = ""
            if a["name"] != "plain" and eta in plain_at:
                drop = clean_acc - plain_at[eta]["mean"]
                rec = f"{100 * (e['mean'] - plain_at[eta]['mean']) / drop:.0f}%" if drop else ""
            sites = ", ".join(a["train"].get("sites", [])) if a["name"] != "plain" else "-"
            pct = f"{a['extra_param_count']} ({100 * a['extra_param_count'] / backbone_params:.2f}%)"
            lines.append(f"| {a['name']} | {sites} | {pct} | {eta} | {e['n_chips']} | {100 * e['mean']:.2f} | "
                         f"{robustness.format_ci95(e['ci95'])} | {100 * e['p5']:.2f} | {rec} |")
    lines += ["", "'drop recovered' = (arm - plain) / (clean - plain) at the same eta, Monte Carlo means.", "",
              "## Sensitivity (held-out training images, target eta)", "",
              "| site | accuracy gained when its MVMs are noise-free (pts) | 95% CI | gradient norm |",
              "|---|---:|---:|---:|"]
    for site, v in sens["removal"]["sites"].items():
        lines.append(f"| {site} | {100 * v['gain']:.2f} | {robustness.format_ci95(v['ci95'])} | "
                     f"{sens['gradient_norm'][site]:.4f} |")
    cfg = search["config"]
    lines += ["", f"## Search ({cfg['strategy']}, budget {100 * cfg['budget']:.1f}%, {cfg['steps']} steps per "
              f"candidate, {cfg['n_chips']} chips on {cfg['n_eval_images']} held-out images; "
              f"{search['seconds']:.0f} s)", "",
              "| round | sites | params (%) | selection accuracy (%) |", "|---:|---|---:|---:|"]
    for e in search["evaluated"]:
        lines.append(f"| {e['round']} | {', '.join(e['sites']) or '-'} | {100 * e['param_overhead']:.2f} | "
                     f"{100 * e['mean']:.2f} |")
    lines += ["", "Pareto front (params % -> accuracy %): " + ", ".join(
        f"{100 * p['param_overhead']:.2f} -> {100 * p['mean']:.2f}" for p in search["pareto"]), "",
        "## Engine cost (jaxnoise.engine defaults; assumptions in its docstring)", ""]
    for name, c in costs.items():
        lines += [f"### {name}", "", engine.markdown(c), ""]
    return "\n".join(lines) + "\n"


def plot_pareto(record, search, clean_acc: float, backbone_params: int, path: str) -> None:
    """Left: the search's evaluated placements and Pareto front (selection set); right: the arms on the test split
    at the target level, with 95% CIs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (no pyplot: no global state)
    from matplotlib.figure import Figure  # noqa: PLC0415

    target = record["levels"]["target"]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2)
    pts = search["evaluated"]
    ax.scatter([100 * p["param_overhead"] for p in pts], [100 * p["mean"] for p in pts], s=12, c="0.6",
               label="evaluated (selection set)")
    front = search["pareto"]
    ax.plot([100 * p["param_overhead"] for p in front], [100 * p["mean"] for p in front], "o-", c="C0",
            label="Pareto front")
    ax.set_xlabel("denoiser parameters (% of backbone)")
    ax.set_ylabel("Monte Carlo accuracy (%)")
    ax.set_title(f"search at eta {target}")
    ax.legend()
    for i, a in enumerate(record["arms"]):
        for e in a["eval"]:
            if e["activation_noise"] and act_eta(e) == target:
                ci = e["ci95"]  # None with one chip: no error bar
                ax2.errorbar([100 * a["extra_param_count"] / backbone_params], [100 * e["mean"]],
                             yerr=None if ci is None else [[100 * (e["mean"] - ci[0])], [100 * (ci[1] - e["mean"])]],
                             fmt="o", c=f"C{i}", label=f"{a['name']} ({e['n_chips']} chips)", capsize=3)
    ax2.axhline(100 * clean_acc, ls="--", c="k", lw=0.8, label="clean")
    ax2.plot([100 * PAPER_POINT["param_overhead"]], [100 * (clean_acc - PAPER_POINT["drop_after"])], "k*", ms=9,
             label=f"paper: drop {100 * PAPER_POINT['drop_after']:.2f} pts at {100 * PAPER_POINT['param_overhead']:.2f}%"
                   f" (from {100 * PAPER_POINT['drop_before']:.1f}; its noise)")
    ax2.set_xlabel("denoiser parameters (% of backbone)")
    ax2.set_ylabel("test accuracy (%), 95% CI")
    ax2.set_title("arms on the test split")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    io_lib.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)


# ---------------------------------------------------------------------------------------------------------------


@protocol("denoise_placement")
def stages(config) -> list[Stage]:
    weight_noise(config)   # checked before anything runs
    unknown = [a for a in config.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"denoise_placement: unknown arms {unknown}; choose among {ARMS} (set arms=...).")
    level = BACKBONE_SETTINGS + common.stream_settings(config) + ("level", "eval.batch_size")
    sensitivity = level + ("search.n_chips", "search.grad_draws")
    search = sensitivity + ("denoiser", "search", "train.lr")
    arms = search + ("train",)
    out = [Stage("level", stage_level, settings=level, outputs=("level.json",)),
           Stage("sensitivity", stage_sensitivity, settings=sensitivity, outputs=("sensitivity.json",)),
           Stage("search", stage_search, settings=search, outputs=("search.json",))]
    for name in config.arms:
        # A plateau recipe's curve is an output too: a --rerun moves it aside instead of resuming into it.
        curve = (f"curves/{name}.jsonl",) if config.train.get("recipe", "steps") == "plateau" else ()
        out.append(Stage(f"train_{name}", stage_train(name), settings=arms,
                         outputs=(f"weights/{name}.npz", f"metrics/{name}.jsonl", *curve)))
    for name in ("plain", *config.arms):
        out.append(Stage(f"eval_{name}", stage_eval(name), settings=(level if name == "plain" else arms) + ("eval",),
                         outputs=(f"eval/{name}.json",)))
    out.append(Stage("report", stage_report, settings=None, outputs=("results.json", "results.md", "pareto.png")))
    return out
