"""Noise core: weight and activation noise of analog matrix-vector products, as pure functions.

Everything here is independent of any model. A model calls two things:

* :func:`perturb_weights` once per forward pass (or once per chip, by the Monte Carlo evaluator) on its
  parameter tree, and
* :class:`SiteContext` at every analog matrix-vector-product (MVM) output, i.e. every conv/dense output before
  BatchNorm and before the (digital) bias.

Conventions
-----------
* **One chip = one weight-noise draw.** It is fixed for every input the chip sees. Activation noise is fresh for
  every forward pass.
* **Keys come from names, never positions.** The key of a parameter is
  ``fold_in(weight_key(key), stable_hash(path))`` and the key of an activation site is
  ``fold_in(activation_key(key), stable_hash(site))``, with ``stable_hash`` a BLAKE2b digest of the UTF-8 name
  (not Python's salted ``hash``). Inserting a layer elsewhere therefore leaves the noise at existing sites unchanged.
* **Samplers are named.** The standard normals of a site are drawn from its key by a *sampler*
  ``"<bits>/<transform>"`` (:data:`SAMPLERS`): a bit generator keyed by the site key and a map of 32-bit words to
  N(0, 1). ``NoiseSpec.sampler`` chooses it; None (the default) means :func:`default_sampler` of the backend, which
  is ``"threefry/erfinv"`` (``jax.random.normal`` of the site key, the only sampler before the field existed) for
  weight noise everywhere and for activation noise off CPU, and ``"threefry/icdf16"`` (two 16-bit inverse-CDF
  normals per Threefry word, ~2x the Monte Carlo throughput; tails end at 4.325 sigma) for activation noise on
  CPU. The sampler used is recorded in ``NoiseSpec.describe()`` (``"prng"``); a description without ``"prng"``
  means ``"threefry/erfinv"``, so every result written before the field existed was made with it, and
  ``sampler="threefry/erfinv"`` reproduces those results bit for bit.
* **Scales are data.** ``weight_eta``, ``act_eta``, the calibrated references and the per-site masks are pytree
  leaves (arrays under ``jit``): a sweep over scales or masks compiles once. Kinds and path filters are static.
* In these pure functions ``key=None``, a spec of ``None``, a kind of ``None`` or a zero scale all mean exact
  (noise-free) computation. The Monte Carlo entry points (:mod:`jaxnoise.robustness` and those built on it) reject a
  spec without a key: a clean evaluation there is ``spec=None``.
* **Selectors must select.** ``weight_paths`` patterns, ``weight_mask``/``act_mask`` keys and ``act_ref`` are
  checked against the model (:func:`check_spec`; :func:`perturb_weights` checks the weight selectors itself): noise
  that selects nothing would pass for the clean network under a noisy label. Sequences of names are tuples, never a
  bare string (``weight_paths=("kernel",)``).
* Gradients: weight noise is straight-through (``W + stop_gradient(W_noisy - W)``): the gradient computed at the
  noisy weights is applied to the clean ones, as in forward-noise training (Joshi et al. 2020; aihwkit weight
  modifiers). Activation noise is part of the forward function and is differentiated as such.

References:
  Joshi et al., "Accurate deep neural network inference using computational phase-change memory",
  Nature Communications 11, 2473 (2020). Rasch et al., Nature Communications 14, 5282 (2023).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from jax import lax

from jaxnoise import _checks

# kind -> what eta means (the relative sigma of the kind).
WEIGHT_KINDS: dict[str, str] = {
    "additive_rel_max": "W + eta * max|W| * N(0,1); max over the whole tensor (Joshi et al. 2020, aihwkit)",
    "additive_rel_max_channel": "W + eta * max|W[..., c]| * N(0,1); max per output channel (last axis)",
    "multiplicative": "W * (1 + eta * N(0,1))",
    "lognormal": "W * exp(eta * N(0,1)) (mean factor exp(eta^2/2), not 1)",
}
ACTIVATION_KINDS: dict[str, str] = {
    "additive": "a + eta * r_site * N(0,1); r_site calibrated on clean training activations",
    "multiplicative": "a * (1 + eta * N(0,1))",
}
ACTIVATION_STATISTICS = ("std", "absmax")
DEFAULT_WEIGHT_PATHS = (r"(^|/)kernel$",)


def stable_hash(name: str) -> int:
    """A 32-bit hash of ``name`` that is the same in every process and Python version.

    Args:
      name: a parameter path (``"layer1/0/conv1/kernel"``) or activation-site name (``"layer1/0/conv1"``).

    Returns:
      An int in ``[0, 2**32)``, suitable for ``jax.random.fold_in``.
    """
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=4).digest(), "little")


def name_key(key: jax.Array, name: str) -> jax.Array:
    """The key of a named thing: ``fold_in(key, stable_hash(name))``."""
    return jax.random.fold_in(key, np.uint32(stable_hash(name)))


def weight_key(key: jax.Array) -> jax.Array:
    """The chip key's sub-key for weight noise (one draw = one chip)."""
    return name_key(key, "jaxnoise/weight")


def activation_key(key: jax.Array) -> jax.Array:
    """The forward-pass key's sub-key for activation noise."""
    return name_key(key, "jaxnoise/activation")


# ----------------------------------------------------------------------------------------------------------------
# Standard-normal samplers: "<bits>/<transform>"

