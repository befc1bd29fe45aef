"""Protocol ``consistency_quantized``: noise-aware training on a quantized network in the authors' group's convention.

Issue 16's experiment (Hou et al. 2024 in its own regime; ``../shared/PAPERS.md``): a pretrained float model, a
clean n-bit quantization-aware fine-tune (LSQ weights and activations: the reference arm), then noise-aware arms
from that checkpoint under additive noise sigma = eta * max|W_q| of each layer's quantized weights, the standard
normal clipped at +-``noise.truncate``.

Stages (so far):

* ``qat``: the clean QAT fine-tune from the pretrained weights on the training images except the last
  ``held_out`` (kept for searches, never the test split); steps initialised by :func:`jaxnoise.quant.init_steps`
  on ``calib_images`` training images. Writes ``weights/qat.npz`` (variables with the learned steps, model config
  in its metadata), ``qat_metrics.jsonl`` (the training curve).
* ``eval_qat``: the reference on the full test split: noise-free accuracy, and Monte Carlo over ``eval.n_chips``
  chips at ``noise.eta`` (``eval_qat.json``, one MCResult each, with the quantization inside ``weight_noise``).

``tiny=True`` runs the same stages on the digits CNN from random weights with a few steps (the tests).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np

from jaxnoise import checkpoint, data, methods, noise, quant, report, robustness, train
from jaxnoise.experiment import Stage, protocol
from jaxnoise.models import get_model

_DATA = ("tiny", "dataset", "data_dir", "held_out")
_MODEL = ("tiny", "model", "pretrained", "quant", "calib_images")


def dataset(config) -> data.Dataset:
    if config.tiny:
        return data.load_dataset("digits")
    return data.load_dataset(config.dataset, data_dir=config.data_dir or None)


def model_of(config, ds: data.Dataset):
    q = quant.QuantSpec.from_config(config.quant.to_dict())
    if config.tiny:
        return get_model("cnn", input_shape=ds.image_shape, num_classes=ds.num_classes, quant=q)
    return get_model(config.model, num_classes=ds.num_classes, quant=q)


def train_split(config, ds: data.Dataset) -> data.Dataset:
    n = len(ds.train.labels)
    held = min(int(config.held_out), n // 5) if config.tiny else int(config.held_out)
    return dataclasses.replace(ds, train=data.Split(ds.train.images[:n - held], ds.train.labels[:n - held]))


def initial_variables(config, model, ds: data.Dataset):
    """The float starting point with quantizer steps added: the pretrained weights (random ones in tiny mode)."""
    if config.tiny:
        float_model = dataclasses.replace(model, quant=None)
        variables = jax.tree.map(np.asarray, float_model.init(jax.random.key(config.seed)))
        variables = {"params": {k: v for k, v in variables["params"].items()}, "batch_stats": variables["batch_stats"]}
    else:
        if not os.path.exists(config.pretrained):
            raise FileNotFoundError(f"pretrained weights {config.pretrained!r} not found: set pretrained= to the "
                                    f"{config.model} CIFAR-10 .npz (../shared/pretrained).")
        variables = checkpoint.load_variables(config.pretrained, dataclasses.replace(model, quant=None))
    calib = ds.preprocess(data.calibration_images(train_split(config, ds).train, int(config.calib_images),
                                                  seed=config.seed))
    return quant.init_steps(model, variables, calib)


def train_config(config, section) -> train.TrainConfig:
    return train.TrainConfig(epochs=int(section.epochs), batch_size=int(section.batch_size),
                             learning_rate=float(section.lr), weight_decay=float(section.weight_decay),
                             schedule=section.schedule, seed=int(config.seed))


def _max_steps(config):
    return int(config.max_steps) if config.max_steps else None


def stage_qat(ctx):
    config = ctx.config
    ds = dataset(config)
    model = model_of(config, ds)
    variables = initial_variables(config, model, ds)
    workdir = ctx.work_path("train", "")
    out, _ = train.train(model, train_split(config, ds), train_config(config, config.qat), workdir=workdir,
                         variables=variables, loss_fn=methods.clean(model), progress=False,
                         max_steps=_max_steps(config),
                         metadata={"init": "random (tiny)" if config.tiny else config.pretrained,
                                   "method": "clean QAT"})
    meta = {"model": model.name, "model_config": dict(model.config), "stage": "qat", "experiment": config.name}
    checkpoint.save_npz(ctx.result_path("weights", "qat.npz"), out, meta, overwrite=True)
    shutil.copyfile(os.path.join(workdir, "metrics.jsonl"), ctx.result_path("qat_metrics.jsonl"))
    clean = robustness.evaluate(model, out, ds.test.images, ds.test.labels, batch_size=int(config.eval.batch_size),
                                preprocess=ds.preprocess)
    ctx.log(f"qat: clean test accuracy {100 * clean.mean:.2f}%")
    metrics = train.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {"clean_test_accuracy": clean.mean, "steps": metrics[-1].get("step") if metrics else None}


def noise_spec(config, eta) -> noise.NoiseSpec:
    return noise.NoiseSpec(weight_kind="additive_rel_max", weight_eta=float(eta),
                           weight_truncate=float(config.noise.truncate) if config.noise.truncate else None)


def stage_eval_qat(ctx):
    config = ctx.config
    ds = dataset(config)
    model = model_of(config, ds)
    variables = checkpoint.load_variables(ctx.result_path("weights", "qat.npz"), model)
    kw = dict(batch_size=int(config.eval.batch_size), preprocess=ds.preprocess)
    clean = robustness.evaluate(model, variables, ds.test.images, ds.test.labels, **kw)
    mc = robustness.evaluate(model, variables, ds.test.images, ds.test.labels, noise_spec(config, config.noise.eta),
                             key=jax.random.key(int(config.eval.key)), n_chips=int(config.eval.n_chips), **kw)
    record = {"experiment": config.name, "arm": "qat (clean quantization-aware fine-tune)",
              "n_test": int(len(ds.test.labels)), "clean": clean.to_dict(), "noisy": mc.to_dict()}
    report.write_json(ctx.result_path("eval_qat.json"), record)
    ctx.log(f"eval_qat: clean {100 * clean.mean:.2f}%, eta {config.noise.eta}: {100 * mc.mean:.2f}% "
            f"{robustness.format_ci95(mc.ci95)} over {mc.n_chips} chips")
    return {"clean": clean.mean, "noisy_mean": mc.mean, "noisy_ci95": mc.ci95, "n_chips": mc.n_chips}


@protocol("consistency_quantized")
def stages(config) -> list[Stage]:
    return [
        Stage("qat", stage_qat, settings=_DATA + _MODEL + ("seed", "qat", "max_steps"),
              outputs=("weights/qat.npz", "qat_metrics.jsonl")),
        Stage("eval_qat", stage_eval_qat, settings=_DATA + _MODEL + ("seed", "qat", "max_steps", "noise", "eval"),
              outputs=("eval_qat.json",)),
    ]
