#!/usr/bin/env python3
"""Accuracy over time on PCM (aihwkit's inference model): pretrained vs hardware-aware (HWA) fine-tuned ResNet.

One command runs every stage and resumes where it stopped (training from its checkpoints, evaluation from the
per-arm files under ``<workdir>/eval``)::

  python experiments/device_cifar.py --model resnet32                       # full protocol (32 chips, 10k images)
  python experiments/device_cifar.py --model resnet32 --n-chips 8 --n-images 1000 --hwa-steps 300   # CPU scale

Stages (``--stages``, default all):

* ``train``: two fine-tunes from ``../shared/pretrained`` with identical steps, lr, seed and data order:
  ``clean_ft`` (no noise; the control for what fine-tuning on this JPEG'd copy of CIFAR-10 changes by itself) and
  ``hwa``, forward-noise training (``jaxnoise.methods``) with no
  extra weight noise, under ``preset("hwa_standard").training()``: 8-bit DAC/ADC with straight-through gradients,
  output noise 0.04, PCM-read output noise 0.0175, channel-wise mapping, per-layer input ranges = max|x| of the
  clean layer inputs on 1024 training images (``--range-statistic``), kept fixed. aihwkit initialises them at
  3 x std and then *learns* them; without learning, a 3-std clip of every layer input costs the pretrained network
  much of its accuracy, hence max|x|. ``--hwa-steps`` SGD steps at a constant ``--lr``.
* ``eval``: the three networks (``pretrained``, ``clean_ft``, ``hwa``) under ``preset("aihwkit_inference_default")`` at the
  inference times ``--times`` (default 1 s, 1 h, 1 day, 1 month, 1 year), with global drift compensation and
  without it: ``--n-chips`` chips on the first ``--n-images`` test images. Chip ``i`` is programmed once and read
  at every time (``robustness.evaluate_device``); the four arms share chip keys. The compile count of each sweep is
  recorded (one program per compensation mode, whatever the times).
* ``report``: ``results.json`` (shared format; ``weight_noise.kind = device:aihwkit_inference_default``,
  ``eta`` = inference time in s), ``results.md`` and ``accuracy_vs_time.png`` (mean with 95% CI band, log time).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

from jaxnoise import checkpoint, data, device, methods, report, robustness, train
from jaxnoise.models import get_model

TIMES = (1.0, 3600.0, 86400.0, 2592000.0, 31536000.0)
TIME_NAMES = {1.0: "1 s", 3600.0: "1 h", 86400.0: "1 day", 2592000.0: "1 month", 31536000.0: "1 year"}
ARMS = ("pretrained", "clean_ft", "hwa")
COMPENSATION = {"comp": "global", "nocomp": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet32", choices=("resnet20", "resnet32", "resnet44", "resnet56"))
    p.add_argument("--pretrained-dir", default="../shared/pretrained")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workdir", default=None, help="default runs/device_<model>")
    p.add_argument("--out", default=None, help="default experiments/results/device_<model>")
    p.add_argument("--stages", default="train,eval,report")
    p.add_argument("--hwa-steps", type=int, default=2000, help="HWA fine-tuning steps")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--range-statistic", default="absmax", choices=("absmax", "std"),
                   help="input ranges of HWA training: max|x| (default) or --range-alpha x std (aihwkit's init)")
    p.add_argument("--range-alpha", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--times", default=",".join(str(t) for t in TIMES), help="inference times, s")
    p.add_argument("--n-chips", type=int, default=32)
    p.add_argument("--n-images", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--chip-batch-size", type=int, default=None)
    p.add_argument("--arms", default=",".join(ARMS), help="arms the eval stage computes (parallel runs)")
    args = p.parse_args(argv)
    args.workdir = args.workdir or f"runs/device_{args.model}"
    args.out = args.out or f"experiments/results/device_{args.model}"
    args.times = [float(t) for t in args.times.split(",")]
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pretrained(args, model):
    return checkpoint.load_variables(os.path.join(args.pretrained_dir, f"{args.model}_cifar10.npz"), model)


def training_device(args, model, dataset):
    """hwa_standard for training, with input ranges calibrated on the pretrained network."""
    variables = pretrained(args, model)
    images = np.asarray(dataset.preprocess(data.calibration_images(dataset.train, seed=0)))
    ranges = device.calibrate_input_ranges(model.apply, variables, images, statistic=args.range_statistic,
                                           alpha=args.range_alpha)
    spec = device.preset("hwa_standard").training()
    return spec.replace(io=spec.io.replace(inp_ranges=ranges))


def stage_train(args, model, dataset):
    """Two fine-tunes with identical steps, lr, seed and data order: ``clean_ft`` (no noise: the control for what
    fine-tuning on this copy of CIFAR-10 alone changes) and ``hwa`` (under the hwa_standard training view)."""
    spec = training_device(args, model, dataset)
    steps_per_epoch = len(dataset.train.labels) // args.batch_size
    epochs = max(1, -(-args.hwa_steps // steps_per_epoch))
    config = train.TrainConfig(epochs=epochs, batch_size=args.batch_size, learning_rate=args.lr,
                               weight_decay=args.weight_decay, seed=args.seed, schedule="constant",
                               checkpoint_every=100)
    for arm, loss_fn, meta in (("clean_ft", methods.clean(model), {}),
                               ("hwa", methods.forward_noise(model, weight_kind=None, device=spec),
                                {"device": spec.describe()})):
        t0 = time.time()
        train.train(model, dataset, config, workdir=os.path.join(args.workdir, arm),
                    variables=pretrained(args, model), loss_fn=loss_fn, max_steps=args.hwa_steps, progress=False,
                    metadata=meta)
        log(f"{arm}: trained to step {args.hwa_steps} ({time.time() - t0:.0f} s)")


def arm_variables(args, model, arm):
    if arm == "pretrained":
        return pretrained(args, model)
    return checkpoint.load_variables(os.path.join(args.workdir, arm), model)


def eval_path(args, arm, comp):
    return os.path.join(args.workdir, "eval", f"{arm}_{comp}_{args.n_chips}chips_{args.n_images or 'all'}.json")


def stage_eval(args, model, dataset):
    x, y = dataset.test.images, dataset.test.labels
    if args.n_images:
        x, y = x[:args.n_images], y[:args.n_images]
    os.makedirs(os.path.join(args.workdir, "eval"), exist_ok=True)
    for comp, mode in COMPENSATION.items():
        spec = device.preset("aihwkit_inference_default").replace(compensation=mode)
        for arm in args.arms.split(","):
            path = eval_path(args, arm, comp)
            if os.path.exists(path):
                continue
            variables = arm_variables(args, model, arm)
            clean = robustness.evaluate(model, variables, x, y, batch_size=args.eval_batch_size,
                                        preprocess=dataset.preprocess)
            traces, t0 = robustness.trace_count(), time.time()
            res = robustness.evaluate_device(model, variables, x, y, spec, times=args.times, key=args.seed,
                                             n_chips=args.n_chips, batch_size=args.eval_batch_size,
                                             chip_batch_size=args.chip_batch_size, preprocess=dataset.preprocess)
            record = {"arm": arm, "compensation": mode, "clean": clean.mean, "seconds": time.time() - t0,
                      "traces": robustness.trace_count() - traces, "results": [r.to_dict() for r in res]}
            report.write_json(path, record)
            log(f"{arm} {comp}: " + ", ".join(f"{TIME_NAMES.get(t, t)} {100 * r.mean:.2f}%"
                                                for t, r in zip(args.times, res))
                + f" ({record['seconds']:.0f} s, {record['traces']} trace(s))")


def ci_text(e):
    return f"{100 * e['mean']:.2f} {robustness.format_ci95(e['ci95'])}"


def stage_report(args, model, dataset):
    records = {}
    for comp in COMPENSATION:
        for arm in ARMS:
            path = eval_path(args, arm, comp)
            if not os.path.exists(path):
                log(f"report: {arm} {comp} not evaluated yet ({path}); left out")
                continue
            with open(path) as f:
                records[(arm, comp)] = json.load(f)
    if ("pretrained", "comp") not in records:
        raise SystemExit("the report needs at least the pretrained arm with compensation: run the eval stage")
    n_images = records[("pretrained", "comp")]["results"][0]["n_images"]
    arms = []
    for (arm, comp), rec in records.items():
        name = arm if comp == "comp" else f"{arm}_nocomp"
        if arm == "pretrained":
            train_info = {"source": "../shared/pretrained"}
        else:
            meta = checkpoint.read_metadata(os.path.join(args.workdir, arm))
            train_info = {"init": "../shared/pretrained", "steps": args.hwa_steps, "lr": args.lr,
                          "batch_size": args.batch_size, "schedule": "constant", "seed": args.seed,
                          "train_config": meta.get("config"),
                          "device": None if arm == "clean_ft" else
                          f"hwa_standard (training view), input ranges {args.range_alpha} x {args.range_statistic}"}
        arms.append({
            "name": name, "model": args.model,
            "method": {"pretrained": "clean", "clean_ft": "clean", "hwa": "hwa_forward_noise"}[arm],
            "param_count": model.param_count(), "extra_param_count": 0, "train": train_info,
            "clean_accuracy": rec["clean"], "drift_compensation": rec["compensation"],
            "eval_seconds": rec["seconds"], "eval_traces": rec["traces"], "eval": rec["results"]})
    command = "python experiments/device_cifar.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = report.result_record(f"device_{args.model}", command.strip(), arms,
                                  {"name": "cifar10", "split": "test", "n_images": n_images})
    os.makedirs(args.out, exist_ok=True)
    report.write_json(os.path.join(args.out, "results.json"), result)
    write_markdown(args, arms, n_images)
    plot(args, arms)
    log(f"wrote {args.out}")


def write_markdown(args, arms, n_images):
    lines = [f"# {args.model}: accuracy over time under aihwkit_inference_default", "",
             f"{arms[0]['eval'][0]['n_chips']} chips, first {n_images} test images; mean % [95% CI], and the "
             f"5th-percentile chip. Clean accuracy on the same images: " +
             ", ".join(f"{a['name']} {100 * a['clean_accuracy']:.2f}%" for a in arms if "nocomp" not in a["name"])
             + ".", "",
             "| time | " + " | ".join(a["name"] for a in arms) + " |",
             "|---|" + "---|" * len(arms)]
    for k, t in enumerate(args.times):
        cells = [f"{ci_text(a['eval'][k])} (p5 {100 * a['eval'][k]['p5']:.2f})" for a in arms]
        lines.append(f"| {TIME_NAMES.get(t, f'{t:g} s')} | " + " | ".join(cells) + " |")
    lines += ["", "Compile count of each 5-time sweep (traces of the jitted evaluation program): " +
              ", ".join(f"{a['name']} {a['eval_traces']}" for a in arms) +
              " (arms after the first of a compensation mode reuse its program: 0).", "",
              "Evaluation seconds: " + ", ".join(f"{a['name']} {a['eval_seconds']:.0f}" for a in arms) + "."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(args, arms):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for a in arms:
        t = np.array(args.times)
        m = np.array([e["mean"] for e in a["eval"]]) * 100
        # ci95 is None (null) with one chip: no band there
        lo = np.array([np.nan if e["ci95"] is None else e["ci95"][0] for e in a["eval"]]) * 100
        hi = np.array([np.nan if e["ci95"] is None else e["ci95"][1] for e in a["eval"]]) * 100
        style = "-" if "nocomp" not in a["name"] else "--"
        color = {"pretrained": "C0", "clean_ft": "C2", "hwa": "C1"}[a["name"].replace("_nocomp", "")]
        line, = ax.plot(t, m, style, marker="o", color=color, label=a["name"])
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(args.times, [TIME_NAMES.get(t, f"{t:g}") for t in args.times])
    ax.set_xlabel("time after programming")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{args.model}, aihwkit_inference_default, {arms[0]['eval'][0]['n_chips']} chips (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "accuracy_vs_time.png"), dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    stages = args.stages.split(",")
    dataset = data.load_dataset("cifar10", data_dir=args.data_dir)
    model = get_model(args.model)
    os.makedirs(args.workdir, exist_ok=True)
    log(f"{args.model}: stages {stages}, workdir {args.workdir}, device {report.device_description()}")
    if "train" in stages:
        stage_train(args, model, dataset)
    if "eval" in stages:
        stage_eval(args, model, dataset)
    if "report" in stages:
        stage_report(args, model, dataset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
