#!/usr/bin/env python3
"""Per-operation profile of the ResNet-20 train-mode gradient (batch 128) on this backend, grouped by XLA op kind.

Traces ``--steps`` calls of ``jax.value_and_grad`` of the cross-entropy with BatchNorm on batch statistics
(``jax.profiler.trace(..., create_perfetto_trace=True)``), sums the duration of every executed XLA thunk by its
fusion kind (``ynn_fusion`` = convolutions and dots, ``transpose_copy_fusion`` = layout changes, the rest
elementwise and reductions), and prints the kinds with the operations each one fuses, per call. With
``--compare`` it profiles twice, with and without ``jaxnoise.models.layers.MATERIALIZE_CONV_INPUTS`` (the input of
every train-mode convolution computed into its own buffer), which shows what the switch is for: without it XLA:CPU
fuses the BatchNorm/ReLU/residual chain into the (C, H, W, N) transposes of the kernel gradients and recomputes it
with strided reads. Run on an otherwise idle machine.

Usage: python benchmarks/train_step_profile.py --compare --log benchmarks/train_step_profile_cpu_<date>.txt
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxnoise import methods, train
from jaxnoise.models import get_model, layers
from jaxnoise.report import device_description


def _fused_ops(hlo: str) -> dict[str, str]:
    """fusion instruction name -> the sorted set of HLO ops its computation holds."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%(\S+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S)}
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = \S+ fusion\(.*?\), kind=\w+, calls=%([\w.\-]+)", hlo, re.M):
        ops = sorted(set(re.findall(r"= \S+ ([a-z][\w-]*)\(", bodies.get(m.group(2), ""))) - {"parameter", "constant"})
        out[m.group(1)] = ",".join(ops)
    return out


class _Data:   # what make_train_step needs of a dataset: augmentation and preprocessing (none: a fixed batch)
    image_shape = (32, 32, 3)

    @staticmethod
    def augment(key, images):
        return images

    @staticmethod
    def preprocess(images):
        return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.25


def profile(steps: int, what: str) -> tuple[float, list[tuple[str, str, float, int]]]:
    model = get_model("resnet20")
    v = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    raw = jnp.asarray(rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, (128,)), jnp.int32)
    if what == "grad":
        x = _Data.preprocess(raw)

        def loss(p):
            return methods.cross_entropy(model.apply({**v, "params": p}, x, train=True)[0], y)

        fn = jax.jit(jax.value_and_grad(loss))
        args = (v["params"],)
    else:   # the whole train step of jaxnoise.train, clean or forward-noise
        loss_fn = methods.clean(model) if what == "step" else methods.forward_noise(model, eta_train=0.1)
        optimizer = train.make_optimizer(train.TrainConfig(epochs=1, batch_size=128), 1000)
        fn = train.make_train_step(model, loss_fn, optimizer, _Data)
        args = (train.init_state(model, v, optimizer), raw, y, jax.random.key(1),
                methods.check_hparams(loss_fn.hparams, tuple(loss_fn.hparams)))
    jax.block_until_ready(fn(*args))
    fused = _fused_ops(fn.lower(*args).compile().as_text())
    t0 = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(fn(*args))
    wall = (time.perf_counter() - t0) / steps
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(fn(*args))
        trace = json.load(gzip.open(sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))[-1]))
    total, count = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in fused:
            continue
        kind = (re.sub(r"\.\d+$", "", name), fused[name])
        total[kind] += e["dur"] / 1000 / steps
        count[kind] += 1
    rows = [(k[0], k[1], t, count[k] // steps) for k, t in total.most_common()]
    return wall, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--compare", action="store_true", help="profile with and without MATERIALIZE_CONV_INPUTS")
    p.add_argument("--what", default="grad", choices=("grad", "step", "forward_noise_step"),
                   help="grad: value_and_grad of the loss; step / forward_noise_step: train.make_train_step")
    p.add_argument("--log", default=None)
    args = p.parse_args(argv)
    lines = [f"$ python benchmarks/train_step_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"jax {jax.__version__}, {device_description()}; ResNet-20 {args.what}, batch 128, BatchNorm on "
             f"batch statistics; wall: mean of {args.steps} untraced calls; ops: ms per call, mean of {args.steps} "
             f"traced calls"]
    settings = [True, False] if args.compare else [None]
    for flag in settings:
        layers.MATERIALIZE_CONV_INPUTS = flag
        wall, rows = profile(args.steps, args.what)
        fused_total = sum(r[2] for r in rows)
        lines.append("")
        lines.append(f"MATERIALIZE_CONV_INPUTS={flag} (materialized: {layers.materialize_conv_inputs()}): "
                     f"{1000 * wall:.1f} ms per call (wall), {fused_total:.1f} ms in fusions (traced)")
        for kind, ops, t, n in rows[:args.top]:
            lines.append(f"  {t:7.1f} ms  x{n:3d}  {kind:26s} {ops[:80]}")
        by_kind = collections.Counter()
        for kind, _, t, _ in rows:
            by_kind[kind] += t
        lines.append("  by kind: " + ", ".join(f"{k} {t:.1f}" for k, t in by_kind.most_common(4)))
    layers.MATERIALIZE_CONV_INPUTS = None
    text = "\n".join(lines)
    print(text)
    if args.log:
        with open(args.log, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
