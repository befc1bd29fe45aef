"""The ``jaxnoise`` command line: ``demo``, ``train``, ``denoise``, ``eval``, ``sweep``, ``sensitivity``, ``run`` and
``convert-torch``.

The CLI imports the library; no library module imports the CLI. Every command that reports accuracy under noise
writes a result file in the shared format (``../shared/RESULTS.md``) recording the exact command line.

Examples::

  jaxnoise demo                                     # digits: train a small model, sweep weight noise (< 2 min)
  jaxnoise eval --model resnet20 --weights ../shared/pretrained/resnet20_cifar10.npz --dataset cifar10 \\
      --weight-noise additive_rel_max --weight-eta 0.1 --n-chips 32
  jaxnoise sweep --model resnet20 --weights ../shared/pretrained/resnet20_cifar10.npz --dataset cifar10 \\
      --weight-etas 0,0.02,0.04,0.06,0.08 --n-chips 32 --out runs/sweep_r20
  jaxnoise sweep --model resnet20 --weights ../shared/pretrained/resnet20_cifar10.npz --dataset cifar10 \
      --analog aihwkit_inference_default --times 1,3600,86400,2592000,31536000 --n-chips 32
  jaxnoise train --model resnet20 --weights ../shared/pretrained/resnet20_cifar10.npz --dataset cifar10 \\
      --epochs 2 --lr 0.01 --workdir runs/r20_finetune
  jaxnoise denoise --model resnet20 --weights ../shared/pretrained/resnet20_cifar10.npz --dataset cifar10 \
      --act-eta-train 0.3 --search-budget 0.025 --epochs 1 --workdir runs/r20_denoise
  jaxnoise sensitivity --model resnet20 --weights ../shared/pretrained/resnet20_cifar10.npz --dataset cifar10 \
      --noise weight --scales 0.02,0.05,0.1 --n-chips 8 --out runs/sensitivity_r20
  jaxnoise eval ... --n-chips 16 --target-ci-halfwidth 0.002 --max-chips 1024   # adaptive Monte Carlo
  jaxnoise sweep ... --mesh auto                    # shard chips over every device (jax.sharding)
  jaxnoise sweep ... --distributed --mesh auto      # multi-process: run in every process (TPU pod, GPU nodes)
  jaxnoise convert-torch resnet50.pth resnet50.npz --model resnet50   # a torchvision checkpoint (needs torch)
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shlex
import sys
import time
from importlib import metadata as importlib_metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnoise import analog as analog_lib
from jaxnoise import (
    checkpoint,
    data,
    denoise,
    distributed,
    experiment,
    io,
    methods,
    models,
    noise,
    placement,
    report,
    robustness,
    sensitivity,
    train,
)

DEMO_WEIGHT_ETAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)


class UsageError(ValueError):
    """A command line that cannot be run as written (exit status 2)."""


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,0.05,0.1; got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,0.05,0.1; got {text!r}")
    return values


def _checked(check, parse=float):
    """An argparse type: ``parse`` the text, then the library's own validator ``check(value)`` (the same rule as
    the Python API; its ValueError becomes the usage error)."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from e
        try:
            check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(_bare(e)) from e
        return value
    return convert


_VALUE = "_value_"  # the name given to the library's validators; dropped from their messages


def _bare(e: ValueError) -> str:
    """A validator's message about ``_value_=x`` as a message about ``x`` (argparse names the flag)."""
    return str(e).replace(f"{_VALUE}=", "").rstrip(".")


def _scale(text: str) -> float:
    """A noise scale: finite and >= 0 (``jaxnoise.noise.check_eta``, as ``NoiseSpec`` and ``sweep`` check it)."""
    return _checked(lambda v: noise.check_eta(v, _VALUE))(text)


def _scales(text: str) -> list[float]:
    values = _floats(text)
    for v in values:
        try:
            noise.check_eta(v, _VALUE)
        except ValueError as e:
            raise argparse.ArgumentTypeError(_bare(e)) from e
    return values


def _times(text: str) -> list[float]:
    values = _floats(text)
    try:
        for v in values:
            analog_lib.check_times(v, _VALUE)
    except ValueError as e:
        raise argparse.ArgumentTypeError(_bare(e)) from e
    return values


def _nonnegative(text: str) -> float:
    return _checked(lambda v: noise.check_nonnegative(v, _VALUE, "it is a magnitude", "use 0 for none"))(text)


def _spread(text: str) -> float:
    def check(v):
        if not (np.isfinite(v) and 0 <= v < 1):
            raise ValueError(f"{v!r} must be in [0, 1): the scale is drawn from eta x [1 - s, 1 + s]")
    return _checked(check)(text)


def _positive(text: str) -> float:
    def check(v):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{v!r} must be a finite number > 0")
    return _checked(check)(text)


def _positive_int(text: str) -> int:
    def check(v):
        if v < 1:
            raise ValueError(f"{v} must be an integer >= 1")
    return _checked(check, parse=int)(text)


def _int_at_least_0(text: str) -> int:
    def check(v):
        if v < 0:
            raise ValueError(f"{v} must be an integer >= 0")
    return _checked(check, parse=int)(text)


def _int_at_least_2(text: str) -> int:
    def check(v):
        if v < 2:
            raise ValueError(f"{v} must be an integer >= 2")
    return _checked(check, parse=int)(text)


_ARGV: list[str] = []  # the arguments of the running command, for the record


def _command_line() -> str:
    return "jaxnoise " + " ".join(shlex.quote(a) for a in _ARGV)


def _add_model_args(p: argparse.ArgumentParser, *, default_model: str | None = None) -> None:
    p.add_argument("--model", default=default_model, help=f"one of {', '.join(models.MODELS)}")
    p.add_argument("--weights", help="a .npz of weights: a PyTorch-named state dict (e.g. ../shared/pretrained/"
                                     "resnet20_cifar10.npz) or an experiment's saved arm (records its model)")
    p.add_argument("--checkpoint", help="a training workdir or checkpoint directory written by `jaxnoise train`")
    p.add_argument("--dataset", default=None, help=f"one of {', '.join(data.DATASETS)} (default: digits, or the "
                                                    f"checkpoint's dataset)")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR, then ../shared/tfds)")
    g = p.add_argument_group("streamed datasets (jaxnoise.stream: imagenet2012, or any TFDS name with --streaming)")
    g.add_argument("--streaming", action="store_true",
                   help="stream --dataset from its TFDS records (any prepared TFDS image classification dataset; "
                        "imagenet2012 always streams)")
    g.add_argument("--resolution", type=_positive_int, default=None,
                   help="side of the streamed square images (default 224; the model's input size)")
    g.add_argument("--workers", type=_int_at_least_0, default=None,
                   help="grain worker processes decoding and augmenting (default min(8, CPUs - 1); 0: none)")
    p.add_argument("--seed", type=int, default=0)


