"""Monte Carlo evaluation of accuracy under analog noise: many simulated chips, one compiled program.

Semantics (fixed by :mod:`jaxnoise.noise`):

* **One chip = one weight-noise draw**, fixed for every input that chip sees. Chip ``i`` of an evaluation with
  base key ``K`` has ``chip_key = fold_in(K, i)``, so its draw does not depend on ``n_chips`` or on how chips are
  chunked: the first 3 chips of a 5-chip run are the 3 chips of a 3-chip run.
* Its weights, ``perturb_weights(weight_key(chip_key), params, spec)``, are computed **once per chip**.
* **Activation noise is fresh for every forward pass**: data batch ``b`` runs
  ``model.apply(noisy_variables, x, key=fold_in(chip_key, b), noise=spec.activation_only())``;
  ``activation_only`` statically switches weight noise off, so the chip's weights are not re-drawn.
  Consequently, with activation noise the per-chip accuracy depends on the data batch size (each batch is one
  draw); with weight noise only it does not.
* **Common random numbers**: a :func:`sweep` uses the same chip keys at every scale, so chip ``i`` at scale
  ``eta`` has noise ``eta * z_i`` with the same ``z_i`` for every ``eta``. Differences between scales (and between
  models evaluated with the same key and architecture) then have less variance than with independent draws; the
  per-scale confidence intervals are unaffected, but results at different scales are not independent samples.

Everything runs as one jitted program per (model, data shape, chip count): data batches are scanned with
``lax.scan`` and chips are chunked with ``jax.lax.map(..., batch_size=chip_batch_size)``, so memory stays bounded
by one data batch times one chip chunk. Scales, references and masks of the spec are array data, so a sweep over
scales compiles once (:func:`trace_count` counts the traces).

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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from jaxnoise import device as device_lib
from jaxnoise import noise as noise_lib
from jaxnoise.models.base import Model, Variables

__all__ = ["MCResult", "batch_data", "chip_keys", "evaluate", "evaluate_device", "make_chip_eval", "spec_as_arrays", "summarize", "sweep",
           "trace_count"]

_TRACE_COUNT = 0  # traces of the jitted evaluation programs (see trace_count)


def trace_count() -> int:
    """How many times the jitted evaluation programs of this module have been traced (compiled) so far.

    A call that reuses a compiled program leaves it unchanged, so tests can check that a sweep compiles once.
    """
    return _TRACE_COUNT


def _as_key(key: Any) -> jax.Array:
    """A PRNG key from a key or an int seed."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    return key


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
    if n_chips < 0 or start < 0:
        raise ValueError(f"n_chips={n_chips} and start={start} must be >= 0.")
    key = _as_key(key)
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
    * ``chip_key``: the chip's key (``fold_in(K, i)``), or None for exact computation,
    * ``device`` (optional): a programmed and read chip (``jaxnoise.device.ChipRead``); pass ``k`` then draws its
      I/O noise from ``fold_in(chip_key, b)`` too,

    draws the chip's weights once, scans the batches with fresh activation noise per batch
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
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")

    def chip_correct(variables: Variables, images_b, labels_b, valid_b, spec: noise_lib.NoiseSpec | None,
                     chip_key: jax.Array | None, device: device_lib.ChipRead | None = None) -> jax.Array:
        if images_b.shape[1] != batch_size:
            raise ValueError(f"images_b has batches of {images_b.shape[1]} images, make_chip_eval was built for "
                             f"batch_size={batch_size}: pre-batch the data as (n_batches, batch_size, ...).")
        noisy = chip_key is not None and spec is not None
        if noisy:
            # One weight draw per chip, shared by every batch.
            params = noise_lib.perturb_weights(noise_lib.weight_key(chip_key), variables["params"], spec)
            variables = {**variables, "params": params}
            act_spec = spec.activation_only() if spec.has_activation_noise else None
        else:
            act_spec = None
        per_pass = chip_key is not None and (act_spec is not None or device is not None)

        def body(total, xs):
            b, x, y, valid = xs
            if preprocess is not None:
                x = preprocess(x)
            key = jax.random.fold_in(chip_key, b) if per_pass else None
            logits, _ = model.apply(variables, x, key=key, noise=act_spec, device=device)
            hit = (jnp.argmax(logits, axis=-1) == y) & valid
            return total + jnp.sum(hit, dtype=jnp.int32), None

        batches = jnp.arange(images_b.shape[0], dtype=jnp.uint32)
        total, _ = jax.lax.scan(body, jnp.int32(0), (batches, images_b, labels_b, valid_b))
        return total

    return chip_correct


