"""Protocol ``denoise_ablation``: what makes denoising blocks good, variant by variant, on one placement budget.

Issue 17, part 1: the blocks of Azizi et al. 2024 trained on a frozen network under additive activation noise
(sigma = eta * r_site at every MVM output; ``denoise_placement``'s noise, level and data split), each **variant**
changing one thing against the first (the baseline): the loss (cross-entropy, + feature matching to the clean
backbone, + KL to its predictions, + the probabilistic block's noise likelihood), the block (residual or
probabilistic; bottleneck width at a fixed total budget), the training noise (the target level or a range around
it). Training length is not a guess: each variant trains epoch by epoch (``train.chunk_steps`` steps a chunk,
cosine schedule over ``train.max_epochs``), is scored after each chunk on the held-out training images
(``curve.n_chips`` chips at the target level, the same chips every time), and stops when ``curve.patience``
chunks in a row did not beat its best by ``curve.min_delta``; the best chunk's blocks are kept.

Stages:

* ``level``: as in ``denoise_placement`` (the plain model's held-out drop over ``level.grid``; target = the eta
  whose drop is closest to ``level.target_drop``; side levels ``level.side_factors`` x target) (``level.json``).
* ``train_<variant>``: the curve (``curves/<variant>.jsonl``, one line per chunk, written as it goes: a stopped
  stage resumes from its checkpoints and its curve), ``weights/<variant>.npz`` (the best chunk's variables),
  ``metrics/<variant>.jsonl`` (the training log).
* ``eval_plain``, ``eval_<variant>``: full test split at the target (``eval.n_chips`` chips) and the side levels
  (``eval.side_chips``); chip ``i`` has the same key in every arm, so arms pair by chip (``eval/<arm>.json``).
* ``report``: ``results.json`` (shared format), ``results.md`` (per variant: sites, parameters, chunks trained,
  best held-out score, test accuracy with 95% CI and 5th-percentile chip, the share of the plain model's drop
  recovered, the paired per-chip difference to the baseline), ``curves.png``.

``variants`` maps each variant's name (letters, digits, ``_``) to what it changes (against ``baseline``, a name):
``kind`` (``residual`` | ``probabilistic``), ``reduction`` (bottleneck C/reduction), ``sites`` (``"every_block"``:
after every residual block; ``"every_other_block"``: after blocks 0, 2, 4, ... in forward order;
``"inside_every_block"``: inside every residual branch, between its first and second MVM (``layerS/B/mid``: the
block cleans conv1's output before conv2 reads it, and the shortcut path is left alone); or a tuple of tap names,
``Model.tap_names``), ``feature_weight`` (matching at the placed sites), ``kl_weight``, ``nll_weight``,
``act_eta_spread``
(:func:`jaxnoise.denoise.denoiser_loss`), ``lr``, ``patience`` (at least ``train.max_epochs`` chunks: the whole
cosine schedule, whatever the curve does), ``seed`` (the training seed: the blocks' initialisation, data order and
training noise; the held-out and test chips stay those of ``config.seed``). Missing keys take ``denoiser.*`` /
``train.lr`` / ``curve.patience`` / ``seed``. Each variant's stages depend on its own entry only: adding a variant
leaves the others cached.

Variants that differ only in ``seed`` form a group: the report gives each group's test accuracy over its training
seeds (t interval) and, against the baseline's group, the per-seed differences (paired per chip, then a t interval
over the seeds both groups have): run-to-run variation, which the chip intervals do not cover.

``tiny=True``: digits, the one-block CNN from random weights, chunks of 2 steps (2 for the baseline, 1 for the
other variants), at most 2 chips (the tests). The CNN has no residual branch: ``"inside_every_block"`` places its
blocks as ``"every_block"`` does there.
"""

from __future__ import annotations

import re

import numpy as np

from jaxnoise import checkpoint, denoise, placement, report, robustness, stats
from jaxnoise import io as io_lib
from jaxnoise.protocols import common
from jaxnoise.protocols import denoise_placement as dp
from jaxnoise.stages import Stage, protocol

VARIANT_KEYS = ("kind", "reduction", "sites", "feature_weight", "kl_weight", "nll_weight", "act_eta_spread",
                "lr", "patience", "seed")
SITE_RULES = ("every_block", "every_other_block", "inside_every_block")


