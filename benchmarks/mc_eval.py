#!/usr/bin/env python3
"""Throughput of Monte Carlo (many-chip) evaluation, measured in one run.

For ResNet-20 on the CIFAR-10 test split (and the small CNN on digits) it prints:

(a) the throughput of K-chip MC evaluation (weight noise ``additive_rel_max``, eta 0.1) relative to one clean
    evaluation, in image-evaluations per second: ``(K * N / t_mc) / (N / t_clean)``. Goal: >= 0.85.
(b) MC with ``jax.lax.map`` (``chip_batch_size`` chosen by a small scan over {1, 2, 4, 8}, each printed) relative
    to a Python loop of jitted single-chip calls over the same chips: ``t_loop / t_map``. Goals: >= 1.2x for
    ResNet-20, >= 3x for the CNN on digits.

Every timing follows a warm-up call, so compile time is excluded; each is the best of ``--repeats`` runs. Ratios
are the result; absolute times are printed alongside. If CIFAR-10 is missing, the digits part runs alone.

Usage (from the repository root):
  python benchmarks/mc_eval.py                    # full: 10000 images, 32 chips (long on CPU)
  python benchmarks/mc_eval.py --quick            # smoke test, under a minute
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxnoise import noise, robustness
from jaxnoise.data import load_dataset
from jaxnoise.models import get_model, load_torch_npz
from jaxnoise.report import device_description

ETA = 0.1


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Warm-up call (compiles), then the best wall time of ``repeats`` calls, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def python_loop(model, variables, images, labels, spec, key, n_chips, batch_size, preprocess):
    """The baseline: one jitted single-chip call per chip from a Python loop (same chips, same semantics)."""
    # The evaluator's own padding/batching, so both sides see identical data layouts.
    images_b, labels_b, valid_b, n_images = robustness.batch_data(model, images, labels, batch_size, preprocess)
    single = jax.jit(robustness.make_chip_eval(model, batch_size=images_b.shape[1], preprocess=preprocess))
    spec = jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), spec)

    def run():
        outs = [single(variables, images_b, labels_b, valid_b, spec, jax.random.fold_in(key, i))
                for i in range(n_chips)]  # dispatched asynchronously, gathered at the end
        return np.array([int(o) for o in outs]) / n_images

    return run


def bench(title, model, variables, images, labels, preprocess, *, n_chips, batch_size, candidates, scan_images,
          scan_chips, repeats, goal_b):
    variables = jax.device_put(variables)
    spec = noise.NoiseSpec(weight_eta=ETA)  # additive_rel_max
    key = jax.random.key(0)
    n = len(labels)
    print(f"\n== {title}: {n} images, {n_chips} chips, weight noise additive_rel_max eta={ETA}, data batch "
          f"{min(batch_size, n)}")

    # chip_batch_size scan on a small workload
    xs, ys = images[:scan_images], labels[:scan_images]
    scan = {}
    for cbs in candidates:
        t, _ = best_time(lambda: robustness.evaluate(model, variables, xs, ys, spec, key=key, n_chips=scan_chips,
                                                     batch_size=batch_size, chip_batch_size=cbs,
                                                     preprocess=preprocess), 1)
        scan[cbs] = scan_chips * len(ys) / t
        print(f"   chip_batch_size {cbs}: {scan[cbs]:10.1f} image-evals/s   ({scan_chips} chips x {len(ys)} images "
              f"in {t:.3f} s)")
    chosen = max(scan, key=scan.get)
    print(f"   -> chip_batch_size {chosen} (library default on {jax.default_backend()}: "
          f"{noise.default_chip_batch_size()})")

    t_clean, clean = best_time(lambda: robustness.evaluate(model, variables, images, labels, batch_size=batch_size,
                                                           preprocess=preprocess), repeats)
    t_mc, mc = best_time(lambda: robustness.evaluate(model, variables, images, labels, spec, key=key,
                                                     n_chips=n_chips, batch_size=batch_size, chip_batch_size=chosen,
                                                     preprocess=preprocess), repeats)
    t_loop, loop = best_time(python_loop(model, variables, images, labels, spec, key, n_chips, batch_size,
                                         preprocess), repeats)
    ratio_a = (n_chips * n / t_mc) / (n / t_clean)
    ratio_b = t_loop / t_mc
    agree = np.max(np.abs(loop - mc.per_chip))
    print(f"   accuracy: clean {100 * clean.mean:.2f}%, {n_chips} chips {100 * mc.mean:.2f}% "
          f"{robustness.format_ci95(mc.ci95)}; loop vs map per-chip max |diff| {agree:.4f}")
    print(f"(a) MC / clean throughput: {ratio_a:.3f}  (goal >= 0.85: {'met' if ratio_a >= 0.85 else 'NOT met'})"
          f"   [clean {n / t_clean:.1f} img/s in {t_clean:.3f} s; MC {n_chips * n / t_mc:.1f} image-evals/s "
          f"in {t_mc:.3f} s]")
    print(f"(b) lax.map vs Python loop: {ratio_b:.2f}x  (goal >= {goal_b}x: "
          f"{'met' if ratio_b >= goal_b else 'NOT met'})   [loop {t_loop:.3f} s, lax.map {t_mc:.3f} s]")
    return ratio_a, ratio_b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="CIFAR ResNet (default resnet20)")
    p.add_argument("--weights", default=os.path.join("..", "shared", "pretrained", "resnet20_cifar10.npz"))
    p.add_argument("--data-dir", default=None, help="TFDS data dir holding cifar10 (default: searched)")
    p.add_argument("--n-chips", type=int, default=32)
    p.add_argument("--n-images", type=int, default=None, help="CIFAR-10 test images (default: all 10000)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (best is reported)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test (< 1 min): 100 CIFAR images, 2 chips, fewer chip_batch_size candidates")
    p.add_argument("--skip-cifar", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    args = p.parse_args(argv)
    if args.n_chips < 1 or args.batch_size < 1 or args.repeats < 1:
        p.error("--n-chips, --batch-size and --repeats must be >= 1")

    candidates = (1, 2, 4, 8)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device_description()}"
          f"{', QUICK mode' if args.quick else ''}")

    if not args.skip_cifar:
        cifar = None
        try:
            cifar = load_dataset("cifar10", data_dir=args.data_dir)
        except Exception as e:  # noqa: BLE001 - any reason: report it and run the digits part
            print(f"\nCIFAR-10 is not available ({type(e).__name__}: {e}); skipping the {args.model}/CIFAR-10 "
                  f"part, running digits only.")
        if cifar is not None:
            model = get_model(args.model)
            variables = load_torch_npz(model, args.weights)
            n_images = min(args.n_images or (100 if args.quick else len(cifar.test)), len(cifar.test))
            n_chips = 2 if args.quick else args.n_chips
            # Quick: only chip_batch_size 1 (each other value is a ~15 s compile on CPU), and the scan workload
            # is the measured one, so its compiled programs are reused.
            bench(f"{args.model} / cifar10 test", model, variables, cifar.test.images[:n_images],
                  cifar.test.labels[:n_images], cifar.preprocess, n_chips=n_chips,
                  batch_size=min(args.batch_size, 50) if args.quick else args.batch_size,
                  candidates=(1,) if args.quick else candidates, scan_images=n_images if args.quick else 200,
                  scan_chips=n_chips if args.quick else 8, repeats=args.repeats, goal_b=1.2)

    if not args.skip_digits:
        digits = load_dataset("digits")
        model = get_model("cnn")
        variables = model.init(jax.random.key(0))  # untrained: throughput does not depend on accuracy
        n_chips = 8 if args.quick else args.n_chips
        bench("cnn (initialised, untrained) / digits test", model, variables, digits.test.images,
              digits.test.labels, digits.preprocess, n_chips=n_chips, batch_size=args.batch_size,
              candidates=(1, 2) if args.quick else candidates, scan_images=len(digits.test), scan_chips=n_chips,
              repeats=args.repeats, goal_b=3.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
