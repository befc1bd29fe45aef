"""Network-level cross-check against IBM aihwkit (issue 18, ask 2, second bullet): ResNet-20 accuracy over time.

The shared pretrained ResNet-20 (../shared/pretrained/resnet20_cifar10.npz) is evaluated on the first ``--images``
CIFAR-10 test images under both presets, on both simulators, at each of ``--times`` after programming:

* ``aihwkit_inference_default``: aihwkit ``convert_to_analog(net, InferenceRPUConfig())`` against jaxnoise
  ``analog.preset("aihwkit_inference_default")``;
* ``hwa_standard``: aihwkit ``StandardHWATrainingPreset()`` with ``forward.ir_drop = 0`` (jaxnoise has no IR drop)
  and every tile's input range set to its layer's range, against ``analog.preset("hwa_standard")`` with
  ``io.inp_ranges`` = those ranges (``analog.calibrate_input_ranges``: 3 std of the clean layer inputs on 1024
  training images, ``data.calibration_images``); the network is not HWA-trained, so its accuracy is low, the
  comparison is what matters.

aihwkit chip ``c``: ``torch.manual_seed(seed + c)``, ``program_analog_weights()``, then ``drift_analog_weights(t)``
and an evaluation at every time (one programming, a fresh read per time, as jaxnoise's chips). jaxnoise:
``robustness.evaluate_analog(..., times, key=seed, n_chips)``. Per preset and time the two means over chips agree
when ``|mean_a - mean_j| < 3 sqrt(se_a^2 + se_j^2)`` (se: the standard error over chips). Writes
``results.json`` (after every preset), ``table.md`` and ``accuracy_over_time.png`` to ``--out``, and prints the
table. A run can be split by preset: ``--presets aihwkit_inference_default``, then ``--presets hwa_standard`` with
the same ``--out`` and settings adds the second preset to the file (a preset already there needs ``--force``).

Full run (the issue's protocol: >= 16 chips, >= 1,000 images; about an hour of CPU, aihwkit ~75 image-chip-reads/s):

  PYTHONPATH=. TFDS_DATA_DIR=../shared/tfds /work/.venv-peer/bin/python tools/aihwkit_network_check.py \\
      --chips 16 --images 1000 --out experiments/results/aihwkit_network_check

Smoke test (2 chips, 64 images, 2 times; a few minutes, mostly jaxnoise's compile):

  PYTHONPATH=. TFDS_DATA_DIR=../shared/tfds /work/.venv-peer/bin/python tools/aihwkit_network_check.py --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import numpy as np

TIMES = {"1 s": 1.0, "1 h": 3600.0, "1 day": 86400.0, "1 month": 2592000.0, "1 year": 31536000.0}
PRESETS = ("aihwkit_inference_default", "hwa_standard")
Z_BOUND = 3.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peer_torch():
    """benchmarks/peer_torch.py (the PyTorch ResNet-20 and the state-dict conversion), imported by path."""
    path = os.path.join(REPO, "benchmarks", "peer_torch.py")
    spec = importlib.util.spec_from_file_location("peer_torch", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def mean_se(accs) -> tuple[float, float]:
    a = [100.0 * float(v) for v in accs]
    return statistics.mean(a), (statistics.stdev(a) / math.sqrt(len(a)) if len(a) > 1 else float("nan"))


def aihwkit_config(preset: str):
    from aihwkit.simulator.configs import InferenceRPUConfig
    from aihwkit.simulator.presets import StandardHWATrainingPreset
    if preset == "aihwkit_inference_default":
        return InferenceRPUConfig()
    c = StandardHWATrainingPreset()
    c.forward.ir_drop = 0.0
    return c


def shared_record(results: dict) -> dict:
    """``results`` (this tool's fields, kept) plus ../shared/RESULTS.md's: an arm per simulator and preset
    (``aihwkit/<preset>``, ``jaxnoise/<preset>``), an eval entry per time from its per-chip accuracies."""
    from jaxnoise import report
    from jaxnoise.models import get_model
    from jaxnoise.robustness import MCResult
    model = get_model("resnet20")
    arms = []
    for preset, r in results["presets"].items():
        for side in ("aihwkit", "jaxnoise"):
            evals = [MCResult.from_per_chip(row[side], results["images"], {
                "weight_noise": {"kind": f"device:{preset}", "eta": 1.0, "t_inference_s": results["times"][t]},
                "activation_noise": None}) for t, row in r["rows"].items()]
            arms.append(report.arm(f"{side}/{preset}", model, "clean", model.param_count(), evals,
                                   train={"source": "../shared/pretrained"}))
    command = "; ".join(r["log"][0].lstrip("$ ") for r in results["presets"].values() if r.get("log"))
    record = report.result_record("aihwkit_network_check", command, arms,
                                  {"name": "cifar10", "split": "test", "n_images": results["images"]})
    return {**record, **{k: v for k, v in results.items() if k not in record}}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chips", type=int, default=16)
    p.add_argument("--images", type=int, default=1000, help="first N CIFAR-10 test images")
    p.add_argument("--times", default=",".join(TIMES), help=f"comma-separated subset of {list(TIMES)}")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=os.path.join(REPO, "..", "shared", "pretrained", "resnet20_cifar10.npz"))
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR, ../shared/tfds, ...)")
    p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "aihwkit_network_check"))
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 chips, 64 images, times 1 s and 1 day, written to a temporary folder")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads for aihwkit (default: every core, as jaxnoise's XLA uses)")
    p.add_argument("--force", action="store_true", help="replace the results already in --out")
    args = p.parse_args(argv)
    if args.quick:
        import tempfile
        args.chips, args.images, args.times = 2, 64, "1 s,1 day"
        args.out = tempfile.mkdtemp(prefix="aihwkit_network_check_quick.")
    unknown = [t for t in args.times.split(",") if t not in TIMES]
    if unknown:
        p.error(f"--times: unknown {unknown}; choose from {list(TIMES)}")
    unknown = [q for q in args.presets.split(",") if q not in PRESETS]
    if unknown:
        p.error(f"--presets: unknown {unknown}; choose from {list(PRESETS)}")
    # A run can be split by preset (--presets one at a time, same --out): the file keeps the presets already run.
    args.previous = None
    path = os.path.join(args.out, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            prev = json.load(f)
        settings = dict(chips=args.chips, images=args.images, seed=args.seed,
                        times={t: TIMES[t] for t in args.times.split(",")})
        if any(prev.get(k) != v for k, v in settings.items()) and not args.force:
            p.error(f"{path} holds a run with other settings ({ {k: prev.get(k) for k in settings} }); pass the "
                    f"same --chips/--images/--seed/--times to add a preset, --force to replace it, or another --out")
        done = [q for q in args.presets.split(",") if q in prev.get("presets", {})]
        if done and not args.force:
            p.error(f"{path} already holds {done}; pass --force to replace them, or --presets with the others")
        if all(prev.get(k) == v for k, v in settings.items()):
            args.previous = prev
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import torch
        from aihwkit.nn.conversion import convert_to_analog
    except Exception as e:   # ImportError, or OSError when libopenblas is missing
        print(f"torch/aihwkit not importable ({type(e).__name__}: {e}); run this in the peer venv "
              f"(/work/.venv-peer, see benchmarks/peer_torch.py). Nothing was run.")
        return 0
    import jax

    from jaxnoise import analog as analog_lib
    from jaxnoise import data as data_lib
    from jaxnoise import robustness
    from jaxnoise.io import write_atomic, write_text_atomic
    from jaxnoise.models import get_model, load_torch_npz

    torch.set_num_threads(args.torch_threads)
    peer = _peer_torch()
    times = {name: TIMES[name] for name in args.times.split(",")}
    presets = args.presets.split(",")
    ds = data_lib.load_dataset("cifar10", data_dir=args.data_dir)
    n = min(args.images, len(ds.test))
    x, y = np.array(ds.test.images[:n]), np.asarray(ds.test.labels[:n], np.int32)
    bs = min(args.batch_size, n)
    model = get_model("resnet20")
    variables = load_torch_npz(model, args.weights)
    with np.load(args.weights) as f:
        state = {k: torch.from_numpy(np.asarray(f[k])) for k in f.files}
    mean_t = torch.tensor(ds.mean, dtype=torch.float32).view(1, 3, 1, 1)
    inv_std_t = 1.0 / torch.tensor(ds.std, dtype=torch.float32).view(1, 3, 1, 1)

    def prep(u8):
        return ((torch.from_numpy(u8).permute(0, 3, 1, 2).float() / ds.pixel_scale - mean_t) * inv_std_t).contiguous()

    ranges = None
    if "hwa_standard" in presets:
        calib = np.asarray(ds.preprocess(data_lib.calibration_images(ds.train, n=1024, seed=0)))
        ranges = analog_lib.calibrate_input_ranges(model.apply, variables, calib, statistic="std", alpha=3.0)

    lines: list[str] = []

    def report(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    report(f"$ python tools/aihwkit_network_check.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    report(f"date {time.strftime('%Y-%m-%d %H:%M:%S')}; jax {jax.__version__} ({jax.default_backend()}), torch "
           f"{torch.__version__} ({torch.get_num_threads()} threads); ResNet-20 {args.weights}; first {n} CIFAR-10 "
           f"test images; {args.chips} chips")
    results: dict = args.previous or {"chips": args.chips, "images": n, "seed": args.seed, "times": times,
                                      "presets": {}}
    header = list(lines)
    for preset in presets:
        del lines[len(header):]
        # aihwkit
        net = peer.torch_resnet(torch)
        net.load_state_dict(state, strict=True)
        net.eval()
        analog = convert_to_analog(net, aihwkit_config(preset))
        analog.eval()
        if preset == "hwa_standard":
            for name, layer in analog.named_analog_layers():
                for tile in layer.analog_tiles():
                    tile.set_input_range(float(ranges[name.replace(".", "/")]))
        t0 = time.perf_counter()
        acc_a = {t: [] for t in times}
        with torch.no_grad():
            for chip in range(args.chips):
                torch.manual_seed(args.seed + chip)
                analog.program_analog_weights()
                for t_name, t in times.items():
                    analog.drift_analog_weights(t)
                    correct = 0
                    for s in range(0, n, bs):
                        correct += int((analog(prep(x[s:s + bs])).argmax(1).numpy() == y[s:s + bs]).sum())
                    acc_a[t_name].append(correct / n)
        sec_a = time.perf_counter() - t0
        # jaxnoise
        spec = analog_lib.preset(preset)
        if preset == "hwa_standard":
            spec = spec.replace(io=spec.io.replace(inp_ranges=ranges))
        t0 = time.perf_counter()
        res = robustness.evaluate_analog(model, variables, x, y, spec, times=list(times.values()), key=args.seed,
                                         n_chips=args.chips, batch_size=bs, preprocess=ds.preprocess)
        sec_j = time.perf_counter() - t0
        acc_j = {t_name: [float(v) for v in r.per_chip] for t_name, r in zip(times, res)}
        rows = {}
        for t_name in times:
            ma, sa = mean_se(acc_a[t_name])
            mj, sj = mean_se(acc_j[t_name])
            z = (ma - mj) / math.sqrt(sa ** 2 + sj ** 2) if sa ** 2 + sj ** 2 > 0 else float("nan")
            rows[t_name] = dict(aihwkit=acc_a[t_name], jaxnoise=acc_j[t_name], mean_aihwkit=ma, se_aihwkit=sa,
                                mean_jaxnoise=mj, se_jaxnoise=sj, z=z, agree=bool(abs(z) < Z_BOUND))
        reads = args.chips * n * len(times)
        report(f"\n{preset}: aihwkit {reads / sec_a:.1f} image-chip-reads/s ({sec_a:.0f} s), jaxnoise "
               f"{reads / sec_j:.1f} ({sec_j:.0f} s, compile included)")
        results["presets"][preset] = dict(rows=rows, seconds_aihwkit=sec_a, seconds_jaxnoise=sec_j,
                                          reads_per_s_aihwkit=reads / sec_a, reads_per_s_jaxnoise=reads / sec_j,
                                          log=list(lines))
        # After every preset, atomically (a crash leaves the old file or the new one); NaN (one chip) stays NaN.
        write_text_atomic(os.path.join(args.out, "results.json"), json.dumps(shared_record(results), indent=1) + "\n")
    lines.clear()
    for preset in PRESETS:   # the log of every preset in the file, this run's or an earlier one's
        if preset in results["presets"]:
            lines.extend(results["presets"][preset].get("log", []) + [""])

    table = ["| preset | after programming | aihwkit mean % +- se | jaxnoise mean % +- se | z | within 3 se |",
             "|---|---|---:|---:|---:|---|"]
    for preset, r in results["presets"].items():
        for t_name, row in r["rows"].items():
            table.append(f"| {preset} | {t_name} | {row['mean_aihwkit']:.2f} +- {row['se_aihwkit']:.2f} | "
                         f"{row['mean_jaxnoise']:.2f} +- {row['se_jaxnoise']:.2f} | {row['z']:+.2f} | "
                         f"{'yes' if row['agree'] else 'NO'} |")
    for line in table:
        report(line)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(results["presets"]), figsize=(5 * len(results["presets"]), 3.6),
                                 squeeze=False)
        for ax, (preset, r) in zip(axes[0], results["presets"].items()):
            ts = [times[t] for t in r["rows"]]
            for side, fmt in (("aihwkit", "o-"), ("jaxnoise", "s--")):
                m = [row[f"mean_{side}"] for row in r["rows"].values()]
                e = [row[f"se_{side}"] for row in r["rows"].values()]
                ax.errorbar(ts, m, yerr=e, fmt=fmt, capsize=3, label=side)
            ax.set_xscale("log")
            ax.set_xlabel("seconds after programming")
            ax.set_ylabel("accuracy % (mean +- se over chips)")
            ax.set_title(f"ResNet-20, {preset}")
            ax.legend()
        fig.tight_layout()
        write_atomic(os.path.join(args.out, "accuracy_over_time.png"),
                     lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    except ImportError:
        report("(matplotlib not importable: no plot)")
    agree = all(row["agree"] for r in results["presets"].values() for row in r["rows"].values())
    report(f"\nall per-time means within {Z_BOUND:g} combined standard errors: {agree}; wrote {args.out}")
    write_text_atomic(os.path.join(args.out, "table.md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