def variants(config) -> list[dict]:
    """The variants with every key filled in (defaults from ``denoiser`` and ``train``), checked before anything
    runs: unknown keys, duplicate or missing names and unknown site rules are refused with the fix."""
    out = []
    for name, v in config.variants.items():
        v = dict(v)
        unknown = sorted(set(v) - set(VARIANT_KEYS))
        if unknown:
            raise ValueError(f"variants.{name} has unknown keys {unknown}; a variant may set {list(VARIANT_KEYS)}.")
        if not name.replace("_", "").isalnum() or name == "plain":
            raise ValueError(f"variant name {name!r}: use letters, digits and '_' ('plain' is the plain model's arm).")
        sites = v.get("sites", "every_block")
        if isinstance(sites, str) and sites not in SITE_RULES:
            raise ValueError(f"variant {name}: sites={sites!r}; use one of {SITE_RULES} or a tuple of site names.")
        out.append({"name": name, "kind": v.get("kind", config.denoiser.kind),
                    "reduction": int(v.get("reduction", config.denoiser.reduction)),
                    "sites": sites if isinstance(sites, str) else tuple(sites),
                    "feature_weight": float(v.get("feature_weight", config.denoiser.feature_weight)),
                    "kl_weight": float(v.get("kl_weight", 0.0)), "nll_weight": float(v.get("nll_weight", 0.0)),
                    "act_eta_spread": float(v.get("act_eta_spread", 0.0)), "lr": float(v.get("lr", config.train.lr)),
                    "patience": int(v.get("patience", config.curve.patience)),
                    "seed": int(v.get("seed", config.seed))})
    if not out:
        raise ValueError("variants is empty: give at least the baseline, e.g. variants={'ce': {}}.")
    for group in seed_groups(out):
        seeds = [v["seed"] for v in group]
        for seed in sorted(set(seeds)):
            same = [v["name"] for v in group if v["seed"] == seed]
            if len(same) > 1:
                raise ValueError(f"variants {same} are the same run (the same settings and seed {seed}); remove "
                                 f"all but one or give the others another seed.")
    names = [v["name"] for v in out]
    if config.baseline not in names:
        raise ValueError(f"baseline={config.baseline!r} is not a variant; choose among {names}.")
    return sorted(out, key=lambda v: v["name"] != config.baseline)   # the baseline first


def seed_groups(vs: list[dict]) -> list[list[dict]]:
    """The filled-in variants grouped by everything but ``name`` and ``seed`` (groups in the order of their first
    member, each sorted by seed)."""
    groups: dict[tuple, list[dict]] = {}
    for v in vs:
        groups.setdefault(tuple(sorted((k, x) for k, x in v.items() if k not in ("name", "seed"))), []).append(v)
    return [sorted(g, key=lambda v: v["seed"]) for g in groups.values()]


def over_seeds(vs: list[dict], accuracy: dict[str, float], baseline: str) -> dict:
    """Per seed group with at least two seeds (named after its first variant): the test accuracies at the target
    (``accuracy``: variant name -> mean over chips) by seed, their t interval over seeds and standard deviation,
    and against the baseline's group the per-seed differences (the same chips in both, so the paired per-chip
    mean difference is the difference of the means) with their t interval over the seeds both have."""
    groups = seed_groups(vs)
    base = next(g for g in groups if any(v["name"] == baseline for v in g))
    base_by_seed = {v["seed"]: accuracy[v["name"]] for v in base}
    out = {}
    for g in groups:
        if len(g) < 2:
            continue
        acc = [accuracy[v["name"]] for v in g]
        entry = {"variants": [v["name"] for v in g], "seeds": [v["seed"] for v in g], "test_at_target": acc,
                 "accuracy": stats.over_seeds(acc).to_dict(), "std": float(np.std(acc, ddof=1)), "vs_baseline": None}
        common_seeds = [v["seed"] for v in g if v["seed"] in base_by_seed]
        if g is not base and common_seeds:
            diffs = [accuracy[v["name"]] - base_by_seed[v["seed"]] for v in g if v["seed"] in base_by_seed]
            entry["vs_baseline"] = {"group": base[0]["name"], "seeds": common_seeds, "per_seed": diffs,
                                    "interval": stats.over_seeds(diffs).to_dict()}
        out[g[0]["name"]] = entry
    return out


def _variant(config, name: str) -> dict:
    return next(v for v in variants(config) if v["name"] == name)


def _needs_inner(dm_backbone, sites) -> bool:
    if sites == "inside_every_block":
        return True
    return not isinstance(sites, str) and any(s not in dm_backbone.feature_names for s in sites)


def variant_model(config, v: dict):
    """``(dmodel, gates)`` of a variant: the backbone with blocks of its kind and width, and its placement. A
    variant inside the residual branches gets candidate blocks at every tap point (``Model.tap_names``), the others
    at the features only (the committed placements' candidate list)."""
    args = dp.backbone_args(config)
    inner = _needs_inner(dp.backbone(*args)[1], v["sites"])
    dm = dp.blocks_model(args, v["kind"], int(v["reduction"]), inner)
    return dm, gates_for(dm, v["sites"], v.get("name", "?"))


