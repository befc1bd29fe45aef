"""Analog device models: PCM conductances, the analog MVM's DAC/ADC I/O, drift compensation and weight modifiers.

Pure JAX functions with explicit keys, composable with :class:`jaxnoise.noise.NoiseSpec`. Part of the noise core:
it imports no model. The formulas and defaults are those of IBM aihwkit (``PCMLikeNoiseModel``, ``IOParameters``,
``GlobalDriftCompensation``, ``WeightModifierParameter``, ``StandardHWATrainingPreset``) as written down in
``../shared/DEVICE-MODELS.md``; every constant is a field. Conductances are in microsiemens, times in seconds.

One analog layer (a conv or dense kernel ``W`` selected by :attr:`AnalogSpec.analog_layers`) goes through aihwkit's
``InferenceRPUConfig`` pipeline (``docs/aihwkit_presets_audit.md``; ``docs/aihwkit_presets.md`` for what differs and
the measured agreement):

1. **Tiles** (:class:`TileLayout`): the layer's matrix (inputs in aihwkit/torch order, (cin, kh, kw) for a conv) is
   cut into tiles of at most ``max_input_size x max_output_size`` (512 x 512), even contiguous splits.
2. **Tile units** (:attr:`AnalogSpec.weight_scaling_omega`): each tile holds the raw weights (omega 0, aihwkit's
   default) or ``W_tile / a`` with ``a = max|W_tile| / omega`` (per tile column with ``weight_scaling_columnwise``),
   its output multiplied by ``a`` after the ADC.
3. **Conductances** per tile: ``s = (g_max - g_min) / max|w|``, a differential pair ``g+ = clip(w s, 0, g_max) +
   g_min``, ``g- = clip(-w s, 0, g_max) + g_min``.
4. **Programming** (once per chip, :func:`program_chip`): PCM programming noise and per-device drift exponents nu
   from the target conductance; the drift-compensation reference ``r0`` of each tile (:func:`compensation_readout`).
5. **Reading at time t** (:func:`read_chip`): the programmed tile weights converted again onto one device of each
   pair, ``g (t/t0)^-nu`` plus 1/f read noise, fresh for every read; ``alpha = r0 / r_t`` per tile.
6. **MVM** (:func:`tiled_mvm`): every tile runs :func:`analog_mvm` on its slice of each input vector (its own
   input scaling, DAC, output-referred read noise, output noise, ADC and bound management); its output times ``a``
   and ``alpha``; the input tiles' outputs summed in float; the bias (digital) added by the layer.

**Learned input ranges** (:class:`InputRange`, aihwkit ``InputRangeParameter``; on in ``hwa_standard``): a layer
whose parameters hold ``input_range`` leaves (one per tile, :func:`init_input_ranges`) clips each tile's input to
its range and runs the tile at that input scale; the ranges train with aihwkit's gradient rule (custom VJP).
**Drift compensation** ``"global"``, ``"column"`` or ``"global_exact"`` (reference from the unprogrammed weights).

``IOParams(semantics="v0")`` (:data:`LEGACY_IO`) keeps the pipeline before 2026-12-02 bit for bit: one tile per
layer holding ``W / A`` (``A = max|W|`` per tensor or column), drift and read noise on both programmed devices, the
readout's one-hot divided by the input range.

**Semantics.** One chip = one programming draw (conductances and drift exponents). The same chip can be read at any
number of times; each read draws fresh read noise. Each forward pass draws fresh output (ADC) noise. Inference time
is array data (``AnalogSpec.t_inference`` or the ``times`` of ``robustness.evaluate_analog``), so a time sweep
compiles once.

**Keys** (all derived by name, :func:`jaxnoise.noise.name_key`): a chip key ``K`` gives the programming noise of
tile ``(i, j)`` of layer ``path`` from ``name_key(name_key(name_key(K, "jaxnoise/device/program"), path),
f"tile/{i}/{j}")`` and its drift exponents from ``".../drift"``; a read key gives read noise per tile; a pass key
gives output noise per site and tile (and per bound-management round). Under semantics "v0" there is no tile level.

**Random streams and float order.** PCM programming, drift-exponent and read noise are ``jax.random.normal`` of
their keys (computed for all layers at once, bit for bit). The I/O noise uses :attr:`IOParams.sampler` (on CPU by
default the cheaper ``"threefry/icdf16"`` normals of the activation noise) and a per-patch conv MVM sums each patch
in one dot product (:attr:`IOParams.conv_sum`), with aihwkit's bound-management and zero-vector semantics
(:attr:`IOParams.semantics`); ``IOParams(sampler="threefry/erfinv", conv_sum="taps", semantics="v0")`` (:data:`LEGACY_IO`)
gives the results of the code before these defaults (2026-12) bit for bit (``tests/test_device.py`` keeps that code
and checks it).

**Gradients.** The analog MVM is straight-through: its value is the analog output, its gradient that of the exact
linear map at the chip's (noisy) weights; weight noise (programming noise, modifiers) is straight-through to the
clean weights, as in aihwkit's hardware-aware training. The weight scales ``a`` are treated as constants.

References:
  Joshi et al., Nature Communications 11, 2473 (2020); Nandakumar et al., ISCAS 2019 (PCM model);
  Rasch et al., Nature Communications 14, 5282 (2023) (aihwkit HWA training, ``StandardHWATrainingPreset``);
  aihwkit ``src/aihwkit/inference/noise/pcm.py``, ``src/aihwkit/simulator/parameters/io.py``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from jaxnoise import _checks
from jaxnoise import noise as noise_lib

NOISE_MANAGEMENT = ("abs_max", "constant")
BOUND_MANAGEMENT = ("none", "iterative")
CONV_SUMS = ("patch", "taps")
IO_SEMANTICS = ("aihwkit", "v0")
# IOParams fields that reproduce the I/O numerics before 2026-12 bit for bit (committed results made then).
LEGACY_IO = {"sampler": "threefry/erfinv", "conv_sum": "taps", "semantics": "v0"}
MAPPINGS = ("tensor", "column")
COMPENSATIONS = (None, "global", "column", "global_exact")
MODIFIER_KINDS: dict[str, str] = {
    "add_normal": "w + std * A * N(0,1) (aihwkit ADD_NORMAL)",
    "mult_normal": "w * (1 + std * N(0,1)) (aihwkit MULT_NORMAL)",
    "poly": "w + A * std * (c0 + c1 |w|/A + c2 (|w|/A)^2) * N(0,1) (aihwkit POLY)",
    "discretize": "A * res * round(w / (A * res)) (aihwkit DISCRETIZE)",
}
COMPENSATION_FLOOR = 1e-4  # aihwkit's clamp of the readout (min=0.0001)


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers (the shared rules of jaxnoise._checks; the private names stay for existing callers)


_concrete = _checks.is_concrete_number  # a concrete number or array (not None, not a tracer, not a placeholder)
_check_positive = _checks.positive


def _check_nonnegative(value: Any, name: str) -> None:
    _checks.nonnegative(value, name, "it is a scale or conductance", "use 0 to turn it off")


def check_times(times: Any, name: str = "t_inference") -> None:
    """Raises ValueError when concrete inference times are negative, NaN or infinite (seconds after programming)."""
    noise_lib.check_nonnegative(times, name, "inference times are seconds after programming",
                                "0 = just programmed; 3600 = one hour later")


_choice = _checks.choice


# ----------------------------------------------------------------------------------------------------------------
# Weights <-> conductances


def _max_abs(w: jax.Array, per_column: bool) -> jax.Array:
    """max|W| over the tensor (scalar) or per output column (last axis), never 0 (an all-zero tensor maps to 0)."""
    axes = tuple(range(w.ndim - 1)) if per_column else None
    a = jnp.max(jnp.abs(w), axis=axes)
    return jnp.where(a > 0, a, jnp.ones_like(a))


def weights_to_conductances(w: jax.Array, g_max: Any = 25.0, g_min: Any = 0.0, *, per_column: bool = False):
    """Differential-pair conductances of a weight tensor (aihwkit ``SinglePairConductanceConverter``).

    ``s = (g_max - g_min) / max|W|``; ``g+ = clip(W s, 0, g_max) + g_min``, ``g- = clip(-W s, 0, g_max) + g_min``.
    The ``g_max`` clip only bites on ``g_min > 0`` (then ``W s`` can reach ``g_max - g_min`` < ``g_max``).

    Args:
      w: the weights; the last axis is the output column.
      g_max: the largest conductance (uS), > 0.
      g_min: the conductance of an "off" device (uS), 0 <= g_min < g_max.
      per_column: one scale per output column (last axis) instead of one per tensor.

    Returns:
      ``(g_plus, g_minus, scale)``; ``scale`` is ``s`` (scalar, or shape ``(w.shape[-1],)`` per column), and
      :func:`conductances_to_weights` inverts the map exactly (up to float rounding).
    """
    _check_positive(g_max, "g_max", "the largest device conductance in uS (aihwkit default 25)")
    _check_nonnegative(g_min, "g_min")
    if _concrete(g_max) and _concrete(g_min) and float(np.max(g_min)) >= float(np.min(g_max)):
        raise ValueError(f"g_min={g_min!r} must be smaller than g_max={g_max!r}.")
    g_max = jnp.asarray(g_max, w.dtype)
    g_min = jnp.asarray(g_min, w.dtype)
    scale = (g_max - g_min) / _max_abs(w, per_column)
    ws = w * scale
    g_plus = jnp.clip(ws, 0.0, g_max) + g_min
    g_minus = jnp.clip(-ws, 0.0, g_max) + g_min
    return g_plus, g_minus, scale


def conductances_to_weights(g_plus: jax.Array, g_minus: jax.Array, scale: jax.Array) -> jax.Array:
    """Weights of a differential pair: ``(g+ - g-) / s``."""
    return (g_plus - g_minus) / scale


# ----------------------------------------------------------------------------------------------------------------
# PCM model (aihwkit PCMLikeNoiseModel)


@struct.dataclass
class PCMModel:
    """PCM statistical model of aihwkit's ``PCMLikeNoiseModel`` (Nandakumar et al. 2019, Joshi et al. 2020).

    Every field is a pytree leaf (float or tuple of floats), so a spec with other constants reuses compiled code.

    Attributes:
      prog_coeff: ``(c0, c1, c2)`` of ``sigma_prog = (c0 + c1 x + c2 x^2) g_max / 25``, ``x = g_T / g_max``.
      prog_noise_scale, read_noise_scale, drift_scale: multipliers of programming noise, read noise and nu
        (aihwkit's ``prog_noise_scale``, ``read_noise_scale``, ``drift_scale``; 1 = the model, 0 = off).
      t0: time of the first read after programming (s); drift is relative to it.
      t_read: duration of one read (s), in the 1/f noise integral.
      drift_mu: ``(a, b)`` of ``mu_nu = a ln g_rel + b``; ``drift_mu_clip`` its ``(lo, hi)``.
      drift_sigma: ``(a, b)`` of ``sigma_nu = a ln g_rel + b``; ``drift_sigma_clip`` its ``(lo, hi)``.
      g_rel_min: floor of ``g_rel = |g_T| / g_max`` in the drift-exponent formulas.
      read_q: ``(q, exponent, floor, cap)`` of ``Q_s = min(q / max((|g_prog|/g_max)^exponent, floor), cap)``.
    """

    prog_coeff: tuple = (0.26348, 1.9650, -1.1731)
    prog_noise_scale: Any = 1.0
    read_noise_scale: Any = 1.0
    drift_scale: Any = 1.0
    t0: Any = 20.0
    t_read: Any = 250e-9
    drift_mu: tuple = (-0.0155, 0.0244)
    drift_mu_clip: tuple = (0.049, 0.1)
    drift_sigma: tuple = (-0.0125, -0.0059)
    drift_sigma_clip: tuple = (0.008, 0.045)
    g_rel_min: Any = 1e-7
    read_q: tuple = (0.0088, 0.65, 1e-3, 0.2)

    def __post_init__(self):
        for name in ("prog_noise_scale", "read_noise_scale", "drift_scale"):
            _check_nonnegative(getattr(self, name), f"PCMModel.{name}")
        _check_positive(self.t0, "PCMModel.t0", "the first read after programming, in seconds (aihwkit: 20)")
        _check_positive(self.t_read, "PCMModel.t_read", "the read duration in seconds (aihwkit: 250e-9)")


def programming_noise_std(g_target: jax.Array, pcm: PCMModel, g_max: Any = 25.0) -> jax.Array:
    """``sigma_prog(g_T) = (c0 + c1 x + c2 x^2) * g_max / 25`` with ``x = g_T / g_max`` (uS), times
    ``prog_noise_scale``. Source: aihwkit ``PCMLikeNoiseModel.apply_programming_noise_to_conductance``."""
    c0, c1, c2 = (jnp.asarray(c, g_target.dtype) for c in pcm.prog_coeff)
    g_max = jnp.asarray(g_max, g_target.dtype)
    x = g_target / g_max
    return (c0 + c1 * x + c2 * x * x) * g_max / 25.0 * pcm.prog_noise_scale


def program_conductances(key: jax.Array, g_target: jax.Array, pcm: PCMModel, g_max: Any = 25.0) -> jax.Array:
    """One programming draw: ``g_prog = max(g_T + sigma_prog(g_T) N(0,1), 0)``."""
    return _programmed(g_target, jax.random.normal(key, g_target.shape, g_target.dtype), pcm, g_max)


def _programmed(g_target: jax.Array, z: jax.Array, pcm: PCMModel, g_max: Any) -> jax.Array:
    return jnp.maximum(g_target + programming_noise_std(g_target, pcm, g_max) * z, 0.0)


def drift_exponent_stats(g_target: jax.Array, pcm: PCMModel, g_max: Any = 25.0) -> tuple[jax.Array, jax.Array]:
    """``(mu_nu, sigma_nu)`` of the drift exponent at each target conductance (aihwkit
    ``PCMLikeNoiseModel.generate_drift_coefficients``): ``g_rel = max(|g_T| / g_max, 1e-7)``,
    ``mu_nu = clip(-0.0155 ln g_rel + 0.0244, 0.049, 0.1)``, ``sigma_nu = clip(-0.0125 ln g_rel - 0.0059, 0.008,
    0.045)``."""
    dt = g_target.dtype
    g_rel = jnp.maximum(jnp.abs(g_target) / jnp.asarray(g_max, dt), jnp.asarray(pcm.g_rel_min, dt))
    ln = jnp.log(g_rel)
    mu = jnp.clip(pcm.drift_mu[0] * ln + pcm.drift_mu[1], pcm.drift_mu_clip[0], pcm.drift_mu_clip[1])
    sigma = jnp.clip(pcm.drift_sigma[0] * ln + pcm.drift_sigma[1], pcm.drift_sigma_clip[0], pcm.drift_sigma_clip[1])
    return mu.astype(dt), sigma.astype(dt)


def drift_exponents(key: jax.Array, g_target: jax.Array, pcm: PCMModel, g_max: Any = 25.0) -> jax.Array:
    """Per-device drift exponents ``nu = |mu_nu + sigma_nu N(0,1)| * drift_scale`` (fixed per chip)."""
    return _exponents(g_target, jax.random.normal(key, g_target.shape, g_target.dtype), pcm, g_max)


def _exponents(g_target: jax.Array, z: jax.Array, pcm: PCMModel, g_max: Any) -> jax.Array:
    mu, sigma = drift_exponent_stats(g_target, pcm, g_max)
    return jnp.abs(mu + sigma * z) * pcm.drift_scale


def drift(g_prog: jax.Array, nu: jax.Array, t_inference: Any, pcm: PCMModel) -> jax.Array:
    """``g_prog ((t_inference + t0) / t0)^-nu`` (the factor is 1 at ``t_inference = 0``)."""
    t0 = jnp.asarray(pcm.t0, g_prog.dtype)
    t = jnp.asarray(t_inference, g_prog.dtype) + t0
    return g_prog * jnp.power(t / t0, -nu)


def read_noise_std(g_prog: jax.Array, t_inference: Any, pcm: PCMModel, g_max: Any = 25.0) -> jax.Array:
    """Relative 1/f read-noise std: ``Q_s sqrt(ln((t + t_read) / (2 t_read)))`` with ``t = t_inference + t0`` and
    ``Q_s = min(0.0088 / max((|g_prog|/g_max)^0.65, 1e-3), 0.2)``, times ``read_noise_scale``."""
    dt = g_prog.dtype
    q, exponent, floor, cap = pcm.read_q
    g_rel = jnp.abs(g_prog) / jnp.asarray(g_max, dt)
    q_s = jnp.minimum(q / jnp.maximum(jnp.power(g_rel, exponent), floor), cap)
    t = jnp.asarray(t_inference, dt) + jnp.asarray(pcm.t0, dt)
    t_read = jnp.asarray(pcm.t_read, dt)
    return q_s * jnp.sqrt(jnp.log((t + t_read) / (2 * t_read))) * pcm.read_noise_scale


def read_conductances(key: jax.Array, g_prog: jax.Array, nu: jax.Array, t_inference: Any, pcm: PCMModel,
                      g_max: Any = 25.0) -> jax.Array:
    """One read at ``t_inference`` s after programming: ``g_d = drift(g_prog)``, then
    ``max(g_d + |g_d| sigma_rd N(0,1), 0)`` with fresh noise (aihwkit ``apply_drift_noise_to_conductance``)."""
    check_times(t_inference)
    return _read(g_prog, nu, t_inference, jax.random.normal(key, g_prog.shape, g_prog.dtype), pcm, g_max)


def _read(g_prog: jax.Array, nu: jax.Array, t_inference: Any, z: jax.Array, pcm: PCMModel, g_max: Any) -> jax.Array:
    g_d = drift(g_prog, nu, t_inference, pcm)
    return jnp.maximum(g_d + jnp.abs(g_d) * read_noise_std(g_prog, t_inference, pcm, g_max) * z, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Many normal draws at once


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1: jax.Array, k2: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 (20 rounds) block function of JAX (``jax._src.random.threefry2x32``), written out with
    jnp ops on uint32 arrays (broadcasting keys against counters), so XLA fuses it like any elementwise code."""
    def rotl(v, d):
        return (v << np.uint32(d)) | (v >> np.uint32(32 - d))

    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ rotl(x1, r)
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _fast_normals(keys: list[jax.Array], dtype) -> bool:
    """Whether :func:`_normals` may compute the draws itself: float32 normals of threefry2x32 keys with JAX's
    partitionable bit stream (the defaults), each of fewer than 2**32 numbers."""
    if np.dtype(dtype) != np.float32 or not jax.config.jax_threefry_partitionable:
        return False
    for k in keys:
        if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):   # a typed key (or an array of them) of its implementation
            ok = "threefry2x32" in str(jax.random.key_impl(k))
        else:   # a raw uint32[2] key: the default implementation's
            ok = k.shape == (2,) and "threefry2x32" in str(jax.config.jax_default_prng_impl)
        if not ok:
            return False
    return True