def _add_noise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight-noise", default="additive_rel_max", choices=sorted(noise.WEIGHT_KINDS),
                   help="weight-noise kind (default additive_rel_max: sigma = eta * max|W| per layer)")
    p.add_argument("--act-noise", default="additive", choices=sorted(noise.ACTIVATION_KINDS),
                   help="activation-noise kind (default additive: sigma = eta * r_site, r_site calibrated)")
    p.add_argument("--act-statistic", default="std", choices=noise.ACTIVATION_STATISTICS,
                   help="r_site of additive activation noise: std (default) or absmax of the clean output")
    p.add_argument("--sampler", default=None, choices=sorted(noise.SAMPLERS),
                   help="random bits / normal transform of the noise (default per backend and noise: "
                        "jaxnoise.noise.default_sampler; recorded as 'prng' in the result file)")
    p.add_argument("--n-chips", type=_positive_int, default=32, help="Monte Carlo chips (weight-noise draws)")
    p.add_argument("--batch-size", type=_positive_int, default=500, help="images per forward pass")
    p.add_argument("--chip-batch-size", type=_positive_int, default=None,
                   help="chips evaluated at once (lax.map batch_size); default per backend (CPU 1)")
    p.add_argument("--n-images", type=_positive_int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--out", default=None, help="output directory for JSON, markdown and plot (default: a "
                                               "directory under runs/ named after the setting)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the result files in --out (an existing result set is never replaced otherwise)")


def _add_mesh_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices (jax.sharding)")
    g.add_argument("--mesh", default=None,
                   help="shard over devices: 'auto' or CHIPSxDATA, e.g. 4x2 (Monte Carlo: chips over the first "
                        "axis, data batches over the second; 'auto' = jaxnoise.distributed.mc_mesh. train: "
                        "data parallel over every device of the mesh); default: one device")
    g.add_argument("--distributed", action="store_true",
                   help="multi-process launch: call jax.distributed.initialize() first (run the same command in "
                        "every process; only process 0 writes files)")


def build_mesh(args, n_chips: int) -> jax.sharding.Mesh | None:
    """``--mesh``: None (one device), ``auto`` or ``CxD``."""
    text = getattr(args, "mesh", None)
    if text is None:
        return None
    if text == "auto":
        return distributed.mc_mesh(n_chips)
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise UsageError(f"--mesh {text!r}: give 'auto' or CHIPSxDATA such as 8x1 or 4x2.")
    return distributed.make_mesh(int(m.group(1)), int(m.group(2)))


def build_model(name: str, dataset: data.Dataset, config: dict[str, Any] | None = None) -> models.Model:
    """``name`` sized for ``dataset`` (classes; input shape of the small models), with a recorded model config.

    A recorded config with a ``backbone`` (a checkpoint of ``jaxnoise denoise``) rebuilds the denoised model.
    """
    if config and "backbone" in config:
        config = dict(config)
        backbone = build_model(config.pop("backbone"), dataset,
                               {k: v for k, v in config.items() if k not in ("denoiser", "denoiser_sites")})
        return denoise.denoised(backbone, config["denoiser_sites"], denoise.DenoiserConfig(**config["denoiser"]))
    kwargs = dict(config or {})
    kwargs.pop("depth", None)  # part of the name
    kwargs["num_classes"] = dataset.num_classes
    if name in ("mlp", "cnn") or getattr(dataset, "streaming", False):   # streamed: the chosen resolution
        kwargs["input_shape"] = tuple(dataset.image_shape)
    return models.get_model(name, **kwargs)


def _check_stream_flags(args, name: str) -> bool:
    """Whether ``name`` streams; refuses ``--resolution``/``--workers`` for an in-memory dataset."""
    streamed = getattr(args, "streaming", False) or name in data.STREAMED_DATASETS
    if not streamed:
        for flag in ("resolution", "workers"):
            if getattr(args, flag, None) is not None:
                raise UsageError(f"--{flag} counts for streamed datasets only (imagenet2012, or --streaming); "
                                 f"drop it or add --streaming.")
    return streamed


def open_dataset(args, name: str) -> data.Dataset:
    """``name`` in memory, or streamed (imagenet2012, ``--streaming``) with ``--resolution``/``--workers``."""
    if not _check_stream_flags(args, name):
        return data.load_dataset(name, data_dir=args.data_dir)
    kwargs = {k: getattr(args, k) for k in ("resolution", "workers") if getattr(args, k, None) is not None}
    return data.load_dataset(name, data_dir=args.data_dir, streaming=True, **kwargs)


def load_model(args, *, default_model: str | None = None, weights_required: bool = True,
               ) -> tuple[models.Model, dict[str, Any] | None, data.Dataset, dict[str, Any]]:
    """Model, variables, dataset and a description of where the weights came from, from parsed arguments.

    With ``weights_required=False`` (training from scratch) no ``--weights``/``--checkpoint`` gives variables None.
    """
    meta: dict[str, Any] = {}
    # Cheap checks first, in the order of the command line: names, then files; then the dataset and weights.
    if args.model:
        models.get_model(args.model)  # an unknown name raises, listing the known ones
    if args.dataset:
        data.check_supported(args.dataset, streaming=getattr(args, "streaming", False))
        _check_stream_flags(args, args.dataset)
    if args.weights and args.checkpoint:
        raise UsageError("give either --weights or --checkpoint, not both.")
    if args.weights and not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights} does not exist; give a .npz state dict (e.g. "
                         f"../shared/pretrained/resnet20_cifar10.npz).")
    if args.checkpoint:
        if not os.path.isdir(args.checkpoint):
            raise UsageError(f"--checkpoint {args.checkpoint} does not exist; give the --workdir of a "
                             f"`jaxnoise train` or `jaxnoise denoise` run.")
        meta = checkpoint.read_metadata(args.checkpoint)
        if args.model and meta.get("model") and args.model != meta["model"]:
            raise UsageError(f"--model {args.model} but --checkpoint {args.checkpoint} holds a {meta['model']}: "
                             f"drop --model (the checkpoint records it) or give a checkpoint of {args.model}.")
    if args.weights:
        saved = checkpoint.read_npz_metadata(args.weights)   # weights an experiment stage saved (save_npz)
        if saved:
            if args.model and saved.get("model") and args.model != saved["model"]:
                raise UsageError(f"--model {args.model} but --weights {args.weights} holds a {saved['model']}: "
                                 f"drop --model (the file records it).")
            meta = {"model": saved.get("model"), "model_config": saved.get("model_config")}
    name = args.model or meta.get("model") or default_model
    if not name:
        raise UsageError("--model is required (or --checkpoint of a training run that recorded it).")
    dataset_name = args.dataset or meta.get("dataset") or "digits"
    dataset = open_dataset(args, dataset_name)
    model = build_model(name, dataset, meta.get("model_config"))
    if args.weights:
        variables = checkpoint.load_variables(args.weights, model)
        source = {"weights": args.weights}
    elif args.checkpoint:
        variables = checkpoint.load_variables(args.checkpoint, model)
        source = {"checkpoint": args.checkpoint}
    elif weights_required:
        raise UsageError("--weights FILE.npz or --checkpoint DIR is required (train one with "
                         "`jaxnoise train` or use ../shared/pretrained/*.npz).")
    else:
        variables, source = None, {}
    return model, variables, dataset, source


def test_arrays(dataset: data.Dataset, n_images: int | None):
    """``(images, labels)`` of the test split (its first ``n_images``); a streamed split and None."""
    if n_images is not None and n_images < 1:
        raise UsageError(f"--n-images must be >= 1, got {n_images}.")
    if getattr(dataset, "streaming", False):
        return (dataset.test if n_images is None else dataset.test.select(0, n_images)), None
    images, labels = dataset.test.images, dataset.test.labels
    if n_images is not None:
        images, labels = images[:n_images], labels[:n_images]
    return images, labels


def _n(images) -> int:
    return int(len(images))


def calibrate(model, variables, dataset: data.Dataset, statistic: str) -> dict[str, jax.Array]:
    """``r_site`` from 1024 fixed training images (``data.calibration_images``), clean network."""
    images = data.calibration_images(dataset.train, n=1024, seed=0)
    x = jax.jit(dataset.preprocess)(jnp.asarray(images))
    return noise.calibrate_activations(model.apply, variables, x, statistic=statistic)


