"""Monte Carlo evaluation of accuracy under analog noise: many simulated chips, one compiled program.

Semantics (fixed by :mod:`jaxnoise.noise`):

* **One chip = one weight-noise draw**, fixed for every input that chip sees. Chip ``i`` of an evaluation with
  base key ``K`` has ``chip_key = fold_in(K, i)``, so its draw does not depend on ``n_chips`` or on how chips are
  chunked: the first 3 chips of a 5-chip run are the 3 chips of a 3-chip run.
* The chip is a value, ``chip = model.sample_chip(chip_key, params, spec, device)`` (:class:`jaxnoise.models.Chip`:
  its weights quantized, then ``perturb_weights(weight_key(chip_key), ., spec)``; on a device, programmed once and
  read at each time with ``chip.read(t, key)``), made **once per chip**.
* **Activation noise is fresh for every forward pass**: data batch ``b`` runs
  ``model.apply(variables, x, key=fold_in(chip_key, b), noise=spec.activation_only(), chip=chip)``;
  ``activation_only`` statically switches weight noise off, and the chip's weights are used as they are.
  Consequently, with activation noise the per-chip accuracy depends on the data batch size (each batch is one
  draw); with weight noise only it does not. The normals come from the spec's sampler
  (``NoiseSpec.sampler``, resolved per backend by ``noise.default_sampler``), recorded as ``"prng"`` in each
  result's noise description.
* **Common random numbers**: a :func:`sweep` uses the same chip keys at every scale, so chip ``i`` at scale
  ``eta`` has noise ``eta * z_i`` with the same ``z_i`` for every ``eta``. Differences between scales (and between
  models evaluated with the same key and architecture) then have less variance than with independent draws; the
  per-scale confidence intervals are unaffected, but results at different scales are not independent samples.

**Streamed splits** (``images`` a :class:`jaxnoise.stream.StreamSplit`, ``labels=None``; every entry point): chips
run in groups of ``split.chips_per_pass`` (default: all chips of the call). A group draws its chips' weights once
(a device evaluation programs and reads them at every time once), then the split streams once and each batch
goes through every chip of the group (and every setting of a sweep) before the next batch is read. Chip ``i``'s key
is ``fold_in(K, i)`` whatever its group, and batch ``b`` (its global index in the split) uses ``fold_in(chip_key,
b)``, as in memory, so the keys never depend on the stream's order, workers or processes. With several processes
(``jax.process_count()``) each streams the batches ``b % P == p`` and the integer counts are summed.

Everything runs as one jitted program per (model, data shape, chip count): data batches are scanned with
``lax.scan`` and chips are chunked with ``jax.lax.map(..., batch_size=chip_batch_size)``, so memory stays bounded
by one data batch times one chip chunk. Scales, references and masks of the spec are array data, so a sweep over
scales compiles once (:func:`trace_count` counts the traces).

**Checked before anything is traced** (a ``ValueError`` naming the fix; :func:`check_inputs`): a spec needs a key
(a clean evaluation is ``spec=None``), specs are ``NoiseSpec`` objects whose selectors name parts of the model,
variables hold every leaf of the model (BatchNorm statistics included), counts are integers >= 1, and the call's
estimated memory (:func:`estimate_memory_bytes`) fits the free memory (:func:`available_memory_bytes`), else
:class:`InsufficientMemoryError`.

**Statistics** (:func:`summarize`): ``ci95`` is the Student-t 95% interval of the mean over chips, clipped to
[0, 1]; with one chip ``std``, ``se`` and ``ci95`` are None (JSON null), never a zero-width interval.

Examples:
  >>> model = get_model("cnn")
  >>> ds = load_dataset("digits")
  >>> res = evaluate(model, variables, ds.test.images, ds.test.labels, NoiseSpec(weight_eta=0.1),
  ...                key=jax.random.key(0), n_chips=32, preprocess=ds.preprocess)
  >>> res.mean, res.ci95
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import traverse_util

from jaxnoise import _checks, distributed
from jaxnoise import analog as analog_lib
from jaxnoise import noise as noise_lib
from jaxnoise.models.base import Chip, Model, Variables

__all__ = ["InsufficientMemoryError", "MCResult", "MEMORY_SAFETY_FACTOR", "MonteCarlo", "available_memory_bytes",
           "batch_data", "check_inputs", "check_key", "check_scales", "check_spec_type", "chip_keys", "ci_halfwidth",
           "estimate_memory_bytes", "evaluate", "evaluate_analog", "evaluate_device", "evaluate_many", "format_ci95", "make_chip_eval",
           "spec_as_arrays", "summarize", "sweep", "trace_count"]

def trace_count() -> int:
    """How many times the jitted evaluation programs of this module have been traced (compiled) so far: the sum of
    the entries of their compilation caches (each jitted program owns its cache; nothing is counted inside traced
    code).

    A call that reuses a compiled program leaves it unchanged, so tests can check that a sweep compiles once.
    """
    total = 0
    for program in _PROGRAMS:
        size = getattr(program, "_cache_size", None)
        if size is None:   # pragma: no cover - a JAX without jit cache sizes
            raise RuntimeError("trace_count needs jax.jit functions with _cache_size() (JAX >= 0.4.30).")
        total += int(size())
    return total


def chip_keys(key: jax.Array | int, n_chips: int, start: int = 0) -> jax.Array:
    """The keys of chips ``start .. start + n_chips - 1``: ``fold_in(key, i)`` stacked along axis 0.

    Args:
      key: the base key of the evaluation (a typed or raw PRNG key, or an int seed).
      n_chips: number of chips (>= 0).
      start: index of the first chip.

    Returns:
      An array of ``n_chips`` keys; entry ``j`` equals ``jax.random.fold_in(key, start + j)``.

    Examples:
      >>> keys = chip_keys(jax.random.key(0), 4)        # keys[2] == fold_in(key(0), 2)
    """
    n_chips = _checks.integer(n_chips, "n_chips", minimum=0)
    start = _checks.integer(start, "start", minimum=0)
    if start + n_chips > 2 ** 32:
        raise ValueError(f"chips {start}..{start + n_chips - 1} pass the 2**32 chip indices of fold_in (uint32): "
                         f"chip i and i + 2**32 would be the same chip; use fewer chips or another base key.")
    key = _checks.as_key(key)
    idx = jnp.arange(start, start + n_chips, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def make_chip_eval(model: Model, *, batch_size: int,
                   preprocess: Callable[[jax.Array], jax.Array] | None = None) -> Callable[..., jax.Array]:
    """A pure function that counts one chip's correct predictions over pre-batched data.

    The returned ``chip_correct(variables, images_b, labels_b, valid_b, spec, chip_key)`` takes

    * ``images_b``: (n_batches, batch_size, ...) raw or preprocessed inputs,
    * ``labels_b``: (n_batches, batch_size) int labels,
    * ``valid_b``: (n_batches, batch_size) bool, False on the padding of the last batch,
    * ``spec``: a :class:`~jaxnoise.noise.NoiseSpec`, or None for exact computation,
    * ``chip_key``: the chip's key (``fold_in(K, i)``); None only for exact computation (``spec`` and ``chip``
      None: a spec without a key is an error, never a silent clean count),
    * ``chip`` (optional): the chip (:class:`jaxnoise.models.Chip`, ``model.sample_chip``; read, with a device):
      its weights are used as they are and, when read, pass ``b`` draws its I/O noise from ``fold_in(chip_key, b)``
      too; None draws the chip's weights here (``model.chip_weights(params, chip_key, spec)``),
    * ``batch_ids`` (optional): the global index ``b`` of each batch (default ``arange(n_batches)``), so a device
      holding a shard of the batches draws the same noise as one holding them all,

    uses the chip's weights for every batch, scans the batches with fresh activation noise per batch
    (key ``fold_in(chip_key, b)``) and returns the int32 number of correct valid predictions. It has no Python
    side effects on values, so it can be jitted and vmapped over chip keys, over the scale leaves of ``spec`` and
    over masks in ``spec`` (e.g. ``spec.act_mask``).

    Args:
      model: the model.
      batch_size: the data batch size ``B`` (checked against ``images_b.shape[1]`` when traced).
      preprocess: jax-traceable raw -> float input map applied per batch (``dataset.preprocess``), or None when
        the images are already model inputs.

    Returns:
      ``chip_correct``.

    Examples:
      >>> chip_correct = make_chip_eval(model, batch_size=100, preprocess=ds.preprocess)
      >>> per_chip = jax.jit(jax.vmap(chip_correct, in_axes=(None,) * 5 + (0,)))(
      ...     variables, images_b, labels_b, valid_b, spec, chip_keys(key, 8))
    """
    batch_size = _checks.positive_int(batch_size, "batch_size")

    def chip_correct(variables: Variables, images_b, labels_b, valid_b, spec: noise_lib.NoiseSpec | None,
                     chip_key: jax.Array | None, chip: Chip | None = None,
                     batch_ids: jax.Array | None = None) -> jax.Array:
        if images_b.shape[1] != batch_size:
            raise ValueError(f"images_b has batches of {images_b.shape[1]} images, make_chip_eval was built for "
                             f"batch_size={batch_size}: pre-batch the data as (n_batches, batch_size, ...).")
        analog = chip is not None and chip.state is not None
        if chip_key is None and (spec is not None or analog):
            raise ValueError("chip_correct: a noise spec or a read chip needs a chip_key (fold_in(key, i)); a clean "
                             "evaluation is spec=None, chip=None, chip_key=None.")
        noisy = chip_key is not None and spec is not None
        if noisy:
            if chip is None:
                # One weight draw per chip on the quantized weights (Model.chip_weights), shared by every batch.
                chip = Chip(model.chip_weights(variables["params"], chip_key, spec))
            act_spec = spec.activation_only() if spec.has_activation_noise else None
        else:
            act_spec = None
        per_pass = chip_key is not None and (act_spec is not None or analog)

        def body(total, xs):
            b, x, y, valid = xs
            if preprocess is not None:
                x = preprocess(x)
            key = jax.random.fold_in(chip_key, b) if per_pass else None
            logits = model.apply(variables, x, key=key, noise=act_spec, chip=chip).logits
            hit = (jnp.argmax(logits, axis=-1) == y) & valid
            return total + jnp.sum(hit, dtype=jnp.int32), None

        batches = jnp.arange(images_b.shape[0], dtype=jnp.uint32) if batch_ids is None else batch_ids
        total, _ = jax.lax.scan(body, jnp.int32(0), (batches, images_b, labels_b, valid_b))
        return total

    return chip_correct


# ----------------------------------------------------------------------------------------------------------------
# Statistics and results


def ci_halfwidth(per_chip: Sequence[float] | np.ndarray) -> float:
    """Half-width of the Student-t 95% CI of the mean of ``per_chip`` (inf for fewer than two values), before the
    interval is clipped to [0, 1] (:func:`summarize`); the adaptive stopping rule uses it."""
    a = np.asarray(per_chip, np.float64).ravel()
    if a.size < 2:
        return math.inf
    return float(scipy.stats.t.ppf(0.975, a.size - 1)) * (float(a.std(ddof=1)) / math.sqrt(a.size))


def summarize(per_chip: Sequence[float] | np.ndarray, *,
              bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict[str, Any]:
    """Summary statistics of per-chip accuracies, as in the shared result format.

    Args:
      per_chip: one accuracy per chip (at least one), inside ``bounds``.
      bounds: the range of the values, to which the interval is clipped: ``(0, 1)`` for accuracies (default),
        ``(-1, 1)`` for paired differences of accuracies, None for no clipping.

    Returns:
      ``{"n_chips", "mean", "std", "se", "ci95", "p5"}``, plain Python floats: ``std`` with ddof=1,
      ``se = std / sqrt(n)``, ``ci95`` the Student-t 95% interval of the mean ``mean -/+ t_{0.975, n-1} * se``
      **clipped to** ``bounds`` (an accuracy interval never leaves [0, 1]), ``p5`` the 5th percentile (linear
      interpolation). With one chip ``std``, ``se`` and ``ci95`` are **None** (JSON null): a spread and an interval
      are undefined from one value (ddof=1), never a zero-width interval.

    Raises:
      ValueError: no values, a value that is not finite, or a value outside ``bounds``.

    Examples:
      >>> summarize([0.70, 0.72, 0.68])["ci95"]
      [0.650..., 0.749...]
      >>> summarize([0.5])["ci95"] is None
      True
    """
    a = np.asarray(per_chip, dtype=np.float64).ravel()
    n = a.size
    if n == 0:
        raise ValueError("summarize needs at least one per-chip value.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"per-chip values must be finite, got {a.tolist()[:5]}...")
    if bounds is not None:
        lo_b, hi_b = (float(b) for b in bounds)
        if np.any(a < lo_b) or np.any(a > hi_b):
            raise ValueError(f"per-chip values must lie in [{lo_b:g}, {hi_b:g}], got range [{a.min():g}, {a.max():g}]:"
                             f" accuracies are fractions in [0, 1]; for paired differences pass bounds=(-1, 1).")
    mean = float(a.mean())
    if n == 1:
        std = se = ci = None
    else:
        std = float(a.std(ddof=1))
        se = std / math.sqrt(n)
        half = ci_halfwidth(a)
        lo, hi = mean - half, mean + half
        if bounds is not None:
            lo, hi = max(lo, lo_b), min(hi, hi_b)
        ci = [lo, hi]
    return {"n_chips": int(n), "mean": mean, "std": std, "se": se, "ci95": ci,
            "p5": float(np.percentile(a, 5, method="linear"))}


def format_ci95(ci95: Sequence[float] | None, *, scale: float = 100.0, digits: int = 2, signed: bool = False,
                missing: str = "n/a (1 chip)") -> str:
    """``"[lo, hi]"`` of a 95% CI in percent (``scale=100``), or ``missing`` when it is None (fewer than 2 chips).

    Examples:
      >>> format_ci95([0.65, 0.75])
      '[65.00, 75.00]'
      >>> format_ci95(None)
      'n/a (1 chip)'
    """
    if ci95 is None:
        return missing
    sign = "+" if signed else ""
    return f"[{scale * ci95[0]:{sign}.{digits}f}, {scale * ci95[1]:{sign}.{digits}f}]"


@dataclasses.dataclass(frozen=True, eq=False)
class MCResult:
    """Accuracy of each simulated chip over a whole split, with summary statistics.

    Attributes:
      per_chip: float64 accuracy of each chip, in chip order (chip i has key ``fold_in(key, i)``).
      n_chips: number of chips (1 for a noise-free evaluation).
      n_images: images each chip was evaluated on.
      mean: mean of ``per_chip``.
      std: standard deviation of ``per_chip`` (ddof=1); None for one chip (undefined).
      se: standard error of the mean, ``std / sqrt(n_chips)``; None for one chip.
      ci95: Student-t 95% confidence interval of the mean, clipped to [0, 1]; None for one chip (no interval
        from one value, e.g. a noise-free evaluation). Format it with :func:`format_ci95`.
      p5: 5th percentile of ``per_chip`` (linear interpolation).
      noise: ``{"weight_noise": ..., "activation_noise": ...}`` from ``NoiseSpec.describe()``; both None when
        the evaluation was noise-free. Each carries the normal sampler it used as ``"prng"`` (always for
        activation noise; for weight noise when it is not ``"threefry/erfinv"``); an entry without ``"prng"``
        used ``"threefry/erfinv"`` (``jaxnoise.noise.default_sampler``).
      stopping: for an adaptive evaluation (``evaluate(..., target_ci_halfwidth=...)``), the stopping rule and
        outcome: ``{"rule", "target_ci_halfwidth", "max_chips", "round_chips", "rounds", "ci_halfwidth",
        "met_target"}``; None otherwise.
    """

    per_chip: np.ndarray
    n_chips: int
    n_images: int
    mean: float
    std: float | None
    se: float | None
    ci95: tuple[float, float] | None
    p5: float
    noise: dict[str, Any]
    stopping: dict[str, Any] | None = None

    @classmethod
    def from_per_chip(cls, per_chip: Sequence[float] | np.ndarray, n_images: int,
                      noise: dict[str, Any] | None = None) -> MCResult:
        """Builds a result (with its statistics, :func:`summarize`) from per-chip accuracies in [0, 1]."""
        a = np.asarray(per_chip, dtype=np.float64).ravel()
        s = summarize(a)
        noise = dict(noise) if noise is not None else {"weight_noise": None, "activation_noise": None}
        return cls(per_chip=a, n_chips=s["n_chips"], n_images=int(n_images), mean=s["mean"], std=s["std"],
                   se=s["se"], ci95=None if s["ci95"] is None else tuple(s["ci95"]), p5=s["p5"], noise=noise)

    @property
    def weight_eta(self) -> float | None:
        """The weight-noise scale, or None when weight noise was off."""
        w = self.noise.get("weight_noise")
        return None if w is None else w["eta"]

    @property
    def act_eta(self) -> float | None:
        """The activation-noise scale, or None when activation noise was off."""
        a = self.noise.get("activation_noise")
        return None if a is None else a["eta"]

    def to_dict(self) -> dict[str, Any]:
        """One ``eval`` entry of the shared result format (``../shared/RESULTS.md``), JSON-ready; ``std``, ``se``
        and ``ci95`` are None (null) for one chip."""
        extra = {k: v for k, v in self.noise.items() if k not in ("weight_noise", "activation_noise")}
        return {
            "weight_noise": self.noise.get("weight_noise"),
            "activation_noise": self.noise.get("activation_noise"),
            **extra,
            "n_chips": self.n_chips,
            "n_images": self.n_images,
            "per_chip": [float(x) for x in self.per_chip],
            "mean": self.mean,
            "std": self.std,
            "se": self.se,
            "ci95": None if self.ci95 is None else [float(self.ci95[0]), float(self.ci95[1])],
            "p5": self.p5,
            **({} if self.stopping is None else {"stopping": dict(self.stopping)}),
        }


# ----------------------------------------------------------------------------------------------------------------
# The jitted programs


def _same_callable(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)  # bound methods of one object compare equal
    except Exception:  # noqa: BLE001 - exotic __eq__: fall back to identity
        return False


class _Static:
    """Hashable static argument holding the model and preprocess function; equal when they are the same objects.

    ``Model`` holds a dict (unhashable); preprocess is usually a bound method, a new object on every attribute
    access but equal to the others. The jit cache keeps a strong reference, so ids cannot be reused while cached.
    """

    def __init__(self, model: Model, preprocess: Callable | None, batch_size: int):
        self.model = model
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.chip_correct = make_chip_eval(model, batch_size=batch_size, preprocess=preprocess)
        try:
            pre_hash = hash(preprocess)
        except TypeError:
            pre_hash = id(preprocess)
        self._hash = hash((id(model), pre_hash, batch_size))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _Static) and self.model is other.model and self.batch_size == other.batch_size
                and _same_callable(self.preprocess, other.preprocess))


def _mc_chip_fn(static: _Static, variables, images_b, labels_b, valid_b, spec, batch_ids=None):
    """``chip_key -> number correct`` of one chip under ``spec``."""
    def one_chip(chip_key):
        return static.chip_correct(variables, images_b, labels_b, valid_b, spec, chip_key, batch_ids=batch_ids)
    return one_chip


RECALIBRATIONS = {
    "batch_norm": "BatchNorm running statistics re-estimated through the read chip on calibration training images "
                  "(train-mode passes, the mean over batches of each batch's mean and unbiased variance, as "
                  "torch.optim.swa_utils.update_bn; Joshi et al. 2020's AdaBS), per chip and time",
}


def recalibrated_batch_stats(model: Model, variables: Variables, chip: Chip, calib_b: jax.Array, key: jax.Array, *,
                             preprocess: Callable | None = None, noise: noise_lib.NoiseSpec | None = None) -> Any:
    """BatchNorm running statistics re-estimated through a programmed and read chip (``recalibrate="batch_norm"``;
    ``chip`` a read :class:`jaxnoise.models.Chip`).

    Each calibration batch ``b`` of ``calib_b`` (``(n_batches, B, ...)``, training images only) runs the chip's
    forward in train mode (pass key ``fold_in(key, b)``: I/O and activation noise as in evaluation; BatchNorm
    normalises by the batch's own statistics); the result is the mean over batches of each BatchNorm layer's batch
    mean and unbiased variance (``torch.optim.swa_utils.update_bn`` with equal batches). Jax-traceable.

    Returns:
      A tree like ``variables["batch_stats"]``.
    """
    def body(total, xs):
        b, x = xs
        x = x if preprocess is None else preprocess(x)
        state = model.apply(variables, x, key=jax.random.fold_in(key, b), noise=noise, chip=chip, train=True,
                            bn_momentum=1.0).state
        return jax.tree.map(jnp.add, total, state), None

    zeros = jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), variables["batch_stats"])
    n = calib_b.shape[0]
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(n, dtype=jnp.uint32), calib_b))
    return jax.tree.map(lambda t: t / n, total)


def _device_chip_fn(static: _Static, variables, images_b, labels_b, valid_b, spec, device, times, batch_ids=None,
                    calib_b=None):
    """``chip_key -> (n_times,) numbers correct``: program the chip once, read it at every time (with ``calib_b``,
    its BatchNorm statistics re-estimated after each read, :func:`recalibrated_batch_stats`)."""
    def one_chip(chip_key):
        # The chip's weights (quantized, then its weight-noise draw) are what gets programmed.
        chip = static.model.sample_chip(chip_key, variables["params"], spec, device)
        act_spec = spec.activation_only() if spec is not None and spec.has_activation_noise else None

        def one_time(k_t):
            k, t = k_t
            read = chip.read(t, jax.random.fold_in(noise_lib.name_key(chip_key, "jaxnoise/device/read"), k))
            pass_key = jax.random.fold_in(noise_lib.name_key(chip_key, "jaxnoise/device/time"), k)
            vars_t = variables
            if calib_b is not None:
                calib_key = jax.random.fold_in(noise_lib.name_key(chip_key, "jaxnoise/robustness/recalibrate"), k)
                vars_t = dict(variables, batch_stats=recalibrated_batch_stats(
                    static.model, variables, read, calib_b, calib_key, preprocess=static.preprocess, noise=act_spec))
            return static.chip_correct(vars_t, images_b, labels_b, valid_b, act_spec, pass_key, read,
                                       batch_ids=batch_ids)

        return jax.lax.map(one_time, (jnp.arange(times.shape[0], dtype=jnp.uint32), times))
    return one_chip


def _map_chips(one_chip, keys, chip_batch_size: int):
    # batch_size=None is a plain scan over chips (no vmap at all), the fastest on CPU.
    return jax.lax.map(one_chip, keys, batch_size=None if chip_batch_size == 1 else chip_batch_size)


@functools.partial(jax.jit, static_argnames=("static", "chip_batch_size", "setting_batch_size"))
def _program(static: _Static, variables, images_b, labels_b, valid_b, spec, device, keys, times, calib_b=None, *,
             chip_batch_size: int, setting_batch_size: int | None = None):
    """The Monte Carlo program: the number correct of every chip (``keys``) per setting and read time.

    ``spec`` is one NoiseSpec, or with ``setting_batch_size`` the specs of several settings stacked on a leading
    axis (mapped in groups of that size); ``device`` None (no analog device; ``times`` unused) or an AnalogSpec
    read at each of ``times`` (``calib_b``: the batches that recalibrate BatchNorm per chip and time, or None).
    Counts, int32: (n_chips,), (n_chips, n_times) with a device, (n_settings, n_chips[, n_times]) stacked. Scales,
    times, masks and keys are data: one trace per (model, shapes, static layout).
    """
    def chips(spec):
        if device is None:
            fn = _mc_chip_fn(static, variables, images_b, labels_b, valid_b, spec)
        else:
            fn = _device_chip_fn(static, variables, images_b, labels_b, valid_b, spec, device, times,
                                 calib_b=calib_b)
        return _map_chips(fn, keys, chip_batch_size)

    return chips(spec) if setting_batch_size is None else _map_settings(chips, spec, setting_batch_size)


def _map_settings(fn, specs, setting_batch_size: int):
    return jax.lax.map(fn, specs, batch_size=None if setting_batch_size == 1 else setting_batch_size)


@functools.partial(jax.jit, static_argnames=("static", "mesh", "chip_batch_size", "key_impl", "setting_batch_size"))
def _sharded_program(static: _Static, variables, images_b, labels_b, valid_b, batch_ids, spec, device, times,
                     key_data, chip_ids, *, mesh, chip_batch_size: int, key_impl: str,
                     setting_batch_size: int | None = None):
    """The Monte Carlo program over a mesh: chips sharded over ``"chips"``, data batches over ``"data"``.

    Each device maps its chips (``fold_in(key, chip_id)``, the same keys as the single-device program) over its
    batches (with their global indices ``batch_ids``, so activation/I/O noise keys are unchanged) and the partial
    counts are summed over ``"data"``. Without a ``device`` (None): (n_chips,) counts; with one:
    (n_chips, n_times); with ``setting_batch_size`` (stacked specs, no device): (n_settings, n_chips).
    """
    CHIPS, DATA, P = distributed.CHIPS, distributed.DATA, distributed.P

    def local(variables, images_b, labels_b, valid_b, batch_ids, spec, device, times, key_data, chip_ids):
        key = jax.random.wrap_key_data(key_data, impl=key_impl)

        def chips(spec):
            if device is None:
                fn = _mc_chip_fn(static, variables, images_b, labels_b, valid_b, spec, batch_ids)
            else:
                fn = _device_chip_fn(static, variables, images_b, labels_b, valid_b, spec, device, times, batch_ids)
            return _map_chips(lambda i: fn(jax.random.fold_in(key, i)), chip_ids, chip_batch_size)

        counts = chips(spec) if setting_batch_size is None else _map_settings(chips, spec, setting_batch_size)
        return jax.lax.psum(counts, DATA)

    # check_vma=False: the per-chip scan's carry starts replicated and becomes device-varying.
    return jax.shard_map(local, mesh=mesh, out_specs=P(CHIPS) if setting_batch_size is None else P(None, CHIPS),
                         check_vma=False,
                         in_specs=(P(), P(DATA), P(DATA), P(DATA), P(DATA), P(), P(), P(), P(), P(CHIPS)))(
        variables, images_b, labels_b, valid_b, batch_ids, spec, device, times, key_data, chip_ids)


@functools.partial(jax.jit, static_argnames=("static",))
def _clean_program(static: _Static, variables, images_b, labels_b, valid_b):
    """Number correct of the exact model: int32 scalar."""
    return static.chip_correct(variables, images_b, labels_b, valid_b, None, None)


@functools.partial(jax.jit, static_argnames=("static", "variant_fn", "chip_batch_size", "variant_batch_size"))
def _variants_program(static: _Static, variables, images_b, labels_b, valid_b, spec, keys, variant_data, *,
                      variant_fn: Callable, chip_batch_size: int, variant_batch_size: int | None):
    """Number correct of each chip under each variant ``variant_fn(variables, spec, variant_data[k])``:
    (n_chips, n_variants) int32."""

    def one_chip(chip_key):
        def one_variant(d):
            v, sp = variant_fn(variables, spec, d)
            return static.chip_correct(v, images_b, labels_b, valid_b, sp, chip_key)
        if variant_batch_size is None:
            return jax.vmap(one_variant)(variant_data)
        return jax.lax.map(one_variant, variant_data, batch_size=variant_batch_size)

    return jax.lax.map(one_chip, keys, batch_size=None if chip_batch_size == 1 else chip_batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class _Batched:
    """In-memory test data padded into ``(n_batches, B, ...)`` host arrays; on a device once a program needs it."""
    static: _Static
    images_h: np.ndarray
    labels_h: np.ndarray
    valid_h: np.ndarray
    n_images: int
    sharded: dict = dataclasses.field(default_factory=dict, compare=False)  # mesh -> global arrays

    # On the default device at the first use (after the calling method's checks, the memory guard included).
    @functools.cached_property
    def images_b(self) -> jax.Array:
        return jnp.asarray(self.images_h)

    @functools.cached_property
    def labels_b(self) -> jax.Array:
        return jnp.asarray(self.labels_h)

    @functools.cached_property
    def valid_b(self) -> jax.Array:
        return jnp.asarray(self.valid_h)


def _check_count(name: str, value: Any) -> int:
    """An integer count >= 1 (not a bool, not a float): ``jaxnoise._checks.positive_int``."""
    return _checks.positive_int(value, name)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks shared by the entry points (raised before anything is traced)

def _model_info(model: Model) -> dict[str, Any]:
    """The model's abstract variables (``jax.eval_shape(model.init)``) and the bytes of one image's activations
    (every captured MVM input and output and every named feature, from ``jax.eval_shape``), cached on the model."""
    cache = _checks.object_cache(model, "robustness.model_info")
    if "value" in cache:
        return cache["value"]
    abstract = _checks.abstract_variables(model)
    x = jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, capture_mvm=True), abstract, x)
    info = {"variables": abstract, "activation_bytes": _tree_bytes((out.features, out.captured, out.aux)),
            "input_bytes": _tree_bytes(x)}
    cache["value"] = info
    return info


def _tree_bytes(tree: Any) -> int:
    return int(sum(math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
                   if hasattr(leaf, "dtype")))


def _check_model(model: Any, where: str) -> None:
    if not isinstance(model, Model):
        raise ValueError(f"{where}: model must be a jaxnoise model (jaxnoise.models.get_model(...)), got a "
                         f"{type(model).__name__}.")


def _check_variables(model: Model, variables: Any, where: str) -> None:
    """Raises ValueError unless ``variables`` hold every leaf of ``model`` (params and BatchNorm statistics).

    Catches the common misuse of passing ``variables["params"]`` (or ``{"params": ...}``) to a model with
    BatchNorm before anything is traced, instead of a ``KeyError`` from inside the traced forward pass.
    """
    expected = _model_info(model)["variables"]
    full = "pass the full variables {'params': ..., 'batch_stats': ...} (from model.init, train.train or a checkpoint)"
    if not isinstance(variables, Mapping):
        raise ValueError(f"{where}: variables must be a dict {{'params': ..., 'batch_stats': ...}}, got a "
                         f"{type(variables).__name__}: {full}.")
    if "params" not in variables:
        looks = ": it looks like variables['params']" if set(variables) & set(expected.get("params", {})) else ""
        raise ValueError(f"{where}: variables has no 'params' entry (keys {_checks.listing(sorted(variables), 5)})"
                         f"{looks}; {full}.")
    expected_stats = traverse_util.flatten_dict(dict(expected.get("batch_stats") or {}), sep="/")
    if expected_stats and not variables.get("batch_stats"):
        raise ValueError(f"{where}: {model.name} has BatchNorm layers but variables has no 'batch_stats' (their "
                         f"running statistics), so it cannot run in inference mode: {full}, not only the params.")
    for coll in ("params", "batch_stats"):
        want = traverse_util.flatten_dict(dict(expected.get(coll) or {}), sep="/")
        if not want:
            continue
        given = variables.get(coll)
        if not isinstance(given, Mapping):
            raise ValueError(f"{where}: variables[{coll!r}] must be a nested dict of arrays, got a "
                             f"{type(given).__name__}.")
        have = traverse_util.flatten_dict(dict(given), sep="/")
        missing = [p for p in want if p not in have]
        if missing:
            raise ValueError(f"{where}: variables[{coll!r}] lacks {len(missing)} leaves of {model.name} "
                             f"({_checks.listing(missing, 5)}): the variables belong to another model; initialise "
                             f"with model.init or load weights of this architecture.")
        for p, leaf in want.items():
            if tuple(np.shape(have[p])) != tuple(leaf.shape):
                raise ValueError(f"{where}: variables[{coll!r}][{p!r}] has shape {tuple(np.shape(have[p]))}, "
                                 f"{model.name} expects {tuple(leaf.shape)}: the weights belong to a different "
                                 f"architecture.")


def check_spec_type(spec: Any, name: str, where: str) -> None:
    """Raises ValueError (naming ``where`` and the fix) unless ``spec`` is a ``NoiseSpec`` or None."""
    if spec is not None and not isinstance(spec, noise_lib.NoiseSpec):
        how = " (build it with jaxnoise.noise.NoiseSpec(**...))" if isinstance(spec, Mapping) else ""
        raise ValueError(f"{where}: {name} must be a jaxnoise.noise.NoiseSpec, or None for a clean evaluation; got "
                         f"a {type(spec).__name__}{how}.")


def check_key(spec: Any, key: Any, where: str, name: str = "spec") -> jax.Array | None:
    """The checked key (None when absent); a noise spec without a key is an error (naming ``where``), never a clean
    evaluation."""
    if key is None:
        if spec is not None:
            raise ValueError(f"{where}: a noise spec needs key=... (a PRNG key or an int seed, the chips' base key); "
                             f"a clean evaluation is {name}=None.")
        return None
    return _checks.as_key(key)


def check_inputs(model: Model, variables: Variables, specs: Sequence[noise_lib.NoiseSpec | None], *,
                 where: str = "evaluate", spec_name: str = "spec") -> None:
    """The checks every Monte Carlo entry point runs before tracing: the model, its variables (every leaf,
    BatchNorm statistics included) and each spec's type and selectors (:func:`jaxnoise.noise.check_spec` against
    ``variables["params"]`` and ``model.sites``).

    Raises:
      ValueError: naming the problem and the fix.
    """
    _check_model(model, where)
    _check_variables(model, variables, where)
    for i, sp in enumerate(specs):
        name = spec_name if len(specs) == 1 else f"{spec_name}[{i}]"
        check_spec_type(sp, name, where)
        noise_lib.check_spec(sp, variables["params"], model.sites, analog_paths=model.analog_weight_paths,
                             what=name)


# ----------------------------------------------------------------------------------------------------------------
# Memory guard

MEMORY_SAFETY_FACTOR = 1.5  # estimate = MEMORY_SAFETY_FACTOR * analytic bytes (XLA temporaries, fragmentation)


class InsufficientMemoryError(ValueError):
    """A Monte Carlo call would need more memory than the device has free (raised before anything is allocated).

    Attributes:
      estimate: the estimated bytes (:func:`estimate_memory_bytes`).
      available: the free bytes (:func:`available_memory_bytes`).
    """

    def __init__(self, message: str, estimate: int, available: int):
        super().__init__(message)
        self.estimate = int(estimate)
        self.available = int(available)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def estimate_memory_bytes(model: Model, variables: Variables, batch_size: int, chip_batch_size: int, n_chips: int,
                          *, images: Any = None, n_settings: int = 1, setting_batch_size: int = 1,
                          n_times: int = 1, device: analog_lib.AnalogSpec | None = None,
                          mesh: jax.sharding.Mesh | None = None) -> int:
    """An analytic estimate of the device memory of one Monte Carlo call (cheap: shapes only, nothing allocated).

    ``MEMORY_SAFETY_FACTOR`` times the sum of

    * the variables and the data (``images`` padded to whole batches, labels, masks);
    * per chip chunk (``chip_batch_size`` chips, times ``setting_batch_size`` settings mapped at once): a copy of
      the parameters per chip (plus the delta), ~8 more with a ``device`` (conductances, drift exponents, reads),
      and the activations of one forward pass (every MVM input and output and every feature, from
      ``jax.eval_shape`` on one image) times ``batch_size`` (x3 with device I/O);
    * per chip: its key, its index and its counts (``n_times`` x ``n_settings`` int32).

    With a ``mesh`` the estimate is per device (chips split over ``"chips"``, batches over ``"data"``).

    Args:
      model, variables: the model and its variables.
      batch_size: images per forward pass (capped at the number of images when ``images`` is given).
      chip_batch_size: chips evaluated at once (capped at ``n_chips``).
      n_chips: chips of the call (one round of an adaptive evaluation).
      images: the (raw) images, for the data bytes; None leaves them out.
      n_settings, setting_batch_size: stacked specs of :func:`evaluate_many` (and how many are mapped at once).
      n_times: read times of :func:`evaluate_analog`.
      device: the device spec of :func:`evaluate_analog`, or None.
      mesh: the device mesh, or None.

    Returns:
      The estimate in bytes (an int).
    """
    info = _model_info(model)
    param_bytes = _tree_bytes(variables)
    n_images = None
    data_bytes = 0
    if images is not None:
        shape = np.shape(images)
        n_images = int(shape[0]) if shape else 0
        itemsize = np.dtype(getattr(images, "dtype", np.float32)).itemsize
        per_image = math.prod(shape[1:]) * itemsize + 4 + 1  # image, int32 label, bool mask
        b = max(1, min(int(batch_size), n_images or 1))
        data_bytes = -(-max(n_images, 1) // b) * b * per_image
    b = int(batch_size) if n_images is None else max(1, min(int(batch_size), n_images))
    chips = int(n_chips)
    if mesh is not None:
        chips = -(-chips // mesh.shape[distributed.CHIPS])
        data_bytes = data_bytes // mesh.shape[distributed.DATA] + 1
        b = max(1, b)
    cb = max(1, min(int(chip_batch_size), chips))
    settings = max(1, min(int(setting_batch_size), int(n_settings)))
    copies = 2 + (8 if device is not None else 0)
    act_factor = 3 if (device is not None and device.io is not None) else 1
    chunk = cb * settings * (copies * param_bytes + b * info["activation_bytes"] * act_factor)
    per_chip = chips * (8 + 4 + 4 * int(n_times) * int(n_settings))
    return int(MEMORY_SAFETY_FACTOR * (param_bytes + data_bytes + chunk + per_chip))


def available_memory_bytes(device: Any = None) -> int | None:
    """Free memory of ``device`` (default ``jax.devices()[0]``) in bytes, or None when unknown.

    Accelerators: ``memory_stats()["bytes_limit"] - memory_stats()["bytes_in_use"]``. CPU: ``MemAvailable`` of
    ``/proc/meminfo`` (host memory).
    """
    dev = jax.devices()[0] if device is None else device
    if dev.platform != "cpu":
        try:
            stats = dev.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory statistics
            stats = None
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_memory(where: str, model: Model, variables: Variables, images: Any, *, batch_size: int,
                  chip_batch_size: int, n_chips: int, mesh: jax.sharding.Mesh | None = None, **kw: Any) -> None:
    """Raises :class:`InsufficientMemoryError` when the estimate exceeds the free memory (skipped when unknown)."""
    if _is_stream(images):   # one batch on device at a time: counted as no stored data
        images = None
    estimate = estimate_memory_bytes(model, variables, batch_size, chip_batch_size, n_chips, images=images,
                                     mesh=mesh, **kw)
    dev = None if mesh is None else mesh.devices.flat[0]
    available = available_memory_bytes(dev)
    if available is None or estimate <= available:
        return
    platform = (dev or jax.devices()[0]).platform
    raise InsufficientMemoryError(
        f"{where}: this call needs an estimated {_fmt_bytes(estimate)} (n_chips={n_chips}, chip_batch_size="
        f"{min(chip_batch_size, n_chips)}, batch_size={batch_size}) but only {_fmt_bytes(available)} is free on "
        f"{platform}: lower chip_batch_size or batch_size, or evaluate fewer chips per call (e.g. the adaptive mode "
        f"evaluate(..., n_chips=32, target_ci_halfwidth=..., max_chips=...) draws them in rounds).",
        estimate, available)


def _prepare(model: Model, images: Any, labels: Any, batch_size: int, preprocess: Callable | None
             ) -> _Batched | _StreamData:
    """Validates the data and pads it into (n_batches, B, ...) device arrays with a validity mask; a streamed split
    (``images`` a :class:`jaxnoise.stream.StreamSplit`, ``labels`` None) is checked and kept as a stream."""
    batch_size = _check_count("batch_size", batch_size)
    if _is_stream(images):
        return _prepare_stream(model, images, labels, batch_size, preprocess)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {labels.shape}.")
    if images.ndim < 2 or len(images) != len(labels):
        raise ValueError(f"images and labels must have the same length: got {images.shape[0] if images.ndim else 0}"
                         f" images (shape {images.shape}) and {len(labels)} labels.")
    n = len(labels)
    if n == 0:
        raise ValueError("cannot evaluate on zero images.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= model.num_classes:
        raise ValueError(f"labels must lie in [0, {model.num_classes}) for model {model.name}, got range "
                         f"[{lo}, {hi}]: check the dataset/num_classes.")
    if preprocess is None and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images have dtype {images.dtype} and no preprocess was given: pass "
                         f"preprocess=dataset.preprocess (or preprocessed float images).")
    b = min(batch_size, n)
    n_batches = -(-n // b)
    pad = n_batches * b - n
    valid = np.arange(n_batches * b) < n
    if pad:  # pad with copies of the last image (finite through any preprocess); masked out
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        labels = np.concatenate([labels, np.repeat(labels[-1:], pad)])
    return _Batched(
        static=_Static(model, preprocess, b),
        images_h=images.reshape((n_batches, b) + images.shape[1:]),
        labels_h=labels.astype(np.int32).reshape(n_batches, b),
        valid_h=valid.reshape(n_batches, b),
        n_images=n,
    )


def batch_data(model: Model, images: Any, labels: Any, batch_size: int,
               preprocess: Callable | None = None) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Validated, padded data for :func:`make_chip_eval`: ``(images_b, labels_b, valid_b, n_images)``.

    The last batch is padded with copies of the last image and masked out by ``valid_b``.
    """
    data = _prepare(model, images, labels, batch_size, preprocess)
    return data.images_b, data.labels_b, data.valid_b, data.n_images


