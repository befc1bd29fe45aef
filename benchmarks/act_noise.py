#!/usr/bin/env python3
"""Throughput of activation-noise Monte Carlo per normal sampler, relative to the clean network, in one run.

Two parts, each timed in interleaved rounds (every option once per round, in a rotated order) so that a shared or
throttled machine slows all options alike; the reported numbers are medians over rounds.

(1) Normal generation alone: ``noise.standard_normal`` (plus one add, as at an MVM output) for every sampler of
    ``noise.SAMPLERS``, on ResNet-20's largest activation shape (batch x 32 x 32 x 16), in normals per second and
    relative to ``threefry/erfinv`` (``jax.random.normal``). Two transforms that are *not* offered are measured
    too, so the choice can be re-checked: ``box_muller16`` (two normals per 32-bit word by Box-Muller on two 16-bit
    uniforms: statistically fine, tails end at 4.85 sigma, but its log/sin/cos are slow on XLA:CPU) and
    ``unsafe_rbg`` bits (JAX's unsafe_rbg differs from rbg only in split/fold_in, which the samplers never call on
    the derived key: it draws the very same words as rbg, checked here).
(2) ResNet-20 on the first N CIFAR-10 test images (random images and initialised weights if CIFAR-10 or the
    pretrained weights are absent): a clean evaluation against activation-noise Monte Carlo (``additive``,
    references calibrated on 1024 training images, eta 0.2, 2 chips; no weight noise) with each sampler. It prints
    each option's image-evaluations per second and its throughput ratio to clean,
    ``(n_chips * N / t_noisy) / (N / t_clean)``, the median over rounds of the ratio within each round.
    Goal: >= 0.6x clean with the CPU default sampler (``noise.default_sampler()``).

Compilation is excluded (one warm-up call per option). ``robustness.evaluate`` is timed as users call it.

Usage (from the repository root):
  python benchmarks/act_noise.py                  # 1000 images, 5 rounds
  python benchmarks/act_noise.py --quick          # smoke test: 200 images, 3 rounds, a smaller micro-benchmark
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnoise import noise, robustness
from jaxnoise.data import calibration_images, load_dataset
from jaxnoise.models import get_model, load_torch_npz
from jaxnoise.report import device_description

ETA = 0.2
GOAL = 0.6


def interleaved(fns: dict[str, Callable[[int], Any]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each ``fns[name](round)`` per round; one warm-up call each; order rotated every round."""
    for fn in fns.values():
        jax.block_until_ready(fn(-1))
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](r))
            times[name].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------------------------
# (1) normal generation alone


