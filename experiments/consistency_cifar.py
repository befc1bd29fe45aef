#!/usr/bin/env python3
"""Forward-noise vs consistency regularisation (Hou et al. 2024) on CIFAR-10, fine-tuned from ../shared/pretrained.

One command runs every stage and resumes where it stopped (training from its checkpoints, evaluation from the
per-setting files under ``<workdir>/eval``)::

  python experiments/consistency_cifar.py --model resnet20            # search, train, eval, report

Stages (``--stages``, default all, in this order):

* ``search``: eta_train for both noise-aware arms. For each candidate (``--search-etas``) forward-noise fine-tunes
  ``--search-steps`` steps on the first 45,000 training images; each result is the Monte Carlo accuracy at weight
  noise ``--target-eta`` (additive_rel_max) over ``--search-chips`` chips on the held-out last 5,000 training
  images (never the test split). The best mean wins; the table goes to ``search.json``.
* ``train``: the arms with identical budget, seed, schedule and data order: ``clean`` (fine-tune without noise,
  the reference), ``forward_noise`` and ``consistency`` at the chosen eta_train.
* ``eval``: Monte Carlo on the full test split, for both weight-noise conventions (``additive_rel_max``: sigma =
  eta * max|W| per tensor; ``multiplicative``: sigma = eta * |w| per weight) at ``--etas``: ``--n-chips`` chips at
  ``--target-eta`` and ``--n-chips-grid`` at the other scales (set both to 32 or more for the full protocol; the
  CPU run of this repository used fewer at the side scales, see the README). Chip ``i`` has the same key in every
  arm, so arms see the same standard-normal draws.
* ``ablation`` (not in the default stages: ``--stages ablation,report``): consistency with other lambdas, site
  sets (stage outputs; logits with KL) and K = 2 draws, and forward-noise with K = 2, each under the search
  protocol at the chosen eta_train (``ablation.json``); lambda = 0 is forward-noise, in the search table.
* ``report``: ``results_<kind>.json`` (shared format, one file per weight-noise convention, with the eta_train
  search and the consistency - forward_noise differences), ``results.md`` (tables, and the difference with Welch
  and paired 95% CIs at every scale) and ``accuracy_vs_eta_<kind>.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time

from flax import traverse_util
import jax
import numpy as np

from jaxnoise import checkpoint, data, io, methods, noise, report, robustness, train
from jaxnoise.models import get_model

ARMS = ("clean", "forward_noise", "consistency")
KINDS = ("additive_rel_max", "multiplicative")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=("resnet20", "resnet32", "resnet44", "resnet56"))
    p.add_argument("--pretrained-dir", default="../shared/pretrained")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workdir", default=None, help="default runs/consistency_<model>")
    p.add_argument("--out", default=None, help="default experiments/results/consistency_<model>")
    p.add_argument("--stages", default="search,train,eval,report")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta-train", type=float, default=None, help="skip the search and use this eta_train")
    p.add_argument("--search-etas", default="0.1,0.2,0.3")
    p.add_argument("--search-steps", type=int, default=150)
    p.add_argument("--search-chips", type=int, default=16)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--sites", default=None, help="consistency sites (default: every named feature)")
    p.add_argument("--distance", default="nmse", choices=sorted(methods.DISTANCES))
    p.add_argument("--num-draws", type=int, default=1)
    p.add_argument("--etas", default="0,0.05,0.1,0.15,0.2,0.25,0.3")
    p.add_argument("--target-eta", type=float, default=0.2)
    p.add_argument("--n-chips", type=int, default=32, help="chips at --target-eta")
    p.add_argument("--n-chips-grid", type=int, default=32, help="chips at the other scales")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--max-steps", type=int, default=None, help="stop each arm early (smoke tests)")
    p.add_argument("--n-test", type=int, default=None, help="evaluate on the first N test images (smoke tests)")
    args = p.parse_args(argv)
    args.workdir = args.workdir or os.path.join("runs", f"consistency_{args.model}")
    args.out = args.out or os.path.join("experiments", "results", f"consistency_{args.model}")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def pretrained(args, model):
    return checkpoint.load_variables(os.path.join(args.pretrained_dir, f"{args.model}_cifar10.npz"), model)


def train_config(args, epochs=None, schedule="cosine"):
    return train.TrainConfig(epochs=epochs or args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed, schedule=schedule)


def make_loss(args, model, method, eta_train):
    if method == "clean":
        return methods.clean(model)
    if method == "forward_noise":
        return methods.forward_noise(model, eta_train=eta_train, num_draws=args.num_draws)
    sites = None if args.sites is None else tuple(args.sites.split(","))
    return methods.consistency(model, eta_train=eta_train, lam=args.lam, sites=sites, distance=args.distance,
                               num_draws=args.num_draws)


def short_run(args, model, dataset, name, loss_fn):
    """The search protocol: ``--search-steps`` fine-tuning steps (constant lr) on training images 0-44999 from the
    pretrained weights, then Monte Carlo accuracy at additive_rel_max ``--target-eta`` over ``--search-chips``
    chips on the held-out training images 45000-49999. Returns the MCResult's dict."""
    train_split = data.Split(dataset.train.images[:45000], dataset.train.labels[:45000])
    search_ds = dataclasses.replace(dataset, train=train_split)
    config = train_config(args, epochs=1, schedule="constant")
    t0 = time.time()
    variables, _ = train.train(model, search_ds, config, workdir=os.path.join(args.workdir, name),
                               variables=pretrained(args, model), loss_fn=loss_fn, max_steps=args.search_steps,
                               progress=False)
    res = robustness.evaluate(model, variables, dataset.train.images[45000:], dataset.train.labels[45000:],
                              noise.NoiseSpec(weight_eta=args.target_eta), key=jax.random.key(1000 + args.seed),
                              n_chips=args.search_chips, batch_size=args.eval_batch_size,
                              preprocess=dataset.preprocess)
    log(f"{name}: {100 * res.mean:.2f}% {robustness.format_ci95(res.ci95)} ({time.time() - t0:.0f} s)")
    return res.to_dict()


