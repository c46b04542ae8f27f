"""The run directory's file system: HDF5 opens, atomic writes (temporary file, fsync, rename),
room on the disk checked before a write, and one-sentence reasons for OS and HDF5 errors."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

import h5py

H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError)


def open_h5(path: str | os.PathLike[str], mode: str, **options: object) -> h5py.File:
    """``h5py.File`` without HDF5's own file locking (``options`` go to ``h5py.File``).

    The single writer is guaranteed by ``RunLock``; with HDF5 locking off, h5py/pandas can
    read a live run's file, and file systems without lock support (Lustre, some NFS) work.
    """
    try:
        return h5py.File(path, mode, locking=False, **options)
    except (TypeError, ValueError):  # HDF5 built without the locking switch
        return h5py.File(path, mode, **options)


def create_temp(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file ``folder/<prefix><random><suffix>`` with the mode the umask allows.

    (``tempfile.mkstemp`` makes 0600 files, which a group's project directory cannot read
    once they are renamed into place.)
    """
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {folder}")


def fsync_path(path: Path) -> None:
    """fsync a file (opened read-write) or, for a directory, its entries; errors on dirs ignored."""
    if path.is_dir():
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SPACE_PROBE = ".space-probe"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def ensure_space(folder: Path, nbytes: int) -> None:
    """Raise ``OSError`` (ENOSPC, EDQUOT) unless ``nbytes`` can be allocated in ``folder`` now.

    HDF5 must never meet a full disk: after a failed write its handle cannot be closed cleanly
    (tracebacks, then a segfault at exit) and the file may be left unreadable. So each write
    first allocates its size in a hidden probe file (this sees quotas, unlike statvfs), then
    frees it for HDF5. A file system without ``fallocate`` support is not checked.
    """
    probe = folder / SPACE_PROBE
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        os.posix_fallocate(fd, 0, max(1, int(nbytes)))
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise
    finally:
        os.close(fd)
        remove_quietly(probe)


def reason(exc: BaseException) -> str:
    """The short human reason of an OS or HDF5 error ("No space left on device")."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    text = str(exc)
    if m := re.search(r"errno = (\d+)", text):  # HDF5 reports the OS error inside its message
        return os.strerror(int(m.group(1)))
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- checksums


def write_atomically(path: Path, fill: Callable[[Path], None], nbytes: int) -> None:
    """Write ``path`` through ``fill(tmp)`` on a temporary file beside it, fsync, rename.

    The disk must first hold ``nbytes`` (``ensure_space``); on any failure the temporary file
    is removed and ``path`` is as it was.
    """
    ensure_space(path.parent, nbytes)
    tmp: Path | None = create_temp(path.parent, f".{path.name}.", ".tmp")
    try:
        fill(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        tmp = None
        fsync_path(path.parent)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
