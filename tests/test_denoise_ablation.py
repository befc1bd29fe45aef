"""The denoiser-ablation protocol's own rules: early stopping, variant checking, placements (no training here;
tests/test_experiment.py runs its config end to end in tiny mode)."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxnoise import checkpoint, denoise, experiment, noise, stats, train
from jaxnoise import io as io_lib
from jaxnoise.models import get_model
from jaxnoise.protocols import denoise_ablation as da
from jaxnoise.protocols import denoise_placement as dp

CONFIG = os.path.join("experiments", "configs", "denoise_ablation_resnet20.py")


def _curve(*means):
    return [{"mean": m} for m in means]


@pytest.mark.parametrize("means, patience, stop", [
    ((0.5,), 2, False),                       # too short to tell
    ((0.5, 0.6, 0.7), 2, False),              # still improving
    ((0.5, 0.7, 0.7, 0.701), 2, True),        # two chunks within min_delta of the best before them
    ((0.5, 0.7, 0.69, 0.75), 2, False),       # the last one beat it
    ((0.5, 0.7, 0.6), 1, True),
    ((0.7, 0.6, 0.65, 0.66), 3, True),        # three chunks below the first
])
def test_training_stops_after_patience_chunks_without_improvement(means, patience, stop):
    assert dp.stopped(_curve(*means), patience, min_delta=0.002) is stop


def _config(*overrides):
    return experiment.apply_overrides(experiment.load_config(CONFIG), list(overrides))


def test_variants_fill_defaults_and_put_the_baseline_first():
    vs = da.variants(_config())
    assert vs[0]["name"] == "ce" and {v["name"] for v in vs} >= {"feature", "kl", "spread", "wide_half"}
    kl = next(v for v in vs if v["name"] == "kl")
    assert kl == {"name": "kl", "kind": "residual", "reduction": 10, "sites": "every_block", "feature_weight": 0.0,
                  "kl_weight": 1.0, "nll_weight": 0.0, "act_eta_spread": 0.0, "lr": 0.02, "patience": 2,
                  "seed": 0}
    full = next(v for v in vs if v["name"] == "feature_kl_full")
    assert full["patience"] == 10 and full["feature_weight"] == full["kl_weight"] == 1.0


@pytest.mark.slow   # two tiny trainings, ~20 s
def test_a_variant_with_its_own_patience_reaches_the_curve_rule(tmp_path, monkeypatch):
    """The baseline stops by ``curve.patience``, a variant that sets ``patience`` by its own."""
    config = _config("tiny=True", "curve.patience=3")
    config.variants = type(config.variants)({"ce": config.variants.ce, "full": {"patience": 10}})
    seen = []
    stopped = dp.stopped
    monkeypatch.setattr(dp, "stopped", lambda curve, patience, min_delta: seen.append(patience) or stopped(
        curve, patience, min_delta))
    experiment.run(config, only=["level", "train_ce", "train_full"], log=lambda m: None,
                   results_dir=str(tmp_path / "results"), work_dir=str(tmp_path / "work"))
    assert set(seen) == {3, 10} and seen.index(10) > seen.index(3)


@pytest.mark.parametrize("overrides, match", [
    (["variants.kl.weight=1.0"], "unknown keys.*'weight'"),
    (["baseline='nope'"], "baseline='nope' is not a variant"),
    (["variants.wide_half.sites='every_third'"], "sites='every_third'"),
])
def test_bad_variants_are_refused_before_anything_runs(overrides, match):
    config = _config(*overrides) if "weight=" not in overrides[0] else None
    if config is None:   # a new key: set it on the ConfigDict directly (--set refuses unknown keys itself)
        config = _config()
        config.variants.kl.weight = 1.0
    with pytest.raises(ValueError, match=match):
        experiment.stages_of(config)


def test_a_variant_that_repeats_another_run_is_refused():
    config = _config()
    config.variants.ce_again = {}            # ce's settings and seed: the same run twice
    with pytest.raises(ValueError, match=r"\['ce', 'ce_again'\] are the same run.*seed 0"):
        experiment.stages_of(config)
    config.variants.ce_again = {"seed": 7}   # another training seed: a run of its own
    assert "train_ce_again" in [st.name for st in experiment.stages_of(config)]


def test_over_seeds_groups_variants_that_differ_only_in_the_seed():
    config = _config()
    config.variants = type(config.variants)({"ce": {}, "ce_s1": {"seed": 1}, "ce_s2": {"seed": 2},
                                             "spread": {"act_eta_spread": 0.33}, "spread_s2": {"act_eta_spread": 0.33,
                                                                                              "seed": 2},
                                             "kl": {"kl_weight": 1.0}})
    vs = da.variants(config)
    groups = sorted([v["name"] for v in g] for g in da.seed_groups(vs))
    assert groups == [["ce", "ce_s1", "ce_s2"], ["kl"], ["spread", "spread_s2"]]
    acc = {"ce": 0.80, "ce_s1": 0.78, "ce_s2": 0.79, "spread": 0.81, "spread_s2": 0.82, "kl": 0.5}
    out = da.over_seeds(vs, acc, "ce")
    assert set(out) == {"ce", "spread"}      # kl has one seed: no group
    ce, spread = out["ce"], out["spread"]
    assert ce["seeds"] == [0, 1, 2] and ce["vs_baseline"] is None
    assert ce["accuracy"] == stats.over_seeds([0.80, 0.78, 0.79]).to_dict()
    assert ce["std"] == pytest.approx(0.01)
    d = spread["vs_baseline"]
    assert d["group"] == "ce" and d["seeds"] == [0, 2]
    assert d["per_seed"] == pytest.approx([0.01, 0.03])          # seed by seed: spread seed k - ce seed k
    assert d["interval"] == stats.over_seeds(d["per_seed"]).to_dict()
    lo, hi = d["interval"]["ci95"]
    assert lo < 0.02 < hi and hi - lo > 0.1                        # t with 1 degree of freedom: wide


@pytest.mark.slow   # two tiny level stages, ~12 s
def test_a_variants_seed_sets_its_blocks_init_and_training_seed_only(tmp_path, monkeypatch):
    """``seed`` changes the blocks' initialisation and the training seed (data order, training noise); the default
    seed keeps the keys every committed variant was trained with."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_train(dm, ds, tcfg, *, variables, metadata, **kw):
        seen[tcfg.seed] = variables
        raise Stop

    monkeypatch.setattr(denoise, "train_denoisers", fake_train)
    for seed in (0, 1):   # the same variant at the config's seed (0) and at its own seed 1
        config = _tiny_ce()
        config.variants = type(config.variants)({"ce": {"seed": seed}})
        with pytest.raises(Stop):
            experiment.run(config, only=["level", "train_ce"], log=lambda m: None,
                           results_dir=str(tmp_path / f"s{seed}" / "results"),
                           work_dir=str(tmp_path / f"s{seed}" / "work"))
    assert sorted(seen) == [0, 1]
    v0, v1 = seen[0], seen[1]
    s = dp.setup(config)
    dm, gates = da.variant_model(config, da.variants(config)[0])
    before = denoise.init_variables(dm, s.variables, noise.name_key(s.key, "init"), placement=gates)
    flat = lambda v: traverse_util.flatten_dict(v["params"], sep="/")  # noqa: E731
    f0, f1, fb = flat(v0), flat(v1), flat(before)
    assert all(np.array_equal(f0[p], fb[p]) for p in fb)               # seed 0: the keys of the committed runs
    blocks = [p for p in f0 if denoise.is_denoiser_param(p)]
    assert blocks and any(not np.array_equal(f0[p], f1[p]) for p in blocks)
    assert all(np.array_equal(f0[p], f1[p]) for p in f0 if not denoise.is_denoiser_param(p))   # the same backbone


