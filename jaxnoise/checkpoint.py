"""Checkpoints: a thin wrapper over ``orbax-checkpoint`` with atomic writes and clear errors.

Layout of a checkpoint directory (``WORKDIR/checkpoints`` for :func:`jaxnoise.train.train`)::

    DIR/
      metadata.json            # copy of the latest step's metadata (human-readable; replaced atomically)
      <step>/                  # one finished step; orbax writes <step>.orbax-checkpoint-tmp*/ and renames it
        state/                 # the pytree (orbax StandardSave, OCDBT/zarr arrays)
        metadata/metadata      # the JSON metadata of this step

Guarantees:

* **Atomic writes.** orbax's ``AtomicRenameTemporaryPath`` mode is set explicitly: a step is written into a
  temporary directory and renamed into place only once complete. A temporary directory left behind by a killed
  run is never listed as a step, and is deleted by the next :meth:`CheckpointManager.save` in that directory.
* **Append-only.** A save never overwrites an existing step, and a failed save leaves earlier steps untouched.
  Only the retention policy (keep the newest ``max_to_keep`` steps) deletes steps, and only after a new step has
  been written completely.
* **Clear errors.** A missing directory or step raises :class:`FileNotFoundError`; an unreadable (truncated,
  partly deleted) step raises :class:`CheckpointError`; a checkpoint of another model or optimizer raises
  :class:`CheckpointMismatchError` listing the differences. Each message names the path and what to do.

Restored arrays take the structure, dtypes and (for ``jax.Array`` leaves) the sharding of the target pytree.
Without a target, leaves come back as ``jax.Array`` on the default device in nested dicts/lists (tuples and
namedtuples become lists and dicts), whatever device wrote them. ``restore(..., sharding=NamedSharding(mesh, P()))``
restores every leaf straight into that sharding (e.g. replicated over a mesh), whatever devices wrote it.

Multi-process: call :meth:`CheckpointManager.save` and :meth:`~CheckpointManager.restore` in every process, on a
directory every process sees (orbax coordinates the processes and each writes the shards it owns); the plain
``metadata.json`` copy is written by process 0 only (``jaxnoise.distributed.is_main_process``).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.path import atomicity as ocp_atomicity

from jaxnoise import _checks, distributed
from jaxnoise.io import write_atomic, write_text_atomic

_STATE = "state"
_METADATA = "metadata"
METADATA_FILE = "metadata.json"
# A training workdir keeps its checkpoints here; read functions accept either directory.
CHECKPOINT_SUBDIR = "checkpoints"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_MAX_LISTED = 10


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read (truncated, partly deleted or otherwise corrupt)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint does not match the structure or shapes of the pytree it is restored into."""


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _abs(directory: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(directory)))


def _step_dirs(directory: str) -> list[int]:
    """Finished step directories (``<int>``) in ``directory``; temporary ones are skipped."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _resolve(directory: str | os.PathLike) -> str:
    """The checkpoint directory meant by ``directory``: itself, or its ``checkpoints/`` subdirectory.

    Raises:
      FileNotFoundError: when ``directory`` does not exist.
    """
    path = _abs(directory)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint directory {path!r} does not exist. Pass the directory a training run wrote "
            f"(WORKDIR/{CHECKPOINT_SUBDIR}, or WORKDIR itself) or one written by save_variables; train first "
            f"with jaxnoise.train.train(..., workdir=WORKDIR) if there is none.")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is a file, not a checkpoint directory. Pass the directory a training "
                                f"run wrote (WORKDIR/{CHECKPOINT_SUBDIR} or WORKDIR), or a .npz weights file to "
                                f"load_variables.")
    sub = os.path.join(path, CHECKPOINT_SUBDIR)
    if not _step_dirs(path) and not os.path.exists(os.path.join(path, METADATA_FILE)) and os.path.isdir(sub):
        return sub
    return path


def flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{"a/b/0/c": (shape, dtype)}`` for every leaf; dict keys, attribute names and indices alike."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        name = "/".join(_checks.key_name(k) for k in path)
        out[name] = (tuple(np.shape(leaf)), getattr(leaf, "dtype", None))
    return out


def describe_mismatch(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Lines naming the leaves missing, unexpected and of the wrong shape between two :func:`flat_shapes`."""
    missing = [k for k in wanted if k not in stored]
    unexpected = [k for k in stored if k not in wanted]
    misshaped = [f"{k}: checkpoint {stored[k][0]}, target {wanted[k][0]}" for k in wanted
                 if k in stored and tuple(stored[k][0]) != tuple(wanted[k][0])]
    lines = []
    for title, items in (("in target but not in checkpoint", missing), ("in checkpoint but not in target",
                                                                         unexpected), ("wrong shape", misshaped)):
        if items:
            shown = items[:_MAX_LISTED] + ([f"... and {len(items) - _MAX_LISTED} more"]
                                           if len(items) > _MAX_LISTED else [])
            lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
    return lines


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON to a temporary file in the same directory, then renames it over ``path``."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists and numpy scalars as Python numbers; raises TypeError for the rest."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.generic, np.ndarray)) or isinstance(o, jax.Array):
        return np.asarray(o).tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"metadata value {o!r} of type {type(o).__name__} is not JSON-serialisable; "
                    f"use strings, numbers, bools, lists and dicts.")