def inner_points(dm) -> list[str]:
    """The candidate sites inside a residual branch: tap points below a residual block's feature
    (``layerS/B/...``) that are not themselves features."""
    features = set(dm.backbone.feature_names)
    return [s for s in dm.candidate_sites if s not in features and re.fullmatch(r"layer\d+/\d+/.+", s)]


def gates_for(dm, sites, name: str = "?") -> np.ndarray:
    """The gates of a site rule (``"every_block"``, ``"every_other_block"``, ``"inside_every_block"``) or an
    explicit tuple of sites."""
    every = placement.every_block_placement(dm)
    if sites == "every_block":
        return every
    if sites == "inside_every_block":
        inner = inner_points(dm)
        if not inner:   # no residual branch (the tiny CNN): the blocks go where every_block puts them
            return every
        return np.asarray([s in inner for s in dm.candidate_sites], np.float32)
    if sites == "every_other_block":
        gates = np.zeros_like(every)
        gates[np.flatnonzero(every)[::2]] = 1.0
        return gates
    unknown = [s for s in sites if s not in dm.candidate_sites]
    if unknown:
        raise ValueError(f"variant {name}: unknown sites {unknown}; choose among {list(dm.candidate_sites)}.")
    return np.asarray([s in sites for s in dm.candidate_sites], np.float32)


def variant_loss(config, s, dm, v: dict, eta: float):
    """A variant's training loss at activation-noise scale ``eta``; feature matching compares the placed blocks'
    outputs (``feature_sites="placed"``: gate-weighted, so one loss also serves vmapped placements). The backbone's
    weight noise, when the config sets one (``dp.weight_noise``), is drawn in training too."""
    weight_kind, weight_eta = dp.weight_noise(config)
    return denoise.denoiser_loss(dm, act_eta_train=float(eta), act_ref=s.ref, feature_weight=v["feature_weight"],
                                 feature_sites="placed",
                                 kl_weight=v["kl_weight"], nll_weight=v["nll_weight"],
                                 act_eta_spread=v["act_eta_spread"], sampler=dp.sampler(config),
                                 weight_kind=weight_kind, eta_train=weight_eta)


def stage_train(name: str):
    def run(ctx):
        config = ctx.config
        v = _variant(config, name)
        s = dp.setup(config)
        eta = float(ctx.summaries["level"]["target"])
        dm, gates = variant_model(config, v)
        chunk, max_chunks, per_epoch = dp.chunking(config, s, name)
        return dp.train_until_plateau(ctx, s, name, dm, gates, variant_loss(config, s, dm, v, eta), lr=v["lr"], eta=eta,
                                   chunk=chunk, max_chunks=max_chunks, per_epoch=per_epoch, patience=v["patience"],
                                   meta={"stage": f"train_{name}", "variant": v}, seed=v["seed"])
    return run


def eval_plan(config, level: dict) -> list[tuple[float, int]]:
    target = float(level["target"])
    sides = [(float(e), common.cap(config, config.eval.side_chips, dp.TINY_CHIPS)) for e in level["levels"]
             if float(e) != target]
    return [(target, common.cap(config, config.eval.n_chips, dp.TINY_CHIPS))] + sides


def stage_eval(name: str):
    def run(ctx):
        config = ctx.config
        s = dp.setup(config)
        if name == "plain":
            model, variables = s.model, s.variables
        else:
            model = variant_model(config, _variant(config, name))[0]
            variables = checkpoint.load_variables(ctx.result_path("weights", f"{name}.npz"), model)
        return dp.evaluate_arm(ctx, s, name, model, variables, eval_plan(config, dp.level_record(ctx)), noise_free=True)
    return run


def _at(entries: list[dict], eta: float) -> dict | None:
    return next((e for e in entries if dp.act_eta(e) == eta), None)


def _noise_free(entries: list[dict]) -> dict | None:
    return next((e for e in entries if e.get("activation_noise") is None and e.get("weight_noise") is None), None)