SAMPLER_BITS: dict[str, str] = {
    "threefry": "Threefry-2x32-20. In 'threefry/erfinv': jax.random.normal of the site key itself (its own "
                "implementation: threefry2x32 for keys from jax.random.key or jax.random.PRNGKey). Otherwise: the "
                "Threefry-2x32 block of counter (0, i), keyed by jax.random.bits(site_key, (2,)), gives words 2i "
                "and 2i + 1 (jax.extend.random.threefry2x32_p; jax.random.bits would XOR the two into one word)",
    "rbg": "XLA RngBitGenerator (JAX's 'rbg' implementation, XLA's default algorithm of the backend), keyed by "
           "jax.random.bits(site_key, (4,)); under vmap each key draws on its own (sequential_vmap: JAX batches "
           "RngBitGenerator by drawing every member from the first key), so a chip's draw does not depend on how "
           "chips are batched. XLA does not promise the same RngBitGenerator words across backends or compiler "
           "versions",
}
SAMPLER_TRANSFORMS: dict[str, str] = {
    "erfinv": "sqrt(2) * erfinv(u), u uniform on (-1, 1) from the top 23 bits of one 32-bit word per normal "
              "(jax.random.normal's float32 transform); |z| <= 5.42",
    "icdf16": "z = c * Phi^-1((k + 1/2) / 65536) for each 16-bit half k of a 32-bit word (a table lookup): two "
              "normals per word, 65536 equally likely values, exactly symmetric, c = 1.0000101 makes the variance "
              "exactly 1; |z| <= 4.325, so the normal's 1.5e-5 of mass beyond 4.325 sigma is missing (such tails "
              "do not matter for activation noise; use an erfinv sampler where they do); its distribution "
              "function is within 1.1e-5 of the normal's",
}
LEGACY_SAMPLER = "threefry/erfinv"
SAMPLERS: dict[str, str] = {
    "threefry/erfinv": "jax.random.normal(site_key, shape, dtype), bit for bit: the only sampler before "
                       "NoiseSpec.sampler existed; the weight-noise default on every backend and the activation-noise "
                       "default off CPU",
    "threefry/icdf16": "Threefry-2x32 words (both outputs), two 16-bit inverse-CDF normals per word: the "
                       "activation-noise default on CPU (benchmarks/act_noise.py)",
    "rbg/erfinv": "RngBitGenerator words, jax.random.normal's transform",
    "rbg/icdf16": "RngBitGenerator words, two 16-bit inverse-CDF normals per word",
}
DEFAULT_CPU_ACTIVATION_SAMPLER = "threefry/icdf16"


def check_sampler(sampler: Any, name: str = "sampler") -> None:
    """Raises ValueError unless ``sampler`` is None or a name of :data:`SAMPLERS`."""
    if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLERS):
        raise ValueError(f"unknown {name} {sampler!r}; choose one of {sorted(SAMPLERS)} (or None for the backend's "
                         f"default, noise.default_sampler()).")


def default_sampler(backend: str | None = None, noise: str = "activation") -> str:
    """The sampler a ``NoiseSpec(sampler=None)`` uses for ``noise`` (``"activation"`` or ``"weight"``) on a backend.

    * Weight noise: ``"threefry/erfinv"`` on every backend: one draw per chip is cheap, and it keeps weight-noise
      results bit-identical to those made before samplers could be chosen.
    * Activation noise (fresh normals at every MVM output of every pass, ~1.9e9 per ResNet-20 chip on the CIFAR-10
      test split): ``"threefry/icdf16"`` on CPU, the fastest option that passes the statistics tests
      (``tests/test_prng.py``). Measured with ``benchmarks/act_noise.py`` (2026-12-01, 2 shared CPU cores,
      ResNet-20, 1000 CIFAR-10 test images in batches of 500, additive eta 0.2, 2 chips, medians of 5 interleaved
      rounds; two runs): activation-noise Monte Carlo at 0.66x / 0.65x the clean throughput, against 0.31x /
      0.32x with ``threefry/erfinv``, 0.25x / 0.31x with ``rbg/erfinv`` and 0.42x / 0.47x with ``rbg/icdf16``;
      the normals alone 3.7x / 4.4x as fast as with ``threefry/erfinv``. GPUs and TPUs keep ``"threefry/erfinv"``
      (not measured there).

    Changing this default changes new activation-noise results (never weight-noise ones); every result records its
    sampler (``"prng"`` in ``NoiseSpec.describe()``), and results without one were made with ``"threefry/erfinv"``.

    Args:
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``, ...; None: JAX's default backend.
      noise: ``"activation"`` (default) or ``"weight"``.
    """
    if noise not in ("activation", "weight"):
        raise ValueError(f"noise={noise!r}; choose 'activation' or 'weight'.")
    backend = backend or jax.default_backend()
    if noise == "activation" and backend == "cpu":
        return DEFAULT_CPU_ACTIVATION_SAMPLER
    return LEGACY_SAMPLER


def _sequential_rbg_bits(key_data: jax.Array, n: int) -> jax.Array:
    """``n`` uint32 words of the rbg key with data ``key_data`` (4 uint32).

    JAX batches RngBitGenerator by drawing every batch member from the *first* key, so a vmapped draw would depend
    on the other members (chip i's noise on how chips are chunked); ``sequential_vmap`` draws each key on its own.
    """
    @jax.custom_batching.sequential_vmap
    def bits(data):
        return jax.random.bits(jax.random.wrap_key_data(data, impl="rbg"), (n,), jnp.uint32)
    return bits(key_data)


