"""Protocol ``consistency_float``: clean vs forward-noise vs consistency regularisation on a float network.

Hou et al. 2024's comparison (``../shared/PAPERS.md``) fine-tuned from a pretrained float model, as
``experiments/consistency_cifar.py`` ran it (that script now points here). Weight noise of training and of the
search: ``additive_rel_max`` (sigma = eta * max|W| per kernel).

Stages:

* ``search``: eta_train of both noise-aware arms. Each candidate of ``search.etas`` fine-tunes forward-noise
  ``search.steps`` steps (constant lr ``train.lr``) from the pretrained weights on the training images except the
  last ``held_out``, and is scored by its Monte Carlo mean at additive_rel_max ``eval.target_eta`` over
  ``search.n_chips`` chips (key ``1000 + seed``) on the last ``held_out`` training images (never the test split).
  The best mean wins. ``search.json`` (one arm per candidate, written as each finishes, so a stopped search
  resumes) holds the table, ``chosen`` and ``protocol``.
* ``train_<arm>`` for each arm of ``arms`` (``clean``, ``forward_noise``, ``consistency``): ``train.epochs`` from
  the pretrained weights on the whole training split, the same budget, seed, schedule and data order for every
  arm; the noise-aware arms at the chosen eta_train with ``loss`` (lambda, sites, distance, K draws). Writes
  ``weights/<arm>.npz`` and ``metrics/<arm>.jsonl``.
* ``eval_<arm>``: the full test split, for each weight-noise convention of ``eval.kinds`` at ``eval.etas``:
  ``eval.n_chips`` chips at ``eval.target_eta``, ``eval.grid_chips`` at the other scales, and the noise-free
  accuracy; chip ``i`` has key ``fold_in(key(seed), i)`` in every arm (arms pair by chip). ``eval/<arm>.json``
  (written as each setting finishes; a stopped evaluation resumes).
* ``ablation``: consistency with other lambdas, site sets (``"stages"``: the last block of each stage; logits with
  KL) and K = 2 draws, each under the search protocol at the chosen eta_train (``ablation.json``, written as each
  run finishes); lambda = 0 is forward-noise, in the search table.
* ``report``: ``results_<kind>.json`` (shared format, one file per convention, with the eta_train search, the
  ablation, the convention mapping max|W| / rms(W) of the pretrained kernels and the consistency - forward_noise
  differences with Welch and paired 95% CIs), ``results.md`` and ``accuracy_vs_eta_<kind>.png``.

``tiny=True`` runs the same stages on digits with a one-block CNN from random weights: at most 3 search steps and 4
training steps, 4 chips, the first 2 search etas, the first ablation run and as many test images as held-out ones
(the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
from flax import traverse_util

from jaxnoise import checkpoint, data, methods, noise, report, robustness, stats, train
from jaxnoise import io as io_lib
from jaxnoise.models import get_model
from jaxnoise.protocols import common
from jaxnoise.stages import Stage, protocol

dataset = common.dataset
first_held_out = common.first_held_out
_command = common.command
_result = common.result

ARMS = ("clean", "forward_noise", "consistency")
TINY_CHANNELS = (8,)      # the tiny-mode CNN: one conv block keeps every compile short (the tests' budget)
TINY_MAX_STEPS = 4
TINY_SEARCH_STEPS = 3
TINY_CHIPS = 4
TINY_SEARCH_ETAS = 2      # the first search etas in tiny mode
TINY_ABLATION_RUNS = 1    # the first ablation runs in tiny mode

_DATA = ("tiny", "dataset", "data_dir", "held_out")
_MODEL = ("tiny", "model", "pretrained", "seed")


# ---------------------------------------------------------------------------------------------------------------
# Data, model, losses


def model_of(config, ds: data.Dataset):
    """The network (the same object for the same config, so stages reuse each other's compiled evaluations)."""
    return _model("cnn" if config.tiny else config.model, ds.num_classes, tuple(ds.image_shape), bool(config.tiny))


@functools.lru_cache(maxsize=8)
def _model(name: str, num_classes: int, image_shape: tuple, tiny: bool):
    if tiny:
        return get_model("cnn", input_shape=image_shape, num_classes=num_classes, channels=TINY_CHANNELS)
    return get_model(name, num_classes=num_classes)


def pretrained(config, model) -> dict:
    """The starting point of every run: the pretrained weights (random ones from ``seed`` in tiny mode)."""
    if config.tiny:
        return jax.tree.map(np.asarray, model.init(jax.random.key(int(config.seed))))
    if not os.path.exists(config.pretrained):
        raise FileNotFoundError(f"pretrained weights {config.pretrained!r} not found: set pretrained= to the "
                                f"{config.model} CIFAR-10 .npz (../shared/pretrained).")
    return checkpoint.load_variables(config.pretrained, model)


def test_split(config, ds: data.Dataset) -> data.Split:
    """The evaluation images: the test split; in tiny mode its first ones, as many as the held-out images (one
    compiled Monte Carlo program then serves the search and the evaluation)."""
    if not config.tiny:
        return ds.test
    n = len(ds.train.labels) - first_held_out(config, ds)
    return data.Split(ds.test.images[:n], ds.test.labels[:n])



def _max_steps(config) -> int | None:
    """The step limit of the arms' training: ``max_steps`` (0: none); in tiny mode at most 4."""
    limit = int(config.max_steps) or None
    return min(limit or TINY_MAX_STEPS, TINY_MAX_STEPS) if config.tiny else limit


def train_config(config, *, epochs: int | None = None, schedule: str | None = None) -> train.TrainConfig:
    t = config.train
    return train.TrainConfig(epochs=int(epochs or t.epochs), batch_size=int(t.batch_size),
                             learning_rate=float(t.lr), weight_decay=float(t.weight_decay),
                             schedule=schedule or t.schedule, seed=int(config.seed))


def sites_of(text: str, model) -> tuple[str, ...] | None:
    """A consistency site set by name: ``""``/``"all"`` every named feature (None), ``"stages"`` the last block
    of each stage (the CIFAR ResNets: ``layer1/N, layer2/N, layer3/N``; models without stages: every feature but
    ``stem`` and ``pre_logits``), or a comma-separated list of feature names."""
    if text in ("", "all"):
        return None
    if text == "stages":
        blocks = [f for f in model.feature_names if f.startswith("layer")]
        if not blocks:
            return tuple(f for f in model.feature_names if f not in ("stem", "pre_logits"))
        last = {}
        for f in blocks:
            last[f.split("/")[0]] = f
        return tuple(last.values())
    return tuple(t for t in text.split(",") if t)


def make_loss(config, model, method: str, eta_train: float, **overrides):
    """The loss of an arm; ``overrides`` replace fields of ``config.loss`` (lam, sites, distance, num_draws)."""
    loss = {**config.loss.to_dict(), **overrides}
    if method == "clean":
        return methods.clean(model)
    if method == "forward_noise":
        return methods.forward_noise(model, eta_train=float(eta_train), n_draws=int(loss["num_draws"]))
    if method == "consistency":
        return methods.consistency(model, eta_train=float(eta_train), lam=float(loss["lam"]),
                                   sites=sites_of(loss["sites"], model), distance=loss["distance"],
                                   n_draws=int(loss["num_draws"]))
    raise ValueError(f"unknown arm {method!r}; choose clean, forward_noise or consistency.")


def weight_spec(kind: str | None, eta: float) -> noise.NoiseSpec | None:
    return None if kind is None else noise.NoiseSpec(weight_kind=kind, weight_eta=float(eta))


# ---------------------------------------------------------------------------------------------------------------
# Result records


def _read_arms(path: str) -> dict[str, dict]:
    """``{arm name: arm}`` of a result file written so far ({} when absent): what a resumed stage skips."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {a["name"]: a for a in json.load(f)["arms"]}


# ---------------------------------------------------------------------------------------------------------------
# The search protocol (search and ablation)


def search_protocol(config, n_held_out: int, n_first: int) -> str:
    steps = common.cap(config, config.search.steps, TINY_SEARCH_STEPS)
    return (f"fine-tune from the pretrained weights for {steps} steps, constant lr {config.train.lr}, batch "
            f"{config.train.batch_size}, training images 0-{n_first - 1}; accuracy at additive_rel_max eta "
            f"{config.eval.target_eta} over {common.cap(config, config.search.n_chips, TINY_CHIPS)} chips on training "
            f"images {n_first}-{n_first + n_held_out - 1} (held out; never the test split)")


def short_run(ctx, model, ds: data.Dataset, slug: str, loss_fn) -> robustness.MCResult:
    """``search.steps`` steps (constant lr) from the pretrained weights on the training images before the
    held-out ones, then Monte Carlo at additive_rel_max ``eval.target_eta`` over ``search.n_chips`` chips on the
    held-out images."""
    config = ctx.config
    cut = first_held_out(config, ds)
    search_ds = dataclasses.replace(ds, train=data.Split(ds.train.images[:cut], ds.train.labels[:cut]))
    out, _ = train.train(model, search_ds, train_config(config, epochs=1, schedule="constant"),
                         workdir=ctx.work_path(slug, ""), variables=pretrained(config, model), loss_fn=loss_fn,
                         max_steps=common.cap(config, config.search.steps, TINY_SEARCH_STEPS), progress=False)
    return robustness.evaluate(model, out, ds.train.images[cut:], ds.train.labels[cut:],
                               weight_spec("additive_rel_max", config.eval.target_eta),
                               key=jax.random.key(1000 + int(config.seed)),
                               n_chips=common.cap(config, config.search.n_chips, TINY_CHIPS),
                               batch_size=int(config.eval.batch_size), preprocess=ds.preprocess)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _search_etas(config) -> list[float]:
    etas = [float(e) for e in config.search.etas]
    return etas[:TINY_SEARCH_ETAS] if config.tiny else etas


def stage_search(ctx):
    config = ctx.config
    ds = dataset(config)
    model = model_of(config, ds)
    cut = first_held_out(config, ds)
    n_held = len(ds.train.labels) - cut
    path = ctx.result_path("search.json")
    done = _read_arms(path)
    split = f"train[{cut}:] (held out)"
    for eta in _search_etas(config):
        name = f"forward_noise eta_train={eta}"
        if name in done:
            continue
        res = short_run(ctx, model, ds, f"search_{eta}", make_loss(config, model, "forward_noise", eta))
        done[name] = report.arm(name, model, "forward_noise", model.param_count(), [res],
                                train={"eta_train": eta, "steps": common.cap(config, config.search.steps,
                                                                       TINY_SEARCH_STEPS),
                                       "lr": float(config.train.lr), "schedule": "constant",
                                       "seed": int(config.seed)})
        report.write_json(path, _result(config, list(done.values()), split, n_held))
        ctx.log(f"search: eta_train {eta}: {100 * res.mean:.2f}% {robustness.format_ci95(res.ci95)}")
    best = max(done.values(), key=lambda a: a["eval"][0]["mean"])
    chosen = float(best["train"]["eta_train"])
    report.write_json(path, _result(config, list(done.values()), split, n_held, chosen=chosen,
                                    protocol="forward_noise: " + search_protocol(config, n_held, cut)))
    ctx.log(f"search: chose eta_train={chosen}")
    return {"chosen": chosen, "means": {a["train"]["eta_train"]: a["eval"][0]["mean"] for a in done.values()}}


def _eta_train(ctx) -> float:
    return float(ctx.summaries["search"]["chosen"])


def _ablation_runs(config) -> list[dict]:
    runs = [dict(r) for r in config.ablation.runs]
    return runs[:TINY_ABLATION_RUNS] if config.tiny else runs


def stage_ablation(ctx):
    config = ctx.config
    ds = dataset(config)
    model = model_of(config, ds)
    eta_train = _eta_train(ctx)
    cut = first_held_out(config, ds)
    n_held = len(ds.train.labels) - cut
    path = ctx.result_path("ablation.json")
    done = _read_arms(path)
    for run in _ablation_runs(config):
        name, method = run.pop("name"), run.pop("method")
        if name in done:
            continue
        loss_fn = make_loss(config, model, method, eta_train, **run)
        res = short_run(ctx, model, ds, "ablation_" + _slug(name), loss_fn)
        sites = sites_of({**config.loss.to_dict(), **run}["sites"], model)
        done[name] = report.arm(name, model, method, model.param_count(), [res],
                                train={"method": method, "overrides": run, "eta_train": eta_train,
                                       "sites": None if sites is None else list(sites)})
        report.write_json(path, _result(config, list(done.values()), f"train[{cut}:] (held out)", n_held,
                                        protocol=search_protocol(config, n_held, cut)))
        ctx.log(f"ablation: {name}: {100 * res.mean:.2f}% {robustness.format_ci95(res.ci95)}")
    return {"means": {k: a["eval"][0]["mean"] for k, a in done.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Arms


def stage_train(arm: str):
    def run(ctx):
        config = ctx.config
        ds = dataset(config)
        model = model_of(config, ds)
        eta_train = None if arm == "clean" else _eta_train(ctx)
        workdir = ctx.work_path("train", "")
        init = "random (tiny)" if config.tiny else config.pretrained
        out, _ = train.train(model, ds, train_config(config), workdir=workdir, variables=pretrained(config, model),
                             loss_fn=make_loss(config, model, arm, eta_train or 0.0), progress=False,
                             max_steps=_max_steps(config), metadata={"init": init, "method": arm})
        meta = checkpoint.read_metadata(workdir)
        checkpoint.save_npz(ctx.result_path("weights", f"{arm}.npz"), out,
                            {"model": model.name, "model_config": dict(model.config), "stage": f"train_{arm}",
                             "experiment": config.name, "method": arm, "eta_train": eta_train, "init": init},
                            overwrite=True)
        shutil.copyfile(os.path.join(workdir, train.METRICS_FILE), ctx.result_path("metrics", f"{arm}.jsonl"))
        history = train.read_metrics(os.path.join(workdir, train.METRICS_FILE))
        epochs = [r for r in history if r["type"] == "epoch"]
        return {"init": meta.get("init"), "eta_train": eta_train, "loss": meta.get("loss"),
                "loss_config": meta.get("loss_config"), "hparams": meta.get("hparams"),
                "steps": meta.get("step"),
                "final_clean_test_accuracy_train_mode_log": epochs[-1]["test_accuracy"] if epochs else None,
                "train_seconds": round(history[-1]["elapsed"], 1) if history else None}
    return run


def eval_plan(config) -> list[tuple[str | None, float, int]]:
    """One arm's evaluations ``(kind or None, eta, n_chips)``: the target scale of each convention first (the
    claim), then the noise-free accuracy, then the rest of the grid."""
    etas = [float(e) for e in config.eval.etas]
    target = float(config.eval.target_eta)
    n_target = common.cap(config, config.eval.n_chips, TINY_CHIPS)
    n_grid = common.cap(config, config.eval.grid_chips, TINY_CHIPS)
    plan = [(kind, target, n_target) for kind in config.eval.kinds if target in etas]
    plan.append((None, 0.0, 1))
    plan += [(kind, eta, n_grid) for kind in config.eval.kinds for eta in etas if eta not in (0.0, target)]
    return plan


def _setting(entry: dict) -> tuple[str | None, float, int]:
    w = entry["weight_noise"]
    return (None, 0.0, 1) if w is None else (w["kind"], float(w["eta"]), int(entry["n_chips"]))


def stage_eval(arm: str):
    def run(ctx):
        config = ctx.config
        ds = dataset(config)
        model = model_of(config, ds)
        variables = checkpoint.load_variables(ctx.result_path("weights", f"{arm}.npz"), model)
        path = ctx.result_path("eval", f"{arm}.json")
        done = {_setting(e): e for a in _read_arms(path).values() for e in a["eval"]}
        train_info = _arm_train_info(ctx, arm)
        test = test_split(config, ds)
        for kind, eta, n_chips in eval_plan(config):
            if (kind, eta, n_chips) in done:
                continue
            spec = weight_spec(kind, eta)
            res = robustness.evaluate(model, variables, test.images, test.labels, spec,
                                      key=None if spec is None else jax.random.key(int(config.seed)),
                                      n_chips=n_chips, batch_size=int(config.eval.batch_size),
                                      preprocess=ds.preprocess)
            done[(kind, eta, n_chips)] = res.to_dict()
            record_arm = report.arm(arm, model, arm, model.param_count(), list(done.values()), train=train_info)
            report.write_json(path, _result(config, [record_arm], "test", len(test.labels)))
            ctx.log(f"eval {arm}: {kind or 'noise-free'} eta={eta:g} ({n_chips} chips): {100 * res.mean:.2f}% "
                    f"{robustness.format_ci95(res.ci95)} p5 {100 * res.p5:.2f}")
        return {f"{kind or 'clean'}_{eta:g}": e["mean"] for (kind, eta, _), e in done.items()}
    return run


def _arm_train_info(ctx, arm: str) -> dict:
    """What defines an arm's training run (the ``train`` field of its result entries)."""
    config = ctx.config
    t = ctx.summaries.get(f"train_{arm}", {})
    return {"init": t.get("init"), "epochs": int(config.train.epochs), "seed": int(config.seed),
            "lr": float(config.train.lr), "schedule": config.train.schedule, "batch_size": int(config.train.batch_size),
            "weight_decay": float(config.train.weight_decay), "eta_train": t.get("eta_train"), "loss": t.get("loss"),
            "loss_config": t.get("loss_config"), "hparams": t.get("hparams"),
            "final_clean_test_accuracy_train_mode_log": t.get("final_clean_test_accuracy_train_mode_log"),
            "train_seconds": t.get("train_seconds")}