def spec_as_arrays(spec: noise_lib.NoiseSpec) -> noise_lib.NoiseSpec:
    """Every leaf of ``spec`` (scales, references, masks) as a float32 array: one compiled program for all values."""
    return _spec_as_arrays(spec)


def _spec_as_arrays(spec: noise_lib.NoiseSpec) -> noise_lib.NoiseSpec:
    """Every leaf (scales, references, masks) as a float32 array: one compiled program for all values."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), spec)


def _typed_key(key: Any) -> jax.Array:
    """A typed PRNG key from a typed key, a raw uint32 key or an int seed."""
    key = _checks.as_key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key


def _check_mesh(mesh: Any) -> jax.sharding.Mesh:
    if not isinstance(mesh, jax.sharding.Mesh) or set(mesh.axis_names) != {distributed.CHIPS, distributed.DATA}:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with axes ('chips', 'data'), got {mesh!r}: build it "
                         f"with jaxnoise.distributed.mc_mesh(n_chips) or make_mesh(n_chip_shards, n_data_shards).")
    return mesh


def _sharded_data(data: _Batched, mesh: jax.sharding.Mesh) -> tuple[jax.Array, ...]:
    """``(images_b, labels_b, valid_b, batch_ids)`` as global arrays sharded over ``"data"`` (cached per mesh).

    The batches are padded to a multiple of the data-axis size with masked copies of batch 0; ``batch_ids`` keeps
    each real batch's global index, so its noise keys are those of the single-device run.
    """
    if mesh not in data.sharded:
        shards = mesh.shape[distributed.DATA]
        nb = data.images_h.shape[0]
        pad = -nb % shards
        images, labels, valid = data.images_h, data.labels_h, data.valid_h
        if pad:
            images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
            labels = np.concatenate([labels, np.repeat(labels[:1], pad, axis=0)])
            valid = np.concatenate([valid, np.zeros((pad,) + valid.shape[1:], bool)])
        ids = np.arange(nb + pad, dtype=np.uint32)
        spec = distributed.P(distributed.DATA)
        data.sharded[mesh] = tuple(distributed.global_array(x, mesh, spec) for x in (images, labels, valid, ids))
    return data.sharded[mesh]


def _run_chips(data: _Batched, variables: Variables, spec: noise_lib.NoiseSpec | None, key: jax.Array,
               start: int, n_chips: int, chip_batch_size: int, mesh: jax.sharding.Mesh | None = None,
               device: analog_lib.AnalogSpec | None = None, times: np.ndarray | None = None,
               setting_batch_size: int | None = None, calib_b: jax.Array | None = None) -> np.ndarray:
    """Accuracy of chips ``start .. start + n_chips - 1``: (n_chips,), or (n_chips, n_times) with a device, or
    (n_settings, n_chips[, n_times]) when ``spec`` is stacked (leading axis on every leaf) and
    ``setting_batch_size`` is set (:func:`_program`).

    Without a mesh: one jitted program on the default device. With one: the sharded program; chips are padded to
    a multiple of the chips-axis size with the next chips (computed and discarded), so every chip's value is the
    same as without a mesh.
    """
    spec = None if spec is None else _spec_as_arrays(spec)
    if device is not None:
        device = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), device)
        times = jnp.asarray(times, jnp.float32)
    if isinstance(data, _StreamData):
        return _run_stream_chips(data, variables, spec, key, start, n_chips, chip_batch_size, mesh, device, times,
                                 setting_batch_size)
    if mesh is None:
        keys = chip_keys(key, n_chips, start)
        cbs = min(chip_batch_size, n_chips)
        correct = _program(data.static, variables, data.images_b, data.labels_b, data.valid_b, spec, device, keys,
                           times, calib_b, chip_batch_size=cbs, setting_batch_size=setting_batch_size)
        return np.asarray(correct, dtype=np.float64) / data.n_images
    mesh = _check_mesh(mesh)
    shards = mesh.shape[distributed.CHIPS]
    n_padded = -(-n_chips // shards) * shards
    images_b, labels_b, valid_b, batch_ids = _sharded_data(data, mesh)
    key = _typed_key(key)
    rep = functools.partial(distributed.replicate, mesh=mesh)
    chip_ids = distributed.global_array(np.arange(start, start + n_padded, dtype=np.uint32), mesh,
                                        distributed.P(distributed.CHIPS))
    correct = _sharded_program(data.static, rep(variables), images_b, labels_b, valid_b, batch_ids, rep(spec),
                               rep(device), rep(times), rep(jax.random.key_data(key)), chip_ids, mesh=mesh,
                               chip_batch_size=min(chip_batch_size, n_padded // shards),
                               key_impl=str(jax.random.key_impl(key)), setting_batch_size=setting_batch_size)
    correct = distributed.to_host(correct)
    correct = correct[:n_chips] if setting_batch_size is None else correct[:, :n_chips]
    return correct.astype(np.float64) / data.n_images


# ----------------------------------------------------------------------------------------------------------------
# Streamed splits (jaxnoise.stream): chips in groups, the split streamed once per group
#
# A chip group (``chips_per_pass`` chips, default all of the call) draws its chips' weights (or programs and reads
# its chips at every time) once; then the split streams once, batch by batch, and every chip of the group (under
# every setting) sees each batch before the next one is read. Keys do not depend on the stream: chip i has
# fold_in(key, i) whatever its group, and batch b (its global index in the split) draws activation/I/O noise from
# fold_in(chip_key, b), as in memory. With several processes each streams batches b % P == p and the counts are
# summed over processes.


def _is_stream(images: Any) -> bool:
    return hasattr(images, "eval_batches") and hasattr(images, "materialize")


@dataclasses.dataclass(frozen=True)
class _StreamData:
    static: _Static
    split: Any
    n_images: int
    batch_size: int
    chips_per_pass: int | None = None


def _prepare_stream(model: Model, split: Any, labels: Any, batch_size: int, preprocess: Callable | None
                    ) -> _StreamData:
    if labels is not None:
        raise ValueError("a streamed split carries its labels: pass labels=None with images=<StreamSplit>.")
    n = len(split)
    if n == 0:
        raise ValueError("cannot evaluate on zero images.")
    shape = (int(split.resolution), int(split.resolution), int(split.channels))
    if shape != tuple(model.input_shape):
        raise ValueError(f"the streamed {split.name} {split.description} has images of shape {shape} but model "
                         f"{model.name} expects {tuple(model.input_shape)}: load the dataset with resolution="
                         f"{model.input_shape[0]} or build the model with input_shape={shape}.")
    if preprocess is None:
        raise ValueError("a streamed split yields uint8 images: pass preprocess=dataset.preprocess.")
    b = min(batch_size, n)
    return _StreamData(_Static(model, preprocess, b), split, n, b, getattr(split, "chips_per_pass", None))


def _chip_map(fn, xs, chip_batch_size: int):
    return jax.lax.map(fn, xs, batch_size=None if chip_batch_size == 1 else chip_batch_size)


def _stream_weights(static: _Static, variables, spec, keys, chip_batch_size: int):
    """Every chip's weights (quantized, its weight-noise draw): (n_chips, ...) leaves."""
    return _chip_map(lambda k: static.model.chip_weights(variables["params"], k, spec), keys, chip_batch_size)