def _restore_item(target: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """The item orbax restores into.

    With ``sharding``: every leaf as a ``jax.ShapeDtypeStruct`` with that sharding. Without: ``jax.Array`` leaves
    as they are (their sharding is kept), ``jax.ShapeDtypeStruct`` leaves with their own sharding if they have
    one, every other leaf on the default device (so a checkpoint written on another device reads here).
    """
    if sharding is not None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=sharding), target)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        if isinstance(x, jax.Array):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or sharding)
        arr = np.asarray(x)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=sharding)
    return jax.tree.map(leaf, target)


def _dtype(x: Any) -> Any:
    """The dtype a jax array of ``x`` has (64-bit types narrowed unless ``jax_enable_x64``)."""
    return jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def _cast_like(restored: Any, target: Any) -> Any:
    """Restored leaves converted to the target's leaf kind (numpy/Python/jax) and dtype."""
    def leaf(r, t):
        if isinstance(t, (jax.Array, jax.ShapeDtypeStruct)):
            return r if r.dtype == t.dtype else r.astype(t.dtype)
        if isinstance(t, (bool, int, float)) and not isinstance(t, np.generic):
            return type(t)(np.asarray(r))
        dtype = t.dtype if hasattr(t, "dtype") else np.asarray(t).dtype
        return np.asarray(r, dtype=dtype)
    return jax.tree.map(leaf, restored, target)


# ----------------------------------------------------------------------------------------------------------------
# The manager


