"""Protocol ``consistency_quantized``: noise-aware training on a quantized network in the authors' group's convention.

Issue 16's experiment (Hou et al. 2024 in its own regime; ``../shared/PAPERS.md``): a pretrained float model, a
clean n-bit quantization-aware fine-tune (LSQ weights and activations: the reference arm), then noise-aware arms
from that checkpoint under additive noise sigma = eta * max|W_q| of each layer's quantized weights, the standard
normal clipped at +-``noise.truncate``.

Stages:

* ``qat``: the clean QAT fine-tune from the pretrained weights on the training images except the last
  ``held_out`` (kept for searches, never the test split); steps initialised by :func:`jaxnoise.quant.init_steps`
  on ``calib_images`` training images. Writes ``weights/qat.npz`` (variables with the learned steps, model config
  in its metadata), ``qat_metrics.jsonl`` (the training curve).
* ``eval_qat``: the reference on the full test split: noise-free accuracy, and Monte Carlo over ``eval.n_chips``
  chips at ``noise.eta`` (``eval_qat.json``, one MCResult each, with the quantization inside ``weight_noise``).
* ``search``: lambda, sites and distance of consistency by a short proxy on the held-out training images: each
  candidate of ``search.candidates`` (and forward-noise, lambda 0) fine-tunes ``search.steps`` steps from the QAT
  weights at ``noise.eta`` and is scored by its Monte Carlo mean over ``search.n_chips`` chips at ``noise.eta`` on
  the last ``held_out`` training images (never the test split); ``search.json`` holds every candidate (written as
  each finishes, so a stopped search resumes) and the winner. A candidate is ``lam``, ``sites`` (:func:`_sites`),
  ``distance`` and ``target`` (:data:`TARGETS`: the clean features of the same weights, the default, or of the
  frozen QAT reference).
* ``train_<arm>_s<seed>`` for each arm of ``arms.methods`` and seed of ``arms.seeds`` (seed = data order and
  noise keys): ``arms.epochs`` from the QAT weights at ``noise.eta``, the same schedule and budget for every arm;
  consistency with the searched settings. Writes ``weights/<arm>_s<seed>.npz`` and ``metrics/<arm>_s<seed>.jsonl``.
* ``eval_<arm>_s<seed>``: ``eval.n_chips`` chips at ``noise.eta`` on the full test split (chip i has the same key
  in every arm, so arms pair by chip), noise-free accuracy, and for seed ``arms.seeds[0]`` ``eval.grid_chips``
  chips at every scale of ``eval.grid`` (``eval/<arm>_s<seed>.json``).
* ``report``: ``results.json`` (shared format; every arm and seed), ``results.md`` (per seed: means, 95% CIs, 5th
  percentile chips, the paired per-chip difference consistency - forward-noise; over seeds: the mean difference
  with its 95% t interval), ``accuracy_vs_eta.png``.

``tiny=True`` runs the same stages on the digits CNN from random weights with a few steps (the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np

from jaxnoise import checkpoint, data, methods, noise, quant, report, robustness, stats, train
from jaxnoise import io as io_lib
from jaxnoise.models import IMAGENET_MODELS, get_model
from jaxnoise.protocols import common
from jaxnoise.stages import Stage, protocol

dataset = common.dataset
_first_held_out = common.first_held_out
_command = common.command
_result = common.result

_DATA = ("tiny", "dataset", "data_dir", "held_out")
_MODEL = ("tiny", "model", "pretrained", "quant", "calib_images")


def model_of(config, ds: data.Dataset):
    """The network (the same object for the same config, so stages reuse each other's compiled evaluations)."""
    return _model("cnn" if config.tiny else config.model, ds.num_classes, tuple(ds.image_shape),
                  json.dumps(config.quant.to_dict(), sort_keys=True), bool(config.tiny))


def _test(ds):
    return common.eval_data(ds.test)


@functools.lru_cache(maxsize=8)
def _model(name: str, num_classes: int, image_shape: tuple, quant_json: str, tiny: bool):
    q = quant.QuantSpec.from_config(json.loads(quant_json))
    if tiny:   # a small CNN: the tests run every stage
        return get_model("cnn", input_shape=image_shape, num_classes=num_classes, quant=q, channels=(8,))
    imagenet = {"input_shape": image_shape} if name in IMAGENET_MODELS else {}   # the streamed resolution
    return get_model(name, num_classes=num_classes, quant=q, **imagenet)


def train_split(config, ds: data.Dataset) -> data.Dataset:
    i = _first_held_out(config, ds)
    return dataclasses.replace(ds, train=common.head(ds.train, i))


def initial_variables(config, model, ds: data.Dataset):
    """The float starting point with quantizer steps added: the pretrained weights (random ones in tiny mode)."""
    if config.tiny:
        float_model = dataclasses.replace(model, quant=None)
        variables = jax.tree.map(np.asarray, float_model.init(jax.random.key(config.seed)))
        variables = {"params": {k: v for k, v in variables["params"].items()}, "batch_stats": variables["batch_stats"]}
    else:
        if not os.path.exists(config.pretrained):
            raise FileNotFoundError(f"pretrained weights {config.pretrained!r} not found: set pretrained= to the "
                                    f"{config.model} .npz (CIFAR-10: ../shared/pretrained; ImageNet: a torchvision "
                                    f"checkpoint converted with `jaxnoise convert-torch W.pth W.npz --model "
                                    f"{config.model}`).")
        variables = checkpoint.load_variables(config.pretrained, dataclasses.replace(model, quant=None))
    calib = ds.preprocess(data.calibration_images(train_split(config, ds).train, int(config.calib_images),
                                                  seed=config.seed))
    return quant.init_steps(model, variables, calib)


def train_config(config, section) -> train.TrainConfig:
    return train.TrainConfig(epochs=int(section.epochs), batch_size=common.batch(config, section.batch_size),
                             learning_rate=float(section.lr), weight_decay=float(section.weight_decay),
                             schedule=section.schedule, seed=int(config.seed))


def _max_steps(config):
    """The step limit of every training stage: ``max_steps`` (0: none); in tiny mode at most 12."""
    limit = int(config.max_steps) if config.max_steps else None
    return min(limit or 12, 12) if config.tiny else limit


def _chips(config, n):
    """Chips of a Monte Carlo evaluation; in tiny mode at most 4 (the tests)."""
    return min(int(n), 4) if config.tiny else int(n)


def stage_qat(ctx):
    config = ctx.config
    ds = dataset(config)
    model = model_of(config, ds)
    variables = initial_variables(config, model, ds)
    workdir = ctx.work_path("train", "")
    out, _ = train.train(model, train_split(config, ds), train_config(config, config.qat), workdir=workdir,
                         variables=variables, loss_fn=methods.clean(model), progress=False,
                         max_steps=_max_steps(config),
                         metadata={"init": "random (tiny)" if config.tiny else config.pretrained,
                                   "method": "clean QAT"})
    meta = {"model": model.name, "model_config": dict(model.config), "stage": "qat", "experiment": config.name}
    checkpoint.save_npz(ctx.result_path("weights", "qat.npz"), out, meta, overwrite=True)
    shutil.copyfile(os.path.join(workdir, "metrics.jsonl"), ctx.result_path("qat_metrics.jsonl"))
    clean = robustness.evaluate(model, out, *_test(ds), batch_size=int(config.eval.batch_size),
                                preprocess=ds.preprocess)
    ctx.log(f"qat: clean test accuracy {100 * clean.mean:.2f}%")
    metrics = train.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {"clean_test_accuracy": clean.mean, "steps": metrics[-1].get("step") if metrics else None}


def noise_spec(config, eta) -> noise.NoiseSpec:
    return noise.NoiseSpec(weight_kind="additive_rel_max", weight_eta=float(eta),
                           weight_truncate=float(config.noise.truncate) if config.noise.truncate else None)


def stage_eval_qat(ctx):
    config = ctx.config
    ds = dataset(config)
    model = model_of(config, ds)
    variables = _qat_variables(ctx, model)
    kw = dict(batch_size=int(config.eval.batch_size), preprocess=ds.preprocess)
    clean = robustness.evaluate(model, variables, *_test(ds), **kw)
    mc = robustness.evaluate(model, variables, *_test(ds), noise_spec(config, config.noise.eta),
                             key=jax.random.key(int(config.eval.key)), n_chips=_chips(config, config.eval.n_chips), **kw)
    arm = report.arm("qat", model, "clean QAT", model.param_count(), [clean, mc],
                     train={"epochs": int(config.qat.epochs), "lr": float(config.qat.lr), "seed": int(config.seed)})
    report.write_json(ctx.result_path("eval_qat.json"), _result(config, [arm], "test", len(ds.test)))
    ctx.log(f"eval_qat: clean {100 * clean.mean:.2f}%, eta {config.noise.eta}: {100 * mc.mean:.2f}% "
            f"{robustness.format_ci95(mc.ci95)} over {mc.n_chips} chips")
    return {"clean": clean.mean, "noisy_mean": mc.mean, "noisy_ci95": mc.ci95, "n_chips": mc.n_chips}


def _qat_variables(ctx, model):
    return checkpoint.load_variables(ctx.result_path("weights", "qat.npz"), model)


def _sites(text: str, model) -> tuple[str, ...] | None:
    """A consistency site set by name: ``""``/``"all"`` every named feature, ``"stages"`` the last block of each
    stage, or a comma-separated list."""
    if text in ("", "all"):
        return None
    if text == "stages":   # CIFAR ResNets: layer1/N, layer2/N, layer3/N; other models: their block features
        names = [f for f in model.feature_names if f.startswith("layer")]
        if not names:
            return tuple(f for f in model.feature_names if f not in ("stem", "pre_logits"))
        last = {}
        for f in names:
            last[f.split("/")[0]] = f
        return tuple(last.values())
    return tuple(t for t in text.split(",") if t)


TARGETS = {
    "same": "the trained weights themselves with the noise off (train mode): a target that moves with training",
    "teacher": "the QAT reference (weights/qat.npz), frozen, noise-free, in inference mode",
}
CANDIDATE_KEYS = ("lam", "sites", "distance", "target")


def make_arm_loss(config, model, method: str, chosen: dict | None, teacher: dict | None = None):
    """The training loss of an arm; ``chosen``: consistency's settings (``lam``, ``sites``, ``distance``,
    ``target``: a key of :data:`TARGETS`, default ``"same"``); ``teacher``: the QAT variables (``target="teacher"``)."""
    common = dict(eta_train=float(config.noise.eta), weight_truncate=float(config.noise.truncate) or None)
    if method == "forward_noise":
        return methods.forward_noise(model, **common)
    if method == "consistency":
        chosen = chosen or {}
        target = chosen.get("target", "same")
        if target == "teacher" and teacher is None:
            raise ValueError("target='teacher' needs the QAT variables (teacher=).")
        return methods.consistency(model, lam=float(chosen.get("lam", 1.0)), sites=_sites(chosen.get("sites", ""),
                                                                                            model),
                                   distance=chosen.get("distance", "nmse"),
                                   teacher=teacher if target == "teacher" else None, **common)
    raise ValueError(f"unknown arm method {method!r}; choose forward_noise or consistency.")


def check_candidates(config) -> None:
    """Refuses unknown keys and targets in ``search.candidates`` before anything runs."""
    for c in config.search.candidates:
        c = dict(c)
        unknown = sorted(set(c) - set(CANDIDATE_KEYS))
        if unknown:
            raise ValueError(f"search.candidates: unknown keys {unknown} in {c}; use {list(CANDIDATE_KEYS)}.")
        if c.get("target", "same") not in TARGETS:
            raise ValueError(f"search.candidates: target={c['target']!r} in {c}; choose one of {sorted(TARGETS)}.")


def _held_out(config, ds):
    return common.eval_data(common.tail(ds.train, _first_held_out(config, ds)))


def stage_search(ctx):
    config = ctx.config
    ds = dataset(config)
    model = model_of(config, ds)
    start = _qat_variables(ctx, model)
    x_h, y_h = _held_out(config, ds)
    n_h = len(x_h)
    path = ctx.result_path("search.json")   # a result file: one arm per candidate, written as each finishes
    done = {a["name"]: a for a in json.load(open(path))["arms"]} if os.path.exists(path) else {}
    split = f"train[{_first_held_out(config, ds)}:] (held out)"
    candidates = [("forward_noise", {"lam": 0.0})] + [("consistency", dict(c)) for c in config.search.candidates]
    if config.tiny:   # the tests: forward-noise and one candidate
        candidates = candidates[:2]
    section = config.search
    for method, cand in candidates:
        label = method if method == "forward_noise" else ", ".join(f"{k}={v}" for k, v in sorted(cand.items()))
        if label in done:
            continue
        workdir = ctx.work_path("".join(ch if ch.isalnum() else "_" for ch in label), "")
        tcfg = train.TrainConfig(epochs=1, batch_size=common.batch(config, config.arms.batch_size), learning_rate=float(config.arms.lr),
                                 weight_decay=float(config.arms.weight_decay), schedule="constant",
                                 seed=int(config.seed))
        out, _ = train.train(model, train_split(config, ds), tcfg, workdir=workdir, variables=start,
                             loss_fn=make_arm_loss(config, model, method, cand, teacher=start), progress=False,
                             max_steps=min(int(section.steps), 5) if config.tiny else int(section.steps))
        res = robustness.evaluate(model, out, x_h, y_h, noise_spec(config, config.noise.eta),
                                  key=jax.random.key(1000 + int(config.seed)), n_chips=_chips(config, section.n_chips),
                                  batch_size=int(config.eval.batch_size), preprocess=ds.preprocess)
        done[label] = report.arm(label, model, method, model.param_count(), [res],
                                 train={"settings": cand, "steps": int(section.steps), "lr": float(config.arms.lr),
                                        "schedule": "constant", "seed": int(config.seed),
                                        "eta_train": float(config.noise.eta)})
        report.write_json(path, _result(config, list(done.values()), split, n_h))
        ctx.log(f"search: {label}: {100 * res.mean:.2f}% {robustness.format_ci95(res.ci95)}")
    cons = {k: a for k, a in done.items() if a["method"] == "consistency"}
    best = max(cons, key=lambda k: cons[k]["eval"][0]["mean"])
    chosen = cons[best]["train"]["settings"]
    protocol = (f"{section.steps} steps (constant lr {config.arms.lr}) from the QAT weights at eta "
                f"{config.noise.eta}; Monte Carlo over {section.n_chips} chips at eta {config.noise.eta} on the last "
                f"{n_h} training images (held out; never the test split)")
    report.write_json(path, _result(config, list(done.values()), split, n_h, chosen=chosen, chosen_label=best,
                                    protocol=protocol))
    return {"chosen": chosen, "chosen_label": best, "chosen_mean": cons[best]["eval"][0]["mean"],
            "forward_noise_mean": done["forward_noise"]["eval"][0]["mean"]}


def _seeds(config) -> tuple[int, ...]:
    """The arms' seeds; in tiny mode at most two (the tests; two keep the interval over seeds)."""
    seeds = tuple(int(x) for x in config.arms.seeds)
    return seeds[:2] if config.tiny else seeds


def _arm_name(method, seed):
    return f"{method}_s{seed}"


def stage_train_arm(method, seed):
    def run(ctx):
        config = ctx.config
        ds = dataset(config)
        model = model_of(config, ds)
        chosen = ctx.summaries.get("search", {}).get("chosen") if method == "consistency" else None
        tcfg = train.TrainConfig(epochs=int(config.arms.epochs), batch_size=common.batch(config, config.arms.batch_size),
                                 learning_rate=float(config.arms.lr), weight_decay=float(config.arms.weight_decay),
                                 schedule=config.arms.schedule, seed=int(seed))
        workdir = ctx.work_path("train", "")
        start = _qat_variables(ctx, model)
        out, _ = train.train(model, train_split(config, ds), tcfg, workdir=workdir, variables=start,
                             loss_fn=make_arm_loss(config, model, method, chosen, teacher=start), progress=False,
                             max_steps=_max_steps(config),
                             metadata={"init": "weights/qat.npz", "method": method, "seed": int(seed),
                                       "consistency": chosen})
        name = _arm_name(method, seed)
        meta = {"model": model.name, "model_config": dict(model.config), "stage": f"train_{name}",
                "experiment": config.name, "method": method, "seed": int(seed), "consistency": chosen}
        checkpoint.save_npz(ctx.result_path("weights", f"{name}.npz"), out, meta, overwrite=True)
        shutil.copyfile(os.path.join(workdir, "metrics.jsonl"), ctx.result_path("metrics", f"{name}.jsonl"))
        metrics = train.read_metrics(os.path.join(workdir, "metrics.jsonl"))
        return {"steps": metrics[-1].get("step") if metrics else None, "consistency": chosen}
    return run


def stage_eval_arm(method, seed):
    def run(ctx):
        config = ctx.config
        ds = dataset(config)
        model = model_of(config, ds)
        name = _arm_name(method, seed)
        variables = checkpoint.load_variables(ctx.result_path("weights", f"{name}.npz"), model)
        kw = dict(batch_size=int(config.eval.batch_size), preprocess=ds.preprocess)
        key = jax.random.key(int(config.eval.key))   # the same chips in every arm: arms pair by chip
        clean = robustness.evaluate(model, variables, *_test(ds), **kw)
        target = robustness.evaluate(model, variables, *_test(ds),
                                     noise_spec(config, config.noise.eta), key=key,
                                     n_chips=_chips(config, config.eval.n_chips), **kw)
        grid = []
        if int(seed) == int(_seeds(config)[0]):
            etas = [float(e) for e in config.eval.grid if float(e) != float(config.noise.eta)]
            spec = noise_spec(config, 0.0)
            grid = robustness.sweep(model, variables, *_test(ds), spec, weight_etas=etas,
                                    key=key, n_chips=_chips(config, config.eval.grid_chips), **kw) if etas else []
        arm = report.arm(name, model, method, model.param_count(), [clean, target, *grid],
                         train={"epochs": int(config.arms.epochs), "lr": float(config.arms.lr), "seed": int(seed),
                                "eta_train": float(config.noise.eta),
                                "consistency": ctx.summaries.get("search", {}).get("chosen")
                                if method == "consistency" else None})
        report.write_json(ctx.result_path("eval", f"{name}.json"),
                          _result(config, [arm], "test", len(ds.test), seed=int(seed)))
        ctx.log(f"eval {name}: clean {100 * clean.mean:.2f}%, eta {config.noise.eta}: {100 * target.mean:.2f}% "
                f"{robustness.format_ci95(target.ci95)}")
        return {"clean": clean.mean, "target_mean": target.mean, "target_ci95": target.ci95}
    return run


def stage_report(ctx):
    """Every arm of the per-stage result files in one result file, with the method comparison."""
    config = ctx.config
    qat = json.load(open(ctx.result_path("eval_qat.json")))["arms"][0]
    evals = {}   # (method, seed) -> the arm, its eval entries [noise-free, at eta, grid...]
    for method in config.arms.methods:
        for seed in _seeds(config):
            path = ctx.result_path("eval", f"{_arm_name(method, seed)}.json")
            evals[(method, int(seed))] = json.load(open(path))["arms"][0]
    q_clean, q_noisy = qat["eval"][:2]
    n_test = int(q_clean["n_images"])
    comparison = {}
    if {"forward_noise", "consistency"} <= set(config.arms.methods):
        per_seed = []
        for seed in (int(s) for s in _seeds(config)):
            c, f = evals[("consistency", seed)]["eval"][1], evals[("forward_noise", seed)]["eval"][1]
            d = stats.paired(c["per_chip"], f["per_chip"])
            per_seed.append({"seed": seed, "consistency": c["mean"], "forward_noise": f["mean"], **d.to_dict()})
        comparison = {"per_seed": per_seed, "over_seeds": stats.over_seeds([p["mean"] for p in per_seed]).to_dict(),
                      "what": f"consistency - forward_noise at eta {config.noise.eta} (accuracy, fraction); per seed "
                              f"the paired per-chip difference, over seeds the t interval of the per-seed means"}
    record = _result(config, [qat, *evals.values()], "test", n_test, comparison=comparison,
                     reference={"qat_clean": q_clean["mean"], "qat_noisy": q_noisy["mean"]})
    report.write_json(ctx.result_path("results.json"), record)
    lines = [f"# {config.name}", "", f"Test split, {n_test} images; noise sigma = {config.noise.eta} max|W_q| "
             f"(normal clipped at +-{config.noise.truncate}); {q_noisy['n_chips']} chips per arm and seed.", "",
             "| arm | noise-free | at eta (mean) | 95% CI | p5 chip |", "|---|---:|---:|---|---:|"]
    for arm in [qat, *evals.values()]:
        clean, t = arm["eval"][:2]
        lines.append(f"| {arm['name']} | {100 * clean['mean']:.2f} | {100 * t['mean']:.2f} | "
                     f"{robustness.format_ci95(t['ci95'])} | {100 * t['p5']:.2f} |")
    if comparison:
        lines += ["", "consistency - forward_noise (points):", "", "| seed | difference | paired 95% CI (chips) |",
                  "|---|---:|---|"]
        for p in comparison["per_seed"]:
            lines.append(f"| {p['seed']} | {100 * p['mean']:+.2f} | "
                         f"{robustness.format_ci95(p['ci95'], signed=True)} |")
        o = comparison["over_seeds"]
        lines.append(f"| mean over {o['n']} seeds | {100 * o['mean']:+.2f} | "
                     f"{robustness.format_ci95(o['ci95'], signed=True)} (over seeds) |")
    io_lib.write_text_atomic(ctx.result_path("results.md"), "\n".join(lines) + "\n")
    report.plot_sweep(record, ctx.result_path("accuracy_vs_eta.png"))
    return {"comparison": comparison.get("over_seeds"), "qat_clean": q_clean["mean"]}


@protocol("consistency_quantized")
def stages(config) -> list[Stage]:
    check_candidates(config)
    base = _DATA + common.stream_settings(config) + _MODEL + ("seed", "qat", "max_steps")
    arms = base + ("noise", "arms", "search")
    out = [
        Stage("qat", stage_qat, settings=base, outputs=("weights/qat.npz", "qat_metrics.jsonl")),
        Stage("eval_qat", stage_eval_qat, settings=base + ("noise", "eval.n_chips", "eval.batch_size", "eval.key"),
              outputs=("eval_qat.json",)),
    ]
    if "consistency" in config.arms.methods:
        out.append(Stage("search", stage_search, settings=base + ("noise", "search", "arms.lr", "arms.batch_size",
                                                                   "arms.weight_decay", "eval.batch_size"),
                         outputs=("search.json",)))
    for seed in _seeds(config):   # seed by seed, each evaluated as soon as it is trained: early evidence
        for method in config.arms.methods:
            name = _arm_name(method, seed)
            out.append(Stage(f"train_{name}", stage_train_arm(method, seed), settings=arms,
                             outputs=(f"weights/{name}.npz",)))
        for method in config.arms.methods:
            name = _arm_name(method, seed)
            out.append(Stage(f"eval_{name}", stage_eval_arm(method, seed), settings=arms + ("eval",),
                             outputs=(f"eval/{name}.json",)))
    out.append(Stage("report", stage_report, settings=None, outputs=("results.json", "results.md")))
    return out
