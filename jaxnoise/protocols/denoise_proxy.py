"""Protocol ``denoise_proxy``: how long must a placement search's proxy train to rank placements like the final
training does? (Issue 17, part 2.)

A placement search scores each candidate placement after a short training (the proxy). That is only as good as the
proxy's ranking agrees with the ranking after full training. This protocol measures it: ``proxy.n_placements``
placements within the budget, each scored by proxies of every length in ``proxy.steps`` (all placements trained
together, vmapped, same batches and noise: ``jaxnoise.placement.train_candidates``) and by the final recipe
(``denoise_placement.train_until_plateau``); then the Spearman rank correlation of each proxy length with the final
scores. Every score is the Monte Carlo mean on the held-out training images at the target level, on the same chips
(``proxy.n_chips``), never the test split.

Stages:

* ``level``, ``sensitivity``: as in ``denoise_placement`` (the target level; per-site removal gain and gradient
  norm on the held-out images).
* ``placements``: the placements (``placements.jsonl``, one line each): a block after every residual block, after every other one,
  the sites ranked by gradient norm (the paper's first-order bound) and by removal gain each filled into the budget,
  the single most sensitive site, then seeded random budget-filling placements until there are
  ``proxy.n_placements`` distinct ones.
* ``proxy``: for each length L of ``proxy.steps``, every placement trained L steps from fresh blocks and scored
  (``proxy.jsonl``, a line after each length: a stopped stage resumes at the next one).
* ``final_<i>`` for i < ``proxy.n_placements``: placement i trained with the final recipe until its held-out curve
  plateaus (``curves/final_<i>.jsonl``, ``weights/final_<i>.npz``); its score is its best curve point.
* ``report``: ``results.json`` and ``results.md``: per length, Spearman rho (with a 95% interval from the Fisher z
  transform, n placements) and the shortest length reaching ``proxy.target_rho``; ``proxy_vs_final.png``.

``tiny=True``: digits, ``denoise_placement``'s one-block CNN, 2 placements, 2 proxy lengths of 2 and 4 steps, one
training chunk, 2 chips (the tests).
"""

from __future__ import annotations

import json
import math

import numpy as np
import scipy.stats

from jaxnoise import denoise, noise, placement, report, robustness
from jaxnoise import io as io_lib
from jaxnoise.protocols import common
from jaxnoise.protocols import denoise_ablation as da
from jaxnoise.protocols import denoise_placement as dp
from jaxnoise.stages import Stage, protocol

TINY_STEPS = (2, 4)
TINY_PLACEMENTS = 2


def n_placements(config) -> int:
    return min(int(config.proxy.n_placements), TINY_PLACEMENTS) if config.tiny else int(config.proxy.n_placements)


def _recipe(config) -> dict:
    """The final recipe as a denoise_ablation variant (the ``denoiser`` section)."""
    d = config.denoiser
    return {"name": "final", "kind": d.kind, "reduction": int(d.reduction), "sites": "every_block",
            "feature_weight": float(d.feature_weight), "kl_weight": float(d.kl_weight),
            "nll_weight": float(d.nll_weight), "act_eta_spread": float(d.act_eta_spread),
            "lr": float(config.train.lr)}


def _dmodel(config):
    return dp.blocks_model(dp.backbone_args(config), config.denoiser.kind, int(config.denoiser.reduction))


def _fill(dm, order, limit: float, costs=None) -> np.ndarray:
    """Sites in ``order``, each added while the budget allows."""
    costs = placement.site_params(dm) if costs is None else costs
    gates = np.zeros(len(dm.candidate_sites), np.float32)
    used = 0
    for site in order:
        i = dm.candidate_sites.index(site)
        if used + costs[i] <= limit:
            gates[i], used = 1.0, used + costs[i]
    return gates


def make_placements(dm, budget: float, gains: dict, grads: dict, n: int, seed: int) -> list[dict]:
    """``n`` distinct placements within ``budget`` (module docstring), each ``{"rule", "gates", "sites"}``."""
    limit = budget * dm.backbone.param_count()
    sites = dm.candidate_sites
    costs = placement.site_params(dm)
    candidates = [(rule, da.gates_for(dm, rule)) for rule in da.SITE_RULES] + [
        ("gradient_ranked", _fill(dm, sorted(sites, key=lambda t: -grads.get(t, 0.0)), limit, costs)),
        ("removal_ranked", _fill(dm, sorted(sites, key=lambda t: -gains.get(t, 0.0)), limit, costs))]
    try:
        candidates.append(("most_sensitive", placement.most_sensitive_placement(dm, gains, budget)))
    except ValueError:   # no single block fits: the random fills below find none either, and the count check says so
        pass
    out, seen = [], set()

    def add(rule, gates):
        key = tuple(int(g) for g in gates)
        params = float(np.dot(costs, gates))
        if any(key) and key not in seen and params <= limit and len(out) < n:
            seen.add(key)
            out.append({"rule": rule, "gates": [float(g) for g in gates],
                        "sites": [t for t, g in zip(sites, gates) if g]})

    for rule, gates in candidates:
        add(rule, gates)
    r = 0
    while len(out) < n and r < 20 * n:
        rng = np.random.default_rng([seed, r])   # a random order filled up to a random share of the budget
        add(f"random_{r}", _fill(dm, list(rng.permutation(sites)), limit * float(rng.uniform(0.3, 1.0)), costs))
        r += 1
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct placements fit the budget {budget}; lower proxy.n_placements "
                         f"or raise the budget.")
    return out


