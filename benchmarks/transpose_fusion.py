#!/usr/bin/env python3
"""A (N, H, W, C) -> (C, H, W, N) transpose on this backend, of a buffer and of an elementwise chain fused into it.

The layout change XLA:CPU makes for a convolution's kernel gradient (``jaxnoise.models.layers.materialized``
explains why it matters): 128 x 32 x 32 x 16 float32, median of 20 calls each. Run on an otherwise idle machine.

Usage: python benchmarks/transpose_fusion.py
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 32, 32, 16)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((128, 32, 32, 16)), jnp.float32)
    s, b = jnp.ones(16), jnp.zeros(16)
    fns = {"plain NHWC->CHWN (a buffer)": jax.jit(lambda x, c: jnp.transpose(x, (3, 1, 2, 0))),
           "relu(x*s+b+c) fused, ->CHWN": jax.jit(lambda x, c: jnp.transpose(jax.nn.relu(x * s + b + c), (3, 1, 2, 0))),
           "plain NHWC->HWNC (a buffer)": jax.jit(lambda x, c: jnp.transpose(x, (1, 2, 0, 3)))}
    print(f"jax {jax.__version__}, {jax.default_backend()}")
    for name, f in fns.items():
        f(x, c).block_until_ready()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            f(x, c).block_until_ready()
            times.append(time.perf_counter() - t0)
        print(f"{name:32s} {1e3 * statistics.median(times):.2f} ms")


if __name__ == "__main__":
    main()