def _box_muller16(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Not offered (slow on CPU): two normals per threefry word, Box-Muller on its two 16-bit halves."""
    n = math.prod(shape)
    words = jax.random.bits(key, (-(-n // 2),), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).astype(jnp.float32)
    u1 = (halves[:, 0] + 0.5) * np.float32(2.0 ** -16)
    angle = (halves[:, 1] + 0.5) * np.float32(2 * math.pi * 2.0 ** -16)
    r = jnp.sqrt(-2.0 * jnp.log(u1))
    return jnp.stack([r * jnp.cos(angle), r * jnp.sin(angle)], -1).reshape(-1)[:n].reshape(shape)


def _unsafe_rbg_words(key: jax.Array, n: int) -> jax.Array:
    data = jax.random.bits(key, (4,), jnp.uint32)
    return jax.random.bits(jax.random.wrap_key_data(data, impl="unsafe_rbg"), (n,), jnp.uint32)


def micro(shape: tuple[int, ...], rounds: int) -> None:
    n = math.prod(shape)
    y = jnp.ones(shape, jnp.float32)
    base = jax.random.key(0)
    fns: dict[str, Callable[[int], Any]] = {}
    for name in noise.SAMPLERS:
        f = jax.jit(lambda k, y, s=name: y + 0.2 * noise.standard_normal(k, y.shape, y.dtype, s))
        fns[name] = lambda r, f=f: f(jax.random.fold_in(base, r + 1), y)
    bm = jax.jit(lambda k, y: y + 0.2 * _box_muller16(k, y.shape))
    fns["threefry/box_muller16 (not offered)"] = lambda r: bm(jax.random.fold_in(base, r + 1), y)
    rbg_words = jax.jit(lambda k: noise._words(k, "rbg", n))
    urbg_words = jax.jit(lambda k: _unsafe_rbg_words(k, n))
    same = bool(jnp.array_equal(rbg_words(jax.random.key(3)), urbg_words(jax.random.key(3))))
    times = interleaved(fns, rounds)
    ref = statistics.median(times[noise.LEGACY_SAMPLER])
    print(f"\n(1) normals alone: shape {shape} ({n / 1e6:.2f} M normals + one add), median of {rounds} rounds")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"   {name:<36} {n / m / 1e6:8.1f} M normals/s   {ref / m:5.2f}x threefry/erfinv   "
              f"[{1e3 * m:7.2f} ms]")
    print(f"   unsafe_rbg bits == rbg bits for the same site key: {same} (so unsafe_rbg is not a separate option)")


# ----------------------------------------------------------------------------------------------------------------
# (2) ResNet-20 Monte Carlo


def load(n_images: int, weights: str, data_dir: str | None):
    model = get_model("resnet20")
    try:
        cifar = load_dataset("cifar10", data_dir=data_dir)
        images, labels = cifar.test.images[:n_images], cifar.test.labels[:n_images]
        calib, preprocess, source = calibration_images(cifar.train, 1024), cifar.preprocess, "CIFAR-10 test"
    except Exception as e:  # noqa: BLE001 - any reason: say so and use random images
        print(f"CIFAR-10 not available ({type(e).__name__}: {e}); using random images")
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n_images).astype(np.int32)
        calib = rng.integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8)
        preprocess, source = (lambda x: jnp.asarray(x, jnp.float32) / 255.0 - 0.5), "random images"
    try:
        variables, wsource = load_torch_npz(model, weights), os.path.basename(weights)
    except Exception as e:  # noqa: BLE001
        print(f"pretrained weights not available ({type(e).__name__}: {e}); using initialised weights")
        variables, wsource = model.init(jax.random.key(0)), "initialised weights"
    return model, variables, images, labels, calib, preprocess, f"{source}, {wsource}"


def mc(args) -> float | None:
    model, variables, images, labels, calib, preprocess, source = load(args.n_images, args.weights, args.data_dir)
    variables = jax.device_put(variables)
    ref = noise.calibrate_activations(model.apply, variables, preprocess(calib))
    n, chips, bs = len(labels), args.n_chips, min(args.batch_size, len(labels))
    samplers = args.samplers or list(noise.SAMPLERS)
    kw = dict(batch_size=bs, preprocess=preprocess)
    fns: dict[str, Callable[[int], Any]] = {
        "clean": lambda r: robustness.evaluate(model, variables, images, labels, **kw).per_chip}
    for s in samplers:
        spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_eta=ETA, act_ref=ref, sampler=s)
        fns[s] = (lambda r, spec=spec: robustness.evaluate(model, variables, images, labels, spec, key=0,
                                                           n_chips=chips, **kw).per_chip)
    print(f"\n(2) resnet20, {n} images ({source}), data batch {bs}; activation noise additive eta {ETA}, "
          f"{chips} chips; median of {args.rounds} interleaved rounds")
    times = interleaved(fns, args.rounds)
    clean = times["clean"]
    clean_acc = 100 * float(fns["clean"](0)[0])
    print(f"   {'clean':<22} {n / statistics.median(clean):8.1f} img/s   accuracy {clean_acc:.2f}%")
    default = noise.default_sampler()
    default_ratio = None
    for s in samplers:
        ratios = [(chips * n / t) / (n / c) for t, c in zip(times[s], clean)]
        ratio = statistics.median(ratios)
        acc = float(np.mean(fns[s](0)))
        tag = "  <- default on " + jax.default_backend() if s == default else ""
        print(f"   {s:<22} {chips * n / statistics.median(times[s]):8.1f} image-evals/s   {ratio:5.2f}x clean "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})   mean accuracy {100 * acc:.2f}%{tag}")
        if s == default:
            default_ratio = ratio
    if default_ratio is not None:
        print(f"goal: activation-noise MC with the default sampler ({default}) >= {GOAL}x clean: "
              f"{default_ratio:.2f}x, {'met' if default_ratio >= GOAL else 'NOT met'}")
    return default_ratio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=os.path.join("..", "shared", "pretrained", "resnet20_cifar10.npz"))
    p.add_argument("--data-dir", default=None, help="TFDS data dir holding cifar10 (default: searched)")
    p.add_argument("--n-images", type=int, default=None, help="first N CIFAR-10 test images (default 1000)")
    p.add_argument("--n-chips", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; quick 3)")
    p.add_argument("--samplers", nargs="*", default=None, help="samplers to time (default: all)")
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--skip-mc", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke test: 200 images, 3 rounds, smaller micro shape")
    args = p.parse_args(argv)
    args.n_images = args.n_images or (200 if args.quick else 1000)
    args.rounds = args.rounds or (3 if args.quick else 5)
    if args.batch_size == 500 and args.quick:
        args.batch_size = 100
    for s in args.samplers or ():
        noise.check_sampler(s)
    if min(args.n_images, args.n_chips, args.batch_size, args.rounds) < 1:
        p.error("--n-images, --n-chips, --batch-size and --rounds must be >= 1")
    load = f"; load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device_description()}{load}; default "
          f"activation sampler {noise.default_sampler()}{', QUICK mode' if args.quick else ''}")
    if not args.skip_micro:
        micro((min(args.batch_size, args.n_images), 32, 32, 16), 2 * args.rounds + 1)
    if not args.skip_mc:
        mc(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
