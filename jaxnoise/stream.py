"""Streaming TFDS image-classification datasets that do not fit in memory (``imagenet2012``, or any by name).

Records are read by random access (``tfds.data_source``, array_record files, no TensorFlow) and decoded, cropped,
resized and flipped by a grain pipeline (``grain.MapDataset`` -> ``mp_prefetch``) in ``workers`` worker processes;
the host gets ``uint8`` batches of ``resolution x resolution`` images. :meth:`StreamingDataset.preprocess` (scale to
[0, 1], ImageNet mean/std) is the same jax-traceable function as the in-memory datasets', applied on device.

* **Training** (:meth:`StreamSplit.train_batches`): epoch ``e`` visits the records in the order of
  ``jaxnoise.data.batch_indices(fold_in(key, e), n, batch_size)`` (the in-memory order; the last incomplete batch
  is dropped) with the standard ImageNet augmentation: a random-resized crop (area 8-100%, aspect 3/4-4/3,
  torchvision's 10 tries and centre fallback) resized to ``resolution``, then a horizontal flip with probability
  1/2. Each record's draws come from numpy's PCG64 seeded with ``(words of fold_in(key, e), record index)``: they do
  not depend on the worker count, on the process count or on where a resumed run starts.
* **Evaluation** (:meth:`StreamSplit.eval_batches`): records in index order; the shorter side is resized to
  ``round(resolution / crop_fraction)`` (256 at 224 with the default 0.875), then the centre ``resolution`` square
  is cropped. The last batch is padded with copies of the last record and masked (``valid``).
* **Processes** (multi-host): with ``process_count`` P, process p reads rows ``[p B/P, (p+1) B/P)`` of every
  training batch (the global batch is the same in every layout) and evaluation batch ``b`` when ``b % P == p``.
* **Resolution** is a parameter (the tests run at 32 px); the model's ``input_shape`` must match.

Held-out and calibration subsets are small: :meth:`StreamSplit.materialize` decodes them (evaluation
preprocessing) into an in-memory :class:`jaxnoise.data.Split`. :func:`write_mock_tfds` writes a tiny prepared
``imagenet2012`` (random JPEGs in the real builder's format) for tests and the experiments' tiny mode.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxnoise import data

__all__ = ["GRAIN_MISSING", "StreamSplit", "StreamingDataset", "eval_transform", "load_stream", "random_resized_crop",
           "write_mock_tfds"]

GRAIN_MISSING = ("the streaming input pipeline needs grain (pip install grain; it is a dependency of jaxnoise, so "
                 "`pip install -e .` installs it).")
IMAGENET_MEAN = data.CIFAR_MEAN   # the same ImageNet statistics
IMAGENET_STD = data.CIFAR_STD
# TFDS datasets whose builder needs files downloaded by hand: how to get them.
_MANUAL = {"imagenet2012": "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (https://image-net.org, "
                           "after registering) into MANUAL_DIR"}


def _grain():
    try:
        import grain  # noqa: PLC0415 - imported where the pipeline is built, so in-memory users never pay for it
    except ImportError as e:
        raise ImportError(GRAIN_MISSING) from e
    return grain


# ----------------------------------------------------------------------------------------------------------------
# Image transforms (numpy + PIL; they run in the grain workers)


def _pil(image: np.ndarray):
    from PIL import Image  # noqa: PLC0415
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (PIL, antialiased when shrinking, as torchvision on PIL images); identity at the same size."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    from PIL import Image  # noqa: PLC0415
    out = np.asarray(_pil(image).resize((width, height), Image.BILINEAR))
    return out.reshape(height, width, image.shape[-1])


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's ``RandomResizedCrop(size)`` then ``RandomHorizontalFlip()``, drawing from ``rng``."""
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # centre crop at the closest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    out = _resize(image[top:top + h, left:left + w], size, size)
    return out[:, ::-1] if rng.random() < 0.5 else out


