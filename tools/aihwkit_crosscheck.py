"""Layer-level cross-check of jaxnoise's device models against IBM aihwkit itself (issue 18, ask 2, first bullet).

For one dense layer (80 -> 24) and one conv layer (8 -> 6 channels, 3x3, stride 1, padding 1, on 6x6 images), each
non-ideality alone and all together (:data:`CONFIGS`), both simulators run the same float32 weights and inputs
``DRAWS`` times (default 1,000 per side). A draw is one independent realisation: a fresh chip (programming noise,
drift exponents), a fresh read at ``t`` (drift, read noise, compensation) and a fresh forward pass (output noise,
w_noise). The error of draw ``d`` is ``e_d = y_d - y_exact`` over the layer's K outputs (8 vectors x 24 outputs;
2 images x 6 x 6 x 6), ``y_exact = x @ W`` in float64.

Statistics and tolerances (from the sample sizes; the draws are i.i.d. within a side and the sides independent):

* bias = mean over draws of the per-draw mean error, and ms = mean over draws of the per-draw mean squared
  error: a two-sample z = (A - J) / sqrt(var_A / D + var_J / D) with the sample variances of the D per-draw values;
  pass when |z| < 4 (a false alarm 6e-5 per check).
* per-output mean error (K values) and per-output variance (K values): the same z per output (the variance's
  standard error from the sample fourth moment, sqrt((m4 - s^4) / D)); pass when max_k |z_k| is below the
  Bonferroni bound Phi^-1(1 - 0.001 / (2K)) (a false alarm of 0.1% per family: 4.4 for K = 192).
* aihwkit's CPU tile draws its output noise and w_noise from a fixed list of 32768 Gaussian numbers
  (``src/rpucuda/rng.h``, ``RNG::sampleGauss``: "Faster approximative RNG for CPU"; probe
  tools/aihwkit_probes/rng_probe.py: <= 32768 distinct values, list means off by up to 7 i.i.d. standard errors).
  Every draw of a layer then shares the list's mean and std, N(0, 1/32768) and 1 + N(0, 1/(2 x 32768)) away from
  0 and 1. Where that noise is on, the standard errors add this (taking all of aihwkit's variance v as such noise,
  an upper bound): sqrt(v / 32768) for a mean, v sqrt(2 / 32768) for a variance; coherent over outputs for the
  bias and mean square (mean_k sqrt(v_k) / sqrt(32768), mean_k v_k sqrt(2 / 32768)). PCM noise is torch's.
* A configuration without any noise is deterministic: both sides give the same output on every draw, so the
  check is the output itself: pass when every output agrees to 1e-4 of the largest |y_exact| except outputs at
  a quantisation tie (at most 1% of them, each off by one DAC or ADC step times the input scale; float32 sums in
  another order land on the other side of a rounding boundary).

Run (torch + aihwkit 1.2.0, see benchmarks/peer_torch.py; CPU):

  PYTHONPATH=. /work/.venv-peer/bin/python tools/aihwkit_crosscheck.py --log tools/aihwkit_crosscheck_cpu_<date>.txt
  PYTHONPATH=. /work/.venv-peer/bin/python tools/aihwkit_crosscheck.py --only dense --configs dac,all --draws 1000

tests/test_aihwkit_crosscheck.py runs the same checks under pytest (skipped where aihwkit is not importable).
The network-level check (ResNet-20, both presets, over time) is tools/aihwkit_network_check.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from statistics import NormalDist
from typing import Any

import numpy as np

DRAWS = 1000
Z_SCALAR = 4.0
FAMILY_ALPHA = 1e-3
AIHWKIT_GAUSS_LIST = 32768   # rpucuda/rng.h FIXED_LIST_SIZE: the CPU tile's normals come from a list this long
DENSE = dict(kind="dense", n_in=80, n_out=24, batch=8)
CONV = dict(kind="conv", cin=8, cout=6, k=3, stride=1, padding=1, hw=6, batch=2)
LAYERS = {"dense": DENSE, "conv": CONV}


@dataclasses.dataclass(frozen=True)
class Config:
    """One comparison: which non-idealities are on (both sides built from the same fields)."""

    name: str
    what: str
    dac: bool = False
    adc: bool = False            # ADC resolution and +-out_bound clipping
    out_noise: float = 0.0
    bm: bool = False             # iterative bound management (needs adc)
    w_noise: float = 0.0         # PCM_READ output-referred weight noise
    prog: float = 0.0            # PCMLikeNoiseModel scales; all 0 = no PCM (no program/drift calls)
    drift: float = 0.0
    read: float = 0.0
    t: float = 0.0
    compensation: str | None = None   # None, "global", "column", "global_exact"
    max_in: int = 0              # tile sizes (0: one tile)
    max_out: int = 0
    omega: float = 0.0
    columnwise: bool = False
    gain: float = 1.0            # weight multiplier (4: outputs past the ADC bound, bound management re-runs)
    preset: str | None = None    # "default": InferenceRPUConfig() as it is; "hwa": StandardHWATrainingPreset
    ranges: tuple[float, ...] | None = None   # "hwa": one input range per tile, jaxnoise's learned-range leaves
    layers: tuple[str, ...] = ("dense", "conv")

    @property
    def pcm(self) -> bool:
        return self.preset is not None or self.prog > 0 or self.drift > 0 or self.read > 0

    @property
    def tile_noise(self) -> bool:
        """Whether aihwkit's C++ tile draws noise (from its list of normals): output noise or w_noise."""
        return self.preset is not None or self.out_noise > 0 or self.w_noise > 0

    @property
    def noisy(self) -> bool:
        return self.pcm or self.tile_noise