# ---------------------------------------------------------------------------------------------------------------
# Report


def eta_mapping(variables) -> dict:
    """max|W| / rms(W) of every kernel: additive_rel_max eta is a per-weight sigma of eta * that ratio in units of
    rms(W), while multiplicative eta is sigma = eta * |w| (rms eta * rms(W))."""
    ratios = [float(np.max(np.abs(w)) / np.sqrt(np.mean(np.square(w))))
              for path, w in traverse_util.flatten_dict(variables["params"], sep="/").items()
              if path.endswith("kernel")]
    median = float(np.median(ratios))
    return {"max_over_rms_per_kernel": ratios, "median": median, "min": min(ratios), "max": max(ratios),
            "additive_0.2_sigma_in_rms_W": 0.2 * median, "additive_equivalent_of_multiplicative_0.2": 0.2 / median}


def comparisons(entries: dict, kinds) -> list[dict]:
    """consistency - forward_noise at every scale both evaluated with >= 2 chips: Welch and paired 95% CIs."""
    out = []
    for kind in kinds:
        for eta in sorted({k[2] for k in entries if k[1] == kind}):
            a, b = entries.get(("consistency", kind, eta)), entries.get(("forward_noise", kind, eta))
            if not a or not b or a["n_chips"] < 2:
                continue
            w, p = stats.welch(a["per_chip"], b["per_chip"]), stats.paired(a["per_chip"], b["per_chip"])
            out.append({"weight_noise": {"kind": kind, "eta": eta}, "a": "consistency", "b": "forward_noise",
                        "n_chips": a["n_chips"], "diff": w.mean, "ci95_welch": None if w.ci95 is None else list(w.ci95),
                        "diff_paired": p.mean, "ci95_paired": None if p.ci95 is None else list(p.ci95)})
    return out



