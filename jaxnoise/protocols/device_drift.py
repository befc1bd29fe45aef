"""Protocol ``device_drift``: accuracy over time on PCM (aihwkit's inference model), pretrained vs fine-tuned vs
hardware-aware (HWA) fine-tuned.

As ``experiments/device_cifar.py`` ran it (that script now points here). The analog MVM's I/O numerics (fields of
``jaxnoise.analog.IOParams``: normal sampler, conv summation order, bound-management semantics) are the config's
``io_numerics``, applied to the training and the inference device specs alike.

Stages:

* ``train_clean_ft``, ``train_hwa``: two fine-tunes from the pretrained weights with identical steps, lr, seed and
  data order (``train``; constant lr, whole training split): ``clean_ft`` without noise (the control for what
  fine-tuning on this copy of CIFAR-10 changes by itself) and ``hwa``, forward-noise training with no extra
  weight noise under ``preset(hwa.preset).training()`` (8-bit DAC/ADC with straight-through gradients, output
  noise, PCM-read output noise, channel-wise mapping), its per-layer input ranges fixed at ``hwa.range_alpha`` x
  ``hwa.range_statistic`` of the clean layer inputs of the pretrained network on ``hwa.calib_images`` training
  images (aihwkit learns them; a fixed 3-std clip costs the pretrained network much of its accuracy, hence max|x|).
  Writes ``weights/<arm>.npz`` and ``metrics/<arm>.jsonl``.
* ``eval_<arm>`` (``pretrained``, ``clean_ft``, ``hwa``): ``preset(eval.preset)`` at the inference times
  ``eval.times`` with global drift compensation and without it (arms ``<arm>`` and ``<arm>_nocomp``):
  ``eval.n_chips`` chips on the first ``eval.n_images`` test images (0: all). Chip ``i`` (key ``fold_in(key(seed),
  i)``) is programmed once and read at every time; every arm has the same chips. Each entry records the number of
  compilations of its sweep (one program per compensation mode, reused by the later arms of a process).
  ``eval/<arm>.json``, written as each mode finishes (a stopped evaluation resumes).
* ``report``: ``results.json`` (shared format; ``weight_noise.kind = device:<preset>``, ``eta`` = inference time in
  s), ``results.md`` and ``accuracy_vs_time.png`` (mean with 95% CI band, log time).

``tiny=True`` runs the same stages on digits with a one-block CNN from random weights: 4 training steps, 4 chips,
the first 100 test images, 256 calibration images and the default I/O numerics (the tests).
"""

from __future__ import annotations

import functools
import os
import shutil
import time

import jax
import numpy as np

from jaxnoise import analog as analog_lib
from jaxnoise import checkpoint, data, methods, report, robustness, train
from jaxnoise import io as io_lib
from jaxnoise.models import get_model
from jaxnoise.protocols import common
from jaxnoise.stages import Stage, protocol

dataset = common.dataset
_command = common.command

ARMS = ("pretrained", "clean_ft", "hwa")
TRAINED = ("clean_ft", "hwa")
COMPENSATION = {"comp": "global", "nocomp": None}   # arm-name suffix -> drift compensation
TIME_NAMES = {1.0: "1 s", 3600.0: "1 h", 86400.0: "1 day", 2592000.0: "1 month", 31536000.0: "1 year"}
TINY_CHANNELS = (8,)
TINY_STEPS = 4
TINY_CHIPS = 4
TINY_IMAGES = 100
TINY_CALIB_IMAGES = 256

_BASE = ("tiny", "model", "pretrained", "dataset", "data_dir", "seed", "io_numerics")



# ---------------------------------------------------------------------------------------------------------------
# Data, model, device specs


def model_of(config, ds: data.Dataset):
    """The network (the same object for the same config, so stages reuse each other's compiled programs)."""
    return _model("cnn" if config.tiny else config.model, ds.num_classes, tuple(ds.image_shape), bool(config.tiny))