CONFIGS = [
    Config("dac", "7-bit DAC with abs-max input scaling", dac=True),
    Config("adc", "9-bit ADC at +-12 (no bound management; gain 4: some outputs clip)", adc=True, gain=4.0),
    Config("out_noise", "output noise 0.06", out_noise=0.06),
    Config("bound_mgmt", "DAC + ADC + iterative bound management (gain 4)", dac=True, adc=True, bm=True, gain=4.0),
    Config("w_noise", "PCM_READ w_noise 0.0175", w_noise=0.0175),
    Config("prog", "PCM programming noise (t = 0)", prog=1.0),
    Config("drift", "PCM drift at 1 day", drift=1.0, t=86400.0),
    Config("read", "PCM read noise at 1 h", read=1.0, t=3600.0),
    Config("comp_global", "PCM at 1 day + global drift compensation", prog=1.0, drift=1.0, read=1.0, t=86400.0,
           compensation="global"),
    Config("comp_column", "PCM at 1 day + per-column drift compensation", prog=1.0, drift=1.0, read=1.0, t=86400.0,
           compensation="column"),
    Config("comp_exact", "PCM at 1 day + GlobalDriftCompensationWithExactReference (global_exact), DAC/ADC and "
           "output noise 0.06 on weights of gain 0.25 (the noise moves the I/O readout: 'global' fails here)",
           dac=True, adc=True, out_noise=0.06, prog=1.0, drift=1.0, read=1.0, t=86400.0, gain=0.25,
           compensation="global_exact"),
    Config("tiles", "DAC + ADC + noise + BM on tiles of 32 x 16 (dense 3 x 2, inputs 27/27/26; conv 3 x 1, "
           "24 inputs each, splitting channels)", dac=True, adc=True, out_noise=0.06, bm=True, max_in=32, max_out=16,
           gain=2.0),
    Config("tiles_groups", "the same on conv tiles of 36 inputs (2 groups of 4 channels) x 3 outputs (2 x 2)",
           dac=True, adc=True, out_noise=0.06, bm=True, max_in=36, max_out=4, gain=2.0, layers=("conv",)),
    Config("omega_column", "weight_scaling_omega 1 columnwise, I/O, PCM at 1 h, global compensation, tiles",
           dac=True, adc=True, out_noise=0.06, bm=True, prog=1.0, drift=1.0, read=1.0, t=3600.0,
           compensation="global", max_in=32, max_out=16, omega=1.0, columnwise=True),
    Config("all", "everything: I/O, PCM at 1 day, global compensation, tiles of 32 x 16", dac=True, adc=True,
           out_noise=0.06, bm=True, prog=1.0, drift=1.0, read=1.0, t=86400.0, compensation="global", max_in=32,
           max_out=16),
    Config("preset_default", "aihwkit InferenceRPUConfig() vs preset aihwkit_inference_default, at 1 h",
           preset="default", t=3600.0),
    Config("preset_hwa", "StandardHWATrainingPreset (ir_drop 0, input range 3) vs hwa_standard, at 1 h; 40 -> "
           "2 tiles of 40 inputs", preset="hwa", t=3600.0, max_in=40),
    Config("preset_hwa_ranges", "the same with learned input ranges 1.5 / 2.5 on the two tiles (jaxnoise: "
           "input_range leaves)", preset="hwa", t=3600.0, max_in=40, ranges=(1.5, 2.5)),
]
CONFIG_NAMES = [c.name for c in CONFIGS]


