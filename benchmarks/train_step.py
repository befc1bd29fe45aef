#!/usr/bin/env python3
"""Cost of noise-aware training steps relative to a clean step, measured in one run (ResNet-20, CIFAR-10 shapes).

Prints, for the jitted :func:`jaxnoise.train.make_train_step` on a batch of ``--batch-size`` images:

* forward-noise step / clean step at K = 1 (goal <= 1.2),
* consistency step / clean step at K = 1 (goal <= 2.2; default sites: every block output),
* how the step time grows with K (forward-noise and consistency) with the draws run one after another
  (``draw_batch_size=1``, the CPU default) and, for K in ``--vmap-ks``, all in one ``vmap`` (``draw_batch_size=K``).

Each timing is the median of ``--repeats`` rounds of ``--steps`` steps after a warm-up (compilation excluded);
rounds of the different configurations are interleaved so that machine-load drift hits all of them alike.
Data: random uint8 images (the step time does not depend on the pixel values), so it runs without CIFAR-10.

Usage (from the repository root):
  python benchmarks/train_step.py --steps 3 --repeats 3    # K in {1, 2, 4}; the figures in docs/benchmarks.md
  python benchmarks/train_step.py --quick         # smoke test: small batch, K in {1, 2}
  python benchmarks/train_step.py --scan-check    # K=2 gradient: draws in lax.map vs unrolled
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxnoise import data as data_lib
from jaxnoise import methods, noise, train
from jaxnoise.models import get_model
from jaxnoise.report import device_description


def make_runner(model, loss_fn, batch_size: int, dataset, steps: int):
    config = train.TrainConfig(epochs=1, batch_size=batch_size)
    optimizer = train.make_optimizer(config, 1000)
    step = train.make_train_step(model, loss_fn, optimizer, dataset)
    state = train.init_state(model, model.init(jax.random.key(0)), optimizer)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch_size,) + tuple(model.input_shape), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, model.num_classes, (batch_size,)), jnp.int32)
    hparams = methods.check_hparams(loss_fn.hparams, tuple(loss_fn.hparams))
    base = jax.random.key(1)
    box = {"state": state}

    def run():
        s = box["state"]
        for _ in range(steps):
            s, metrics = step(s, images, labels, base, hparams)
        jax.block_until_ready((s, metrics))
        box["state"] = s

    run()  # compile + warm-up
    return run


def scan_vs_unrolled(model, batch_size: int, repeats: int) -> tuple[float, float]:
    """Seconds per gradient of a K=2 forward-noise loss with the draws in a ``lax.map`` (scan) and unrolled the way
    ``jaxnoise.methods`` runs them (``draw_batch_size=1``): the reason methods does not use ``lax.map``."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch_size,) + tuple(model.input_shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, model.num_classes, (batch_size,)), jnp.int32)
    variables = model.init(jax.random.key(0))
    spec = noise.NoiseSpec(weight_eta=0.1)

    def make(draws):
        def loss(params, key):
            def per_draw(draw_key):
                logits = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                        key=draw_key, noise=spec, train=True).logits
                return methods.cross_entropy(logits, y)
            return jnp.mean(draws(per_draw, key))
        return jax.jit(jax.grad(loss))

    scan = make(lambda f, k: jax.lax.map(f, jnp.stack([jax.random.fold_in(k, i) for i in range(2)])))
    unrolled = make(lambda f, k: methods._draws(f, k, 2, 1))
    out = []
    for fn in (scan, unrolled):
        jax.block_until_ready(fn(variables["params"], jax.random.key(1)))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(variables["params"], jax.random.key(1)))
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    return out[0], out[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration (median reported)")
    p.add_argument("--ks", default="1,2,4", help="numbers of noise draws per step")
    p.add_argument("--vmap-ks", default="2", help="K values also measured with all K draws in one vmap "
                                                  "(slow to compile and run on CPU)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scan-check", action="store_true",
                   help="only time a K=2 gradient with the draws in lax.map vs unrolled (batch 32)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.repeats, args.ks = 32, 2, 3, "1,2"
    ks = [int(k) for k in args.ks.split(",")]

    model = get_model(args.model)
    if args.scan_check:
        t_scan, t_unrolled = scan_vs_unrolled(model, 32, args.repeats)
        print(f"device: {device_description()}; {model.name}, batch 32, K=2 forward-noise gradient: lax.map "
              f"{1000 * t_scan:.0f} ms, unrolled {1000 * t_unrolled:.0f} ms, ratio {t_scan / t_unrolled:.1f}x")
        return 0
    dataset = _shapes_only(model)
    print(f"device: {device_description()}; jax {jax.__version__}; model {model.name}; batch {args.batch_size}; "
          f"{args.steps} steps x median of {args.repeats} rounds")

    configs = {"clean": methods.clean(model)}
    vmap_ks = [int(k) for k in args.vmap_ks.split(",") if k]
    for k in ks:
        for dbs in sorted({1} | ({k} if k in vmap_ks else set())):
            tag = f"K={k} dbs={dbs}"
            configs[f"forward_noise {tag}"] = methods.forward_noise(model, eta_train=0.1, n_draws=k,
                                                                    draw_batch_size=dbs)
            configs[f"consistency {tag}"] = methods.consistency(model, eta_train=0.1, lam=1.0, n_draws=k,
                                                                draw_batch_size=dbs)
    runners = {}
    for name, loss_fn in configs.items():
        t0 = time.perf_counter()
        runners[name] = make_runner(model, loss_fn, args.batch_size, dataset, args.steps)
        print(f"  compiled {name} in {time.perf_counter() - t0:.1f} s", flush=True)

    times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) / args.steps)
    per_step = {name: statistics.median(t) for name, t in times.items()}
    clean = per_step["clean"]
    print(f"\n{'configuration':32s} {'ms/step':>9s} {'/ clean':>8s}")
    for name, t in per_step.items():
        print(f"{name:32s} {1000 * t:9.1f} {t / clean:8.2f}")
    fn1 = per_step.get("forward_noise K=1 dbs=1")
    cr1 = per_step.get("consistency K=1 dbs=1")
    print()
    if fn1:
        print(f"forward-noise / clean at K=1: {fn1 / clean:.2f}  (goal <= 1.2: {'met' if fn1 / clean <= 1.2 else 'NOT met'})")
    if cr1:
        print(f"consistency / clean at K=1:   {cr1 / clean:.2f}  (goal <= 2.2: {'met' if cr1 / clean <= 2.2 else 'NOT met'})")
    for method in ("forward_noise", "consistency"):
        base = per_step.get(f"{method} K=1 dbs=1")
        growth = [(name, t / base) for name, t in per_step.items() if name.startswith(method) and base]
        print(f"{method}: step time relative to K=1: " + ", ".join(f"{n.split(' ', 1)[1]}: {r:.2f}"
                                                                    for n, r in growth))
    return 0


class _shapes_only:
    """A dataset stand-in for the step: the CIFAR augmentation (pad-4 crop, flip) and uint8 -> [0, 1] floats."""

    def __init__(self, model):
        self.name = "random"
        self.image_shape = tuple(model.input_shape)

    @staticmethod
    def augment(key, images):
        return data_lib.random_crop_flip(key, images)

    @staticmethod
    def preprocess(images):
        return images.astype(jnp.float32) / 255.0


if __name__ == "__main__":
    sys.exit(main())
