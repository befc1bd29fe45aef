"""Training workdirs: one run per directory at a time, and files that respect the umask.

* :func:`workdir_lock` holds an exclusive ``fcntl.flock`` on ``WORKDIR/.jaxnoise.lock`` for as long as a run
  trains into the directory, so that a second run (another process, or a second call in the same process) is
  refused with :class:`WorkdirLockedError` instead of interleaving its metrics with the first one's and deleting
  its checkpoints. The file names the owner (``{"pid", "host", "started", "command"}``) for the error message; the
  flock, not the file, decides: a lock file whose flock nobody holds (its process died) is stale and taken over.
* :class:`WorkdirError` (a ``ValueError``) is raised for a workdir whose contents would be destroyed or mixed up
  by training into it; :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised by
  :func:`jaxnoise.train.train` after a Ctrl-C, once the last completed step is checkpointed.
* Files written by a run respect the umask (:mod:`jaxnoise.io`).

Only the standard library is imported here (no JAX), so the lock is cheap to take from any process.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

LOCK_FILE = ".jaxnoise.lock"


class WorkdirError(ValueError):
    """A workdir cannot be trained into as asked (it holds history without checkpoints, another run, ...)."""


class WorkdirLockedError(WorkdirError):
    """Another run (process, or call in this process) holds the workdir's lock.

    Attributes:
      workdir: the workdir.
      path: the lock file.
      owner: the lock file's record of the owner (``pid``, ``host``, ``started``, ``command``); ``{}`` when it
        could not be read (the owner was still writing it).
    """

    def __init__(self, message: str, *, workdir: str, path: str, owner: dict[str, Any]):
        super().__init__(message)
        self.workdir, self.path, self.owner = workdir, path, owner

    def __reduce__(self):  # picklable (e.g. across multiprocessing) despite the keyword-only arguments
        return _rebuild_locked, (str(self), self.workdir, self.path, self.owner)


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C); the last completed step was checkpointed when ``saved``.

    Attributes:
      step: the number of steps done (the step of the checkpoint a re-run resumes from when ``saved``).
      workdir: the workdir.
      saved: whether a checkpoint of ``step`` is in ``workdir/checkpoints`` (written now, or before).
    """

    def __init__(self, step: int, workdir: str, saved: bool = True, message: str | None = None):
        if message is None:
            # (checkpoints/: jaxnoise.checkpoint.CHECKPOINT_SUBDIR, not imported here: it pulls in orbax)
            message = (f"interrupted at step {step}; checkpoint saved in {os.path.join(workdir, 'checkpoints')}; "
                       f"re-run the same command to resume")
        super().__init__(message)
        self.step, self.workdir, self.saved = int(step), workdir, bool(saved)

    def __reduce__(self):
        return type(self), (self.step, self.workdir, self.saved, str(self))


def _rebuild_locked(message: str, workdir: str, path: str, owner: dict[str, Any]) -> WorkdirLockedError:
    return WorkdirLockedError(message, workdir=workdir, path=path, owner=owner)


# ----------------------------------------------------------------------------------------------------------------
# The lock


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 1 << 16, 0)
        owner = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}, "
            f"command {owner.get('command', '?')!r}")


def _same_file(fd: int, path: str) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one its owner unlinked meanwhile)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, *,
                 notify: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Holds the exclusive lock of ``workdir`` for the duration of the ``with`` block.

    Creates ``workdir/.jaxnoise.lock`` holding ``{"pid", "host", "started" (UTC ISO 8601), "command"
    (sys.argv joined)}`` and holds ``fcntl.flock(LOCK_EX | LOCK_NB)`` on it; on exit (normal, exception or
    KeyboardInterrupt) the file is removed and the flock released. flock is held per open file description, so a
    second ``workdir_lock`` on the same directory in the same process is refused too.

    A lock file whose flock nobody holds was left by a process that died: it is taken over, with one notice line
    naming that owner (also when the file names another host: on a local filesystem the flock is the truth).
    On a filesystem without flock support the run goes on unlocked, with a notice.

    Args:
      workdir: the directory (created when missing).
      notify: receives the one-line notices (stale lock taken over, no flock support); ``print`` by default.

    Yields:
      This lock's owner record.

    Raises:
      WorkdirLockedError: another process, or another call in this process, holds the lock; the message names
        the owner (pid, host, start time, command).
      WorkdirError: the lock file cannot be opened (permissions).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd, created, unlocked = -1, True, False
    for _ in range(100):  # retried only when the file was removed or replaced between open and flock
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except FileExistsError:
            created = False
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            except PermissionError as e:
                raise WorkdirError(f"cannot open the lock file {path} ({e}): train into a --workdir you can "
                                   f"write to.") from e
        except PermissionError as e:
            raise WorkdirError(f"cannot create the lock file {path} ({e}): train into a --workdir you can "
                               f"write to.") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise _locked_error(workdir, path, owner) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            notify(f"{workdir}: cannot lock the workdir ({e}; the filesystem may not support flock); training "
                   f"without the lock: do not start a second run into this workdir.")
            unlocked = True
            break
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous owner removed (or replaced) the file between our open and flock: again
    else:
        raise WorkdirError(f"could not take the lock {path}: it was replaced 100 times in a row; is another "
                           f"program deleting it?")
    if unlocked:
        yield {}
        return

    try:
        stale = {} if created else _read_owner(fd)
        if stale:  # (an empty file is one whose creator is just now taking its flock: no notice)
            if stale.get("host", socket.gethostname()) != socket.gethostname():
                notify(f"{workdir}: the lock file names {_describe(stale)}, another host, but nobody holds its "
                       f"flock: taking it over (if that host still trains into this directory over a "
                       f"filesystem without shared flock, stop one of the runs).")
            else:
                notify(f"{workdir}: taking over the stale lock of {_describe(stale)}, which no longer holds it "
                       f"(that process has exited).")
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        yield owner
    finally:
        # Removed while still locked, then unlocked: a process that opened the old file meanwhile finds it
        # unlinked once it has the flock (_same_file) and starts over with a new file.
        if _same_file(fd, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)


def _locked_error(workdir: str, path: str, owner: dict[str, Any]) -> WorkdirLockedError:
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        who = f"this process ({_describe(owner)})"
    elif owner:
        who = f"another run: {_describe(owner)}"
    else:
        who = "another run (which had not yet written its name into the lock file)"
    return WorkdirLockedError(f"workdir {workdir} is in use by {who} (lock file {path}); wait for that run to "
                              f"finish, or use another --workdir.", workdir=workdir, path=path, owner=owner)


__all__ = ["LOCK_FILE", "TrainingInterrupted", "WorkdirError", "WorkdirLockedError", "workdir_lock"]