def protocol(args):
    return (f"fine-tune from the pretrained weights for {args.search_steps} steps, constant lr {args.lr}, batch "
            f"{args.batch_size}, training images 0-44999; accuracy at additive_rel_max eta {args.target_eta} over "
            f"{args.search_chips} chips on training images 45000-49999 (held out; never the test split)")


# name -> (method, overrides of make_loss's settings); lambda 0 and K=1 at the chosen eta_train are in the search.
ABLATION = {
    "consistency lam=1 sites=all": ("consistency", {}),
    "consistency lam=0.3 sites=all": ("consistency", {"lam": 0.3}),
    "consistency lam=3 sites=all": ("consistency", {"lam": 3.0}),
    "consistency lam=1 sites=stage outputs": ("consistency", {"sites": "layer1/{n},layer2/{n},layer3/{n}"}),
    "consistency lam=1 sites=logits (logit_kl)": ("consistency", {"sites": "logits", "distance": "logit_kl"}),
    "consistency lam=1 sites=all K=2": ("consistency", {"num_draws": 2}),
}


def stage_ablation(args, model, dataset, eta_train):
    path = os.path.join(args.workdir, "ablation.json")
    done = load_json(path) if os.path.exists(path) else {"runs": {}}
    n_last = (int(args.model[len("resnet"):]) - 2) // 6 - 1
    for name, (method, overrides) in ABLATION.items():
        if name in done["runs"]:
            continue
        run_args = argparse.Namespace(**{**vars(args), **{k: (v.format(n=n_last) if isinstance(v, str) else v)
                                                          for k, v in overrides.items()}})
        slug = "ablation_" + "".join(c if c.isalnum() else "_" for c in name)
        res = short_run(run_args, model, dataset, slug, make_loss(run_args, model, method, eta_train))
        done["runs"][name] = {"method": method, "overrides": overrides, "eta_train": eta_train, **res}
        done["protocol"] = protocol(args)
        report.write_json(path, done)
    return done