# ----------------------------------------------------------------------------------------------------------------
# The shared layer data


def layer_data(layer: dict, gain: float, seed: int = 0):
    """``(W, x)``: jaxnoise kernel (dense (n_in, n_out), conv HWIO) and inputs (dense (B, n_in), conv NHWC), float32.
    One dense input row and one conv image corner are all zero (aihwkit reads an all-zero vector as exactly 0)."""
    rng = np.random.default_rng(seed)
    if layer["kind"] == "dense":
        w = rng.uniform(-0.5, 0.5, (layer["n_in"], layer["n_out"])) * gain
        x = rng.normal(0.0, 1.0, (layer["batch"], layer["n_in"]))
        x[1] = 0.0
    else:
        k, cin, cout = layer["k"], layer["cin"], layer["cout"]
        w = rng.uniform(-0.5, 0.5, (k, k, cin, cout)) * gain
        x = np.maximum(rng.normal(0.0, 1.0, (layer["batch"], layer["hw"], layer["hw"], cin)), 0.0)
        x[0, :2, :2, :] = 0.0
    return w.astype(np.float32), x.astype(np.float32)


def exact(layer: dict, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    w, x = w.astype(np.float64), x.astype(np.float64)
    if layer["kind"] == "dense":
        return x @ w
    k, p, s = layer["k"], layer["padding"], layer["stride"]
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho = (x.shape[1] + 2 * p - k) // s + 1
    out = np.zeros((x.shape[0], ho, ho, w.shape[-1]))
    for i in range(ho):
        for j in range(ho):
            out[:, i, j] = np.einsum("nabc,abco->no", xp[:, i * s:i * s + k, j * s:j * s + k], w)
    return out


# ----------------------------------------------------------------------------------------------------------------
# aihwkit


def aihwkit_rpu_config(cfg: Config):
    from aihwkit.inference.compensation.drift import (
        GlobalDriftCompensation,
        GlobalDriftCompensationWithExactReference,
        PerColumnDriftCompensation,
    )
    from aihwkit.inference.noise.pcm import PCMLikeNoiseModel
    from aihwkit.simulator.configs import InferenceRPUConfig
    from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType, WeightNoiseType
    from aihwkit.simulator.presets import StandardHWATrainingPreset

    if cfg.preset == "default":
        c = InferenceRPUConfig()
    elif cfg.preset == "hwa":
        c = StandardHWATrainingPreset()
        c.forward.ir_drop = 0.0   # not modelled by jaxnoise (docs/aihwkit_presets.md)
    else:
        c = InferenceRPUConfig()
        f = c.forward
        f.noise_management = NoiseManagementType.ABS_MAX
        f.inp_res = 1 / 126 if cfg.dac else -1.0
        f.out_res = 1 / 510 if cfg.adc else -1.0
        f.out_bound = 12.0 if cfg.adc else -1.0
        f.out_noise = cfg.out_noise
        f.bound_management = BoundManagementType.ITERATIVE if cfg.bm else BoundManagementType.NONE
        f.w_noise = cfg.w_noise
        f.w_noise_type = WeightNoiseType.PCM_READ if cfg.w_noise > 0 else WeightNoiseType.NONE
        c.noise_model = PCMLikeNoiseModel(prog_noise_scale=cfg.prog, read_noise_scale=cfg.read,
                                          drift_scale=cfg.drift)
        c.drift_compensation = {None: None, "global": GlobalDriftCompensation(),
                                "column": PerColumnDriftCompensation(),
                                "global_exact": GlobalDriftCompensationWithExactReference()}[cfg.compensation]
        c.mapping.weight_scaling_omega = cfg.omega
        c.mapping.weight_scaling_columnwise = cfg.columnwise
    if cfg.preset != "default":
        c.mapping.max_input_size = cfg.max_in
        c.mapping.max_output_size = cfg.max_out
    return c


def aihwkit_draws(cfg: Config, layer: dict, w: np.ndarray, x: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """``(draws, K)`` outputs of aihwkit (conv outputs as NHWC)."""
    import torch
    from aihwkit.nn import AnalogConv2d, AnalogLinear

    torch.manual_seed(seed)
    rpu = aihwkit_rpu_config(cfg)
    if layer["kind"] == "dense":
        m = AnalogLinear(layer["n_in"], layer["n_out"], bias=False, rpu_config=rpu)
        m.set_weights(torch.from_numpy(np.ascontiguousarray(w.T)))
        xt = torch.from_numpy(x)
    else:
        m = AnalogConv2d(layer["cin"], layer["cout"], layer["k"], stride=layer["stride"], padding=layer["padding"],
                         bias=False, rpu_config=rpu)
        m.set_weights(torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))))
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    m.eval()
    if cfg.preset == "hwa":
        tiles = list(m.analog_tiles())
        for tile, r in zip(tiles, cfg.ranges or (3.0,) * len(tiles)):
            tile.set_input_range(r)

    def flat(y):   # conv outputs NCHW -> NHWC, the order of jaxnoise's
        y = y.detach().numpy().astype(np.float64)
        return y if layer["kind"] == "dense" else y.transpose(0, 2, 3, 1)

    out = []
    with torch.no_grad():
        if not cfg.pcm:   # no chip: every draw is a forward pass; one batch of `draws` copies of x
            reps = xt.repeat((draws,) + (1,) * (xt.ndim - 1))
            y = flat(m(reps))
            return y.reshape(draws, -1)
        for _ in range(draws):
            m.program_analog_weights()
            m.drift_analog_weights(cfg.t)
            out.append(flat(m(xt)).reshape(-1))
    return np.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# jaxnoise