# ----------------------------------------------------------------------------------------------------------------
# Statistics and results


def summarize(per_chip: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Summary statistics of per-chip accuracies, as in the shared result format.

    Args:
      per_chip: one accuracy per chip (at least one).

    Returns:
      ``{"n_chips", "mean", "std", "se", "ci95", "p5"}``: ``std`` with ddof=1 (0 for one chip),
      ``se = std / sqrt(n)``, ``ci95`` the Student-t 95% interval of the mean ``mean -/+ t_{0.975, n-1} * se``
      (``[mean, mean]`` for one chip), ``p5`` the 5th percentile (linear interpolation). Plain Python floats.

    Examples:
      >>> summarize([0.70, 0.72, 0.68])["ci95"]
      [0.650..., 0.749...]
    """
    a = np.asarray(per_chip, dtype=np.float64).ravel()
    n = a.size
    if n == 0:
        raise ValueError("summarize needs at least one per-chip value.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"per-chip values must be finite, got {a.tolist()[:5]}...")
    mean = float(a.mean())
    if n == 1:
        std = se = 0.0
        ci = [mean, mean]
    else:
        std = float(a.std(ddof=1))
        se = std / math.sqrt(n)
        half = float(scipy.stats.t.ppf(0.975, n - 1)) * se
        ci = [mean - half, mean + half]
    return {"n_chips": int(n), "mean": mean, "std": std, "se": se, "ci95": ci,
            "p5": float(np.percentile(a, 5, method="linear"))}


@dataclasses.dataclass(frozen=True, eq=False)
class MCResult:
    """Accuracy of each simulated chip over a whole split, with summary statistics.

    Attributes:
      per_chip: float64 accuracy of each chip, in chip order (chip i has key ``fold_in(key, i)``).
      n_chips: number of chips (1 for a noise-free evaluation).
      n_images: images each chip was evaluated on.
      mean: mean of ``per_chip``.
      std: standard deviation of ``per_chip`` (ddof=1; 0 for one chip).
      se: standard error of the mean, ``std / sqrt(n_chips)``.
      ci95: Student-t 95% confidence interval of the mean (``(mean, mean)`` for one chip).
      p5: 5th percentile of ``per_chip`` (linear interpolation).
      noise: ``{"weight_noise": ..., "activation_noise": ...}`` from ``NoiseSpec.describe()``; both None when
        the evaluation was noise-free.
    """

    per_chip: np.ndarray
    n_chips: int
    n_images: int
    mean: float
    std: float
    se: float
    ci95: tuple[float, float]
    p5: float
    noise: dict[str, Any]

    @classmethod
    def from_per_chip(cls, per_chip: Sequence[float] | np.ndarray, n_images: int,
                      noise: dict[str, Any] | None = None) -> "MCResult":
        """Builds a result (with its statistics) from per-chip accuracies."""
        a = np.asarray(per_chip, dtype=np.float64).ravel()
        s = summarize(a)
        noise = dict(noise) if noise is not None else {"weight_noise": None, "activation_noise": None}
        return cls(per_chip=a, n_chips=s["n_chips"], n_images=int(n_images), mean=s["mean"], std=s["std"],
                   se=s["se"], ci95=tuple(s["ci95"]), p5=s["p5"], noise=noise)

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
        """One ``eval`` entry of the shared result format (``../shared/RESULTS.md``), JSON-ready."""
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
            "ci95": [float(self.ci95[0]), float(self.ci95[1])],
            "p5": self.p5,
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


@functools.partial(jax.jit, static_argnames=("static", "chip_batch_size"))
def _mc_program(static: _Static, variables, images_b, labels_b, valid_b, spec, keys, *, chip_batch_size: int):
    """Number correct of each chip: (n_chips,) int32."""
    global _TRACE_COUNT
    _TRACE_COUNT += 1

    def one_chip(chip_key):
        return static.chip_correct(variables, images_b, labels_b, valid_b, spec, chip_key)

    # batch_size=None is a plain scan over chips (no vmap at all), the fastest on CPU.
    return jax.lax.map(one_chip, keys, batch_size=None if chip_batch_size == 1 else chip_batch_size)


@functools.partial(jax.jit, static_argnames=("static",))
def _clean_program(static: _Static, variables, images_b, labels_b, valid_b):
    """Number correct of the exact model: int32 scalar."""
    global _TRACE_COUNT
    _TRACE_COUNT += 1
    return static.chip_correct(variables, images_b, labels_b, valid_b, None, None)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


@dataclasses.dataclass(frozen=True)
class _Batched:
    static: _Static
    images_b: jax.Array
    labels_b: jax.Array
    valid_b: jax.Array
    n_images: int


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    return int(value)


def _check_chips(n_chips: Any, chip_batch_size: Any, spec: noise_lib.NoiseSpec | None,
                 spec_name: str) -> tuple[int, int]:
    """Checked ``(n_chips, chip_batch_size)`` (the latter defaulted per backend), and the spec's scales."""
    n_chips = _check_count("n_chips", n_chips)
    chip_batch_size = _check_count("chip_batch_size", noise_lib.default_chip_batch_size()
                                   if chip_batch_size is None else chip_batch_size)
    if spec is not None:
        noise_lib.check_eta(spec.weight_eta, f"{spec_name}.weight_eta")
        noise_lib.check_eta(spec.act_eta, f"{spec_name}.act_eta")
    return n_chips, chip_batch_size


def _prepare(model: Model, images: Any, labels: Any, batch_size: int, preprocess: Callable | None) -> _Batched:
    """Validates the data and pads it into (n_batches, B, ...) device arrays with a validity mask."""
    batch_size = _check_count("batch_size", batch_size)
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
        images_b=jnp.asarray(images.reshape((n_batches, b) + images.shape[1:])),
        labels_b=jnp.asarray(labels.astype(np.int32).reshape(n_batches, b)),
        valid_b=jnp.asarray(valid.reshape(n_batches, b)),
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


def _run_mc(data: _Batched, variables: Variables, spec: noise_lib.NoiseSpec, keys: jax.Array,
            chip_batch_size: int) -> np.ndarray:
    correct = _mc_program(data.static, variables, data.images_b, data.labels_b, data.valid_b,
                          _spec_as_arrays(spec), keys, chip_batch_size=min(chip_batch_size, len(keys)))
    return np.asarray(correct, dtype=np.float64) / data.n_images


def _noise_off() -> dict[str, Any]:
    return {"weight_noise": None, "activation_noise": None}


def evaluate(model: Model, variables: Variables, images: Any, labels: Any,
             spec: noise_lib.NoiseSpec | None = None, *, key: jax.Array | int | None = None, n_chips: int = 32,
             batch_size: int = 500, chip_batch_size: int | None = None,
             preprocess: Callable[[jax.Array], jax.Array] | None = None) -> MCResult:
    """Accuracy of ``n_chips`` simulated chips, each over the whole of ``images``.

    Chip ``i`` has key ``fold_in(key, i)``; its weights are drawn once and used for every image; activation noise
    is drawn afresh for every data batch (see the module docstring). The whole evaluation is one jitted program:
    data batches are scanned, chips mapped in chunks of ``chip_batch_size`` (vmapped within a chunk).

    Args:
      model: the model.
      variables: ``{"params": ..., "batch_stats": ...}``.
      images: (N, ...) raw images (with ``preprocess``) or model inputs (float), host or device array.
      labels: (N,) integer labels in ``[0, model.num_classes)``.
      spec: the noise; None means noise-free (one "chip").
      key: base key of the chips (typed/raw PRNG key or int seed); None means noise-free (one "chip").
      n_chips: number of chips (>= 1); ignored when noise-free.
      batch_size: images per forward pass (the last batch is padded and masked). With activation noise, each
        batch is one activation-noise draw, so per-chip results depend on it.
      chip_batch_size: chips evaluated at once (vmapped); default ``noise.default_chip_batch_size()`` (1 on CPU,
        where vmapped chips lower to a slow grouped convolution; 8 on accelerators). Does not change results
        beyond float rounding.
      preprocess: jax-traceable raw -> float map applied per batch inside the program (``dataset.preprocess``).

    Returns:
      An :class:`MCResult`.

    Raises:
      ValueError: ``n_chips``/``batch_size``/``chip_batch_size`` < 1, images and labels of different lengths,
        labels out of range, non-float images without ``preprocess``, or an invalid noise scale.

    Examples:
      >>> res = evaluate(model, variables, ds.test.images, ds.test.labels, NoiseSpec(weight_eta=0.1),
      ...                key=jax.random.key(0), n_chips=32, preprocess=ds.preprocess)
      >>> print(f"{100 * res.mean:.2f}% [{100 * res.ci95[0]:.2f}, {100 * res.ci95[1]:.2f}]")
    """
    n_chips, chip_batch_size = _check_chips(n_chips, chip_batch_size, spec, "spec")
    data = _prepare(model, images, labels, batch_size, preprocess)
    if spec is None or key is None:
        correct = _clean_program(data.static, variables, data.images_b, data.labels_b, data.valid_b)
        return MCResult.from_per_chip([int(correct) / data.n_images], data.n_images, _noise_off())
    keys = chip_keys(_as_key(key), n_chips)
    per_chip = _run_mc(data, variables, spec, keys, chip_batch_size)
    return MCResult.from_per_chip(per_chip, data.n_images, spec.describe())


def _check_grid(name: str, etas: Sequence[float] | None) -> list[float] | None:
    if etas is None:
        return None
    try:
        values = np.asarray(etas, dtype=np.float64).ravel().tolist()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}={etas!r} must be a sequence of numbers: {e}") from e
    if not values:
        raise ValueError(f"{name} is empty: give at least one scale.")
    for i, eta in enumerate(values):
        noise_lib.check_eta(eta, f"{name}[{i}]")
    return [float(e) for e in values]