@functools.lru_cache(maxsize=8)
def _model(name: str, num_classes: int, image_shape: tuple, tiny: bool):
    if tiny:
        return get_model("cnn", input_shape=image_shape, num_classes=num_classes, channels=TINY_CHANNELS)
    return get_model(name, num_classes=num_classes)


def pretrained(config, model) -> dict:
    """The pretrained weights (random ones from ``seed`` in tiny mode)."""
    if config.tiny:
        return jax.tree.map(np.asarray, model.init(jax.random.key(int(config.seed))))
    if not os.path.exists(config.pretrained):
        raise FileNotFoundError(f"pretrained weights {config.pretrained!r} not found: set pretrained= to the "
                                f"{config.model} CIFAR-10 .npz (../shared/pretrained).")
    return checkpoint.load_variables(config.pretrained, model)


def io_numerics(config) -> dict:
    """The ``IOParams`` fields of ``config.io_numerics`` (a field set to "" keeps the preset's value); in tiny mode
    none (the legacy numerics compile ~1.5x longer, past the tests' budget; tests/test_experiment.py checks the
    full config's specs)."""
    if config.tiny:
        return {}
    return {k: v for k, v in config.io_numerics.items() if v != ""}


def with_numerics(config, spec: analog_lib.AnalogSpec) -> analog_lib.AnalogSpec:
    """``spec`` with the config's I/O numerics; under the legacy pipeline (``semantics="v0"``) through
    :func:`jaxnoise.analog.legacy_io`, which drops a preset's learned ``input_range``."""
    if spec.io is None:
        return spec
    numerics = io_numerics(config)
    if numerics.get("semantics") == "v0":
        return spec.replace(io=analog_lib.legacy_io(spec.io, **numerics))
    return spec.replace(io=spec.io.replace(**numerics))


def inference_spec(config, compensation: str | None) -> analog_lib.AnalogSpec:
    """``preset(eval.preset)`` with ``compensation`` and the config's I/O numerics."""
    return with_numerics(config, analog_lib.preset(config.eval.preset).replace(compensation=compensation))


def training_spec(config, model, variables, ds: data.Dataset) -> analog_lib.AnalogSpec:
    """``preset(hwa.preset).training()`` with input ranges calibrated on ``variables`` and the config's numerics."""
    images = np.asarray(ds.preprocess(data.calibration_images(
        ds.train, n=common.cap(config, config.hwa.calib_images, TINY_CALIB_IMAGES), seed=0)))
    ranges = analog_lib.calibrate_input_ranges(model.apply, variables, images, statistic=config.hwa.range_statistic,
                                           alpha=float(config.hwa.range_alpha))
    spec = analog_lib.preset(config.hwa.preset).training()
    return with_numerics(config, spec.replace(io=spec.io.replace(inp_ranges=ranges)))



# ---------------------------------------------------------------------------------------------------------------
# Stages


def _steps(config) -> int:
    return common.cap(config, config.train.steps, TINY_STEPS)


