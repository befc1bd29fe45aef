#!/usr/bin/env python3
"""How large sigma = eta * max|W_q| is against each layer's quantized weights, for a saved quantized arm.

Usage (from the repository root):
  python experiments/quant_noise_ratio.py experiments/results/consistency_resnet32_q4/weights/qat.npz --eta 0.2
  python experiments/quant_noise_ratio.py experiments/results/consistency_resnet32_q4/weights/qat.npz \
      --weight-step percentile     # the same weights with the step held at P80(|W|) / Q_p instead of learned
"""

import argparse
import dataclasses

import numpy as np

from jaxnoise import checkpoint, quant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a .npz written by an experiment stage (records its model and quantization)")
    p.add_argument("--eta", type=float, default=0.2)
    p.add_argument("--weight-step", choices=quant.WEIGHT_STEP_RULES, default=None,
                   help="read the weights with this step rule instead of the saved one (e.g. percentile)")
    args = p.parse_args()
    meta = checkpoint.read_npz_metadata(args.weights)
    if not meta or "quant" not in (meta.get("model_config") or {}):
        raise SystemExit(f"{args.weights}: not a saved quantized arm (no quantization in its metadata).")
    spec = quant.QuantSpec.from_config(meta["model_config"]["quant"])
    if args.weight_step:
        spec = dataclasses.replace(spec, weight_step=args.weight_step)
    rows = quant.noise_ratios(checkpoint.load_variables(args.weights)["params"], spec, args.eta)
    print(f"| layer | sigma / rms(W_q) at eta {args.eta} | max|W_q| / rms(W_q) | clip / P{spec.percentile:g}(|w|) "
          f"| clipped |")
    print("|---|---:|---:|---:|---:|")
    for path, r in rows.items():
        print(f"| {path} | {r['sigma_over_rms']:.2f} | {r['max_over_rms']:.2f} | {r['clip_over_percentile']:.2f} | "
              f"{100 * r['clipped_fraction']:.1f}% |")
    for key in ("sigma_over_rms", "clip_over_percentile", "clipped_fraction"):
        print(f"median {key}: {np.median([r[key] for r in rows.values()]):.3f}")


if __name__ == "__main__":
    main()
