#!/usr/bin/env python3
"""Denoising blocks with a placement search (Azizi et al. 2024) on a pretrained CIFAR-10 ResNet.

One command runs every stage and resumes where it stopped (each stage's output is a file under ``--workdir``;
training resumes from its checkpoints)::

  python experiments/denoise_cifar.py --model resnet20          # level, sensitivity, search, train, eval, report

Noise: additive activation noise at every analog MVM output (every conv and the final dense layer), sigma =
eta * r_site with r_site the calibrated std of the clean output (``jaxnoise.noise``). Selection data: the last
``--holdout`` training images (never the test split); blocks train on the rest.

Stages (``--stages``, default all, in this order):

* ``level``: the plain model's Monte Carlo accuracy on the held-out images over ``--level-grid``; the target level
  is the eta whose accuracy drop from clean is closest to ``--target-drop`` (30 points, as in the paper); the milder
  and harsher levels are ``--side-factors`` times it.
* ``sensitivity``: per insertion site, the accuracy gained when its MVMs' noise is removed (vmapped masks, common
  chips) and the mean gradient norm of the loss at the site.
* ``search``: greedy search under ``--budget`` (fraction of the backbone's parameters) over the ``--top-k`` most
  sensitive sites; candidates train ``--search-steps`` steps together (vmapped) and are evaluated together.
* ``train``: each arm's blocks train ``--train-steps`` steps with the backbone frozen (``jaxnoise.denoise``):
  ``searched``, ``every_block`` (a block after every residual block, bottleneck narrowed until it fits the
  budget), ``random`` (random sites filling the budget) and ``most_sensitive`` (the single most sensitive site).
* ``eval``: full test split; ``--n-chips`` chips for the plain model and the searched blocks at the target level,
  ``--n-chips-side`` for the baselines and ``--n-chips-levels`` at the side levels. Chip ``i`` has the same key
  in every arm.
* ``report``: ``results.json`` (shared format), ``results.md``, ``pareto.png`` and the engine cost table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

import jax
import numpy as np

from jaxnoise import checkpoint, data, denoise, engine, io, noise, placement, report, robustness, train
from jaxnoise.models import get_model

ARMS = ("searched", "every_block", "random", "most_sensitive")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=("resnet20", "resnet32", "resnet44", "resnet56"))
    p.add_argument("--pretrained-dir", default="../shared/pretrained")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workdir", default=None, help="default runs/denoise_<model>")
    p.add_argument("--out", default=None, help="default experiments/results/denoise_<model>")
    p.add_argument("--stages", default="level,sensitivity,search,train,eval,report")
    p.add_argument("--holdout", type=int, default=1000, help="last N training images: selection set")
    p.add_argument("--level-grid", default="0.2,0.25,0.3,0.35,0.4")
    p.add_argument("--level-chips", type=int, default=2)
    p.add_argument("--target-drop", type=float, default=0.30)
    p.add_argument("--side-factors", default="0.67,1.33")
    p.add_argument("--kind", default="residual", choices=denoise.KINDS)
    p.add_argument("--reduction", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.025)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--search-steps", type=int, default=40)
    p.add_argument("--search-chips", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--feature-weight", type=float, default=0.0)
    p.add_argument("--n-chips", type=int, default=32)
    p.add_argument("--n-chips-side", type=int, default=8, help="chips of the baselines at the target level")
    p.add_argument("--n-chips-levels", type=int, default=8, help="chips at the milder and harsher levels")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _load_json(path):
    with open(path) as f:
        return json.load(f)


class Setup:
    """Model, data, variables and reference scales shared by the stages."""

    def __init__(self, args):
        self.args = args
        self.dataset = data.load_dataset("cifar10", data_dir=args.data_dir)
        self.model = get_model(args.model)
        self.variables = checkpoint.load_variables(
            os.path.join(args.pretrained_dir, f"{args.model}_cifar10.npz"), self.model)
        self.train_part, self.held_out = data.holdout(self.dataset.train, args.holdout)
        self.selection = data.Split(self.held_out.images, self.held_out.labels)
        images = data.calibration_images(self.train_part, n=1024, seed=0)
        x = jax.jit(self.dataset.preprocess)(jax.numpy.asarray(images))
        self.ref = noise.calibrate_activations(self.model.apply, self.variables, x)
        config = denoise.DenoiserConfig(kind=args.kind, reduction=args.reduction)
        self.dmodel = denoise.denoised(self.model, config=config)
        self.key = jax.random.key(args.seed)
        self.dvars = denoise.init_variables(self.dmodel, self.variables, noise.name_key(self.key, "init"))

    def spec(self, eta):
        return noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=self.ref, act_eta=float(eta))

    def loss(self, dmodel, eta):
        return denoise.denoiser_loss(dmodel, act_eta_train=eta, act_ref=self.ref,
                                     feature_weight=self.args.feature_weight)


def stage_level(s: Setup, path):
    args = s.args
    clean = robustness.evaluate(s.model, s.variables, s.selection.images, s.selection.labels, None,
                                preprocess=s.dataset.preprocess).mean
    rows = []
    for eta in map(float, args.level_grid.split(",")):
        r = robustness.evaluate(s.model, s.variables, s.selection.images, s.selection.labels, s.spec(eta),
                                key=noise.name_key(s.key, "level"), n_chips=args.level_chips,
                                batch_size=args.eval_batch_size, preprocess=s.dataset.preprocess)
        rows.append({"eta": eta, "mean": r.mean, "drop": clean - r.mean})
        print(f"level: eta {eta}: {100 * r.mean:.2f}% (drop {100 * (clean - r.mean):.2f})", flush=True)
    target = min(rows, key=lambda r: abs(r["drop"] - args.target_drop))["eta"]
    sides = [round(target * float(f), 4) for f in args.side_factors.split(",")]
    out = {"clean_selection": clean, "grid": rows, "target": target, "levels": sorted([target] + sides),
           "protocol": f"plain model, {args.level_chips} chips, last {args.holdout} training images"}
    report.write_json(path, out)
    return out


def stage_sensitivity(s: Setup, level, path):
    eta = level["target"]
    rem = placement.removal_sensitivity(s.model, s.variables, s.selection.images, s.selection.labels, s.spec(eta),
                                        key=noise.name_key(s.key, "sensitivity"), n_chips=s.args.search_chips,
                                        batch_size=s.args.eval_batch_size, preprocess=s.dataset.preprocess)
    grads = placement.gradient_sensitivity(s.model, s.variables, s.selection.images, s.selection.labels,
                                           s.spec(eta), key=noise.name_key(s.key, "gradient"), n_draws=4,
                                           preprocess=s.dataset.preprocess)
    out = {"eta": eta, "removal": rem, "gradient_norm": grads}
    report.write_json(path, out)
    for site, v in rem["sites"].items():
        print(f"sensitivity: {site}: +{100 * v['gain']:.2f} pts, grad {grads[site]:.4f}", flush=True)
    return out


def ranked_sites(sens, dmodel, k):
    gains = {site: v["gain"] for site, v in sens["removal"]["sites"].items()}
    order = sorted(gains, key=lambda site: -gains[site])
    return [site for site in order if site in dmodel.candidate_sites][:k]


def stage_search(s: Setup, level, sens, path):
    args = s.args
    eta = level["target"]
    candidates = ranked_sites(sens, s.dmodel, args.top_k)
    t0 = time.time()
    result = placement.search(s.dmodel, s.dvars, s.dataset, s.loss(s.dmodel, eta), s.selection.images,
                              s.selection.labels, s.spec(eta), budget=args.budget,
                              key=noise.name_key(s.key, "search"), candidates=candidates, steps=args.search_steps,
                              batch_size=64, learning_rate=args.lr, n_chips=args.search_chips,
                              eval_batch_size=args.eval_batch_size, split=s.train_part,
                              log=lambda line: print("search:", line, flush=True))
    out = {**result.to_dict(), "seconds": time.time() - t0}
    report.write_json(path, out)
    return out


def every_block_model(s: Setup):
    """The widest bottleneck (smallest reduction) at which a block after every residual block fits the budget."""
    for reduction in range(s.args.reduction, 65):
        dm = denoise.denoised(s.model, config=denoise.DenoiserConfig(kind=s.args.kind, reduction=reduction))
        gates = placement.every_block_placement(dm)
        if denoise.overhead(dm, gates)["param_overhead"] <= s.args.budget:
            return dm, gates, reduction
    return dm, gates, reduction  # min width 4 everywhere: over budget, reported as is


def arm_placements(s: Setup, search, sens):
    budget = s.args.budget
    gains = {site: v["gain"] for site, v in sens["removal"]["sites"].items()}
    dm_every, gates_every, reduction = every_block_model(s)
    return {
        "searched": (s.dmodel, np.asarray(search["best"]["gates"], np.float32), {"reduction": s.args.reduction}),
        "every_block": (dm_every, gates_every, {"reduction": reduction}),
        "random": (s.dmodel, placement.random_placement(s.dmodel, budget, seed=s.args.seed,
                                                        candidates=s.dmodel.candidate_sites[:-1]),
                   {"reduction": s.args.reduction, "seed": s.args.seed}),
        "most_sensitive": (s.dmodel, placement.most_sensitive_placement(s.dmodel, gains, budget),
                           {"reduction": s.args.reduction}),
    }


def stage_train(s: Setup, level, arms, workdir):
    args = s.args
    eta = level["target"]
    out = {}
    for name, (dm, gates, extra) in arms.items():
        dvars = denoise.init_variables(dm, s.variables, noise.name_key(s.key, "init"), placement=gates)
        steps_per_epoch = len(s.train_part) // args.train_batch_size
        epochs = -(-args.train_steps // steps_per_epoch)
        config = train.TrainConfig(epochs=epochs, batch_size=args.train_batch_size, learning_rate=args.lr,
                                   weight_decay=0.0, seed=args.seed, checkpoint_every=100, log_every=25)
        ds = _train_dataset(s)
        t0 = time.time()
        variables, _ = denoise.train_denoisers(dm, ds, config, workdir=os.path.join(workdir, "train", name),
                                               variables=dvars, loss_fn=s.loss(dm, eta), progress=False,
                                               max_steps=args.train_steps, metadata={"arm": name, **extra})
        out[name] = variables
        print(f"train: {name} done ({time.time() - t0:.0f} s)", flush=True)
    return out


def _train_dataset(s: Setup):
    # The epoch-end clean evaluation of jaxnoise.train runs on a 1000-image slice of the held-out set.
    return dataclasses.replace(s.dataset, train=s.train_part,
                               test=data.Split(s.selection.images, s.selection.labels))


def eval_plan(s: Setup, level):
    plan = []
    target = level["target"]
    plan.append(("plain", target, s.args.n_chips))
    plan.append(("searched", target, s.args.n_chips))
    for name in ("every_block", "random", "most_sensitive"):
        plan.append((name, target, s.args.n_chips_side))
    for eta in level["levels"]:
        if eta != target:
            plan.append(("plain", eta, s.args.n_chips_levels))
            plan.append(("searched", eta, s.args.n_chips_levels))
    return plan


def stage_eval(s: Setup, level, arms, trained, workdir):
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    test = s.dataset.test
    for name, eta, n_chips in eval_plan(s, level):
        path = os.path.join(workdir, "eval", f"{name}_{eta}_{n_chips}.json")
        if os.path.exists(path):
            continue
        t0 = time.time()
        if name == "plain":
            model, variables = s.model, s.variables
        else:
            model, variables = arms[name][0], trained[name]
        r = robustness.evaluate(model, variables, test.images, test.labels, s.spec(eta),
                                key=noise.name_key(s.key, "eval"), n_chips=n_chips,
                                batch_size=s.args.eval_batch_size, preprocess=s.dataset.preprocess)
        report.write_json(path, r.to_dict())
        print(f"eval: {name} at eta {eta}: {100 * r.mean:.2f}% {robustness.format_ci95(r.ci95)} "
              f"({n_chips} chips, {time.time() - t0:.0f} s)", flush=True)
    clean_eval(s, workdir)


def clean_eval(s: Setup, workdir):
    """The plain model's noise-free test accuracy (cached)."""
    clean_path = os.path.join(workdir, "eval", "plain_clean.json")
    if not os.path.exists(clean_path):
        os.makedirs(os.path.dirname(clean_path), exist_ok=True)
        r = robustness.evaluate(s.model, s.variables, s.dataset.test.images, s.dataset.test.labels, None,
                                preprocess=s.dataset.preprocess)
        report.write_json(clean_path, r.to_dict())
    return _load_json(clean_path)