def eval_transform(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Resize the shorter side to ``round(size / crop_fraction)``, then crop the centre ``size x size``."""
    height, width = image.shape[:2]
    short = int(round(size / crop_fraction))
    if height <= width:
        h, w = short, int(short * width / height)
    else:
        h, w = int(short * height / width), short
    image = _resize(image, h, w)
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return image[top:top + size, left:left + size]


@dataclasses.dataclass(frozen=True)
class _Records:
    """Random access to ``(record index, decoded record)`` at positions of ``indices`` (grain source)."""

    source: Any
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        index = int(self.indices[i])
        return index, self.source[index]


@dataclasses.dataclass(frozen=True)
class _Transform:
    """A record -> ``{"image": uint8 (size, size, C), "label": int32, "valid": bool}`` (grain map, in workers)."""

    size: int
    label_key: str
    train_seed: tuple[int, ...] | None   # None: evaluation preprocessing
    crop_fraction: float

    def __call__(self, item):
        index, record = item
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        if self.train_seed is None:
            image = eval_transform(image, self.size, self.crop_fraction)
        else:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*self.train_seed, index])))
            image = random_resized_crop(image, rng, self.size)
        return {"image": np.ascontiguousarray(image, np.uint8), "label": np.int32(record[self.label_key])}


# ----------------------------------------------------------------------------------------------------------------
# Splits and datasets


@dataclasses.dataclass(frozen=True, eq=False)
class StreamSplit:
    """Records ``[start, stop)`` of one split of a prepared TFDS dataset, read on demand.

    Attributes:
      name: the TFDS dataset name.
      data_dir: the TFDS data dir holding it.
      split: the TFDS split (``"train"``, ``"validation"``, ...).
      start, stop: the record range (``select`` narrows it; indices below are relative to ``start``).
      resolution: the side of the square images the split yields.
      channels: image channels (3 for ImageNet).
      label_key: the label feature.
      workers: grain worker processes (0: decode in this process).
      crop_fraction: the evaluation centre crop's fraction of the resized shorter side.
      progress: show a tqdm bar while an evaluation pass streams (on a terminal, never under ``CI``).
      chips_per_pass: the Monte Carlo chips that share one pass over this split (their weights are held on
        device together); None: every chip of the call. ``dataclasses.replace(split, chips_per_pass=8)``.
    """

    name: str
    data_dir: str
    split: str
    start: int
    stop: int
    resolution: int
    channels: int = 3
    label_key: str = "label"
    workers: int = 0
    crop_fraction: float = 0.875
    progress: bool = True
    chips_per_pass: int | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def description(self) -> str:
        whole = self.start == 0 and self.stop == self._source_len()
        return self.split if whole else f"{self.split}[{self.start}:{self.stop}]"

    def select(self, start: int, stop: int | None = None) -> StreamSplit:
        """Records ``[start, stop)`` of this split (relative indices, as a slice)."""
        lo, hi, _ = slice(start, stop).indices(len(self))
        return dataclasses.replace(self, start=self.start + lo, stop=self.start + max(lo, hi))

    def _source(self):
        return _data_source(self.name, self.data_dir, self.split)

    def _source_len(self) -> int:
        return len(self._source())

    def _iterate(self, indices: np.ndarray, transform: _Transform, rows: int, first: int = 0,
                 desc: str | None = None, total: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``rows`` records at ``indices`` (relative), from batch ``first``, through grain."""
        grain = _grain()
        absolute = np.asarray(indices, np.int64) + self.start
        ds = grain.MapDataset.source(_Records(self._source(), absolute)).map(transform)
        ds = ds.batch(rows, drop_remainder=False)[first:]
        it_ds = ds.to_iter_dataset()
        if self.workers > 0:
            from absl import flags  # noqa: PLC0415 - grain's workers read its absl flags
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()   # a program that is not an absl app never parses them: the defaults
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(self.workers),
                                                                   per_worker_buffer_size=2))
        it = iter(it_ds)
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=total, desc=desc, unit="batch", leave=False,
                   disable=desc is None or not (self.progress and not os.environ.get("CI") and sys.stderr.isatty()))
        try:
            for batch in it:
                bar.update(1)
                yield batch
        finally:
            bar.close()
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def train_batches(self, key, epoch: int, batch_size: int, *, first: int = 0, process_index: int = 0,
                      process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The augmented batches of epoch ``epoch`` from batch ``first`` on: ``(images uint8, labels int32)``.

        The order is ``data.batch_indices(fold_in(key, epoch), len(self), batch_size)``; this process yields rows
        ``[p * B / P, (p + 1) * B / P)`` of each (``B / P`` examples per batch).
        """
        import jax  # noqa: PLC0415

        batch_size, process_index, process_count = _shard_args(batch_size, process_index, process_count)
        epoch_key = jax.random.fold_in(key, epoch)
        order = data.batch_indices(epoch_key, len(self), batch_size)
        rows = batch_size // process_count
        mine = order[:, process_index * rows:(process_index + 1) * rows].reshape(-1)
        words = tuple(int(w) for w in np.asarray(jax.random.key_data(epoch_key)).ravel())
        transform = _Transform(self.resolution, self.label_key, words, self.crop_fraction)
        for batch in self._iterate(mine, transform, rows, first):
            yield batch["image"], batch["label"]

    def n_eval_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def eval_batches(self, batch_size: int, *, process_index: int = 0, process_count: int = 1,
                     desc: str | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """The evaluation batches in record order: ``(b, images uint8, labels int32, valid bool)`` with ``b`` the
        batch's global index; the last is padded with copies of the last record (``valid`` False). With
        ``process_count`` P this process yields the batches ``b % P == process_index``."""
        n = len(self)
        if n == 0:
            raise ValueError(f"{self.name} {self.description} is empty: there is nothing to evaluate.")
        batch_size = int(batch_size)
        n_batches = self.n_eval_batches(batch_size)
        positions = np.minimum(np.arange(n_batches * batch_size), n - 1).reshape(n_batches, batch_size)
        valid = (np.arange(n_batches * batch_size) < n).reshape(n_batches, batch_size)
        mine = np.arange(process_index, n_batches, process_count)
        transform = _Transform(self.resolution, self.label_key, None, self.crop_fraction)
        batches = self._iterate(positions[mine].reshape(-1), transform, batch_size, desc=desc, total=len(mine))
        for b, batch in zip(mine, batches):
            yield int(b), batch["image"], batch["label"], valid[b]

    def materialize(self, indices: np.ndarray | None = None) -> data.Split:
        """Records at ``indices`` (relative; default all) with evaluation preprocessing, in memory."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64)
        transform = _Transform(self.resolution, self.label_key, None, self.crop_fraction)
        images = np.empty((len(indices), self.resolution, self.resolution, self.channels), np.uint8)
        labels = np.empty((len(indices),), np.int32)
        at = 0
        for batch in self._iterate(indices, transform, 256):
            k = len(batch["label"])
            images[at:at + k], labels[at:at + k] = batch["image"], batch["label"]
            at += k
        return data.Split(data.readonly(images), data.readonly(labels))


def _shard_args(batch_size, process_index, process_count) -> tuple[int, int, int]:
    batch_size, process_index, process_count = int(batch_size), int(process_index), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes: every process "
                         f"reads an equal part of each batch; use a multiple of {process_count}.")
    return batch_size, process_index, process_count


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingDataset(data.Dataset):
    """A :class:`jaxnoise.data.Dataset` whose splits are :class:`StreamSplit` s (records read on demand).

    ``train``/``test`` are streams; ``augment`` is the identity (the training augmentation runs in the grain
    workers, see :meth:`StreamSplit.train_batches`); ``preprocess`` scales to [0, 1] and normalises with the
    ImageNet mean/std, on device.
    """

    train_augmentation: str = "random_resized_crop_flip"
    streaming: bool = True