def stage_search(args, model, dataset):
    path = os.path.join(args.workdir, "search.json")
    if args.eta_train is not None:
        return args.eta_train
    done = load_json(path) if os.path.exists(path) else {"candidates": {}}
    for eta in [float(e) for e in args.search_etas.split(",")]:
        if str(eta) in done["candidates"]:
            continue
        log(f"search: forward_noise eta_train={eta}")
        done["candidates"][str(eta)] = short_run(args, model, dataset, f"search_{eta}",
                                                 make_loss(args, model, "forward_noise", eta))
        report.write_json(path, done)
    best = max(done["candidates"], key=lambda e: done["candidates"][e]["mean"])
    done.update(chosen=float(best), protocol="forward_noise: " + protocol(args))
    report.write_json(path, done)
    log(f"search: chose eta_train={best}")
    return float(best)


def arm_workdir(args, arm):
    return os.path.join(args.workdir, arm)


def stage_train(args, model, dataset, eta_train):
    for arm in ARMS:
        log(f"train: {arm} ({args.epochs} epochs, eta_train={eta_train if arm != 'clean' else 0})")
        t0 = time.time()
        loss_fn = make_loss(args, model, arm, eta_train)
        train.train(model, dataset, train_config(args), workdir=arm_workdir(args, arm),
                    variables=pretrained(args, model), loss_fn=loss_fn, progress=False, max_steps=args.max_steps,
                    metadata={"init": f"{args.pretrained_dir}/{args.model}_cifar10.npz", "method": arm})
        log(f"train: {arm} done in {time.time() - t0:.0f} s")


def eval_plan(args):
    etas = [float(e) for e in args.etas.split(",")]
    plan = []
    kinds = args.kinds.split(",")
    # Priority order: the target scale first (the claim), then the clean accuracy, then the rest of the grid.
    for kind in kinds:
        for arm in ARMS:
            if args.target_eta in etas:
                plan.append((arm, kind, args.target_eta, args.n_chips))
    for arm in ARMS:
        plan.append((arm, None, 0.0, 1))
    for kind in kinds:
        for eta in etas:
            if eta not in (0.0, args.target_eta):
                for arm in ARMS:
                    plan.append((arm, kind, eta, args.n_chips_grid))
    return plan


def eval_path(args, arm, kind, eta, n_chips):
    return os.path.join(args.workdir, "eval", f"{arm}_{kind or 'clean'}_{eta:g}_{n_chips}.json")


def stage_eval(args, model, dataset):
    cache = {}
    for arm, kind, eta, n_chips in eval_plan(args):
        path = eval_path(args, arm, kind, eta, n_chips)
        if os.path.exists(path):
            continue
        if arm not in cache:
            cache[arm] = checkpoint.load_variables(arm_workdir(args, arm), model)
        t0 = time.time()
        spec = None if kind is None else noise.NoiseSpec(weight_kind=kind, weight_eta=eta)
        res = robustness.evaluate(model, cache[arm], dataset.test.images, dataset.test.labels, spec,
                                  key=None if spec is None else jax.random.key(args.seed), n_chips=n_chips,
                                  batch_size=args.eval_batch_size, preprocess=dataset.preprocess)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        report.write_json(path, res.to_dict())
        log(f"eval: {arm} {kind} eta={eta:g} ({n_chips} chips): {100 * res.mean:.2f}% "
            f"{robustness.format_ci95(res.ci95)} p5 {100 * res.p5:.2f}  ({time.time() - t0:.0f} s)")