def _key_batch(k: jax.Array) -> tuple[int, ...]:
    """The batch shape of a key argument of :func:`_normals`: a typed key array's shape; () for a raw key."""
    return tuple(k.shape) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else ()


def _normal_draw(k: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """``jax.random.normal(k, shape, dtype)``; for an array of typed keys, one such draw per key (batch + shape)."""
    batch = _key_batch(k)
    if not batch:
        return jax.random.normal(k, shape, dtype)
    flat = jax.vmap(lambda kk: jax.random.normal(kk, shape, dtype))(k.reshape(-1))
    return flat.reshape(batch + tuple(shape))


def _normals(draws: list[tuple[jax.Array, tuple[int, ...]]], dtype) -> list[jax.Array]:
    """``[jax.random.normal(key, shape, dtype) for key, shape in draws]``, bit for bit, as one computation.

    A key may be an array of typed keys (the tiles of a layer): its entry is then ``batch + shape``, draw ``b`` that
    of ``key[b]`` alone. A program with one draw per layer (several per layer: programming, drift exponents, reads)
    compiled a few tenths of a second per draw on CPU; computing JAX's Threefry stream (counter ``(0, j)`` for
    number ``j``, the partitionable stream) and its float32 transform (``sqrt(2) erfinv(u)``) for all draws at once
    compiles once. Falls back to ``jax.random.normal`` for anything else (another key implementation, dtype or bit
    stream). ``tests/test_device.py`` checks the equality.
    """
    keys = [k for k, _ in draws]
    if not _fast_normals(keys, dtype):
        return [_normal_draw(k, shape, dtype) for k, shape in draws]
    sizes = [math.prod(shape) for _, shape in draws]
    if max(sizes) >= 2 ** 32:
        return [_normal_draw(k, shape, dtype) for k, shape in draws]
    batches = [_key_batch(k) for k in keys]
    data = [jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k for k in keys]

    def words(d, n, batch, i):   # key word i of every number of one draw
        if not batch:
            return jnp.broadcast_to(d[i], (n,))
        return jnp.broadcast_to(d.reshape(-1, 2)[:, i:i + 1], (math.prod(batch), n)).reshape(-1)

    def counters(n, batch):
        c = jax.lax.iota(jnp.uint32, n)
        return c if not batch else jnp.broadcast_to(c, (math.prod(batch), n)).reshape(-1)

    k1 = jnp.concatenate([words(d, n, b, 0) for d, n, b in zip(data, sizes, batches)])
    k2 = jnp.concatenate([words(d, n, b, 1) for d, n, b in zip(data, sizes, batches)])
    count = jnp.concatenate([counters(n, b) for n, b in zip(sizes, batches)])
    b1, b2 = _threefry2x32(k1, k2, jnp.zeros_like(count), count)
    z = noise_lib.erfinv_normals(b1 ^ b2)   # jax.random.normal's float32 transform
    out, start = [], 0
    for (_, shape), n, b in zip(draws, sizes, batches):
        total = n * math.prod(b)
        out.append(z[start:start + total].reshape(b + tuple(shape)))
        start += total
    return out


# ----------------------------------------------------------------------------------------------------------------
# Analog MVM I/O (aihwkit IOParameters)


INPUT_RANGE = "input_range"   # the parameter leaf of a learned input range, beside the layer's kernel
INPUT_RANGE_METHODS: dict[str, str] = {
    "init_from_data": "aihwkit InputRangeParameter.init_from_data: the mean over the first init_from_data batches "
                      "of init_std_alpha * std(tile input), std over every entry (unbiased)",
    "moving_std": "aihwkit calibrate_input_ranges(MOVING_STD): the mean over batches of alpha * std(tile input), "
                  "all-zero input vectors left out (unbiased)",
    "max": "aihwkit calibrate_input_ranges(MAX): max |tile input| over every batch",
}


@struct.dataclass
class InputRange:
    """Learned input ranges of HWA training, aihwkit ``InputRangeParameter`` (``pre_post.input_range``; defaults =
    ``StandardHWATrainingPreset``'s). Set as :attr:`IOParams.input_range` (aihwkit ``enable=True``); the range
    values are parameters of the model, one per tile, ``params[layer]["input_range"]`` of shape ``(T_in, T_out)``
    (:func:`init_input_ranges` adds them; trained, checkpointed and loaded like any parameter).

    Forward (aihwkit ``apply_input_range`` + ``pre_forward``/``post_forward``), tile ``(i, j)`` with range ``r``:
    ``x_c = clip(x_i, -r, r)``, then the tile's I/O at input scale ``r`` (``noise_management="constant"``: the DAC
    sees ``x_c / r``; ``"abs_max"``: abs-max scaling of ``x_c``), output times ``r``.

    Gradients (aihwkit's RPUCuda tile, ``TileWithPeriphery.pre_backward``/``post_backward``/``update``), with
    ``d = g'_j W_ij^T`` the gradient at the tile's input, ``g'_j`` the output gradient zeroed where the tile's output
    is at ``|y| >= 0.999 out_bound`` (aihwkit's ``handle_output_bound``), and sums over every entry of the tile's
    input (every conv patch entry, padding included)::

        grad_r = sum(min(d, 0) [x >= r]) - sum(max(d, 0) [x <= -r])
        if gradient_relative: grad_r *= r * gradient_scale
        if manage_output_clipping: grad_r -= (1 - p_out) r [p_out < output_min_percentage]
        grad_r += decay r [mean(|x| < r) > input_min_percentage]

    with ``p_out = 1 - (outputs at |y| >= 0.999 out_bound) / (entries of the tile input)`` (aihwkit divides by the
    size of ``d``). The input gradient is the straight-through ``sum_j d`` (not masked outside the range, as aihwkit's
    RPUCuda tile); the kernel gradient is ``x_c^T g_j`` (the clipped input, the unmasked output gradient, as
    aihwkit's update, here in the kernel's own units). The decay and output terms are added once per
    differentiated forward pass (aihwkit: per backward call).

    Attributes:
      init_value: the range of a new leaf before any data (aihwkit ``init_value``).
      init_std_alpha: the multiple of the input std of the data-driven init (``init_std_alpha``).
      decay: the range's decay rate (``decay``; 0 off).
      input_min_percentage: the decay applies only while more than this fraction of inputs is inside the range.
      output_min_percentage: ``manage_output_clipping`` acts only while fewer outputs than this fraction are
        unclipped.
      gradient_scale: multiplies the clip gradient (aihwkit applies it only with ``gradient_relative``; so here).
      init_from_data: batches of the data-driven init (:func:`init_input_ranges` ``method="init_from_data"``);
        aihwkit updates the range during its first training batches, here the init runs once before training.
        Static.
      learn_input_range: False: the ranges clip and scale but get no gradient (aihwkit's buffer). Static.
      manage_output_clipping: grow the range while outputs clip (needs ``noise_management="constant"``,
        ``bound_management="none"`` and an ``out_bound``, as aihwkit's NONE / NONE). Static.
      gradient_relative: the clip gradient relative to ``r`` (times ``r``). Static.
    """

    init_value: Any = 3.0
    init_std_alpha: Any = 3.0
    decay: Any = 0.001
    input_min_percentage: Any = 0.95
    output_min_percentage: Any = 0.95
    gradient_scale: Any = 1.0
    init_from_data: int = struct.field(pytree_node=False, default=100)
    learn_input_range: bool = struct.field(pytree_node=False, default=True)
    manage_output_clipping: bool = struct.field(pytree_node=False, default=False)
    gradient_relative: bool = struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        _check_positive(self.init_value, "InputRange.init_value")
        _check_positive(self.init_std_alpha, "InputRange.init_std_alpha")
        _check_nonnegative(self.decay, "InputRange.decay")
        _check_nonnegative(self.gradient_scale, "InputRange.gradient_scale")
        for name in ("input_min_percentage", "output_min_percentage"):
            value = getattr(self, name)
            if _concrete(value) and not 0.0 <= float(np.max(value)) <= 1.0:
                raise ValueError(f"InputRange.{name}={value!r} must be a fraction in [0, 1] (aihwkit: 0.95).")
        _checks.integer(self.init_from_data, "InputRange.init_from_data", minimum=0,
                        fix="the number of batches of the data-driven init (aihwkit: 100)")
        for name in ("learn_input_range", "manage_output_clipping", "gradient_relative"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"InputRange.{name}={getattr(self, name)!r} must be True or False.")


@struct.dataclass
class IOParams:
    """Non-idealities of one analog MVM, aihwkit ``IOParameters`` (defaults = ``IOParameters()``).

    Attributes:
      inp_bound: DAC range, inputs clipped to ``+-inp_bound`` after scaling.
      inp_res: DAC bin width in units of the range (``1/126``: 7 bits); steps ``inp_res * 2 * inp_bound``. None:
        no quantisation (infinite resolution). aihwkit turns it off with a value <= 0; here that is an error.
      out_bound: ADC range (clip to ``+-out_bound``); None: no clipping.
      out_res: ADC bin width (``1/510``: 9 bits); steps ``out_res * 2 * out_bound``; None: no quantisation.
      out_noise: std of the additive output noise before the ADC, in tile units.
      w_noise: output-referred PCM read noise (aihwkit ``w_noise_type=PCM_READ``):
        ``y_i += w_noise sqrt(sum_j |w_ij| x_j^2) N(0,1)``; 0 off.
      nm_scale: the constant input scale of ``noise_management="constant"`` (aihwkit ``nm_thres``).
      inp_ranges: optional ``{site: range}``: per-layer constant input scales (calibrated input ranges of HWA
        training) overriding ``nm_scale`` for ``noise_management="constant"``.
      input_range: :class:`InputRange`: learned input ranges (aihwkit ``pre_post.input_range`` enabled). A layer
        whose parameters hold ``input_range`` leaves (:func:`init_input_ranges`) clips its input to them and
        scales by them, overriding ``nm_scale`` and ``inp_ranges``; other layers as without it. None (default,
        aihwkit ``enable=False``): such leaves are ignored.
      max_bm_factor: largest input down-scaling of iterative bound management (aihwkit ``max_bm_factor``).
      max_bm_res: aihwkit's ``max_bm_res``: bound management also stops once the factor exceeds
        ``max_bm_res / DAC step`` (0.25 x 63 = 15.75 at 7 bits, so the last factor is 16); None: no such limit.
      noise_management: ``"abs_max"`` (scale = max|x| per input vector; aihwkit default) or ``"constant"`` (static).
      bound_management: ``"iterative"`` (aihwkit default: a vector whose output clipped is re-run with the input
        scale doubled, up to ``max_bm_factor``) or ``"none"`` (static).
      sampler: how the output-noise and w_noise normals (fresh at every MVM of every pass, like activation noise)
        are drawn from their keys: a name of ``jaxnoise.noise.SAMPLERS``, or None (default) for the backend's
        activation-noise default, ``noise.default_sampler()``: ``"threefry/icdf16"`` on CPU (about 4x cheaper
        normals; 65536 levels, no mass beyond 4.3 sigma, which does not matter for ADC noise), ``"threefry/erfinv"``
        (exactly ``jax.random.normal``) elsewhere. ``sampler="threefry/erfinv"`` reproduces I/O noise drawn before
        this field existed bit for bit. Static. PCM programming and read noise always use ``jax.random.normal``.
      semantics: ``"aihwkit"`` (default): aihwkit 1.2.0's forward pass (``docs/aihwkit_presets_audit.md``): the
        bound-management clip test on the ADC-quantised output (``|Q(y)| > out_bound``), the last factor the first
        one above ``min(max_bm_factor, max_bm_res / DAC step)``, and an all-zero input vector (``abs_max``) gives
        exactly 0 (no noise, no ADC); in a :class:`AnalogSpec`, aihwkit's tiles, tile units, read step and readout.
        ``"v0"``: jaxnoise before 2026-12-02 (clip test ``|y| >= out_bound`` before the ADC, last factor
        ``max_bm_factor / 2``, a zero vector read at scale 1; in a :class:`AnalogSpec` the whole layer as then: one
        tile of ``W / A``, the old read step and readout), for reproducing results made then (with
        ``sampler="threefry/erfinv", conv_sum="taps"``: bit for bit). Static.
      conv_sum: the float summation order of a conv MVM with a scale per patch (``abs_max``, or bound-management
        re-runs): ``"patch"`` (default) one dot product over each patch's kh * kw * cin quantised inputs, as
        aihwkit's im2col MVM; ``"taps"`` one dot per kernel tap summed in tap order, the order before this field
        existed (with ``sampler="threefry/erfinv"`` it reproduces those results bit for bit; about 1.4x slower on
        CPU). The two differ by float rounding only, which the ADC can turn into one-step differences. Static.
    """

    inp_bound: Any = 1.0
    inp_res: Any = 1.0 / 126
    out_bound: Any = 12.0
    out_res: Any = 1.0 / 510
    out_noise: Any = 0.06
    w_noise: Any = 0.0
    nm_scale: Any = 1.0
    inp_ranges: Mapping[str, Any] | None = None
    input_range: InputRange | None = None
    max_bm_factor: Any = 1000.0
    max_bm_res: Any = 0.25
    noise_management: str = struct.field(pytree_node=False, default="abs_max")
    bound_management: str = struct.field(pytree_node=False, default="iterative")
    sampler: str | None = struct.field(pytree_node=False, default=None)
    conv_sum: str = struct.field(pytree_node=False, default="patch")
    semantics: str = struct.field(pytree_node=False, default="aihwkit")

    def __post_init__(self):
        noise_lib.check_sampler(self.sampler, "IOParams.sampler")
        _choice(self.noise_management, NOISE_MANAGEMENT, "noise_management")
        _choice(self.conv_sum, CONV_SUMS, "conv_sum")
        _choice(self.bound_management, BOUND_MANAGEMENT, "bound_management")
        _choice(self.semantics, IO_SEMANTICS, "semantics")
        if self.max_bm_res is not None:
            _check_positive(self.max_bm_res, "IOParams.max_bm_res", "use None for no limit")
        _check_positive(self.inp_bound, "IOParams.inp_bound")
        if self.out_bound is not None:
            _check_positive(self.out_bound, "IOParams.out_bound", "use None for no ADC clipping")
        for name in ("inp_res", "out_res"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(value, f"IOParams.{name}",
                                "it is the quantisation bin width in units of the range (1/126 for 7 bits); "
                                "use None for infinite resolution (aihwkit's <= 0)")
        _check_nonnegative(self.out_noise, "IOParams.out_noise")
        _check_nonnegative(self.w_noise, "IOParams.w_noise")
        _check_positive(self.nm_scale, "IOParams.nm_scale")
        _check_positive(self.max_bm_factor, "IOParams.max_bm_factor")
        _checks.mapping(self.inp_ranges, "IOParams.inp_ranges", "site")
        for site, r in (self.inp_ranges or {}).items():
            _check_positive(r, f"IOParams.inp_ranges[{site!r}]")
        ir = self.input_range
        if ir is not None:
            if not isinstance(ir, InputRange):
                raise ValueError(f"IOParams.input_range must be a jaxnoise.analog.InputRange or None, got "
                                 f"{type(ir).__name__}.")
            if self.semantics == "v0":
                raise ValueError("IOParams.input_range (learned input ranges) needs semantics='aihwkit'; the 'v0' "
                                 "pipeline has no tiles to hold them: drop input_range or use semantics='aihwkit'.")
            if ir.manage_output_clipping and (self.noise_management != "constant" or self.bound_management != "none"
                                              or self.out_bound is None):
                raise ValueError("InputRange.manage_output_clipping needs noise_management='constant', "
                                 "bound_management='none' and an out_bound (aihwkit: noise and bound management "
                                 "NONE): change those fields or set manage_output_clipping=False.")

    def last_bm_factor_bound(self) -> Any:
        """``L``: bound management accepts a vector at factor ``f > L`` even when it clipped (aihwkit: ``min(
        max_bm_factor, max_bm_res / DAC step)``; semantics ``"v0"``: ``max_bm_factor / 2``)."""
        if self.semantics == "v0":
            return self.max_bm_factor / 2
        if self.max_bm_res is None or self.inp_res is None:
            return self.max_bm_factor
        return jnp.minimum(self.max_bm_factor, self.max_bm_res / (self.inp_res * 2 * self.inp_bound))

    def resolved_sampler(self, backend: str | None = None) -> str:
        """The sampler of the I/O noise on ``backend`` (default: JAX's default backend): ``sampler``, or the
        activation-noise default there (``noise.default_sampler``)."""
        return noise_lib.default_sampler(backend) if self.sampler is None else self.sampler


def legacy_io(io: IOParams | None, **overrides: Any) -> IOParams | None:
    """``io`` on the pipeline before 2026-12-02 (:data:`LEGACY_IO`, then ``overrides``). That pipeline predates
    learned input ranges (they live on tiles, which it has not), so ``input_range`` is dropped: the results made with
    it had none (their ranges are the constant ``inp_ranges``). ``None`` (digital) stays ``None``.

    >>> legacy_io(preset("hwa_standard").io).input_range is None
    True
    """
    if io is None:
        return None
    return io.replace(**{**LEGACY_IO, **overrides}, input_range=None)


def quantize(x: jax.Array, res: Any, bound: Any) -> jax.Array:
    """Uniform quantiser of aihwkit's DAC/ADC: steps ``res * 2 * bound``, round half to even, clip to ``+-bound``.

    Straight-through: the value is quantised, the gradient is the identity.

    Args:
      x: values in the converter's units.
      res: bin width in units of the range (``1/126``: 7 bits), or None for no rounding (infinite resolution).
      bound: the range, or None for no clipping.

    Returns:
      The quantised ``x``.
    """
    if res is not None:
        _check_positive(res, "res", "use None for infinite resolution")
    if bound is not None:
        _check_positive(bound, "bound", "use None for no clipping")
    q = x
    if res is not None:
        step = jnp.asarray(res, x.dtype) * 2 * jnp.asarray(1.0 if bound is None else bound, x.dtype)
        q = jnp.round(q / step) * step  # jnp.round rounds half to even
    if bound is not None:
        b = jnp.asarray(bound, x.dtype)
        q = jnp.clip(q, -b, b)
    return x + jax.lax.stop_gradient(q - x)


def conv_patches(x: jax.Array, kernel_shape: tuple[int, ...], stride: int, padding: int) -> jax.Array:
    """The input vectors of a conv layer's MVMs (im2col), ``(N, H', W', kh * kw * cin)`` ordered like
    ``kernel.reshape(-1, cout)`` (kh, kw, cin), so ``patches @ kernel.reshape(-1, cout)`` is the convolution."""
    kh, kw, cin, _ = kernel_shape
    p = jax.lax.conv_general_dilated_patches(
        x, (kh, kw), (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "OIHW", "NHWC"))
    # conv_general_dilated_patches orders features (cin, kh, kw): reorder to (kh, kw, cin).
    n, h, w, _ = p.shape
    return p.reshape(n, h, w, cin, kh, kw).transpose(0, 1, 2, 4, 5, 3).reshape(n, h, w, kh * kw * cin)


def _linear(x: jax.Array, w: jax.Array, geometry: Mapping[str, int] | None) -> jax.Array:
    """The exact MVM: ``x @ w`` (dense or patch vectors) or the convolution of ``geometry``."""
    if geometry is None:
        return x @ w.reshape(-1, w.shape[-1])
    s, p = geometry["stride"], geometry["padding"]
    return jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _noise_flags(key, io: IOParams) -> tuple[bool, bool]:
    """Whether the w_noise / out_noise draws are needed: a key, and a scale that is not a concrete 0."""
    def on(v):
        return key is not None and not (_concrete(v) and float(np.max(np.asarray(v))) == 0.0)
    return on(io.w_noise), on(io.out_noise)


# Work unit of the per-patch conv MVM (performance only: results do not depend on it).
_CHUNK_BYTES = 1 << 22   # quantised conv patches per chunk of images (a few MiB: in the L2/L3 caches)


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def _tap_views(xp: jax.Array, kernel_shape: tuple[int, ...], stride: int, out_hw: tuple[int, int]) -> list[jax.Array]:
    """The ``kh * kw`` shifted views of a padded conv input (``(..., Hp, Wp, C)``): view ``(i, j)`` holds, at every
    output position, the input pixel that kernel tap ``(i, j)`` sees there, so ``sum_ij view_ij @ kernel[i, j]`` is
    the convolution and ``concatenate(views, -1)`` the im2col patches (:func:`conv_patches`)."""
    kh, kw = kernel_shape[0], kernel_shape[1]
    h, w = out_hw
    return [xp[..., i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride, :]
            for i in range(kh) for j in range(kw)]


def _patch_absmax(xp: jax.Array, kernel_shape: tuple[int, ...], stride: int, out_hw: tuple[int, int]) -> jax.Array:
    """max |x| over each conv patch (kh * kw * cin values) of a zero-padded input, ``(..., H', W', 1)``: the max over
    the kernel taps (:func:`_tap_views`) of the channel max, one fused elementwise max (exact, like any max)."""
    m = jnp.max(jnp.abs(xp), axis=-1, keepdims=True)
    return functools.reduce(jnp.maximum, _tap_views(m, kernel_shape, stride, out_hw))


def _when(on: Any, fn, shape: tuple[int, ...], dtype) -> jax.Array | None:
    """``fn()`` when ``on`` is True, None when False, and for a traced ``on`` ``fn()`` or zeros, decided at run time
    (a noise scale that is array data, as in ``robustness.evaluate_analog``, costs nothing when it is 0)."""
    if on is True or on is False:
        return fn() if on else None
    return jax.lax.cond(on, fn, lambda: jnp.zeros(shape, dtype))


def _scale_on(value: Any, static_on: bool) -> Any:
    """Whether a noise scale is on: False / True when known at trace time, else a traced ``value != 0``."""
    if not static_on:
        return False
    return True if _concrete(value) else jnp.any(jnp.asarray(value) != 0)


def _patch_products(views: list[jax.Array], scale: jax.Array, w_tile: jax.Array, w_abs: jax.Array, w_on: Any,
                    dac, conv_sum: str):
    """Products ``x' W`` (and ``x'^2 |W|`` for w_noise) of the quantised patches ``x' = dac(patch, scale)`` given as
    the tap views of a chunk of images: one dot over each patch's kh * kw * cin inputs (``"patch"``), or one dot per
    tap summed in tap order (``"taps"``)."""
    n_out = w_tile.shape[-1]
    if conv_sum == "patch":
        q = dac(jnp.concatenate(views, axis=-1), scale)
        y = q @ w_tile.reshape(-1, n_out)
        return y, _when(w_on, lambda: (q * q) @ w_abs.reshape(-1, n_out), y.shape, y.dtype)
    # Each view divided by the scale on its own, as before: XLA may rewrite a division by a broadcast value as a
    # product with its reciprocal (not bit-exact), depending on the shapes, so the shapes must stay the old ones.
    q = jnp.stack([dac(v, scale) for v in views])   # (kh * kw, ..., cin)

    def tap_sum(v, ws):
        ws = ws.reshape((-1,) + ws.shape[2:])
        terms = jax.lax.dot_general(v, ws, (((v.ndim - 1,), (1,)), ((0,), (0,))))
        return functools.reduce(jnp.add, [terms[t] for t in range(terms.shape[0])])

    y = tap_sum(q, w_tile)
    return y, _when(w_on, lambda: tap_sum(q * q, w_abs), y.shape, y.dtype)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def analog_mvm(key: jax.Array | None, x: jax.Array | None, w_tile: jax.Array, io: IOParams, *,
               geometry: Mapping[str, int] | None = None, inp_scale: Any = None,
               noise_flags: tuple[bool, bool] | None = None) -> jax.Array:
    """One analog MVM ``y ~ x @ w_tile`` with aihwkit's I/O non-idealities, in the units of ``x``.

    Order (DEVICE-MODELS.md, aihwkit ``rpu_forward_backward_pass.cpp``): (1) input scale ``s`` = max|x| per input
    vector (``abs_max``) or a constant; (2) DAC: ``x' = quantize(x / s, inp_res, inp_bound)``; (3) ``y = x' W``,
    plus output-referred PCM read noise ``w_noise sqrt(sum_j |w_ij| x'_j^2) N``; (4) ADC: ``y += out_noise N``,
    ``quantize(y, out_res, out_bound)``; (5) ``y * s``. With iterative bound management, a vector with any output
    at ``|y| >= out_bound`` is re-run with ``s`` doubled (fresh noise: round ``r`` draws from ``fold_in(key, r)``),
    until none clips or the factor would pass ``max_bm_factor``; a round computes nothing when nothing clipped.

    An input vector is a row of a dense input, or one conv patch (kh * kw * cin values, as aihwkit's im2col) when
    ``geometry`` is given. ``abs_max`` scales each patch by its own max and quantises the patches one chunk of
    images at a time (built from shifted views of the input, :func:`_tap_views`, so the 9x larger quantised patches
    stay in the cache); a bound-management round re-runs only the chunks holding a vector that clipped.
    ``constant`` scaling quantises elementwise, so the conv stays one convolution (its re-runs, a factor per patch,
    go chunk by chunk). The noise of a round is drawn for the whole output at once, so a vector's noise does not
    depend on what else clipped.

    Args:
      key: the pass key of this site (output noise), or None for no noise (quantisation still applies).
      x: inputs, (..., n_in) for dense, NHWC for a conv; None for the identity (one one-hot vector per input, the
        drift-compensation readout), computed without forming it: one-hot products are exact, so ``y_i = x'_i w_i``.
      w_tile: tile weights (n_in, n_out) or HWIO, in tile units (the units of the ADC range and output noise).
      io: the I/O parameters.
      geometry: ``{"stride", "padding"}`` of a conv layer, None for dense.
      inp_scale: the constant input scale (``noise_management="constant"``); default ``io.nm_scale``.
      noise_flags: internal: (w_noise on, out_noise on) decided where ``io`` is concrete (a zero scale is skipped;
        a traced scale that is 0 skips its draw at run time).

    Returns:
      The output, same shape as the exact ``x @ w_tile`` / convolution. Not differentiable by itself (call it on
      ``stop_gradient`` inputs; :class:`AnalogContext` adds the straight-through gradient).
    """
    dt = w_tile.dtype if x is None else x.dtype
    w_tile = w_tile.astype(dt)
    w_abs = jnp.abs(w_tile)
    use_w_noise, use_out_noise = _noise_flags(key, io) if noise_flags is None else noise_flags
    w_on, o_on = _scale_on(io.w_noise, use_w_noise), _scale_on(io.out_noise, use_out_noise)
    abs_max = io.noise_management == "abs_max"
    bm = io.bound_management == "iterative" and io.out_bound is not None
    sampler = io.resolved_sampler()
    one = jnp.asarray(1.0, dt)
    last_factor = jnp.asarray(io.last_bm_factor_bound(), dt)
    aihwkit = io.semantics == "aihwkit"
    if geometry is not None:
        stride, padding = geometry["stride"], geometry["padding"]
        out_hw = (_out_size(x.shape[1], w_tile.shape[0], stride, padding),
                  _out_size(x.shape[2], w_tile.shape[1], stride, padding))
        vec_shape = (x.shape[0],) + out_hw   # one input vector (patch) per output position
    else:
        vec_shape = w_tile.shape[:1] if x is None else x.shape[:-1]
    y_shape = vec_shape + (w_tile.shape[-1],)
    if not abs_max:
        s = jnp.asarray(io.nm_scale if inp_scale is None else inp_scale, dt)
    elif x is None:
        s = jnp.ones(vec_shape + (1,), dt)   # max|x| of a one-hot vector
    elif geometry is None:
        s = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        nonzero = s > 0   # aihwkit: an all-zero vector gives exactly 0
        s = jnp.where(nonzero, s, jnp.ones_like(s))

    def dac(v, scale):
        return quantize(v / scale, io.inp_res, io.inp_bound)

    def draws(r, w_flag=w_on):
        """Round ``r``'s w_noise and out_noise normals over the whole output (None when off)."""
        round_key = None if key is None else jax.random.fold_in(key, r)

        def normal(name):
            return noise_lib.standard_normal(noise_lib.name_key(round_key, name), y_shape, dt, sampler)
        return (_when(w_flag, lambda: normal("w_noise"), y_shape, dt),
                _when(o_on, lambda: normal("out_noise"), y_shape, dt))

    def adc(y, spread, z_w, z_o, done, factor, w_flag=w_on):
        """Read noise, output noise and ADC of products ``y``: ``(ADC(y), accepted)``; with bound management a
        vector not ``done`` is accepted when no output clipped or its ``factor`` cannot double (else None)."""
        if w_flag is not False:
            y = y + jnp.asarray(io.w_noise, dt) * jnp.sqrt(jnp.maximum(spread, 0.0)) * z_w
        if o_on is not False:
            y = y + jnp.asarray(io.out_noise, dt) * z_o
        if not bm:
            return quantize(y, io.out_res, io.out_bound), None
        if aihwkit:   # the test is on the quantised, not yet clipped, value: a level beyond the ADC's top one
            if io.out_res is not None:
                step = jnp.asarray(io.out_res, dt) * 2 * jnp.asarray(io.out_bound, dt)
                top = jnp.round(jnp.asarray(io.out_bound, dt) / step)
                over = jnp.abs(jnp.round(y / step)) > top
            else:
                over = jnp.abs(y) > io.out_bound
            clipped = jnp.any(over, axis=-1, keepdims=True)
        else:
            clipped = jnp.any(jnp.abs(y) >= io.out_bound, axis=-1, keepdims=True)
        return quantize(y, io.out_res, io.out_bound), ~done & (~clipped | (factor > last_factor))

    def elementwise(factor):
        """Products of the whole input, quantised elementwise at scale ``s * factor``."""
        if x is None:   # the identity: row i has the one input dac(1) at position i (and dac(0) = 0 elsewhere)
            xq = dac(jnp.ones(vec_shape + (1,), dt), s * factor)
            return xq * w_tile, _when(w_on, lambda: (xq * xq) * w_abs, y_shape, dt)
        xq = dac(x, s * factor)
        y = _linear(xq, w_tile, geometry)
        return y, _when(w_on, lambda: _linear(xq * xq, w_abs, geometry), y.shape, dt)

    def bound_management(rounds, start):
        """Rounds ``r, r + 1, ...`` (``rounds(r, out, done, factor) -> (out, done)``) until every vector is done."""
        def next_round(carry):
            r, out, done, factor = carry
            out, done = rounds(r, out, done, factor)
            return r + 1, out, done, jnp.where(done, factor, factor * 2)
        return jax.lax.while_loop(lambda carry: ~jnp.all(carry[2]), next_round, start)[1]

    def first_state(r):
        return r, jnp.zeros(y_shape, dt), jnp.zeros(vec_shape + (1,), bool), jnp.ones(vec_shape + (1,), dt)

    # aihwkit: an all-zero input vector (abs_max) reads exactly 0, without output noise or ADC.
    zero_vectors = aihwkit and abs_max and x is not None

    if geometry is None or not (abs_max or bm):
        # Dense, or a conv at one constant scale: the DAC is elementwise and one product serves every vector.
        if not bm:
            y = adc(*elementwise(one), *draws(0), None, None)[0] * s
        else:
            def rounds(r, out, done, factor):
                q, accept = adc(*elementwise(factor), *draws(r), done, factor)
                return jnp.where(accept, q * factor, out), done | accept

            y = bound_management(rounds, first_state(jnp.uint32(0))) * s
        return jnp.where(nonzero, y, jnp.zeros_like(y)) if zero_vectors and geometry is None else y

    # A scale per patch (abs_max, or the re-runs of a constant scale): the patches of one chunk of images at a time,
    # from the shifted views of the padded input; the output is kept already multiplied by the scale.
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    n = x.shape[0]
    per_image = math.prod(out_hw) * math.prod(w_tile.shape[:-1]) * np.dtype(dt).itemsize
    c = _largest_divisor(n, _CHUNK_BYTES // max(per_image, 1))

    def chunk_scale(xc):
        """``(scale, nonzero)`` of the chunk's patches (``nonzero`` None unless zero vectors read 0)."""
        if not abs_max:
            return s, None
        sc = _patch_absmax(xc, w_tile.shape, stride, out_hw)
        return jnp.where(sc > 0, sc, jnp.ones_like(sc)), (sc > 0 if zero_vectors else None)

    def chunk_round(r, out, done, factor):
        """Round ``r`` over the chunks (those without a vector left to do are skipped)."""
        def over_chunks(w_flag, carry):
            z_w, z_o = draws(r, w_flag)

            def chunk(i, carry):
                def part(a):
                    return None if a is None else jax.lax.dynamic_slice_in_dim(a, i * c, c)

                def compute(cur):
                    out_c, done_c = cur
                    xc = part(xp)
                    sc, nonzero_c = chunk_scale(xc)
                    f = one if factor is None else part(factor)
                    y, spread = _patch_products(_tap_views(xc, w_tile.shape, stride, out_hw), sc * f, w_tile,
                                                w_abs, w_flag, dac, io.conv_sum)
                    q, accept = adc(y, spread, part(z_w), part(z_o), done_c, f, w_flag)
                    if nonzero_c is not None:
                        q = jnp.where(nonzero_c, q, jnp.zeros_like(q))
                    if accept is None:
                        return q * sc
                    return jnp.where(accept, q * f * sc, out_c), done_c | accept

                if not bm:
                    return jax.lax.dynamic_update_slice_in_dim(carry, compute((None, None)), i * c, 0)
                cur = (part(carry[0]), part(carry[1]))
                new = compute(cur) if n == c else jax.lax.cond(jnp.any(~cur[1]), compute, lambda cur: cur, cur)
                return tuple(jax.lax.dynamic_update_slice_in_dim(a, b, i * c, 0) for a, b in zip(carry, new))

            return jax.lax.fori_loop(0, n // c, chunk, carry) if n > c else chunk(0, carry)

        carry = jnp.zeros(y_shape, dt) if not bm else (out, done)
        if w_on is True or w_on is False:
            return over_chunks(w_on, carry)
        # A traced w_noise (evaluate_analog passes the spec as data): one loop with it, one without, chosen at run
        # time; a w_noise draw and products per chunk that are all zeros would cost ~15% of the pass.
        return jax.lax.cond(w_on, lambda carry: over_chunks(True, carry), lambda carry: over_chunks(False, carry),
                            carry)

    if not bm:
        return chunk_round(0, None, None, None)

    if abs_max:
        return bound_management(chunk_round, first_state(jnp.uint32(0)))
    # A constant scale with re-runs: the first round is one convolution, as without bound management.
    r, out, done, factor = first_state(jnp.uint32(1))
    q, accept = adc(*elementwise(one), *draws(0), done, factor)
    return bound_management(chunk_round, (r, jnp.where(accept, q * factor, out) * s, done | accept,
                                          jnp.where(accept, factor, factor * 2)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ste_mvm(x, w, key, io, inp_scale, geometry, flags):
    return analog_mvm(key, x, w, io, geometry=None if geometry is None else dict(geometry), inp_scale=inp_scale,
                      noise_flags=flags)


def _ste_fwd(x, w, key, io, inp_scale, geometry, flags):
    return _ste_mvm(x, w, key, io, inp_scale, geometry, flags), (x, w)


def _ste_bwd(geometry, flags, res, g):
    x, w = res
    _, vjp = jax.vjp(lambda x, w: _linear(x, w, None if geometry is None else dict(geometry)), x, w)
    dx, dw = vjp(g)
    return dx, dw, None, None, None


_ste_mvm.defvjp(_ste_fwd, _ste_bwd)


def _analog_mvm_ste(key, x, w_tile, io, inp_scale, geometry):
    """:func:`analog_mvm` with the straight-through gradient of the exact linear map (no extra cost without grad)."""
    return _ste_mvm(x, w_tile, key, io, inp_scale, geometry, _noise_flags(key, io))


# ----------------------------------------------------------------------------------------------------------------
# Weight modifiers (aihwkit WeightModifierParameter), for hardware-aware training


@struct.dataclass
class WeightModifier:
    """A training-time weight perturbation of aihwkit (``WeightModifierParameter``); ``A = max|W|`` of the tensor.

    Attributes:
      kind: a key of ``MODIFIER_KINDS`` (static).
      std: noise std relative to ``A`` (add_normal, poly) or relative to ``w`` (mult_normal).
      res: bin width relative to ``A`` (discretize).
      coeffs: ``(c0, c1, c2)`` of ``poly``.
    """

    std: Any = 0.0
    res: Any = 0.0
    coeffs: tuple = (1.0, 0.0, 0.0)
    kind: str = struct.field(pytree_node=False, default="add_normal")

    def __post_init__(self):
        _choice(self.kind, tuple(MODIFIER_KINDS), "weight modifier kind")
        _check_nonnegative(self.std, "WeightModifier.std")
        if self.kind == "discretize":
            _check_positive(self.res, "WeightModifier.res", "the bin width relative to max|W| (e.g. 1/127)")


def modify_weights(key: jax.Array, w: jax.Array, modifier: WeightModifier) -> jax.Array:
    """One draw of ``modifier`` on ``w`` (formulas of DEVICE-MODELS.md), straight-through to ``w``."""
    a = jax.lax.stop_gradient(jnp.max(jnp.abs(w)))
    std = jnp.asarray(modifier.std, w.dtype)
    if modifier.kind == "discretize":
        step = a * jnp.asarray(modifier.res, w.dtype)
        new = jnp.where(step > 0, jnp.round(w / jnp.where(step > 0, step, 1.0)) * step, w)
    else:
        z = jax.random.normal(key, w.shape, w.dtype)
        if modifier.kind == "add_normal":
            new = w + std * a * z
        elif modifier.kind == "mult_normal":
            new = w * (1 + std * z)
        else:  # poly
            c0, c1, c2 = modifier.coeffs
            rel = jnp.abs(w) / jnp.where(a > 0, a, 1.0)
            new = w + a * std * (c0 + c1 * rel + c2 * rel * rel) * z
    return w + jax.lax.stop_gradient(new - w)


# ----------------------------------------------------------------------------------------------------------------
# The device spec


@struct.dataclass
class AnalogSpec:
    """Which device non-idealities the analog layers of a model see. A pytree: numbers are leaves, choices static.

    Attributes:
      io: MVM I/O non-idealities (:class:`IOParams`), or None for an exact MVM.
      pcm: the PCM conductance model (:class:`PCMModel`), or None for exact conductances.
      modifier: a training-time weight modifier (:class:`WeightModifier`), or None.
      g_max, g_min: conductance range of the mapping (uS).
      t_inference: seconds after programming at which ``Model.pass_chip(..., device=spec)`` reads its chip.
      mapping: the conductance scale ``s = (g_max - g_min) / max|w|``: ``"tensor"`` one per tile (aihwkit's
        ``SinglePairConductanceConverter``; one per layer when it is one tile) or ``"column"`` one per output column
        of each tile, static.
      compensation: None, ``"global"`` or ``"column"`` drift compensation (one factor per tile, or per output column
        of each tile; aihwkit ``GlobalDriftCompensation``, ``PerColumnDriftCompensation``), or ``"global_exact"``
        (aihwkit ``GlobalDriftCompensationWithExactReference``: one factor per tile whose reference ``r0`` is the
        exact readout of the unprogrammed tile weights, ``max(mean|w_target|, 1e-4)``, instead of the programmed
        weights through the tile's I/O; the readout at time t is that of "global"). Static.
      weight_scaling_omega: aihwkit ``MappingParameter.weight_scaling_omega``: 0 (aihwkit's default) puts the raw
        weights on the tiles and applies no digital output scale; ``omega > 0`` puts ``W / a`` on each tile and
        multiplies its outputs by ``a`` after the ADC, ``a = max|W_tile| / omega`` (per tile column with
        ``weight_scaling_columnwise``), so that max|w_tile| = omega. Array data.
      weight_scaling_columnwise: ``a`` per output column of each tile instead of one per tile, static.
      max_input_size, max_output_size: aihwkit's tile size: a layer with more inputs (a conv: cin * kh * kw, in
        aihwkit/torch order (cin, kh, kw)) or outputs is split into ``ceil(n / max)`` contiguous tiles of sizes
        differing by at most one (:func:`split_sizes`), each with its own input scaling, DAC, noise, ADC, bound
        management, conductance scale, programming, drift and compensation; the tiles' outputs are summed in float
        before the digital bias. 0: no split. Static.
      analog_layers: regexes (``re.search``) over layer (site) names that are analog, static; default all.
      digital_layers: regexes of layers kept digital (exact) even when ``analog_layers`` matches, static.
      name: the preset's name, for records.

    Under ``IOParams(semantics="v0")`` (:data:`LEGACY_IO`) the whole layer runs as before 2026-12-02 (bit for bit):
    one tile per layer holding ``W / A`` (``A = max|W|`` per tensor or column, as ``mapping``) with the output
    times ``A``, drift and read noise on the two programmed devices, and the readout's one-hot divided by the input
    range; the four tile fields above are then ignored.

    Examples:
      >>> spec = preset("aihwkit_inference_default").replace(t_inference=jnp.float32(86400.0))
      >>> spec = spec.replace(digital_layers=("^conv1$", "^fc$"))   # first and last layer digital
    """

    io: IOParams | None = None
    pcm: PCMModel | None = None
    modifier: WeightModifier | None = None
    g_max: Any = 25.0
    g_min: Any = 0.0
    t_inference: Any = 0.0
    weight_scaling_omega: Any = 0.0
    mapping: str = struct.field(pytree_node=False, default="tensor")
    compensation: str | None = struct.field(pytree_node=False, default=None)
    weight_scaling_columnwise: bool = struct.field(pytree_node=False, default=False)
    max_input_size: int = struct.field(pytree_node=False, default=512)
    max_output_size: int = struct.field(pytree_node=False, default=512)
    analog_layers: tuple[str, ...] = struct.field(pytree_node=False, default=(r".*",))
    digital_layers: tuple[str, ...] = struct.field(pytree_node=False, default=())
    name: str = struct.field(pytree_node=False, default="custom")

    def __post_init__(self):
        _choice(self.mapping, MAPPINGS, "mapping")
        _choice(self.compensation, COMPENSATIONS, "drift compensation")
        if self.compensation == "global_exact" and self.io is not None and self.io.semantics == "v0":
            raise ValueError("compensation='global_exact' (aihwkit's exact reference) needs IOParams(semantics="
                             "'aihwkit'); the 'v0' pipeline has 'global' and 'column' only.")
        _check_positive(self.g_max, "g_max", "the largest device conductance in uS (aihwkit default 25)")
        _check_nonnegative(self.g_min, "g_min")
        if _concrete(self.g_max) and _concrete(self.g_min) and float(np.max(self.g_min)) >= float(
                np.min(self.g_max)):
            raise ValueError(f"g_min={self.g_min!r} must be smaller than g_max={self.g_max!r}.")
        check_times(self.t_inference)
        _check_nonnegative(self.weight_scaling_omega, "AnalogSpec.weight_scaling_omega")
        if not isinstance(self.weight_scaling_columnwise, (bool, np.bool_)):
            raise ValueError(f"AnalogSpec.weight_scaling_columnwise={self.weight_scaling_columnwise!r} must be True "
                             f"or False.")
        for field in ("max_input_size", "max_output_size"):
            _checks.integer(getattr(self, field), f"AnalogSpec.{field}", minimum=0,
                            fix="the most inputs/outputs of one tile (aihwkit: 512); 0 for no split")
        # A bare string would be iterated per character; a list would not hash as static data.
        for field in ("analog_layers", "digital_layers"):
            object.__setattr__(self, field, _checks.names(getattr(self, field), field, example="^conv1$"))
        for pattern in tuple(self.analog_layers) + tuple(self.digital_layers):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"layer pattern {pattern!r} is not a valid regular expression: {e}") from e

    @property
    def v0(self) -> bool:
        """True under ``IOParams(semantics="v0")``: the layer as computed before 2026-12-02 (see the class)."""
        return self.io is not None and self.io.semantics == "v0"

    @property
    def is_ideal(self) -> bool:
        """True when the spec changes nothing (no I/O, no PCM, no modifier)."""
        return self.io is None and self.pcm is None and self.modifier is None

    def is_analog(self, site: str) -> bool:
        return (any(re.search(p, site) for p in self.analog_layers)
                and not any(re.search(p, site) for p in self.digital_layers))

    def training(self) -> AnalogSpec:
        """The spec as aihwkit trains with it: I/O non-idealities and modifier on; PCM and compensation are
        inference-only (``InferenceRPUConfig``)."""
        return self.replace(pcm=None, compensation=None)

    def describe(self, backend: str | None = None) -> dict[str, Any]:
        """JSON-ready description (every field; numbers as floats). ``io["sampler"]`` is the I/O-noise sampler
        resolved for ``backend`` (default: JAX's default backend, where the evaluation runs); descriptions written
        before the field existed mean ``"threefry/erfinv"``."""
        def plain(x):
            if x is None or isinstance(x, (str, bool)):
                return x
            if isinstance(x, Mapping):
                return {str(k): plain(v) for k, v in x.items()}
            if isinstance(x, (tuple, list)):
                return [plain(v) for v in x]
            if hasattr(x, "__dataclass_fields__"):
                return {f: plain(getattr(x, f)) for f in x.__dataclass_fields__}
            arr = np.asarray(x)
            return float(arr) if arr.ndim == 0 else arr.tolist()
        out = plain(self)
        if self.io is not None:
            out["io"]["sampler"] = self.io.resolved_sampler(backend)
        return out


def layer_names(params: Mapping[str, Any], layers: Sequence[str] | None = None) -> tuple[str, ...]:
    """The candidates for analog: ``layers``, the model's registered analog layers (``model.analog_layers``), each
    checked to have a ``kernel`` in ``params``; None (a bare parameter tree): the names of the layers with a
    ``kernel`` leaf (``"layer1/0/conv1"``), in tree order."""
    flat = traverse_util.flatten_dict(params, sep="/")
    if layers is None:
        return tuple(path[: -len("/kernel")] if "/" in path else "" for path in flat
                     if path == "kernel" or path.endswith("/kernel"))
    layers = _checks.names(layers, "layers", example="conv1")
    missing = [layer for layer in layers if (f"{layer}/kernel" if layer else "kernel") not in flat]
    if missing:
        raise ValueError(f"analog layers {missing[:5]} have no kernel in these parameters: pass the variables of "
                         f"the model whose analog_layers these are.")
    return layers


def check_selectors(params: Mapping[str, Any], spec: AnalogSpec, layers: Sequence[str] | None = None) -> None:
    """Raises ValueError when a layer selector of ``spec`` names nothing in this model.

    Every ``analog_layers`` and ``digital_layers`` pattern must match at least one layer name, every
    ``io.inp_ranges`` key must be a layer, and at least one layer must stay analog: a selector that matches nothing
    would silently evaluate another chip than the one asked for (or the exact network under a device label).
    ``layers``: the model's analog layers (``model.analog_layers``); None: :func:`layer_names` of ``params``.
    """
    layers = layer_names(params, layers)
    for field in ("analog_layers", "digital_layers"):
        for pattern in getattr(spec, field):
            if not any(re.search(pattern, layer) for layer in layers):
                raise ValueError(f"AnalogSpec.{field} pattern {pattern!r} matches no layer of this model; layer "
                                 f"names: {_checks.listing(layers)} (use e.g. ('^conv1$',)).")
    if spec.io is not None and spec.io.inp_ranges is not None:
        unknown = [k for k in spec.io.inp_ranges if k not in layers]
        if unknown:
            raise ValueError(f"IOParams.inp_ranges names layers that do not exist: {sorted(unknown)[:5]}; layer "
                             f"names: {_checks.listing(layers)} (calibrate_input_ranges gives them all).")
    if layers and not any(spec.is_analog(layer) for layer in layers):
        raise ValueError(f"AnalogSpec(analog_layers={spec.analog_layers}, digital_layers={spec.digital_layers}) "
                         f"leaves no analog layer, so the device would change nothing; layer names: "
                         f"{_checks.listing(layers)}. For the exact network evaluate without a device.")


def analog_sites(params: Mapping[str, Any], spec: AnalogSpec,
                 layers: Sequence[str] | None = None) -> tuple[str, ...]:
    """Layer names (``"layer1/0/conv1"``) whose ``kernel`` is analog under ``spec``, in tree order: those of
    ``layers`` (the model's registered analog layers, ``model.analog_layers``; None: every layer of ``params``
    with a ``kernel``) that ``spec``'s selectors keep.

    Raises:
      ValueError: a selector of ``spec`` that names no layer of ``params`` (:func:`check_selectors`).
    """
    check_selectors(params, spec, layers)
    candidates = set(layer_names(params, layers))
    return tuple(layer for layer in layer_names(params) if layer in candidates and spec.is_analog(layer))


def chip_key(key: jax.Array) -> jax.Array:
    """The chip (programming) key of a forward pass key: ``name_key(key, "jaxnoise/device/chip")``."""
    return noise_lib.name_key(key, "jaxnoise/device/chip")


def _key(key: jax.Array, *names: str) -> jax.Array:
    for n in names:
        key = noise_lib.name_key(key, n)
    return key


def _tile(g_plus, g_minus, spec: AnalogSpec):
    return (g_plus - g_minus) / (jnp.asarray(spec.g_max, g_plus.dtype) - jnp.asarray(spec.g_min, g_plus.dtype))


def _inp_scale(spec: AnalogSpec, site: str) -> Any:
    return None if spec.io is None or spec.io.inp_ranges is None else spec.io.inp_ranges.get(site)


def _readout_outputs(key: jax.Array | None, w_tile: jax.Array, spec: AnalogSpec, inp_scale: Any) -> jax.Array:
    """The outputs of the drift-compensation readout: the identity (one one-hot vector per input) through the tile
    with its I/O non-idealities."""
    w = w_tile.reshape(-1, w_tile.shape[-1])
    if spec.io is None:
        return w   # eye @ w
    return analog_mvm(key, None, w, spec.io, inp_scale=inp_scale)


def _readout_value(y: jax.Array, spec: AnalogSpec) -> jax.Array:
    """``max(mean|y|, 1e-4)`` of readout outputs (global) or per output column (column)."""
    axis = 0 if spec.compensation == "column" else None
    return jnp.maximum(jnp.mean(jnp.abs(y), axis=axis), COMPENSATION_FLOOR)


def _readout(key: jax.Array | None, w_tile: jax.Array, spec: AnalogSpec, site: str) -> jax.Array:
    """aihwkit's drift-compensation readout of one layer: the identity (one one-hot vector per input) through the
    tile with its I/O non-idealities; ``max(mean|y|, 1e-4)`` (global) or per output column (column)."""
    return _readout_value(_readout_outputs(key, w_tile, spec, _inp_scale(spec, site)), spec)


def compensation_readout(key: jax.Array | None, w_tile: jax.Array, spec: AnalogSpec, site: str = "") -> jax.Array:
    """The drift-compensation readout ``r`` of one tile (``w_tile`` (n_in, n_out); a kernel is flattened), the
    reference of :func:`drift_compensation_factor`: aihwkit's identity (one one-hot vector per input, at 1.0)
    through the tile with its I/O non-idealities, ``max(mean|y|, 1e-4)`` (global) or per output column (column).
    Under ``IOParams(semantics="v0")`` the one-hot is divided by the input range of ``site``, as before."""
    if spec.v0:
        return _readout(key, w_tile, spec, site)
    return _readout_value(_readout_outputs(key, w_tile, spec, None), spec)


def drift_compensation_factor(r_reference: jax.Array, r_now: jax.Array) -> jax.Array:
    """``alpha = r0 / r_t``: multiplies the layer's outputs at time t (aihwkit ``apply_drift_compensation``)."""
    return r_reference / r_now


def _site_keys(key: jax.Array, base: str, sites: tuple[str, ...], *suffixes: str) -> dict[str, jax.Array]:
    """``{suffix: keys}``, ``keys[i] = name_key(name_key(name_key(key, base), sites[i]), suffix)`` (no suffix for
    ``""``): the keys of every layer derived in one batched computation, the same keys as one layer at a time (a
    program with one key derivation per layer and name compiles noticeably slower)."""
    hashes = jnp.asarray(np.array([noise_lib.stable_hash(site) for site in sites], np.uint32))
    root = noise_lib.name_key(key, base)

    def one(h):
        k = jax.random.fold_in(root, h)
        return tuple(k if s == "" else noise_lib.name_key(k, s) for s in suffixes)

    return dict(zip(suffixes, jax.vmap(one)(hashes)))


def _program_chip_v0(key: jax.Array, params: Mapping[str, Any], spec: AnalogSpec,
                     layers: Sequence[str] | None = None) -> dict[str, dict[str, jax.Array]]:
    """:func:`program_chip` under ``IOParams(semantics="v0")``: one tile per layer holding ``W / A``.

    Args:
      key: the chip key; programming noise of layer ``site`` uses ``name_key(name_key(name_key(key,
        "jaxnoise/device/program"), site), "g_plus")`` (and ``"g_minus"``), drift exponents ``".../drift"``.
      params: the model parameters (the clean weights; any weight noise of a ``NoiseSpec`` applied before).
      spec: the device spec.

    Returns:
      ``{site: {"g_plus", "g_minus", "nu_plus", "nu_minus", "scale", "w_target", "r0"}}``: programmed
      conductances, drift exponents (0 without PCM), the mapping scale ``s``, the (modified) tile-unit target and the
      drift-compensation reference ``r0`` (1 without compensation).
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    sites = analog_sites(params, spec, layers)
    if not sites:
        return {}
    if spec.modifier is not None:
        k_mod = _site_keys(key, "jaxnoise/device/modifier", sites, "")[""]
    if spec.pcm is not None:
        k_prog = _site_keys(key, "jaxnoise/device/program", sites, "g_plus", "g_minus")
        k_drift = _site_keys(key, "jaxnoise/device/drift", sites, "g_plus", "g_minus")
    if spec.compensation is not None:
        k_comp = _site_keys(key, "jaxnoise/device/compensation", sites, "")[""]
    layers = {}
    for i, site in enumerate(sites):
        w = jax.lax.stop_gradient(flat[f"{site}/kernel" if site else "kernel"])
        if spec.modifier is not None:
            w = modify_weights(k_mod[i], w, spec.modifier)
        g_plus, g_minus, scale = weights_to_conductances(w, spec.g_max, spec.g_min,
                                                         per_column=spec.mapping == "column")
        layers[site] = (g_plus, g_minus, scale, _tile(g_plus, g_minus, spec))
    if spec.pcm is not None:   # every layer's drift exponents and programming noise: one draw computation each
        dt = layers[sites[0]][0].dtype
        z_drift = iter(_normals([(k_drift[name][i], layers[site][j].shape) for i, site in enumerate(sites)
                                 for j, name in ((0, "g_plus"), (1, "g_minus"))], dt))
        z_prog = iter(_normals([(k_prog[name][i], layers[site][j].shape) for i, site in enumerate(sites)
                                for j, name in ((0, "g_plus"), (1, "g_minus"))], dt))
    chip = {}
    for i, site in enumerate(sites):
        g_plus, g_minus, scale, target = layers[site]
        if spec.pcm is not None:
            nu_plus = _exponents(g_plus, next(z_drift), spec.pcm, spec.g_max)
            nu_minus = _exponents(g_minus, next(z_drift), spec.pcm, spec.g_max)
            g_plus = _programmed(g_plus, next(z_prog), spec.pcm, spec.g_max)
            g_minus = _programmed(g_minus, next(z_prog), spec.pcm, spec.g_max)
        else:
            nu_plus = nu_minus = jnp.zeros_like(g_plus)
        if spec.compensation is not None:
            r0 = _readout(k_comp[i], _tile(g_plus, g_minus, spec), spec, site)
        else:
            r0 = jnp.ones((), g_plus.dtype)
        chip[site] = {"g_plus": g_plus, "g_minus": g_minus, "nu_plus": nu_plus, "nu_minus": nu_minus,
                      "scale": scale, "w_target": target, "r0": r0}
    return chip


def _read_chip_v0(key: jax.Array, chip: Mapping[str, Mapping[str, jax.Array]], t_inference: Any,
                  spec: AnalogSpec) -> dict[str, dict[str, jax.Array]]:
    """:func:`read_chip` under ``IOParams(semantics="v0")``: drift and read noise on both programmed devices.

    Args:
      key: the read key (read noise of ``site`` from ``name_key(name_key(key, "jaxnoise/device/read"), site)``).
      chip: from :func:`program_chip`.
      t_inference: seconds after programming (array data: a sweep over times compiles once), >= 0.
      spec: the device spec.

    Returns:
      ``{site: {"w_tile", "w_scale", "alpha"}}``: tile weights (normalised), ``A = (g_max - g_min) / s`` (the
      weight of a unit tile weight) and the drift-compensation factor (1 without compensation).
    """
    check_times(t_inference)
    sites = tuple(chip)
    if spec.pcm is not None and sites:
        k_read = _site_keys(key, "jaxnoise/device/read", sites, "g_plus", "g_minus")
    if spec.compensation is not None and sites:
        k_comp = _site_keys(key, "jaxnoise/device/compensation", sites, "")[""]
    if spec.pcm is not None and sites:   # every layer's read noise: one draw computation
        z_read = iter(_normals([(k_read[name][i], chip[site][name].shape) for i, site in enumerate(sites)
                                for name in ("g_plus", "g_minus")], chip[sites[0]]["g_plus"].dtype))
    out = {}
    for i, (site, c) in enumerate(chip.items()):
        g_plus, g_minus = c["g_plus"], c["g_minus"]
        if spec.pcm is not None:
            g_plus = _read(g_plus, c["nu_plus"], t_inference, next(z_read), spec.pcm, spec.g_max)
            g_minus = _read(g_minus, c["nu_minus"], t_inference, next(z_read), spec.pcm, spec.g_max)
        w_tile = _tile(g_plus, g_minus, spec)
        if spec.compensation is not None:
            alpha = drift_compensation_factor(c["r0"], _readout(k_comp[i], w_tile, spec, site))
        else:
            alpha = jnp.ones((), w_tile.dtype)
        dt = w_tile.dtype
        w_scale = (jnp.asarray(spec.g_max, dt) - jnp.asarray(spec.g_min, dt)) / c["scale"]
        out[site] = {"w_tile": w_tile, "w_scale": w_scale, "alpha": alpha}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tiles (aihwkit TileModuleArray) and the layer pipeline of semantics "aihwkit"


_ZERO_CLIP = 1e-7   # aihwkit's floor of max|w| in the conductance converter (converter/conductance.py)


def split_sizes(size: int, max_size: int) -> tuple[int, ...]:
    """aihwkit's split of ``size`` inputs (or outputs) into tiles of at most ``max_size`` (``TileModuleArray.
    get_split_sizes``): ``n = ceil(size / max_size)`` contiguous parts whose sizes ``divmod(size, n)`` makes differ
    by at most one, the larger first: 576 -> (288, 288), 1152 -> (384, 384, 384), 513 -> (257, 256). One part
    when ``max_size <= 0``."""
    if max_size <= 0:
        return (size,)
    n = -(-size // max_size)
    base, extra = divmod(size, n)
    return tuple(base + (i < extra) for i in range(n))


class TileLayout(NamedTuple):
    """The tiles of one analog layer (static, from its kernel shape and :class:`AnalogSpec`).

    The layer's matrix (:func:`layer_matrix`) has one row per input in aihwkit/torch order (a conv's
    ``cin * kh * kw`` inputs ordered (cin, kh, kw), as ``torch.nn.functional.unfold``) and one column per output.
    Input tile ``i`` holds the ``in_sizes[i]`` rows after those of tiles ``< i``, output tile ``j`` the
    ``out_sizes[j]`` columns after those of tiles ``< j``. Arrays of tiles are ``(T_in, T_out, L_in, L_out)``
    (:attr:`shape`), zero-padded to the largest tile.
    """

    kernel_shape: tuple[int, ...]
    in_sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.in_sizes), len(self.out_sizes), max(self.in_sizes), max(self.out_sizes)

    @property
    def channel_groups(self) -> bool:
        """A conv whose input tiles are equal groups of whole input channels (each tile is a conv on
        ``cin / T_in`` channels): ``in_sizes`` all equal and a multiple of ``kh * kw``. A single tile always is."""
        if len(self.kernel_shape) != 4:
            return False
        return len(set(self.in_sizes)) == 1 and self.in_sizes[0] % (self.kernel_shape[0] * self.kernel_shape[1]) == 0

    def mask(self) -> np.ndarray:
        """``(T_in, T_out, L_in, L_out)`` bool: True on the entries of a tile array that hold a weight (not padding)."""
        t_in, t_out, l_in, l_out = self.shape
        rows = np.arange(l_in)[None, :] < np.asarray(self.in_sizes)[:, None]
        cols = np.arange(l_out)[None, :] < np.asarray(self.out_sizes)[:, None]
        return rows[:, None, :, None] & cols[None, :, None, :]


def tile_layout(kernel_shape: tuple[int, ...], spec: AnalogSpec) -> TileLayout:
    """The :class:`TileLayout` of a dense ``(n_in, n_out)`` or conv HWIO kernel under ``spec``'s
    ``max_input_size`` / ``max_output_size``."""
    kernel_shape = tuple(int(d) for d in kernel_shape)
    return TileLayout(kernel_shape, split_sizes(math.prod(kernel_shape[:-1]), spec.max_input_size),
                      split_sizes(kernel_shape[-1], spec.max_output_size))


def layer_matrix(kernel: jax.Array) -> jax.Array:
    """A layer's matrix in aihwkit's order, ``(n_in, n_out)``: a dense kernel itself; a conv kernel
    ``(kh, kw, cin, cout)`` as ``(cin * kh * kw, cout)``, inputs in torch's (cin, kh, kw) order."""
    if kernel.ndim == 4:
        return kernel.transpose(2, 0, 1, 3).reshape(-1, kernel.shape[-1])
    return kernel.reshape(-1, kernel.shape[-1])


def _matrix_to_kernel(m: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    if len(kernel_shape) == 4:
        kh, kw, cin, cout = kernel_shape
        return m.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)
    return m.reshape(kernel_shape)


def _split(a: jax.Array, sizes: tuple[int, ...], axis: int) -> jax.Array:
    """Axis ``axis`` of ``a`` cut into ``len(sizes)`` contiguous parts, zero-padded to the largest: that axis becomes
    two, ``(len(sizes), max(sizes))`` (a reshape when the sizes are equal, else one gather)."""
    axis = axis % a.ndim
    n, size = len(sizes), max(sizes)
    if len(set(sizes)) == 1:
        return a.reshape(a.shape[:axis] + (n, size) + a.shape[axis + 1:])
    idx = np.full((n, size), sum(sizes), np.int32)   # padding reads the zero appended below
    start = 0
    for i, part in enumerate(sizes):
        idx[i, :part] = np.arange(start, start + part)
        start += part
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, 1)
    return jnp.take(jnp.pad(a, pad), idx, axis=axis)


def _unsplit(a: jax.Array, sizes: tuple[int, ...], axis: int) -> jax.Array:
    """The inverse of :func:`_split`: axes ``(axis, axis + 1)`` = (parts, padded part) back to the real entries."""
    axis = axis % a.ndim
    n, size = len(sizes), max(sizes)
    flat = a.reshape(a.shape[:axis] + (n * size,) + a.shape[axis + 2:])
    if len(set(sizes)) == 1:
        return flat
    idx = np.concatenate([i * size + np.arange(part) for i, part in enumerate(sizes)]).astype(np.int32)
    return jnp.take(flat, idx, axis=axis)


def to_tiles(kernel: jax.Array, layout: TileLayout) -> jax.Array:
    """The tile array ``(T_in, T_out, L_in, L_out)`` of a kernel (zero padding)."""
    m = _split(_split(layer_matrix(kernel), layout.in_sizes, 0), layout.out_sizes, 2)   # (T_in, L_in, T_out, L_out)
    return m.transpose(0, 2, 1, 3)


def from_tiles(tiles: jax.Array, layout: TileLayout) -> jax.Array:
    """The kernel (dense or HWIO) of a tile array: the inverse of :func:`to_tiles` (padding dropped)."""
    m = _unsplit(_unsplit(tiles.transpose(0, 2, 1, 3), layout.out_sizes, 2), layout.in_sizes, 0)
    return _matrix_to_kernel(m, layout.kernel_shape)


def _tile_hashes(t_in: int, t_out: int) -> np.ndarray:
    return np.array([noise_lib.stable_hash(f"tile/{i}/{j}") for i in range(t_in) for j in range(t_out)], np.uint32)


def tile_keys(key: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """The keys of a layer's tiles, ``(T_in, T_out)``: tile ``(i, j)`` gets ``name_key(key, f"tile/{i}/{j}")``
    (from the layer's key and the tile's index by name; all at once)."""
    t_in, t_out = grid
    hashes = jnp.asarray(_tile_hashes(t_in, t_out))
    return jax.vmap(lambda h: jax.random.fold_in(key, h))(hashes).reshape(t_in, t_out)


def _layer_tile_keys(key: jax.Array, base: str, sites: tuple[str, ...], grids: list[tuple[int, int]],
                     *suffixes: str) -> dict[str, list[jax.Array]]:
    """``{suffix: [keys of site i, (T_in, T_out)]}``: tile ``(a, b)`` of ``site`` gets ``name_key(name_key(
    name_key(name_key(key, base), site), f"tile/{a}/{b}"), suffix)`` (no suffix for ``""``), every tile of every
    layer in one batched computation."""
    h_site = np.concatenate([np.full(t_in * t_out, noise_lib.stable_hash(site), np.uint32)
                             for site, (t_in, t_out) in zip(sites, grids)])
    h_tile = np.concatenate([_tile_hashes(t_in, t_out) for t_in, t_out in grids])
    root = noise_lib.name_key(key, base)

    def one(hs, ht):
        k = jax.random.fold_in(jax.random.fold_in(root, hs), ht)
        return tuple(k if s == "" else noise_lib.name_key(k, s) for s in suffixes)

    keys = jax.vmap(one)(jnp.asarray(h_site), jnp.asarray(h_tile))
    out: dict[str, list[jax.Array]] = {s: [] for s in suffixes}
    start = 0
    for t_in, t_out in grids:
        for s, k in zip(suffixes, keys):
            out[s].append(k[start:start + t_in * t_out].reshape(t_in, t_out))
        start += t_in * t_out
    return out


def _over_tiles(fn, keys: jax.Array | None, w: jax.Array, x: jax.Array | None = None,
                r: jax.Array | None = None) -> Any:
    """``fn(key, x_tile, w_tile, r_tile)`` of every tile, stacked ``(T_in, T_out, ...)`` (a pytree of such): ``w``
    is ``(T_in, T_out, ...)``, ``keys`` and ``r`` (per-tile input ranges) ``(T_in, T_out)`` or None, ``x`` None or
    with its input-tile axis at -2. One tile: a direct call; more: ``vmap`` over input and output tiles."""
    t_in, t_out = w.shape[:2]
    if t_in * t_out == 1:
        y = fn(None if keys is None else keys[0, 0], None if x is None else x[..., 0, :], w[0, 0],
               None if r is None else r[0, 0])
        return jax.tree.map(lambda a: a[None, None], y)
    k_axis = None if keys is None else 0
    r_axis = None if r is None else 0
    inner = jax.vmap(fn, in_axes=(k_axis, None, 0, r_axis))
    return jax.vmap(inner, in_axes=(k_axis, None if x is None else -2, 0, r_axis))(keys, x, w, r)


def _weight_scales(w: jax.Array, spec: AnalogSpec) -> jax.Array:
    """aihwkit's ``apply_weight_scaling`` on a tile array: ``a = max|w| / omega`` per tile ``(T_in, T_out, 1, 1)``
    (per tile column ``(T_in, T_out, 1, L_out)`` with ``weight_scaling_columnwise``); 1 where ``omega = 0`` or the
    max is 0."""
    axes = (2,) if spec.weight_scaling_columnwise else (2, 3)
    amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    omega = jnp.asarray(spec.weight_scaling_omega, w.dtype)
    on = omega > 0
    a = jnp.where(on, amax / jnp.where(on, omega, 1.0), 1.0)
    return jnp.where(a > 0, a, jnp.ones_like(a))


def _tile_conductances(w: jax.Array, spec: AnalogSpec):
    """aihwkit's ``SinglePairConductanceConverter`` per tile (``mapping="column"``: per tile column) of a tile
    array: ``s = (g_max - g_min) / max(max|w|, 1e-7)``, ``g+- = clip(+-w s, 0, g_max) + g_min``."""
    dt = w.dtype
    g_max, g_min = jnp.asarray(spec.g_max, dt), jnp.asarray(spec.g_min, dt)
    axes = (2,) if spec.mapping == "column" else (2, 3)
    scale = (g_max - g_min) / jnp.maximum(jnp.max(jnp.abs(w), axis=axes, keepdims=True), _ZERO_CLIP)
    ws = w * scale
    return jnp.clip(ws, 0.0, g_max) + g_min, jnp.clip(-ws, 0.0, g_max) + g_min, scale


def _tile_readout(keys: jax.Array | None, w: jax.Array, spec: AnalogSpec, mask: jax.Array) -> jax.Array:
    """aihwkit's drift-compensation readout of every tile: the identity (one one-hot vector per tile input, at 1.0)
    through the tile with its I/O non-idealities, ``max(mean|y|, 1e-4)`` over the tile's entries ``(T_in, T_out,
    1, 1)`` (global) or over its inputs per column ``(T_in, T_out, 1, L_out)`` (column); padding excluded."""
    if spec.io is None:
        y = w
    else:
        y = _over_tiles(lambda k, _, wt, __: analog_mvm(k, None, wt, spec.io), keys, w)
    m = mask.astype(y.dtype)
    axes = (2,) if spec.compensation == "column" else (2, 3)
    count = jnp.maximum(jnp.sum(m, axis=axes, keepdims=True), 1.0)
    return jnp.maximum(jnp.sum(jnp.abs(y) * m, axis=axes, keepdims=True) / count, COMPENSATION_FLOOR)


def program_chip(key: jax.Array, params: Mapping[str, Any], spec: AnalogSpec,
                 layers: Sequence[str] | None = None) -> dict[str, dict[str, jax.Array]]:
    """Programs one chip: every analog layer's tiles, their conductances, programming noise and drift exponents.

    Per layer (aihwkit ``convert_to_analog`` + ``program_analog_weights``): the kernel (after ``spec.modifier``) is
    cut into tiles (:class:`TileLayout`); tile weights ``w = W_tile / a`` (:attr:`AnalogSpec.weight_scaling_omega`;
    ``a = 1``: the raw weights); conductances per tile ``g+- = clip(+-w s, 0, g_max) + g_min``, ``s = (g_max -
    g_min) / max|w|``; programming noise ``g_p = max(g + sigma_prog(g) N, 0)`` and drift exponents from the targets;
    the drift-compensation reference ``r0`` of each tile from its programmed weights ``(g+_p - g-_p) / s``
    (``compensation="global_exact"``: from its target weights, without I/O).

    Args:
      key: the chip key; layer ``site``, tile ``(i, j)``: programming noise from ``name_key(name_key(name_key(
        name_key(key, "jaxnoise/device/program"), site), f"tile/{i}/{j}"), "g_plus")`` (and ``"g_minus"``), drift
        exponents ``".../drift"``, the readout's I/O noise ``".../compensation"`` (no suffix).
      params: the model parameters (the clean weights; any weight noise of a ``NoiseSpec`` applied before).
      spec: the device spec.
      layers: the model's registered analog layers (``model.analog_layers``; ``Model.sample_chip`` passes them);
        None: every layer of ``params`` with a ``kernel`` (a bare parameter tree).

    Returns:
      ``{site: {"g_plus", "g_minus", "nu_plus", "nu_minus", "scale", "w_scale", "w_target", "r0", "mask"}}``, tile
      arrays ``(T_in, T_out, L_in, L_out)`` (scales and ``r0`` with size-1 axes where they are per tile):
      programmed conductances (the targets without PCM), drift exponents (0 without PCM), the conductance scale
      ``s``, the weight scale ``a``, the target tile weights, ``r0`` (1 without compensation) and the mask of
      real (not padding) entries. Under ``IOParams(semantics="v0")``: one matrix per layer, as before.
    """
    if spec.v0:
        return _program_chip_v0(key, params, spec, layers)
    flat = traverse_util.flatten_dict(params, sep="/")
    sites = analog_sites(params, spec, layers)
    if not sites:
        return {}
    kernels = [jax.lax.stop_gradient(flat[f"{site}/kernel" if site else "kernel"]) for site in sites]
    if spec.modifier is not None:
        k_mod = _site_keys(key, "jaxnoise/device/modifier", sites, "")[""]
        kernels = [modify_weights(k_mod[i], w, spec.modifier) for i, w in enumerate(kernels)]
    layouts = [tile_layout(w.shape, spec) for w in kernels]
    grids = [lay.shape[:2] for lay in layouts]
    layers = []
    for w, lay in zip(kernels, layouts):
        tiles = to_tiles(w, lay)
        a = _weight_scales(tiles, spec)
        target = tiles / a
        layers.append((target, a) + _tile_conductances(target, spec))
    dt = layers[0][0].dtype
    if spec.pcm is not None:   # every tile's drift exponents and programming noise: one draw computation each
        k_prog = _layer_tile_keys(key, "jaxnoise/device/program", sites, grids, "g_plus", "g_minus")
        k_drift = _layer_tile_keys(key, "jaxnoise/device/drift", sites, grids, "g_plus", "g_minus")
        z_drift = iter(_normals([(k_drift[name][i], lay.shape[2:]) for i, lay in enumerate(layouts)
                                 for name in ("g_plus", "g_minus")], dt))
        z_prog = iter(_normals([(k_prog[name][i], lay.shape[2:]) for i, lay in enumerate(layouts)
                                for name in ("g_plus", "g_minus")], dt))
    if spec.compensation is not None:
        k_comp = _layer_tile_keys(key, "jaxnoise/device/compensation", sites, grids, "")[""]
    chip = {}
    for i, (site, lay) in enumerate(zip(sites, layouts)):
        target, a, g_plus, g_minus, scale = layers[i]
        mask = jnp.asarray(lay.mask())
        if spec.pcm is not None:
            nu_plus = _exponents(g_plus, next(z_drift), spec.pcm, spec.g_max)
            nu_minus = _exponents(g_minus, next(z_drift), spec.pcm, spec.g_max)
            # padding keeps its target (g_min on both devices: weight 0)
            g_plus = jnp.where(mask, _programmed(g_plus, next(z_prog), spec.pcm, spec.g_max), g_plus)
            g_minus = jnp.where(mask, _programmed(g_minus, next(z_prog), spec.pcm, spec.g_max), g_minus)
            w_prog = (g_plus - g_minus) / scale
        else:
            nu_plus = nu_minus = jnp.zeros_like(g_plus)
            w_prog = target
        if spec.compensation == "global_exact":   # aihwkit: eye @ reference_combined_weights, no I/O, no noise
            m = mask.astype(target.dtype)
            r0 = jnp.maximum(jnp.sum(jnp.abs(target) * m, axis=(2, 3), keepdims=True)
                             / jnp.maximum(jnp.sum(m, axis=(2, 3), keepdims=True), 1.0), COMPENSATION_FLOOR)
        elif spec.compensation is not None:
            r0 = _tile_readout(k_comp[i], w_prog, spec, mask)
        else:
            r0 = jnp.ones(lay.shape[:2] + (1, 1), dt)
        chip[site] = {"g_plus": g_plus, "g_minus": g_minus, "nu_plus": nu_plus, "nu_minus": nu_minus,
                      "scale": scale, "w_scale": a, "w_target": target, "r0": r0, "mask": mask}
    return chip


def read_chip(key: jax.Array, chip: Mapping[str, Mapping[str, jax.Array]], t_inference: Any,
              spec: AnalogSpec) -> dict[str, dict[str, jax.Array]]:
    """One read of a programmed chip at ``t_inference`` s: drift, fresh read noise, drift compensation.

    Per tile (aihwkit ``drift_analog_weights``, ``PCMLikeNoiseModel.apply_drift_noise``): the programmed weights
    ``w_p = (g+_p - g-_p) / s`` are converted again, ``s' = (g_max - g_min) / max|w_p|``, ``g'+- = clip(+-w_p s',
    0, g_max) + g_min`` (one device of each pair non-zero), drifted with the exponents drawn at programming and
    read with 1/f noise of ``Q_s(|g'|)``: ``w_t = (g'+_t - g'-_t) / s'``. Then ``alpha = r0 / r_t`` per tile (per
    tile column for ``compensation="column"``) from the readout of ``w_t``.

    Args:
      key: the read key (tile ``(i, j)`` of ``site``: read noise from ``name_key(name_key(name_key(name_key(key,
        "jaxnoise/device/read"), site), f"tile/{i}/{j}"), "g_plus")`` / ``"g_minus"``, the readout's I/O noise
        from ``".../compensation"``).
      chip: from :func:`program_chip`.
      t_inference: seconds after programming (array data: a sweep over times compiles once), >= 0.
      spec: the device spec.

    Returns:
      ``{site: {"w_tile", "w_scale", "alpha"}}``: the tile weights ``(T_in, T_out, L_in, L_out)`` (0 on padding),
      the weight scale ``a`` of each tile and the drift-compensation factor of each tile (1 without compensation).
      A layer's output is ``sum_i a_ij alpha_ij MVM(x_i, w_ij)`` over input tiles ``i`` (:func:`tiled_mvm`).
      Under ``IOParams(semantics="v0")``: one matrix per layer, ``w_scale = A``, as before.
    """
    if spec.v0:
        if any("mask" in c for c in chip.values()):
            raise ValueError("read_chip: this chip was programmed under IOParams(semantics='aihwkit') but the spec "
                             "has semantics='v0'; program and read it under the same spec.")
        return _read_chip_v0(key, chip, t_inference, spec)
    check_times(t_inference)
    if any("mask" not in c for c in chip.values()):
        raise ValueError("read_chip: this chip was programmed under IOParams(semantics='v0') but the spec has "
                         "semantics='aihwkit'; program and read it under the same spec.")
    sites = tuple(chip)
    grids = [tuple(c["g_plus"].shape[:2]) for c in chip.values()]
    if spec.pcm is not None and sites:   # every tile's read noise: one draw computation
        k_read = _layer_tile_keys(key, "jaxnoise/device/read", sites, grids, "g_plus", "g_minus")
        z_read = iter(_normals([(k_read[name][i], c["g_plus"].shape[2:]) for i, c in enumerate(chip.values())
                                for name in ("g_plus", "g_minus")], chip[sites[0]]["g_plus"].dtype))
    if spec.compensation is not None and sites:
        k_comp = _layer_tile_keys(key, "jaxnoise/device/compensation", sites, grids, "")[""]
    out = {}
    for i, (site, c) in enumerate(chip.items()):
        if spec.pcm is not None:
            w_prog = (c["g_plus"] - c["g_minus"]) / c["scale"]
            g_plus, g_minus, s_read = _tile_conductances(w_prog, spec)
            g_plus = _read(g_plus, c["nu_plus"], t_inference, next(z_read), spec.pcm, spec.g_max)
            g_minus = _read(g_minus, c["nu_minus"], t_inference, next(z_read), spec.pcm, spec.g_max)
            w = jnp.where(c["mask"], (g_plus - g_minus) / s_read, 0.0)
        else:
            w = c["w_target"]
        if spec.compensation is not None:
            alpha = drift_compensation_factor(c["r0"], _tile_readout(k_comp[i], w, spec, c["mask"]))
        else:
            alpha = jnp.ones(w.shape[:2] + (1, 1), w.dtype)
        out[site] = {"w_tile": w, "w_scale": c["w_scale"], "alpha": alpha}
    return out


def tiled_mvm(key: jax.Array | None, x: jax.Array, w: jax.Array, scale: jax.Array, io: IOParams | None,
              layout: TileLayout, *, geometry: Mapping[str, int] | None = None, inp_scale: Any = None,
              noise_flags: tuple[bool, bool] | None = None, ranges: jax.Array | None = None) -> jax.Array:
    """The analog output of one tiled layer (aihwkit ``TileModuleArray.forward``), in the units of ``x`` (no bias).

    Input tile ``i`` sees its slice of each input vector (a dense row, or a conv patch in (cin, kh, kw) order);
    every tile ``(i, j)`` runs :func:`analog_mvm` on its own (its own abs-max scaling, DAC, noise, ADC and bound
    management), its output is multiplied by ``scale[i, j]`` (weight scale times compensation), and the input tiles'
    outputs are summed in float. A conv whose tiles are channel groups (:attr:`TileLayout.channel_groups`, e.g.
    576 = 64 x 3 x 3 inputs -> 2 tiles of 32 channels) runs one conv per tile; other splits run on the im2col
    patches (9x the input's memory for a 3x3 kernel).

    Args:
      key: the layer's pass key (tile ``(i, j)``: ``name_key(key, f"tile/{i}/{j}")``), or None for no noise.
      x: inputs, (..., n_in) for dense, NHWC for a conv.
      w: tile weights ``(T_in, T_out, L_in, L_out)``.
      scale: ``(T_in, T_out, 1, 1)`` or ``(T_in, T_out, 1, L_out)``, multiplying each tile's output.
      io: the I/O parameters, or None for an exact MVM.
      layout: the layer's :class:`TileLayout`.
      geometry: ``{"stride", "padding"}`` of a conv layer, None for dense.
      inp_scale: the constant input scale (``noise_management="constant"``), default ``io.nm_scale``.
      noise_flags: internal (see :func:`analog_mvm`).
      ranges: learned input ranges ``(T_in, T_out)`` (:class:`InputRange`), or None: tile ``(i, j)`` clips its
        input to ``+-ranges[i, j]`` and runs at that input scale (``"constant"``; ``"abs_max"`` scales the clipped
        input by its abs-max), in place of ``inp_scale``.

    Returns:
      ``(..., n_out)`` (dense) or NHWC.
    """
    return _tiled_forward(key, x, w, scale, io, layout, geometry, inp_scale, noise_flags, ranges, False)[0]


def _tiled_forward(key, x, w, scale, io, layout, geometry, inp_scale, noise_flags, ranges, clip_mask: bool):
    """:func:`tiled_mvm`, and with ``clip_mask`` (and ``ranges``) each tile's outputs at ``|y| >= 0.999 out_bound``
    in the tile's output units (aihwkit ``post_forward``'s mask: its output for input ``x_c / r``), ``(T_in, T_out,
    ..., L_out)`` bool, or None."""
    if io is None:
        return _linear(x, from_tiles(w * scale, layout), geometry), None
    keys = None if key is None else tile_keys(key, layout.shape[:2])
    t_in, t_out, _, l_out = layout.shape

    def fn(geo):
        def one(k, xv, wv, rv):
            s = inp_scale
            if rv is not None:   # aihwkit's clamp(x, -r, r), then the DAC at input scale r
                rv = rv.astype(xv.dtype)
                xv = jnp.clip(xv, -rv, rv)
                s = rv
            y = analog_mvm(k, xv, wv, io, geometry=geo, inp_scale=s, noise_flags=noise_flags)
            if not clip_mask or rv is None or io.out_bound is None:
                return y, None
            return y, jnp.abs(y / rv) >= 0.999 * jnp.asarray(io.out_bound, y.dtype)
        return one

    if geometry is None:
        y, mask = _over_tiles(fn(None), keys, w, _split(x, layout.in_sizes, -1), ranges)
    elif layout.channel_groups:   # tile i: a conv on channels [i cg, (i + 1) cg)
        kh, kw, cin, _ = layout.kernel_shape
        cg = cin // t_in
        wk = w.reshape(t_in, t_out, cg, kh, kw, l_out).transpose(0, 1, 3, 4, 2, 5)
        y, mask = _over_tiles(fn(dict(geometry)), keys, wk, x.reshape(x.shape[:-1] + (t_in, cg)), ranges)
    else:   # the im2col patches ((cin, kh, kw) order, as aihwkit's unfold), as dense vectors
        y, mask = _over_tiles(fn(None), keys, w, _split(_patches(x, layout, geometry), layout.in_sizes, -1),
                              ranges)
    if mask is not None:   # padding columns never count
        cols = np.arange(l_out)[None, :] < np.asarray(layout.out_sizes)[:, None]
        mask = mask & jnp.asarray(cols)[None, :].reshape((1, t_out) + (1,) * (mask.ndim - 3) + (l_out,))
    y = y * scale.reshape(scale.shape[:2] + (1,) * (y.ndim - 3) + scale.shape[-1:])
    # The input tiles' outputs added in tile order, as aihwkit's result.add_ (T_in is a few; a jnp.sum over the
    # tile axis crashed XLA:CPU 0.10.2's YNNPACK reduce fusion with chips vmapped: tools/aihwkit_crosscheck.py,
    # preset_hwa conv, segfaulted).
    y = functools.reduce(jnp.add, [y[i] for i in range(t_in)])
    y = jnp.moveaxis(y, 0, -2)   # (..., T_out, L_out)
    return _unsplit(y, layout.out_sizes, y.ndim - 2), mask


def _patches(x: jax.Array, layout: TileLayout, geometry: Mapping[str, int]) -> jax.Array:
    """The im2col patches of a conv input, ``(N, H_out, W_out, cin * kh * kw)`` in (cin, kh, kw) order (aihwkit's
    ``unfold``), padding as zeros."""
    s, p = geometry["stride"], geometry["padding"]
    return jax.lax.conv_general_dilated_patches(x, layout.kernel_shape[:2], (s, s), ((p, p), (p, p)),
                                                dimension_numbers=("NHWC", "OIHW", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _tiled_ste(x, k, w, scale, key, io, inp_scale, geometry, layout, flags):
    """:func:`tiled_mvm` of the chip's tiles ``w``, with the gradient of the exact linear map at ``k`` (the chip's
    effective kernel, straight-through to the clean one)."""
    return tiled_mvm(key, x, w, scale, io, layout, geometry=None if geometry is None else dict(geometry),
                     inp_scale=inp_scale, noise_flags=flags)


def _tiled_ste_fwd(x, k, w, scale, key, io, inp_scale, geometry, layout, flags):
    return _tiled_ste(x, k, w, scale, key, io, inp_scale, geometry, layout, flags), (x, k)


def _tiled_ste_bwd(geometry, layout, flags, res, g):
    x, k = res
    _, vjp = jax.vjp(lambda x, k: _linear(x, k, None if geometry is None else dict(geometry)), x, k)
    dx, dk = vjp(g)
    return dx, dk, None, None, None, None, None


_tiled_ste.defvjp(_tiled_ste_fwd, _tiled_ste_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ranged_ste(x, k, w, scale, key, io, r, geometry, layout, flags):
    """:func:`tiled_mvm` with learned input ranges ``r`` ``(T_in, T_out)``; gradients of :class:`InputRange`."""
    return tiled_mvm(key, x, w, scale, io, layout, geometry=None if geometry is None else dict(geometry),
                     noise_flags=flags, ranges=r)


def _ranged_ste_fwd(x, k, w, scale, key, io, r, geometry, layout, flags):
    y, mask = _tiled_forward(key, x, w, scale, io, layout, None if geometry is None else dict(geometry), None,
                             flags, r, io.input_range.learn_input_range)
    return y, (x, k, r, io, mask)


def _ranged_ste_bwd(geometry, layout, flags, res, g):
    """aihwkit's backward of a tile with an input range (``TileWithPeriphery.pre_backward``, ``post_backward``,
    ``update``): the output gradient of tile (i, j) zeroed where its output is at the bound, ``d_ij = g_ij
    W_ij^T``; input gradient ``sum_j d_ij`` (straight-through: not masked outside the range); range gradient
    :class:`InputRange`'s rule on ``d_ij``; kernel gradient ``clip(x_i, -r_ij, r_ij)^T g_j`` (the update uses the
    unmasked output gradient)."""
    x, k, r, io, mask = res
    geo = None if geometry is None else dict(geometry)
    ir = io.input_range
    dt = x.dtype
    t_in, t_out = layout.shape[:2]
    # The tile inputs as rows (R, T_in, L_in): a dense input, or a conv's im2col patches (every patch entry).
    rows = _patches(x, layout, geo) if geo is not None else x
    n_rows = math.prod(rows.shape[:-1])
    xt = _split(rows.reshape(n_rows, rows.shape[-1]), layout.in_sizes, -1)
    gt = _split(g.reshape(n_rows, g.shape[-1]).astype(dt), layout.out_sizes, -1)     # (R, T_out, L_out)
    kt = to_tiles(k.astype(dt), layout)                                                # (T_in, T_out, L_in, L_out)
    rr = r.astype(dt)[None, :, :, None]                                                # (1, T_in, T_out, 1)
    xr = xt[:, :, None, :]                                                             # (R, T_in, 1, L_in)
    dk = from_tiles(jnp.einsum("rijl,rjo->ijlo", jnp.clip(xr, -rr, rr), gt), layout).astype(k.dtype)
    gm = jnp.broadcast_to(gt[:, None], (n_rows, t_in) + gt.shape[1:])                 # (R, T_in, T_out, L_out)
    if mask is not None:
        gm = jnp.where(jnp.moveaxis(mask.reshape(t_in, t_out, n_rows, -1), 2, 0), 0.0, gm)
    d = jnp.einsum("rijo,ijlo->rijl", gm, kt)                                         # at each tile's input
    dx = _unsplit(jnp.sum(d, axis=2), layout.in_sizes, 1).reshape(rows.shape)
    if geo is not None:   # patch gradients back onto the input (the transpose of im2col)
        dx = jax.vjp(lambda x_: _patches(x_, layout, geo), x)[1](dx)[0]
    if not ir.learn_input_range:
        return dx, dk, None, None, None, None, jnp.zeros_like(r)
    zero = jnp.zeros((), dt)
    gr = (jnp.sum(jnp.where(xr >= rr, jnp.minimum(d, zero), zero), axis=(0, 3))
          - jnp.sum(jnp.where(xr <= -rr, jnp.maximum(d, zero), zero), axis=(0, 3)))   # (T_in, T_out)
    r2 = r.astype(dt)
    if ir.gradient_relative:
        gr = gr * r2 * jnp.asarray(ir.gradient_scale, dt)
    entries = n_rows * jnp.asarray(layout.in_sizes, dt)[:, None]                     # real entries of each d_ij
    if ir.manage_output_clipping and mask is not None:   # aihwkit: 1 - clipped outputs / numel(d_ij)
        clipped = jnp.sum(mask.reshape(t_in, t_out, -1), axis=-1).astype(dt)
        p_out = 1.0 - clipped / entries
        gr = gr - (1.0 - p_out) * r2 * (p_out < jnp.asarray(ir.output_min_percentage, dt))
    real = jnp.asarray(np.arange(xt.shape[-1])[None, :] < np.asarray(layout.in_sizes)[:, None])   # (T_in, L_in)
    inside = jnp.sum((jnp.abs(xr) < rr) & real[None, :, None, :], axis=(0, 3)).astype(dt)
    gr = gr + jnp.asarray(ir.decay, dt) * r2 * (inside / entries > jnp.asarray(ir.input_min_percentage, dt))
    return dx.astype(x.dtype), dk, None, None, None, None, gr.astype(r.dtype)


_ranged_ste.defvjp(_ranged_ste_fwd, _ranged_ste_bwd)


@struct.dataclass
class ChipRead:
    """A programmed chip read at one time: what a forward pass needs besides its pass key.

    Attributes:
      spec: the device spec.
      layers: ``{site: {"w_tile", "w_scale", "alpha"}}`` from :func:`read_chip` (tile arrays
        ``(T_in, T_out, L_in, L_out)``, see :class:`TileLayout`; one matrix per layer under semantics "v0").
    """

    spec: AnalogSpec
    layers: Mapping[str, Mapping[str, jax.Array]]


def read(key: jax.Array, params: Mapping[str, Any], spec: AnalogSpec, t_inference: Any = None,
         read_key: jax.Array | None = None, layers: Sequence[str] | None = None) -> ChipRead:
    """Programs the chip of ``key`` (analog ``layers`` as in :func:`program_chip`) and reads it at ``t_inference``
    (default ``spec.t_inference``).

    The read key defaults to ``name_key(key, "jaxnoise/device/read_pass")``.
    """
    t = spec.t_inference if t_inference is None else t_inference
    chip = program_chip(key, params, spec, layers)
    rk = noise_lib.name_key(key, "jaxnoise/device/read_pass") if read_key is None else read_key
    return ChipRead(spec=spec, layers=read_chip(rk, chip, t, spec))


class AnalogContext:
    """The analog layers of one forward pass (lives only while tracing; used by ``noise.SiteContext.mvm``).

    Args:
      chip: the :class:`ChipRead` of this pass.
      key: the pass key of the I/O noise (tile ``(i, j)`` of layer ``site`` keyed ``name_key(name_key(name_key(key,
        "jaxnoise/device/io"), site), f"tile/{i}/{j}")``), or None for none (quantisation still applies).
    """

    def __init__(self, chip: ChipRead, key: jax.Array | None):
        self.chip = chip
        self.key = None if key is None else noise_lib.name_key(key, "jaxnoise/device/io")
        sites = tuple(chip.layers)
        # Every site's key at once (the same keys as one name_key per site; fewer ops to compile).
        self._site_keys = ({} if key is None or chip.spec.io is None or not sites else
                           dict(zip(sites, _site_keys(key, "jaxnoise/device/io", sites, "")[""])))

    def handles(self, site: str) -> bool:
        return site in self.chip.layers

    def mvm(self, site: str, x: jax.Array, kernel: jax.Array, geometry: Mapping[str, int] | None,
            input_range: jax.Array | None = None) -> jax.Array:
        """The analog layer's output ``~ op(x, kernel)``: per tile the I/O on the tile weights, times the tile's
        weight scale and drift-compensation factor, summed over the input tiles (:func:`tiled_mvm`); the value is
        the chip's, the gradient that of the exact map to ``x`` and the clean ``kernel`` (straight-through).

        ``input_range``: the layer's learned input ranges ``(T_in, T_out)`` (``params[site]["input_range"]``),
        used when ``spec.io.input_range`` is set (:class:`InputRange`: clip, scale and their gradients)."""
        spec = self.chip.spec
        learned = input_range is not None and spec.io is not None and spec.io.input_range is not None
        if spec.v0:
            return self._mvm_v0(site, x, kernel, geometry)
        layer = self.chip.layers[site]
        dt = x.dtype
        layout = tile_layout(kernel.shape, spec)
        if learned and tuple(input_range.shape) != layout.shape[:2]:
            raise ValueError(f"params[{site!r}]['input_range'] has shape {tuple(input_range.shape)} but this "
                             f"device cuts the layer into {layout.shape[:2]} tiles (max_input_size "
                             f"{spec.max_input_size}, max_output_size {spec.max_output_size}): initialise the "
                             f"ranges under this device (jaxnoise.analog.init_input_ranges).")
        w = jax.lax.stop_gradient(layer["w_tile"]).astype(dt)
        alpha = jax.lax.stop_gradient(layer["alpha"]).astype(dt)
        scale = jax.lax.stop_gradient(layer["w_scale"]).astype(dt) * alpha
        w_eff = from_tiles(w * scale, layout)   # the chip's weights in the kernel's units and layout
        k = kernel.astype(dt)
        if spec.compensation is not None:   # d y / d kernel = x alpha, as for y = x (kernel alpha)
            k = k * from_tiles(jnp.broadcast_to(alpha, w.shape), layout)
        k = k + jax.lax.stop_gradient(w_eff - k)
        if spec.io is None:
            return _linear(x, k, geometry)
        key = self._site_keys.get(site)
        geo = None if geometry is None else tuple(geometry.items())
        if learned:
            return _ranged_ste(x, k, w, scale, key, spec.io, input_range, geo, layout, _noise_flags(key, spec.io))
        return _tiled_ste(x, k, w, scale, key, spec.io, _inp_scale(spec, site), geo, layout, _noise_flags(key, spec.io))

    def _mvm_v0(self, site: str, x: jax.Array, kernel: jax.Array, geometry: Mapping[str, int] | None) -> jax.Array:
        """The layer under ``IOParams(semantics="v0")``: tile weights ``W / A``, I/O, ``* A * alpha``."""
        layer = self.chip.layers[site]
        spec = self.chip.spec
        a = jax.lax.stop_gradient(layer["w_scale"]).astype(x.dtype)
        # Value: the chip's tile weights; gradient: to the clean kernel (straight-through).
        w = kernel.astype(x.dtype) / a
        w = w + jax.lax.stop_gradient(layer["w_tile"].astype(x.dtype) - w)
        if spec.io is None:
            y = _linear(x, w, geometry)
        else:
            scale = None if spec.io.inp_ranges is None else spec.io.inp_ranges.get(site)
            key = self._site_keys.get(site)
            y = _analog_mvm_ste(key, x, w, spec.io, scale, None if geometry is None else tuple(geometry.items()))
        return y * a * jax.lax.stop_gradient(layer["alpha"]).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Presets


def _ideal() -> AnalogSpec:
    return AnalogSpec(name="ideal")


def _aihwkit_inference_default() -> AnalogSpec:
    return AnalogSpec(io=IOParams(), pcm=PCMModel(), mapping="tensor", compensation="global",
                      name="aihwkit_inference_default")


def _hwa_standard() -> AnalogSpec:
    # aihwkit's InputRangeParameter of the preset: learned per tile for layers with input_range leaves
    # (init_input_ranges); layers without them use inp_ranges / nm_scale.
    io = IOParams(inp_bound=1.0, inp_res=1.0 / 254, out_bound=10.0, out_res=1.0 / 254, out_noise=0.04,
                  w_noise=0.0175, nm_scale=1.0, noise_management="constant", bound_management="none",
                  input_range=InputRange())
    # aihwkit MappingParameter(weight_scaling_omega=1.0, weight_scaling_columnwise=True, max_input_size=512,
    # max_output_size=0): every tile column remapped to max |w| = 1, so per-column conductances equal per-tile ones.
    return AnalogSpec(io=io, pcm=PCMModel(), mapping="column", compensation="global", weight_scaling_omega=1.0,
                      weight_scaling_columnwise=True, max_input_size=512, max_output_size=0, name="hwa_standard")


PRESETS = {"ideal": _ideal, "aihwkit_inference_default": _aihwkit_inference_default, "hwa_standard": _hwa_standard}
PRESET_DOCS = {
    "ideal": "no device effects: the exact network",
    "aihwkit_inference_default": "aihwkit InferenceRPUConfig defaults: IOParameters() (7-bit DAC with abs-max "
                                 "scaling, 9-bit ADC at +-12, output noise 0.06, iterative bound management), raw "
                                 "weights on tiles of at most 512 x 512 (no weight remapping), PCMLikeNoiseModel "
                                 "(g_max 25 uS per tile), global drift compensation per tile",
    "hwa_standard": "aihwkit StandardHWATrainingPreset without IR drop: 8-bit DAC/ADC, constant input ranges, "
                    "out_bound 10, output noise 0.04, PCM-read w_noise 0.0175, tiles of at most 512 inputs, weights "
                    "remapped to max 1 per tile column, PCM model and global drift compensation at inference",
}


def preset(name: str) -> AnalogSpec:
    """A named device spec (data: change any field with ``.replace``).

    Args:
      name: one of ``PRESETS``: ``ideal``, ``aihwkit_inference_default``, ``hwa_standard``.

    Returns:
      The :class:`AnalogSpec`. ``hwa_standard`` has aihwkit's learned input ranges (``io.input_range``): a model
      gets them with :func:`init_input_ranges` (per tile, trained and checkpointed); a model without them runs at
      the constant ``io.inp_ranges`` (:func:`calibrate_input_ranges`) or ``nm_scale``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown device preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]()


def calibrate_input_ranges(apply_fn, variables, images, *, statistic: str = "std", alpha: float = 3.0,
                           batch_size: int = 256) -> dict[str, jax.Array]:
    """Per-layer constant input ranges of the analog layers from clean data, for ``IOParams(inp_ranges=...)``.

    ``statistic="std"``: ``alpha * std(x)`` pooled over every image, position and channel of the layer input
    (aihwkit ``InputRangeParameter(init_from_data, init_std_alpha=3)``; aihwkit then learns the ranges, this
    library keeps them fixed). ``"absmax"``: ``alpha * max|x|`` (no input is clipped on the calibration data when
    ``alpha >= 1``).

    Args:
      apply_fn: ``apply(variables, x, *, capture_mvm=True)`` returning clean layer inputs in
        ``.captured.inputs`` (``model.apply`` of every ``jaxnoise.models`` model).
      variables: model variables.
      images: preprocessed calibration inputs (the library uses ``data.calibration_images`` of the train split).
      statistic: ``"std"`` or ``"absmax"``.
      alpha: the multiple of the statistic.
      batch_size: images per pass.

    Returns:
      ``{site: float32 range}``.
    """
    _choice(statistic, ("std", "absmax"), "input-range statistic")
    _check_positive(alpha, "alpha")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    if len(images) == 0:
        raise ValueError("calibrate_input_ranges needs at least one image.")

    pooled = noise_lib.pooled_statistics(apply_fn, variables, images, of="mvm_inputs", batch_size=batch_size)
    out = {}
    for site, st in pooled.items():
        value = st.std if statistic == "std" else st.absmax
        out[site] = jnp.float32(alpha * value if value > 0 else 1.0)
    return out


def init_input_ranges(model, variables, spec: AnalogSpec, images, *, method: str = "init_from_data",
                      alpha: float | None = None, batch_size: int = 128, key: jax.Array | None = None):
    """Learned input ranges from data (aihwkit's data-driven init and post-training calibration), per tile.

    Adds ``input_range`` leaves ``(T_in, T_out)`` (the tile grid under ``spec``) beside the kernel of every analog
    layer of ``spec`` (replacing any already there) and sets them from the tile inputs that ``images`` give, in
    batches of ``batch_size`` (the last one may be smaller), by ``method`` (:data:`INPUT_RANGE_METHODS`):

    * ``"init_from_data"``: what aihwkit does during its first ``InputRange.init_from_data`` training batches
      (``apply_input_range``): the mean over those batches of ``alpha * std(x_tile)``, the unbiased std over every
      entry of the tile's input (a conv's im2col patches, padding included); batches with std 0 are skipped. With
      ``init_from_data = 0`` the ranges are ``init_value``. Start HWA training from this.
    * ``"moving_std"``: aihwkit ``calibrate_input_ranges(InputRangeCalibrationType.MOVING_STD)`` after training:
      the same mean over all batches with the all-zero input vectors of each tile left out. aihwkit continues the
      mean from the tile's update counter (after its training-time init, weighting the learned range by
      ``init_from_data`` batches); this starts afresh.
    * ``"max"``: ``calibrate_input_ranges(MAX)``: ``max |x_tile|`` over all batches (nothing clips on them).

    A tile whose inputs are all zero keeps its current range (``init_value`` for a new leaf).

    Args:
      model: a ``jaxnoise.models.Model``.
      variables: its variables (ranges already present are the upstream layers' ranges when ``key`` is given).
      spec: the device spec; its ``io.input_range`` (:class:`InputRange`) must be set (the training view,
        ``preset("hwa_standard").training()``, has it).
      images: preprocessed training images (never the test split; the library uses ``data.calibration_images``).
      method: a key of :data:`INPUT_RANGE_METHODS`.
      alpha: the std multiple (default ``InputRange.init_std_alpha``); ignored by ``"max"``.
      batch_size: images per batch (aihwkit's are the training / calibration loader's batches).
      key: None: the layer inputs of the clean network (exact MVMs). A key: those of the analog forward under
        ``spec`` (each batch ``b`` from ``fold_in(name_key(key, "jaxnoise/device/input_range"), b)``), as aihwkit
        sees them (its ranges of upstream layers change during the pass; here they are those of ``variables``).

    Returns:
      ``(model, variables)``: the model with these layers' ranges recorded (:meth:`Model.with_input_ranges`) and
      the variables with the ``input_range`` leaves (float32).
    """
    if spec.io is None or spec.io.input_range is None:
        raise ValueError("init_input_ranges needs a device spec with IOParams(input_range=InputRange()) (aihwkit's "
                         "input_range enabled; preset('hwa_standard') has it).")
    _choice(method, tuple(INPUT_RANGE_METHODS), "input-range method")
    ir = spec.io.input_range
    alpha = float(ir.init_std_alpha if alpha is None else alpha)
    _check_positive(alpha, "alpha")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    images = jnp.asarray(images)
    if images.shape[0] == 0:
        raise ValueError("init_input_ranges needs at least one image.")
    params = variables["params"]
    sites = analog_sites(params, spec, model.analog_layers)
    flat = traverse_util.flatten_dict(params, sep="/")
    layouts = {s: tile_layout(flat[f"{s}/kernel" if s else "kernel"].shape, spec) for s in sites}
    shapes = {s: lay.shape[:2] for s, lay in layouts.items()}
    new_model = model.with_input_ranges({**dict(model.input_ranges or {}), **shapes})
    geometry = new_model.mvm_geometry
    init = float(np.max(ir.init_value))
    flat = dict(flat)
    for s, shape in shapes.items():   # the current ranges (a new or re-shaped leaf starts at init_value)
        path = f"{s}/{INPUT_RANGE}" if s else INPUT_RANGE
        if path not in flat or tuple(np.shape(flat[path])) != shape:
            flat[path] = jnp.full(shape, init, jnp.float32)
    work = dict(variables, params=traverse_util.unflatten_dict(flat, sep="/"))

    @jax.jit
    def stats(v, x, k):
        if k is None:
            captured = new_model.apply(v, x, capture_mvm=True).captured
        else:
            captured = new_model.apply(v, x, key=k, chip=new_model.pass_chip(k, v["params"], None, spec),
                                       capture_mvm=True).captured
        out = {}
        for s in sites:
            lay, xin = layouts[s], captured.inputs[s]
            rows = _patches(xin, lay, geometry[s]) if geometry[s] is not None else xin
            xt = _split(rows.reshape(-1, rows.shape[-1]).astype(jnp.float32), lay.in_sizes, -1)   # (R, T_in, L_in)
            real = jnp.asarray(np.arange(xt.shape[-1])[None, :] < np.asarray(lay.in_sizes)[:, None])
            sizes = jnp.asarray(lay.in_sizes, jnp.float32)
            nz = jnp.any(xt != 0, axis=-1)                                                  # (R, T_in)
            n_all = xt.shape[0] * sizes
            n_nz = jnp.sum(nz, axis=0).astype(jnp.float32) * sizes
            mean_all = jnp.sum(xt, axis=(0, 2)) / n_all
            mean_nz = jnp.sum(xt, axis=(0, 2)) / jnp.maximum(n_nz, 1.0)    # zero vectors add nothing to the sum
            ss_all = jnp.sum(jnp.where(real, xt - mean_all[:, None], 0.0) ** 2, axis=(0, 2))
            ss_nz = jnp.sum(jnp.where(real & nz[..., None], xt - mean_nz[:, None], 0.0) ** 2, axis=(0, 2))
            out[s] = {"std_all": jnp.sqrt(ss_all / jnp.maximum(n_all - 1, 1.0)),
                      "std_nz": jnp.where(n_nz > 1, jnp.sqrt(ss_nz / jnp.maximum(n_nz - 1, 1.0)), 0.0),
                      "amax": jnp.max(jnp.abs(xt), axis=(0, 2))}
        return out

    n = images.shape[0]
    starts = list(range(0, n, batch_size))
    if method == "init_from_data":
        starts = starts[:ir.init_from_data]
    base = None if key is None else noise_lib.name_key(key, "jaxnoise/device/input_range")
    acc = {s: [] for s in sites}
    for b, start in enumerate(starts):
        k = None if base is None else jax.random.fold_in(base, b)
        for s, st in stats(work, images[start:start + batch_size], k).items():
            acc[s].append(jax.tree.map(lambda a: np.asarray(a, np.float64), st))
    out_flat = dict(traverse_util.flatten_dict(work["params"], sep="/"))
    for s in sites:
        path = f"{s}/{INPUT_RANGE}" if s else INPUT_RANGE
        current = np.asarray(out_flat[path], np.float64)
        value = np.full(shapes[s][:1], np.nan)   # per input tile; NaN: keep the current range
        if acc[s] and method == "max":
            amax = np.max([a["amax"] for a in acc[s]], axis=0)
            value = np.where(amax > 0, amax, np.nan)
        elif acc[s]:
            vals = np.stack([alpha * a["std_all" if method == "init_from_data" else "std_nz"] for a in acc[s]])
            used = vals > 0
            count = used.sum(axis=0)
            value = np.where(count > 0, np.where(used, vals, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)
        out_flat[path] = jnp.asarray(np.where(np.isnan(value)[:, None], current, value[:, None]), jnp.float32)
    return new_model, dict(work, params=traverse_util.unflatten_dict(out_flat, sep="/"))
