"""The proxy study's own rules: the placements it compares and the rank correlation it reports (no training here;
tests/test_experiment.py runs its config end to end in tiny mode)."""

import math

import numpy as np
import pytest
import scipy.stats

from jaxnoise import denoise, placement
from jaxnoise.models import get_model
from jaxnoise.protocols import denoise_proxy as dpx


@pytest.fixture(scope="module")
def dm():
    return denoise.denoised(get_model("resnet20"), config=denoise.DenoiserConfig(reduction=10))   # every block: 2.39%


def test_placements_are_distinct_within_budget_and_start_with_the_rules(dm):
    sites = dm.candidate_sites
    gains = {s: float(i) for i, s in enumerate(sites)}            # later sites more sensitive
    grads = {s: float(-i) for i, s in enumerate(sites)}           # earlier sites larger gradients
    ps = dpx.make_placements(dm, 0.025, gains, grads, 10, seed=0)
    assert len(ps) == 10
    keys = {tuple(p["gates"]) for p in ps}
    assert len(keys) == 10 and all(any(p["gates"]) for p in ps)
    limit = 0.025 * dm.backbone.param_count()
    costs = placement.site_params(dm)
    assert all(np.dot(costs, p["gates"]) <= limit for p in ps)
    rules = [p["rule"] for p in ps]
    assert rules[:2] == ["every_block", "every_other_block"] and "gradient_ranked" in rules
    grad = next(p for p in ps if p["rule"] == "gradient_ranked")
    assert grad["sites"][0] == "stem"                             # the largest gradient first
    assert [p["sites"] for p in ps if p["rule"] == "most_sensitive"] in ([], [["pre_logits"]], [[sites[-1]]])


def test_too_many_placements_for_the_budget_are_refused(dm):
    with pytest.raises(ValueError, match="distinct placements fit"):
        dpx.make_placements(dm, 0.002, {s: 1.0 for s in dm.candidate_sites}, {}, 50, seed=0)


def test_spearman_with_its_fisher_interval():
    a = [0.1, 0.4, 0.2, 0.8, 0.5, 0.6, 0.3, 0.9]
    b = [0.2, 0.3, 0.1, 0.9, 0.6, 0.4, 0.35, 0.8]
    r = dpx.spearman(a, b)
    assert r["rho"] == pytest.approx(scipy.stats.spearmanr(a, b).statistic)
    lo, hi = r["ci95"]
    assert lo < r["rho"] < hi <= 1
    assert math.atanh(hi) - math.atanh(r["rho"]) == pytest.approx(1.96 * 1.06 / math.sqrt(len(a) - 3))
    assert dpx.spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])["rho"] is None   # constant scores: undefined
    assert dpx.spearman(a[:3], b[:3])["ci95"] is None
