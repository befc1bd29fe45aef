#!/usr/bin/env python3
"""Where a ResNet-20 train step spends its time on XLA:CPU: the convolution's three products, op by op, against
PyTorch, and the kernel-gradient formulations an implementation could choose instead of XLA's own.

For every distinct conv shape of ResNet-20 at batch ``--batch-size`` (CIFAR: 16 channels at 32x32, 32 at 16x16,
64 at 8x8, plus the stride-2 and stem convs) it times, after a warm-up, the median of ``--repeats`` rounds:

* jax: forward ``conv_general_dilated``; input gradient; kernel gradient (each a separately jitted function of
  the VJP, so each is one XLA op as the train step runs it);
* the kernel gradient written three other ways, each checked equal to XLA's (max relative error printed):
  ``im2col`` (patches (N*H*W, 9*Cin) contracted with dy (N*H*W, Cout) in one dot), ``shifted`` (9 dots of a
  shifted input view with dy, summed into the kernel) and ``transposed`` (the kernel gradient as a forward conv
  with the batch as the contracted feature axis, whose 3x3 output is the kernel);
* torch (when importable): forward, input gradient and kernel gradient (``torch.nn.grad.conv2d_input`` /
  ``conv2d_weight``) in channels_last, and the whole forward+backward of one conv.

It prints per shape: ms of each, ratios jax/torch, and the sum over ResNet-20's 19 convs weighted by how often each
shape occurs. This is the op-level evidence for the train-step goal (>= 0.5x PyTorch): if the best formulation of
the kernel gradient on XLA:CPU is still several times PyTorch's, the step cannot reach the goal by rewriting the
model in JAX alone.

Usage (from the repository root, in an environment with torch for the comparison column):
  python benchmarks/conv_grad.py                 # batch 128, 5 rounds
  python benchmarks/conv_grad.py --quick         # batch 32, 2 rounds
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# (cin, cout, spatial in, stride, count in ResNet-20)
RESNET20_CONVS = [
    (3, 16, 32, 1, 1),    # stem
    (16, 16, 32, 1, 6),   # layer1: 3 blocks x 2 convs
    (16, 32, 32, 2, 1),   # layer2/0/conv1
    (32, 32, 16, 1, 5),
    (32, 64, 16, 2, 1),   # layer3/0/conv1
    (64, 64, 8, 1, 5),
]


def conv(x, k, stride):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def kernel_grad_xla(x, dy, k_shape, stride):
    _, vjp = jax.vjp(lambda k: conv(x, k, stride), jnp.zeros(k_shape, x.dtype))
    return vjp(dy)[0]


def input_grad_xla(x, k, dy, stride):
    _, vjp = jax.vjp(lambda x: conv(x, k, stride), x)
    return vjp(dy)[0]


def _shifted_views(x, stride, out_hw):
    """The 9 input views (N, Ho, Wo, Cin) that tap (i, j) of a 3x3, padding-1 kernel multiplies."""
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = out_hw
    return [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            for i in range(3) for j in range(3)]


def kernel_grad_im2col(x, dy, k_shape, stride):
    n, ho, wo, cout = dy.shape
    patches = jnp.stack(_shifted_views(x, stride, (ho, wo)), axis=3)  # (N, Ho, Wo, 9, Cin)
    g = jnp.einsum("nhwpc,nhwo->pco", patches, dy)
    return g.reshape(k_shape)


def kernel_grad_shifted(x, dy, k_shape, stride):
    n, ho, wo, cout = dy.shape
    taps = [jnp.einsum("nhwc,nhwo->co", v, dy) for v in _shifted_views(x, stride, (ho, wo))]
    return jnp.stack(taps).reshape(k_shape)


def kernel_grad_transposed(x, dy, k_shape, stride):
    """dK[i, j, c, o] = sum_{n,h,w} xpad[n, s*h + i, s*w + j, c] dy[n, h, w, o]: a conv of x (batch axis as
    features, Cin as the batch) with dy as a (Ho, Wo) kernel, dilated by the stride."""
    lhs = jnp.transpose(x, (3, 1, 2, 0))          # (Cin, H, W, N): "batch" Cin, features N
    rhs = jnp.transpose(dy, (1, 2, 0, 3))         # (Ho, Wo, N, Cout): kernel over space, in N, out Cout
    out = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(stride, stride),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))  # (Cin, 3, 3, Cout)
    out = out[:, :3, :3, :]
    return jnp.transpose(out, (1, 2, 0, 3))


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


TRAIN_STEP_COLS = ("fwd", "dx", "dK xla")   # what XLA runs in a train step (no input gradient of the stem)


def measure(batch_size: int, repeats: int, torch=None, say=print) -> tuple[dict[str, float], list[str], list[str]]:
    """Times every ResNet-20 conv shape (one row each through ``say``) and returns ``(totals, cols, tcols)``:
    ms per step summed over the 19 convs for each jax column and, with ``torch``, each torch column. The stem's
    input gradient, which no train step computes (images are not differentiated), is left out of the totals."""
    cols = ["fwd", "dx", "dK xla", "dK im2col", "dK shifted", "dK transposed"]
    tcols = ["t fwd", "t dx", "t dK", "t fwd+bwd"] if torch else []
    say(f"{'shape (cin>cout @hw /s) x count':34}" + "".join(f"{c:>14}" for c in cols + tcols))
    rng = np.random.default_rng(0)
    totals = {c: 0.0 for c in cols + tcols}
    for cin, cout, hw, stride, count in RESNET20_CONVS:
        n = batch_size
        x = jnp.asarray(rng.standard_normal((n, hw, hw, cin)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.float32)
        ho = hw // stride
        dy = jnp.asarray(rng.standard_normal((n, ho, ho, cout)), jnp.float32)
        fwd = jax.jit(functools.partial(conv, stride=stride))
        dx = jax.jit(functools.partial(input_grad_xla, stride=stride))
        variants = {name: jax.jit(functools.partial(f, k_shape=k.shape, stride=stride)) for name, f in
                    (("dK xla", kernel_grad_xla), ("dK im2col", kernel_grad_im2col),
                     ("dK shifted", kernel_grad_shifted), ("dK transposed", kernel_grad_transposed))}
        ref = np.asarray(variants["dK xla"](x, dy))
        errs = {name: float(np.max(np.abs(np.asarray(f(x, dy)) - ref)) / np.max(np.abs(ref)))
                for name, f in variants.items()}
        ms = {"fwd": timed(lambda: fwd(x, k).block_until_ready(), repeats),
              "dx": timed(lambda: dx(x, k, dy).block_until_ready(), repeats)}
        for name, f in variants.items():
            ms[name] = timed(lambda f=f: f(x, dy).block_until_ready(), repeats)
        if torch:
            tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            tk = torch.tensor(np.asarray(k)).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
            tdy = torch.tensor(np.asarray(dy)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            tf = torch.nn.functional
            with torch.no_grad():
                ms["t fwd"] = timed(lambda: tf.conv2d(tx, tk, stride=stride, padding=1), repeats)
                ms["t dx"] = timed(lambda: torch.nn.grad.conv2d_input(tx.shape, tk, tdy, stride=stride, padding=1),
                                   repeats)
                ms["t dK"] = timed(lambda: torch.nn.grad.conv2d_weight(tx, tk.shape, tdy, stride=stride,
                                                                       padding=1), repeats)
            txg, tkg = tx.clone().requires_grad_(True), tk.clone().requires_grad_(True)

            def fwd_bwd():
                txg.grad = tkg.grad = None
                tf.conv2d(txg, tkg, stride=stride, padding=1).backward(tdy)
            ms["t fwd+bwd"] = timed(fwd_bwd, repeats)
            tdk = torch.nn.grad.conv2d_weight(tx, tk.shape, tdy, stride=stride, padding=1).permute(2, 3, 1, 0)
            errs["torch"] = float(np.max(np.abs(tdk.numpy() - ref)) / np.max(np.abs(ref)))
        for c in totals:
            if not (cin == 3 and c in ("dx", "t dx")):   # the stem: no input gradient
                totals[c] += count * ms[c]
        label = f"{cin}>{cout} @{hw} /{stride} x{count}"
        say(f"{label:34}" + "".join(f"{ms[c]:14.2f}" for c in cols + tcols))
        say(f"{'  max rel. error vs dK xla':34}" + "".join(f"{errs[c]:14.1e}" if c in errs else f"{'':14}"
                                                            for c in cols) +
            (f"{'':42}{errs['torch']:14.1e}" if torch else ""))
    say(f"{'ResNet-20 total (19 convs), ms':34}" + "".join(f"{totals[c]:14.1f}" for c in cols + tcols))
    return totals, cols, tcols


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--log", default=None, help="also write the report to this file")
    args = p.parse_args()
    if args.quick:
        args.batch_size, args.repeats = 32, 2
    try:
        import torch
        torch.manual_seed(0)
    except ImportError:
        torch = None
    lines: list[str] = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    say(f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} cores; "
        + (f"torch {torch.__version__}, {torch.get_num_threads()} threads, channels_last" if torch else
           "torch not installed (see benchmarks/peer_torch.py for how to get it): jax columns only")
        + f"; batch {args.batch_size}, median of {args.repeats}")
    totals, cols, tcols = measure(args.batch_size, args.repeats, torch, say)
    best_dk = min(totals[c] for c in cols if c.startswith("dK"))
    jax_best = totals["fwd"] + totals["dx"] + best_dk
    say()
    say(f"jax conv work per step with its best kernel gradient: {jax_best:.1f} ms (fwd {totals['fwd']:.1f} + dx "
        f"{totals['dx']:.1f} + dK {best_dk:.1f}); with XLA's own dK: "
        f"{totals['fwd'] + totals['dx'] + totals['dK xla']:.1f} ms")
    if torch:
        say(f"torch conv fwd+bwd per step: {totals['t fwd+bwd']:.1f} ms  ->  torch/jax conv throughput ratio "
            f"{totals['t fwd+bwd'] / jax_best:.2f} (best jax), "
            f"{totals['t fwd+bwd'] / (totals['fwd'] + totals['dx'] + totals['dK xla']):.2f} (XLA dK)")
        say(f"kernel gradient alone: torch {totals['t dK']:.1f} ms, jax best {best_dk:.1f} ms "
            f"({best_dk / totals['t dK']:.1f}x), XLA's {totals['dK xla']:.1f} ms "
            f"({totals['dK xla'] / totals['t dK']:.1f}x)")
    if args.log:
        with open(args.log, "w") as f:
            f.write("$ python " + " ".join(sys.argv) + "\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
