"""What every protocol needs the same way: its dataset, its command line, its result records, its held-out split."""

from __future__ import annotations

import functools
import json
import os

from jaxnoise import data, report
from jaxnoise.models import IMAGENET_MODELS

TINY_RESOLUTION = 32   # the streamed mock's image side in tiny mode


def streamed(config) -> bool:
    """Whether ``config.dataset`` streams (``imagenet2012``, or ``config.streaming``): tiny mode then runs on a
    mock imagenet2012 in TFDS format (``jaxnoise.stream.write_mock_tfds``), never on digits."""
    return config.dataset in data.STREAMED_DATASETS or bool(config.get("streaming", False))


def data_args(config) -> tuple:
    """The arguments of :func:`dataset` as a hashable tuple (for caches)."""
    if streamed(config):
        res = TINY_RESOLUTION if config.tiny else int(config.get("resolution", 224))
        workers = 0 if config.tiny else int(config.get("workers", -1))
        return bool(config.tiny), config.dataset, config.data_dir, True, res, workers
    return bool(config.tiny), config.dataset, config.data_dir, False, None, None


def dataset(config) -> data.Dataset:
    """``config.dataset`` (from ``config.data_dir``, "" = the default search); in tiny mode digits, or for a streamed
    dataset the mock imagenet2012 (in ``config.data_dir``, or written once under ``$JAXNOISE_CACHE/mock_tfds``) at
    32 px without worker processes. Streamed: ``config.resolution`` (224) and ``config.workers`` (-1 = default)."""
    return load(*data_args(config))


@functools.lru_cache(maxsize=4)
def load(tiny, name, data_dir, stream, resolution, workers) -> data.Dataset:
    if not stream:
        return data.load_dataset("digits") if tiny else data.load_dataset(name, data_dir=data_dir or None)
    if tiny and not data_dir:
        from jaxnoise import stream as stream_lib  # noqa: PLC0415
        data_dir = os.path.join(data.cache_dir(), "mock_tfds")
        stream_lib.write_mock_tfds(data_dir)
    return data.load_dataset(name, data_dir=data_dir or None, streaming=True, resolution=resolution,
                             workers=None if workers < 0 else workers)


def batch(config, size) -> int:
    """A training batch size; in tiny mode on the streamed mock (64 training images) at most 16."""
    return min(int(size), 16) if config.tiny and streamed(config) else int(size)


def stream_settings(config) -> tuple[str, ...]:
    """The config keys of a streamed dataset that stages depend on (``resolution``), where the config has them."""
    return tuple(k for k in ("resolution",) if k in config)


def model_kwargs(name: str, ds: data.Dataset) -> dict:
    """The input shape of an ImageNet ResNet on a streamed dataset (its resolution); nothing otherwise."""
    return {"input_shape": tuple(ds.image_shape)} if name in IMAGENET_MODELS else {}


def head(split, stop: int):
    """The first ``stop`` examples of a split (in memory or streamed)."""
    if hasattr(split, "select"):
        return split.select(0, stop)
    return data.Split(split.images[:stop], split.labels[:stop])


def tail(split, start: int):
    """The examples from ``start`` on (in memory or streamed)."""
    if hasattr(split, "select"):
        return split.select(start, None)
    return data.Split(split.images[start:], split.labels[start:])


def eval_data(split) -> tuple:
    """``(images, labels)`` for ``jaxnoise.robustness``: a streamed split and None, or the arrays."""
    return (split, None) if hasattr(split, "eval_batches") else (split.images, split.labels)


def command(config) -> str:
    """The command that runs the experiment (recorded in its result files)."""
    return f"jaxnoise run experiments/configs/{config.name}.py" + (" --set tiny=True" if config.tiny else "")


def result(config, arms, split: str, n_images: int, **extra) -> dict:
    """A record in the shared result format (``../shared/RESULTS.md``) of this experiment, plus ``extra`` fields."""
    record = report.result_record(config.name, command(config), arms,
                                  {"name": ("digits" if not streamed(config) else "imagenet2012 (mock)") if config.tiny else config.dataset, "split": split,
                                   "n_images": int(n_images)})
    record.update(extra)
    return record


def first_held_out(config, ds: data.Dataset) -> int:
    """Index of the first held-out training image: the last ``held_out`` are kept for searches, never trained on
    (in tiny mode at most a fifth)."""
    n = len(ds.train)
    return n - (min(int(config.held_out), n // 5) if config.tiny else int(config.held_out))


def cap(config, n, tiny_max: int) -> int:
    """``n`` as an int, at most ``tiny_max`` in tiny mode."""
    return min(int(n), tiny_max) if config.tiny else int(n)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