def welch(a, b):
    """Difference of means a - b with a Welch 95% CI (t quantile with Welch-Satterthwaite dof)."""
    from scipy import stats
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, (ma - mb, ma - mb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = float(stats.t.ppf(0.975, dof))
    return ma - mb, (ma - mb - t * se, ma - mb + t * se)


def paired(a, b):
    """Difference a - b over chips with the same key, with a Student-t 95% CI of the mean paired difference."""
    s = robustness.summarize(np.asarray(a) - np.asarray(b), bounds=(-1.0, 1.0))  # differences of accuracies
    return s["mean"], None if s["ci95"] is None else tuple(s["ci95"])


def eta_mapping(args, model):
    """max|W| / rms(W) of every kernel of the pretrained weights: additive_rel_max eta is a per-weight sigma of
    eta * that ratio in units of rms(W), while multiplicative eta is sigma = eta * |w| (rms eta * rms(W))."""
    params = pretrained(args, model)["params"]
    ratios = [float(np.max(np.abs(w)) / np.sqrt(np.mean(np.square(w))))
              for path, w in traverse_util.flatten_dict(params, sep="/").items() if path.endswith("kernel")]
    median = float(np.median(ratios))
    return {"max_over_rms_per_kernel": ratios, "median": median, "min": min(ratios), "max": max(ratios),
            "additive_0.2_sigma_in_rms_W": 0.2 * median, "additive_equivalent_of_multiplicative_0.2": 0.2 / median}


def stage_report(args, model, dataset, eta_train):
    arms = []
    entries = {}
    for arm in ARMS:
        evals = []
        for a, kind, eta, n_chips in eval_plan(args):
            path = eval_path(args, a, kind, eta, n_chips)
            if a == arm and os.path.exists(path):
                e = load_json(path)
                evals.append(e)
                entries[(arm, kind, eta)] = e
        meta = checkpoint.read_metadata(arm_workdir(args, arm))
        history = train.read_metrics(os.path.join(arm_workdir(args, arm), train.METRICS_FILE))
        epochs = [r for r in history if r["type"] == "epoch"]
        evals.sort(key=lambda e: ((e["weight_noise"] or {}).get("kind", ""), (e["weight_noise"] or {}).get("eta", 0)))
        arms.append(report.arm(arm, model.name, arm, model.param_count(), evals, train={
            "init": meta.get("init"), "epochs": args.epochs, "seed": args.seed, "lr": args.lr, "schedule": "cosine",
            "batch_size": args.batch_size, "weight_decay": args.weight_decay,
            "eta_train": None if arm == "clean" else eta_train, "loss": meta.get("loss"),
            "loss_config": meta.get("loss_config"), "hparams": meta.get("hparams"),
            "final_clean_test_accuracy_train_mode_log": epochs[-1]["test_accuracy"] if epochs else None,
            "train_seconds": round(history[-1]["elapsed"], 1) if history else None}))
    command = "python experiments/consistency_cifar.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = report.result_record(f"consistency_{args.model}", command.strip(), arms,
                                  {"name": "cifar10", "split": "test", "n_images": len(dataset.test.labels)})
    search_path = os.path.join(args.workdir, "search.json")
    if os.path.exists(search_path):
        record["eta_train_search"] = load_json(search_path)
    record["eta_mapping"] = mapping = eta_mapping(args, model)
    ablation_path = os.path.join(args.workdir, "ablation.json")
    if os.path.exists(ablation_path):
        record["ablation"] = load_json(ablation_path)
    comparisons = []
    for kind in args.kinds.split(","):
        for eta in sorted({k[2] for k in entries if k[1] == kind}):
            a, b = entries.get(("consistency", kind, eta)), entries.get(("forward_noise", kind, eta))
            if not a or not b or a["n_chips"] < 2:
                continue
            d, ci = welch(a["per_chip"], b["per_chip"])
            dp, cip = paired(a["per_chip"], b["per_chip"])
            comparisons.append({"weight_noise": {"kind": kind, "eta": eta}, "a": "consistency", "b": "forward_noise",
                                "n_chips": a["n_chips"], "diff": d, "ci95_welch": list(ci), "diff_paired": dp,
                                "ci95_paired": None if cip is None else list(cip)})
    record["comparisons"] = comparisons
    os.makedirs(args.out, exist_ok=True)
    per_kind = {}
    for kind in args.kinds.split(","):
        # One file per convention, so that `check_results.py --compare` never mixes conventions.
        sub = dict(record, experiment=f"{record['experiment']}_{kind}",
                   arms=[dict(a, eval=[e for e in a["eval"] if e["weight_noise"] is None
                                       or e["weight_noise"]["kind"] == kind]) for a in record["arms"]],
                   comparisons=[c for c in comparisons if c["weight_noise"]["kind"] == kind])
        per_kind[kind] = sub
        report.write_json(os.path.join(args.out, f"results_{kind}.json"), sub)
    lines = []
    for kind in args.kinds.split(","):
        etas = sorted({k[2] for k in entries if k[1] == kind} | {0.0})
        lines += [f"Weight noise `{kind}`: accuracy (%) on the {len(dataset.test.labels)} test images, mean over "
                  f"chips [95% CI] (5th-percentile chip); eta 0 is the noise-free network.", "",
                  "| arm | " + " | ".join(f"eta {e:g}" for e in etas) + " |", "|---|" + "---|" * len(etas)]
        for arm in ARMS:
            cells = []
            for eta in etas:
                e = entries.get((arm, None if eta == 0 else kind, eta))
                cells.append("" if e is None else f"{100 * e['mean']:.2f} {robustness.format_ci95(e['ci95'], missing='')}"
                             f" ({100 * e['p5']:.2f}) n={e['n_chips']}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Convention mapping: over the {len(mapping['max_over_rms_per_kernel'])} pretrained kernels, "
              f"max|W| / rms(W) has median {mapping['median']:.2f} (min {mapping['min']:.2f}, max "
              f"{mapping['max']:.2f}): additive_rel_max eta 0.2 is a per-weight sigma of about "
              f"{mapping['additive_0.2_sigma_in_rms_W']:.2f} rms(W); multiplicative eta 0.2 (rms 0.2 rms(W)) is "
              f"about additive_rel_max {mapping['additive_equivalent_of_multiplicative_0.2']:.3f}.", ""]
    short = []
    if "eta_train_search" in record:
        short += [(f"forward_noise eta_train={e}", r) for e, r in record["eta_train_search"]["candidates"].items()]
    if "ablation" in record:
        short += [(f"{n} (eta_train={r['eta_train']})", r) for n, r in record["ablation"]["runs"].items()]
    if short:
        lines += ["Short runs (eta_train search and ablation). Protocol: " + protocol(args) + ".", "",
                  "| run | accuracy (%) [95% CI] | p5 (%) |", "|---|---|---|"]
        lines += [f"| {n} | {100 * r['mean']:.2f} {robustness.format_ci95(r['ci95'])} | "
                  f"{100 * r['p5']:.2f} |" for n, r in short]
        lines.append("")
    lines += ["Every entry:", "", report.markdown_table(record), "",
             "consistency - forward_noise (accuracy points; Welch 95% CI over chips; paired: same chip keys)", "",
             "| weight noise | eta | chips | diff | Welch 95% CI | paired 95% CI |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['weight_noise']['kind']} | {c['weight_noise']['eta']:g} | {c['n_chips']} | "
                     f"{100 * c['diff']:+.2f} | {robustness.format_ci95(c['ci95_welch'], signed=True)} | "
                     f"{robustness.format_ci95(c['ci95_paired'], signed=True)} |")
    io.write_text_atomic(os.path.join(args.out, "results.md"), "\n".join(lines) + "\n")
    for kind, sub in per_kind.items():
        report.plot_sweep(sub, os.path.join(args.out, f"accuracy_vs_eta_{kind}.png"), noise="weight")
    print("\n".join(lines))
    log(f"report: wrote {args.out}/results_<kind>.json, results.md, accuracy_vs_eta_<kind>.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    stages = args.stages.split(",")
    dataset = data.load_dataset("cifar10", data_dir=args.data_dir)
    if args.n_test:
        dataset = dataclasses.replace(dataset, test=data.Split(dataset.test.images[:args.n_test],
                                                               dataset.test.labels[:args.n_test]))
    model = get_model(args.model)
    os.makedirs(args.workdir, exist_ok=True)
    log(f"{args.model}: stages {stages}, workdir {args.workdir}, device {report.device_description()}")
    eta_train = args.eta_train
    if "search" in stages or eta_train is None:
        eta_train = stage_search(args, model, dataset)
    if "train" in stages:
        stage_train(args, model, dataset, eta_train)
    if "eval" in stages:
        stage_eval(args, model, dataset)
    if "ablation" in stages:
        stage_ablation(args, model, dataset, eta_train)
    if "report" in stages:
        stage_report(args, model, dataset, eta_train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