def jaxnoise_spec(cfg: Config):
    from jaxnoise import analog as analog_lib

    if cfg.preset == "default":
        return analog_lib.preset("aihwkit_inference_default").replace(t_inference=cfg.t)
    if cfg.preset == "hwa":
        spec = analog_lib.preset("hwa_standard")
        return spec.replace(io=spec.io.replace(inp_ranges={"layer": 3.0}), max_input_size=cfg.max_in,
                            max_output_size=cfg.max_out, t_inference=cfg.t)
    io = analog_lib.IOParams(inp_res=1 / 126 if cfg.dac else None, out_res=1 / 510 if cfg.adc else None,
                         out_bound=12.0 if cfg.adc else None, out_noise=cfg.out_noise, w_noise=cfg.w_noise,
                         bound_management="iterative" if cfg.bm else "none")
    pcm = (analog_lib.PCMModel(prog_noise_scale=cfg.prog, read_noise_scale=cfg.read, drift_scale=cfg.drift)
           if cfg.pcm else None)
    return analog_lib.AnalogSpec(io=io, pcm=pcm, compensation=cfg.compensation, weight_scaling_omega=cfg.omega,
                             weight_scaling_columnwise=cfg.columnwise, max_input_size=cfg.max_in,
                             max_output_size=cfg.max_out, t_inference=cfg.t, name=f"crosscheck:{cfg.name}")


