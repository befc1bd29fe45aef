#!/usr/bin/env python3
"""Where the clean ResNet-20 train step's time goes on this backend: the whole step against its parts.

Times (median of ``--repeats`` rounds of ``--steps`` calls, after a compiled warm-up; batch ``--batch-size``, the
same random batch every call):

1. ``step``: :func:`jaxnoise.train.make_train_step` with ``methods.clean`` (augmentation, forward, backward,
   BatchNorm statistics, SGD with momentum and weight decay);
2. ``value_and_grad (BN train)``: the loss and its gradient with BatchNorm on batch statistics, nothing else;
3. ``value_and_grad (BN inference)``: the same with BatchNorm on running statistics (no batch moments);
4. ``forward (BN train)``: the loss alone.

``step - grad`` is the optimizer and input pipeline, ``grad (train) - grad (inference)`` the cost of batch
statistics in both passes, ``grad - forward`` the backward pass; ``benchmarks/conv_grad.py`` times the
convolutions alone. Run on an otherwise idle machine.

Usage: python benchmarks/train_step_breakdown.py --log benchmarks/train_step_breakdown_cpu_<date>.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxnoise import methods, train
from jaxnoise.models import get_model
from jaxnoise.report import device_description


def timed(fn, steps, repeats):
    fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - t0) / steps)
    return statistics.median(rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--log", default=None)
    args = p.parse_args(argv)
    model = get_model("resnet20")
    variables = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    raw = jnp.asarray(rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (args.batch_size,)), jnp.int32)
    x = (raw.astype(jnp.float32) / 255.0 - 0.5) / 0.25

    class _Data:   # what make_train_step needs of a dataset: augmentation and preprocessing
        @staticmethod
        def augment(key, images):
            return images

        @staticmethod
        def preprocess(images):
            return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.25

    config = train.TrainConfig(epochs=1, batch_size=args.batch_size)
    optimizer = train.make_optimizer(config, 1000)
    loss_fn = methods.clean(model)
    step = train.make_train_step(model, loss_fn, optimizer, _Data)
    box = {"state": train.init_state(model, variables, optimizer)}
    hparams = methods.check_hparams(loss_fn.hparams, tuple(loss_fn.hparams))

    def run_step():
        box["state"], metrics = step(box["state"], raw, labels, jax.random.key(1), hparams)
        return metrics

    def loss(params, train_mode):
        logits = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=train_mode).logits
        return methods.cross_entropy(logits, labels)

    grad_train = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))
    grad_inf = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))
    fwd = jax.jit(lambda p: loss(p, True))
    params = variables["params"]
    rows = [("step (train.make_train_step, clean)", timed(run_step, args.steps, args.repeats)),
            ("value_and_grad, BN on batch statistics", timed(lambda: grad_train(params), args.steps, args.repeats)),
            ("value_and_grad, BN on running statistics", timed(lambda: grad_inf(params), args.steps, args.repeats)),
            ("forward only, BN on batch statistics", timed(lambda: fwd(params), args.steps, args.repeats))]
    lines = [f"$ python benchmarks/train_step_breakdown.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"jax {jax.__version__}, {device_description()}; ResNet-20, batch {args.batch_size}, median of "
             f"{args.repeats} rounds of {args.steps} calls"]
    for name, t in rows:
        lines.append(f"{name:45s} {1000 * t:8.1f} ms   {args.batch_size / t:7.1f} images/s")
    step_t, g_t, gi_t, f_t = (t for _, t in rows)
    lines += [f"optimizer + pipeline (step - grad):             {1000 * (step_t - g_t):8.1f} ms",
              f"batch statistics (grad train - grad inference): {1000 * (g_t - gi_t):8.1f} ms",
              f"backward (grad - forward):                      {1000 * (g_t - f_t):8.1f} ms"]
    text = "\n".join(lines)
    print(text)
    if args.log:
        with open(args.log, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