@functools.partial(jax.jit, static_argnames=("static", "chip_batch_size", "mode"))
def _stream_state_program(static: _Static, variables, spec, keys, device, times, *, chip_batch_size: int, mode: str):
    """What a chip group keeps while the split streams: its weights (``"mc"``; per setting for ``"settings"``),
    or its weights and its read chip at every time (``"device"``)."""
    if mode == "mc":
        return _stream_weights(static, variables, spec, keys, chip_batch_size)
    if mode == "settings":
        return jax.lax.map(lambda sp: _stream_weights(static, variables, sp, keys, chip_batch_size), spec)

    def one_chip(chip_key):   # as _device_chip_fn: program once, read at every time
        chip = static.model.sample_chip(chip_key, variables["params"], spec, device)

        def one_time(k_t):
            k, t = k_t
            return chip.read(t, jax.random.fold_in(noise_lib.name_key(chip_key, "jaxnoise/device/read"),
                                                   k)).state.layers

        return chip.weights, jax.lax.map(one_time, (jnp.arange(times.shape[0], dtype=jnp.uint32), times))
    return _chip_map(one_chip, keys, chip_batch_size)


@functools.partial(jax.jit, static_argnames=("static", "chip_batch_size", "mode"))
def _stream_batch_program(static: _Static, variables, state, images, labels, valid, b, spec, keys, device, times, *,
                          chip_batch_size: int, mode: str):
    """Numbers correct on one batch (global index ``b``): (n_chips,), (n_settings, n_chips) or (n_chips, n_times)."""
    xs = (images[None], labels[None], valid[None])
    ids = b[None]
    if mode == "clean":
        return static.chip_correct(variables, *xs, None, None)
    if mode in ("mc", "settings"):
        def chips(sp, weights):
            return _chip_map(lambda wk: static.chip_correct(variables, *xs, sp, wk[1], Chip(wk[0]), batch_ids=ids),
                             (weights, keys), chip_batch_size)
        if mode == "mc":
            return chips(spec, state)
        return jax.lax.map(lambda a: chips(*a), (spec, state))
    act_spec = spec.activation_only() if spec is not None and spec.has_activation_noise else None

    def one_chip(args):
        params, layers, chip_key = args

        def one_time(k_l):
            k, lay = k_l
            pass_key = jax.random.fold_in(noise_lib.name_key(chip_key, "jaxnoise/device/time"), k)
            return static.chip_correct(variables, *xs, act_spec, pass_key, Chip(params, device, state=analog_lib.ChipRead(device, lay)),
                                       batch_ids=ids)

        return jax.lax.map(one_time, (jnp.arange(times.shape[0], dtype=jnp.uint32), layers))
    return _chip_map(one_chip, (state[0], state[1], keys), chip_batch_size)


