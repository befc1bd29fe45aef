"""Datasets as in-memory numpy arrays, with jax-traceable preprocessing and augmentation.

Every dataset is held whole in host memory as raw pixels (``uint8`` as stored, or ``float32`` for
``synthetic``) plus ``int32`` labels. Conversion to model input (:meth:`Dataset.preprocess`) and
training augmentation (:meth:`Dataset.augment`) are pure JAX functions applied per batch on device,
so they can live inside a jitted train step.

Datasets:

* ``digits``: scikit-learn's embedded 8x8 handwritten digits (1797 images, values 0..16, 10 classes).
  Fixed stratified split with ``test_size=0.25`` and ``random_state=0``: 1347 train / 450 test.
  ``preprocess`` maps pixels to [0, 1] (``x / 16``). No augmentation.
* ``cifar10`` / ``cifar100``: read from a prepared TensorFlow Datasets directory (array_record format)
  through ``tfds.data_source``, which needs pillow but not TensorFlow. ``preprocess`` scales to [0, 1]
  and normalises per channel with the ImageNet mean/std that the pretrained CIFAR ResNets in
  ``../shared/pretrained`` expect. ``augment`` is :func:`random_crop_flip` (pad 4, crop, flip).
* ``imagenet2012``: streamed, never held in memory: :func:`load_dataset` returns a
  :class:`jaxnoise.stream.StreamingDataset` (records read on demand, decoded and augmented by grain workers at
  ``resolution``). Any other TFDS image classification dataset streams the same way by name with
  ``streaming=True`` (e.g. ``load_dataset("imagenette", streaming=True)``).
* ``synthetic``: deterministic, learnable toy data for tests (class prototypes plus Gaussian noise).

Decoded TFDS splits are cached twice: in this process (module-level, keyed by dataset, data dir and
split) and on disk as an uncompressed ``.npz`` under ``$JAXNOISE_CACHE`` (default
``~/.cache/jaxnoise``), keyed by dataset version, split and the size and mtime of the record files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetCorruptError",
    "check_supported",
    "DatasetNotFoundError",
    "STREAMED_DATASETS",
    "Split",
    "batch_indices",
    "cache_dir",
    "calibration_images",
    "clear_cache",
    "epoch_batches",
    "find_builder",
    "load_dataset",
    "random_crop_flip",
    "readonly",
    "resolve_data_dir",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagenet2012", "synthetic")

# Per-channel statistics expected by the pretrained CIFAR ResNets (see ../shared/pretrained/README.md).
CIFAR_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Fallback TFDS data dir, relative to the current working directory (the repository root).
SHARED_TFDS_DIR = os.path.join("..", "shared", "tfds")

_AUGMENTATIONS = ("none", "crop_flip")
# Datasets streamed by default (jaxnoise.stream) and the options of a streamed dataset.
STREAMED_DATASETS = ("imagenet2012",)   # streamed by default (never held in memory)
_STREAM_OPTIONS = ("resolution", "workers", "eval_split", "crop_fraction", "progress")
# TFDS datasets that load_dataset reads whole into memory: name -> label feature key.
_TFDS_LABEL_KEYS = {"cifar10": "label", "cifar100": "label"}
# Bump when the layout of the on-disk .npz cache changes.
_DISK_CACHE_FORMAT = 1
# Records decoded per data-source call; bounds the transient list of decoded dicts.
_READ_CHUNK = 2048

# In-process cache of decoded TFDS splits: (name, data_dir, split) -> Split.
_SPLIT_CACHE: dict[tuple[str, str, str], Split] = {}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not prepared in any of the TFDS data dirs that were searched."""