def build_spec(args, model, variables, dataset, *, weight: bool, act: bool) -> noise.NoiseSpec:
    ref = None
    if act and args.act_noise == "additive":
        # The noise is the hardware's: a denoised model is calibrated on its backbone (the blocks change the
        # activations downstream of them, not the noise level).
        backbone = model.backbone if isinstance(model, denoise.DenoisedModel) else model
        ref = calibrate(backbone, variables, dataset, args.act_statistic)
    return noise.NoiseSpec(weight_kind=args.weight_noise if weight else None,
                           act_kind=args.act_noise if act else None, act_ref=ref, sampler=args.sampler)


def _describe_extra(args, spec: noise.NoiseSpec) -> dict[str, Any]:
    return {"activation_statistic": args.act_statistic if spec.act_kind == "additive" else None,
            "calibration": "1024 training images, data.calibration_images(seed=0)" if spec.act_ref else None}


def result_set(args, setting: str | None) -> io.ResultSet | None:
    """The output directory of a command, checked before any work (exists: refused unless --overwrite; a file,
    not writable or holding other files: refused). ``--out``, or with ``setting`` a default that is unique per
    setting: ``runs/<command>_<model>_<dataset>_<setting>_<hash of every flag>``; None: no output (eval without
    --out). Only process 0 of a multi-process run writes (the others get None)."""
    if not distributed.is_main_process():
        return None
    if args.out is None and setting is None:
        return None
    return io.ResultSet(args.out or default_out(args, setting), overwrite=args.overwrite)