# Every jitted program of this module (trace_count sums their compilation caches).
_PROGRAMS = (_program, _sharded_program, _clean_program, _variants_program, _stream_state_program,
             _stream_batch_program)


def _stream_pass(data: _StreamData, variables, spec, keys, chip_batch_size: int, device=None, times=None,
                 stacked: bool = False) -> np.ndarray:
    """One pass over the stream for one chip group: summed integer counts (over batches and processes)."""
    mode = "clean" if keys is None else "device" if device is not None else "settings" if stacked else "mc"
    state = None
    if mode != "clean":
        state = _stream_state_program(data.static, variables, spec, keys, device, times,
                                      chip_batch_size=chip_batch_size, mode=mode)
    total = None
    p, n_proc = jax.process_index(), jax.process_count()
    desc = f"{data.split.name} {data.split.description}" + ("" if keys is None else f", {keys.shape[0]} chips")
    for b, images, labels, valid in data.split.eval_batches(data.batch_size, process_index=p, process_count=n_proc,
                                                            desc=desc):
        counts = _stream_batch_program(data.static, variables, state, images, labels, valid,
                                       jnp.asarray(b, jnp.uint32), spec, keys, device, times,
                                       chip_batch_size=chip_batch_size, mode=mode)
        total = counts if total is None else total + counts
    total = np.asarray(total, np.int64)
    if n_proc > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        total = np.asarray(multihost_utils.process_allgather(total), np.int64).sum(axis=0)
    return total