class CheckpointManager:
    """Numbered, atomic checkpoints of a pytree plus JSON metadata in one directory.

    Args:
      directory: the checkpoint directory. For reading, a training workdir containing ``checkpoints/`` is
        accepted too.
      max_to_keep: the newest ``max_to_keep`` steps are kept; older ones are deleted after each successful save.
        None keeps every step.
      create: create ``directory`` when missing (for writing). With False, a missing directory raises
        FileNotFoundError.

    Examples:
      >>> with CheckpointManager("runs/a/checkpoints") as ckpt:
      ...     ckpt.save(100, {"params": params}, metadata={"model": "mlp"})
      ...     restored = ckpt.restore({"params": params})
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, create: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (or None to keep every checkpoint).")
        if create:
            self.directory = _abs(directory)
            os.makedirs(self.directory, exist_ok=True)
        else:
            self.directory = _resolve(directory)
        self.max_to_keep = max_to_keep
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=False,
            # Synchronous: save() returns once the step is complete and renamed into place.
            enable_async_checkpointing=False,
            # Temporary directories of killed runs are removed before the next save (never read).
            cleanup_tmp_directories=create,
            # Write <step>.orbax-checkpoint-tmp*/ and rename it when complete (atomic on POSIX filesystems).
            temporary_path_class=ocp_atomicity.AtomicRenameTemporaryPath,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()})

    # -- context manager ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Waits for pending work and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- listing ------------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Finished steps, ascending (temporary directories of unfinished saves are not steps)."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> str:
        """The directory of ``step``."""
        return os.path.join(self.directory, str(int(step)))

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                leftovers = [n for n in os.listdir(self.directory) if _TMP_MARKER in n]
                hint = (f" (only unfinished temporary directories {leftovers[:3]} from an interrupted save, "
                        f"which are ignored)" if leftovers else "")
                raise FileNotFoundError(f"no checkpoint in {self.directory!r}{hint}: train first, or pass the "
                                        f"directory that holds the numbered step directories.")
            return steps[-1]
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} not found in {self.directory!r}; available steps: "
                                    f"{steps or 'none'}. Pass one of these (or step=None for the latest).")
        return step

    def _corrupt(self, step: int, e: BaseException) -> CheckpointError:
        earlier = [s for s in self.all_steps() if s < step]
        fix = (f"delete {self.step_path(step)!r} to resume from step {earlier[-1]}, or restore an earlier step "
               f"with step={earlier[-1]} (available: {earlier})" if earlier else
               f"delete {self.step_path(step)!r} and start again (there is no earlier step)")
        return CheckpointError(f"checkpoint {self.step_path(step)!r} (step {step}) cannot be read; it is "
                               f"probably truncated or partly deleted ({_short(e)}). To continue: {fix}.")

    # -- writing ------------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None) -> str:
        """Writes ``state`` (and ``metadata``) as step ``step``, atomically.

        Call it in every process of a multi-process run (orbax coordinates them; each writes the shards of its
        devices); only process 0 writes ``DIR/metadata.json``.

        Args:
          step: a non-negative int, larger than every existing step.
          state: a pytree of arrays (dicts, lists, tuples, namedtuples, flax struct dataclasses).
          metadata: JSON-serialisable dict stored with the step and copied to ``DIR/metadata.json``.

        Returns:
          The path of the new step directory.

        Raises:
          ValueError: ``step`` is negative, or not after the latest existing step (steps are never overwritten).
          TypeError: ``metadata`` is not JSON-serialisable.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}.")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"cannot save step {step} in {self.directory!r}: step {latest} already exists there and "
                f"checkpoints are never overwritten. Save a later step, or use a fresh directory.")
        meta = jsonable(dict(metadata or {}))
        self._manager.save(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(meta)}), force=True)
        self._manager.wait_until_finished()
        if distributed.is_main_process():  # a plain file: one writer (orbax coordinated the step's own files)
            _write_json_atomic(os.path.join(self.directory, METADATA_FILE), dict(meta, step=step))
        return self.step_path(step)

    # -- reading ------------------------------------------------------------------------------------------------
    def stored_structure(self, step: int | None = None) -> Any:
        """The stored pytree of ``step`` (latest by default) as ``jax.ShapeDtypeStruct`` leaves.

        Raises:
          FileNotFoundError: no such step. CheckpointError: the step's metadata cannot be read.
        """
        step = self._check_step(step)
        try:
            tree = self._manager.item_metadata(step)[_STATE]
            tree = getattr(tree, "tree", tree)
            if tree is None:
                raise ValueError("no pytree metadata")
            return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
        except Exception as e:  # orbax/tensorstore raise many kinds; all mean "unreadable"
            raise self._corrupt(step, e) from e

    def restore(self, target: Any = None, step: int | None = None, *,
                sharding: jax.sharding.Sharding | None = None) -> Any:
        """Reads step ``step`` (latest by default).

        Call it in every process of a multi-process run when restoring global (multi-host) arrays.

        Args:
          target: a pytree like the saved one (e.g. the freshly initialised state, or its ``jax.eval_shape``).
            The result has its structure, leaf types and dtypes (``jax.Array`` and ``jax.ShapeDtypeStruct`` leaves
            give ``jax.Array``, with the target's sharding if it has one; numpy/Python leaves give numpy/Python).
            None restores the stored structure as nested dicts/lists of ``jax.Array`` on the default device.
          step: the step, or None for the latest.
          sharding: the sharding of every restored leaf, e.g. ``NamedSharding(mesh, PartitionSpec())`` to restore
            the state replicated on every device of ``mesh`` (as data-parallel training does), whatever devices
            wrote it. Every leaf then comes back as a ``jax.Array`` with this sharding (numpy/Python target leaves
            included; the target's own shardings are ignored). None: as described for ``target``.

        Returns:
          The restored pytree.

        Raises:
          FileNotFoundError: no checkpoint, or no such step.
          CheckpointMismatchError: the checkpoint's leaves or shapes differ from ``target``'s.
          CheckpointError: the step cannot be read (corrupt).
        """
        step = self._check_step(step)
        stored = self.stored_structure(step)
        if target is not None:
            lines = describe_mismatch(flat_shapes(stored), flat_shapes(target))
            if lines:
                raise CheckpointMismatchError(
                    f"checkpoint {self.step_path(step)!r} does not match the structure it is restored into:\n"
                    + "\n".join(lines) + "\nIt was probably written for another model or optimizer "
                    "configuration; use a matching model/config, or another directory.")
        item = _restore_item(stored if target is None else target, sharding)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(
                item)}))[_STATE]
        except Exception as e:  # orbax/tensorstore raise many kinds; all mean "unreadable"
            raise self._corrupt(step, e) from e
        if target is None:
            return restored
        if sharding is not None:  # every leaf stays a jax.Array with the requested sharding
            return jax.tree.map(lambda r, t: r if r.dtype == _dtype(t) else r.astype(_dtype(t)), restored, target)
        return _cast_like(restored, target)

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata saved with ``step`` (latest by default).

        Falls back to ``DIR/metadata.json`` when there is no step (e.g. all steps were deleted by hand).

        Raises:
          FileNotFoundError: no checkpoint and no metadata file. CheckpointError: unreadable metadata.
        """
        if step is None and not self.all_steps():
            return _read_metadata_file(self.directory)
        step = self._check_step(step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))[
                _METADATA]
        except Exception as e:  # orbax/tensorstore raise many kinds; all mean "unreadable"
            raise self._corrupt(step, e) from e
        if meta is None:
            raise self._corrupt(step, ValueError("metadata item is empty"))
        return dict(meta, step=step)


def _read_metadata_file(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint and no {METADATA_FILE} in {directory!r}: pass the directory a "
                                f"training run wrote (WORKDIR/{CHECKPOINT_SUBDIR} or WORKDIR).")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path!r} cannot be read ({_short(e)}); delete it (it is a copy of the newest "
                              f"step's metadata) or restore it from a step directory.") from e


# ----------------------------------------------------------------------------------------------------------------
# Function API


def save(directory: str | os.PathLike, step: int, state: Any, metadata: Mapping[str, Any] | None = None, *,
         max_to_keep: int | None = 3) -> str:
    """Saves ``state`` as step ``step`` in ``directory`` atomically; keeps the newest ``max_to_keep`` steps.

    Args:
      directory: the checkpoint directory (created when missing).
      step: larger than every existing step (steps are never overwritten).
      state: a pytree of arrays.
      metadata: JSON-serialisable dict, saved with the step and copied to ``directory/metadata.json``.
      max_to_keep: how many steps to keep (None: all).

    Returns:
      The path of the new step directory.
    """
    with CheckpointManager(directory, max_to_keep=max_to_keep) as mgr:
        return mgr.save(step, state, metadata)


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest finished step in ``directory`` (or its ``checkpoints/``); None if there is none or no directory.

    Temporary directories of interrupted saves are not steps.
    """
    try:
        path = _resolve(directory)
    except FileNotFoundError:
        return None
    with CheckpointManager(path, create=False) as mgr:
        return mgr.latest_step()