def default_out(args, setting: str) -> str:
    """``runs/<command>_<model>_<dataset>_<setting>_<8 hex digits>``; the digits hash every parsed flag but
    --out/--overwrite, so two settings never share a directory and the same command finds its own again."""
    meta = checkpoint.read_metadata(args.checkpoint) if getattr(args, "checkpoint", None) else {}
    model = getattr(args, "model", None) or meta.get("model") or "model"
    dataset = getattr(args, "dataset", None) or meta.get("dataset") or "digits"
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "out", "overwrite")}
    digest = hashlib.blake2b(json.dumps(flags, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()
    return os.path.join("runs", f"{args.command}_{model}_{dataset}_{setting}_{digest}")


def _write_outputs(record: dict, out: io.ResultSet | None, noise_axis: str | None, *, plot=None,
                   table: str | None = None, into: str | None = None) -> None:
    """Prints the table and writes the result set (results.json, results.md and the plot) as one unit into
    ``out``, or into the already open staging directory ``into``."""
    table = report.markdown_table(record) if table is None else table
    print(table)
    if out is None:
        return

    def write(d: str) -> list[str]:
        report.write_json(os.path.join(d, "results.json"), record)
        io.write_text_atomic(os.path.join(d, "results.md"), table + "\n")
        names = ["results.json", "results.md"]
        if plot is not None:
            names.append(plot(d))
        elif noise_axis is not None:
            report.plot_sweep(record, os.path.join(d, "accuracy_vs_eta.png"), noise=noise_axis)
            names.append("accuracy_vs_eta.png")
        return names

    if into is not None:
        names = write(into)
    else:
        with out.staging() as d:
            names = write(d)
    print(f"wrote {out.path}/{{{','.join(names)}}}")


def _ci_text(r) -> str:
    """``95% CI [a, b]`` in %, or ``no CI (1 chip)``."""
    if r.ci95 is None:
        return f"no CI ({r.n_chips} chip{'s' if r.n_chips != 1 else ''})"
    return f"95% CI [{100 * r.ci95[0]:.2f}, {100 * r.ci95[1]:.2f}]"


def build_device(args) -> analog_lib.AnalogSpec | None:
    """The ``--analog`` preset with ``--no-drift-compensation`` / ``--digital-layers`` applied, or None."""
    if args.device is None:
        if args.times is not None:
            raise UsageError("--times needs --analog (e.g. --analog aihwkit_inference_default).")
        return None
    spec = analog_lib.preset(args.device)
    if args.no_drift_compensation:
        spec = spec.replace(compensation=None)
    if args.digital_layers:
        spec = spec.replace(digital_layers=tuple(f"^{re.escape(n)}$" for n in args.digital_layers.split(",")))
    return spec


def run_device(args, model, variables, dataset, source, spec: noise.NoiseSpec | None,
               out: io.ResultSet | None) -> dict:
    """``--analog``: Monte Carlo accuracy of programmed chips at every ``--times`` (one compiled program)."""
    dev = build_device(args)
    if args.digital_layers:
        layers = model.analog_layers
        unknown = [n for n in args.digital_layers.split(",") if n not in layers]
        if unknown:
            raise UsageError(f"--digital-layers {','.join(unknown)}: no such layer in {model.name}; its layers are "
                             f"{', '.join(layers)}.")
    times = args.times if args.times is not None else [0.0]
    images, labels = test_arrays(dataset, args.n_images)
    calib = None
    if args.recalibrate is not None:   # training images only (the evaluation is on the test split)
        if getattr(dataset, "streaming", False):
            raise UsageError("--recalibrate evaluates in memory: drop --streaming (or --recalibrate).")
        calib = data.calibration_images(dataset.train, n=args.calibration_images, seed=0)
    t0 = time.time()
    results = robustness.evaluate_analog(model, variables, images, labels, dev, times=times,
                                         key=jax.random.key(args.seed), n_chips=args.n_chips, noise=spec,
                                         batch_size=args.batch_size, chip_batch_size=args.chip_batch_size,
                                         preprocess=dataset.preprocess, mesh=build_mesh(args, args.n_chips),
                                         recalibrate=args.recalibrate, calibration_images=calib)
    applied = "" if spec is None else "".join(
        f", {which} noise {d['kind']} eta {d['eta']:g}" for which, d in
        (("weight", spec.describe()["weight_noise"]), ("activation", spec.describe()["activation_noise"])) if d)
    for t, r in zip(times, results):
        print(f"{model.name} on {dataset.name} test ({r.n_images} images), {dev.name}, t = {t:g} s{applied}, "
              f"{r.n_chips} chips: mean {100 * r.mean:.2f}%  {_ci_text(r)}  "
              f"5th-percentile chip {100 * r.p5:.2f}%")
    extra = _describe_extra(args, spec) if spec is not None else {}
    arm = report.arm(args.arm_name or model.name, model.name, args.method, model.param_count(variables), results,
                     train={**source, **extra})
    record = report.result_record(
        args.experiment or f"device_{model.name}_{dataset.name}", _command_line(), [arm],
        {"name": dataset.name, "split": "test", "n_images": _n(images)})
    record["wall_seconds"] = round(time.time() - t0, 1)
    _write_outputs(record, out, "weight" if len(times) > 1 else None)
    return record


def cmd_sweep(args) -> dict:
    if args.device is not None:
        if args.weight_etas is not None or args.act_etas is not None:
            raise UsageError("with --analog the sweep is over --times; drop --weight-etas/--act-etas "
                             "(compose fixed noise with `jaxnoise eval --analog ... --weight-eta ...`).")
        if args.times is None:
            raise UsageError("--analog needs --times, e.g. --times 1,3600,86400,2592000,31536000.")
        out = result_set(args, f"device-{args.device}")
        model, variables, dataset, source = load_model(args)
        return run_device(args, model, variables, dataset, source, None, out)
    if (args.weight_etas is None) == (args.act_etas is None):
        raise UsageError("give exactly one of --weight-etas or --act-etas.")
    weight = args.weight_etas is not None
    out = result_set(args, f"weight-{args.weight_noise}" if weight else f"act-{args.act_noise}")
    model, variables, dataset, source = load_model(args)
    spec = build_spec(args, model, variables, dataset, weight=weight, act=not weight)
    images, labels = test_arrays(dataset, args.n_images)
    t0 = time.time()
    results = robustness.sweep(model, variables, images, labels, spec, weight_etas=args.weight_etas,
                               act_etas=args.act_etas, key=jax.random.key(args.seed), n_chips=args.n_chips,
                               batch_size=args.batch_size, chip_batch_size=args.chip_batch_size,
                               preprocess=dataset.preprocess, mesh=build_mesh(args, args.n_chips))
    arm = report.arm(args.arm_name or model.name, model.name, args.method, model.param_count(variables), results,
                     train={**source, **_describe_extra(args, spec)})
    record = report.result_record(
        args.experiment or f"sweep_{model.name}_{dataset.name}", _command_line(), [arm],
        {"name": dataset.name, "split": "test", "n_images": _n(images)})
    record["wall_seconds"] = round(time.time() - t0, 1)
    _write_outputs(record, out, "weight" if weight else "activation")
    return record


def cmd_eval(args) -> dict:
    weight = args.weight_eta > 0
    act = args.act_eta > 0
    noisy = weight or act
    if args.device is None:
        build_device(args)  # rejects --times without --analog
        if not noisy and args.target_ci_halfwidth is not None:
            raise UsageError("--target-ci-halfwidth needs noise: add --weight-eta or --act-eta > 0.")
    out = result_set(args, None)
    model, variables, dataset, source = load_model(args)
    spec = build_spec(args, model, variables, dataset, weight=weight, act=act)
    spec = spec.replace(weight_eta=args.weight_eta if weight else 0.0, act_eta=args.act_eta if act else 0.0)
    if args.device is not None:
        return run_device(args, model, variables, dataset, source, spec if noisy else None, out)
    images, labels = test_arrays(dataset, args.n_images)
    result = robustness.evaluate(model, variables, images, labels, spec if noisy else None,
                                 key=jax.random.key(args.seed) if noisy else None,
                                 n_chips=args.n_chips if noisy else 1, batch_size=args.batch_size,
                                 chip_batch_size=args.chip_batch_size, preprocess=dataset.preprocess,
                                 mesh=build_mesh(args, args.n_chips) if noisy else None,
                                 target_ci_halfwidth=args.target_ci_halfwidth if noisy else None,
                                 max_chips=args.max_chips if noisy else None)
    std = "" if result.std is None else f"  std {100 * result.std:.2f}"
    print(f"{model.name} on {dataset.name} test ({result.n_images} images), {result.n_chips} chip"
          f"{'s' if result.n_chips != 1 else ''}: mean {100 * result.mean:.2f}%  {_ci_text(result)}{std}  "
          f"5th-percentile chip {100 * result.p5:.2f}%")
    if result.stopping is not None:
        st = result.stopping
        print(f"adaptive: {st['rounds']} rounds of {st['round_chips']} chips; CI half-width "
              f"{100 * st['ci_halfwidth']:.3f} points, target {100 * st['target_ci_halfwidth']:.3f} "
              f"({'met' if st['met_target'] else 'NOT met: cap of ' + str(st['max_chips']) + ' chips reached'})")
    record = report.result_record(
        args.experiment or f"eval_{model.name}_{dataset.name}", _command_line(),
        [report.arm(args.arm_name or model.name, model.name, args.method, model.param_count(variables), [result],
                    train={**source, **_describe_extra(args, spec)})],
        {"name": dataset.name, "split": "test", "n_images": int(result.n_images)})
    if out is not None:
        _write_outputs(record, out, None)
    return record


def cmd_sensitivity(args) -> dict:
    """Per-layer sensitivity map: accuracy with noise at one layer alone, per scale (one compiled program)."""
    weight = args.noise == "weight"
    out = result_set(args, f"{args.noise}-{args.weight_noise if weight else args.act_noise}")
    model, variables, dataset, source = load_model(args)
    spec = build_spec(args, model, variables, dataset, weight=weight, act=not weight)
    layers = None if args.layers is None else [n for n in args.layers.split(",") if n]
    images, labels = test_arrays(dataset, args.n_images)
    t0 = time.time()
    smap = sensitivity.sensitivity_map(model, variables, images, labels, noise=args.noise, scales=args.scales,
                                       key=jax.random.key(args.seed), spec=spec, layers=layers,
                                       n_chips=args.n_chips, batch_size=args.batch_size,
                                       chip_batch_size=args.chip_batch_size,
                                       setting_batch_size=args.setting_batch_size, preprocess=dataset.preprocess,
                                       mesh=build_mesh(args, args.n_chips))
    record = smap.to_record(args.experiment or f"sensitivity_{model.name}_{dataset.name}_{args.noise}",
                            _command_line(), {"name": dataset.name, "split": "test", "n_images": _n(images)},
                            param_count=model.param_count(variables), train={**source, **_describe_extra(args, spec)})
    record["wall_seconds"] = round(time.time() - t0, 1)
    most = ", ".join(f"{name} {100 * acc:.2f}%" for name, acc in smap.ranking()[:3])

    def plot(d: str) -> str:
        smap.plot(os.path.join(d, "sensitivity.png"))
        return "sensitivity.png"
    _write_outputs(record, out, None, plot=plot, table=smap.to_markdown())
    print(f"most sensitive at eta {smap.scales[-1]:g}: {most}")
    return record


def _train_config(args) -> train.TrainConfig:
    return train.TrainConfig(epochs=args.epochs, batch_size=args.train_batch_size, learning_rate=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed)


def _sites(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(s.strip() for s in text.split(",") if s.strip())


def build_loss(args, model, variables, dataset):
    """The loss of ``--method`` with its options (``jaxnoise.methods``)."""
    if args.method == "clean":
        return methods.clean(model)
    act = args.train_act_noise is not None
    ref = None
    if act and args.train_act_noise == "additive":
        if variables is None:
            raise UsageError("additive activation-noise training calibrates r_site on the starting weights: "
                             "give --weights or --checkpoint.")
        ref = calibrate(model, variables, dataset, args.act_statistic)
    dev = None
    if args.train_device is not None:
        # aihwkit's training view: I/O non-idealities (and modifiers), PCM and compensation off.
        dev = analog_lib.preset(args.train_device).training()
        # Layers with learned input ranges (--learn-input-ranges, or a checkpoint that has them) use those.
        if dev.io is not None and dev.io.noise_management == "constant" and not model.input_ranges:
            if variables is None:
                raise UsageError("--train-analog with constant input ranges calibrates them on the starting "
                                 "weights: give --weights or --checkpoint.")
            images = jax.jit(dataset.preprocess)(jnp.asarray(data.calibration_images(dataset.train, n=1024, seed=0)))
            ranges = analog_lib.calibrate_input_ranges(model.apply, variables, np.asarray(images), statistic="absmax",
                                                   alpha=1.0)
            dev = dev.replace(io=dev.io.replace(inp_ranges=ranges))
    weight_kind = None if args.train_weight_noise == "none" else args.train_weight_noise
    kwargs = dict(eta_train=args.eta_train, weight_kind=weight_kind, act_kind=args.train_act_noise,
                  act_eta_train=args.act_eta_train, act_ref=ref, n_draws=args.num_draws,
                  draw_batch_size=args.draw_batch_size, device=dev)
    if args.method == "consistency":
        teacher = checkpoint.load_variables(args.teacher, model) if args.teacher else None
        kwargs.update(lam=args.lam, sites=_sites(args.sites), distance=args.distance, teacher=teacher)
    return methods.make_loss(args.method, model, **kwargs)


def run_workdir(args, setting: str) -> str:
    """``--workdir``, checked before any work (a file, or under a file or read-only folder: refused), or a
    default unique per setting (``default_out`` without --max-steps, so a longer --max-steps continues the run)."""
    if args.workdir is None:
        hashed = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("workdir", "max_steps")})
        return default_out(hashed, setting)
    path = os.path.abspath(os.path.expanduser(args.workdir))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"--workdir {path} is a file, not a directory: give a directory for checkpoints and "
                         f"metrics.jsonl.")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--workdir {path}: {parent} is a file, so the directory cannot be created; choose "
                         f"another --workdir.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--workdir {path}: {parent} is not writable; choose a writable --workdir.")
    return path