def _run_stream_chips(data: _StreamData, variables, spec, key, start: int, n_chips: int, chip_batch_size: int,
                      mesh, device, times, setting_batch_size) -> np.ndarray:
    """:func:`_run_chips` for a stream: chip groups of ``chips_per_pass``, one pass over the stream each."""
    if mesh is not None:
        raise ValueError("mesh= with a streamed split is not supported: run one process per host instead (each "
                         "streams its share of the batches; jaxnoise.distributed.initialize()) and omit mesh.")
    group = int(data.chips_per_pass or n_chips)
    parts = []
    for g0 in range(0, n_chips, group):
        keys = chip_keys(key, min(group, n_chips - g0), start + g0)
        parts.append(_stream_pass(data, variables, spec, keys, min(chip_batch_size, keys.shape[0]), device, times,
                                  stacked=setting_batch_size is not None))
    correct = np.concatenate(parts, axis=1 if setting_batch_size is not None else 0)
    return correct.astype(np.float64) / data.n_images


def _noise_off() -> dict[str, Any]:
    return {"weight_noise": None, "activation_noise": None}


def described(spec: noise_lib.NoiseSpec | None, model: Any) -> dict[str, Any]:
    """The result files' noise record of ``spec`` on ``model``: ``spec.describe()``, with the model's quantization
    (``model.quant.describe()``) inside ``weight_noise`` (noise on quantized weights is another condition than on
    float weights), or as ``"quant"`` beside it when there is no weight noise."""
    desc = _noise_off() if spec is None else spec.describe()
    quant = getattr(model, "quant", None)
    if quant is not None:
        if desc.get("weight_noise"):
            desc["weight_noise"] = dict(desc["weight_noise"], quant=quant.describe())
        else:
            desc["quant"] = quant.describe()
    return desc


# ----------------------------------------------------------------------------------------------------------------
# The evaluator


