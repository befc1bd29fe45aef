#!/usr/bin/env python3
"""Sharded Monte Carlo: the same job on 1 and on N devices, checked equal, timed in one run.

Two modes:

* ``--forced-devices 1,8`` (default; CPU): each device count runs in its own subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag must be set before jax starts). The parent
  checks that every chip's accuracy is identical across device counts and prints the time ratio
  ``t(1 device) / t(N devices)`` and each run's compile count. On a 2-core machine the N "devices" share the same
  cores, so no speed-up is expected: the point is equal results and one compilation.
* ``--real-devices`` (GPU/TPU): one process, the mesh over ``jax.devices()``; prints throughput in image-chips per
  second (chips x images / seconds) against a single-device run of the same job. Goal on one H200: 1,000 chips x
  10,000 test images of ResNet-20 in < 30 s (``--n-chips 1000`` without ``--n-images``).

Every timing follows a warm-up call (which compiles), and is the best of ``--repeats`` calls. ResNet-20 with the
pretrained weights on CIFAR-10 if ``../shared`` has them, else the small CNN on digits (untrained).

Usage (from the repository root):
  python benchmarks/sharded_mc.py                                  # ResNet-20, 12 chips x 1000 images, 1 vs 8
  python benchmarks/sharded_mc.py --n-chips 12 --n-images 500 --repeats 1      # quicker
  python benchmarks/sharded_mc.py --real-devices --n-chips 1000                # on an accelerator
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PRETRAINED = "../shared/pretrained/resnet20_cifar10.npz"


def _setup(args):
    import jax

    from jaxnoise.data import load_dataset
    from jaxnoise.models import get_model, load_torch_npz

    data_dir = args.data_dir or os.environ.get("TFDS_DATA_DIR") or "../shared/tfds"
    if os.path.exists(PRETRAINED) and os.path.isdir(data_dir):
        ds = load_dataset("cifar10", data_dir=data_dir)
        model = get_model("resnet20")
        variables = load_torch_npz(model, PRETRAINED)
        name = "resnet20/cifar10 (pretrained)"
    else:
        ds = load_dataset("digits")
        model = get_model("cnn", input_shape=ds.image_shape)
        variables = model.init(jax.random.key(0))
        name = "cnn/digits (untrained; CIFAR or weights missing)"
    n = args.n_images or len(ds.test.labels)
    return ds, model, variables, ds.test.images[:n], ds.test.labels[:n], name


def _job(args, mesh):
    """The Monte Carlo job: a closure running evaluate() once, and its description."""
    from jaxnoise import robustness
    from jaxnoise.noise import NoiseSpec

    ds, model, variables, x, y, name = _setup(args)
    spec = NoiseSpec(weight_eta=args.eta)

    def run():
        return robustness.evaluate(model, variables, x, y, spec, key=args.seed, n_chips=args.n_chips,
                                   batch_size=args.batch_size, chip_batch_size=args.chip_batch_size,
                                   preprocess=ds.preprocess, mesh=mesh)

    return run, name, len(y)


def _timed(run, repeats):
    from jaxnoise import robustness

    before = robustness.trace_count()
    t0 = time.perf_counter()
    res = run()
    first = time.perf_counter() - t0
    traces = robustness.trace_count() - before
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = run()
        best = min(best, time.perf_counter() - t0)
    return res, first, best, traces


def worker(args) -> None:
    """One device count (set by the parent through XLA_FLAGS): prints one JSON line."""
    import jax

    from jaxnoise import distributed

    mesh = distributed.mc_mesh(args.n_chips) if jax.device_count() > 1 else None
    run, name, n_images = _job(args, mesh)
    res, first, best, traces = _timed(run, args.repeats)
    print("RESULT " + json.dumps({
        "devices": jax.device_count(), "mesh": None if mesh is None else dict(mesh.shape), "model": name,
        "n_images": n_images, "per_chip": res.per_chip.tolist(), "first_call_s": first, "best_s": best,
        "traces": traces}))


def forced(args) -> int:
    counts = [int(c) for c in args.forced_devices.split(",")]
    runs = {}
    for c in counts:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={c}", "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", *sys.argv[1:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        runs[c] = json.loads(lines[-1][len("RESULT "):])
    base = runs[counts[0]]
    print(f"model: {base['model']}; {args.n_chips} chips x {base['n_images']} images, weight noise "
          f"additive_rel_max eta {args.eta}; best of {args.repeats} after a warm-up; {os.cpu_count()} CPU cores")
    print(f"{'devices':>8} {'mesh (chips x data)':>20} {'compile+run s':>14} {'run s':>8} {'traces':>7} "
          f"{'image-chips/s':>14} {'t(1)/t(N)':>10} {'per-chip equal':>15}")
    ok = True
    for c in counts:
        r = runs[c]
        equal = r["per_chip"] == base["per_chip"]
        ok &= equal
        mesh = "-" if r["mesh"] is None else f"{r['mesh']['chips']} x {r['mesh']['data']}"
        rate = args.n_chips * r["n_images"] / r["best_s"]
        print(f"{c:>8} {mesh:>20} {r['first_call_s']:>14.1f} {r['best_s']:>8.2f} {r['traces']:>7} {rate:>14.0f} "
              f"{base['best_s'] / r['best_s']:>10.2f} {str(equal):>15}")
    mean = sum(base["per_chip"]) / len(base["per_chip"])
    print(f"mean accuracy {100 * mean:.2f}% over {len(base['per_chip'])} chips (the same on every device count: {ok})")
    return 0 if ok else 1


def real(args) -> int:
    import jax

    from jaxnoise import distributed, robustness
    from jaxnoise.report import device_description

    n = jax.device_count()
    single, name, n_images = _job(args, None)
    sharded, _, _ = _job(args, distributed.mc_mesh(args.n_chips) if n > 1 else None)
    print(f"{device_description()}: {n} device(s); model {name}; {args.n_chips} chips x {n_images} images")
    r1, f1, t1, tr1 = _timed(single, args.repeats)
    rn, fn, tn, trn = _timed(sharded, args.repeats)
    for label, first, best, traces in (("1 device", f1, t1, tr1), (f"{n} devices", fn, tn, trn)):
        print(f"  {label:>10}: first call {first:.1f} s, run {best:.2f} s, traces {traces}, "
              f"{args.n_chips * n_images / best:,.0f} image-chips/s")
    print(f"  t(1)/t({n}) = {t1 / tn:.2f}; per-chip equal: {r1.per_chip.tolist() == rn.per_chip.tolist()}; "
          f"mean {100 * r1.mean:.2f}% {robustness.format_ci95(r1.ci95)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forced-devices", default="1,8", help="device counts, each in a subprocess (CPU)")
    p.add_argument("--real-devices", action="store_true", help="use jax.devices() in this process (GPU/TPU)")
    p.add_argument("--n-chips", type=int, default=12, help="12 chips: uneven over 8 devices (padded)")
    p.add_argument("--n-images", type=int, default=1000, help="first N test images (0: all)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--chip-batch-size", type=int, default=None)
    p.add_argument("--eta", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.n_images = args.n_images or None
    if args.worker:
        worker(args)
        return 0
    return real(args) if args.real_devices else forced(args)


if __name__ == "__main__":
    sys.exit(main())