def test_site_rules_on_resnet20():
    dm = denoise.denoised(get_model("resnet20"))
    every = da.gates_for(dm, "every_block")
    blocks = [s for s, g in zip(dm.candidate_sites, every) if g]
    assert blocks == [f"layer{i}/{j}" for i in (1, 2, 3) for j in range(3)]
    other = [s for s, g in zip(dm.candidate_sites, da.gates_for(dm, "every_other_block")) if g]
    assert other == blocks[::2]
    assert [s for s, g in zip(dm.candidate_sites, da.gates_for(dm, ("stem", "layer3/2"))) if g] == ["stem", "layer3/2"]
    with pytest.raises(ValueError, match="unknown sites"):
        da.gates_for(dm, ("layer9/0",))


def test_inside_every_block_places_one_block_per_residual_branch_at_the_same_budget():
    config = _config()
    vs = {v["name"]: v for v in da.variants(config)}
    dm_in, gates_in = da.variant_model(config, vs["inside"])
    dm_ce, gates_ce = da.variant_model(config, vs["ce"])
    placed = [s for s, g in zip(dm_in.candidate_sites, gates_in) if g]
    assert placed == [f"layer{i}/{j}/mid" for i in (1, 2, 3) for j in range(3)]
    assert dm_in.candidate_sites == dm_in.backbone.tap_names and dm_ce.candidate_sites == dm_ce.backbone.feature_names
    # the inner point of a block has the block output's channels: the same widths, the same parameters
    assert denoise.overhead(dm_in, gates_in)["params"] == denoise.overhead(dm_ce, gates_ce)["params"]
    # the tiny CNN has no residual branch: the rule falls back to every_block there
    tiny = denoise.denoised(get_model("cnn", input_shape=(8, 8, 1)))
    np.testing.assert_array_equal(da.gates_for(tiny, "inside_every_block"), da.gates_for(tiny, "every_block"))