def stage_train(arm: str):
    def run(ctx):
        config = ctx.config
        ds = dataset(config)
        model = model_of(config, ds)
        start = pretrained(config, model)
        steps, batch = _steps(config), int(config.train.batch_size)
        tcfg = train.TrainConfig(epochs=max(1, -(-steps // (len(ds.train.labels) // batch))), batch_size=batch,
                                 learning_rate=float(config.train.lr), weight_decay=float(config.train.weight_decay),
                                 seed=int(config.seed), schedule="constant",
                                 checkpoint_every=int(config.train.checkpoint_every))
        if arm == "hwa":
            spec = training_spec(config, model, start, ds)
            loss_fn, meta = methods.forward_noise(model, weight_kind=None, device=spec), {"device": spec.describe()}
            device_text = (f"{config.hwa.preset} (training view), input ranges {float(config.hwa.range_alpha)} x "
                           f"{config.hwa.range_statistic}")
        else:
            loss_fn, meta, device_text = methods.clean(model), {}, None
        workdir = ctx.work_path("train", "")
        out, _ = train.train(model, ds, tcfg, workdir=workdir, variables=start, loss_fn=loss_fn, max_steps=steps,
                             progress=False, metadata=meta)
        checkpoint.save_npz(ctx.result_path("weights", f"{arm}.npz"), out,
                            {"model": model.name, "model_config": dict(model.config), "stage": f"train_{arm}",
                             "experiment": config.name, "method": arm, **meta}, overwrite=True)
        shutil.copyfile(os.path.join(workdir, train.METRICS_FILE), ctx.result_path("metrics", f"{arm}.jsonl"))
        return {"steps": checkpoint.read_metadata(workdir).get("step"), "train_config": tcfg.to_dict(),
                "device": device_text}
    return run


def _train_info(ctx, arm: str) -> dict:
    config = ctx.config
    if arm == "pretrained":
        return {"source": "random (tiny)" if config.tiny else os.path.dirname(config.pretrained)}
    t = ctx.summaries[f"train_{arm}"]
    return {"init": "random (tiny)" if config.tiny else os.path.dirname(config.pretrained), "steps": _steps(config),
            "lr": float(config.train.lr), "batch_size": int(config.train.batch_size), "schedule": "constant",
            "seed": int(config.seed), "train_config": t["train_config"], "device": t["device"]}


def eval_images(config, ds: data.Dataset):
    n = common.cap(config, config.eval.n_images or len(ds.test.labels), TINY_IMAGES)
    return ds.test.images[:n], ds.test.labels[:n]


def stage_eval(arm: str):
    def run(ctx):
        config = ctx.config
        ds = dataset(config)
        model = model_of(config, ds)
        variables = (pretrained(config, model) if arm == "pretrained"
                     else checkpoint.load_variables(ctx.result_path("weights", f"{arm}.npz"), model))
        x, y = eval_images(config, ds)
        path = ctx.result_path("eval", f"{arm}.json")
        done = {a["name"]: a for a in common.read_json(path)["arms"]} if os.path.exists(path) else {}
        method = "hwa_forward_noise" if arm == "hwa" else "clean"
        for suffix, mode in COMPENSATION.items():
            name = arm if suffix == "comp" else f"{arm}_nocomp"
            if name in done:
                continue
            clean = robustness.evaluate(model, variables, x, y, batch_size=int(config.eval.batch_size),
                                        preprocess=ds.preprocess)
            traces, t0 = robustness.trace_count(), time.time()
            res = robustness.evaluate_analog(model, variables, x, y, inference_spec(config, mode),
                                             times=[float(t) for t in config.eval.times], key=int(config.seed),
                                             n_chips=common.cap(config, config.eval.n_chips, TINY_CHIPS),
                                             batch_size=int(config.eval.batch_size),
                                             chip_batch_size=int(config.eval.chip_batch_size) or None,
                                             preprocess=ds.preprocess)
            entry = report.arm(name, model, method, model.param_count(), res, train=_train_info(ctx, arm))
            entry.update(clean_accuracy=clean.mean, drift_compensation=mode, eval_seconds=time.time() - t0,
                         eval_traces=robustness.trace_count() - traces)
            done[name] = entry
            record = report.result_record(config.name, _command(config), list(done.values()),
                                          {"name": "digits" if config.tiny else config.dataset, "split": "test",
                                           "n_images": len(y)})
            report.write_json(path, record)
            ctx.log(f"{name}: " + ", ".join(f"{TIME_NAMES.get(t, t)} {100 * r.mean:.2f}%"
                                             for t, r in zip(config.eval.times, res))
                    + f" ({entry['eval_seconds']:.0f} s, {entry['eval_traces']} trace(s))")
        return {name: [e["mean"] for e in a["eval"]] for name, a in done.items()}
    return run


def stage_report(ctx):
    config = ctx.config
    arms = {}
    for arm in config.arms:
        for a in common.read_json(ctx.result_path("eval", f"{arm}.json"))["arms"]:
            arms[a["name"]] = a
    order = [arm if suffix == "comp" else f"{arm}_nocomp" for suffix in COMPENSATION for arm in config.arms]
    arms = [arms[name] for name in order]
    n_images = arms[0]["eval"][0]["n_images"]
    record = report.result_record(config.name, _command(config), arms,
                                  {"name": "digits" if config.tiny else config.dataset, "split": "test",
                                   "n_images": n_images})
    report.write_json(ctx.result_path("results.json"), record)
    times = [float(t) for t in config.eval.times]
    io_lib.write_text_atomic(ctx.result_path("results.md"), markdown(config, arms, times, n_images))
    plot(config, arms, times, ctx.result_path("accuracy_vs_time.png"))
    return {a["name"]: [e["mean"] for e in a["eval"]] for a in arms}


def _ci_text(e) -> str:
    return f"{100 * e['mean']:.2f} {robustness.format_ci95(e['ci95'])}"


def markdown(config, arms, times, n_images: int) -> str:
    model = "cnn (tiny)" if config.tiny else config.model
    lines = [f"# {model}: accuracy over time under {config.eval.preset}", "",
             f"{arms[0]['eval'][0]['n_chips']} chips, first {n_images} test images; mean % [95% CI], and the "
             f"5th-percentile chip. Clean accuracy on the same images: "
             + ", ".join(f"{a['name']} {100 * a['clean_accuracy']:.2f}%" for a in arms if "nocomp" not in a["name"])
             + ".", "",
             "| time | " + " | ".join(a["name"] for a in arms) + " |",
             "|---|" + "---|" * len(arms)]
    for k, t in enumerate(times):
        cells = [f"{_ci_text(a['eval'][k])} (p5 {100 * a['eval'][k]['p5']:.2f})" for a in arms]
        lines.append(f"| {TIME_NAMES.get(t, f'{t:g} s')} | " + " | ".join(cells) + " |")
    lines += ["", f"Compile count of each {len(times)}-time sweep (traces of the jitted evaluation program): " +
              ", ".join(f"{a['name']} {a['eval_traces']}" for a in arms) +
              " (arms after the first of a compensation mode in a process reuse its program: 0).", "",
              "Evaluation seconds: " + ", ".join(f"{a['name']} {a['eval_seconds']:.0f}" for a in arms) + "."]
    return "\n".join(lines) + "\n"


def plot(config, arms, times, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (no pyplot: no global state)
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    t = np.array(times)
    for a in arms:
        m = np.array([e["mean"] for e in a["eval"]]) * 100
        # ci95 is None (null) with one chip: no band there
        lo = np.array([np.nan if e["ci95"] is None else e["ci95"][0] for e in a["eval"]]) * 100
        hi = np.array([np.nan if e["ci95"] is None else e["ci95"][1] for e in a["eval"]]) * 100
        base = a["name"].replace("_nocomp", "")
        color = {"pretrained": "C0", "clean_ft": "C2", "hwa": "C1"}.get(base, "C3")
        line, = ax.plot(t, m, "--" if "nocomp" in a["name"] else "-", marker="o", color=color, label=a["name"])
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(times, [TIME_NAMES.get(x, f"{x:g}") for x in times])
    ax.set_xlabel("time after programming")
    ax.set_ylabel("test accuracy (%)")
    model = "cnn (tiny)" if config.tiny else config.model
    ax.set_title(f"{model}, {config.eval.preset}, {arms[0]['eval'][0]['n_chips']} chips (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    io_lib.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)


# ---------------------------------------------------------------------------------------------------------------


@protocol("device_drift")
def stages(config) -> list[Stage]:
    trained = _BASE + ("train", "hwa")
    unknown = [a for a in config.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"device_drift: unknown arms {unknown}; choose among {ARMS} (set arms=...).")
    out = [Stage(f"train_{arm}", stage_train(arm), settings=trained,
                 outputs=(f"weights/{arm}.npz", f"metrics/{arm}.jsonl")) for arm in config.arms if arm in TRAINED]
    out += [Stage(f"eval_{arm}", stage_eval(arm), settings=(_BASE if arm == "pretrained" else trained) + ("eval",),
                  outputs=(f"eval/{arm}.json",)) for arm in config.arms]
    out.append(Stage("report", stage_report, settings=None,
                     outputs=("results.json", "results.md", "accuracy_vs_time.png")))
    return out