def stage_report(ctx):
    config = ctx.config
    ds = dataset(config)
    model = model_of(config, ds)
    kinds = list(config.eval.kinds)
    arms, entries = [], {}
    for name in config.arms:
        arm = common.read_json(ctx.result_path("eval", f"{name}.json"))["arms"][0]
        arm["eval"].sort(key=lambda e: ((e["weight_noise"] or {}).get("kind", ""),
                                        (e["weight_noise"] or {}).get("eta", 0)))
        for e in arm["eval"]:
            kind, eta, _ = _setting(e)
            entries[(name, kind, eta)] = e
        arms.append(arm)
    search = common.read_json(ctx.result_path("search.json"))
    search_record = {"candidates": {str(a["train"]["eta_train"]): a["eval"][0] for a in search["arms"]},
                     "chosen": search["chosen"], "protocol": search["protocol"]}
    mapping = eta_mapping(pretrained(config, model))
    n_test = len(test_split(config, ds).labels)
    record = _result(config, arms, "test", n_test, eta_train_search=search_record, eta_mapping=mapping)
    if os.path.exists(ctx.result_path("ablation.json")):
        ablation = common.read_json(ctx.result_path("ablation.json"))
        record["ablation"] = {"runs": {a["name"]: {**{k: a["train"][k] for k in ("method", "overrides", "eta_train")},
                                                   **a["eval"][0]} for a in ablation["arms"]},
                              "protocol": ablation["protocol"]}
    record["comparisons"] = comps = comparisons(entries, kinds)
    per_kind = {}
    for kind in kinds:
        # One file per convention, so that `check_results.py --compare` never mixes conventions.
        per_kind[kind] = sub = dict(
            record, experiment=f"{record['experiment']}_{kind}",
            arms=[dict(a, eval=[e for e in a["eval"] if e["weight_noise"] is None or e["weight_noise"]["kind"] == kind])
                  for a in record["arms"]],
            comparisons=[c for c in comps if c["weight_noise"]["kind"] == kind])
        report.write_json(ctx.result_path(f"results_{kind}.json"), sub)
    io_lib.write_text_atomic(ctx.result_path("results.md"), markdown(config, record, entries, n_test))
    for kind, sub in per_kind.items():
        report.plot_sweep(sub, ctx.result_path(f"accuracy_vs_eta_{kind}.png"), noise="weight")
    at = float(config.eval.target_eta)
    return {"comparisons_at_target": [c for c in comps if c["weight_noise"]["eta"] == at],
            "eta_train": search["chosen"]}


