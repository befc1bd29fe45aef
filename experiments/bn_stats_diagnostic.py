#!/usr/bin/env python3
"""Noisy chips under BatchNorm's running statistics vs each chip's own batch statistics.

Loads a quantized arm (a saved ``.npz`` or a training workdir of one, with ``--model-of`` naming a saved arm for
the model and its quantization) and prints, for a few chips at sigma = eta max|W_q| (normal clipped at 3), the
accuracy on held-out training images (45000-45999) with BatchNorm in inference mode (running statistics, what
the Monte Carlo evaluator uses) and in training mode (the statistics of each batch of 500 on that chip).

Usage (from the repository root):
  python experiments/bn_stats_diagnostic.py runs/consistency_resnet32_q4/search-9ecdc75c/forward_noise \\
      --model-of experiments/results/consistency_resnet32_q4/weights/qat.npz --eta 0.2
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxnoise import checkpoint, data, noise
from jaxnoise.models import get_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights")
    p.add_argument("--model-of", default=None, help="a saved arm whose metadata gives the model (default: weights)")
    p.add_argument("--eta", type=float, default=0.2)
    p.add_argument("--chips", type=int, default=2)
    args = p.parse_args()
    meta = checkpoint.read_npz_metadata(args.model_of or args.weights)
    model = get_model(meta["model"], quant=(meta.get("model_config") or {}).get("quant"))
    v = checkpoint.load_variables(args.weights, model)
    ds = data.load_dataset("cifar10")
    x = ds.preprocess(jnp.asarray(ds.train.images[45000:46000]))
    y = ds.train.labels[45000:46000]
    spec = noise.NoiseSpec(weight_eta=args.eta, weight_truncate=3.0)
    run = {mode: jax.jit(lambda v, xb, k, mode=mode: model.apply(v, xb, key=k, noise=spec, train=mode)[0])
           for mode in (False, True)}
    clean = np.mean(np.argmax(jax.jit(lambda v, xb: model.apply(v, xb)[0])(v, x), -1) == y)
    print(f"noise-free: {100 * clean:.1f}% on held-out training images 45000-45999")
    for chip in range(args.chips):
        k = jax.random.key(100 + chip)
        accs = {mode: np.mean([np.mean(np.argmax(f(v, x[i:i + 500], k), -1) == y[i:i + 500])
                               for i in range(0, 1000, 500)]) for mode, f in run.items()}
        print(f"chip {chip}: running BN statistics {100 * accs[False]:.1f}%, the chip's batch statistics "
              f"{100 * accs[True]:.1f}%")


if __name__ == "__main__":
    main()