def _tiny_ce(*overrides):
    """The tiny ablation with the baseline variant only (2 chunks, no early stop): the stages level, train_ce."""
    config = _config("tiny=True", "curve.patience=99", *overrides)
    config.variants = type(config.variants)({"ce": config.variants.ce})
    return config


def _log(path):
    """A training log without its wall-clock fields."""
    return [{k: v for k, v in line.items() if k not in ("time", "elapsed")} for line in train.read_metrics(str(path))]


@pytest.mark.slow   # two tiny trainings, ~25 s
def test_a_variant_stopped_mid_training_resumes_from_its_committed_curve_without_its_work_dir(tmp_path, monkeypatch,
                                                                                              capsys):
    """The committed results (curve, best weights, log, portable checkpoint) are all a later session has: a fresh
    work dir resumes from the portable checkpoint at the last chunk, and the variant ends as the uninterrupted run
    does, chunk for chunk."""
    config = _tiny_ce()
    only = ["level", "train_ce"]
    whole = {"results_dir": str(tmp_path / "whole" / "results"), "work_dir": str(tmp_path / "whole" / "work")}
    experiment.run(config, only=only, log=lambda m: None, **whole)

    cut = {"results_dir": str(tmp_path / "cut" / "results"), "work_dir": str(tmp_path / "cut" / "work")}
    append = io_lib.append_lines

    def stop_after_one_chunk(path, lines):
        append(path, lines)
        if path.endswith(os.path.join("curves", "ce.jsonl")) and len(open(path).readlines()) == 1:
            raise KeyboardInterrupt("the session ended")

    monkeypatch.setattr(io_lib, "append_lines", stop_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, only=only, log=lambda m: None, **cut)
    monkeypatch.setattr(io_lib, "append_lines", append)
    results = tmp_path / "cut" / "results"
    assert len((results / "curves" / "ce.jsonl").read_text().splitlines()) == 1
    assert (results / "weights" / "ce.npz").exists() and (results / "metrics" / "ce.jsonl").exists()
    portable = glob.glob(str(results / "resume" / "train_ce-*" / "ce.npz"))
    assert len(portable) == 1 and checkpoint.read_delta_metadata(portable[0])["step"] == dp.TINY_CHUNK_STEPS
    shutil.rmtree(tmp_path / "cut" / "work")   # a new session: only the committed results are left
    logs = []
    capsys.readouterr()
    experiment.run(config, only=only, log=logs.append, **cut)
    assert any("train_ce: running" in m for m in logs), logs
    out = capsys.readouterr().out
    assert f"no checkpoint; resuming from the portable checkpoint {portable[0]} (step {dp.TINY_CHUNK_STEPS})" in out
    assert not os.path.exists(portable[0])   # the curve is complete

    a, b = tmp_path / "whole" / "results", results
    curve_a, curve_b = dp.read_jsonl(str(a / "curves" / "ce.jsonl")), dp.read_jsonl(str(b / "curves" / "ce.jsonl"))
    assert [p["chunk"] for p in curve_b] == [1, 2]
    assert [p["per_chip"] for p in curve_b] == [p["per_chip"] for p in curve_a]
    va = checkpoint.load_variables(str(a / "weights" / "ce.npz"))
    vb = checkpoint.load_variables(str(b / "weights" / "ce.npz"))
    jax.tree.map(np.testing.assert_array_equal, va, vb)
    assert _log(b / "metrics" / "ce.jsonl") == _log(a / "metrics" / "ce.jsonl")


def _with_weight_noise(config, kind="additive_rel_max", eta=0.05):
    config.noise.weight_kind = kind
    config.noise.weight_eta = eta
    return config


def test_weight_noise_is_off_unless_the_config_sets_it():
    assert dp.weight_noise(_config()) == (None, 0.0)   # the committed configs have no weight_kind key
    assert dp.weight_noise(_with_weight_noise(_config())) == ("additive_rel_max", 0.05)
    assert dp.weight_noise(_with_weight_noise(_config(), kind="", eta=0.0)) == (None, 0.0)


