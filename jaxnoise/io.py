"""Safe file output: atomic files, result sets replaced as one unit, never overwritten silently.

* :func:`write_text_atomic`: one file, written to a temporary file beside it and renamed into place.
* :class:`ResultSet`: a directory of result files (JSON, markdown, plot) that appears, or replaces an earlier
  one, as a whole: the files are written into a staging directory beside the target, which is then renamed
  (swapped, when replacing) into place. A failure half-way leaves the earlier set untouched. An existing set is
  replaced only with ``overwrite=True``; a directory holding anything that is not a result set, or a read-only
  file, is never replaced; a set written by another run while this one ran is never replaced either (this run's
  files are kept beside it and named in the error).
* Files and directories are created with the user's umask (``tempfile`` would make them private).

Examples:
  >>> out = ResultSet("runs/sweep_r20", overwrite=False)     # checks the location first (before any work)
  >>> ...                                                     # the expensive evaluation
  >>> with out.staging() as d:                                # write every file into d ...
  ...     write_text_atomic(os.path.join(d, "results.json"), text)
  >>> # ... and on leaving the block the set is in place, all files at once
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["OutputError", "OutputExistsError", "OutputConflictError", "RESULT_FILES", "ResultSet", "append_lines",
           "default_file_mode", "umask", "write_atomic", "write_text_atomic"]

# The files jaxnoise writes into a result directory; a directory holding only these (and hidden files) is a
# result set that --overwrite may replace.
RESULT_FILES = frozenset({"results.json", "results.md", "accuracy_vs_eta.png", "sensitivity.png", "train"})


class OutputError(ValueError):
    """An output location that cannot be used (a file where a directory is needed, not writable, ...)."""


class OutputExistsError(OutputError):
    """The output location already holds results, and replacing them was not asked for."""


class OutputConflictError(OutputError):
    """Another run wrote the output location while this one ran; this run's files were kept elsewhere."""

    def __init__(self, message: str, kept_at: str):
        super().__init__(message)
        self.kept_at = kept_at


