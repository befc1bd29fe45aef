"""Re-computes committed per-chip results through today's evaluator and checks that they are identical.

For the evaluation files of the ``consistency_quantized`` protocol (``experiments/configs/consistency_resnet32_q4*``):
the arm's committed weights are loaded into the config's model, and the noise-free entry and the first ``--chips``
chips of the entry at the config's target scale are evaluated with ``robustness.MonteCarlo`` (chip ``i`` has key
``fold_in(key, i)`` whatever the number of chips, so the first chips of a 32-chip result are a 4-chip run). Exits
non-zero unless every value equals the committed one exactly.

  TFDS_DATA_DIR=../shared/tfds python tools/recompute_committed.py experiments/configs/consistency_resnet32_q4p80.py \
      experiments/results/consistency_resnet32_q4p80/eval/forward_noise_s0.json --chips 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from jaxnoise import checkpoint, experiment, robustness
from jaxnoise.protocols import common
from jaxnoise.protocols import consistency_quantized as protocol


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the experiment config (a get_config() file)")
    p.add_argument("eval_file", help="a committed eval/<arm>_s<seed>.json (or eval_qat.json) of that experiment")
    p.add_argument("--chips", type=int, default=4, help="chips of the noisy entry to re-compute (its first ones)")
    args = p.parse_args(argv)
    config = experiment.load_config(args.config)
    committed = json.load(open(args.eval_file))
    arm = committed["arms"][0]
    results_dir = experiment.results_dir_of(config)   # weights/<arm>.npz beside eval/ and eval_qat.json
    weights = os.path.join(results_dir, "weights", f"{arm['name']}.npz")
    ds = protocol.dataset(config)
    model = protocol.model_of(config, ds)
    variables = checkpoint.load_variables(weights, model)
    x, y = common.eval_data(ds.test)
    mc = robustness.MonteCarlo(model, x, y, batch_size=int(config.eval.batch_size), preprocess=ds.preprocess)
    clean = mc.clean(variables)
    noisy = mc.evaluate(variables, protocol.noise_spec(config, config.noise.eta),
                        key=jax.random.key(int(config.eval.key)), n_chips=args.chips)
    want_clean = arm["eval"][0]["per_chip"]
    want_noisy = arm["eval"][1]["per_chip"][:args.chips]
    ok = clean.per_chip.tolist() == want_clean and noisy.per_chip.tolist() == want_noisy
    print(f"{args.eval_file}: noise-free {clean.per_chip.tolist()} vs committed {want_clean}; "
          f"first {args.chips} chips at {config.noise.eta}: {np.round(noisy.per_chip, 4).tolist()} vs "
          f"{np.round(want_noisy, 4).tolist()}: {'identical' if ok else 'DIFFERENT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