def jaxnoise_draws(cfg: Config, layer: dict, w: np.ndarray, x: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """``(draws, K)`` outputs of jaxnoise: draw ``d`` programs chip ``fold_in(key(seed), d)``, reads it and runs one
    forward pass (the library's keys; ``jaxnoise.analog.read`` + ``AnalogContext``)."""
    import jax
    import jax.numpy as jnp

    from jaxnoise import analog as analog_lib

    spec = jaxnoise_spec(cfg)
    params = {"layer": {"kernel": jnp.asarray(w)}}
    xj = jnp.asarray(x)
    geo = None if layer["kind"] == "dense" else {"stride": layer["stride"], "padding": layer["padding"]}

    ranges = None
    if cfg.ranges is not None:   # learned input ranges, one per tile (T_in, T_out)
        grid = analog_lib.tile_layout(w.shape, spec).shape[:2]
        ranges = jnp.asarray(cfg.ranges, jnp.float32).reshape(grid)

    def one(key):
        chip = analog_lib.read(analog_lib.chip_key(key), params, spec, spec.t_inference)
        return analog_lib.AnalogContext(chip, key).mvm("layer", xj, params["layer"]["kernel"], geo, ranges).reshape(-1)

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(draws, dtype=jnp.uint32))
    return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass
class Result:
    layer: str
    config: str
    draws: int
    passed: bool
    line: str
    detail: dict[str, Any]


def _z(a: np.ndarray, b: np.ndarray, extra: float) -> float:
    """Two-sample z of the means of i.i.d. samples a, b; ``extra``: a further standard error (added in squares)."""
    se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b) + extra ** 2)
    return float((np.mean(a) - np.mean(b)) / se)