def learned_input_ranges(args, model, variables, dataset):
    """``--learn-input-ranges``: ``(model, variables)`` with aihwkit's learned input ranges per tile, initialised
    from data (``jaxnoise.analog.init_input_ranges``, ``init_from_data``: the first batches of 1024 calibration training
    images); a model that has them already (a checkpoint of such a run) keeps its ranges."""
    dev = analog_lib.preset(args.train_device).training()
    if dev.io is None or dev.io.input_range is None:
        raise UsageError(f"--learn-input-ranges: preset {args.train_device} has no learned input ranges "
                         f"(aihwkit's InputRangeParameter); use --train-analog hwa_standard.")
    if model.input_ranges:
        return model, variables
    if variables is None:
        raise UsageError("--learn-input-ranges initialises the ranges from data on the starting weights: give "
                         "--weights or --checkpoint.")
    images = jax.jit(dataset.preprocess)(jnp.asarray(data.calibration_images(dataset.train, n=1024, seed=0)))
    return analog_lib.init_input_ranges(model, variables, dev, np.asarray(images), method="init_from_data",
                                    batch_size=args.train_batch_size)


def cmd_train(args) -> Any:
    workdir = run_workdir(args, args.method)
    model, variables, dataset, _ = load_model(args, default_model="mlp", weights_required=False)
    if args.learn_input_ranges:
        model, variables = learned_input_ranges(args, model, variables, dataset)
    start = args.weights or args.checkpoint
    loss_fn = build_loss(args, model, variables, dataset)
    mesh = None
    if args.mesh is not None:  # data parallel: the batch is split over every device of the mesh
        mesh = distributed.make_mesh() if args.mesh == "auto" else build_mesh(args, 1)
    variables, history = train.train(model, dataset, _train_config(args), workdir=workdir, variables=variables,
                                     loss_fn=loss_fn, max_steps=args.max_steps,
                                     metadata={"init": start, "method": args.method}, mesh=mesh)
    acc = train.evaluate_clean(model, variables, dataset.test, dataset.preprocess)
    print(f"{model.name} on {dataset.name} ({args.method}): clean test accuracy {100 * acc:.2f}%  "
          f"(checkpoints in {workdir})")
    return variables


def cmd_denoise(args) -> Any:
    """Trains denoising blocks on a frozen model under activation noise; optionally searches the placement."""
    workdir = run_workdir(args, args.kind)
    model, variables, dataset, source = load_model(args)
    if isinstance(model, denoise.DenoisedModel):
        raise UsageError("--checkpoint holds a denoised model; give the plain backbone's weights.")
    config = denoise.DenoiserConfig(kind=args.kind, reduction=args.reduction)
    dmodel = denoise.denoised(model, config=config)
    ref = calibrate(model, variables, dataset, args.act_statistic) if args.act_noise == "additive" else None
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=args.act_eta_train, act_kind=args.act_noise, act_ref=ref,
                                    eta_train=args.eta_train, weight_kind=args.train_weight_noise,
                                    feature_weight=args.feature_weight, nll_weight=args.nll_weight,
                                    kl_weight=args.kl_weight, act_eta_spread=args.act_eta_spread)
    dvars = denoise.init_variables(dmodel, variables, noise.name_key(jax.random.key(args.seed), "denoise/init"))
    spec = noise.NoiseSpec(weight_kind=None, act_kind=args.act_noise, act_ref=ref,
                           act_eta=args.act_eta if args.act_eta is not None else args.act_eta_train)
    if args.search_budget is not None:
        train_part, held_out = data.holdout(dataset.train, args.search_holdout)
        if getattr(dataset, "streaming", False):   # the selection set is small: decoded into memory
            held_out = held_out.materialize()
        result = placement.search(dmodel, dvars, dataset, loss_fn, held_out.images, held_out.labels, spec,
                                  budget=args.search_budget, key=noise.name_key(jax.random.key(args.seed),
                                                                                "denoise/search"),
                                  strategy=args.strategy, beam_width=args.beam_width, steps=args.search_steps,
                                  n_chips=args.search_chips, split=train_part, log=print)
        gates = np.asarray(result.best["gates"], np.float32)
        print(f"searched placement: {result.best['sites']} ({100 * result.best['param_overhead']:.2f}% params)")
    else:
        if not args.placement:
            raise UsageError("give --placement SITES (comma-separated, 'every-block' or 'all') or "
                             "--search-budget FRACTION.")
        if args.placement == "all":
            gates = np.ones(len(dmodel.candidate_sites), np.float32)
        elif args.placement == "every-block":
            gates = placement.every_block_placement(dmodel)
        else:
            gates = np.asarray(denoise.placement_array(dmodel, list(_sites(args.placement))))
    dvars = denoise.with_placement(dmodel, dvars, gates)
    cost = denoise.overhead(dmodel, gates)
    dvars, _ = denoise.train_denoisers(dmodel, dataset, _train_config(args), workdir=workdir, variables=dvars,
                                       loss_fn=loss_fn, max_steps=args.max_steps,
                                       metadata={"init": source, "act_statistic": args.act_statistic})
    key = jax.random.key(args.seed)
    images, labels = test_arrays(dataset, args.n_images)
    plain = robustness.evaluate(model, variables, images, labels, spec, key=key, n_chips=args.n_chips,
                                batch_size=args.batch_size, preprocess=dataset.preprocess)
    den = robustness.evaluate(dmodel, dvars, images, labels, spec, key=key, n_chips=args.n_chips,
                              batch_size=args.batch_size, preprocess=dataset.preprocess)
    print(f"{model.name} + denoisers at {[s for s, g in zip(dmodel.candidate_sites, gates) if g]} "
          f"({100 * cost['param_overhead']:.2f}% params): act eta {float(spec.act_eta)}, {args.n_chips} chips: "
          f"plain {100 * plain.mean:.2f}% {_ci_text(plain)}, denoised {100 * den.mean:.2f}% {_ci_text(den)} "
          f"(checkpoints in {workdir})")
    return dmodel, dvars


def cmd_run(args) -> dict:
    config = experiment.apply_overrides(experiment.load_config(args.config), args.overrides)
    split = (lambda v: [x for x in v.split(",") if x] if v else [])
    stages = experiment.stages_of(config)
    if args.list:
        for stage, action in experiment.plan(config, stages, experiment.results_dir_of(config), split(args.rerun)):
            print(f"{stage.name:20s} {action}")
        return {}
    return experiment.run(config, stages, only=split(args.only) or None, rerun=split(args.rerun))


