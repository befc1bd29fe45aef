#!/usr/bin/env python3
"""Placement-search throughput: vmapped vs one-after-another evaluation and training of candidate placements.

  python benchmarks/placement.py                   # ResNet-20 (random weights), additive activation noise

Prints, measured in one run (after a warm-up call of each program, so compile time is excluded):

1. evaluating every single-site placement (one block each, all blocks non-zero) on the same chips:
   (a) one ``robustness.evaluate`` call per placement, (b) one program mapping the placements one after another
   (``variant_batch_size=1``), (c) one program vmapping all placements; ratios (a)/(c) and (b)/(c) (goal: the
   vmapped evaluation >= 2x faster than one after another);
2. training V candidate placements for a few steps: one vmapped ``train_candidates`` call vs V calls of one
   candidate each; ratio of the times.

Vmapped placements share the backbone's weights (unbatched) and the noise draws (same chip keys), so the random
numbers are drawn once for all placements; that is where most of the gain comes from on CPU, where drawing the
activation noise costs more than the convolutions.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxnoise import data, denoise, noise, placement, robustness
from jaxnoise.models import get_model


def _time(fn, repeats):
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--n-images", type=int, default=500)
    p.add_argument("--n-chips", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--candidates", type=int, default=4, help="V, placements trained at once")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--train-batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    model = get_model(args.model)
    dataset = data.load_dataset("synthetic", image_shape=model.input_shape, num_classes=model.num_classes,
                                n_train=2048, n_test=args.n_images)
    variables = model.init(jax.random.key(0))
    dmodel = denoise.denoised(model)
    dvars = denoise.init_variables(dmodel, variables, jax.random.key(1))
    flat = traverse_util.flatten_dict(dvars["params"], sep="/")
    for i, path in enumerate(sorted(flat)):  # non-zero blocks, as after training
        if denoise.is_denoiser_param(path):
            flat[path] = 0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(2), i), flat[path].shape)
    dvars = {**dvars, "params": traverse_util.unflatten_dict(flat, sep="/")}
    x = dataset.preprocess(jnp.asarray(dataset.train.images[:256]))
    ref = noise.calibrate_activations(model.apply, variables, x)
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=ref, act_eta=0.3)
    images, labels = dataset.test.images, dataset.test.labels
    singles = np.eye(len(dmodel.candidate_sites), dtype=np.float32)
    kw = dict(key=0, n_chips=args.n_chips, batch_size=args.batch_size, preprocess=dataset.preprocess)
    print(f"{jax.default_backend()} backend, {args.model}, {len(singles)} single-site placements, "
          f"{args.n_images} images x {args.n_chips} chips each, additive activation noise at every MVM")

    def sequential():
        return [robustness.evaluate(dmodel, denoise.with_placement(dmodel, dvars, g), images, labels, spec, **kw)
                .per_chip for g in singles]

    def mapped():
        return placement.evaluate_placements(dmodel, dvars, singles, images, labels, spec, variant_batch_size=1,
                                             **kw)

    def vmapped():
        return placement.evaluate_placements(dmodel, dvars, singles, images, labels, spec, **kw)

    t_seq = _time(sequential, args.repeats)
    t_map = _time(mapped, args.repeats)
    t_vmap = _time(vmapped, args.repeats)
    same = np.max(np.abs(np.stack(sequential()) - vmapped()))
    print(f"evaluate single-site placements: one call each {t_seq:.2f} s, lax.map in one program {t_map:.2f} s, "
          f"vmapped {t_vmap:.2f} s")
    print(f"  ratio one-call-each / vmapped = {t_seq / t_vmap:.2f}x, lax.map / vmapped = {t_map / t_vmap:.2f}x "
          f"(goal >= 2x); max |difference| of per-chip accuracies {same:.4f}")

    v = args.candidates
    cands = singles[:v]
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=0.3, act_ref=ref)
    tkw = dict(steps=args.train_steps, key=1, batch_size=args.train_batch_size, learning_rate=0.01)
    t_together = _time(lambda: jax.block_until_ready(
        placement.train_candidates(dmodel, dvars, cands, dataset, loss_fn, **tkw)[0]), args.repeats)
    t_apart = _time(lambda: [jax.block_until_ready(
        placement.train_candidates(dmodel, dvars, cands[k:k + 1], dataset, loss_fn, **tkw)[0]) for k in range(v)],
        args.repeats)
    print(f"train {v} candidates x {args.train_steps} steps (batch {args.train_batch_size}): "
          f"vmapped {t_together:.2f} s, "
          f"one after another {t_apart:.2f} s; ratio sequential / vmapped = {t_apart / t_together:.2f}x")


if __name__ == "__main__":
    main()
