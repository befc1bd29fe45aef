#!/usr/bin/env python3
"""Denoiser training step on a frozen ResNet-20: frozen leaves stopped inside the differentiated function (the
current ``jaxnoise.train.make_train_step``) vs differentiated and then discarded (its formulation before
2026-12-04), measured in one run.

Both steps train the same blocks (every residual block output plus stem and pre-logits, reduction 10, the
ablation's ``ce`` variant) under additive activation noise at eta 0.3 with cross-entropy, batch ``--batch-size``;
they give the same blocks (checked: max |difference| of the trained leaves after the timed steps). The old step
computed the kernel gradients of every frozen convolution and fed them to the momentum, so XLA could not drop them.

Each timing is the median of ``--repeats`` rounds of ``--steps`` steps after a warm-up (compilation excluded);
the rounds of the two steps are interleaved. Data: random uint8 images.

Usage (from the repository root; nothing else running):
  python benchmarks/denoise_train_step.py                  # the figures in benchmarks/denoise_train_step_cpu_*.txt
  python benchmarks/denoise_train_step.py --quick          # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnoise import data as data_lib
from jaxnoise import denoise, noise, train
from jaxnoise.models import get_model
from jaxnoise.report import device_description


class CifarShapes:
    """A dataset stand-in for the step: the CIFAR augmentation (pad-4 crop, flip) and uint8 -> [0, 1] floats."""

    augment = staticmethod(data_lib.random_crop_flip)

    @staticmethod
    def preprocess(images):
        return images.astype(jnp.float32) / 255.0


def old_step(model, loss_fn, optimizer, dataset, trainable):
    """``make_train_step`` as it was: ``stop_gradient`` applied to the frozen leaves before ``value_and_grad``
    (a no-op for the gradient), the frozen leaves' updates discarded after the optimizer."""
    def step(state, images, labels, base_key, hparams):
        augment_key, loss_key = train.step_keys(base_key, state.step)
        x = dataset.preprocess(dataset.augment(augment_key, images))
        mask = train.trainable_mask(state.params, trainable)
        params_in = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), state.params, mask)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params_in, state.batch_stats, x, labels,
                                                                     loss_key, hparams)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = jax.tree.map(lambda new, old, t: new if t else old, params, state.params, mask)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss
    return jax.jit(step)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="batch 16, 1 step, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.repeats = 16, 1, 2

    backbone = get_model("resnet20")
    dm = denoise.denoised(backbone, config=denoise.DenoiserConfig(reduction=10))
    variables = denoise.init_variables(dm, backbone.init(jax.random.key(0)), jax.random.key(1))   # random backbone
    bvars = backbone.init(jax.random.key(0))
    calib = np.random.default_rng(3).random((64, 32, 32, 3), np.float32)
    act_ref = noise.calibrate_activations(backbone.apply, bvars, calib)
    loss_fn = denoise.denoiser_loss(dm, act_eta_train=0.3, act_ref=act_ref)
    dataset = CifarShapes()
    optimizer = train.make_optimizer(train.TrainConfig(epochs=1, batch_size=args.batch_size, weight_decay=0.0), 1000,
                                     trainable=denoise.is_denoiser_param)
    hparams = {k: jnp.float32(v) for k, v in loss_fn.hparams.items()}
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (args.batch_size,)), jnp.int32)
    base = jax.random.key(2)
    steps = {"frozen inside grad (now)": train.make_train_step(dm, loss_fn, optimizer, dataset,
                                                               denoise.is_denoiser_param),
             "frozen after grad (before)": old_step(dm, loss_fn, optimizer, dataset, denoise.is_denoiser_param)}
    states = {name: train.init_state(dm, variables, optimizer) for name in steps}

    def run(name):
        s = states[name]
        for _ in range(args.steps):
            s, out = steps[name](s, images, labels, base, hparams)
        jax.block_until_ready((s, out))
        states[name] = s

    for name in steps:
        run(name)   # compile + warm-up
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name in steps:
            t0 = time.perf_counter()
            run(name)
            times[name].append((time.perf_counter() - t0) / args.steps)
    now, before = (statistics.median(times[n]) for n in steps)
    a, b = (jax.tree.leaves(denoise.split_params(states[n].params)[1]) for n in steps)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))
    print(f"device: {device_description()}; jax {jax.__version__}")
    print(f"ResNet-20 denoiser step (blocks at {len(dm.candidate_sites)} sites, reduction 10, act eta 0.3, CE), "
          f"batch {args.batch_size}; median of {args.repeats} rounds of {args.steps} steps")
    for n in steps:
        print(f"  {n:28s} {1000 * statistics.median(times[n]):8.1f} ms/step  (rounds: "
              f"{', '.join(f'{1000 * t:.0f}' for t in times[n])})")
    print(f"  speed-up before/now: {before / now:.2f}x; max |blocks now - blocks before| after "
          f"{args.steps * (args.repeats + 1)} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
