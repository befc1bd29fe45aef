#!/usr/bin/env python3
"""Coverage of the adaptive Monte Carlo confidence interval on a problem with a known answer.

``jaxnoise.testing.threshold_problem`` gives a model whose per-chip accuracy is distributed as sqrt(U) (skewed)
with a known mean. For several (first-round size, target half-width) settings, this runs ``--reps`` independent
adaptive evaluations (``robustness.evaluate(..., target_ci_halfwidth=...)``) and prints how often the reported 95%
CI covers the true mean, with the binomial 95% margin of that estimate, and the mean number of chips used.

Usage (from the repository root; ~1 minute on 2 CPU cores):
  python experiments/adaptive_coverage.py --reps 400
"""

import argparse

import numpy as np

from jaxnoise import robustness
from jaxnoise.noise import NoiseSpec
from jaxnoise.testing import threshold_problem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=400)
    args = p.parse_args()
    model, variables, images, labels, true_mean = threshold_problem(100)
    spec = NoiseSpec(weight_kind="multiplicative", weight_eta=1.0)
    print(f"true mean accuracy {true_mean:.4f}; {args.reps} independent adaptive runs per row")
    print("| first round (chips) | target half-width | coverage of the 95% CI | mean chips used |")
    print("|---:|---:|---:|---:|")
    for round_chips, target in ((4, 0.05), (10, 0.05), (16, 0.03)):
        covered, chips = [], []
        for rep in range(args.reps):
            r = robustness.evaluate(model, variables, images, labels, spec, key=1000 + rep, n_chips=round_chips,
                                    target_ci_halfwidth=target, max_chips=4000)
            covered.append(r.ci95[0] <= true_mean <= r.ci95[1])
            chips.append(r.n_chips)
        c = float(np.mean(covered))
        margin = 1.96 * np.sqrt(c * (1 - c) / args.reps)
        print(f"| {round_chips} | {target} | {c:.3f} +/- {margin:.3f} | {np.mean(chips):.1f} |")


if __name__ == "__main__":
    main()
