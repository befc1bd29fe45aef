"""jaxnoise.stats against scipy's t tests."""

import numpy as np
import pytest
import scipy.stats

from jaxnoise import stats

RNG = np.random.default_rng(0)
A = RNG.normal(0.70, 0.02, 32)
B = RNG.normal(0.68, 0.03, 24)


def test_welch_matches_scipy():
    got = stats.welch(A, B)
    res = scipy.stats.ttest_ind(A, B, equal_var=False)
    ci = res.confidence_interval(0.95)
    assert got.mean == pytest.approx(A.mean() - B.mean())
    np.testing.assert_allclose(got.ci95, (ci.low, ci.high), rtol=1e-10)
    assert got.dof == pytest.approx(res.df)


def test_paired_matches_scipy_and_is_narrower_for_shared_draws():
    common = RNG.normal(0, 0.05, 32)   # the chip's draw moves both arms alike
    a, b = 0.7 + common + RNG.normal(0, 0.005, 32), 0.69 + common + RNG.normal(0, 0.005, 32)
    got = stats.paired(a, b)
    ci = scipy.stats.ttest_rel(a, b).confidence_interval(0.95)
    np.testing.assert_allclose(got.ci95, (ci.low, ci.high), rtol=1e-10)
    w = stats.welch(a, b)
    assert got.ci95[1] - got.ci95[0] < 0.3 * (w.ci95[1] - w.ci95[0])
    with pytest.raises(ValueError, match="same number"):
        stats.paired(a, b[:-1])


def test_over_seeds_and_degenerate_cases():
    got = stats.over_seeds([0.021, 0.015, 0.026])
    ci = scipy.stats.ttest_1samp([0.021, 0.015, 0.026], 0).confidence_interval(0.95)
    np.testing.assert_allclose(got.ci95, (ci.low, ci.high), rtol=1e-10)
    assert got.n == 3 and got.dof == 2
    assert stats.over_seeds([0.5]).ci95 is None and stats.welch([0.5], [0.4, 0.3]).ci95 is None
    assert stats.welch([0.5, 0.5], [0.4, 0.4]).ci95 == (pytest.approx(0.1), pytest.approx(0.1))
    with pytest.raises(ValueError, match="finite"):
        stats.over_seeds([float("nan")])
    assert stats.over_seeds([1.0, 2.0]).to_dict()["n"] == 2


def test_coverage_of_the_seed_interval():
    """The 95% interval over 3 seeds covers the true mean ~95% of the time (a statistical check, 2000 trials)."""
    rng = np.random.default_rng(1)
    hits = sum(lo <= 0.02 <= hi for lo, hi in (stats.over_seeds(rng.normal(0.02, 0.01, 3)).ci95
                                               for _ in range(2000)))
    assert abs(hits / 2000 - 0.95) < 4 * np.sqrt(0.95 * 0.05 / 2000)