def cmd_convert_torch(args) -> dict:
    """A PyTorch checkpoint (``.pth``) to the PyTorch-named ``.npz`` of ``--weights`` (torch needed here only)."""
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"{args.checkpoint} does not exist; give a .pth file saved with torch.save(model.state_dict()).")
    model = None
    if args.model:
        kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
        model = models.get_model(args.model, **kwargs)
    try:
        arrays = models.torch_checkpoint_to_npz(args.checkpoint, args.out, model, overwrite=args.overwrite)
    except (ImportError, FileExistsError) as e:
        raise UsageError(str(e)) from None
    checked = f", checked against {model.name} ({model.param_count():,} parameters)" if model is not None else ""
    print(f"wrote {args.out}: {len(arrays)} tensors{checked}")
    return {"out": args.out, "tensors": len(arrays)}


def cmd_demo(args) -> dict:
    """Trains a small model on the embedded digits dataset, then sweeps weight noise over it.

    ``--out`` is one unit: the training run (``train/``) and the result files appear together."""
    out = io.ResultSet(args.out, overwrite=args.overwrite)
    dataset = data.load_dataset("digits")
    model = build_model(args.model, dataset)
    config = train.TrainConfig(epochs=args.epochs, batch_size=64, learning_rate=0.05, seed=args.seed)
    t0 = time.time()
    with out.staging() as d:
        variables, _ = train.train(model, dataset, config, workdir=os.path.join(d, "train"),
                                   progress=not args.quiet)
        clean = train.evaluate_clean(model, variables, dataset.test, dataset.preprocess)
        print(f"trained {model.name} on digits in {time.time() - t0:.0f} s: clean test accuracy "
              f"{100 * clean:.2f}%")
        spec = noise.NoiseSpec(weight_kind="additive_rel_max")
        results = robustness.sweep(model, variables, dataset.test.images, dataset.test.labels, spec,
                                   weight_etas=list(DEMO_WEIGHT_ETAS), key=jax.random.key(args.seed),
                                   n_chips=args.n_chips, batch_size=512, preprocess=dataset.preprocess)
        arm = report.arm(model.name, model.name, "clean", model.param_count(variables), results,
                         train={"epochs": args.epochs, "seed": args.seed, "workdir": os.path.join(out.path, "train")})
        record = report.result_record("demo_digits", _command_line(), [arm],
                                      {"name": "digits", "split": "test", "n_images": int(len(dataset.test.labels))})
        _write_outputs(record, out, "weight", into=d)
    print(f"demo finished in {time.time() - t0:.0f} s")
    return record


