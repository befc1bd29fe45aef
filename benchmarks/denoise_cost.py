#!/usr/bin/env python3
"""What denoising blocks cost to train and to evaluate on ResNet-20, -32 and -56: the stage plan of issue 17,
part 3, from measured step and evaluation times.

For each network: the blocks of the ablation's winner placement (after every residual block, bottleneck C/10,
``placement.every_block_placement``) on a frozen backbone (random weights: the cost does not depend on them),
additive activation noise at eta 0.3 at every MVM output, cross-entropy, batch ``--batch-size``:

* the training step (``jaxnoise.train.make_train_step``, median of ``--repeats`` rounds of ``--steps`` steps after
  a compiling warm-up);
* the Monte Carlo evaluation under activation noise (``jaxnoise.robustness.evaluate``, ``--eval-chips`` chips on
  ``--eval-images`` images, the second of two identical calls: compilation excluded), as seconds per image-chip.

From those, the planning figures of the CIFAR-10 protocols (``denoise_ablation`` / ``denoise_placement`` with the
plateau recipe): an epoch (49,000 training images), a curve point (8 chips on the 1,000 held-out images), a chunk
(epoch + curve point), a 10-epoch arm, and an arm's test evaluation (32 chips at the target, 8 at each of two side
levels, on 10,000 images; the noise-free pass is negligible). Data: random uint8 images.

Usage (from the repository root; nothing else running):
  python benchmarks/denoise_cost.py                         # the figures in benchmarks/denoise_cost_cpu_*.txt
  python benchmarks/denoise_cost.py --quick                 # smoke test (resnet20, batch 16, tiny evaluation)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxnoise import data as data_lib
from jaxnoise import denoise, noise, placement, robustness, train
from jaxnoise.models import get_model
from jaxnoise.report import device_description

TRAIN_IMAGES = 49_000          # CIFAR-10 training split minus the 1,000 held-out images
CURVE_IMAGE_CHIPS = 8 * 1_000  # a curve point: 8 chips on the held-out images
TEST_IMAGE_CHIPS = (32 + 2 * 8) * 10_000   # 32 chips at the target, 8 at each side level, full test split


class CifarShapes:
    """A dataset stand-in for the step: the CIFAR augmentation (pad-4 crop, flip) and uint8 -> [0, 1] floats."""

    augment = staticmethod(data_lib.random_crop_flip)

    @staticmethod
    def preprocess(images):
        return images.astype(jnp.float32) / 255.0


def measure(name: str, args) -> dict:
    backbone = get_model(name)
    bvars = backbone.init(jax.random.key(0))
    dm = denoise.denoised(backbone, config=denoise.DenoiserConfig(reduction=10))
    gates = placement.every_block_placement(dm)
    variables = denoise.init_variables(dm, bvars, jax.random.key(1), placement=gates)
    calib = np.random.default_rng(3).random((64, 32, 32, 3), np.float32)
    act_ref = noise.calibrate_activations(backbone.apply, bvars, calib)
    loss_fn = denoise.denoiser_loss(dm, act_eta_train=0.3, act_ref=act_ref)
    dataset = CifarShapes()
    optimizer = train.make_optimizer(train.TrainConfig(epochs=1, batch_size=args.batch_size, weight_decay=0.0), 1000,
                                     trainable=denoise.is_denoiser_param)
    step = train.make_train_step(dm, loss_fn, optimizer, dataset, denoise.is_denoiser_param)
    hparams = {k: jnp.float32(v) for k, v in loss_fn.hparams.items()}
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (args.batch_size,)), jnp.int32)
    state = train.init_state(dm, variables, optimizer)
    base = jax.random.key(2)

    def rounds(state):
        for _ in range(args.steps):
            state, out = step(state, images, labels, base, hparams)
        jax.block_until_ready((state, out))
        return state

    state = rounds(state)   # compile + warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state = rounds(state)
        times.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(times)

    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=act_ref, act_eta=0.3)
    x = rng.integers(0, 256, (args.eval_images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, (args.eval_images,)).astype(np.int32)
    kw = dict(key=jax.random.key(4), n_chips=args.eval_chips, batch_size=min(500, args.eval_images),
              preprocess=dataset.preprocess)
    t0 = time.perf_counter()
    robustness.evaluate(dm, variables, x, y, spec, **kw)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    robustness.evaluate(dm, variables, x, y, spec, **kw)
    eval_s = time.perf_counter() - t0
    per_image_chip = eval_s / (args.eval_images * args.eval_chips)
    epoch_s = step_s * (-(-TRAIN_IMAGES // args.batch_size))
    curve_s = per_image_chip * CURVE_IMAGE_CHIPS
    return {"name": name, "sites": int(np.sum(gates)), "overhead": denoise.overhead(dm, gates)["param_overhead"],
            "step_s": step_s, "rounds": times, "eval_per_image_chip_s": per_image_chip, "eval_compile_s":
            first_s - eval_s, "epoch_s": epoch_s, "curve_s": curve_s, "arm_10_epochs_h": 10 * (epoch_s + curve_s) / 3600,
            "test_eval_h": per_image_chip * TEST_IMAGE_CHIPS / 3600}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet32,resnet56")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--eval-chips", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="resnet20, batch 16, 1 step, 1 repeat, 100 images x 1 chip")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.steps, args.repeats = "resnet20", 16, 1, 1
        args.eval_images, args.eval_chips = 100, 1
    print(f"device: {device_description()}; jax {jax.__version__}")
    print(f"denoiser blocks after every residual block (C/10), act eta 0.3, CE; train batch {args.batch_size} "
          f"(median of {args.repeats} rounds of {args.steps} steps); evaluation {args.eval_chips} chips x "
          f"{args.eval_images} images (second call)")
    print("| network | blocks | params | step (ms) | epoch (min) | eval (ms per 1000 image-chips) | curve point (min) "
          "| 10-epoch arm with its curve (h) | arm's test evaluation (h) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        r = measure(name, args)
        print(f"| {name} | {r['sites']} | {100 * r['overhead']:.2f}% | {1000 * r['step_s']:.0f} | "
              f"{r['epoch_s'] / 60:.1f} | {1e6 * r['eval_per_image_chip_s']:.0f} | {r['curve_s'] / 60:.1f} | "
              f"{r['arm_10_epochs_h']:.2f} | {r['test_eval_h']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
