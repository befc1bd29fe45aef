"""The vocabulary of experiments: a :class:`Stage`, the :class:`Context` a running stage sees, and the registry of
protocols (``@protocol(name)``: ``fn(config) -> [Stage, ...]``). The protocols (``jaxnoise.protocols``) import this
module; the runner (:mod:`jaxnoise.experiment`) imports both, so neither imports the other's importer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["PROTOCOLS", "Context", "Stage", "protocol"]


class Stage(NamedTuple):
    """One named step of an experiment.

    Attributes:
      name: the stage's name (its record is ``stages/<name>.jsonl``).
      run: ``run(ctx) -> summary``: does the work, writes its outputs under ``ctx.results_dir``, returns a
        JSON-ready summary that later stages read as ``ctx.summaries[name]``.
      settings: the config keys (dotted) whose values the stage depends on; a change of one of them makes the
        cached record stale. None: the whole config.
      outputs: files (relative to the results dir) the stage must leave; a record without them is not a cache hit.
    """

    name: str
    run: Callable[[Context], Any]
    settings: tuple[str, ...] | None = None
    outputs: tuple[str, ...] = ()


@dataclasses.dataclass
class Context:
    """What a running stage sees."""

    config: Any
    results_dir: str
    work_dir: str
    summaries: dict[str, Any]
    log: Callable[[str], None]
    stage_work_dir: str = ""

    def result_path(self, *parts: str) -> str:
        path = os.path.join(self.results_dir, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def work_path(self, *parts: str) -> str:
        """A path in the running stage's own work dir, ``<work_dir>/<stage>-<settings digest>``: a resume with the
        same settings finds its checkpoints there, a run with other settings (``--rerun``) starts afresh beside
        them (nothing is deleted)."""
        path = os.path.join(self.stage_work_dir or self.work_dir, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path


PROTOCOLS: dict[str, Callable[[Any], list[Stage]]] = {}


def protocol(name: str):
    """Registers ``fn(config) -> [Stage, ...]`` as the protocol ``name``."""
    def register(fn):
        PROTOCOLS[name] = fn
        return fn
    return register