def markdown(config, record: dict, entries: dict, n_test: int) -> str:
    """``results.md``: per convention a pivot table (arm x eta), the convention mapping, the short runs, every
    entry and the differences consistency - forward_noise."""
    fmt = robustness.format_ci95
    lines = []
    for kind in config.eval.kinds:
        etas = sorted({k[2] for k in entries if k[1] == kind} | {0.0})
        lines += [f"Weight noise `{kind}`: accuracy (%) on the {n_test} test images, mean over chips [95% CI] "
                  f"(5th-percentile chip); eta 0 is the noise-free network.", "",
                  "| arm | " + " | ".join(f"eta {e:g}" for e in etas) + " |", "|---|" + "---|" * len(etas)]
        for arm in config.arms:
            cells = []
            for eta in etas:
                e = entries.get((arm, None if eta == 0 else kind, eta))
                cells.append("" if e is None else f"{100 * e['mean']:.2f} {fmt(e['ci95'], missing='')}"
                             f" ({100 * e['p5']:.2f}) n={e['n_chips']}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    m = record["eta_mapping"]
    lines += [f"Convention mapping: over the {len(m['max_over_rms_per_kernel'])} pretrained kernels, max|W| / rms(W) "
              f"has median {m['median']:.2f} (min {m['min']:.2f}, max {m['max']:.2f}): additive_rel_max eta 0.2 is a "
              f"per-weight sigma of about {m['additive_0.2_sigma_in_rms_W']:.2f} rms(W); multiplicative eta 0.2 (rms "
              f"0.2 rms(W)) is about additive_rel_max {m['additive_equivalent_of_multiplicative_0.2']:.3f}.", ""]
    search = record["eta_train_search"]
    short = [(f"forward_noise eta_train={e}", r) for e, r in search["candidates"].items()]
    if "ablation" in record:
        short += [(f"{n} (eta_train={r['eta_train']})", r) for n, r in record["ablation"]["runs"].items()]
    protocol_text = search["protocol"][len("forward_noise: "):]
    lines += ["Short runs (eta_train search and ablation). Protocol: " + protocol_text + ".", "",
              "| run | accuracy (%) [95% CI] | p5 (%) |", "|---|---|---|"]
    lines += [f"| {n} | {100 * r['mean']:.2f} {fmt(r['ci95'])} | {100 * r['p5']:.2f} |" for n, r in short]
    lines += ["", "Every entry:", "", report.markdown_table(record), "",
              "consistency - forward_noise (accuracy points; Welch 95% CI over chips; paired: same chip keys)", "",
              "| weight noise | eta | chips | diff | Welch 95% CI | paired 95% CI |", "|---|---|---|---|---|---|"]
    for c in record["comparisons"]:
        lines.append(f"| {c['weight_noise']['kind']} | {c['weight_noise']['eta']:g} | {c['n_chips']} | "
                     f"{100 * c['diff']:+.2f} | {fmt(c['ci95_welch'], signed=True)} | "
                     f"{fmt(c['ci95_paired'], signed=True)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------


@protocol("consistency_float")
def stages(config) -> list[Stage]:
    unknown = [a for a in config.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"consistency_float: unknown arms {unknown}; choose among {ARMS} (set arms=...).")
    base = _DATA + _MODEL + ("train",)
    search = base + ("search", "eval.target_eta", "eval.batch_size")

    def trained(arm):   # what an arm's weights depend on: the clean arm neither on the search nor on the loss
        return base + ("max_steps",) if arm == "clean" else search + ("loss", "max_steps")

    out = [Stage("search", stage_search, settings=search, outputs=("search.json",))]
    for arm in config.arms:
        out.append(Stage(f"train_{arm}", stage_train(arm), settings=trained(arm),
                         outputs=(f"weights/{arm}.npz", f"metrics/{arm}.jsonl")))
    for arm in config.arms:
        out.append(Stage(f"eval_{arm}", stage_eval(arm), settings=trained(arm) + ("eval",),
                         outputs=(f"eval/{arm}.json",)))
    if config.ablation.runs:
        out.append(Stage("ablation", stage_ablation, settings=search + ("loss", "ablation"),
                         outputs=("ablation.json",)))
    kinds = tuple(config.eval.kinds)
    out.append(Stage("report", stage_report, settings=None,
                     outputs=tuple(f"results_{k}.json" for k in kinds) + ("results.md",)
                     + tuple(f"accuracy_vs_eta_{k}.png" for k in kinds)))
    return out