def umask() -> int:
    """The process's file-creation mask (read without changing it where the OS allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def _chmod_default(path: str, directory: bool = False) -> None:
    """Gives ``path`` the mode a plain ``open``/``mkdir`` would have (0o666 / 0o777 minus the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def append_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Appends ``lines`` to ``path`` (created with the umask's mode when missing) and fsyncs it."""
    with open(path, "a") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = False) -> str:
    """Calls ``write(f)`` on a temporary file in ``path``'s folder, fsyncs it, then renames it over ``path``.

    Creates missing folders. A crash leaves either the old file or the new one, never a mixture. The file gets
    the user's umask (not the private mode of a temporary file).

    Returns:
      The path written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """:func:`write_atomic` of ``text``."""
    return write_atomic(path, lambda f: f.write(text))


# ----------------------------------------------------------------------------------------------------------------
# Directory renames: no-replace and exchange (Linux renameat2), with portable fallbacks

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the call is unavailable here (not Linux, old libc/kernel, or a
    filesystem without the flag)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        fn = ctypes.CDLL(libc_name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), dst)


def _rename_noreplace(src: str, dst: str) -> None:
    """Renames directory ``src`` to ``dst``; FileExistsError when ``dst`` exists (even as an empty directory)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", dst) from None
        raise
    if os.path.lexists(dst):  # portable fallback: a small window remains between the check and the rename
        raise FileExistsError(errno.EEXIST, "exists", dst)
    os.rename(src, dst)


def _exchange(a: str, b: str) -> None:
    """Swaps directories ``a`` and ``b`` atomically where the OS allows; otherwise by two renames (a crash between
    them leaves ``b``'s old contents at a ``.replaced-*`` path beside it, never deleted)."""
    if _renameat2(a, b, _RENAME_EXCHANGE):
        return
    aside = f"{b}.replaced-{os.getpid()}"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


# ----------------------------------------------------------------------------------------------------------------
# Result sets


def _fingerprint(path: str) -> tuple | None:
    """What the target looks like now: None when absent, else its entries with their inode and mtime."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return ("file", os.stat(path).st_ino)
    out = []
    for name in sorted(os.listdir(path)):
        st = os.lstat(os.path.join(path, name))
        out.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _visible(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


class ResultSet:
    """An output directory written as one unit (see the module docstring).

    Construct it before the expensive work: it checks the location at once and raises :class:`OutputError` /
    :class:`OutputExistsError` with the fix. Then write every file inside :meth:`staging`.

    Args:
      path: the result directory (``--out``).
      overwrite: replace an existing result set (``--overwrite``). Never replaces a directory that holds
        anything but result files, nor one with a read-only file.
      flag: how the location is named in messages (``"--out"``).
      allowed: the entry names a replaceable result set may hold (default :data:`RESULT_FILES`).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out",
                 allowed: Iterable[str] = RESULT_FILES):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.overwrite = bool(overwrite)
        self.flag = flag
        self.allowed = frozenset(allowed)
        self._checked = self.check()

    def check(self) -> tuple | None:
        """Raises OutputError when the set cannot be written; returns the target's fingerprint."""
        p, flag = self.path, self.flag
        if os.path.lexists(p) and not os.path.isdir(p):
            raise OutputError(f"{flag} {p} is a file, not a directory: give a directory path for the result files.")
        parent = _nearest_existing(os.path.dirname(p))
        if not os.path.isdir(parent):
            raise OutputError(f"{flag} {p}: {parent} is a file, so the directory cannot be created; choose "
                              f"another {flag}.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {p}: {parent} is not writable; choose a writable {flag}.")
        if os.path.isdir(p):
            entries = _visible(os.listdir(p))
            if entries:
                if not self.overwrite:
                    raise OutputExistsError(
                        f"{flag} {p} already holds results ({', '.join(entries[:4])}"
                        f"{', ...' if len(entries) > 4 else ''}); they are never replaced silently: pass "
                        f"--overwrite to replace them, or choose another {flag}.")
                foreign = [n for n in entries if n not in self.allowed]
                if foreign:
                    raise OutputError(
                        f"{flag} {p} holds files that are not jaxnoise results ({', '.join(foreign[:4])}); "
                        f"--overwrite replaces whole result directories only: choose another {flag}.")
                locked = [n for n in entries if not _writable_tree(os.path.join(p, n))]
                if locked:
                    raise OutputError(
                        f"{flag} {p}: {', '.join(locked[:4])} is read-only (protected): make it writable "
                        f"(chmod u+w) to replace it, or choose another {flag}.")
            if not os.access(p, os.W_OK | os.X_OK) or not os.access(os.path.dirname(p), os.W_OK | os.X_OK):
                raise OutputError(f"{flag} {p} is not writable; choose a writable {flag}.")
        return _fingerprint(p)

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """A fresh directory for the new files; on a normal exit it becomes :attr:`path` (replacing the earlier
        set when allowed), on an exception it is deleted and the earlier set is untouched."""
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(self.path)}.staging-")
        _chmod_default(tmp, directory=True)
        try:
            yield tmp
            self._commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, tmp: str) -> None:
        now = _fingerprint(self.path)
        if now != self._checked:
            kept = self._keep(tmp)
            raise OutputConflictError(
                f"{self.flag} {self.path} was written by another run while this one ran; it was left as it is and "
                f"this run's results were kept in {kept}.", kept)
        if now is None or now == ():
            if now == ():
                os.rmdir(self.path)  # an empty directory: nothing to keep
            try:
                _rename_noreplace(tmp, self.path)
            except FileExistsError:
                kept = self._keep(tmp)
                raise OutputConflictError(
                    f"{self.flag} {self.path} was created by another run while this one ran; it was left as it is "
                    f"and this run's results were kept in {kept}.", kept) from None
            return
        _exchange(tmp, self.path)  # tmp now holds the replaced set
        shutil.rmtree(tmp, ignore_errors=True)

    def _keep(self, tmp: str) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        kept = f"{self.path}.conflict-{stamp}-{os.getpid()}"
        os.rename(tmp, kept)
        return kept


def _writable_tree(path: str) -> bool:
    """Whether ``path`` (and, for a directory, everything in it) may be replaced: none of it is read-only.

    Judged by the owner's write bit, not by ``os.access``: root may write anything, but a file its owner made
    read-only is a file the user protected."""
    def writable(p: str) -> bool:
        return bool(os.lstat(p).st_mode & stat.S_IWUSR)
    if os.path.islink(path) or not os.path.isdir(path):
        return writable(path)
    for root, _, files in os.walk(path):
        if not writable(root) or not all(writable(os.path.join(root, n)) for n in files):
            return False
    return True