def restore(directory: str | os.PathLike, target: Any = None, step: int | None = None, *,
            sharding: jax.sharding.Sharding | None = None) -> Any:
    """Restores step ``step`` (latest by default) of ``directory`` into the structure and dtypes of ``target``.

    Args:
      directory: the checkpoint directory, or a training workdir containing ``checkpoints/``.
      target: a pytree like the saved one; None restores the stored structure (nested dicts/lists of
        ``jax.Array``).
      step: the step, or None for the latest.
      sharding: the sharding of every restored leaf (e.g. ``NamedSharding(mesh, PartitionSpec())``: replicated
        over ``mesh``); see :meth:`CheckpointManager.restore`.

    Returns:
      The restored pytree.

    Raises:
      FileNotFoundError: missing directory, no checkpoint or no such step.
      CheckpointMismatchError: structure or shapes differ from ``target``.
      CheckpointError: the step is corrupt.
    """
    with CheckpointManager(directory, create=False) as mgr:
        return mgr.restore(target, step, sharding=sharding)


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The metadata saved with step ``step`` (latest by default), plus ``"step"``.

    For a training checkpoint: ``{"model": name, "model_config": {...}, "input_shape": [...], "num_classes",
    "dataset": name, "train_config": {...}, "loss": name, "step", "epoch", ...}`` (see
    :func:`jaxnoise.train.train`).

    Args:
      directory: the checkpoint directory, or a training workdir containing ``checkpoints/``.
      step: the step, or None for the latest.
    """
    with CheckpointManager(directory, create=False) as mgr:
        return mgr.read_metadata(step)


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any] | None = None) -> str:
    """Saves final model variables ``{"params", "batch_stats"}`` as a one-step checkpoint directory (step 0).

    Args:
      path: a new or empty directory.
      variables: ``{"params": ..., "batch_stats": ...}``.
      metadata: JSON-serialisable dict (model name/config, dataset, ...), readable with :func:`read_metadata`.

    Returns:
      The path of the written step directory.

    Raises:
      FileExistsError: ``path`` exists and is not empty (nothing is overwritten).
      ValueError: ``variables`` lacks ``params``, or ``path`` names a ``.npz`` file.
    """
    path = _abs(path)
    if path.endswith(".npz"):
        raise ValueError(f"save_variables writes an orbax checkpoint directory, not a .npz file: pass a directory "
                         f"path instead of {path!r}.")
    if "params" not in variables:
        raise ValueError(f"variables must be {{'params': ..., 'batch_stats': ...}}, got keys {sorted(variables)}.")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path!r} already exists and is not empty; save_variables never overwrites. Choose "
                              f"a new directory or delete this one.")
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return save(path, 0, state, metadata, max_to_keep=None)


NPZ_FORMAT = "jaxnoise.variables/1"


def save_npz(path: str | os.PathLike, variables: Mapping[str, Any], metadata: Mapping[str, Any] | None = None, *,
             overwrite: bool = False) -> str:
    """Saves model variables as one ``.npz`` file (small trained weights to commit beside results): arrays under
    ``params/<path>`` and ``batch_stats/<path>``, and ``metadata`` (model name and config, ...) as JSON in
    ``__jaxnoise__``. Written atomically; an existing file is refused unless ``overwrite``. Read it back with
    :func:`load_variables`."""
    from flax import traverse_util  # noqa: PLC0415
    path = _abs(path)
    if not path.endswith(".npz"):
        raise ValueError(f"save_npz writes a .npz file; {path!r} does not end with .npz.")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; save_npz never overwrites unless overwrite=True.")
    arrays = {}
    for collection in ("params", "batch_stats"):
        for k, v in traverse_util.flatten_dict(dict(variables.get(collection, {}) or {}), sep="/").items():
            arrays[f"{collection}/{k}"] = np.asarray(v)
    arrays["__jaxnoise__"] = np.asarray(json.dumps({"format": NPZ_FORMAT, **dict(metadata or {})}))
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays), binary=True)
    return path


def read_npz_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a :func:`save_npz` file, or None for anything else (a PyTorch state dict, or a file that is
    not a readable ``.npz``: its loader then says what is wrong with it)."""
    try:
        with np.load(_abs(path), allow_pickle=False) as z:
            return json.loads(str(z["__jaxnoise__"])) if "__jaxnoise__" in z.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def _load_jaxnoise_npz(path: str, model: Any) -> dict[str, Any]:
    from flax import traverse_util  # noqa: PLC0415
    with np.load(path, allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files if k != "__jaxnoise__"}
    out = {}
    for collection in ("params", "batch_stats"):
        sub = {k[len(collection) + 1:]: v for k, v in flat.items() if k.startswith(collection + "/")}
        out[collection] = traverse_util.unflatten_dict(sub, sep="/") if sub else {}
    if model is not None:
        abstract = jax.eval_shape(model.init, jax.random.key(0))
        wanted = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
        lines = describe_mismatch(flat_shapes(out), flat_shapes(wanted))
        if lines:
            raise CheckpointMismatchError(f"{path!r} does not match model {model.name} ({model.config}):\n"
                                          + "\n".join(lines) + "\nCheck read_npz_metadata(path)['model'].")
    return out