@pytest.mark.parametrize("kind, eta, match", [
    ("gaussian", 0.05, "noise.weight_kind='gaussian' is unknown"),
    ("", 0.05, "noise.weight_eta=0.05 but noise.weight_kind is unset"),
    ("additive_rel_max", -0.1, "noise.weight_eta=-0.1 must be a number >= 0"),
    ("additive_rel_max", "0.1", "noise.weight_eta='0.1' must be a number"),
])
def test_bad_weight_noise_is_refused_before_anything_runs(kind, eta, match):
    for path in (CONFIG, os.path.join("experiments", "configs", "denoise_resnet20.py"),
                 os.path.join("experiments", "configs", "denoise_proxy_resnet20.py")):
        config = _with_weight_noise(experiment.load_config(path), kind, eta)
        with pytest.raises(ValueError, match=match):
            experiment.stages_of(config)


def test_weight_noise_reaches_the_evaluation_spec_and_the_training_loss():
    """Set, the backbone's weight noise is in every evaluation spec beside the activation noise and drawn in the
    blocks' training loss; unset, the spec is the activation-only one the committed results were made with."""
    off = _tiny_ce()
    on = _with_weight_noise(_tiny_ce(), eta=0.2)
    s = dp.setup(off)
    eta = 0.3
    spec_off, spec_on = dp.spec(off, s, eta), dp.spec(on, s, eta)
    legacy = jax.tree.map(np.asarray, dp.noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=s.ref,
                                                         act_eta=eta, sampler=dp.sampler(off)))
    assert spec_off.describe() == legacy.describe() and spec_off.weight_kind is None
    assert spec_on.weight_kind == "additive_rel_max" and float(spec_on.weight_eta) == 0.2
    assert spec_on.describe()["activation_noise"] == spec_off.describe()["activation_noise"]
    assert spec_on.describe()["weight_noise"] == {"kind": "additive_rel_max", "eta": 0.2}

    v = da.variants(off)[0]
    dm, gates = da.variant_model(off, v)
    dvars = denoise.init_variables(dm, s.variables, jax.random.key(1))
    params = denoise.with_placement(dm, dvars, gates)["params"]
    x = s.ds.preprocess(jax.numpy.asarray(s.selection.images[:32]))
    y = jax.numpy.asarray(s.selection.labels[:32])
    key = jax.random.key(2)

    def loss(config):
        fn = da.variant_loss(config, s, dm, v, eta)
        return float(fn(params, dvars.get("batch_stats", {}), x, y, key, fn.hparams)[0])

    assert loss(on) != loss(off)
    # the same key twice: the same draws (the loss is a pure function of its key)
    assert loss(on) == loss(on)


@pytest.mark.slow   # a tiny training, ~15 s
def test_a_tiny_variant_trains_and_is_scored_under_weight_and_activation_noise(tmp_path):
    config = _with_weight_noise(_tiny_ce(), eta=0.1)
    dirs = {"results_dir": str(tmp_path / "results"), "work_dir": str(tmp_path / "work")}
    experiment.run(config, only=["level", "train_ce"], log=lambda m: None, **dirs)
    level = json.load(open(tmp_path / "results" / "level.json"))
    noisy = [e for a in level["arms"] for e in a["eval"] if e["activation_noise"] is not None]
    assert noisy and all(e["weight_noise"] == {"kind": "additive_rel_max", "eta": 0.1} for e in noisy)
    curve = dp.read_jsonl(str(tmp_path / "results" / "curves" / "ce.jsonl"))
    assert len(curve) == 2 and all(0.0 <= p["mean"] <= 1.0 for p in curve)
    # the chips differ: weight and activation draws per chip, so the per-chip scores are not all equal
    assert len(set(curve[-1]["per_chip"])) > 1


@pytest.mark.slow   # a tiny training, its evaluations and the report, ~20 s
def test_report_gives_each_variants_drop_and_its_own_noise_free_accuracy(tmp_path):
    config = _tiny_ce()
    results = tmp_path / "results"
    experiment.run(config, log=lambda m: None, results_dir=str(results), work_dir=str(tmp_path / "work"))
    plain = json.load(open(results / "eval" / "plain.json"))["arms"][0]["eval"]
    ce = json.load(open(results / "eval" / "ce.json"))["arms"][0]["eval"]
    clean, ce_clean = plain[0]["mean"], ce[0]["mean"]
    assert plain[0]["activation_noise"] is None and ce[0]["activation_noise"] is None
    ce_target = ce[1]["mean"]   # the target level comes first after the noise-free entry
    row = next(line for line in (results / "results.md").read_text().splitlines() if line.startswith("| ce "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[11:13] == [f"{100 * (clean - ce_target):.2f}", f"{100 * ce_clean:.2f}"]
