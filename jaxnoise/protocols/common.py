"""What every protocol needs the same way: its dataset, its command line, its result records, its held-out split."""

from __future__ import annotations

from jaxnoise import data, report


def dataset(config) -> data.Dataset:
    """``config.dataset`` (from ``config.data_dir``, "" = the default search); digits in tiny mode."""
    if config.tiny:
        return data.load_dataset("digits")
    return data.load_dataset(config.dataset, data_dir=config.data_dir or None)


def command(config) -> str:
    """The command that runs the experiment (recorded in its result files)."""
    return f"jaxnoise run experiments/configs/{config.name}.py" + (" --set tiny=True" if config.tiny else "")


def result(config, arms, split: str, n_images: int, **extra) -> dict:
    """A record in the shared result format (``../shared/RESULTS.md``) of this experiment, plus ``extra`` fields."""
    record = report.result_record(config.name, command(config), arms,
                                  {"name": "digits" if config.tiny else config.dataset, "split": split,
                                   "n_images": int(n_images)})
    record.update(extra)
    return record


def first_held_out(config, ds: data.Dataset) -> int:
    """Index of the first held-out training image: the last ``held_out`` are kept for searches, never trained on
    (in tiny mode at most a fifth)."""
    n = len(ds.train.labels)
    return n - (min(int(config.held_out), n // 5) if config.tiny else int(config.held_out))
