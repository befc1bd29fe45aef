"""Experiments as configs run by named, cached stages that resume where they stopped.

An experiment is a config file ``experiments/configs/<name>.py`` whose ``get_config()`` returns an
``ml_collections.ConfigDict`` (its docstring gives the command and the expected result) with a ``protocol``: the
name of a stage list in :data:`PROTOCOLS` (``jaxnoise.protocols``). ``jaxnoise run CONFIG [--set key=value ...]``
(or :func:`run`) runs the stages in order:

* a stage that finished before with the same settings is **cached**: its record
  ``<results>/stages/<stage>.jsonl`` (the settings it used, its summary, when it finished) is read, nothing runs;
* a stage whose record holds other settings is **refused** before anything runs, naming the settings that differ
  (a result is never silently replaced: ``--rerun STAGE`` runs it again, and every stage after it);
* a stage that stopped half-way resumes from its own state (training stages from their checkpoints in the
  work dir; evaluation stages from the per-setting files they write as they go).

``--rerun STAGE`` is durable: before anything runs, every stage from ``STAGE`` on that has a record gets a
``"superseded"`` line appended to it and its outputs moved to ``<results>/superseded/<time>/`` (kept, never
deleted), so a rerun that stops half-way resumes as a rerun in the next session, and its stages start from a fresh
work dir (``<stage>-<digest>-r<n>``, n the number of superseded runs) instead of the old run's checkpoints.

Each stage writes its outputs into the results dir (``experiments/results/<name>/``, committed: JSON, tables,
plots and the trained weights of each arm as ``.npz``) as soon as it finishes; checkpoints and other bulky state
go to the work dir (``runs/<name>/``, not committed). A later run on another machine continues from the committed
files: a stage whose record and outputs are there is not run again.

**Reuse.** A config with ``reuse_from = "<other experiment>"`` takes each stage that has not run here from that
experiment's results when its record there holds the same settings (same digest) and its outputs are all there:
the outputs are copied (the other experiment's files are never touched) and the record names where they came from
(``"reused_from"``). A follow-up that changes only later stages (e.g. more training epochs) starts where they
differ.

Tiny mode (``--set tiny=True``, what the tests run): every protocol maps itself to digits or synthetic data and a
handful of steps, so each config runs end to end in seconds; its files go under ``runs/tiny/<name>/``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxnoise import io as io_lib
from jaxnoise.stages import PROTOCOLS, Context, Stage, protocol

RECORD_FORMAT = "jaxnoise.stage/1"
SUPERSEDED = "superseded"
STARTED = "started"


class ExperimentError(ValueError):
    """A config, an override or a stage record that cannot be used; the message names the fix."""


# Stage, Context and the protocol registry live in jaxnoise.stages, which the protocols import (not this module).
__all__ = ["Context", "ExperimentError", "PROTOCOLS", "Stage", "apply_overrides", "load_config", "plan", "protocol",
           "read_record", "run", "stages_of"]


def _protocols() -> dict[str, Callable[[Any], list[Stage]]]:
    import jaxnoise.protocols  # noqa: F401  (registers the library's protocols)
    return PROTOCOLS


def load_config(path: str | os.PathLike) -> Any:
    """``get_config()`` of the config file ``path`` (a ``.py`` file), as an ``ml_collections.ConfigDict``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExperimentError(f"config {path!r} does not exist; configs are experiments/configs/<name>.py files "
                              f"with a get_config() function.")
    spec = importlib.util.spec_from_file_location(f"jaxnoise_config_{_digest(path)[:8]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ExperimentError(f"config {path!r} has no get_config() function.")
    config = module.get_config()
    for field in ("name", "protocol"):
        if field not in config:
            raise ExperimentError(f"config {path!r}: get_config() must set {field!r}.")
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text   # a bare word is a string


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """``config`` with ``key=value`` overrides (dotted keys; values as Python literals, bare words as strings).
    An unknown key or a value of another type is refused with the key's current value."""
    config = config.copy_and_resolve_references()
    for item in overrides:
        if "=" not in item:
            raise ExperimentError(f"--set {item!r}: write key=value (e.g. --set train.epochs=3).")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = config
        for p in parents:
            if p not in node:
                raise ExperimentError(f"--set {key}: the config has no {p!r}; keys: {sorted(node.keys())}.")
            node = node[p]
        if leaf not in node:
            raise ExperimentError(f"--set {key}: the config has no {leaf!r}; keys here: {sorted(node.keys())}.")
        value = _parse_value(text)
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ExperimentError(f"--set {key}={text}: {e} (now {old!r}).") from e
    return config


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _lookup(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def stage_settings(config: Any, stage: Stage) -> dict[str, Any]:
    """The settings a stage's record keeps (and a cache hit must match)."""
    if stage.settings is None:
        return _plain(config)
    return {k: _plain(_lookup(config, k)) for k in stage.settings}


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def record_path(results_dir: str, stage: str) -> str:
    """``stages/<stage>.jsonl``: one JSON line per finished run of the stage, the last one current (a rerun appends;
    nothing is overwritten). Not ``.json``: result files in the shared format are the only ``.json`` there."""
    return os.path.join(results_dir, "stages", f"{stage}.jsonl")


def read_history(results_dir: str, stage: str) -> list[dict[str, Any]]:
    """Every line of the stage's record file, oldest first (finished runs and ``"superseded"`` marks)."""
    path = record_path(results_dir, stage)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_record(results_dir: str, stage: str) -> dict[str, Any] | None:
    """The stage's current record (its last finished run), or None when it never finished or its last run was
    superseded by ``--rerun``."""
    current = None
    for h in read_history(results_dir, stage):
        if h.get("status") == SUPERSEDED:
            current = None
        elif h.get("status") is None:
            current = h
    return current


def _started(results_dir: str, stage: str) -> bool:
    """Whether the runner started the stage since its last finished or superseded run (its outputs may be partial
    files it writes as it goes, e.g. a search that resumes)."""
    history = read_history(results_dir, stage)
    return bool(history) and history[-1].get("status") == STARTED


def _reruns(results_dir: str, stage: str) -> int:
    return sum(1 for h in read_history(results_dir, stage) if h.get("status") == SUPERSEDED)


def supersede(results_dir: str, stage: Stage, log: Callable[[str], None] = print) -> None:
    """Marks the stage's current record superseded and moves its outputs to ``superseded/<time>/`` (a rerun)."""
    outputs = [o for o in stage.outputs if os.path.exists(os.path.join(results_dir, o))]
    if read_record(results_dir, stage.name) is None and not outputs:
        return
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for out in stage.outputs:
        src = os.path.join(results_dir, out)
        if os.path.exists(src):
            dst = os.path.join(results_dir, "superseded", stamp, out)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
            moved.append(os.path.relpath(dst, results_dir))
    os.makedirs(os.path.dirname(record_path(results_dir, stage.name)), exist_ok=True)
    mark = {"format": RECORD_FORMAT, "stage": stage.name, "status": SUPERSEDED, "moved": moved,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    io_lib.append_lines(record_path(results_dir, stage.name), [json.dumps(mark) + "\n"])
    log(f"{stage.name}: superseded (its outputs kept under superseded/{stamp}/)")


def plan(config: Any, stages: Sequence[Stage], results_dir: str, rerun: Sequence[str] = ()) -> list[tuple[Stage, str]]:
    """``[(stage, "cached" | "reuse" | "run"), ...]`` ("reuse": taken from ``config.reuse_from``), checking every
    record first: a stale record (other settings) that is not to be rerun raises :class:`ExperimentError` before
    anything runs."""
    names = [s.name for s in stages]
    unknown = [r for r in rerun if r not in names]
    if unknown:
        raise ExperimentError(f"--rerun {unknown}: no such stage; stages: {names}.")
    first_rerun = min((names.index(r) for r in rerun), default=len(names))
    out = []
    for i, stage in enumerate(stages):
        record = read_record(results_dir, stage.name)
        settings = stage_settings(config, stage)
        if i < first_rerun and record is None:
            foreign = [o for o in stage.outputs if os.path.exists(os.path.join(results_dir, o))]
            if foreign and not _started(results_dir, stage.name):
                raise ExperimentError(
                    f"stage {stage.name!r} of {config.name}: {foreign} already exist in {results_dir} but the "
                    f"runner never ran the stage (results made another way, e.g. by an older script); they are "
                    f"kept. Use another config name (--set name=...) for a run beside them, or --rerun "
                    f"{stage.name} to move them to superseded/ and run it.")
        if i >= first_rerun or record is None:
            reuse = i < first_rerun and _reuse_source(config, stage, results_dir) is not None
            out.append((stage, "reuse" if reuse else "run"))
            continue
        if record.get("settings_digest") != _digest(settings):
            diff = _differences(record.get("settings", {}), settings)
            raise ExperimentError(
                f"stage {stage.name!r} of {config.name} finished before with other settings "
                f"({'; '.join(diff[:6]) or 'settings differ'}); its results are kept. Use another config name "
                f"(--set name=...), undo the change, or --rerun {stage.name} to run it (and the stages after it) "
                f"again.")
        missing = [o for o in stage.outputs if not os.path.exists(os.path.join(results_dir, o))]
        out.append((stage, "run" if missing else "cached"))
    return out


def stages_of(config: Any) -> list[Stage]:
    """``PROTOCOLS[config.protocol](config)``, or an error listing the known protocols."""
    protocols = _protocols()
    if config.protocol not in protocols:
        raise ExperimentError(f"config {config.name}: unknown protocol {config.protocol!r}; known: "
                              f"{sorted(protocols)}.")
    return protocols[config.protocol](config)


def results_dir_of(config: Any) -> str:
    """``experiments/results/<name>`` (committed); in tiny mode ``runs/tiny/<name>/results`` (never committed)."""
    if config.get("tiny"):
        return os.path.join("runs", "tiny", config.name, "results")
    return os.path.join("experiments", "results", config.name)


STALE_DIR = "stale"


def set_aside_unresumable(stage_work_dir: str, work_dir: str) -> list[str]:
    """Moves every training dir under ``stage_work_dir`` that cannot resume (training history in its
    ``metrics.jsonl`` but no finished checkpoint: the stage was killed before its first checkpoint) to
    ``<work_dir>/stale/<stage dir>-<sub dir>-<time>``, kept, so the stage starts that training over instead of
    being refused by :func:`jaxnoise.train.train`'s guard. A dir whose lock another process holds is left alone
    (that run is alive). Returns one line per move."""
    from jaxnoise import checkpoint, train  # the runner itself needs neither
    from jaxnoise import workdir as workdir_lib

    lines = []
    if not os.path.isdir(stage_work_dir):
        return lines
    for root, dirs, files in os.walk(stage_work_dir):
        dirs.sort()
        if train.METRICS_FILE not in files or not train.read_metrics(os.path.join(root, train.METRICS_FILE)):
            continue
        if checkpoint.latest_step(root) is not None:
            continue
        try:
            with workdir_lib.workdir_lock(root, notify=lambda _: None):
                pass
        except workdir_lib.WorkdirLockedError:
            continue
        rel = os.path.relpath(root, stage_work_dir).replace(os.sep, "-").strip(".-")
        dest = os.path.join(work_dir, STALE_DIR, "-".join(
            p for p in (os.path.basename(stage_work_dir), rel, time.strftime("%Y%m%dT%H%M%S")) if p))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(root, dest)
        dirs[:] = []
        lines.append(f"{root} had training history but no finished checkpoint (stopped before its first one): "
                     f"moved to {dest}, starting that training over")
    return lines


def _reuse_source(config: Any, stage: Stage, results_dir: str) -> tuple[str, dict[str, Any]] | None:
    """``(results dir, record)`` of ``stage`` in ``config.reuse_from``'s results when its record there holds this
    config's settings and its outputs are all there; None otherwise."""
    source_name = config.get("reuse_from") or ""
    if not source_name:
        return None
    source = os.path.join(os.path.dirname(os.path.normpath(results_dir)), source_name)
    if config.get("tiny"):   # runs/tiny/<name>/results
        source = os.path.join(os.path.dirname(os.path.dirname(os.path.normpath(results_dir))), source_name,
                              "results")
    record = read_record(source, stage.name)
    if record is None or record.get("settings_digest") != _digest(stage_settings(config, stage)):
        return None
    if not all(os.path.isfile(os.path.join(source, o)) for o in stage.outputs):
        return None
    return source, record


def _reused(config: Any, stage: Stage, results_dir: str) -> dict[str, Any] | None:
    """The record of ``stage`` taken from ``config.reuse_from``'s results (outputs copied into ``results_dir``),
    or None when there is nothing to reuse (:func:`_reuse_source`)."""
    found = _reuse_source(config, stage, results_dir)
    if found is None:
        return None
    (source, record), source_name = found, config.reuse_from
    for out in stage.outputs:
        with open(os.path.join(source, out), "rb") as f:
            data = f.read()
        io_lib.write_atomic(os.path.join(results_dir, out), lambda g, data=data: g.write(data), binary=True)
    return {**record, "experiment": config.name, "reused_from": source_name,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def work_dir_of(config: Any) -> str:
    """``runs/<name>`` (checkpoints; not committed); in tiny mode ``runs/tiny/<name>/work``."""
    if config.get("tiny"):
        return os.path.join("runs", "tiny", config.name, "work")
    return os.path.join("runs", config.name)


def run(config: Any, stages: Sequence[Stage] | None = None, *, results_dir: str | None = None,
        work_dir: str | None = None, only: Sequence[str] | None = None, rerun: Sequence[str] = (),
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs (or reads from cache) every stage of the experiment ``config``; returns ``{stage: summary}``.

    Args:
      config: the experiment's ConfigDict (``load_config`` + ``apply_overrides``).
      stages: the stage list (default: ``PROTOCOLS[config.protocol](config)``).
      results_dir: default :func:`results_dir_of` (``experiments/results/<name>``; tiny mode under ``runs/tiny``).
      work_dir: default :func:`work_dir_of` (``runs/<name>``).
      only: run only these stages (and read the records of the others that came before).
      rerun: stages to run again even when cached (with every stage after them).
    """
    log = log or (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True))
    if stages is None:
        stages = stages_of(config)
    results_dir = results_dir or results_dir_of(config)
    work_dir = work_dir or work_dir_of(config)
    steps = plan(config, stages, results_dir, rerun)
    if only:
        unknown = [o for o in only if o not in [s.name for s in stages]]
        if unknown:
            raise ExperimentError(f"--only {unknown}: no such stage; stages: {[s.name for s in stages]}.")
    os.makedirs(results_dir, exist_ok=True)
    if rerun:
        first = min(i for i, (s, _) in enumerate(steps) if s.name in rerun)
        for stage, _ in steps[first:]:
            supersede(results_dir, stage, log)
    ctx = Context(config, results_dir, work_dir, {}, log)
    last = max((i for i, (s, _) in enumerate(steps) if s.name in only), default=-1) if only else len(steps)
    for i, (stage, action) in enumerate(steps):
        if i > last:
            break   # after the last --only stage: nothing more to do
        if action == "cached" or (only and stage.name not in only):
            record = read_record(results_dir, stage.name)
            if record is not None:
                ctx.summaries[stage.name] = record.get("summary")
                log(f"{stage.name}: cached ({record.get('finished', '?')})")
                continue
            if only:
                raise ExperimentError(f"--only {list(only)} needs the result of stage {stage.name!r}, which has not "
                                      f"run: run it first (or drop --only).")
        settings = stage_settings(config, stage)
        reused = _reused(config, stage, results_dir) if action == "reuse" else None
        if reused is not None:
            os.makedirs(os.path.dirname(record_path(results_dir, stage.name)), exist_ok=True)
            io_lib.append_lines(record_path(results_dir, stage.name), [json.dumps(reused) + "\n"])
            ctx.summaries[stage.name] = reused.get("summary")
            log(f"{stage.name}: reused from {reused['reused_from']} (same settings)")
            continue
        n_reruns = _reruns(results_dir, stage.name)
        ctx.stage_work_dir = os.path.join(work_dir, f"{stage.name}-{_digest(settings)[:8]}"
                                          + (f"-r{n_reruns}" if n_reruns else ""))
        for moved in set_aside_unresumable(ctx.stage_work_dir, work_dir):
            log(f"{stage.name}: {moved}")
        log(f"{stage.name}: running (work dir {ctx.stage_work_dir})")
        os.makedirs(os.path.dirname(record_path(results_dir, stage.name)), exist_ok=True)
        io_lib.append_lines(record_path(results_dir, stage.name),
                            [json.dumps({"format": RECORD_FORMAT, "stage": stage.name, "status": STARTED,
                                         "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"])
        t0 = time.time()
        summary = stage.run(ctx)
        missing = [o for o in stage.outputs if not os.path.exists(os.path.join(results_dir, o))]
        if missing:
            raise RuntimeError(f"stage {stage.name} finished without writing {missing}.")
        record = {"format": RECORD_FORMAT, "stage": stage.name, "experiment": config.name,
                  "settings": settings, "settings_digest": _digest(settings), "summary": _plain(summary),
                  "seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.makedirs(os.path.dirname(record_path(results_dir, stage.name)), exist_ok=True)
        io_lib.append_lines(record_path(results_dir, stage.name), [json.dumps(record) + "\n"])
        ctx.summaries[stage.name] = record["summary"]
        log(f"{stage.name}: done in {record['seconds']:.0f} s")
    return ctx.summaries