def _data_source(name: str, data_dir: str, split: str):
    key = (name, data_dir, split)
    if key not in _SOURCES:
        import tensorflow_datasets as tfds  # noqa: PLC0415
        _SOURCES[key] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return _SOURCES[key]


_SOURCES: dict[tuple[str, str, str], Any] = {}


def load_stream(name: str, *, data_dir: str | None = None, resolution: int = 224, workers: int | None = None,
                eval_split: str | None = None, crop_fraction: float = 0.875, progress: bool = True
                ) -> StreamingDataset:
    """A streaming dataset from a prepared TFDS data dir (array_record format).

    Args:
      name: the TFDS name (``imagenet2012``, ``imagenette``, ``cifar10``, ...): an image classification dataset
        with an ``image`` and a ``label`` feature.
      data_dir: the TFDS data dir; None searches ``$TFDS_DATA_DIR``, ``../shared/tfds`` and ``~/tensorflow_datasets``
        (as :func:`jaxnoise.data.load_dataset`).
      resolution: the side of the square images (224 for ImageNet; the tests use 32).
      workers: grain worker processes decoding and augmenting; None: ``min(8, os.cpu_count() - 1)``; 0: none.
      eval_split: the evaluation split; None: ``validation`` when the dataset has one (ImageNet's test split has
        no labels), else ``test``.
      crop_fraction: evaluation centre crop over the resized shorter side (0.875: resize 256, crop 224).
      progress: tqdm bars while evaluation passes stream.

    Raises:
      ValueError: a bad argument (before any data is read).
      jaxnoise.data.DatasetNotFoundError: the dataset is not prepared in any searched dir; the message says how to
        prepare it.
      ImportError: grain is not installed.
    """
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution < 16:
        raise ValueError(f"resolution={resolution!r} must be an integer >= 16 (224 for ImageNet models).")
    if not 0 < float(crop_fraction) <= 1:
        raise ValueError(f"crop_fraction={crop_fraction!r} must be in (0, 1] (0.875: resize 256, crop 224).")
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"workers={workers!r} must be an integer >= 0 (0 decodes in this process).")
    _grain()
    builder = data.find_builder(name, data_dir, how_to_prepare=_how_to_prepare(name))
    info = builder.info
    features = info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"{name} has features {sorted(features.keys())}: a streaming image classification dataset "
                         f"needs 'image' and 'label'.")
    splits = set(info.splits.keys())
    eval_split = eval_split or ("validation" if "validation" in splits else "test")
    for split in ("train", eval_split):
        if split not in splits:
            raise ValueError(f"{name} in {builder.data_dir} has no {split!r} split (it has {sorted(splits)}).")
    shape = features["image"].shape
    channels = int(shape[-1]) if shape[-1] else 3
    root = os.path.abspath(os.fspath(builder.data_dir))
    while os.path.basename(root) != name.split("/")[0]:   # DIR/name[/config]/version -> DIR
        root = os.path.dirname(root)
    root = os.path.dirname(root)

    def split_of(split):
        n = int(info.splits[split].num_examples)
        return StreamSplit(name, root, split, 0, n, int(resolution), channels, "label", int(workers),
                           float(crop_fraction), bool(progress))

    return StreamingDataset(name=name, train=split_of("train"), test=split_of(eval_split),
                            num_classes=int(features["label"].num_classes),
                            image_shape=(int(resolution), int(resolution), channels), pixel_scale=255.0,
                            mean=IMAGENET_MEAN if channels == 3 else None, std=IMAGENET_STD if channels == 3 else None,
                            augmentation="none")


