"""Files written whole or not at all.

Every file xpnet writes in one go (checkpoints, a sweep's trials.csv, summary.json and
plots, a benchmark's JSON report, a saved figure, the CIFAR-10 archive and its batch files)
goes through :func:`atomic_write`: the
file is written under a temporary name that carries the writer's process id, flushed to
disk, then renamed over the target. A crash, a full disk or an error while writing leaves
the old file (or none) in place, never part of the new one. A later write into the same
folder removes the temporaries of processes that no longer exist (a writer killed
mid-write), never those of a writer that is still running.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["atomic_write", "remove_stale_temporaries", "unwritable_reason", "what_stands_at"]

_TMP_MARK = ".tmp-"


def _temporary_name(path: str) -> str:
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{base}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


# Exactly the names _temporary_name makes: the cleanup runs in any folder a file is written to
# (a home folder, /tmp), where another program's ".notes.tmp-123" is not ours to delete.
_TEMPORARY = re.compile(rf"\..+{re.escape(_TMP_MARK)}(\d+)-[0-9a-f]{{8}}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(folder: str) -> list:
    """Delete the temporary files in ``folder`` left by writers that no longer run; returns their paths."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_exists(pid):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except FileNotFoundError:  # another writer cleaned it first
            pass
    return removed


def unwritable_reason(path) -> str | None:
    """Why no file could be written at ``path``, or None when it may be: what stands there is
    a read-only file or no file at all (a folder, a pipe), a file stands where a folder on its
    path should be, or the nearest folder on it that exists is not writable
    (:func:`atomic_write` creates the missing ones). For checks before any work."""
    path = os.path.realpath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path):
        kind = what_stands_at(path)
        if kind != "a file":
            return f"{path} is {kind}, not a file"
        if not os.access(path, os.W_OK):
            return f"{path} is read-only"
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is {what_stands_at(folder)}, not a folder"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable"
    return None


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for the ``with`` block, then put it at ``path``.

    When the block ends normally the file is flushed, synced and renamed over ``path`` (the
    missing folders on the way are created first); when it raises, the temporary is removed and
    ``path`` is as it was. As with :func:`open`, a link is written through (the file it points
    to is replaced, the link stays), a file that exists keeps its permissions (a new one gets
    those the umask allows), and one that the user may not write is refused with a
    PermissionError, where the rename alone would replace it. A pipe or a device (``/dev/null``)
    is refused with an OSError: the rename would replace it with a plain file.

    Args:
        path: where the file goes (str or path-like, ``~`` not expanded: callers check paths first).
        mode: "wb" for bytes, "w" for text (UTF-8).
        newline: as for :func:`open` in text mode ("" for the csv module).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.path.realpath(os.fspath(path))
    existing = _existing_mode(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = _temporary_name(path)
    # os.open with 0o666 lets the umask decide a new file's permissions (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if existing is not None:
            os.chmod(fd, stat.S_IMODE(existing))
        encoding = None if mode == "wb" else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _existing_mode(path: str) -> int | None:
    """The mode of the regular file at ``path``, None when there is none; PermissionError for a
    read-only file, OSError for a pipe or device."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    kind = _kind(mode)
    if kind == "a file":
        # Renaming needs only the folder's permission: a file made read-only to keep it is kept, as open() keeps it.
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "the file is read-only; make it writable to replace it", path)
        return mode
    if kind == "a folder":  # the rename fails on it, as open() fails on a folder
        return None
    raise OSError(
        errno.EINVAL,
        f"not a regular file ({kind}): this file is written whole under a temporary name and renamed over it",
        path,
    )


def what_stands_at(path) -> str:
    """What the existing ``path`` is, for messages: "a file", "a folder", "a pipe", "a socket" or "a device"."""
    return _kind(os.stat(path).st_mode)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def _fsync_folder(folder):
    """Make the rename itself durable (a power cut after it keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