def sweep(model: Model, variables: Variables, images: Any, labels: Any, spec: noise_lib.NoiseSpec, *,
          weight_etas: Sequence[float] | None = None, act_etas: Sequence[float] | None = None,
          key: jax.Array | int, n_chips: int = 32, grid: str = "product", batch_size: int = 500,
          chip_batch_size: int | None = None,
          preprocess: Callable[[jax.Array], jax.Array] | None = None) -> list[MCResult]:
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

    Returns:
      One :class:`MCResult` per setting, in grid order.

    Raises:
      ValueError: no scales, a negative/NaN/infinite scale (checked before anything runs), a swept noise whose
        kind is None, an unknown ``grid``, or the input errors of :func:`evaluate`.

    Examples:
      >>> results = sweep(model, variables, x, y, NoiseSpec(), weight_etas=[0.0, 0.05, 0.1, 0.2],
      ...                 key=jax.random.key(0), n_chips=32)
      >>> [round(r.mean, 3) for r in results]
    """
    if spec is None:
        raise ValueError("sweep needs a NoiseSpec (the kinds of the swept noise).")
    w = _check_grid("weight_etas", weight_etas)
    a = _check_grid("act_etas", act_etas)
    if w is None and a is None:
        raise ValueError("sweep needs weight_etas and/or act_etas.")
    if w is not None and spec.weight_kind is None:
        raise ValueError("weight_etas given but spec.weight_kind is None: set a weight noise kind.")
    if a is not None and spec.act_kind is None:
        raise ValueError("act_etas given but spec.act_kind is None: set an activation noise kind, e.g. "
                         "NoiseSpec(act_kind='multiplicative').")
    if grid not in ("product", "zip"):
        raise ValueError(f"grid={grid!r}; choose 'product' or 'zip'.")
    if w is not None and a is not None:
        if grid == "zip" and len(w) != len(a):
            raise ValueError(f"grid='zip' needs equally long lists, got {len(w)} weight and {len(a)} act scales.")
        pairs = list(zip(w, a)) if grid == "zip" else list(itertools.product(w, a))
    elif w is not None:
        pairs = [(e, None) for e in w]
    else:
        pairs = [(None, e) for e in a]
    if key is None:
        raise ValueError("sweep needs a key (the chips' base key).")
    n_chips, chip_batch_size = _check_chips(n_chips, chip_batch_size, spec, "spec")
    data = _prepare(model, images, labels, batch_size, preprocess)
    keys = chip_keys(_as_key(key), n_chips)  # the same chips at every scale (common random numbers)
    results = []
    for we, ae in pairs:
        exact = spec  # Python floats: exact numbers in the description
        if we is not None:
            exact = exact.replace(weight_eta=we)
        if ae is not None:
            exact = exact.replace(act_eta=ae)
        per_chip = _run_mc(data, variables, exact, keys, chip_batch_size)
        results.append(MCResult.from_per_chip(per_chip, data.n_images, exact.describe()))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Device time sweeps


@functools.partial(jax.jit, static_argnames=("static", "chip_batch_size"))
def _device_program(static: _Static, variables, images_b, labels_b, valid_b, spec, device, keys, times, *,
                    chip_batch_size: int):
    """Number correct of each chip at each time: (n_chips, n_times) int32. One trace for any times / scales."""
    global _TRACE_COUNT
    _TRACE_COUNT += 1

    def one_chip(chip_key):
        params = variables["params"]
        if spec is not None and spec.has_weight_noise:
            params = noise_lib.perturb_weights(noise_lib.weight_key(chip_key), params, spec)
        chip_vars = {**variables, "params": params}
        act_spec = spec.activation_only() if spec is not None and spec.has_activation_noise else None
        chip = device_lib.program_chip(device_lib.chip_key(chip_key), params, device)

        def one_time(k_t):
            k, t = k_t
            read_key = jax.random.fold_in(noise_lib.name_key(chip_key, "jaxnoise/device/read"), k)
            layers = device_lib.read_chip(read_key, chip, t, device)
            pass_key = jax.random.fold_in(noise_lib.name_key(chip_key, "jaxnoise/device/time"), k)
            return static.chip_correct(chip_vars, images_b, labels_b, valid_b, act_spec, pass_key,
                                       device_lib.ChipRead(device, layers))

        return jax.lax.map(one_time, (jnp.arange(times.shape[0], dtype=jnp.uint32), times))

    return jax.lax.map(one_chip, keys, batch_size=None if chip_batch_size == 1 else chip_batch_size)


def describe_device(device: device_lib.DeviceSpec, t_inference: float) -> dict[str, Any]:
    """The ``weight_noise`` entry of a device evaluation in the shared format: kind ``device:<preset>``, ``eta`` =
    the inference time in seconds (the swept quantity, so ``check_results.py --compare`` pairs times), plus the
    compensation mode."""
    return {"kind": f"device:{device.name}", "eta": float(t_inference), "t_inference_s": float(t_inference),
            "drift_compensation": device.compensation}


def evaluate_device(model: Model, variables: Variables, images: Any, labels: Any, device: device_lib.DeviceSpec,
                    *, times: Sequence[float], key: jax.Array | int, n_chips: int = 32,
                    noise: noise_lib.NoiseSpec | None = None, batch_size: int = 500,
                    chip_batch_size: int | None = None,
                    preprocess: Callable[[jax.Array], jax.Array] | None = None) -> list[MCResult]:
    """Monte Carlo accuracy of programmed chips read at several inference times, as one compiled program.

    Chip ``i`` (key ``fold_in(key, i)``) is programmed once (``jaxnoise.device.program_chip`` with
    ``device.chip_key(chip_key)``: programming noise and drift exponents), then read at every time ``t_k``: drift is
    deterministic given the chip, read noise is fresh per read (key ``fold_in(name_key(chip_key,
    "jaxnoise/device/read"), k)``) and I/O noise fresh per data batch. The same chips serve every time (common random
    numbers), so differences between times have less variance than independent chips would give. Times are array
    data: any number of sweeps with the same number of times reuses the compiled program (:func:`trace_count`).

    Args:
      model, variables, images, labels, batch_size, chip_batch_size, preprocess: as in :func:`evaluate`.
      device: the device spec (``jaxnoise.device.preset(...)``); its ``t_inference`` is ignored.
      times: inference times in seconds after programming (>= 0).
      key: base key of the chips.
      n_chips: chips (each evaluated at every time).
      noise: an optional ``NoiseSpec`` composed with the device (weight noise before programming, activation
        noise after each analog MVM).

    Returns:
      One :class:`MCResult` per time; its ``noise`` holds ``weight_noise`` = :func:`describe_device`, the
      ``activation_noise`` of ``noise`` and ``device`` = ``device.describe()``.

    Examples:
      >>> res = evaluate_device(model, variables, x, y, jaxnoise.device.preset("aihwkit_inference_default"),
      ...                       times=[1, 3600, 86400], key=0, n_chips=32, preprocess=ds.preprocess)
    """
    if not isinstance(device, device_lib.DeviceSpec):
        raise ValueError(f"device must be a jaxnoise.device.DeviceSpec (e.g. jaxnoise.device.preset("
                         f"'aihwkit_inference_default')), got {type(device).__name__}.")
    try:
        t = np.asarray(times, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise ValueError(f"times={times!r} must be a sequence of seconds: {e}") from e
    if t.size == 0:
        raise ValueError("times is empty: give at least one inference time in seconds (e.g. [1, 3600]).")
    device_lib.check_times(t, "times")
    if key is None:
        raise ValueError("evaluate_device needs a key (the chips' base key).")
    n_chips, chip_batch_size = _check_chips(n_chips, chip_batch_size, noise, "noise")
    data = _prepare(model, images, labels, batch_size, preprocess)
    keys = chip_keys(_as_key(key), n_chips)
    dev = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), device)
    spec = None if noise is None else _spec_as_arrays(noise)
    correct = _device_program(data.static, variables, data.images_b, data.labels_b, data.valid_b, spec, dev, keys,
                              jnp.asarray(t, jnp.float32), chip_batch_size=min(chip_batch_size, n_chips))
    acc = np.asarray(correct, np.float64) / data.n_images
    act = None if noise is None else noise.describe()["activation_noise"]
    results = []
    for k, tk in enumerate(t):
        desc = {"weight_noise": describe_device(device, tk), "activation_noise": act,
                "device": device.replace(t_inference=float(tk)).describe()}
        if noise is not None and noise.has_weight_noise:
            desc["weight_noise_spec"] = noise.describe()["weight_noise"]
        results.append(MCResult.from_per_chip(acc[:, k], data.n_images, desc))
    return results