def stage_placements(ctx):
    config = ctx.config
    dm = _dmodel(config)
    sens = common.read_json(ctx.result_path("sensitivity.json"))
    gains = {k: v["gain"] for k, v in sens["removal"]["sites"].items()}
    out = make_placements(dm, dp.budget(config), gains, sens["gradient_norm"], n_placements(config),
                          int(config.seed))
    for p in out:
        p.update(denoise.overhead(dm, np.asarray(p["gates"], np.float32)))
    io_lib.write_text_atomic(ctx.result_path("placements.jsonl"), "".join(json.dumps(p) + "\n" for p in out))
    return {"rules": [p["rule"] for p in out]}


def _placements(ctx) -> list[dict]:
    return dp.read_jsonl(ctx.result_path("placements.jsonl"))


def _proxy_steps(config) -> tuple[int, ...]:
    return TINY_STEPS if config.tiny else tuple(int(x) for x in config.proxy.steps)


def stage_proxy(ctx):
    config = ctx.config
    s = dp.setup(config)
    eta = float(ctx.summaries["level"]["target"])
    dm = _dmodel(config)
    gates = np.asarray([p["gates"] for p in _placements(ctx)], np.float32)
    path = ctx.result_path("proxy.jsonl")
    done = dp.read_jsonl(path)
    dvars = denoise.init_variables(dm, s.variables, noise.name_key(s.key, "init"))
    loss_fn = da.variant_loss(config, s, dm, _recipe(config), eta)
    n_chips = common.cap(config, config.proxy.n_chips, dp.TINY_CHIPS)
    for steps in _proxy_steps(config):
        if any(d["steps"] == steps for d in done):
            continue
        blocks, losses = placement.train_candidates(
            dm, dvars, gates, s.ds, loss_fn, steps=steps, key=noise.name_key(s.key, f"proxy/{steps}"),
            batch_size=int(config.proxy.batch_size), learning_rate=float(config.train.lr), split=s.train_part)
        per_chip = placement.evaluate_placements(dm, dvars, gates, s.selection.images, s.selection.labels,
                                                 dp.spec(config, s, eta), key=noise.name_key(s.key, "curve"),
                                                 n_chips=n_chips, block_params=blocks,
                                                 batch_size=int(config.eval.batch_size), preprocess=s.ds.preprocess)
        done.append({"steps": steps, "means": [float(m) for m in np.mean(per_chip, axis=1)],
                     "per_chip": np.asarray(per_chip, float).tolist(), "train_loss": np.asarray(losses).tolist()})
        io_lib.append_lines(path, [json.dumps(done[-1]) + "\n"])
        ctx.log(f"proxy: {steps} steps: " + ", ".join(f"{100 * m:.1f}" for m in done[-1]["means"]))
    return {"steps": [d["steps"] for d in done]}


def stage_final(i: int):
    def run(ctx):
        config = ctx.config
        s = dp.setup(config)
        eta = float(ctx.summaries["level"]["target"])
        dm = _dmodel(config)
        p = _placements(ctx)[i]
        gates = np.asarray(p["gates"], np.float32)
        chunk, max_chunks, per_epoch = dp.chunking(config, s, f"final_{i}")   # tiny: one chunk
        loss_fn = da.variant_loss(config, s, dm, _recipe(config), eta)
        return dp.train_until_plateau(ctx, s, f"final_{i}", dm, gates, loss_fn,
                                      lr=float(config.train.lr), eta=eta, chunk=chunk, max_chunks=max_chunks,
                                      per_epoch=per_epoch, meta={"stage": f"final_{i}", "rule": p["rule"]})
    return run


def spearman(a, b) -> dict:
    """Spearman rho of two score lists, with a 95% interval from the Fisher z transform (se 1.06 / sqrt(n - 3),
    Fieller et al. 1957; None below 4 points). rho is None when undefined (fewer than 2 points, or a list whose
    scores are all equal)."""
    n = len(a)
    rho = None
    if n >= 2 and np.ptp(a) > 0 and np.ptp(b) > 0:
        rho = float(scipy.stats.spearmanr(a, b).statistic)
    ci = None
    if rho is not None and n >= 4 and abs(rho) < 1:
        z, se = math.atanh(rho), 1.06 / math.sqrt(n - 3)
        ci = [math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se)]
    return {"rho": rho, "ci95": ci, "n": n}


def _fmt(rho) -> str:
    return "undefined" if rho is None else f"{rho:+.3f}"