def _words(key: jax.Array, bits: str, n: int) -> jax.Array:
    """``n`` random uint32 words from the site key ``key`` with the bit generator ``bits`` (not for the legacy
    sampler, which is ``jax.random.normal`` itself)."""
    if bits == "threefry":
        pair = jax.random.bits(key, (2,), jnp.uint32)
        blocks = -(-n // 2)
        out = jax.extend.random.threefry2x32_p.bind(pair[0], pair[1], jnp.zeros((blocks,), jnp.uint32),
                                                    lax.iota(jnp.uint32, blocks))
        return jnp.stack(out, axis=-1).reshape(-1)[:n]  # word i depends on the key and i only
    if bits == "rbg":
        return _sequential_rbg_bits(jax.random.bits(key, (4,), jnp.uint32), n)
    raise AssertionError(bits)


def erfinv_normals(words: jax.Array) -> jax.Array:
    """float32 normals, one per uint32 word: jax.random.normal's float32 transform (uniform, then erfinv)."""
    one = np.array(1.0, np.float32).view(np.uint32)
    floats = lax.bitcast_convert_type((words >> np.uint32(9)) | one, jnp.float32) - np.float32(1.0)
    lo = jnp.asarray(np.nextafter(np.float32(-1.0), np.float32(0.0)))
    u = lax.max(lo, floats * (jnp.float32(1.0) - lo) + lo)
    return np.float32(np.sqrt(2)) * lax.erf_inv(u)


_ICDF16: np.ndarray | None = None


def icdf16_table() -> np.ndarray:
    """The 65536 values of the ``icdf16`` transform: ``c * Phi^-1((k + 1/2) / 65536)``, exactly antisymmetric,
    ``c`` making their mean square 1 (float32)."""
    global _ICDF16
    if _ICDF16 is None:
        import scipy.special
        upper = scipy.special.ndtri((np.arange(32768, 65536, dtype=np.float64) + 0.5) / 65536)
        table = np.concatenate([-upper[::-1], upper])
        _ICDF16 = (table / np.sqrt(np.mean(table * table))).astype(np.float32)
        _ICDF16.setflags(write=False)
    return _ICDF16


def _icdf16_normals(words: jax.Array) -> jax.Array:
    """float32 normals, two per uint32 word (its 16-bit halves, looked up in :func:`icdf16_table`)."""
    halves = lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)
    return jnp.asarray(icdf16_table()).at[halves].get(mode="promise_in_bounds")