def load_variables(path: str | os.PathLike, model: Any = None, step: int | None = None) -> dict[str, Any]:
    """Loads model variables from a checkpoint directory or a PyTorch ``.npz`` state dict.

    Args:
      path: one of
        * a directory written by :func:`jaxnoise.train.train` (``WORKDIR`` or ``WORKDIR/checkpoints``) or by
          :func:`save_variables`: the latest step (or ``step``) is read and its ``params``/``batch_stats``
          returned;
        * a ``.npz`` file written by :func:`save_npz` (``model`` optional: checked when given), or with a
          PyTorch-named state dict (``jaxnoise.models.load_torch_npz``; needs ``model``).
      model: the :class:`~jaxnoise.models.Model`. Required for ``.npz``; for directories it is optional and, when
        given, the checkpoint is checked against it.
      step: checkpoint step (directories only); None for the latest.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of numpy arrays.

    Raises:
      FileNotFoundError: ``path`` does not exist or holds no checkpoint.
      CheckpointMismatchError: the checkpoint does not match ``model``.
      jaxnoise.models.WeightsMismatchError: the ``.npz`` does not match ``model`` or is unreadable.
      CheckpointError: the checkpoint is corrupt or is not a model checkpoint.
      ValueError: a ``.npz`` without ``model``.
    """
    fspath = _abs(path)
    if os.path.isfile(fspath) or fspath.endswith(".npz"):
        if not fspath.endswith(".npz"):
            raise ValueError(f"{fspath!r} is a file but not a .npz state dict; pass a .npz file or a checkpoint "
                             f"directory.")
        if os.path.isfile(fspath) and read_npz_metadata(fspath) is not None:   # written by save_npz
            return _load_jaxnoise_npz(fspath, model)
        if model is None:
            raise ValueError(f"loading the PyTorch state dict {fspath!r} needs the model: "
                             f"load_variables(path, model=get_model(name)).")
        from jaxnoise.models import load_torch_npz  # noqa: PLC0415 (models import jax-heavy modules)
        return load_torch_npz(model, fspath)
    with CheckpointManager(fspath, create=False) as mgr:
        step = mgr._check_step(step)
        stored = mgr.stored_structure(step)
        if not isinstance(stored, Mapping) or "params" not in stored:
            raise CheckpointError(f"checkpoint {mgr.step_path(step)!r} holds no 'params' (top-level keys: "
                                  f"{sorted(stored) if isinstance(stored, Mapping) else type(stored).__name__}); "
                                  f"it is not a model checkpoint of jaxnoise.")
        if model is not None:
            abstract = jax.eval_shape(model.init, jax.random.key(0))
            wanted = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
            have = {"params": stored["params"], "batch_stats": stored.get("batch_stats", {})}
            lines = describe_mismatch(flat_shapes(have), flat_shapes(wanted))
            if lines:
                raise CheckpointMismatchError(
                    f"checkpoint {mgr.step_path(step)!r} does not match model {model.name} ({model.config}):\n"
                    + "\n".join(lines) + "\nCheck the model name/config against read_metadata(path)['model'].")
        restored = mgr.restore(None, step)
    # numpy, like load_torch_npz: the same kind of result whatever the source.
    return jax.tree.map(np.asarray, {"params": restored["params"],
                                     "batch_stats": restored.get("batch_stats", {}) or {}})


