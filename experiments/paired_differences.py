#!/usr/bin/env python3
"""Paired per-chip differences of every arm of a result file from one reference arm (same chips, same keys).

Usage (from the repository root):
  python experiments/paired_differences.py experiments/results/consistency_resnet32_q4/search.json forward_noise
  python experiments/paired_differences.py experiments/results/consistency_resnet32_q4/eval/consistency_s0.json \
      forward_noise_s0 --reference-file experiments/results/consistency_resnet32_q4/eval/forward_noise_s0.json --entry 1
"""

import argparse
import json

from jaxnoise import stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result_file")
    p.add_argument("reference", help="the arm the others are compared with")
    p.add_argument("--reference-file", default=None, help="the result file holding the reference (default: the same)")
    p.add_argument("--entry", type=int, default=0, help="which eval entry of each arm (default the first)")
    args = p.parse_args()
    arms = {a["name"]: a["eval"][args.entry] for a in json.load(open(args.result_file))["arms"]}
    ref_file = args.reference_file or args.result_file
    refs = {a["name"]: a["eval"][args.entry] for a in json.load(open(ref_file))["arms"]}
    if args.reference not in refs:
        raise SystemExit(f"no arm {args.reference!r} in {ref_file}; arms: {sorted(refs)}")
    ref = refs[args.reference]["per_chip"]
    for name, e in arms.items():
        if name != args.reference:
            d = stats.paired(e["per_chip"], ref)
            print(f"{name:45s} {100 * d.mean:+.2f} points [{100 * d.ci95[0]:+.2f}, {100 * d.ci95[1]:+.2f}] "
                  f"over {len(ref)} chips")


if __name__ == "__main__":
    main()
