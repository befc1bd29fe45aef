"""Intervals for comparing Monte Carlo results: differences of two arms over chips, and over training seeds.

Pure numpy/scipy; every interval is a two-sided Student-t 95% interval (``level`` to change it), None when it is
undefined (fewer than two values on a side).

* :func:`welch` — independent chips: difference of means with Welch-Satterthwaite degrees of freedom.
* :func:`paired` — chip ``i`` of both arms has the same key (the same standard-normal draws): the t interval of the
  mean per-chip difference, usually much narrower than Welch's.
* :func:`over_seeds` — one value per training seed (e.g. the per-seed mean difference consistency - forward-noise):
  the t interval of their mean, which covers run-to-run variation that chip intervals do not.

Examples:
  >>> d = paired(cons.per_chip, fwd.per_chip)          # same chip keys in both arms
  >>> d.mean, d.ci95
  >>> over_seeds([0.021, 0.015, 0.026]).ci95            # the method difference over 3 seeds
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Interval(NamedTuple):
    """A mean (or difference of means) with its confidence interval."""

    mean: float
    ci95: tuple[float, float] | None
    n: int
    dof: float | None

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": None if self.ci95 is None else list(self.ci95), "n": self.n,
                "dof": self.dof}


def _t(dof: float, level: float) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.5 + level / 2, dof))


def _values(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: needs at least one finite value, got {x!r}.")
    return a


def over_seeds(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``values`` (one per seed or per chip) with its t interval (n - 1 degrees of freedom)."""
    a = _values(values, "values")
    m = float(a.mean())
    if a.size < 2:
        return Interval(m, None, int(a.size), None)
    half = _t(a.size - 1, level) * float(a.std(ddof=1)) / math.sqrt(a.size)
    return Interval(m, (m - half, m + half), int(a.size), float(a.size - 1))


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """``mean(a - b)`` over pairs (chip ``i`` of both arms drawn from the same key) with its t interval."""
    x, y = _values(a, "a"), _values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired: a and b need the same number of values (the same chips), got {x.size} and "
                         f"{y.size}; use welch() for independent chips.")
    return over_seeds(x - y, level)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """``mean(a) - mean(b)`` of independent samples with Welch's t interval."""
    x, y = _values(a, "a"), _values(b, "b")
    d = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return Interval(d, None, int(x.size + y.size), None)
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(d, (d, d), int(x.size + y.size), None)
    dof = (va + vb) ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1))
    half = _t(dof, level) * se
    return Interval(d, (d - half, d + half), int(x.size + y.size), float(dof))