class DatasetCorruptError(ValueError):
    """A prepared dataset's files cannot be read (truncated or damaged records, undecodable images)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset, held in host memory.

    Attributes:
        images: Raw pixels as stored, shape (N, H, W, C); ``uint8`` for real datasets, ``float32``
            only for ``synthetic``. Arrays returned by :func:`load_dataset` for TFDS datasets are
            read-only because they are shared through the in-process cache.
        labels: Class indices, ``int32``, shape (N,).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C), got shape {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset with its input pipeline.

    Attributes:
        name: Dataset name, one of :data:`DATASETS` for datasets built by :func:`load_dataset`.
        train: Training split.
        test: Test split.
        num_classes: Number of classes; labels are in ``[0, num_classes)``.
        image_shape: (H, W, C) of one image.
        pixel_scale: Raw pixel value that :meth:`preprocess` maps to 1.0.
        mean: Per-channel mean subtracted after scaling, or None for no normalisation.
        std: Per-channel standard deviation divided by after subtracting ``mean``.
        augmentation: ``"none"`` or ``"crop_flip"`` (:func:`random_crop_flip` with ``pad=4``).
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    image_shape: tuple[int, int, int]
    pixel_scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augmentation: str = "none"

    def __post_init__(self):
        if self.augmentation not in _AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {_AUGMENTATIONS}, got {self.augmentation!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together")

    def preprocess(self, images: jax.Array) -> jax.Array:
        """Maps raw pixels to float32 model input.

        Pure and jax-traceable: usable inside ``jit`` and ``vmap``, on a batch (N, H, W, C) or a
        single image (H, W, C).

        Args:
            images: Raw pixels as stored in :attr:`train` / :attr:`test`.

        Returns:
            float32 array of the same shape: ``images / pixel_scale``, then ``(x - mean) / std`` per
            channel when ``mean`` is set.
        """
        x = jnp.asarray(images).astype(jnp.float32)
        if self.pixel_scale != 1.0:
            x = x * jnp.float32(1.0 / self.pixel_scale)
        if self.mean is not None:
            mean = jnp.asarray(self.mean, jnp.float32)
            inv_std = 1.0 / jnp.asarray(self.std, jnp.float32)
            x = (x - mean) * inv_std
        return x

    def augment(self, key: jax.Array, images: jax.Array) -> jax.Array:
        """Applies the dataset's training augmentation to raw pixels.

        Pure, keyed and jax-traceable. Apply it before :meth:`preprocess` (it pads with raw zeros).

        Args:
            key: PRNG key.
            images: Raw pixels, (N, H, W, C) or a single image (H, W, C).

        Returns:
            Augmented images with the same shape and dtype; ``images`` unchanged when the dataset has
            no augmentation.
        """
        if self.augmentation == "none":
            return jnp.asarray(images)
        images = jnp.asarray(images)
        if images.ndim == 3:
            return random_crop_flip(key, images[None])[0]
        return random_crop_flip(key, images)


# --------------------------------------------------------------------------------------------------
# Batching


def batch_indices(key: jax.Array, n: int, batch_size: int, *, drop_remainder: bool = True) -> np.ndarray:
    """Splits a random permutation of ``range(n)`` into batches.

    Args:
        key: PRNG key that determines the permutation.
        n: Number of examples.
        batch_size: Examples per batch.
        drop_remainder: If True, the last ``n % batch_size`` examples of the permutation are dropped.
            If False, the last batch is completed by cycling from the start of the permutation, so
            every example appears at least once and a few appear twice.

    Returns:
        int32 array of shape (n_batches, batch_size), with ``n_batches = n // batch_size`` or
        ``ceil(n / batch_size)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    perm = np.asarray(jax.random.permutation(key, n), dtype=np.int32)
    if drop_remainder:
        n_batches = n // batch_size
        return perm[: n_batches * batch_size].reshape(n_batches, batch_size)
    n_batches = -(-n // batch_size)
    if n == 0:
        return np.zeros((0, batch_size), np.int32)
    return np.resize(perm, n_batches * batch_size).reshape(n_batches, batch_size)


def epoch_batches(
    key: jax.Array, split: Split, batch_size: int, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields the shuffled batches of one epoch, as numpy arrays.

    The order depends only on ``jax.random.fold_in(key, epoch)``, so an epoch can be replayed exactly
    (e.g. after resuming from a checkpoint). The last incomplete batch is dropped.

    Args:
        key: PRNG key shared by all epochs of a run.
        split: Split to iterate over.
        batch_size: Examples per batch.
        epoch: Epoch number.

    Yields:
        ``(images, labels)`` with shapes (batch_size, H, W, C) and (batch_size,), raw as stored; from a streamed
        split (:class:`jaxnoise.stream.StreamSplit`), in the same order, augmented by its workers.
    """
    if hasattr(split, "train_batches"):
        yield from split.train_batches(key, epoch, batch_size)
        return
    idx = batch_indices(jax.random.fold_in(key, epoch), len(split), batch_size)
    for batch in idx:
        yield split.images[batch], split.labels[batch]


def holdout(split: Split, n: int) -> tuple[Split, Split]:
    """``(first len - n examples, last n examples)`` of a split: a training part and a held-out selection set.

    Used for model selection (e.g. a placement search) without touching the test split. A streamed split
    (:class:`jaxnoise.stream.StreamSplit`) gives two streamed ranges of its records.
    """
    if not isinstance(n, (int, np.integer)) or not 1 <= n < len(split):
        raise ValueError(f"holdout size n={n!r} must be an integer in [1, {len(split) - 1}] for a split of "
                         f"{len(split)} examples.")
    cut = len(split) - int(n)
    if hasattr(split, "select"):
        return split.select(0, cut), split.select(cut, len(split))
    return Split(split.images[:cut], split.labels[:cut]), Split(split.images[cut:], split.labels[cut:])


def calibration_images(split: Split, n: int = 1024, seed: int = 0) -> np.ndarray:
    """Returns a fixed, seeded subset of a split's raw images (pass the TRAIN split).

    Used to calibrate activation noise, so it must never draw on the test split.

    Args:
        split: The training split.
        n: Number of images; clipped to ``len(split)``.
        seed: Seed of the subset (numpy ``default_rng``), independent of any JAX key.

    Returns:
        Raw images (not preprocessed), shape (min(n, N), H, W, C), in increasing index order. From a streamed
        split: the same indices, decoded with its evaluation preprocessing (resize, centre crop).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = len(split)
    idx = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    if hasattr(split, "materialize"):
        return split.materialize(idx).images
    return split.images[idx]


# --------------------------------------------------------------------------------------------------
# Augmentation


@functools.partial(jax.jit, static_argnames="pad")
def random_crop_flip(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Standard CIFAR augmentation: zero-pad, random crop back to size, random horizontal flip.

    Each image gets its own crop offset (uniform over the ``(2 * pad + 1) ** 2`` positions) and its own
    fair coin for the flip, from ``jax.random.split(key, N)``.

    Args:
        key: PRNG key.
        images: Batch (N, H, W, C), any dtype; raw pixels, so the padding is raw 0 (black).
        pad: Zero padding on each spatial side before cropping.

    Returns:
        Array of the same shape and dtype as ``images``.
    """
    images = jnp.asarray(images)
    height, width = images.shape[1], images.shape[2]

    def one(k, img):
        k_crop, k_flip = jax.random.split(k)
        padded = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)))
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
        crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, img.shape[2]))
        return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1, :], crop)

    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


# --------------------------------------------------------------------------------------------------
# Loading


def resolve_data_dir(data_dir: str | None) -> str | None:
    """Chooses the TFDS data dir.

    Precedence: the ``data_dir`` argument (``--data-dir`` flag), then ``$TFDS_DATA_DIR``, then
    ``../shared/tfds`` relative to the current working directory if it exists, else None.

    Args:
        data_dir: Explicit data dir, or None.

    Returns:
        Absolute path of the chosen directory (not checked for existence when given explicitly or by
        the environment), or None when nothing applies.
    """
    for candidate, _ in _candidate_dirs(data_dir, for_search=False):
        return candidate
    return None


def _candidate_dirs(data_dir: str | None, *, for_search: bool) -> list[tuple[str, str]]:
    """Returns TFDS data dirs in order of precedence, as (absolute path, origin) pairs.

    With ``for_search`` (used by the loader), ``../shared/tfds`` is listed even when absent, so that
    error messages name it, and the TFDS default ``~/tensorflow_datasets`` is appended.
    """
    if data_dir:
        return [(_abspath(data_dir), "data_dir argument")]
    out = []
    env = os.environ.get("TFDS_DATA_DIR")
    if env:
        out.append((_abspath(env), "$TFDS_DATA_DIR"))
    if for_search or os.path.isdir(SHARED_TFDS_DIR):
        out.append((_abspath(SHARED_TFDS_DIR), f"{SHARED_TFDS_DIR} relative to the working directory"))
    if for_search:
        default = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
        out.append((_abspath(default), "TFDS default data dir"))
    unique, seen = [], set()
    for path, origin in out:
        if path not in seen:
            seen.add(path)
            unique.append((path, origin))
    return unique


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def load_dataset(name: str, *, data_dir: str | None = None, streaming: bool | None = None, **kwargs: Any) -> Dataset:
    """Loads a dataset whole into host memory, or opens it as a stream (``imagenet2012``, ``streaming=True``).

    Args:
        name: One of :data:`DATASETS`.
        data_dir: TFDS data dir for ``cifar10`` / ``cifar100`` (``--data-dir``). If None, searches
            ``$TFDS_DATA_DIR``, ``../shared/tfds`` (relative to the working directory) and
            ``~/tensorflow_datasets``, in that order, and uses the first that holds the dataset. If
            given, only that directory is searched. Ignored by ``digits`` and ``synthetic``.
        streaming: True opens any prepared TFDS image classification dataset (any TFDS name, e.g. ``imagenette``,
            or ``cifar10``) as a :class:`jaxnoise.stream.StreamingDataset`; None streams ``imagenet2012`` only;
            False refuses ``imagenet2012`` (it does not fit in memory).
        **kwargs: Dataset options.
            Streamed datasets: ``resolution: int = 224``, ``workers: int | None``, ``eval_split``,
            ``crop_fraction: float = 0.875``, ``progress: bool = True`` (:func:`jaxnoise.stream.load_stream`).
            ``cifar10`` / ``cifar100``: ``disk_cache: bool = True``, whether to read and write the
            decoded-array cache under ``$JAXNOISE_CACHE`` (default ``~/.cache/jaxnoise``).
            ``synthetic``: ``n_train: int = 1024``, ``n_test: int = 256``,
            ``image_shape = (8, 8, 1)``, ``num_classes: int = 10``, ``seed: int = 0``,
            ``noise: float = 0.5`` (see :func:`_load_synthetic`).

    Returns:
        The dataset.

    Raises:
        ValueError: Unknown dataset name.
        TypeError: Unknown keyword option for the dataset.
        DatasetNotFoundError: A TFDS dataset is not prepared in any searched directory.
        NotImplementedError: ``imagenet2012`` with ``streaming=False`` (too large for memory).
    """
    if streaming or (streaming is None and name in STREAMED_DATASETS):
        if name in ("digits", "synthetic"):
            raise ValueError(f"{name} is built in memory, not a TFDS dataset: load it without streaming=True.")
        from jaxnoise import stream  # noqa: PLC0415 - grain is imported only for streamed datasets
        _check_kwargs(name, kwargs, _STREAM_OPTIONS)
        return stream.load_stream(name, data_dir=data_dir, **kwargs)
    check_supported(name)
    if name in STREAMED_DATASETS:
        raise NotImplementedError(f"{name} does not fit in memory: load it with streaming=True (the default).")
    if name == "digits":
        _check_kwargs(name, kwargs, ())
        return _load_digits()
    if name == "synthetic":
        return _load_synthetic(**kwargs)
    _check_kwargs(name, kwargs, ("disk_cache",))
    return _load_tfds(name, data_dir, disk_cache=kwargs.get("disk_cache", True))


def check_supported(name: str, *, streaming: bool | None = None) -> None:
    """Raises (cheaply, before any data is read) for a dataset name :func:`load_dataset` cannot load.

    With ``streaming=True`` any TFDS name is accepted (whether it is prepared is checked when it is loaded).

    Raises:
        ValueError: an unknown name.
    """
    if streaming:
        if name in ("digits", "synthetic"):
            raise ValueError(f"{name} is built in memory, not a TFDS dataset: it cannot be streamed.")
        return
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS}, or any prepared TFDS image "
                         f"classification dataset streamed by name (--streaming / streaming=True).")


def clear_cache() -> None:
    """Drops the in-process cache of decoded TFDS splits (the on-disk cache is kept)."""
    _SPLIT_CACHE.clear()


def _check_kwargs(name: str, kwargs: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"load_dataset({name!r}) got unknown options {unknown}; allowed: {list(allowed)}")


@functools.cache
def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # values 0..16, exact in uint8
    labels = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    return Dataset(
        name="digits",
        train=Split(readonly(x_tr), readonly(y_tr)),
        test=Split(readonly(x_te), readonly(y_te)),
        num_classes=10,
        image_shape=(8, 8, 1),
        pixel_scale=16.0,
    )


def _load_synthetic(
    n_train: int = 1024,
    n_test: int = 256,
    image_shape: tuple[int, int, int] = (8, 8, 1),
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 0.5,
) -> Dataset:
    """Builds a deterministic, learnable toy dataset.

    Each class has a fixed prototype image with pixels uniform in [0, 1]; an example is its class
    prototype plus i.i.d. Gaussian noise of standard deviation ``noise``. Labels cycle through the
    classes (balanced) and are then shuffled. Everything derives from ``seed``.

    Args:
        n_train: Training examples.
        n_test: Test examples.
        image_shape: (H, W, C).
        num_classes: Number of classes.
        seed: Seed of numpy's ``default_rng``.
        noise: Standard deviation of the per-pixel noise.

    Returns:
        Dataset with float32 images; ``preprocess`` only casts to float32, no augmentation.
    """
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    if num_classes < 1 or n_train < 0 or n_test < 0:
        raise ValueError("need num_classes >= 1 and n_train, n_test >= 0")
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.0, 1.0, (num_classes, *image_shape)).astype(np.float32)

    def make(n):
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        eps = rng.normal(0.0, noise, (n, *image_shape)).astype(np.float32)
        return Split(prototypes[labels] + eps, labels)

    train = make(n_train)
    test = make(n_test)
    return Dataset(
        name="synthetic", train=train, test=test, num_classes=num_classes, image_shape=image_shape
    )


def _load_tfds(name: str, data_dir: str | None, *, disk_cache: bool) -> Dataset:
    builder = find_builder(name, data_dir)
    info = builder.info
    resolved = os.path.abspath(os.fspath(builder.data_dir))
    splits = {}
    for split in ("train", "test"):
        key = (name, resolved, split)
        if key not in _SPLIT_CACHE:
            _SPLIT_CACHE[key] = _read_split(builder, name, split, _TFDS_LABEL_KEYS[name], disk_cache)
        splits[split] = _SPLIT_CACHE[key]
    return Dataset(
        name=name,
        train=splits["train"],
        test=splits["test"],
        num_classes=int(info.features[_TFDS_LABEL_KEYS[name]].num_classes),
        image_shape=tuple(int(s) for s in splits["test"].images.shape[1:]),
        pixel_scale=255.0,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        augmentation="crop_flip",
    )


def find_builder(name: str, data_dir: str | None, how_to_prepare: str | None = None):
    """Returns the TFDS builder of the first searched dir where ``name`` is prepared as array_record.

    ``how_to_prepare`` replaces the default preparation advice of the not-found message."""
    import tensorflow_datasets as tfds

    candidates = _candidate_dirs(data_dir, for_search=True)
    searched = []
    for path, origin in candidates:
        if not os.path.isdir(path):
            searched.append(f"{path} ({origin}): does not exist")
            continue
        # Check before asking TFDS, which logs warnings and gives misleading errors for absent data.
        if not os.path.isdir(os.path.join(path, name.split("/")[0])):
            searched.append(f"{path} ({origin}): no '{name}' subdirectory")
            continue
        builder = tfds.builder(name, data_dir=path)
        if not builder.is_prepared():
            searched.append(
                f"{path} ({origin}): no prepared '{name}' version {builder.version} "
                f"(expected {builder.data_dir}/dataset_info.json)"
            )
            continue
        fmt = builder.info.file_format
        if fmt is None or fmt.value not in ("array_record", "parquet"):
            searched.append(
                f"{path} ({origin}): '{name}' is prepared as {getattr(fmt, 'value', fmt)}, which has no "
                "random access; it must be array_record"
            )
            continue
        return builder
    if data_dir is None and not os.environ.get("TFDS_DATA_DIR"):
        searched.insert(0, "$TFDS_DATA_DIR: not set")
    lines = "\n".join(f"  - {s}" for s in searched)
    if how_to_prepare:
        raise DatasetNotFoundError(f"Dataset '{name}' was not found in a prepared TFDS data dir. Searched:\n{lines}\n"
                                   f"{how_to_prepare}")
    raise DatasetNotFoundError(
        f"Dataset '{name}' was not found in a prepared TFDS data dir. Searched:\n{lines}\n"
        f"To fix: pass --data-dir / data_dir= or set TFDS_DATA_DIR to a TFDS data dir that holds "
        f"'{name}' in array_record format (e.g. ../shared/tfds, from the repository root). On a "
        f"machine with internet and TensorFlow, prepare it with\n"
        f"    python -c \"import tensorflow_datasets as tfds; tfds.data_source('{name}', "
        f"data_dir='DIR', builder_kwargs={{'file_format': 'array_record'}})\"\n"
        f"or `tfds build {name} --data_dir=DIR --file_format=array_record`."
    )


def _read_split(builder, name: str, split: str, label_key: str, disk_cache: bool) -> Split:
    """Decodes a whole TFDS split into arrays, through the on-disk cache when enabled."""
    cache_path = _disk_cache_path(builder, name, split) if disk_cache else None
    if cache_path is not None and os.path.exists(cache_path):
        try:
            with np.load(cache_path) as f:
                images, labels = f["images"], f["labels"]
            if images.dtype == np.uint8 and images.ndim == 4 and labels.shape == (len(images),):
                return Split(readonly(images), readonly(labels.astype(np.int32, copy=False)))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"Ignoring unreadable cache {cache_path}: {e}", stacklevel=2)

    source = builder.as_data_source(split=split)
    n = len(source)
    shape = tuple(builder.info.features["image"].shape)
    if any(s is None or s < 1 for s in shape):
        raise NotImplementedError(f"{name}: variable image shape {shape} cannot be stacked in memory")
    shape = tuple(int(s) for s in shape)
    images = np.empty((n, *shape), np.uint8)
    labels = np.empty((n,), np.int32)
    # Batched reads amortise per-call overhead; decoding (PIL) dominates either way.
    for start in range(0, n, _READ_CHUNK):
        stop = min(start + _READ_CHUNK, n)
        try:
            for i, record in enumerate(source.__getitems__(list(range(start, stop))), start):
                images[i] = record["image"]
                labels[i] = record[label_key]
        except (RuntimeError, OSError, ValueError, KeyError) as e:  # array_record/riegeli, PIL, shape errors
            raise DatasetCorruptError(
                f"{name} {split} split in {builder.data_dir} cannot be read at records {start}-{stop - 1} "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]}): the files are truncated or damaged; "
                f"copy or prepare the dataset again (see --data-dir).") from e

    if cache_path is not None:
        _write_npz_atomic(cache_path, images=images, labels=labels)
    return Split(readonly(images), readonly(labels))


def cache_dir() -> str:
    """The directory of decoded-dataset caches: ``$JAXNOISE_CACHE``, else ``~/.cache/jaxnoise``."""
    return _abspath(os.environ.get("JAXNOISE_CACHE") or os.path.join("~", ".cache", "jaxnoise"))


def _disk_cache_path(builder, name: str, split: str) -> str | None:
    """Returns the .npz path for a split, keyed by version and record files' size/mtime."""
    try:
        files = [os.fspath(p) for p in builder.info.splits[split].filepaths]
        stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    except (OSError, KeyError, TypeError):
        return None
    ident = json.dumps([_DISK_CACHE_FORMAT, name, str(builder.version), split, stats])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"{name}-{builder.version}-{split}-{digest}.npz")


def _write_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    """Writes an uncompressed .npz via a temporary file and ``os.replace``; warns on failure."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"Could not write dataset cache {path}: {e}", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def readonly(a: np.ndarray) -> np.ndarray:
    """A contiguous, read-only array of ``a`` (the splits' arrays: a test or user cannot change them in place)."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a
