#!/usr/bin/env python3
"""The clean ResNet-20 train step (batch 128, median of 5 rounds of 3 steps) with each way of giving a train-mode
convolution's input a buffer of its own (``jaxnoise.models.layers.materialized``): the identity product (``dot``,
the library's), a 1x1 max reduce-window (``rw``), a dynamic-update-slice into zeros (``dus``), and none (``off``).
Run on an otherwise idle machine.

Usage: python benchmarks/materialize_variants.py [dot rw dus off] [--log FILE]
"""
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnoise import methods, train
from jaxnoise.models import get_model, layers


def make(kind):
    @jax.custom_vjp
    def m(x):
        if kind == "dot":
            return jnp.einsum("...c,cd->...d", x, jnp.eye(x.shape[-1], dtype=x.dtype), precision=lax.Precision.HIGHEST)
        if kind == "rw":
            return lax.reduce_window(x, -jnp.inf, lax.max, (1,) * x.ndim, (1,) * x.ndim, "VALID")
        if kind == "dus":
            return lax.dynamic_update_slice(jnp.zeros_like(x), x, (0,) * x.ndim)
        return x
    m.defvjp(lambda x: (m(x), None), lambda _, g: (g,))
    return m

def time_step(kind):
    layers.materialized = make(kind)
    layers.MATERIALIZE_CONV_INPUTS = kind != "off"
    model = get_model("resnet20")
    variables = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    raw = jnp.asarray(rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (128,)), jnp.int32)
    class D:
        augment = staticmethod(lambda key, im: im)
        preprocess = staticmethod(lambda im: (im.astype(jnp.float32) / 255.0 - 0.5) / 0.25)
    opt = train.make_optimizer(train.TrainConfig(epochs=1, batch_size=128), 1000)
    loss_fn = methods.clean(model)
    step = train.make_train_step(model, loss_fn, opt, D)
    st = train.init_state(model, variables, opt)
    hp = methods.check_hparams(loss_fn.hparams, tuple(loss_fn.hparams))
    for _ in range(3):
        st, m = step(st, raw, labels, jax.random.key(1), hp)
    jax.block_until_ready(m)
    r = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(3):
            st, m = step(st, raw, labels, jax.random.key(1), hp)
        jax.block_until_ready(m); r.append((time.perf_counter() - t0) / 3)
    return 1000 * statistics.median(r)

args = sys.argv[1:]
log = None
if "--log" in args:
    i = args.index("--log")
    log, args = args[i + 1], args[:i] + args[i + 2:]
lines = [f"$ python benchmarks/materialize_variants.py {' '.join(sys.argv[1:])}", f"jax {jax.__version__}"]
for k in args or ["dot", "rw", "dus", "off"]:
    lines.append(f"{k:4s} {time_step(k):.1f} ms per step")
    print(lines[-1], flush=True)
if log:
    with open(log, "w") as f:
        f.write("\n".join(lines) + "\n")