def standard_normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32,
                    sampler: str = LEGACY_SAMPLER) -> jax.Array:
    """Standard normals drawn from ``key`` by ``sampler`` (a name of :data:`SAMPLERS`).

    ``"threefry/erfinv"`` is exactly ``jax.random.normal(key, shape, dtype)``. The others draw float32 normals and
    cast them to ``dtype``. Every sampler is a pure function of the key: the same key gives the same draw (under
    ``jit`` and ``vmap`` too: a vmapped key draws what it draws alone), and it consumes ``key`` once
    (``jax_debug_key_reuse``). Normal ``j`` of the row-major flattened draw depends on the key and ``j`` only, so
    a larger leading axis (a padded data batch) leaves the draws of the first rows unchanged.

    Args:
      key: the key of this draw (a site or parameter key).
      shape: the output shape.
      dtype: the output dtype (a float type).
      sampler: ``"<bits>/<transform>"``: :data:`SAMPLER_BITS` / :data:`SAMPLER_TRANSFORMS`.
    """
    check_sampler(sampler)
    shape = tuple(int(d) for d in shape)
    if sampler == LEGACY_SAMPLER:
        return jax.random.normal(key, shape, dtype)
    bits, transform = sampler.split("/")
    n = math.prod(shape)
    if n >= 2 ** 32:
        raise ValueError(f"standard_normal: {n} normals in one draw pass the 2**32 counters of one key; draw them in "
                         f"parts with keys of their own.")
    if transform == "erfinv":
        z = erfinv_normals(_words(key, bits, n))
    else:
        z = _icdf16_normals(_words(key, bits, -(-n // 2)))[:n]
    return z.reshape(shape).astype(dtype)


_is_concrete_number = _checks.is_concrete_number  # kept for modules that import it from here


def check_nonnegative(value: Any, name: str, meaning: str, fix: str) -> None:
    """Raises ValueError when a concrete value is not a number (a string, bool, list, ...) or is negative, NaN or
    infinite; tracers pass unchecked. (The shared rule of ``jaxnoise._checks.nonnegative``.)

    Args:
      value: the number or array.
      name: its name in the message.
      meaning: what it is (``"noise scales are standard deviations"``), said when it is not finite or negative.
      fix: what to pass instead, said when it is negative.
    """
    _checks.nonnegative(value, name, meaning, fix)


def check_eta(value: Any, name: str = "eta") -> None:
    """Raises ValueError unless a concrete noise scale is a finite number (or numeric array) >= 0.

    Strings, bools, lists and tuples are errors (a list given to one scale names ``robustness.sweep``, the way to
    evaluate several scales); arrays are scale data and allowed; tracers pass unchecked.
    """
    field = name.rsplit(".", 1)[-1]
    grid = {"weight_eta": "weight_etas", "act_eta": "act_etas"}.get(field)
    hint = (f"use robustness.sweep(..., {grid}=[...]) for several scales" if grid else
            "use robustness.sweep(...) for several scales")
    _checks.scale(value, name, hint=hint)


def _check_kind(kind: str | None, kinds: Mapping[str, str], what: str) -> None:
    if kind is not None and (not isinstance(kind, str) or kind not in kinds):
        raise ValueError(f"unknown {what} noise kind {kind!r}; choose one of {sorted(kinds)} (or None for off).")


@struct.dataclass
class NoiseSpec:
    """What noise a forward pass sees. A pytree: scales, references and masks are leaves; kinds are static.

    Attributes:
      weight_eta: relative weight-noise scale, in the units of ``weight_kind`` (see ``WEIGHT_KINDS``).
      act_eta: relative activation-noise scale, in the units of ``act_kind`` (see ``ACTIVATION_KINDS``).
      act_ref: for ``act_kind="additive"``: ``{site: r_site}``, the absolute reference scale of each site's clean
        output (from :func:`calibrate_activations`); the absolute sigma is ``act_eta * r_site``.
      weight_mask: optional ``{param_path: multiplier}`` of ``weight_eta`` (0/1 masks select layers);
        paths not listed get 1.
      act_mask: optional ``{site: multiplier}`` of ``act_eta``; sites not listed get 1.
      weight_kind: a key of ``WEIGHT_KINDS``, or None for no weight noise (static).
      act_kind: a key of ``ACTIVATION_KINDS``, or None for no activation noise (static).
      weight_paths: regular expressions (``re.search``) over ``/``-joined parameter paths selecting the leaves
        that get weight noise, among the kernels of the model's analog layers (``Model.analog_weight_paths``: the
        layers register themselves; digital layers, BatchNorm and biases stay exact). Default: every one.
      sampler: how the standard normals are drawn from the keys, a name of :data:`SAMPLERS`
        (``"<bits>/<transform>"``), used for weight and activation noise alike; None (default): the backend's
        default per noise, :func:`default_sampler` (``"threefry/erfinv"`` for weight noise everywhere; for
        activation noise ``"threefry/icdf16"`` on CPU and ``"threefry/erfinv"`` elsewhere). Static.
        ``describe()`` records the sampler used; results made before this field existed used
        ``"threefry/erfinv"``, so ``sampler="threefry/erfinv"`` reproduces them bit for bit.
      weight_truncate: clip the weight noise's standard normal at +-k (``k`` > 0) before scaling, as the authors'
        group does with k = 3 (its std is then :func:`clipped_normal_std` (k), 0.9975 at 3, not 1); None
        (default): no truncation. Array data like the scales (a sweep over k compiles once); None is static.

    Examples:
      >>> spec = NoiseSpec(weight_eta=0.1)                     # aihwkit-style additive, 10% of max|W|
      >>> spec = spec.replace(weight_eta=jnp.float32(0.2))     # same compiled program, new scale
      >>> NoiseSpec(act_kind="multiplicative", act_eta=0.1, sampler="threefry/erfinv")  # the pre-sampler draws
    """

    weight_eta: Any = 0.0
    act_eta: Any = 0.0
    act_ref: Mapping[str, Any] | None = None
    weight_mask: Mapping[str, Any] | None = None
    act_mask: Mapping[str, Any] | None = None
    weight_kind: str | None = struct.field(pytree_node=False, default="additive_rel_max")
    act_kind: str | None = struct.field(pytree_node=False, default=None)
    weight_paths: tuple[str, ...] = struct.field(pytree_node=False, default=DEFAULT_WEIGHT_PATHS)
    sampler: str | None = struct.field(pytree_node=False, default=None)
    weight_truncate: Any = None

    def __post_init__(self):
        check_sampler(self.sampler)
        k = self.weight_truncate
        if k is not None and not _checks.is_tracer(k):
            a = np.asarray(k)
            if isinstance(k, bool) or not np.issubdtype(a.dtype, np.number) or a.dtype == bool or not np.all(
                    np.isfinite(a)) or np.any(a <= 0):
                raise ValueError(f"weight_truncate={k!r}: the clip of the standard normal at +-k is a finite "
                                 f"number > 0 (the authors' group uses 3), or None for no truncation.")
        _check_kind(self.weight_kind, WEIGHT_KINDS, "weight")
        _check_kind(self.act_kind, ACTIVATION_KINDS, "activation")
        check_eta(self.weight_eta, "weight_eta")
        check_eta(self.act_eta, "act_eta")
        # A bare string would be iterated per character; a list would not hash as static data.
        object.__setattr__(self, "weight_paths", _checks.names(self.weight_paths, "weight_paths",
                                                               example="kernel"))
        for field, what, meaning, fix in (
                ("act_ref", "site", "reference scales are standard deviations of clean outputs",
                 "calibrate them with noise.calibrate_activations"),
                ("weight_mask", "parameter path", "mask values multiply weight_eta", "0 switches a layer off"),
                ("act_mask", "site", "mask values multiply act_eta", "0 switches a site off")):
            table = getattr(self, field)
            _checks.mapping(table, field, what)
            for k, v in (table or {}).items():
                _checks.scale(v, f"{field}[{k!r}]", meaning=meaning, fix=fix)
        for pattern in self.weight_paths:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"weight_paths pattern {pattern!r} is not a valid regular expression: {e}") from e
        if self.act_kind is None and _is_concrete_number(self.act_eta) and np.any(np.asarray(self.act_eta) != 0):
            raise ValueError(f"act_eta={self.act_eta!r} but act_kind is None: set act_kind to one of "
                             f"{sorted(ACTIVATION_KINDS)} to turn activation noise on.")
        if self.weight_kind is None and _is_concrete_number(self.weight_eta) and np.any(
                np.asarray(self.weight_eta) != 0):
            raise ValueError(f"weight_eta={self.weight_eta!r} but weight_kind is None: set weight_kind to one of "
                             f"{sorted(WEIGHT_KINDS)} to turn weight noise on.")

    @property
    def has_weight_noise(self) -> bool:
        return self.weight_kind is not None

    @property
    def has_activation_noise(self) -> bool:
        return self.act_kind is not None

    def activation_only(self) -> NoiseSpec:
        """The same spec with weight noise switched off (statically)."""
        return self.replace(weight_kind=None, weight_eta=0.0, weight_mask=None)

    def weight_only(self) -> NoiseSpec:
        """The same spec with activation noise switched off (statically)."""
        return self.replace(act_kind=None, act_eta=0.0, act_mask=None)

    def resolved_sampler(self, noise: str = "activation", backend: str | None = None) -> str:
        """The sampler this spec uses for ``noise`` (``"activation"`` or ``"weight"``) on ``backend`` (default: JAX's
        default backend): ``sampler``, or :func:`default_sampler` when it is None."""
        return default_sampler(backend, noise) if self.sampler is None else self.sampler

    def describe(self, backend: str | None = None) -> dict[str, Any]:
        """JSON-ready description in the shared result format (``weight_noise``/``activation_noise``).

        ``"prng"`` is the sampler resolved for ``backend`` (default: JAX's default backend, where the evaluation
        runs). ``activation_noise`` always carries it (its default depends on the backend); ``weight_noise`` carries
        it when it is not ``"threefry/erfinv"``, its default on every backend. A description without ``"prng"``
        (every result written before samplers could be chosen) means ``"threefry/erfinv"``.
        """
        def num(x):
            return None if x is None else float(np.asarray(x))
        weight = None
        if self.weight_kind is not None:
            weight = {"kind": self.weight_kind, "eta": num(self.weight_eta)}
            if self.weight_truncate is not None:
                weight["truncate"] = num(self.weight_truncate)
            sampler = self.resolved_sampler("weight", backend)
            if sampler != LEGACY_SAMPLER:
                weight["prng"] = sampler
        act = None
        if self.act_kind is not None:
            act = {"kind": self.act_kind, "eta": num(self.act_eta),
                   "prng": self.resolved_sampler("activation", backend)}
        return {"weight_noise": weight, "activation_noise": act}


def _selected(path: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def check_spec(spec: NoiseSpec | None, params: Mapping[str, Any], sites: Iterable[str] | None = None, *,
               analog_paths: Iterable[str] | None = None, what: str = "spec") -> None:
    """Raises ValueError when the selectors of ``spec`` name nothing (or something absent) in this model.

    Noise that selects nothing would silently give the clean accuracy under a noisy label, so every selector must
    match: each ``weight_paths`` pattern at least one parameter path, each ``weight_mask`` key a parameter that
    ``weight_paths`` selects, and (when ``sites`` is given) each ``act_mask`` key an activation site; additive
    activation noise needs an ``act_ref`` entry for every site. Only the noise that is on is checked.

    Args:
      spec: the noise spec (None: nothing to check).
      params: the model's parameter tree (``variables["params"]``).
      sites: the model's activation-site names (``model.sites``), or None when unknown.
      analog_paths: the parameter paths that can get weight noise, the kernels of the model's analog layers
        (``model.analog_weight_paths``); None: every leaf of ``params`` (a bare parameter tree).
      what: the spec's name in the messages.
    """
    if spec is None:
        return
    flat = traverse_util.flatten_dict(params, sep="/") if params else {}
    paths = _candidates(flat, analog_paths)
    if spec.weight_kind is not None:
        among = "" if analog_paths is None else " among the analog weights"
        for pattern in spec.weight_paths:
            if not any(re.search(pattern, p) for p in paths):
                raise ValueError(f"{what}.weight_paths pattern {pattern!r} matches no parameter{among}, so the "
                                 f"weight noise would perturb nothing; its candidates: {_checks.listing(paths)}.")
        mask = spec.weight_mask or {}
        unknown = [k for k in mask if k not in flat]
        if unknown:
            raise ValueError(f"{what}.weight_mask names parameters that do not exist: {sorted(unknown)[:5]}; "
                             f"parameter paths: {_checks.listing(flat)}.")
        selectable = set(paths)
        unselected = [k for k in mask if k not in selectable or not _selected(k, spec.weight_paths)]
        if unselected:
            raise ValueError(f"{what}.weight_mask names parameters that weight_paths={spec.weight_paths} does not "
                             f"select{among}, so their mask does nothing: {sorted(unselected)[:5]}; noisy paths: "
                             f"{_checks.listing(p for p in paths if _selected(p, spec.weight_paths))}.")
    if sites is not None and spec.act_kind is not None:
        sites = list(sites)
        unknown = [k for k in (spec.act_mask or {}) if k not in sites]
        if unknown:
            raise ValueError(f"{what}.act_mask names activation sites that do not exist: {sorted(unknown)[:5]}; "
                             f"the model's sites: {_checks.listing(sites)}.")
        if spec.act_kind == "additive":
            missing = [s for s in sites if s not in (spec.act_ref or {})]
            if missing:
                raise ValueError(f"additive activation noise needs the calibrated reference scale of every site, but "
                                 f"{what}.act_ref {'is None' if spec.act_ref is None else 'lacks ' + str(missing[:5])}"
                                 f": compute it for this model with jaxnoise.noise.calibrate_activations(...) and "
                                 f"pass NoiseSpec(act_ref=...).")


def _candidates(flat: Mapping[str, Any], analog_paths: Iterable[str] | None) -> list[str]:
    """The paths of ``flat`` that weight noise may select: those in ``analog_paths`` (the model's registered analog
    kernels), in tree order, or every path when it is None."""
    if analog_paths is None:
        return list(flat)
    allowed = set(_checks.names(analog_paths, "analog_paths", example="conv1/kernel"))
    return [p for p in flat if p in allowed]


def weight_noise_sites(params: Mapping[str, Any], spec: NoiseSpec | None = None, *,
                       analog_paths: Iterable[str] | None = None) -> tuple[str, ...]:
    """The ``/``-joined paths of the parameter leaves that ``spec`` perturbs, in tree order: those of
    ``analog_paths`` (``model.analog_weight_paths``; None: every leaf) that ``spec.weight_paths`` selects."""
    patterns = DEFAULT_WEIGHT_PATHS if spec is None else spec.weight_paths
    flat = traverse_util.flatten_dict(params, sep="/")
    return tuple(p for p in _candidates(flat, analog_paths) if _selected(p, patterns))


def clipped_normal_std(k: float) -> float:
    """Standard deviation of a standard normal clipped (not resampled) at +-k."""
    import scipy.stats
    tail = scipy.stats.norm.sf(k)
    return float(np.sqrt(1 - 2 * tail - 2 * k * scipy.stats.norm.pdf(k) + 2 * k * k * tail))


def weight_delta(key: jax.Array, w: jax.Array, eta: jax.Array, kind: str, sampler: str | None = None,
                 truncate: float | None = None) -> jax.Array:
    """The noise added to one weight tensor: ``W_noisy - W`` for one draw.

    Args:
      key: the key of this tensor (already derived from its path).
      w: the clean weight tensor; for conv kernels (kh, kw, in, out), for dense (in, out): the last axis is the
        output channel.
      eta: the relative scale (array or float), in the units of ``kind``.
      kind: a key of ``WEIGHT_KINDS``.
      sampler: a name of :data:`SAMPLERS`; None: ``default_sampler(noise="weight")`` (``"threefry/erfinv"``,
        i.e. ``jax.random.normal``).
      truncate: clip the standard normal at +-truncate (None: no clip).

    Returns:
      An array like ``w``; exactly zero where ``eta == 0``.
    """
    _check_kind(kind, WEIGHT_KINDS, "weight")
    check_sampler(sampler)
    z = standard_normal(key, w.shape, w.dtype, default_sampler(noise="weight") if sampler is None else sampler)
    if truncate is not None:
        k = jnp.asarray(truncate, z.dtype)
        z = jnp.clip(z, -k, k)
    eta = jnp.asarray(eta, w.dtype)
    if kind == "additive_rel_max":
        return eta * jnp.max(jnp.abs(w)) * z
    if kind == "additive_rel_max_channel":
        axes = tuple(range(w.ndim - 1))
        return eta * jnp.max(jnp.abs(w), axis=axes, keepdims=True) * z
    if kind == "multiplicative":
        return w * eta * z
    if kind == "lognormal":
        return w * jnp.expm1(eta * z)
    raise AssertionError(kind)


def perturb_weights(key: jax.Array | None, params: Mapping[str, Any], spec: NoiseSpec | None, *,
                    analog_paths: Iterable[str] | None = None) -> Any:
    """One chip's weights: every selected leaf of ``params`` with its own name-keyed noise draw.

    Args:
      key: the weight key (``weight_key(chip_key)``), or None for exact weights.
      params: the parameter tree (``variables["params"]``); nested dicts with string keys.
      spec: the noise spec, or None for exact weights.
      analog_paths: the leaves that may get noise: the kernels of the model's analog layers, as the layers
        register them (``model.analog_weight_paths``; ``Model.chip_weights`` passes it), so a digital layer gets
        none whatever its leaves are named. None: every leaf (a bare parameter tree; ``weight_paths`` alone
        selects).

    Returns:
      A tree like ``params``. Leaves not selected (outside ``analog_paths``, or not matched by
      ``spec.weight_paths``) are returned unchanged (same object).
      Straight-through gradient: ``d(out)/d(params)`` is the identity.

    Raises:
      ValueError: a ``weight_paths`` pattern or a ``weight_mask`` key that names no parameter of ``params``
        (:func:`check_spec`): noise that selects nothing would pass for the clean network.

    Examples:
      >>> noisy = perturb_weights(weight_key(jax.random.key(0)), variables["params"], NoiseSpec(weight_eta=0.1))
    """
    if spec is not None and not isinstance(spec, NoiseSpec):
        raise ValueError(f"spec must be a jaxnoise.noise.NoiseSpec or None, got a {type(spec).__name__}.")
    if key is None or spec is None or spec.weight_kind is None:
        return params
    check_spec(spec, params, analog_paths=analog_paths)  # every pattern and weight_mask key must name a weight
    flat = traverse_util.flatten_dict(params, sep="/")
    selected = set(weight_noise_sites(params, spec, analog_paths=analog_paths))
    mask = spec.weight_mask or {}
    sampler = spec.resolved_sampler("weight")
    out = {}
    for path, w in flat.items():
        if path not in selected:
            out[path] = w
            continue
        eta = spec.weight_eta * mask[path] if path in mask else spec.weight_eta
        delta = weight_delta(name_key(key, path), w, eta, spec.weight_kind, sampler, spec.weight_truncate)
        out[path] = w + jax.lax.stop_gradient(delta)
    return traverse_util.unflatten_dict(out, sep="/")


def activation_noise(key: jax.Array, y: jax.Array, eta: jax.Array, kind: str, ref: jax.Array | None = None,
                     sampler: str | None = None):
    """Adds one draw of activation noise to an MVM output ``y``.

    Args:
      key: the key of this site for this forward pass.
      y: the clean MVM output.
      eta: relative scale.
      kind: a key of ``ACTIVATION_KINDS``.
      ref: absolute reference scale ``r_site`` (needed by ``additive``).
      sampler: a name of :data:`SAMPLERS`; None: ``default_sampler()`` of the default backend (on CPU not
        ``"threefry/erfinv"``: pass that for ``jax.random.normal``'s draws).

    Returns:
      The noisy output; exactly ``y`` where ``eta == 0``.
    """
    _check_kind(kind, ACTIVATION_KINDS, "activation")
    check_sampler(sampler)
    z = standard_normal(key, y.shape, y.dtype, default_sampler() if sampler is None else sampler)
    eta = jnp.asarray(eta, y.dtype)
    if kind == "additive":
        return y + eta * jnp.asarray(ref, y.dtype) * z
    if kind == "multiplicative":
        return y * (1 + eta * z)
    raise AssertionError(kind)


class Captured(NamedTuple):
    """The MVM values a pass recorded (``Model.apply(..., capture_mvm=True).captured``), keyed by site.

    Attributes:
      outputs: ``{site: y}``, each MVM's clean output (before activation noise).
      inputs: ``{site: x}``, each MVM's input (after input quantization).
    """

    outputs: dict[str, jax.Array]
    inputs: dict[str, jax.Array]


class SiteContext:
    """Handles the activation-noise sites of one forward pass (a Python object that lives only while tracing).

    A model calls ``ctx(name, y)`` on every analog MVM output. The context
    * adds activation noise keyed by ``name`` (when it has a key and a spec with an activation kind): the normals
      of site ``name`` are drawn from ``fold_in(activation_key(key), stable_hash(name))`` by the spec's sampler
      (``spec.resolved_sampler("activation")``),
    * records the clean outputs when ``capture=True`` (used by :func:`calibrate_activations`),
    * records site names in call order (``ctx.sites``) and rejects a name used twice in one pass.

    Args:
      key: the forward pass key (its ``activation_key`` is derived here), or None for no activation noise.
      spec: the noise spec, or None.
      capture: keep the clean site outputs in ``ctx.captured``.
    """

    def __init__(self, key: jax.Array | None = None, spec: NoiseSpec | None = None, capture: bool = False,
                 analog: Any = None):
        active = key is not None and spec is not None and spec.act_kind is not None
        self.spec = spec
        self.key = activation_key(key) if active else None
        self.sampler = spec.resolved_sampler("activation") if active else None
        self.capture = capture
        self.captured: dict[str, jax.Array] = {}
        self.captured_inputs: dict[str, jax.Array] = {}
        self.sites: list[str] = []
        self.geometry: dict[str, Mapping[str, int] | None] = {}   # each MVM's conv geometry (None: dense)
        self.analog = analog  # a jaxnoise.analog.AnalogContext, or None: every MVM exact

    def mvm(self, name: str, x: jax.Array, kernel: jax.Array, exact: Callable[[jax.Array, jax.Array], jax.Array],
            geometry: Mapping[str, int] | None = None, input_range: jax.Array | None = None) -> jax.Array:
        """The output of the analog MVM ``name``: ``exact(x, kernel)``, or the device's analog MVM when ``name`` is an
        analog layer of ``self.analog``; then the activation-noise site ``name`` (:meth:`__call__`).

        Args:
          name: the layer (site) name.
          x: the layer input.
          kernel: the layer's (possibly noisy) kernel.
          exact: the exact linear map ``exact(x, kernel)``.
          geometry: ``{"stride", "padding"}`` for a convolution, None for a dense layer.
          input_range: the layer's learned input ranges (``jaxnoise.analog.InputRange``), or None; only an analog
            layer uses them.
        """
        self.geometry[name] = None if geometry is None else dict(geometry)
        if self.capture:
            self.captured_inputs[name] = x
        if self.analog is not None and self.analog.handles(name):
            y = self.analog.mvm(name, x, kernel, geometry, input_range)
        else:
            y = exact(x, kernel)
        return self(name, y)

    def __call__(self, name: str, y: jax.Array) -> jax.Array:
        if name in self.sites:
            raise ValueError(f"activation site {name!r} used twice in one forward pass; site names must be unique.")
        self.sites.append(name)
        if self.capture:
            self.captured[name] = y
        if self.key is None:
            return y
        spec = self.spec
        eta = spec.act_eta
        if spec.act_mask is not None and name in spec.act_mask:
            eta = eta * spec.act_mask[name]
        ref = None
        if spec.act_kind == "additive":
            if spec.act_ref is None or name not in spec.act_ref:
                raise ValueError(
                    f"additive activation noise at site {name!r} needs its calibrated reference scale, but "
                    f"spec.act_ref {'is None' if spec.act_ref is None else 'lacks it'}: compute it with "
                    f"jaxnoise.noise.calibrate_activations(...) and pass NoiseSpec(act_ref=...).")
            ref = spec.act_ref[name]
        return activation_noise(name_key(self.key, name), y, eta, spec.act_kind, ref, self.sampler)


def calibrate_activations(apply_fn: Callable[..., Any], variables: Any, images: Any, *,
                          statistic: str = "std", batch_size: int = 256) -> dict[str, jax.Array]:
    """Per-site reference scales ``r_site`` of the clean MVM outputs, for additive activation noise.

    Runs the clean network (no noise, inference-mode BatchNorm) over ``images`` and pools each site's output over
    every image, position and channel: ``std`` is the pooled population standard deviation
    ``sqrt(E[y^2] - E[y]^2)``; ``absmax`` is ``max |y|``. The library's commands pass the first 1024 images of a
    fixed seeded permutation of the training split (``jaxnoise.data.calibration_images``), preprocessed.

    Args:
      apply_fn: ``apply(variables, x, *, capture_mvm=True)`` with the clean MVM outputs in
        ``.captured.outputs`` (``model.apply`` of every model of ``jaxnoise.models``).
      variables: the model variables.
      images: preprocessed inputs, (N, ...) float.
      statistic: ``"std"`` (default) or ``"absmax"``.
      batch_size: images per forward pass.

    Returns:
      ``{site: float32 scalar}``, ready for ``NoiseSpec(act_ref=...)``.
    """
    if statistic not in ACTIVATION_STATISTICS:
        raise ValueError(f"unknown calibration statistic {statistic!r}; choose one of {ACTIVATION_STATISTICS}.")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    n = len(images)
    if n == 0:
        raise ValueError("calibrate_activations needs at least one image.")

    pooled = pooled_statistics(apply_fn, variables, images, of="mvm", batch_size=batch_size)
    return {site: jnp.float32(st.std if statistic == "std" else st.absmax) for site, st in pooled.items()}


class PooledStats(NamedTuple):
    """One site's values pooled over every image, position and channel (sums in float64)."""

    std: float      # population standard deviation, sqrt(E[v^2] - E[v]^2)
    absmax: float   # max |v|
    count: float    # number of values


MVM_VALUES = ("mvm", "mvm_inputs")


def pooled_statistics(apply_fn: Callable[..., Any], variables: Any, images: Any, *, of: str = "mvm",
                      batch_size: int = 256) -> dict[str, PooledStats]:
    """The clean network's MVM outputs (``of="mvm"``) or inputs (``"mvm_inputs"``) at every site, pooled over
    ``images``: the one calibration pass behind :func:`calibrate_activations` (activation-noise references) and
    ``jaxnoise.analog.calibrate_input_ranges`` (DAC input ranges).

    Args:
      apply_fn: ``apply(variables, x, *, capture_mvm=True) -> out`` with ``out.captured`` a :class:`Captured`
        (every model of ``jaxnoise.models``: ``model.apply``).
      variables: the model variables.
      images: preprocessed inputs, (N, ...) float, N >= 1.
      of: ``"mvm"`` (the outputs, ``captured.outputs``) or ``"mvm_inputs"`` (``captured.inputs``).
      batch_size: images per forward pass.

    Returns:
      ``{site: PooledStats}``.
    """
    _checks.choice(of, MVM_VALUES, "pooled values (of=)")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    if len(images) == 0:
        raise ValueError("pooled_statistics needs at least one image.")

    @jax.jit
    def stats(x):
        captured = apply_fn(variables, x, capture_mvm=True).captured
        out = {}
        for site, y in (captured.outputs if of == "mvm" else captured.inputs).items():
            y = y.astype(jnp.float32)
            out[site] = (jnp.sum(y), jnp.sum(y * y), jnp.max(jnp.abs(y)), jnp.float32(y.size))
        return out

    total = None
    for start in range(0, len(images), batch_size):
        s = jax.tree.map(lambda a: np.asarray(a, np.float64), stats(jnp.asarray(images[start:start + batch_size])))
        if total is None:
            total = s
        else:
            total = {k: (a[0] + b[0], a[1] + b[1], max(a[2], b[2]), a[3] + b[3]) for (k, a), b in
                     zip(total.items(), s.values())}
    out = {}
    for site, (s1, s2, amax, count) in total.items():
        mean = s1 / count
        out[site] = PooledStats(std=math.sqrt(max(s2 / count - mean * mean, 0.0)), absmax=float(amax),
                                count=float(count))
    return out


def default_chip_batch_size(backend: str | None = None) -> int:
    """Chips evaluated at once (``jax.lax.map(..., batch_size=...)``) by default on a backend.

    On CPU, vmapping chips whose kernels differ lowers to a grouped convolution that ran 17x slower than one chip
    after another (measured 2026-11-23, ResNet-20), so the CPU default is 1. GPUs and TPUs take 8.
    ``benchmarks/mc_eval.py`` measures the choice.
    """
    backend = backend or jax.default_backend()
    return 1 if backend == "cpu" else 8