DELTA_FORMAT = "jaxnoise.state-delta/1"


def _flat_leaves(tree: Any) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _fingerprint(leaves: Mapping[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``leaves``, in order."""
    h = hashlib.sha256()
    for k, v in leaves.items():
        h.update(f"{k}|{v.dtype.str}|{v.shape}|".encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def save_delta(path: str | os.PathLike, tree: Any, base: Any, metadata: Mapping[str, Any] | None = None) -> int:
    """Saves the leaves of the pytree ``tree`` that differ bitwise from those of ``base`` (same structure) as one
    ``.npz`` file, replacing ``path`` atomically; :func:`load_delta` puts them back into ``base``.

    A compact, portable checkpoint: a training state whose frozen parameters and untouched optimizer slots equal
    the step-0 state's stores only what training changed (for denoising blocks on a frozen backbone, the blocks
    and their optimizer slots), small enough to commit beside results so a run resumes in a new clone.

    Returns:
      The number of leaves written.

    Raises:
      ValueError: ``path`` does not end with ``.npz``, or ``tree`` and ``base`` differ in structure or leaf shapes.

    Examples:
      >>> base = {"w": np.zeros(3), "b": np.ones(2)}
      >>> save_delta("/tmp/delta.npz", {"w": np.arange(3.0), "b": np.ones(2)}, base)
      1
      >>> load_delta("/tmp/delta.npz", base)[0]["w"]
      array([0., 1., 2.])
    """
    path = _abs(path)
    if not path.endswith(".npz"):
        raise ValueError(f"save_delta writes a .npz file; {path!r} does not end with .npz.")
    have, ref = _flat_leaves(tree), _flat_leaves(base)
    lines = describe_mismatch({k: (v.shape, v.dtype) for k, v in have.items()},
                              {k: (v.shape, v.dtype) for k, v in ref.items()})
    if lines:
        raise ValueError("save_delta: the tree and its base differ in structure:\n" + "\n".join(lines))
    arrays = {k: v for k, v in have.items()
              if v.dtype != ref[k].dtype or v.tobytes() != np.ascontiguousarray(ref[k]).tobytes()}
    header = {"format": DELTA_FORMAT, "n_leaves": len(have), "base_sha256": _fingerprint(ref),
              "metadata": jsonable(dict(metadata or {}))}
    arrays = {f"leaf/{k}": v for k, v in arrays.items()}
    arrays["__jaxnoise__"] = np.asarray(json.dumps(header))
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays), binary=True)
    return len(arrays) - 1


def read_delta_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` a :func:`save_delta` file was written with.

    Raises:
      FileNotFoundError: no such file. CheckpointError: not a readable delta file.
    """
    return _read_delta(_abs(path), arrays=False)[0]


def _read_delta(path: str, arrays: bool) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no state delta at {path!r}.")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["__jaxnoise__"]))
            leaves = {k[len("leaf/"):]: z[k] for k in z.files if k.startswith("leaf/")} if arrays else {}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path!r} cannot be read as a state delta ({_short(e)}); delete it to start the "
                              f"run over, or restore it from version control.") from e
    if header.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"{path!r} is not a state delta (format {header.get('format')!r}, expected "
                              f"{DELTA_FORMAT!r}).")
    return dict(header.get("metadata") or {}), leaves, header