class MonteCarlo:
    """The Monte Carlo evaluator of one model on one test set: the data is checked and batched once (and sharded
    over ``mesh`` once), and each call counts every chip's correct answers, per setting and read time, in one
    program (``_program``: counts per setting x chip x time; its sharded form over a mesh; the exact model and
    placement variants have their own). Compilations are cached by (model, preprocess, batch size, shapes), not
    by evaluator, so new evaluators, other variables of the model and other scales reuse them
    (:func:`trace_count`).

    :func:`evaluate`, :func:`evaluate_many`, :func:`sweep` and :func:`evaluate_analog` are one-call adapters over
    it; :func:`jaxnoise.placement.evaluate_variants` and :func:`jaxnoise.sensitivity.sensitivity_map` evaluate
    through it. Keep one to evaluate several checkpoints or settings on the same images.

    Args:
      model: the model (``jaxnoise.models.get_model``).
      images, labels, batch_size, chip_batch_size, preprocess, mesh: as in :func:`evaluate`; ``chip_batch_size``
        None takes ``noise.default_chip_batch_size()``.
      caller: the name error messages begin with (the adapters give theirs).

    Raises:
      ValueError: at construction, for the model, the counts, the mesh and the data (as :func:`evaluate`); each
        call then checks its own arguments and its memory before anything is traced or moved to a device.

    Examples:
      >>> mc = MonteCarlo(model, ds.test.images, ds.test.labels, preprocess=ds.preprocess)
      >>> mc.clean(variables).mean                                            # noise-free
      >>> mc.evaluate(variables, NoiseSpec(weight_eta=0.1), key=0, n_chips=32).ci95
      >>> mc.sweep(variables, NoiseSpec(), weight_etas=[0.05, 0.1], key=0)    # the same chips at every scale
    """

    def __init__(self, model: Model, images: Any, labels: Any = None, *, batch_size: int = 500,
                 chip_batch_size: int | None = None, preprocess: Callable[[jax.Array], jax.Array] | None = None,
                 mesh: jax.sharding.Mesh | None = None, caller: str = "MonteCarlo"):
        self.caller = str(caller)
        _check_model(model, self.caller)
        self.model = model
        self.batch_size = _check_count("batch_size", batch_size)
        self.chip_batch_size = _check_count("chip_batch_size", noise_lib.default_chip_batch_size()
                                            if chip_batch_size is None else chip_batch_size)
        self.mesh = None if mesh is None else _check_mesh(mesh)
        self.preprocess = preprocess
        self._data = _prepare(model, images, labels, self.batch_size, preprocess)
        # The memory guard reads the images' shape and dtype only: a zero-strided stand-in (no copy kept).
        self._images_like = (None if isinstance(self._data, _StreamData)
                             else np.broadcast_to(np.zeros((), self._data.images_h.dtype),
                                                  (self._data.n_images,) + self._data.images_h.shape[2:]))

    @property
    def n_images(self) -> int:
        """The number of test images each chip is evaluated on."""
        return self._data.n_images

    def _where(self, method: str) -> str:
        return method if self.caller == "MonteCarlo" else self.caller

    def _check_memory(self, where: str, variables: Variables, *, n_chips: int, chip_batch_size: int | None = None,
                      mesh: Any = "own", **kw: Any) -> None:
        _check_memory(where, self.model, variables, self._images_like, batch_size=self.batch_size,
                      chip_batch_size=self.chip_batch_size if chip_batch_size is None else chip_batch_size,
                      n_chips=n_chips, mesh=self.mesh if mesh == "own" else mesh, **kw)

    def _chips(self, variables: Variables, spec: Any, key: jax.Array, start: int, n_chips: int, **kw: Any
               ) -> np.ndarray:
        return _run_chips(self._data, variables, spec, key, start, n_chips, self.chip_batch_size, self.mesh, **kw)

    def clean(self, variables: Variables) -> MCResult:
        """Accuracy of the exact model (one "chip", no interval)."""
        where = self._where("MonteCarlo.clean")
        check_inputs(self.model, variables, [None], where=where)
        self._check_memory(where, variables, n_chips=1, chip_batch_size=1, mesh=None)
        data = self._data
        if isinstance(data, _StreamData):
            correct = _stream_pass(data, variables, None, None, 1)
        else:
            correct = _clean_program(data.static, variables, data.images_b, data.labels_b, data.valid_b)
        return MCResult.from_per_chip([int(correct) / data.n_images], data.n_images, described(None, self.model))

    def evaluate(self, variables: Variables, spec: noise_lib.NoiseSpec | None = None, *,
                 key: jax.Array | int | None = None, n_chips: int = 32, target_ci_halfwidth: float | None = None,
                 max_chips: int | None = None) -> MCResult:
        """:func:`evaluate` on this evaluator's data (the arguments and result are those of :func:`evaluate`)."""
        where = self._where("MonteCarlo.evaluate")
        check_spec_type(spec, "spec", where)
        key = check_key(spec, key, where)
        n_chips = _check_count("n_chips", n_chips)
        _check_etas(spec, "spec")
        if target_ci_halfwidth is not None:
            try:
                target = _checks.number(target_ci_halfwidth, "target_ci_halfwidth", minimum=None)
            except ValueError:
                target = math.nan
            if not (math.isfinite(target) and target > 0):
                raise ValueError(f"target_ci_halfwidth={target_ci_halfwidth!r} must be a positive number (a "
                                 f"fraction of accuracy: 0.002 means +/-0.2 points), or None for a fixed number of "
                                 f"chips.")
            if n_chips < 2:
                raise ValueError(f"n_chips={n_chips} is the round size of an adaptive evaluation and must be >= 2 "
                                 f"(a confidence interval needs two chips); >= 16 is recommended.")
            max_chips = 64 * n_chips if max_chips is None else _check_count("max_chips", max_chips)
            if max_chips < n_chips:
                raise ValueError(f"max_chips={max_chips} is below the first round of n_chips={n_chips}: raise "
                                 f"max_chips or lower n_chips.")
            if max_chips > 2 ** 32:
                raise ValueError(f"max_chips={max_chips} passes the 2**32 chip indices of fold_in (uint32).")
        elif max_chips is not None:
            raise ValueError("max_chips is the cap of an adaptive evaluation: give target_ci_halfwidth too.")
        if spec is None:
            return self.clean(variables)
        check_inputs(self.model, variables, [spec], where=where)
        self._check_memory(where, variables, n_chips=n_chips)
        if target_ci_halfwidth is None:
            per_chip = self._chips(variables, spec, key, 0, n_chips)
            return MCResult.from_per_chip(per_chip, self.n_images, described(spec, self.model))
        values: list[np.ndarray] = []
        drawn, rounds = 0, 0
        while True:
            # Every round has n_chips chips (one compiled program); the last is cut to the cap.
            values.append(self._chips(variables, spec, key, drawn, n_chips)[:max_chips - drawn])
            drawn += len(values[-1])
            rounds += 1
            halfwidth = ci_halfwidth(np.concatenate(values))
            if halfwidth <= target or drawn >= max_chips:
                break
        stopping = {"rule": "t95_halfwidth", "target_ci_halfwidth": target, "max_chips": max_chips,
                    "round_chips": n_chips, "rounds": rounds, "ci_halfwidth": halfwidth,
                    "met_target": halfwidth <= target}
        result = MCResult.from_per_chip(np.concatenate(values), self.n_images, described(spec, self.model))
        return dataclasses.replace(result, stopping=stopping)

    def evaluate_many(self, variables: Variables, specs: Sequence[noise_lib.NoiseSpec], *, key: jax.Array | int,
                      n_chips: int = 32, setting_batch_size: int = 1) -> list[MCResult]:
        """:func:`evaluate_many` on this evaluator's data."""
        where = self._where("MonteCarlo.evaluate_many")
        if isinstance(specs, (noise_lib.NoiseSpec, Mapping, str)):
            raise ValueError(f"{where}: specs must be a list of NoiseSpecs, got one {type(specs).__name__}: pass "
                             f"[spec] (or use evaluate for one spec).")
        specs = list(specs)
        if not specs:
            raise ValueError(f"{where} needs at least one NoiseSpec.")
        for i, sp in enumerate(specs):
            if not isinstance(sp, noise_lib.NoiseSpec):
                raise ValueError(f"specs[{i}] is a {type(sp).__name__}, not a NoiseSpec.")
        key = check_key(specs[0], key, where, "specs")
        structure = jax.tree.structure(specs[0])
        for i, sp in enumerate(specs):
            if jax.tree.structure(sp) != structure:
                raise ValueError(f"specs[{i}] differs in structure from specs[0] (kinds, weight_paths, sampler or "
                                 f"the keys of act_ref/weight_mask/act_mask): {jax.tree.structure(sp)} vs "
                                 f"{structure}. Give every spec the same kinds, sampler and mask/reference keys "
                                 f"(missing keys as 1.0).")
            _check_etas(sp, f"specs[{i}]")
        n_chips = _check_count("n_chips", n_chips)
        setting_batch_size = _check_count("setting_batch_size", setting_batch_size)
        check_inputs(self.model, variables, specs, where=where, spec_name="specs")
        self._check_memory(where, variables, n_chips=n_chips, n_settings=len(specs),
                           setting_batch_size=setting_batch_size)
        acc = self._chips(variables, _stacked(specs), key, 0, n_chips,
                          setting_batch_size=min(setting_batch_size, len(specs)))
        return [MCResult.from_per_chip(acc[i], self.n_images, described(sp, self.model)) for i, sp in enumerate(specs)]

    def sweep(self, variables: Variables, spec: noise_lib.NoiseSpec, *, weight_etas: Sequence[float] | None = None,
              act_etas: Sequence[float] | None = None, key: jax.Array | int, n_chips: int = 32,
              grid: str = "product") -> list[MCResult]:
        """:func:`sweep` on this evaluator's data."""
        where = self._where("MonteCarlo.sweep")
        if spec is None:
            raise ValueError(f"{where} needs a NoiseSpec (the kinds of the swept noise).")
        check_spec_type(spec, "spec", where)
        w = check_scales("weight_etas", weight_etas)
        a = check_scales("act_etas", act_etas)
        if w is None and a is None:
            raise ValueError(f"{where} needs weight_etas and/or act_etas.")
        if w is not None and spec.weight_kind is None:
            raise ValueError("weight_etas given but spec.weight_kind is None: set a weight noise kind.")
        if a is not None and spec.act_kind is None:
            raise ValueError("act_etas given but spec.act_kind is None: set an activation noise kind, e.g. "
                             "NoiseSpec(act_kind='multiplicative').")
        if grid not in ("product", "zip"):
            raise ValueError(f"grid={grid!r}; choose 'product' or 'zip'.")
        if w is not None and a is not None:
            if grid == "zip" and len(w) != len(a):
                raise ValueError(f"grid='zip' needs equally long lists, got {len(w)} weight and {len(a)} act "
                                 f"scales.")
            pairs = list(zip(w, a)) if grid == "zip" else list(itertools.product(w, a))
        elif w is not None:
            pairs = [(e, None) for e in w]
        else:
            pairs = [(None, e) for e in a]
        key = check_key(spec, key, where)  # the same chips at every scale (common random numbers)
        n_chips = _check_count("n_chips", n_chips)
        _check_etas(spec, "spec")
        check_inputs(self.model, variables, [spec], where=where)
        self._check_memory(where, variables, n_chips=n_chips)
        exacts = []
        for we, ae in pairs:
            exact = spec  # Python floats: exact numbers in the description
            if we is not None:
                exact = exact.replace(weight_eta=we)
            if ae is not None:
                exact = exact.replace(act_eta=ae)
            exacts.append(exact)
        swept = [{**({} if we is None else {"weight_eta": we}), **({} if ae is None else {"act_eta": ae})}
                 for we, ae in pairs]
        if isinstance(self._data, _StreamData):   # every scale in one pass over the stream per chip group
            acc = self._chips(variables, _stacked(exacts), key, 0, n_chips, setting_batch_size=1)
            per_setting = [acc[i] for i in range(len(exacts))]
        else:
            per_setting = [self._chips(variables, exact, key, 0, n_chips) for exact in exacts]
        return [MCResult.from_per_chip(per_chip, self.n_images, {**described(exact, self.model), "swept": sw})
                for per_chip, exact, sw in zip(per_setting, exacts, swept)]

    def evaluate_analog(self, variables: Variables, device: analog_lib.AnalogSpec, *, times: Sequence[float],
                        key: jax.Array | int, n_chips: int = 32, noise: noise_lib.NoiseSpec | None = None,
                        recalibrate: str | None = None, calibration_images: Any = None,
                        calibration_batch_size: int | None = None) -> list[MCResult]:
        """:func:`evaluate_analog` on this evaluator's data."""
        if not isinstance(device, analog_lib.AnalogSpec):
            raise ValueError(f"device must be a jaxnoise.analog.AnalogSpec (e.g. jaxnoise.analog.preset("
                             f"'aihwkit_inference_default')), got {type(device).__name__}.")
        try:
            t = np.asarray(times, dtype=np.float64).ravel()
        except (TypeError, ValueError) as e:
            raise ValueError(f"times={times!r} must be a sequence of seconds: {e}") from e
        if t.size == 0:
            raise ValueError("times is empty: give at least one inference time in seconds (e.g. [1, 3600]).")
        analog_lib.check_times(t, "times")
        where = self._where("MonteCarlo.evaluate_analog")
        check_spec_type(noise, "noise", where)
        if key is None:
            raise ValueError(f"{where}: a device evaluation needs key=... (a PRNG key or an int seed, the chips' "
                             f"base key): every chip is a programming draw.")
        key = _checks.as_key(key)
        n_chips = _check_count("n_chips", n_chips)
        _check_etas(noise, "noise")
        check_inputs(self.model, variables, [noise], where=where, spec_name="noise")
        # analog/digital layer patterns must match layers
        analog_lib.check_selectors(variables["params"], device, self.model.analog_layers)
        self._check_memory(where, variables, n_chips=n_chips, n_times=int(t.size), device=device)
        calib_b, recal = _calibration_batches(self.model, variables, self._data, self.mesh, recalibrate,
                                              calibration_images, calibration_batch_size, self.batch_size,
                                              self.preprocess)
        acc = self._chips(variables, noise, key, 0, n_chips, device=device, times=t, calib_b=calib_b)
        act = None if noise is None else noise.describe()["activation_noise"]
        results = []
        for k, tk in enumerate(t):
            desc = {"weight_noise": describe_device(device, tk), "activation_noise": act,
                    "device": device.replace(t_inference=float(tk)).describe(), "swept": {"t_inference_s": float(tk)}}
            if recal is not None:
                desc["recalibration"] = recal
            if noise is not None and noise.has_weight_noise:
                desc["weight_noise_spec"] = noise.describe()["weight_noise"]
            if getattr(self.model, "quant", None) is not None:
                desc["weight_noise"] = dict(desc["weight_noise"], quant=self.model.quant.describe())
            results.append(MCResult.from_per_chip(acc[:, k], self.n_images, desc))
        return results

    evaluate_device = evaluate_analog   # the name before issue 19 ("device" now means a JAX device)

    def variants(self, variables: Variables, spec: noise_lib.NoiseSpec, variant_fn: Callable, variant_data: Any, *,
                 key: jax.Array | int, n_chips: int, variant_batch_size: int | None = None) -> np.ndarray:
        """Per-chip accuracies of V variants of the model on common chips: float64 (V, n_chips).

        Variant ``k`` is ``variant_fn(variables, spec, variant_data[k]) -> (variables_k, spec_k)`` (traceable: a
        placement's gates, a noise mask); chip ``i`` has key ``fold_in(key, i)`` in every variant (paired
        comparisons), as in :meth:`evaluate`. Keep the same ``variant_fn`` object across calls: the compiled
        program is cached by it. ``variant_batch_size`` None vmaps every variant at once; an integer maps them in
        chunks of that size (1: one after another inside the program). In-memory data on one device.
        """
        where = self._where("MonteCarlo.variants")
        check_spec_type(spec, "spec", where)
        key = check_key(spec, key, where)
        if key is None:
            raise ValueError(f"{where} needs key=... (a PRNG key or an int seed, the chips' base key).")
        n_chips = _check_count("n_chips", n_chips)
        _check_etas(spec, "spec")
        if variant_batch_size is not None:
            variant_batch_size = _checks.positive_int(variant_batch_size, "variant_batch_size",
                                                      "or None to vmap every variant at once")
        if isinstance(self._data, _StreamData) or self.mesh is not None:
            raise ValueError(f"{where} runs on in-memory test data on one device: materialise the streamed split "
                             f"and drop mesh=.")
        check_inputs(self.model, variables, [spec], where=where)
        n_variants = int(jax.tree.leaves(variant_data)[0].shape[0]) if jax.tree.leaves(variant_data) else 1
        self._check_memory(where, variables, n_chips=n_chips, n_settings=n_variants,
                           setting_batch_size=n_variants if variant_batch_size is None else variant_batch_size)
        data = self._data
        correct = _variants_program(data.static, variables, data.images_b, data.labels_b, data.valid_b,
                                    _spec_as_arrays(spec), chip_keys(key, n_chips),
                                    jax.tree.map(jnp.asarray, variant_data), variant_fn=variant_fn,
                                    chip_batch_size=self.chip_batch_size, variant_batch_size=variant_batch_size)
        return np.asarray(correct, np.float64).T / data.n_images


