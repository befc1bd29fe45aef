"""The denoiser-ablation protocol's own rules: early stopping, variant checking, placements (no training here;
tests/test_experiment.py runs its config end to end in tiny mode)."""

import os

import numpy as np
import pytest

from jaxnoise import denoise, experiment
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
                  "kl_weight": 1.0, "nll_weight": 0.0, "act_eta_spread": 0.0, "lr": 0.02}


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