def stage_report(ctx):
    config = ctx.config
    s = dp.setup(config)
    level = dp.level_record(ctx)
    target = float(level["target"])
    backbone_params = s.model.param_count()
    plain = common.read_json(ctx.result_path("eval", "plain.json"))["arms"][0]["eval"]
    arms = [report.arm("plain", s.model, "clean", backbone_params, plain,
                       train={"pretrained": "random (tiny)" if config.tiny else config.pretrained})]
    rows, curves = [], {}
    vs = variants(config)
    base_eval = None
    for v in vs:
        dm, gates = variant_model(config, v)
        over = denoise.overhead(dm, gates)
        evals = common.read_json(ctx.result_path("eval", f"{v['name']}.json"))["arms"][0]["eval"]
        curve = dp.read_jsonl(ctx.result_path("curves", f"{v['name']}.jsonl"))
        curves[v["name"]] = curve
        best = max(curve, key=lambda p: p["mean"])
        sites = [site for site, g in zip(dm.candidate_sites, gates) if g]
        arms.append(report.arm(v["name"], s.model, "denoiser", backbone_params, evals,
                               extra_param_count=over["params"],
                               train={**{k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()},
                                      "placed_sites": sites, "act_eta_train": target,
                                      "chunks": len(curve), "best_chunk": best["chunk"], "best_epoch": best["epoch"],
                                      "batch_size": int(config.train.batch_size), "param_overhead":
                                      over["param_overhead"], "mac_overhead": over["mac_overhead"]}))
        if base_eval is None:
            base_eval = evals
        rows.append((v, over, curve, best, evals))
    comparison = {}
    base = _at(base_eval, target)
    for v, _, _, _, evals in rows[1:]:
        e = _at(evals, target)
        comparison[v["name"]] = stats.paired(e["per_chip"], base["per_chip"]).to_dict()
    seeds = over_seeds(vs, {v["name"]: _at(evals, target)["mean"] for v, *_, evals in rows}, vs[0]["name"])
    record = common.result(config, arms, "test", len(dp.test_split(config, s).labels), levels=level,
                           comparison={"baseline": vs[0]["name"], "eta": target,
                                       "what": "variant - baseline at the target level, paired per chip",
                                       "differences": comparison},
                           over_seeds={"eta": target, "what": "variants that differ only in the training seed: "
                                       "test accuracy at the target over seeds; vs the baseline's group per seed",
                                       "groups": seeds})
    report.write_json(ctx.result_path("results.json"), record)
    io_lib.write_text_atomic(ctx.result_path("results.md"), markdown(config, record, rows, plain, level,
                                                                     backbone_params, comparison, seeds))
    plot_curves(curves, _at(plain, target), ctx.result_path("curves.png"), target)
    return {v["name"]: _at(evals, target)["mean"] for v, _, _, _, evals in rows}