def stage_report(ctx):
    config = ctx.config
    s = dp.setup(config)
    ps = _placements(ctx)
    finals, arms = [], []
    n_sel = len(s.selection.labels)
    spec_desc = dp.spec(config, s, float(dp.level_record(ctx)["target"])).describe()
    for i, p in enumerate(ps):
        curve = dp.read_jsonl(ctx.result_path("curves", f"final_{i}.jsonl"))
        best = max(curve, key=lambda c: c["mean"])
        finals.append(best["mean"])
        arms.append(report.arm(f"final_{i}", s.model, "denoiser", s.model.param_count(),
                               [robustness.MCResult.from_per_chip(best["per_chip"], n_sel, spec_desc)],
                               extra_param_count=int(p["params"]),
                               train={"rule": p["rule"], "sites": p["sites"], "best_epoch": best["epoch"],
                                      "chunks": len(curve)}))
    proxies = dp.read_jsonl(ctx.result_path("proxy.jsonl"))
    rows = [{"steps": d["steps"], **spearman(d["means"], finals)} for d in sorted(proxies, key=lambda d: d["steps"])]
    target = float(config.proxy.target_rho)
    chosen = next((r["steps"] for r in rows if r["rho"] is not None and r["rho"] >= target), None)
    best = max(rows, key=lambda r: -2 if r["rho"] is None else r["rho"])
    record = common.result(config, arms, f"train[{len(s.train_part)}:] (held out)", n_sel,
                           placements=ps, finals=finals, proxies=rows, target_rho=target, chosen_steps=chosen,
                           best_steps=best["steps"])
    report.write_json(ctx.result_path("results.json"), record)
    lines = [f"# Proxy lengths for the placement search ({'cnn (tiny)' if config.tiny else config.model})", "",
             f"Command: `{record['command']}`", "",
             f"{len(ps)} placements within {100 * dp.budget(config):.1f}% parameters; every score is the Monte "
             f"Carlo mean on the {len(s.selection.labels)} held-out training images at the target level, common "
             f"chips. Final = the best point of the plateau training (denoise_ablation recipe).", "",
             "| placement | rule | params (%) | final (%) | " + " | ".join(f"{r['steps']} steps" for r in rows) + " |",
             "|---|---|---:|---:|" + "---:|" * len(rows)]
    for i, p in enumerate(ps):
        cells = [f"{100 * next(d for d in proxies if d['steps'] == r['steps'])['means'][i]:.2f}" for r in rows]
        lines.append(f"| {', '.join(p['sites'])} | {p['rule']} | {100 * p['param_overhead']:.2f} | "
                     f"{100 * finals[i]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "| proxy steps | Spearman rho with final | 95% CI (Fisher z) |", "|---:|---:|---|"]
    for r in rows:
        ci = "" if r["ci95"] is None else f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"
        lines.append(f"| {r['steps']} | {_fmt(r['rho'])} | {ci} |")
    lines += ["", f"Shortest proxy with rho >= {target}: "
              + (f"{chosen} steps." if chosen else f"none; the best reached is rho {_fmt(best['rho'])} at "
                                                  f"{best['steps']} steps.")]
    io_lib.write_text_atomic(ctx.result_path("results.md"), "\n".join(lines) + "\n")
    plot(rows, proxies, finals, ctx.result_path("proxy_vs_final.png"))
    return {"chosen_steps": chosen, "rho": {str(r["steps"]): r["rho"] for r in rows}}


def plot(rows, proxies, finals, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (no pyplot: no global state)
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(4 * len(rows), 3.6))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(rows)))
    for ax, r in zip(axes, rows):
        means = next(d for d in proxies if d["steps"] == r["steps"])["means"]
        ax.scatter([100 * m for m in means], [100 * f for f in finals], s=14)
        ax.set_xlabel(f"proxy score, {r['steps']} steps (%)")
        ax.set_ylabel("final score (%)")
        ax.set_title(f"Spearman rho {_fmt(r['rho'])}")
    fig.tight_layout()
    io_lib.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)


@protocol("denoise_proxy")
def stages(config) -> list[Stage]:
    dp.weight_noise(config)   # checked before anything runs
    level = dp.BACKBONE_SETTINGS + ("level", "eval.batch_size")
    sensitivity = level + ("search.n_chips", "search.grad_draws")
    chosen = sensitivity + ("denoiser", "search.budget", "proxy.n_placements")
    trained = chosen + ("train", "curve")
    out = [Stage("level", dp.stage_level, settings=level, outputs=("level.json",)),
           Stage("sensitivity", dp.stage_sensitivity, settings=sensitivity, outputs=("sensitivity.json",)),
           Stage("placements", stage_placements, settings=chosen, outputs=("placements.jsonl",)),
           Stage("proxy", stage_proxy, settings=trained + ("proxy",), outputs=("proxy.jsonl",))]
    for i in range(n_placements(config)):
        out.append(Stage(f"final_{i}", stage_final(i), settings=trained,
                         outputs=(f"weights/final_{i}.npz", f"curves/final_{i}.jsonl")))
    out.append(Stage("report", stage_report, settings=None, outputs=("results.json", "results.md",
                                                                     "proxy_vs_final.png")))
    return out