def stage_report(s: Setup, level, sens, search, arms, workdir, out_dir, command):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    evals: dict[str, list] = {}
    for name, eta, n_chips in eval_plan(s, level):
        path = os.path.join(workdir, "eval", f"{name}_{eta}_{n_chips}.json")
        if os.path.exists(path):
            evals.setdefault(name, []).append(_load_json(path))
    clean = clean_eval(s, workdir)
    backbone_params = s.model.param_count()
    record_arms = [report.arm("plain", s.model, "clean", backbone_params, [clean] + evals.get("plain", []),
                              train={"pretrained": f"{s.args.pretrained_dir}/{s.args.model}_cifar10.npz"})]
    costs = {}
    layers = denoise.analog_layers(s.model)
    for name in ARMS:
        if name not in evals:
            continue
        dm, gates, extra = arms[name]
        over = denoise.overhead(dm, gates)
        sites = [site for site, g in zip(dm.candidate_sites, gates) if g]
        cost = engine.placement_cost(denoise.block_shapes(dm, sites), layers, backbone_params=backbone_params)
        costs[name] = cost
        record_arms.append(report.arm(name, s.model, "denoiser", backbone_params, evals[name],
                                      extra_param_count=over["params"],
                                      train={"sites": sites, "kind": s.args.kind, **extra,
                                             "train_steps": s.args.train_steps, "lr": s.args.lr,
                                             "act_eta_train": level["target"], "batch_size": s.args.train_batch_size,
                                             "param_overhead": over["param_overhead"],
                                             "mac_overhead": over["mac_overhead"]}))
    dataset_info = {"name": "cifar10", "split": "test", "n_images": int(len(s.dataset.test.labels))}
    record = report.result_record(f"denoise_{s.args.model}", command, record_arms, dataset_info)
    record["levels"] = level
    record["sensitivity"] = {"removal_gain": {k: v["gain"] for k, v in sens["removal"]["sites"].items()},
                             "removal_ci95": {k: v["ci95"] for k, v in sens["removal"]["sites"].items()},
                             "gradient_norm": sens["gradient_norm"]}
    record["search"] = {k: search[k] for k in ("best", "pareto", "config", "seconds")}
    record["search"]["evaluated"] = [{k: v for k, v in e.items() if k != "per_chip"} for e in search["evaluated"]]
    record["engine"] = {name: {k: c[k] for k in ("totals", "mac_overhead", "latency_overhead", "param_overhead")}
                        for name, c in costs.items()}
    report.write_json(os.path.join(out_dir, "results.json"), record)

    # Markdown
    target = level["target"]
    clean_acc = clean["mean"]
    lines = [f"# Denoising blocks on {s.args.model} (CIFAR-10 test split, additive activation noise)", "",
             f"Command: `{command}`", "",
             f"Clean accuracy of the pretrained model: {100 * clean_acc:.2f}%. Noise levels (picked on the held-out "
             f"training images, {level['protocol']}): target eta {target} (plain drop closest to "
             f"{100 * s.args.target_drop:.0f} points), side levels {[e for e in level['levels'] if e != target]}.",
             "", "| arm | sites | params (% of backbone) | eta | n_chips | mean (%) | 95% CI (%) | p5 (%) | "
             "drop recovered |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    plain_at = {e["activation_noise"]["eta"]: e for e in evals.get("plain", [])}
    for a in record_arms:
        for e in a["eval"]:
            if e["activation_noise"] is None:
                continue
            eta = e["activation_noise"]["eta"]
            rec = ""
            if a["name"] != "plain" and eta in plain_at:
                drop = clean_acc - plain_at[eta]["mean"]
                rec = f"{100 * (e['mean'] - plain_at[eta]['mean']) / drop:.0f}%"
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
    lines += ["", f"## Search ({search['config']['strategy']}, budget {100 * s.args.budget:.1f}%, "
              f"{search['config']['steps']} steps per candidate, {search['config']['n_chips']} chips on "
              f"{search['config']['n_eval_images']} held-out images; {search['seconds']:.0f} s)", "",
              "| round | sites | params (%) | selection accuracy (%) |", "|---:|---|---:|---:|"]
    for e in search["evaluated"]:
        lines.append(f"| {e['round']} | {', '.join(e['sites']) or '-'} | {100 * e['param_overhead']:.2f} | "
                     f"{100 * e['mean']:.2f} |")
    lines += ["", "Pareto front (params % -> accuracy %): " + ", ".join(
        f"{100 * p['param_overhead']:.2f} -> {100 * p['mean']:.2f}" for p in search["pareto"]), "",
        "## Engine cost (jaxnoise.engine defaults; assumptions in its docstring)", ""]
    for name, c in costs.items():
        lines += [f"### {name}", "", engine.markdown(c), ""]
    io.write_text_atomic(os.path.join(out_dir, "results.md"), "\n".join(lines) + "\n")

    # Pareto plot: search points (selection set) and final arms (test split, target eta)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
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
    ax = axes[1]
    for i, a in enumerate(record_arms):
        for e in a["eval"]:
            if e["activation_noise"] and e["activation_noise"]["eta"] == target:
                x = 100 * a["extra_param_count"] / backbone_params
                ci = e["ci95"]  # None with one chip: no error bar
                ax.errorbar([x], [100 * e["mean"]], yerr=None if ci is None else [[100 * (e["mean"] - ci[0])],
                                                                                  [100 * (ci[1] - e["mean"])]],
                            fmt="o", c=f"C{i}", label=f"{a['name']} ({e['n_chips']} chips)", capsize=3)
    ax.axhline(100 * clean_acc, ls="--", c="k", lw=0.8, label="clean")
    ax.set_xlabel("denoiser parameters (% of backbone)")
    ax.set_ylabel("test accuracy (%), 95% CI")
    ax.set_title("arms on the test split")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "pareto.png"), dpi=120)
    print(f"report: wrote {out_dir}/results.json, results.md, pareto.png", flush=True)