def _version() -> str:
    try:
        return importlib_metadata.version("jaxnoise")
    except importlib_metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and a "did you mean" for mistyped subcommands and flags."""

    def error(self, message: str):
        hint = ""
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'?([\w./-]+)'?", m.group(2))
            hint = _suggest(m.group(1), choices)
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            options = self._all_options()
            for token in m.group(1).split():
                if token.startswith("-"):
                    hint = _suggest(token.split("=")[0], options)
                    if hint:
                        break
        prog = self.prog if not _ARGV or _ARGV[0] not in getattr(self, "commands", {}) else f"{self.prog} {_ARGV[0]}"
        self.exit(2, f"{prog}: error: {message.rstrip('.')}{hint}; see `{prog} --help`.\n")

    def _all_options(self) -> list[str]:
        """The option strings of the command being parsed (the subcommand's when there is one)."""
        parser = getattr(self, "commands", {}).get(_ARGV[0] if _ARGV else None, self)
        return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxnoise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"jaxnoise {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, allow_abbrev=False, **k)  # no prefix matching: exact flags only
    parser.commands = sub.choices

    p = sub.add_parser("demo", help="train a small model on digits and sweep weight noise (the main job)")
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--epochs", type=_positive_int, default=30)
    p.add_argument("--n-chips", type=_positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="jaxnoise_out/demo")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="training / fine-tuning (clean, forward_noise, consistency), resumable")
    _add_model_args(p)
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--train-batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_nonnegative, default=0.1)
    p.add_argument("--weight-decay", type=_nonnegative, default=5e-4)
    p.add_argument("--workdir", default=None, help="checkpoints and metrics.jsonl; an existing one is resumed")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps (schedule unchanged)")
    _add_mesh_args(p)
    g = p.add_argument_group("noise-aware training (jaxnoise.methods)")
    g.add_argument("--method", default="clean", choices=methods.METHODS)
    g.add_argument("--eta-train", type=_scale, default=0.1, help="weight-noise scale during training")
    g.add_argument("--train-weight-noise", default="additive_rel_max", choices=sorted(noise.WEIGHT_KINDS) + ["none"],
                   help="weight-noise kind during training (default additive_rel_max: sigma = eta * max|W|)")
    # dests stay "train_device" and "num_draws": every parsed flag is hashed into the default work dir (default_out)
    g.add_argument("--train-analog", dest="train_device", default=None, choices=sorted(analog_lib.PRESETS),
                   help="hardware-aware training under an analog preset's training view (I/O non-idealities with "
                        "straight-through quantisers; constant input ranges = max|x| of the starting weights)")
    # the old name of --train-analog (before issue 19), kept so old command lines run; hidden from --help
    g.add_argument("--train-device", dest="train_device", default=None, choices=sorted(analog_lib.PRESETS),
                   help=argparse.SUPPRESS)
    g.add_argument("--learn-input-ranges", action="store_true",
                   help="with --train-analog hwa_standard: learn aihwkit's input ranges per tile (InputRange"
                        "Parameter: initialised from data, clip gradient, decay), saved in the checkpoint and used "
                        "by eval/sweep --analog hwa_standard")
    g.add_argument("--train-act-noise", default=None, choices=sorted(noise.ACTIVATION_KINDS),
                   help="also inject activation noise of this kind (off by default)")
    g.add_argument("--act-eta-train", type=_scale, default=0.0)
    g.add_argument("--act-statistic", default="std", choices=noise.ACTIVATION_STATISTICS)
    g.add_argument("--n-draws", dest="num_draws", type=_positive_int, default=1,
                   help="K, noise draws per step (averaged)")
    g.add_argument("--num-draws", dest="num_draws", type=_positive_int, default=1, help=argparse.SUPPRESS)
    g.add_argument("--draw-batch-size", type=_positive_int, default=None, help="draws run at once (vmap); default per backend")
    g.add_argument("--lam", type=_nonnegative, default=1.0, help="consistency weight lambda")
    g.add_argument("--sites", default=None, help="consistency feature sites, comma-separated (default: all "
                                                 "named features; 'logits' for the output)")
    g.add_argument("--distance", default="nmse", choices=sorted(methods.DISTANCES))
    g.add_argument("--teacher", default=None, help="frozen teacher weights (.npz or workdir) for the clean "
                                                   "features; default: the trained weights with noise off")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("denoise", help="train denoising blocks on a frozen model (Azizi et al. 2024), resumable")
    _add_model_args(p)
    p.add_argument("--placement", default=None, help="sites, comma-separated (e.g. layer3/0,layer2/2), "
                                                     "'every-block' or 'all'")
    p.add_argument("--search-budget", type=_positive, default=None,
                   help="search the placement under this parameter budget (fraction, e.g. 0.025) first")
    p.add_argument("--strategy", default="greedy", choices=placement.STRATEGIES)
    p.add_argument("--beam-width", type=_positive_int, default=2)
    p.add_argument("--search-steps", type=_positive_int, default=50, help="brief training steps of each candidate")
    p.add_argument("--search-chips", type=_positive_int, default=4)
    p.add_argument("--search-holdout", type=_positive_int, default=1000,
                   help="last N training images: the search's selection set (excluded from its training)")
    p.add_argument("--kind", default="residual", choices=denoise.KINDS)
    # Defaults: the winner of the ablation (experiments/configs/denoise_ablation_resnet20.py, variant "spread").
    p.add_argument("--reduction", type=_positive_int, default=10,
                   help="bottleneck width = max(4, ceil(C / reduction)); default 10 (after every residual block of "
                        "ResNet-20: 2.39%% more parameters)")
    p.add_argument("--act-noise", default="additive", choices=sorted(noise.ACTIVATION_KINDS))
    p.add_argument("--act-statistic", default="std", choices=noise.ACTIVATION_STATISTICS)
    p.add_argument("--act-eta-train", type=_scale, default=0.3, help="activation-noise scale of training")
    p.add_argument("--act-eta-spread", type=_spread, default=0.33,
                   help="each step draws its training scale uniformly from act-eta-train x [1 - s, 1 + s]; "
                        "default 0.33 (robust to the level), 0 = fixed")
    p.add_argument("--act-eta", type=_scale, default=None, help="evaluation scale (default: --act-eta-train)")
    p.add_argument("--train-weight-noise", default=None, choices=sorted(noise.WEIGHT_KINDS),
                   help="also train under weight noise of this kind (off by default)")
    p.add_argument("--eta-train", type=_scale, default=0.0)
    p.add_argument("--feature-weight", type=_nonnegative, default=0.0, help="feature matching to the clean backbone")
    p.add_argument("--nll-weight", type=_nonnegative, default=0.0, help="noise likelihood (probabilistic blocks)")
    p.add_argument("--kl-weight", type=_nonnegative, default=0.0, help="KL to the clean backbone's predictions")
    p.add_argument("--epochs", type=_positive_int, default=10,
                   help="cosine schedule over this many epochs (default 10: the ablation's curves still rose at 10)")
    p.add_argument("--train-batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_nonnegative, default=0.02)
    p.add_argument("--weight-decay", type=_nonnegative, default=0.0)
    p.add_argument("--workdir", default=None, help="checkpoints and metrics.jsonl; an existing one is resumed")
    p.add_argument("--max-steps", type=_positive_int, default=None)
    p.add_argument("--n-chips", type=_positive_int, default=8, help="Monte Carlo chips of the final evaluation")
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--n-images", type=_positive_int, default=None, help="evaluate on the first N test images only")
    p.set_defaults(func=cmd_denoise)

    for name, func, help_ in (("eval", cmd_eval, "Monte Carlo accuracy under one noise setting"),
                              ("sweep", cmd_sweep, "Monte Carlo accuracy over a grid of noise scales")):
        p = sub.add_parser(name, help=help_)
        _add_model_args(p)
        _add_noise_args(p)
        p.add_argument("--experiment", default=None, help="experiment name recorded in the result file")
        p.add_argument("--arm-name", default=None)
        p.add_argument("--method", default="clean", help="training method of these weights, for the record")
        g = p.add_argument_group("analog device (jaxnoise.analog)")
        # dest stays "device": every parsed flag is hashed into the default output directory (default_out)
        g.add_argument("--analog", dest="device", default=None, choices=sorted(analog_lib.PRESETS),
                       help="analog device preset: PCM programming/drift/read noise and MVM I/O non-idealities")
        # the old name of --analog (before issue 19), kept so old command lines run; hidden from --help
        g.add_argument("--device", dest="device", default=None, choices=sorted(analog_lib.PRESETS),
                       help=argparse.SUPPRESS)
        g.add_argument("--times", type=_times, default=None,
                       help="inference times in s after programming, e.g. 1,3600,86400,2592000,31536000 "
                            "(one compiled program for all; eval default 0)")
        g.add_argument("--no-drift-compensation", action="store_true", help="turn the preset's compensation off")
        g.add_argument("--digital-layers", default=None, help="layers kept digital, comma-separated (e.g. conv1,fc)")
        g.add_argument("--recalibrate", default=None, choices=sorted(robustness.RECALIBRATIONS),
                       help="after each read: re-estimate BatchNorm statistics through the chip on "
                            "--calibration-images training images, then evaluate (not in aihwkit)")
        g.add_argument("--calibration-images", type=_positive_int, default=256,
                       help="training images of --recalibrate (data.calibration_images, seed 0; default 256)")
        _add_mesh_args(p)
        if name == "eval":
            p.add_argument("--weight-eta", type=_scale, default=0.0)
            p.add_argument("--act-eta", type=_scale, default=0.0)
            g = p.add_argument_group("adaptive Monte Carlo")
            g.add_argument("--target-ci-halfwidth", type=_positive, default=None,
                           help="draw rounds of --n-chips chips until the 95%% CI half-width of the mean accuracy "
                                "is at most this (a fraction: 0.002 = +/-0.2 points)")
            g.add_argument("--max-chips", type=_int_at_least_2, default=None, help="cap of the adaptive run (default 64 rounds)")
        else:
            p.add_argument("--weight-etas", type=_scales, default=None, help="e.g. 0,0.05,0.1,0.15,0.2")
            p.add_argument("--act-etas", type=_scales, default=None, help="e.g. 0,0.1,0.2,0.4")
        p.set_defaults(func=func)

    p = sub.add_parser("run", help="an experiment config (experiments/configs/NAME.py): its stages, cached and "
                                   "resumable")
    p.add_argument("config", help="a config file with get_config(), e.g. experiments/configs/"
                                  "consistency_resnet32_q4.py")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, Python literal), e.g. --set qat.epochs=3; repeatable")
    p.add_argument("--only", default=None, help="run only these stages (comma-separated); earlier ones must be done")
    p.add_argument("--rerun", default=None, help="run these stages (and every later one) again, comma-separated; their old outputs move to superseded/. An interrupted rerun resumes without --rerun")
    p.add_argument("--list", action="store_true", help="list the stages and whether each is cached, run nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("convert-torch", help="a PyTorch .pth state dict to the .npz that --weights reads (needs torch)")
    p.add_argument("checkpoint", help="the .pth/.pt file (a state_dict, or a dict holding one under 'state_dict' "
                                      "or 'model')")
    p.add_argument("out", help="the .npz to write")
    p.add_argument("--model", default=None, help=f"check every key and shape against this model first (one of "
                                                 f"{', '.join(models.MODELS)})")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="the model's classes (default 1000 for "
                                                                           "ImageNet ResNets, 10 for CIFAR ones)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_convert_torch)

    p = sub.add_parser("sensitivity", help="per-layer sensitivity map: noise at one layer alone, per scale")
    _add_model_args(p)
    _add_noise_args(p)
    _add_mesh_args(p)
    p.set_defaults(n_chips=8)
    p.add_argument("--noise", default="weight", choices=sensitivity.NOISE_TYPES,
                   help="weight noise (kind --weight-noise) or activation noise (kind --act-noise)")
    p.add_argument("--scales", type=_scales, required=True, help="noise scales, e.g. 0.02,0.05,0.1")
    p.add_argument("--layers", default=None, help="layers, comma-separated (default: every analog layer)")
    p.add_argument("--setting-batch-size", type=_positive_int, default=1,
                   help="(layer, scale) cells evaluated at once (vmap); 1 maps them one after another")
    p.add_argument("--experiment", default=None, help="experiment name recorded in the result file")
    p.set_defaults(func=cmd_sensitivity)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Flags that count only in some settings: given where they have no effect, they are refused (with the flag that
# would make them count), never ignored.

def _noisy_method(a) -> bool:
    return a.method != "clean"


_TRAIN_NOISE = "--method forward_noise or --method consistency"
# command -> [(dest, counts(args), what makes it count)]
_RULES: dict[str, list[tuple[str, Any, str]]] = {
    "train": [
        ("eta_train", lambda a: _noisy_method(a) and a.train_weight_noise != "none",
         f"{_TRAIN_NOISE} (with a --train-weight-noise kind)"),
        ("train_weight_noise", _noisy_method, _TRAIN_NOISE),
        ("train_device", _noisy_method, _TRAIN_NOISE),
        ("learn_input_ranges", lambda a: a.train_device is not None, "--train-analog PRESET"),
        ("train_act_noise", _noisy_method, _TRAIN_NOISE),
        ("num_draws", _noisy_method, _TRAIN_NOISE),
        ("draw_batch_size", _noisy_method, _TRAIN_NOISE),
        ("act_eta_train", lambda a: a.train_act_noise is not None, "--train-act-noise additive|multiplicative"),
        ("act_statistic", lambda a: a.train_act_noise == "additive", "--train-act-noise additive"),
        ("lam", lambda a: a.method == "consistency", "--method consistency"),
        ("sites", lambda a: a.method == "consistency", "--method consistency"),
        ("distance", lambda a: a.method == "consistency", "--method consistency"),
        ("teacher", lambda a: a.method == "consistency", "--method consistency"),
    ],
    "eval": [
        ("weight_noise", lambda a: a.weight_eta > 0, "--weight-eta > 0"),
        ("act_noise", lambda a: a.act_eta > 0, "--act-eta > 0"),
        ("act_statistic", lambda a: a.act_eta > 0 and a.act_noise == "additive", "--act-eta > 0 (additive)"),
        ("n_chips", lambda a: a.weight_eta > 0 or a.act_eta > 0 or a.device is not None,
         "--weight-eta, --act-eta > 0 or --analog (a noise-free evaluation is one exact pass)"),
        ("chip_batch_size", lambda a: a.weight_eta > 0 or a.act_eta > 0 or a.device is not None,
         "--weight-eta, --act-eta > 0 or --analog"),
        ("sampler", lambda a: a.weight_eta > 0 or a.act_eta > 0, "--weight-eta or --act-eta > 0"),
        ("max_chips", lambda a: a.target_ci_halfwidth is not None, "--target-ci-halfwidth"),
        ("times", lambda a: a.device is not None, "--analog PRESET"),
        ("no_drift_compensation", lambda a: a.device is not None, "--analog PRESET"),
        ("digital_layers", lambda a: a.device is not None, "--analog PRESET"),
        ("recalibrate", lambda a: a.device is not None, "--analog PRESET"),
        ("calibration_images", lambda a: a.recalibrate is not None, "--recalibrate batch_norm"),
    ],
    "sweep": [
        ("weight_noise", lambda a: a.weight_etas is not None and a.device is None, "--weight-etas"),
        ("act_noise", lambda a: a.act_etas is not None and a.device is None, "--act-etas"),
        ("act_statistic", lambda a: a.act_etas is not None and a.act_noise == "additive" and a.device is None,
         "--act-etas (additive)"),
        ("sampler", lambda a: a.device is None, "--weight-etas or --act-etas (an --analog sweep draws its own "
                                                "I/O noise)"),
        ("times", lambda a: a.device is not None, "--analog PRESET"),
        ("no_drift_compensation", lambda a: a.device is not None, "--analog PRESET"),
        ("digital_layers", lambda a: a.device is not None, "--analog PRESET"),
        ("recalibrate", lambda a: a.device is not None, "--analog PRESET"),
        ("calibration_images", lambda a: a.recalibrate is not None, "--recalibrate batch_norm"),
    ],
    "sensitivity": [
        ("weight_noise", lambda a: a.noise == "weight", "--noise weight"),
        ("act_noise", lambda a: a.noise == "activation", "--noise activation"),
        ("act_statistic", lambda a: a.noise == "activation" and a.act_noise == "additive",
         "--noise activation (additive)"),
    ],
    "denoise": [
        ("eta_train", lambda a: a.train_weight_noise is not None, "--train-weight-noise KIND"),
        ("act_statistic", lambda a: a.act_noise == "additive", "--act-noise additive"),
        ("nll_weight", lambda a: a.kind == "probabilistic", "--kind probabilistic"),
        ("strategy", lambda a: a.search_budget is not None, "--search-budget FRACTION"),
        ("beam_width", lambda a: a.search_budget is not None and a.strategy == "beam",
         "--search-budget FRACTION --strategy beam"),
        ("search_steps", lambda a: a.search_budget is not None, "--search-budget FRACTION"),
        ("search_chips", lambda a: a.search_budget is not None, "--search-budget FRACTION"),
        ("search_holdout", lambda a: a.search_budget is not None, "--search-budget FRACTION"),
        ("placement", lambda a: a.search_budget is None, "no --search-budget (the search chooses the placement)"),
    ],
}


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """``{dest: flag}`` of the options written on the command line (``--flag value`` or ``--flag=value``)."""
    command = parser.commands.get(argv[0]) if argv else None
    table = (command or parser)._option_string_actions
    given = {}
    for token in argv[1:]:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if flag in table:
            given[table[flag].dest] = flag
    return given


def check_flags(args, given: dict[str, str]) -> None:
    """Refuses flags that have no effect in the chosen setting (``_RULES``), naming what would make them count."""
    for dest, counts, needs in _RULES.get(args.command, []):
        if dest in given and not counts(args):
            raise UsageError(f"{given[dest]} has no effect here: it counts with {needs}; add that, or drop "
                             f"{given[dest]}.")


def _xla_out_of_memory(e: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)


def main(argv: list[str] | None = None) -> int:
    """Runs one command. Exit status: 0 done, 2 a usage error (bad flag, value, input or output location; one
    line on stderr naming the problem and the fix), 1 a failure while running (out of memory, I/O), 130
    interrupted (Ctrl-C; what was saved and how to resume is said)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _ARGV[:] = argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        check_flags(args, given_flags(parser, argv))
        if getattr(args, "distributed", False):
            distributed.initialize()
        args.func(args)
    except robustness.InsufficientMemoryError as e:
        print(f"jaxnoise {args.command}: error: this run needs an estimated {_gb(e.estimate)} of memory but "
              f"{_gb(e.available)} is free: lower --chip-batch-size or --batch-size, or use fewer --n-chips "
              f"(--target-ci-halfwidth draws chips in rounds of --n-chips).", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        detail = str(e) or "interrupted; no result files were written (existing results are unchanged)"
        print(f"jaxnoise {args.command}: {detail}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, NotImplementedError,
            checkpoint.CheckpointError, models.WeightsMismatchError) as e:
        print(f"jaxnoise {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError as e:
        print(f"jaxnoise {args.command}: error: out of memory ({_one_line(e)}); lower --batch-size or "
              f"--chip-batch-size.", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"jaxnoise {args.command}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - XLA's runtime errors have no public class on every version
        if _xla_out_of_memory(e):
            print(f"jaxnoise {args.command}: error: the accelerator ran out of memory; lower --batch-size or "
                  f"--chip-batch-size.", file=sys.stderr)
            return 1
        raise
    return 0


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.3g} GB"


def _one_line(e: BaseException) -> str:
    """The message of ``e``; multi-line messages (lists of mismatches) are kept, indented, after the first."""
    return str(e).strip() or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
