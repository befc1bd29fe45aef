#!/usr/bin/env python3
"""Speed of jaxnoise against a PyTorch peer (and IBM aihwkit) on the same network, weights, data and noise, in one run.

Runs the pretrained CIFAR ResNet-20 (``--weights``, PyTorch state-dict names) in jaxnoise and in an equivalent
PyTorch module (option-A shortcuts, ``../shared/pretrained/README.md``) in the same process, and prints each absolute
figure with the ratio jaxnoise/PyTorch (> 1: jaxnoise is faster):

0. same network: both clean accuracies on the evaluated images (asserted equal within 0.1 point), the largest
   logit difference (job 3 also compares both sides' calibrated activation scales and job 5 the loss of the first
   clean train step); the ratios below compare the same computation.
1. ``clean``: clean evaluation throughput (images/s), batch ``--batch-size``: PyTorch in eval mode,
   ``channels_last``, under ``torch.inference_mode()``; jaxnoise ``robustness.evaluate(..., None)``.
2. ``weight``: weight-noise Monte Carlo over ``--n-chips`` chips (image-chips/s): ``additive_rel_max``, sigma =
   0.1 * max|W| per conv/linear weight tensor, one draw per chip kept for every image. PyTorch writes a perturbed
   copy of the weights into the module per chip; jaxnoise ``robustness.evaluate(..., NoiseSpec(weight_eta=0.1),
   key=0, n_chips=C)``.
3. ``act``: additive activation noise at every conv/linear output (images/s): sigma_site = 0.2 * the pooled std of
   that layer's clean output, calibrated on the same 1024 training images (``data.calibration_images``) on each
   side, a fresh draw every forward pass. The std is that of the MVM output before the digital bias, as jaxnoise's
   site is (it matters for the linear layer: the bias spread would raise its std by 0.1%). PyTorch: forward hooks on every Conv2d/Linear; jaxnoise ``NoiseSpec(
   weight_kind=None, act_kind="additive", act_eta=0.2, act_ref=noise.calibrate_activations(...))``, one chip.
4. ``device``: device Monte Carlo against IBM aihwkit (image-chip-reads/s), ``--device-chips`` chips on the first
   ``--device-images`` images, one read at t = 1 h. aihwkit: ``convert_to_analog(model, InferenceRPUConfig())``
   (its defaults) once, then per chip ``program_analog_weights()``, ``drift_analog_weights(3600)`` and an eval pass
   (all three timed); jaxnoise ``robustness.evaluate_analog(..., analog.preset("aihwkit_inference_default"),
   times=[3600.0], key=0, n_chips=C)``. Both accuracies (mean +- standard error over chips) are printed as context
   only (too few chips to compare them; tools/aihwkit_network_check.py does). The logs up to 2026-12-01c ran
   jaxnoise's preset before it matched aihwkit's defaults (its tiles were whole layers holding W / max|W|).
5. ``train``: training steps (images/s), batch ``--train-batch-size``, SGD momentum 0.9, lr 0.1, weight decay 5e-4
   on conv/linear weights: a clean step (PyTorch ``channels_last`` forward + backward + ``optimizer.step()`` vs
   ``train.make_train_step(model, methods.clean(model), ...)``) and a forward-noise step (one additive_rel_max
   draw at eta 0.1 per step, straight-through: PyTorch perturbs the weights for the forward pass and applies the
   gradient to the clean weights; jaxnoise ``methods.forward_noise(model, eta_train=0.1)``). No crop/flip: both
   sides train on the same preprocessed batch (the first training images), which does not change the step time.
   jaxnoise's learning rate follows its cosine schedule over 1000 steps (within 0.1% of 0.1 over the default 12
   steps), PyTorch's stays at 0.1.

Timing: every variant runs once first (compilation, allocator and oneDNN warm-up excluded); then ``--repeats``
rounds, each timing the jaxnoise and the PyTorch variant of a job back to back (the order alternating between
rounds), and the median of the rounds is reported. The report (also written to ``--log``) names the jax version and
device, the torch version, device and threads (``torch.get_num_threads()``), and the load average before and after.
Run it on an otherwise idle machine: when other processes compete for the cores, PyTorch's OpenMP kernels slow down
far more than XLA's (seen on 2 shared cores: PyTorch's clean eval fell from about 4100 to 170 images/s while
jaxnoise's stayed within 1.4x), so the ratios then flatter jaxnoise; the report warns when the load was already high.
Data: the first ``--n-images`` CIFAR-10 test images; random uint8 images (and labels) when CIFAR-10 is absent, which
the report says.

Goal: ratios jaxnoise/PyTorch of 1 or more. The speed issue's table, the state this benchmark tracks: clean eval
0.76x, weight-noise MC 0.79x, activation noise 488 vs 214 img/s, device MC 0.09x of clean (jaxnoise's device
evaluation relative to its own clean evaluation), train step 0.24x.

torch and aihwkit are optional: without torch the script prints how to get them and exits 0 having run nothing;
without aihwkit the ``device`` job is skipped with a message.

Usage (from the repository root, in a venv with torch 2.14.1, aihwkit 1.2.0 and ``pip install -e .``):
  python benchmarks/peer_torch.py --log benchmarks/peer_torch_cpu_<date>.txt   # 2000 images, 4 chips, 3 repeats
  python benchmarks/peer_torch.py --quick                  # smoke test: 128 images, 2 chips, 1 repeat
  python benchmarks/peer_torch.py --quick --jobs clean --n-images 64
  python benchmarks/peer_torch.py --jobs weight,act --repeats 5
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

JOBS = ("clean", "weight", "act", "device", "train")
WEIGHT_ETA = 0.1     # additive_rel_max: sigma = eta * max|W|
ACT_ETA = 0.2        # additive activation noise: sigma = eta * std of the site's clean output
TRAIN_ETA = 0.1      # forward-noise training draw
T_READ = 3600.0      # device read time, seconds after programming
AIHWKIT_WHEEL = "../shared/wheels/aihwkit-1.2.0-cp311-cp311-linux_x86_64.whl"

INSTALL = f"""\
PyTorch is not importable in this interpreter ({sys.executable}), so the peer benchmark ran nothing.
It needs torch 2.14.1 and, for the device job, IBM aihwkit 1.2.0 (../shared/wheels/README.md), installed in a
separate virtual environment (never in the library's own), then this repository in it:

  apt-get install -y libopenblas0           # aihwkit's runtime library
  python3 -m venv .venv-peer && . .venv-peer/bin/activate
  pip install torch==2.14.1 torchvision==0.29.1 scipy scikit-learn requests protobuf tqdm numpy
  pip install --no-deps {AIHWKIT_WHEEL}
  pip install -e .                          # jaxnoise; '.[bench]' also pins torch==2.14.1
  python benchmarks/peer_torch.py --quick"""


# ----------------------------------------------------------------------------------------------------------------
# Report: printed and written to --log as it goes


class Report:
    def __init__(self, path: str | None):
        self.file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "w", encoding="utf-8")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def interleaved(jax_fn, torch_fn, repeats: int) -> tuple[float, float]:
    """Median seconds of ``jax_fn`` and ``torch_fn`` (both already warmed up) over ``repeats`` rounds; each round
    times both back to back, jaxnoise first in even rounds and PyTorch first in odd ones."""
    times = {"jax": [], "torch": []}
    for r in range(repeats):
        order = (("jax", jax_fn), ("torch", torch_fn))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["jax"]), statistics.median(times["torch"])


def load_line(when: str) -> str:
    """The 1/5/15-minute load average, with a warning when other processes already busy the CPUs."""
    try:
        load = os.getloadavg()
    except OSError:
        return f"load average {when}: unknown"
    line = f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} over {os.cpu_count()} CPUs"
    if when.startswith("before") and load[0] >= 0.5 * (os.cpu_count() or 1):
        line += ("  WARNING: other processes are using the CPUs; PyTorch's OpenMP kernels suffer more from "
                 "contention than XLA's, so the ratios below overstate jaxnoise")
    return line


def mean_se(accs) -> str:
    """``mean +- se`` in percent over chips (no +- for one chip)."""
    a = [100.0 * float(v) for v in accs]
    if len(a) < 2:
        return f"{a[0]:.2f}%"
    return f"{statistics.mean(a):.2f} +- {statistics.stdev(a) / math.sqrt(len(a)):.2f}%"


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch peer: CIFAR ResNet with option-A shortcuts, akamaster/pytorch_resnet_cifar10 names


def torch_resnet(torch, depth: int = 20, num_classes: int = 10, width: int = 16):
    nn, F = torch.nn, torch.nn.functional

    class ShortcutA(nn.Module):
        """Every second pixel, channels zero-padded by planes // 4 on each side (no parameters)."""

        def __init__(self, planes):
            super().__init__()
            self.pad = planes // 4

        def forward(self, x):
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    class BasicBlock(nn.Module):
        def __init__(self, inp, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = nn.Identity() if stride == 1 and inp == planes else ShortcutA(planes)

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + self.shortcut(x))

    class ResNetCifar(nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 2) // 6
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            inp = width
            for stage, planes in enumerate((width, 2 * width, 4 * width), start=1):
                blocks = []
                for b in range(n):
                    blocks.append(BasicBlock(inp, planes, 2 if stage > 1 and b == 0 else 1))
                    inp = planes
                setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            self.linear = nn.Linear(inp, num_classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.linear(x.mean(dim=(2, 3)))

    return ResNetCifar()


def torch_state_from_jax(variables) -> dict:
    """PyTorch state dict (numpy) of jaxnoise variables: the inverse of ``jaxnoise.models.load_torch_npz``."""
    import numpy as np
    from flax import traverse_util

    params = traverse_util.flatten_dict(variables["params"], sep="/")
    stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
    state = {}
    for path, a in params.items():
        layer, leaf = path.rsplit("/", 1)
        name = layer.replace("/", ".")
        a = np.asarray(a)
        if leaf == "kernel":
            state[f"{name}.weight"] = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
        elif leaf == "scale":
            state[f"{name}.weight"] = a
        else:
            state[f"{name}.{leaf}"] = a
    for path, a in stats.items():
        layer, leaf = path.rsplit("/", 1)
        name = layer.replace("/", ".")
        state[f"{name}.running_{'mean' if leaf == 'mean' else 'var'}"] = np.asarray(a)
        state[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    return state


def mvm_modules(torch, net):
    """``[(site name, module)]`` of every Conv2d/Linear, named like jaxnoise's sites (``layer1/0/conv1``)."""
    kinds = (torch.nn.Conv2d, torch.nn.Linear)
    return [(name.replace(".", "/"), m) for name, m in net.named_modules() if isinstance(m, kinds)]


# ----------------------------------------------------------------------------------------------------------------


def conv_bound(torch, batch_size: int, repeats: int, step_ms: dict, report) -> None:
    """The convolutions' share of the clean train step on both sides, measured in this run
    (``benchmarks/conv_grad.py``: each of ResNet-20's 19 convs' forward, input gradient and kernel gradient as
    separate ops), and the best ratio jaxnoise could reach if everything but its convolutions ran as fast as
    PyTorch's: ``torch_step / (jax_conv + torch_step - torch_conv)``. Below the goal of 0.5x, the convolution
    kernels of XLA:CPU alone keep the step from it."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import conv_grad

    report(f"\n-- convolution products of one clean step (batch {batch_size}, benchmarks/conv_grad.py shapes; "
           f"ms, median of {max(repeats, 3)})")
    totals, _, _ = conv_grad.measure(batch_size, max(repeats, 3), torch, say=report)
    jax_conv = sum(totals[c] for c in conv_grad.TRAIN_STEP_COLS)
    torch_conv = totals["t fwd"] + totals["t dx"] + totals["t dK"]
    js, ts = step_ms["jax"], step_ms["torch"]
    report(f"clean step: jaxnoise {js:.0f} ms = convolutions {jax_conv:.0f} + the rest {js - jax_conv:.0f}; "
           f"PyTorch {ts:.0f} ms = convolutions {torch_conv:.0f} + the rest {ts - torch_conv:.0f}")
    best = ts / (jax_conv + ts - torch_conv)
    report(f"bound: with everything but the convolutions as fast as PyTorch's, jaxnoise's step would be "
           f"{jax_conv + ts - torch_conv:.0f} ms, {best:.2f}x PyTorch"
           + (" (below the 0.5x goal: XLA:CPU's convolution kernels alone keep the step from it)" if best < 0.5
              else ""))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)} "
                                                          "(the same-network check always runs)")
    p.add_argument("--n-images", type=int, default=None, help="first N CIFAR-10 test images (default 2000; "
                                                              "--quick: 128)")
    p.add_argument("--n-chips", type=int, default=None, help="chips of the weight-noise MC (default 4; --quick: 2)")
    p.add_argument("--device-images", type=int, default=None,
                   help="images of the device job (default min(500, n-images); --quick: 64)")
    p.add_argument("--device-chips", type=int, default=None, help="chips of the device job (default 4; --quick: 2)")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size, both sides")
    p.add_argument("--train-batch-size", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=None, help="train steps per timed round (default 5; "
                                                                 "--quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per job, median reported (default 3; "
                                                             "--quick: 1)")
    p.add_argument("--weights", default="../shared/pretrained/resnet20_cifar10.npz")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR, ../shared/tfds, ...)")
    p.add_argument("--log", default=None, help="also write the report to this file")
    p.add_argument("--quick", action="store_true", help="smoke test: 128 images, 2 chips, 1 repeat, 1 train step")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"n_images": 128 if quick else 2000, "n_chips": 2 if quick else 4, "device_chips": 2 if quick else 4,
                "train_steps": 1 if quick else 5, "repeats": 1 if quick else 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device_images is None:
        args.device_images = 64 if quick else 500
    args.device_images = min(args.device_images, args.n_images)
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown or not jobs:
        p.error(f"--jobs {args.jobs!r}: unknown {unknown}; choose from {','.join(JOBS)}")
    args.jobs = jobs
    for name in ("n_images", "n_chips", "device_images", "device_chips", "batch_size", "train_batch_size",
                 "train_steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print(INSTALL)
        return 0
    report = Report(args.log)
    try:
        return run(args, torch, report)
    finally:
        report.close()


def run(args, torch, report: Report) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxnoise import analog as analog_lib
    from jaxnoise import data as data_lib
    from jaxnoise import methods, noise, robustness, train
    from jaxnoise.models import get_model, load_torch_npz
    from jaxnoise.report import device_description

    F = torch.nn.functional
    channels_last = torch.channels_last
    report(f"$ python benchmarks/peer_torch.py {' '.join(sys.argv[1:])}".rstrip())
    report(f"date {time.strftime('%Y-%m-%d %H:%M:%S')}; host {platform.node()}, {os.cpu_count()} CPUs")
    report(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device_description()}")
    report(f"torch {torch.__version__}, device cpu, torch.get_num_threads() = {torch.get_num_threads()}")
    report(load_line("before the run"))

    aihwkit_error = None
    if "device" in args.jobs:
        try:
            import aihwkit
            from aihwkit.nn.conversion import convert_to_analog
            from aihwkit.simulator.configs import InferenceRPUConfig
            report(f"aihwkit {aihwkit.__version__}")
        except Exception as e:  # ImportError, or OSError when libopenblas is missing
            aihwkit_error = f"{type(e).__name__}: {e}"
            report(f"aihwkit not importable ({aihwkit_error}): the device job is skipped. Install it with "
                   f"`pip install --no-deps {AIHWKIT_WHEEL}` (needs `apt-get install -y libopenblas0`).")

    # ---- data
    try:
        ds = data_lib.load_dataset("cifar10", data_dir=args.data_dir)
        data_note = f"CIFAR-10 test split, first {min(args.n_images, len(ds.test))} images"
    except data_lib.DatasetNotFoundError as e:
        rng = np.random.default_rng(0)

        def split(n):
            return data_lib.Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                  rng.integers(0, 10, (n,), dtype=np.int32))
        ds = data_lib.Dataset(name="random", train=split(2048), test=split(args.n_images), num_classes=10,
                              image_shape=(32, 32, 3), pixel_scale=255.0, mean=data_lib.CIFAR_MEAN,
                              std=data_lib.CIFAR_STD)
        data_note = (f"RANDOM uint8 images and labels ({args.n_images} test, 2048 train): CIFAR-10 not found "
                     f"({' '.join(str(e).split())[:160]}); accuracies are meaningless, agreement and speed are not")
    n = min(args.n_images, len(ds.test))
    x_np = np.array(ds.test.images[:n])   # a writable copy (the cached splits are read-only)
    y_np = np.asarray(ds.test.labels[:n], np.int32)
    B = min(args.batch_size, n)

    # ---- the network, in both
    model = get_model("resnet20")
    net = torch_resnet(torch)
    if os.path.exists(args.weights):
        variables = load_torch_npz(model, args.weights)
        with np.load(args.weights) as f:
            state = {k: f[k] for k in f.files}
        weights_note = args.weights
    else:
        variables = jax.tree.map(np.asarray, model.init(jax.random.key(0)))
        state = torch_state_from_jax(variables)
        weights_note = f"{args.weights} NOT FOUND: jaxnoise's model.init(key 0) weights, copied into torch"
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
    net.eval()
    variables = jax.device_put(variables)
    report(f"data: {data_note}; eval batch {B}")
    report(f"weights: {weights_note}; ResNet-20 ({sum(p.numel() for p in net.parameters())} parameters)")
    report(f"jobs: {','.join(args.jobs)}; median of {args.repeats} interleaved rounds after a warm-up")

    mean_t = torch.tensor(ds.mean, dtype=torch.float32).view(1, 3, 1, 1)
    inv_std_t = 1.0 / torch.tensor(ds.std, dtype=torch.float32).view(1, 3, 1, 1)
    scale = 1.0 / ds.pixel_scale

    def prep(u8, memory_format=channels_last):
        """uint8 NHWC -> normalised float NCHW, as ``ds.preprocess`` does (in the timed loop, as on jaxnoise's)."""
        x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() * scale
        return ((x - mean_t) * inv_std_t).contiguous(memory_format=memory_format)

    def torch_eval(module, u8, labels, memory_format=channels_last):
        correct = 0
        with torch.inference_mode():
            for s in range(0, len(labels), B):
                logits = module(prep(u8[s:s + B], memory_format))
                correct += int((logits.argmax(1).numpy() == labels[s:s + B]).sum())
        return correct / len(labels)

    def j_clean():
        return robustness.evaluate(model, variables, x_np, y_np, None, batch_size=B, preprocess=ds.preprocess)

    net_cl = torch_resnet(torch)
    net_cl.load_state_dict(net.state_dict())
    net_cl = net_cl.to(memory_format=channels_last).eval()

    def t_clean():
        return torch_eval(net_cl, x_np, y_np)

    # ---- 0. same network
    report("\n== 0. same network")
    t0 = time.perf_counter()
    acc_j = j_clean().mean
    compile_s = time.perf_counter() - t0
    acc_t = t_clean()
    k = min(n, B)
    logits_j = np.asarray(jax.jit(lambda v, u: model.apply(v, ds.preprocess(u))[0])(variables, x_np[:k]))
    with torch.inference_mode():
        logits_t = net_cl(prep(x_np[:k])).numpy()
    agree = int((logits_j.argmax(1) == logits_t.argmax(1)).sum())
    report(f"clean accuracy on {n} images: jaxnoise {100 * acc_j:.2f}%, PyTorch {100 * acc_t:.2f}% "
           f"(difference {100 * abs(acc_j - acc_t):.2f} points; jaxnoise first call {compile_s:.1f} s)")
    report(f"logits of the first {k} images: max |jaxnoise - PyTorch| = {np.abs(logits_j - logits_t).max():.2e} "
           f"(max |logit| {np.abs(logits_t).max():.1f}); argmax agrees on {agree}/{k}")
    if abs(acc_j - acc_t) > 0.001 + 1e-12:
        report("FAILED: the two networks disagree by more than 0.1 point: the ratios would not compare the same "
               "computation. Check the weights file against ../shared/pretrained/README.md.")
        return 1

    rows = []       # (job, jaxnoise figure, torch figure, unit)
    rates = {}

    # ---- 1. clean
    if "clean" in args.jobs:
        report(f"\n== 1. clean eval, {n} images, batch {B}")
        tj, tt = interleaved(j_clean, t_clean, args.repeats)
        rates["clean"] = (n / tj, n / tt)
        report(f"jaxnoise {n / tj:8.1f} images/s ({tj:.3f} s)   PyTorch {n / tt:8.1f} images/s ({tt:.3f} s)   "
               f"ratio {tt / tj:.2f}x")
        rows.append(("clean eval", n / tj, n / tt, "images/s"))

    # ---- 2. weight-noise MC
    if "weight" in args.jobs:
        C = args.n_chips
        report(f"\n== 2. weight-noise MC: additive_rel_max eta {WEIGHT_ETA}, {C} chips x {n} images")
        spec = noise.NoiseSpec(weight_kind="additive_rel_max", weight_eta=WEIGHT_ETA)
        weights = [(m.weight, m.weight.detach().clone()) for _, m in mvm_modules(torch, net_cl)]
        box = {}

        def j_weight():
            box["j"] = robustness.evaluate(model, variables, x_np, y_np, spec, key=0, n_chips=C, batch_size=B,
                                           preprocess=ds.preprocess).per_chip
            return box["j"]

        def t_weight():
            g = torch.Generator().manual_seed(0)
            accs = []
            try:
                for _ in range(C):
                    with torch.no_grad():
                        for p, w0 in weights:
                            p.copy_(w0 + (WEIGHT_ETA * w0.abs().max()) * torch.randn(w0.shape, generator=g))
                    accs.append(torch_eval(net_cl, x_np, y_np))
            finally:
                with torch.no_grad():
                    for p, w0 in weights:
                        p.copy_(w0)
            box["t"] = accs
            return accs

        t0 = time.perf_counter()
        j_weight()
        report(f"jaxnoise first call (compile) {time.perf_counter() - t0:.1f} s")
        t_weight()
        tj, tt = interleaved(j_weight, t_weight, args.repeats)
        rj, rt = C * n / tj, C * n / tt
        report(f"jaxnoise {rj:8.1f} image-chips/s ({tj:.3f} s)   PyTorch {rt:8.1f} image-chips/s ({tt:.3f} s)   "
               f"ratio {rj / rt:.2f}x")
        report(f"accuracy over chips (different random draws each side): jaxnoise {mean_se(box['j'])}, "
               f"PyTorch {mean_se(box['t'])}")
        rows.append((f"weight MC ({C} chips)", rj, rt, "image-chips/s"))

    # ---- 3. activation noise
    if "act" in args.jobs:
        report(f"\n== 3. additive activation noise at every conv/linear output, eta {ACT_ETA} x calibrated std, "
               f"{n} images")
        cal = data_lib.calibration_images(ds.train, n=1024, seed=0)
        # as jaxnoise.cli.calibrate does
        ref_j = noise.calibrate_activations(model.apply, variables, jax.jit(ds.preprocess)(jnp.asarray(cal)),
                                            statistic="std")
        sites = mvm_modules(torch, net_cl)
        sums = {name: [0.0, 0.0, 0] for name, _ in sites}

        def stat_hook(name):
            def hook(mod, inp, out):
                # jaxnoise's site is the MVM output before the (digital) bias: the same here
                y = out.double() if mod.bias is None else out.double() - mod.bias.double().view(
                    (1, -1) + (1,) * (out.ndim - 2))
                s = sums[name]
                s[0] += float(y.sum())
                s[1] += float((y * y).sum())
                s[2] += y.numel()
            return hook

        handles = [m.register_forward_hook(stat_hook(name)) for name, m in sites]
        try:
            with torch.inference_mode():
                for s in range(0, len(cal), 256):
                    net_cl(prep(np.ascontiguousarray(cal[s:s + 256])))
        finally:
            for h in handles:
                h.remove()
        ref_t = {name: math.sqrt(max(s2 / c - (s1 / c) ** 2, 0.0)) for name, (s1, s2, c) in sums.items()}
        if set(ref_t) != set(ref_j):
            report(f"FAILED: activation sites differ: PyTorch only {sorted(set(ref_t) - set(ref_j))}, jaxnoise "
                   f"only {sorted(set(ref_j) - set(ref_t))}")
            return 1
        rel = max(abs(ref_t[s] - float(ref_j[s])) / float(ref_j[s]) for s in ref_j)
        report(f"calibration: {len(cal)} training images, {len(ref_j)} sites; std from {min(ref_t.values()):.3f} "
               f"to {max(ref_t.values()):.3f}; max relative difference jaxnoise vs PyTorch {rel:.1e}")
        spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_eta=ACT_ETA, act_ref=ref_j)
        box = {}

        def j_act():
            box["j"] = robustness.evaluate(model, variables, x_np, y_np, spec, key=0, n_chips=1, batch_size=B,
                                           preprocess=ds.preprocess).mean
            return box["j"]

        def noise_hook(sigma):   # after the bias: the same as before it, the noise being additive
            return lambda mod, inp, out: out + sigma * torch.randn_like(out)

        def t_act():
            hs = [m.register_forward_hook(noise_hook(ACT_ETA * ref_t[name])) for name, m in sites]
            try:
                box["t"] = torch_eval(net_cl, x_np, y_np)
            finally:
                for h in hs:
                    h.remove()
            return box["t"]

        t0 = time.perf_counter()
        j_act()
        report(f"jaxnoise first call (compile) {time.perf_counter() - t0:.1f} s")
        torch.manual_seed(0)
        t_act()
        tj, tt = interleaved(j_act, t_act, args.repeats)
        report(f"jaxnoise {n / tj:8.1f} images/s ({tj:.3f} s)   PyTorch {n / tt:8.1f} images/s ({tt:.3f} s)   "
               f"ratio {tt / tj:.2f}x")
        report(f"accuracy (one pass, different draws each side): jaxnoise {100 * box['j']:.2f}%, "
               f"PyTorch {100 * box['t']:.2f}%")
        rows.append(("activation noise", n / tj, n / tt, "images/s"))

    # ---- 4. device MC vs aihwkit
    if "device" in args.jobs and aihwkit_error is None:
        nd, Cd = args.device_images, args.device_chips
        xd, yd = x_np[:nd], y_np[:nd]
        Bd = min(B, nd)
        report(f"\n== 4. device MC: aihwkit InferenceRPUConfig() defaults vs jaxnoise preset "
               f"'aihwkit_inference_default', read at t = {T_READ:g} s, {Cd} chips x {nd} images, batch {Bd}")
        dev = analog_lib.preset("aihwkit_inference_default")
        net_plain = torch_resnet(torch)
        net_plain.load_state_dict(net.state_dict())
        analog = convert_to_analog(net_plain, InferenceRPUConfig())
        analog.eval()
        box = {}

        def j_device():
            box["j"] = robustness.evaluate_analog(model, variables, xd, yd, dev, times=[T_READ], key=0, n_chips=Cd,
                                                  batch_size=Bd, preprocess=ds.preprocess)[0].per_chip
            return box["j"]

        def t_device():
            accs = []
            for chip in range(Cd):
                torch.manual_seed(chip)
                analog.program_analog_weights()
                analog.drift_analog_weights(T_READ)
                correct = 0
                with torch.no_grad():
                    for s in range(0, nd, Bd):
                        logits = analog(prep(xd[s:s + Bd], torch.contiguous_format))
                        correct += int((logits.argmax(1).numpy() == yd[s:s + Bd]).sum())
                accs.append(correct / nd)
            box["t"] = accs
            return accs

        t0 = time.perf_counter()
        j_device()
        report(f"jaxnoise first call (compile) {time.perf_counter() - t0:.1f} s")
        t_device()
        tj, tt = interleaved(j_device, t_device, args.repeats)
        rj, rt = Cd * nd / tj, Cd * nd / tt
        report(f"jaxnoise {rj:8.1f} image-chip-reads/s ({tj:.3f} s)   aihwkit {rt:8.1f} image-chip-reads/s "
               f"({tt:.3f} s, programming + drift + eval)   ratio {rj / rt:.2f}x")
        if "clean" in rates:
            cj, ct = rates["clean"]
            report(f"device / clean throughput: jaxnoise {rj / cj:.3f}, aihwkit vs PyTorch clean {rt / ct:.3f}")
        report(f"accuracy at t = 1 h (context only, the models differ, see the docstring): jaxnoise "
               f"{mean_se(box['j'])}, aihwkit {mean_se(box['t'])}")
        rows.append((f"device MC ({Cd} chips)", rj, rt, "image-chip-reads/s"))

    # ---- 5. train steps
    if "train" in args.jobs:
        bt, steps = args.train_batch_size, args.train_steps
        report(f"\n== 5. train steps, batch {bt}, SGD momentum 0.9, lr 0.1, weight decay 5e-4 on conv/linear "
               f"weights; the same preprocessed batch on both sides (no crop/flip); {steps} steps per round")
        idx = np.arange(bt) % len(ds.train)
        xb = np.array(jax.jit(ds.preprocess)(jnp.asarray(ds.train.images[idx])))   # (bt, 32, 32, 3) float32
        yb = np.asarray(ds.train.labels[idx], np.int32)
        xb_t = torch.from_numpy(xb).permute(0, 3, 1, 2).contiguous(memory_format=channels_last)
        yb_t = torch.from_numpy(yb.astype(np.int64))
        xb_j, yb_j = jnp.asarray(xb), jnp.asarray(yb)

        class Preprocessed:
            """The step's dataset: the batch is already preprocessed, no augmentation."""
            name = "preprocessed batch"
            image_shape = tuple(model.input_shape)

            @staticmethod
            def augment(key, images):
                return images

            @staticmethod
            def preprocess(images):
                return images

        def jax_runner(loss_fn):
            config = train.TrainConfig(epochs=1, batch_size=bt)
            optimizer = train.make_optimizer(config, 1000)
            step = train.make_train_step(model, loss_fn, optimizer, Preprocessed)
            hparams = methods.check_hparams(loss_fn.hparams, tuple(loss_fn.hparams))
            base = jax.random.key(1)
            box = {"state": train.init_state(model, variables, optimizer)}

            def run():
                s = box["state"]
                for _ in range(steps):
                    s, metrics = step(s, xb_j, yb_j, base, hparams)
                    if "first_loss" not in box:   # once, in the warm-up
                        box["first_loss"] = float(metrics["loss"])
                jax.block_until_ready((s, metrics))
                box["state"] = s
            return run, box

        def torch_runner(noisy: bool):
            m = torch_resnet(torch)
            m.load_state_dict(net.state_dict())
            m = m.to(memory_format=channels_last).train()
            decay = [mod.weight for _, mod in mvm_modules(torch, m)]
            ids = {id(p) for p in decay}
            other = [p for p in m.parameters() if id(p) not in ids]
            opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": other, "weight_decay": 0.0}],
                                  lr=0.1, momentum=0.9)
            clean_copies = [torch.empty_like(p) for p in decay]
            box = {}

            def run():
                for _ in range(steps):
                    opt.zero_grad(set_to_none=True)
                    if noisy:
                        with torch.no_grad():
                            for p, c in zip(decay, clean_copies):
                                c.copy_(p)
                                p.add_((TRAIN_ETA * p.abs().max()) * torch.randn_like(p))
                    loss = F.cross_entropy(m(xb_t), yb_t)
                    loss.backward()
                    if "first_loss" not in box:   # once, in the warm-up
                        box["first_loss"] = float(loss.detach())
                    if noisy:   # straight-through: the gradient at the noisy weights updates the clean ones
                        with torch.no_grad():
                            for p, c in zip(decay, clean_copies):
                                p.copy_(c)
                    opt.step()
            return run, box

        step_ms = {}   # the clean step's ms, jax and torch
        for label, loss_fn, noisy in (("clean step", methods.clean(model), False),
                                      (f"forward-noise step (eta {TRAIN_ETA})",
                                       methods.forward_noise(model, eta_train=TRAIN_ETA), True)):
            j_run, j_box = jax_runner(loss_fn)
            t_run, t_box = torch_runner(noisy)
            t0 = time.perf_counter()
            j_run()
            compile_s = time.perf_counter() - t0
            torch.manual_seed(0)
            t_run()
            report(f"{label}: jaxnoise first call {compile_s:.1f} s; loss of the first step (pretrained "
                   f"weights{', different draws each side' if noisy else ''}): jaxnoise {j_box['first_loss']:.5f}, "
                   f"PyTorch {t_box['first_loss']:.5f}")
            j_run()   # a second warm-up round each: the first steps after compilation run up to 1.8x slower
            t_run()
            tj, tt = interleaved(j_run, t_run, args.repeats)
            rj, rt = bt * steps / tj, bt * steps / tt
            report(f"{label}: jaxnoise {rj:7.1f} images/s ({1000 * tj / steps:.0f} ms/step)   PyTorch {rt:7.1f} "
                   f"images/s ({1000 * tt / steps:.0f} ms/step)   ratio {rj / rt:.2f}x")
            rows.append((f"train {label.split(' (')[0]}", rj, rt, "images/s"))
            step_ms.setdefault("jax", 1000 * tj / steps)
            step_ms.setdefault("torch", 1000 * tt / steps)
        conv_bound(torch, bt, args.repeats, step_ms, report)

    # ---- summary
    issue = {"clean eval": "0.76x", "weight MC": "0.79x", "activation noise": "488 vs 214 img/s",
             "device MC": "0.09x of clean", "train clean step": "0.24x"}
    report("\n== summary (jaxnoise/PyTorch > 1: jaxnoise faster; device: vs aihwkit)")
    report(f"{'job':28s} {'jaxnoise':>10s} {'PyTorch':>10s}  {'unit':20s} {'jaxnoise/PyTorch':>16s}  issue's table")
    for job, rj, rt, unit in rows:
        ref = next((v for k, v in issue.items() if job.startswith(k)), "")
        report(f"{job:28s} {rj:10.1f} {rt:10.1f}  {unit:20s} {rj / rt:15.2f}x  {ref}")
    report(load_line("after the run (this run included)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