def main(argv=None):
    args = parse_args(argv)
    command = "python experiments/denoise_cifar.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    workdir = args.workdir or os.path.join("runs", f"denoise_{args.model}")
    out_dir = args.out or os.path.join("experiments", "results", f"denoise_{args.model}")
    os.makedirs(workdir, exist_ok=True)
    stages = args.stages.split(",")
    s = Setup(args)
    paths = {k: os.path.join(workdir, f"{k}.json") for k in ("level", "sensitivity", "search")}

    def get(name, fn):
        if os.path.exists(paths[name]):
            return _load_json(paths[name])
        if name not in stages:
            raise SystemExit(f"error: stage {name} has not run yet ({paths[name]} missing): add it to --stages.")
        return fn()

    level = get("level", lambda: stage_level(s, paths["level"]))
    sens = get("sensitivity", lambda: stage_sensitivity(s, level, paths["sensitivity"]))
    search = get("search", lambda: stage_search(s, level, sens, paths["search"]))
    arms = arm_placements(s, search, sens)
    trained = None
    if "train" in stages or "eval" in stages:
        trained = stage_train(s, level, arms, workdir)
    if "eval" in stages:
        stage_eval(s, level, arms, trained, workdir)
    if "report" in stages:
        stage_report(s, level, sens, search, arms, workdir, out_dir, command)


if __name__ == "__main__":
    main()