def load_delta(path: str | os.PathLike, base: Any) -> tuple[Any, dict[str, Any]]:
    """``(tree, metadata)``: ``base`` with the leaves stored by :func:`save_delta` put in (numpy arrays), and the
    metadata saved with them.

    Raises:
      FileNotFoundError: no such file. CheckpointError: unreadable file.
      CheckpointMismatchError: the file belongs to a tree of another structure (a leaf ``base`` lacks, another
        shape or dtype, or another number of leaves), or was taken against another base (other values of the
        leaves it does not store, e.g. other pretrained weights).
    """
    path = _abs(path)
    meta, leaves, header = _read_delta(path, arrays=True)
    n_leaves = int(header.get("n_leaves", -1))
    flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    names = [jax.tree_util.keystr(p) for p, _ in flat]
    ref = dict(zip(names, (np.asarray(x) for _, x in flat)))
    lines = [f"  {k}: not in the tree it is restored into" for k in leaves if k not in ref]
    lines += [f"  {k}: stored {v.shape} {v.dtype}, wanted {ref[k].shape} {ref[k].dtype}"
              for k, v in leaves.items() if k in ref and (v.shape != ref[k].shape or v.dtype != ref[k].dtype)]
    if n_leaves != len(ref):
        lines.append(f"  stored from a tree of {n_leaves} leaves, restored into one of {len(ref)}")
    if lines:
        raise CheckpointMismatchError(f"the state delta {path!r} does not fit the tree it is restored into:\n"
                                      + "\n".join(lines[:_MAX_LISTED]) + "\nDelete it to start the run over.")
    if header.get("base_sha256") != _fingerprint(ref):
        raise CheckpointMismatchError(f"the state delta {path!r} was taken against another base (the values of the "
                                      f"leaves it does not store differ, e.g. other pretrained weights or another "
                                      f"initialisation); restoring it would mix two runs. Delete it to start the "
                                      f"run over, or restore into the base it was saved against.")
    return jax.tree_util.tree_unflatten(treedef, [leaves.get(k, ref[k]) for k in names]), meta


__all__ = ["CHECKPOINT_SUBDIR", "METADATA_FILE", "CheckpointError", "CheckpointManager", "CheckpointMismatchError",
           "DELTA_FORMAT", "latest_step", "load_delta", "load_variables", "read_delta_metadata", "read_metadata",
           "read_npz_metadata", "restore", "save", "save_delta", "save_npz", "save_variables"]
