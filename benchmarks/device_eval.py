#!/usr/bin/env python3
"""Cost of device-realistic Monte Carlo evaluation (``jaxnoise.analog``) on ResNet-20, measured in one run.

Prints, for the pretrained ResNet-20 on the first ``--n-images`` CIFAR-10 test images:

(a) Monte Carlo throughput (image-chips per second) with the full ``aihwkit_inference_default`` spec (PCM
    programming/drift/read noise, abs-max DAC per input vector, output noise, ADC, iterative bound management,
    global drift compensation), one time point, relative to one clean evaluation. Goal: >= 0.4. The same ratio
    for a few reduced specs shows where the time goes, and the legacy numerics (``IOParams(sampler=
    "threefry/erfinv", conv_sum="taps", semantics="v0")`` = ``analog.LEGACY_IO``, bit for bit the results before 2026-12) what the defaults save.
    Each line also gives the first call's compile time of that spec's device program (first call minus a
    compiled call of the same shapes); the full spec's is the ResNet-20 device program's compile time (goal:
    under 60 s).
(b) the compile count and compile+run time of a 6-point time sweep (one ``evaluate_analog`` call) against a
    1-point evaluation: the sweep must trace once, and its cost should be ~6x the run time of one point, not
    6 compilations.

Timings follow a warm-up call (compile excluded) unless labelled "first call"; each is the best of ``--repeats``.
Each ratio in (a) divides by a clean timing taken right before it, so a machine shared with other jobs biases the
ratios less than one clean timing at the start would.

Usage (from the repository root):
  python benchmarks/device_eval.py                     # 1000 images, 4 chips
  python benchmarks/device_eval.py --quick             # 200 images, 2 chips
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from jaxnoise import analog as analog_lib
from jaxnoise import robustness
from jaxnoise.data import load_dataset
from jaxnoise.models import get_model, load_torch_npz
from jaxnoise.report import device_description

TIMES6 = [1.0, 60.0, 3600.0, 86400.0, 2592000.0, 31536000.0]


def best_time(fn, repeats):
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=1000)
    p.add_argument("--n-chips", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--weights", default="../shared/pretrained/resnet20_cifar10.npz")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n_images, args.n_chips, args.repeats = 200, 2, 1
    if not os.path.exists(args.weights):
        print(f"{args.weights} not found: this benchmark needs the pretrained ResNet-20.")
        return 1
    ds = load_dataset("cifar10", data_dir=args.data_dir)
    model = get_model("resnet20")
    variables = load_torch_npz(model, args.weights)
    x, y = ds.test.images[:args.n_images], ds.test.labels[:args.n_images]
    n, k = len(y), args.n_chips
    print(f"device: {device_description()}, backend {jax.default_backend()}; ResNet-20, {n} images, {k} chips, "
          f"batch {args.batch_size}")

    t_clean, clean = best_time(lambda: robustness.evaluate(model, variables, x, y, batch_size=args.batch_size,
                                                           preprocess=ds.preprocess), args.repeats)
    clean_rate = n / t_clean
    print(f"clean: {t_clean:.2f} s, {clean_rate:.0f} images/s, accuracy {100 * clean.mean:.2f}%")

    full = analog_lib.preset("aihwkit_inference_default")
    io = full.io
    variants = {
        "aihwkit_inference_default": full,
        "  legacy numerics (erfinv sampler, per-tap sums)": full.replace(
            io=io.replace(**analog_lib.LEGACY_IO)),
        "  one tile per layer (max_input_size 0: the 576-input convs unsplit)": full.replace(max_input_size=0,
                                                                                            max_output_size=0),
        "  without bound management": full.replace(io=io.replace(bound_management="none")),
        "  without I/O (PCM + compensation only)": full.replace(io=None),
        "  I/O only, no noise (quantisers)": full.replace(pcm=None, compensation=None,
                                                         io=io.replace(out_noise=0.0, bound_management="none")),
    }
    print(f"\n(a) Monte Carlo throughput relative to clean (image-chips/s over clean images/s; goal >= 0.4 for "
          f"the full spec), I/O-noise sampler {io.resolved_sampler()}, conv_sum {io.conv_sum}")
    def clean_run():
        return robustness.evaluate(model, variables, x, y, batch_size=args.batch_size, preprocess=ds.preprocess)

    for name, spec in variants.items():
        def run(spec=spec):
            return robustness.evaluate_analog(model, variables, x, y, spec, times=[86400.0], key=0, n_chips=k,
                                              batch_size=args.batch_size, preprocess=ds.preprocess)
        t0 = time.perf_counter()
        run()  # compile first, so the clean timing right before the device timing is adjacent to it
        t_first = time.perf_counter() - t0
        t_ref, _ = best_time(clean_run, args.repeats)   # clean again, next to this variant (shared machines drift)
        t, res = best_time(run, args.repeats)
        rate = k * n / t
        print(f"{name:50s} {t:7.2f} s  {rate:7.0f} image-chips/s  ratio {rate / (n / t_ref):.3f} "
              f"(clean {n / t_ref:.0f} images/s just before)  (t = 1 day: {100 * res[0].mean:.2f}%)  "
              f"compile {t_first - t:.1f} s (first call {t_first:.1f} s)", flush=True)

    print("\n(b) time sweep: one compiled program for any number of time points")
    spec = full.replace(g_max=24.0)   # a fresh spec value: same structure, so nothing is recompiled below

    def sweep(times):
        before = robustness.trace_count()
        t0 = time.perf_counter()
        res = robustness.evaluate_analog(model, variables, x, y, spec, times=times, key=1, n_chips=k,
                                         batch_size=args.batch_size, preprocess=ds.preprocess)
        return time.perf_counter() - t0, robustness.trace_count() - before, res

    t1_first, c1, _ = sweep([86400.0])
    t1, c1b, _ = sweep([3600.0])
    t6_first, c6, res6 = sweep(TIMES6)
    t6, c6b, _ = sweep([2 * t for t in TIMES6])
    print(f"1 time point : first call {t1_first:.1f} s ({c1} trace), again with another time {t1:.1f} s "
          f"({c1b} traces)")
    print(f"6 time points: first call {t6_first:.1f} s ({c6} trace), again with other times {t6:.1f} s "
          f"({c6b} traces)")
    print(f"ratio 6-point sweep / 1-point evaluation (compiled): {t6 / t1:.2f} (6 points); compile count of the "
          f"6-point sweep: {c6}, of the re-run: {c6b}")
    print("accuracy over time (6-point sweep): " + ", ".join(
        f"{t:g} s {100 * r.mean:.1f}%" for t, r in zip(TIMES6, res6)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