def markdown(config, record, rows, plain, level, backbone_params, comparison, seeds=None) -> str:
    target = float(level["target"])
    clean = plain[0]["mean"]
    p_t = _at(plain, target)
    lines = [f"# Denoiser ablation on {'cnn (tiny)' if config.tiny else config.model} "
             f"({record['dataset']['name']} test split, additive activation noise)", "",
             f"Command: `{record['command']}`", "",
             f"Plain model: noise-free {100 * clean:.2f}%, at the target eta {target} {100 * p_t['mean']:.2f}% "
             f"{robustness.format_ci95(p_t['ci95'])} ({p_t['n_chips']} chips); levels picked on held-out training "
             f"images ({level['protocol']}). Baseline variant: `{rows[0][0]['name']}`.", "",
             "| variant | kind | C/r | sites | params (%) | chunks (best epoch) | held-out best (%) | test at target "
             "(%) | 95% CI | p5 | drop recovered | drop (pts) | noise-free (%) | vs baseline (pts, paired CI) |",
             "|---|---|---:|---|---:|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for v, over, curve, best, evals in rows:
        e = _at(evals, target)
        drop = clean - p_t["mean"]
        rec = f"{100 * (e['mean'] - p_t['mean']) / drop:.0f}%" if drop > 0 else ""
        nf = _noise_free(evals)
        nf = "-" if nf is None else f"{100 * nf['mean']:.2f}"
        d = comparison.get(v["name"])
        vs = (f"{100 * d['mean']:+.2f} {robustness.format_ci95(d['ci95'], signed=True)}" if d else "-")
        loss = "+".join(["ce"] + [t for t, k in (("feature", "feature_weight"), ("kl", "kl_weight"),
                                                 ("nll", "nll_weight")) if v[k]])
        sites = v["sites"] if isinstance(v["sites"], str) else ", ".join(v["sites"])
        lines.append(f"| {v['name']} ({loss}{', spread ' + str(v['act_eta_spread']) if v['act_eta_spread'] else ''})"
                     f" | {v['kind']} | {v['reduction']} | {sites} | {100 * over['param_overhead']:.2f} | "
                     f"{len(curve)} ({best['epoch']:.2f}) | {100 * best['mean']:.2f} | {100 * e['mean']:.2f} | "
                     f"{robustness.format_ci95(e['ci95'])} | {100 * e['p5']:.2f} | {rec} | "
                     f"{100 * (clean - e['mean']):.2f} | {nf} | {vs} |")
    if seeds:
        lines += ["", f"## Over training seeds (test split, eta {target})", "",
                  "| group | seeds | per seed (%) | mean over seeds (%) | 95% CI over seeds | std (pts) | drop (pts) "
                  "| vs baseline's group per seed (pts) | mean difference (pts, 95% CI over seeds) |",
                  "|---|---|---|---:|---|---:|---:|---|---|"]
        for name, g in seeds.items():
            a, d = g["accuracy"], g["vs_baseline"]
            per = ", ".join(f"{100 * x:.2f}" for x in g["test_at_target"])
            vs_cells = ("- | -" if d is None else
                        ", ".join(f"{100 * x:+.2f}" for x in d["per_seed"]) + f" (seeds {d['seeds']} of "
                        f"{d['group']}) | {100 * d['interval']['mean']:+.2f} "
                        f"{robustness.format_ci95(d['interval']['ci95'], signed=True, missing='n/a (1 seed)')}")
            lines.append(f"| {name} ({', '.join(g['variants'])}) | {g['seeds']} | {per} | {100 * a['mean']:.2f} | "
                         f"{robustness.format_ci95(a['ci95'], missing='n/a (1 seed)')} | {100 * g['std']:.2f} | "
                         f"{100 * (clean - a['mean']):.2f} | {vs_cells} |")
    sides = [float(x) for x in level["levels"] if float(x) != target]
    if sides:
        lines += ["", "## Side levels (test split)", "", "| arm | " + " | ".join(f"eta {x}" for x in sides) + " |",
                  "|---|" + "---:|" * len(sides)]
        for name, evals in [("plain", plain)] + [(v["name"], ev) for v, _, _, _, ev in rows]:
            cells = []
            for x in sides:
                e = _at(evals, x)
                cells.append(f"{100 * e['mean']:.2f} {robustness.format_ci95(e['ci95'])} ({e['n_chips']})" if e
                             else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "'drop recovered' = (variant - plain) / (noise-free - plain) at the target level; 'drop' = the plain "
              "model's noise-free accuracy minus the variant's at the target (the papers' accuracy drop); "
              "'noise-free' = the variant's own accuracy without noise: above the plain model's where the blocks, "
              "trained on these (JPEG-compressed) training images, also adapt the backbone to them, which is part "
              "of the recovery. Chunks: "
              "training stopped when the held-out score had not improved for "
              f"{config.curve.patience} chunks (a variant's own ``patience`` where it sets one: "
              + (", ".join(f"{v['name']} {v['patience']}" for v, *_ in rows
                           if v["patience"] != int(config.curve.patience)) or "none")
              + "); the best chunk's blocks are the ones evaluated (curves.png)."]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict, plain_at_target: dict, path: str, target: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (no pyplot: no global state)
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot([p["epoch"] for p in curve], [100 * p["mean"] for p in curve], "o-", ms=3, c=f"C{i}", label=name)
    ax.set_xlabel("epochs of block training")
    ax.set_ylabel(f"held-out Monte Carlo accuracy at eta {target} (%)")
    ax.set_title(f"training curves (plain model on the test split: {100 * plain_at_target['mean']:.1f}%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    io_lib.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)


@protocol("denoise_ablation")
def stages(config) -> list[Stage]:
    vs = variants(config)   # checked before anything runs
    dp.weight_noise(config)
    level = dp.BACKBONE_SETTINGS + ("level", "eval.batch_size")
    trained = level + ("denoiser", "train", "curve")
    out = [Stage("level", dp.stage_level, settings=level, outputs=("level.json",))]
    for v in vs:
        out.append(Stage(f"train_{v['name']}", stage_train(v["name"]), settings=trained + (f"variants.{v['name']}",),
                         outputs=(f"weights/{v['name']}.npz", f"metrics/{v['name']}.jsonl",
                                  f"curves/{v['name']}.jsonl")))
    out.append(Stage("eval_plain", stage_eval("plain"), settings=level + ("eval",), outputs=("eval/plain.json",)))
    for v in vs:
        out.append(Stage(f"eval_{v['name']}", stage_eval(v["name"]),
                         settings=trained + (f"variants.{v['name']}", "eval"),
                         outputs=(f"eval/{v['name']}.json",)))
    out.append(Stage("report", stage_report, settings=None, outputs=("results.json", "results.md", "curves.png")))
    return out