def _how_to_prepare(name: str) -> str:
    if name in _MANUAL:
        return (f"Prepare it on a machine with TensorFlow: {_MANUAL[name]}, then\n"
                f"    tfds build {name} --manual_dir MANUAL_DIR --data_dir DIR --file_format array_record\n"
                f"and pass --data-dir DIR (or set TFDS_DATA_DIR=DIR).")
    return (f"Prepare it on a machine with internet and TensorFlow:\n"
            f"    tfds build {name} --data_dir DIR --file_format array_record\n"
            f"and pass --data-dir DIR (or set TFDS_DATA_DIR=DIR).")


# ----------------------------------------------------------------------------------------------------------------
# A mock imagenet2012 (tests, tiny mode)


def write_mock_tfds(data_dir: str | os.PathLike, *, n_train: int = 64, n_eval: int = 32, n_labels: int = 10,
                    min_side: int = 40, max_side: int = 96, seed: int = 0) -> str:
    """Writes a prepared ``imagenet2012`` of random JPEGs into ``data_dir`` (a TFDS data dir), with the real
    builder's features (1000 classes), version and array_record files; TensorFlow is not needed.

    Labels cycle through the first ``n_labels`` classes; each image has its own random size in ``[min_side,
    max_side]`` and is the label's colour plus noise, so a network can learn it. An already prepared copy is kept.

    Returns:
      The dataset's directory (``data_dir/imagenet2012/<version>``).
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as real  # noqa: PLC0415

    with tfds.core.registered.skip_registration():
        class _Mock(real.Builder):
            name = "imagenet2012"
            code_path = None   # no checksums file (TFDS would look for one beside this module)

            @classmethod
            def _get_pkg_dir_path(cls):
                return real.Builder._get_pkg_dir_path()

            def _split_generators(self, dl_manager):
                return {"train": self._examples(n_train, 0), "validation": self._examples(n_eval, 1)}

            def _examples(self, n, salt):
                names = self.info.features["label"].names
                colours = np.random.default_rng(seed).integers(0, 256, (n_labels, 3))
                for i in range(n):
                    rng = np.random.default_rng([seed, salt, i])
                    h, w = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
                    label = i % n_labels
                    pixels = np.clip(colours[label] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                    yield f"{salt}_{i}", {"image": buf.getvalue(), "label": label,
                                          "file_name": f"{names[label]}_{salt}_{i}.JPEG"}

            def _generate_examples(self):  # unused: _split_generators yields the examples itself
                raise NotImplementedError

    builder = _Mock(data_dir=os.fspath(data_dir), file_format="array_record")
    if not builder.is_prepared():
        import contextlib  # noqa: PLC0415
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return os.fspath(builder.data_dir)