def _check_etas(spec: noise_lib.NoiseSpec | None, name: str) -> None:
    if isinstance(spec, noise_lib.NoiseSpec):
        noise_lib.check_eta(spec.weight_eta, f"{name}.weight_eta")
        noise_lib.check_eta(spec.act_eta, f"{name}.act_eta")


def _stacked(specs: Sequence[noise_lib.NoiseSpec]) -> noise_lib.NoiseSpec:
    """Specs of one structure as one spec whose leaves have a leading settings axis (float32)."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x, np.float32) for x in xs]), *specs)


# ----------------------------------------------------------------------------------------------------------------
# One-call entry points (adapters over MonteCarlo)


def evaluate(model: Model, variables: Variables, images: Any, labels: Any,
             spec: noise_lib.NoiseSpec | None = None, *, key: jax.Array | int | None = None, n_chips: int = 32,
             batch_size: int = 500, chip_batch_size: int | None = None,
             preprocess: Callable[[jax.Array], jax.Array] | None = None, mesh: jax.sharding.Mesh | None = None,
             target_ci_halfwidth: float | None = None, max_chips: int | None = None) -> MCResult:
    """Accuracy of ``n_chips`` simulated chips, each over the whole of ``images``.

    Chip ``i`` has key ``fold_in(key, i)``; its weights are drawn once and used for every image; activation noise
    is drawn afresh for every data batch (see the module docstring). The whole evaluation is one jitted program:
    data batches are scanned, chips mapped in chunks of ``chip_batch_size`` (vmapped within a chunk).

    **Adaptive Monte Carlo.** With ``target_ci_halfwidth``, chips are drawn in rounds of ``n_chips`` (chips
    ``0..n-1``, then ``n..2n-1``, ...; every round reuses the same compiled program) until the half-width of the
    Student-t 95% CI of the mean accuracy, ``t_{0.975, n-1} * std / sqrt(n)``, is <= ``target_ci_halfwidth`` or
    ``max_chips`` chips have been drawn (the last round is cut to the cap). The result keeps every chip's value and
    records the rule in ``MCResult.stopping``. Caveat: the stopping time depends on the sample standard deviation,
    so the reported interval is not an exact 95% interval: runs that stop early tend to be those whose first chips
    underestimated the spread, and coverage falls slightly below 95% when the first round is small or the per-chip
    distribution is skewed (tests/test_robustness.py measures it on a synthetic model with a known answer). Use
    first rounds of >= 16 chips. The interval, as always here, is over chips for this fixed set of test images:
    it does not include the sampling error of the test set.

    Args:
      model: the model.
      variables: ``{"params": ..., "batch_stats": ...}``.
      images: (N, ...) raw images (with ``preprocess``) or model inputs (float), host or device array.
      labels: (N,) integer labels in ``[0, model.num_classes)``.
      spec: the noise (a :class:`~jaxnoise.noise.NoiseSpec`); None means noise-free (one "chip"). Its selectors
        must name parts of this model (:func:`jaxnoise.noise.check_spec`).
      key: base key of the chips (typed/raw PRNG key or int seed); required with a spec (a spec without a key is
        an error, never a silent clean evaluation); ignored when ``spec`` is None.
      n_chips: number of chips (>= 1), or the chips per round (>= 2) with ``target_ci_halfwidth``; ignored when
        noise-free.
      batch_size: images per forward pass (the last batch is padded and masked). With activation noise, each
        batch is one activation-noise draw, so per-chip results depend on it.
      chip_batch_size: chips evaluated at once (vmapped); default ``noise.default_chip_batch_size()`` (1 on CPU,
        where vmapped chips lower to a slow grouped convolution; 8 on accelerators). Does not change results
        beyond float rounding.
      preprocess: jax-traceable raw -> float map applied per batch inside the program (``dataset.preprocess``).
      mesh: a ``("chips", "data")`` device mesh (``jaxnoise.distributed.mc_mesh(n_chips)``): chips are sharded
        over ``"chips"`` and data batches over ``"data"`` (``jax.shard_map``). Per-chip values equal the
        single-device run's (same keys, integer counts). None: the default device.
      target_ci_halfwidth: stop once the 95% CI half-width of the mean (accuracy as a fraction, e.g. 0.002 for
        +/-0.2 points) is at most this; None draws exactly ``n_chips`` chips.
      max_chips: the cap on chips with ``target_ci_halfwidth`` (default ``64 * n_chips``).

    Returns:
      An :class:`MCResult`: ``ci95`` is the Student-t 95% interval of the mean clipped to [0, 1]; with one chip (a
      noise-free evaluation, or ``n_chips=1``) ``ci95``, ``std`` and ``se`` are None.

    Raises:
      ValueError: before anything is traced: ``n_chips``/``batch_size``/``chip_batch_size`` not an integer >= 1,
        a spec that is not a ``NoiseSpec`` or has no key, a key that is neither a PRNG key nor an int, variables
        without a leaf of the model (e.g. ``variables["params"]`` alone for a model with BatchNorm), a spec
        selector that names nothing in the model, images and labels of different lengths, labels out of range,
        non-float images without ``preprocess``, an invalid noise scale, a target that is not positive,
        ``max_chips < n_chips`` or a mesh without ``("chips", "data")`` axes.
      InsufficientMemoryError: (a ValueError) the call's estimated memory (:func:`estimate_memory_bytes`)
        exceeds the free memory (:func:`available_memory_bytes`).

    Examples:
      >>> res = evaluate(model, variables, ds.test.images, ds.test.labels, NoiseSpec(weight_eta=0.1),
      ...                key=jax.random.key(0), n_chips=32, preprocess=ds.preprocess)
      >>> print(f"{100 * res.mean:.2f}% {format_ci95(res.ci95)}")
      >>> res = evaluate(..., n_chips=16, target_ci_halfwidth=0.002, max_chips=1024)   # adaptive
      >>> res.n_chips, res.stopping["met_target"]
    """
    mc = MonteCarlo(model, images, labels, batch_size=batch_size, chip_batch_size=chip_batch_size,
                    preprocess=preprocess, mesh=mesh, caller="evaluate")
    return mc.evaluate(variables, spec, key=key, n_chips=n_chips, target_ci_halfwidth=target_ci_halfwidth,
                       max_chips=max_chips)


def evaluate_many(model: Model, variables: Variables, images: Any, labels: Any,
                  specs: Sequence[noise_lib.NoiseSpec], *, key: jax.Array | int, n_chips: int = 32,
                  batch_size: int = 500, chip_batch_size: int | None = None, setting_batch_size: int = 1,
                  preprocess: Callable[[jax.Array], jax.Array] | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> list[MCResult]:
    """Monte Carlo accuracy under each of several noise specs, as one call of one compiled program.

    The specs must share their static structure (kinds, weight paths, and the keys of ``act_ref``/masks); their
    leaves (scales, references, masks) are stacked and the program maps over them (``jax.lax.map`` with
    ``batch_size=setting_batch_size``: 1 runs the settings one after another, larger vmaps that many). This is
    how a per-layer sensitivity map runs every (layer mask, scale) pair at once (:mod:`jaxnoise.sensitivity`).
    **Common random numbers**: every spec uses the same chips ``fold_in(key, i)``, as in :func:`sweep`.

    Args:
      model, variables, images, labels, key, n_chips, batch_size, chip_batch_size, preprocess, mesh: as in
        :func:`evaluate` (``mesh`` shards the chips of every setting).
      specs: the settings (at least one).
      setting_batch_size: settings evaluated at once (vmapped), >= 1.

    Returns:
      One :class:`MCResult` per spec, in order.

    Raises:
      ValueError: no specs, specs of different structure (naming the difference), no key, or the errors of
        :func:`evaluate` (InsufficientMemoryError included).

    Examples:
      >>> specs = [NoiseSpec(weight_eta=0.1, weight_mask={p: float(p == q) for p in paths}) for q in paths]
      >>> results = evaluate_many(model, variables, x, y, specs, key=0, n_chips=8)
    """
    mc = MonteCarlo(model, images, labels, batch_size=batch_size, chip_batch_size=chip_batch_size,
                    preprocess=preprocess, mesh=mesh, caller="evaluate_many")
    return mc.evaluate_many(variables, specs, key=key, n_chips=n_chips, setting_batch_size=setting_batch_size)


def check_scales(name: str, etas: Sequence[float] | None) -> list[float] | None:
    """``etas`` as a list of Python floats (None stays None), each a valid noise scale; a ValueError naming
    ``name[i]`` and the fix otherwise (not a list, empty, not a number, negative, NaN or infinite)."""
    if etas is None:
        return None
    if isinstance(etas, (np.ndarray, jax.Array)):
        items = np.asarray(etas).ravel().tolist()
    elif isinstance(etas, (str, bytes, Mapping)) or not isinstance(etas, Iterable):
        raise ValueError(f"{name}={etas!r} must be a list of numbers, e.g. {name}=[0.0, 0.05, 0.1].")
    else:
        items = list(etas)
    if not items:
        raise ValueError(f"{name} is empty: give at least one scale.")
    values = []
    for i, eta in enumerate(items):
        if isinstance(eta, (np.ndarray, jax.Array)) and np.ndim(eta) == 0:
            eta = np.asarray(eta).item()
        if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name}[{i}]={eta!r} is a {type(eta).__name__}, not a number: {name} is a list of "
                             f"floats, e.g. [0.0, 0.05, 0.1].")
        noise_lib.check_eta(float(eta), f"{name}[{i}]")
        values.append(float(eta))
    return values


def sweep(model: Model, variables: Variables, images: Any, labels: Any, spec: noise_lib.NoiseSpec, *,
          weight_etas: Sequence[float] | None = None, act_etas: Sequence[float] | None = None,
          key: jax.Array | int, n_chips: int = 32, grid: str = "product", batch_size: int = 500,
          chip_batch_size: int | None = None, preprocess: Callable[[jax.Array], jax.Array] | None = None,
          mesh: jax.sharding.Mesh | None = None) -> list[MCResult]:
    """Monte Carlo accuracy over a grid of noise scales, with one compiled program for the whole grid.

    Every setting is ``spec`` with ``weight_eta`` and/or ``act_eta`` replaced (as float32 arrays, so the jitted
    program is reused). **Common random numbers:** every setting uses the same chip keys ``fold_in(key, i)``, so
    chip ``i`` sees the same standard-normal draws scaled by each ``eta``; differences between settings have less
    variance than with independent chips (and settings are not independent samples).

    Args:
      model: the model.
      variables: the model variables.
      images: (N, ...) images (see :func:`evaluate`).
      labels: (N,) integer labels.
      spec: the base noise spec (kinds, references, masks, and the scale not swept).
      weight_etas: weight-noise scales; needs ``spec.weight_kind``.
      act_etas: activation-noise scales; needs ``spec.act_kind``.
      key: base key of the chips (or int seed).
      n_chips: chips per setting.
      grid: when both scale lists are given: ``"product"`` (every pair, weight scale outer, activation scale
        inner) or ``"zip"`` (pairs in order; the lists must have equal length).
      batch_size: images per forward pass.
      chip_batch_size: chips evaluated at once (default ``noise.default_chip_batch_size()``).
      preprocess: raw -> float input map (``dataset.preprocess``).
      mesh: shard chips (and data) over this device mesh, as in :func:`evaluate`.

    Returns:
      One :class:`MCResult` per setting, in grid order; each entry names what the sweep varied, ``"swept"``:
      ``{"weight_eta": ...}``, ``{"act_eta": ...}`` or both.

    Raises:
      ValueError: no scales, a scale that is not a number or is negative/NaN/infinite (checked before anything
        runs), a swept noise whose kind is None, an unknown ``grid``, no key, or the input errors of
        :func:`evaluate` (InsufficientMemoryError included).

    Examples:
      >>> results = sweep(model, variables, x, y, NoiseSpec(), weight_etas=[0.0, 0.05, 0.1, 0.2],
      ...                 key=jax.random.key(0), n_chips=32)
      >>> [round(r.mean, 3) for r in results]
    """
    mc = MonteCarlo(model, images, labels, batch_size=batch_size, chip_batch_size=chip_batch_size,
                    preprocess=preprocess, mesh=mesh, caller="sweep")
    return mc.sweep(variables, spec, weight_etas=weight_etas, act_etas=act_etas, key=key, n_chips=n_chips, grid=grid)


def describe_device(device: analog_lib.AnalogSpec, t_inference: float) -> dict[str, Any]:
    """The ``weight_noise`` entry of a device evaluation in the shared format: kind ``device:<preset>``, ``eta`` =
    the inference time in seconds (that kind's unit, so ``check_results.py --compare`` pairs times; the entry's
    ``"swept": {"t_inference_s": t}`` names the axis explicitly), plus the compensation mode."""
    return {"kind": f"device:{device.name}", "eta": float(t_inference), "t_inference_s": float(t_inference),
            "drift_compensation": device.compensation}


def evaluate_analog(model: Model, variables: Variables, images: Any, labels: Any, device: analog_lib.AnalogSpec,
                    *, times: Sequence[float], key: jax.Array | int, n_chips: int = 32,
                    noise: noise_lib.NoiseSpec | None = None, batch_size: int = 500,
                    chip_batch_size: int | None = None,
                    preprocess: Callable[[jax.Array], jax.Array] | None = None,
                    mesh: jax.sharding.Mesh | None = None, recalibrate: str | None = None,
                    calibration_images: Any = None,
                    calibration_batch_size: int | None = None) -> list[MCResult]:
    """Monte Carlo accuracy of programmed chips read at several inference times, as one compiled program.

    Chip ``i`` (key ``fold_in(key, i)``) is programmed once (``jaxnoise.analog.program_chip`` with
    ``analog.chip_key(chip_key)``: programming noise and drift exponents), then read at every time ``t_k``: drift is
    deterministic given the chip, read noise is fresh per read (key ``fold_in(name_key(chip_key,
    "jaxnoise/device/read"), k)``) and I/O noise fresh per data batch. The same chips serve every time (common random
    numbers), so differences between times have less variance than independent chips would give. Times are array
    data: any number of sweeps with the same number of times reuses the compiled program (:func:`trace_count`).

    Args:
      model, variables, images, labels, batch_size, chip_batch_size, preprocess, mesh: as in :func:`evaluate`.
      device: the device spec (``jaxnoise.analog.preset(...)``); its ``t_inference`` is ignored.
      times: inference times in seconds after programming (>= 0).
      key: base key of the chips.
      n_chips: chips (each evaluated at every time).
      noise: an optional ``NoiseSpec`` composed with the device (weight noise before programming, activation
        noise after each analog MVM).
      recalibrate: None, or a post-processing after each read (:data:`RECALIBRATIONS`): ``"batch_norm"``
        re-estimates the model's BatchNorm statistics through that chip at that time on ``calibration_images``
        (:func:`recalibrated_batch_stats`; passes keyed ``fold_in(fold_in(name_key(chip_key,
        "jaxnoise/robustness/recalibrate"), k), b)`` for time ``k``, batch ``b``), then evaluates. aihwkit has no
        such feature. In-memory data on one device only (no mesh, no streamed split).
      calibration_images: raw (or preprocessed, as ``images``) TRAINING images for ``recalibrate`` (a few hundred:
        ``data.calibration_images(ds.train, n=256)``); never the evaluated split.
      calibration_batch_size: images per calibration pass (default: the largest number <= ``batch_size`` that
        divides their number); must divide their number.

    Returns:
      One :class:`MCResult` per time; its ``noise`` holds ``"swept": {"t_inference_s": t}`` (the axis the call
      varied, explicit), ``weight_noise`` = :func:`describe_device`, the
      ``activation_noise`` of ``noise`` and ``device`` = ``device.describe()`` (and ``recalibration``: the method
      and number of calibration images, when ``recalibrate`` is set).

    Raises:
      ValueError: the errors of :func:`evaluate`, no key, empty or negative times, and a ``device`` whose
        ``analog_layers``/``digital_layers`` pattern matches no layer of the model
        (:func:`jaxnoise.analog.check_selectors`).

    Examples:
      >>> res = evaluate_analog(model, variables, x, y, jaxnoise.analog.preset("aihwkit_inference_default"),
      ...                       times=[1, 3600, 86400], key=0, n_chips=32, preprocess=ds.preprocess)
    """
    mc = MonteCarlo(model, images, labels, batch_size=batch_size, chip_batch_size=chip_batch_size,
                    preprocess=preprocess, mesh=mesh, caller="evaluate_analog")
    return mc.evaluate_analog(variables, device, times=times, key=key, n_chips=n_chips, noise=noise,
                              recalibrate=recalibrate, calibration_images=calibration_images,
                              calibration_batch_size=calibration_batch_size)


# The name before issue 19 ("device" now means a JAX device), kept so old code runs; new code uses evaluate_analog.
evaluate_device = evaluate_analog


def _calibration_batches(model: Model, variables: Variables, data: Any, mesh: Any, recalibrate: str | None,
                         calibration_images: Any, calibration_batch_size: int | None, batch_size: int,
                         preprocess: Callable | None) -> tuple[jax.Array | None, dict[str, Any] | None]:
    """``(calib_b, description)`` of ``evaluate_analog``'s ``recalibrate`` (both None without it), checked."""
    if recalibrate is None:
        if calibration_images is not None or calibration_batch_size is not None:
            raise ValueError("calibration_images / calibration_batch_size count only with recalibrate='batch_norm'; "
                             "add it or drop them.")
        return None, None
    if recalibrate not in RECALIBRATIONS:
        raise ValueError(f"recalibrate={recalibrate!r}: choose one of {sorted(RECALIBRATIONS)} or None.")
    if mesh is not None or isinstance(data, _StreamData):
        raise ValueError("recalibrate works on in-memory test data on one device: drop mesh= (or materialise the "
                         "streamed split).")
    if not jax.tree.leaves(variables.get("batch_stats", {})):
        raise ValueError(f"recalibrate='batch_norm': {model.name} has no BatchNorm statistics to re-estimate.")
    if calibration_images is None:
        raise ValueError("recalibrate='batch_norm' needs calibration_images: a few hundred training images, e.g. "
                         "data.calibration_images(ds.train, n=256) (never the test split).")
    x = np.asarray(calibration_images)
    if x.ndim < 2 or x.shape[1:] != tuple(data.images_h.shape[2:]):
        raise ValueError(f"calibration_images have shape {x.shape}; the evaluated images are (n,) + "
                         f"{tuple(data.images_h.shape[2:])}: give training images of the same kind.")
    n = len(x)
    if calibration_batch_size is None:   # the largest batch <= batch_size that splits them evenly
        cb = max(d for d in range(1, max(1, min(batch_size, n)) + 1) if n % d == 0) if n else 1
    else:
        cb = _check_count("calibration_batch_size", calibration_batch_size)
    if n == 0 or n % cb:
        raise ValueError(f"{n} calibration images do not split into batches of {cb}: give a multiple of "
                         f"calibration_batch_size (BatchNorm statistics need equal batches).")
    if preprocess is None and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"calibration_images have dtype {x.dtype} and no preprocess was given: pass preprocess=.")
    return (jnp.asarray(x.reshape((n // cb, cb) + x.shape[1:])),
            {"method": recalibrate, "n_images": int(n), "batch_size": int(cb), "split": "train"})