def _z_var(a: np.ndarray, b: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Per-column z of the sample variances (standard errors from the sample fourth moments, plus ``extra``)."""
    def stats(s):
        c = s - s.mean(axis=0)
        var = np.mean(c ** 2, axis=0) * len(s) / (len(s) - 1)
        m4 = np.mean(c ** 4, axis=0)
        return var, np.maximum(m4 - var ** 2, 0.0) / len(s)
    va, sa = stats(a)
    vb, sb = stats(b)
    return (va - vb) / np.sqrt(sa + sb + extra ** 2)


def compare(cfg: Config, layer_name: str, draws: int = DRAWS, seed: int = 0) -> Result:
    layer = LAYERS[layer_name]
    w, x = layer_data(layer, cfg.gain)
    y0 = exact(layer, w, x).reshape(-1)
    scale = float(np.max(np.abs(y0)))
    t0 = time.perf_counter()
    ya = aihwkit_draws(cfg, layer, w, x, draws, seed)
    ta = time.perf_counter() - t0
    t0 = time.perf_counter()
    yj = jaxnoise_draws(cfg, layer, w, x, draws, seed)
    tj = time.perf_counter() - t0
    ea, ej = ya - y0, yj - y0
    k = ea.shape[1]
    rms_a, rms_j = math.sqrt(float(np.mean(ea ** 2))), math.sqrt(float(np.mean(ej ** 2)))
    detail: dict[str, Any] = dict(K=k, rms_exact=math.sqrt(float(np.mean(y0 ** 2))), bias_a=float(np.mean(ea)),
                                  bias_j=float(np.mean(ej)), rms_a=rms_a, rms_j=rms_j, seconds_a=ta, seconds_j=tj)
    if not cfg.noisy:
        # deterministic: every draw gives the same output on both sides (checked), then output by output
        spread = max(float(np.max(np.ptp(ya, axis=0))), float(np.max(np.ptp(yj, axis=0))))
        diff = np.abs(ya[0] - yj[0])
        tol = 1e-4 * scale
        off = diff > tol
        frac = float(np.mean(off))
        passed = spread <= tol and frac <= 0.01
        detail.update(spread=spread, max_diff=float(np.max(diff)), frac_off=frac, n_off=int(np.sum(off)))
        verdict = "PASS" if passed else "FAIL"
        line = (f"{layer_name:5s} {cfg.name:13s} deterministic  rms err aihwkit {rms_a:.5f} jaxnoise {rms_j:.5f}  "
                f"outputs off by > {tol:.1e}: {int(np.sum(off))}/{k} (max {np.max(diff):.4f})  {verdict}")
        return Result(layer_name, cfg.name, draws, passed, line, detail)
    floor = 1e-7 * max(scale, 1e-12)
    v_k = ea.var(axis=0, ddof=1)   # aihwkit's per-output variance (the list allowance's upper bound)
    n_list = AIHWKIT_GAUSS_LIST if cfg.tile_noise else math.inf
    z_bias = _z(ea.mean(axis=1), ej.mean(axis=1), math.hypot(floor, float(np.mean(np.sqrt(v_k))) / math.sqrt(n_list)))
    z_ms = _z((ea ** 2).mean(axis=1), (ej ** 2).mean(axis=1),
              math.hypot(floor ** 2, float(np.mean(v_k)) * math.sqrt(2 / n_list)))
    se_k = np.sqrt(v_k / draws + ej.var(axis=0, ddof=1) / draws + v_k / n_list + floor ** 2)
    z_mean_k = (ea.mean(axis=0) - ej.mean(axis=0)) / se_k
    z_var_k = _z_var(ea, ej, np.hypot(floor ** 2, v_k * math.sqrt(2 / n_list)))
    crit = NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * k))
    worst_mean, worst_var = float(np.max(np.abs(z_mean_k))), float(np.max(np.abs(z_var_k)))
    passed = abs(z_bias) < Z_SCALAR and abs(z_ms) < Z_SCALAR and worst_mean < crit and worst_var < crit
    detail.update(z_bias=z_bias, z_ms=z_ms, max_z_mean=worst_mean, max_z_var=worst_var, crit=crit)
    verdict = "PASS" if passed else "FAIL"
    line = (f"{layer_name:5s} {cfg.name:13s} rms err aihwkit {rms_a:.5f} jaxnoise {rms_j:.5f} "
            f"(ratio {rms_j / rms_a if rms_a else float('nan'):.3f})  bias {np.mean(ea):+.5f} {np.mean(ej):+.5f}  "
            f"z bias {z_bias:+.2f} ms {z_ms:+.2f} (< {Z_SCALAR:g})  max|z| per output mean {worst_mean:.2f} "
            f"var {worst_var:.2f} (< {crit:.2f})  {verdict}")
    return Result(layer_name, cfg.name, draws, passed, line, detail)


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=DRAWS, help=f"draws per side (default {DRAWS})")
    p.add_argument("--configs", default=",".join(CONFIG_NAMES), help="comma-separated subset of " +
                   ",".join(CONFIG_NAMES))
    p.add_argument("--only", default="dense,conv", help="layers: dense, conv or both (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="also write the report to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import aihwkit
        import torch
    except Exception as e:   # ImportError, or OSError when libopenblas is missing
        print(f"aihwkit/torch not importable ({type(e).__name__}: {e}); run this in the peer venv "
              f"(/work/.venv-peer, see benchmarks/peer_torch.py). Nothing was checked.")
        return 0
    import platform

    import jax
    torch.set_num_threads(1)
    lines: list[str] = []

    def report(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    report(f"$ python tools/aihwkit_crosscheck.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    report(f"date {time.strftime('%Y-%m-%d %H:%M:%S')}; host {platform.node()}; aihwkit {aihwkit.__version__}, "
           f"torch {torch.__version__}, jax {jax.__version__} ({jax.default_backend()})")
    report(f"{args.draws} draws per side; z bounds: |z| < {Z_SCALAR:g} for bias and mean square, Bonferroni "
           f"Phi^-1(1 - {FAMILY_ALPHA:g} / 2K) per output")
    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIG_NAMES))
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {CONFIG_NAMES}")
    results = []
    for cfg in CONFIGS:
        if cfg.name not in names:
            continue
        report(f"\n-- {cfg.name}: {cfg.what}")
        for layer in args.only.split(","):
            if layer not in cfg.layers:
                continue
            r = compare(cfg, layer, args.draws, args.seed)
            results.append(r)
            report(r.line + f"   [{r.detail['seconds_a']:.1f} s / {r.detail['seconds_j']:.1f} s]")
    n_pass = sum(r.passed for r in results)
    report(f"\n{n_pass}/{len(results)} comparisons pass")
    for r in results:
        if not r.passed:
            report(f"FAILED {r.layer} {r.config}: {r.detail}")
    if args.log:
        with open(args.log, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
