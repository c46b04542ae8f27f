"""The run-directory lock: two live runs never share a directory; the kernel drops the lock when its
holder dies, so a lock file left by a killed job never blocks a resume."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import warnings
from pathlib import Path
from types import TracebackType

from fdcr_mpi.errors import UserError
from fdcr_mpi.store.disk import reason


class RunLock:
    """Exclusive ``flock`` on DIR/.lock for the life of a run (holder's pid and host inside).

    The kernel releases the lock when the holding process dies, even on SIGKILL, so a
    leftover lock file never blocks. On a file system without lock support a warning is
    given and the run goes on unlocked.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise UserError naming the live holder."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"could not create the lock file {self.path}: {reason(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.run_dir} is in use by a live run ({holder})") from None
            warnings.warn(f"could not lock {self.path} ({reason(exc)}); make sure no other run uses "
                          f"{self.run_dir}", RuntimeWarning, stacklevel=2)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and drop the lock (the file itself stays: unlinking would race)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """"pid N on HOST" from a lock file's contents, or a vaguer phrase if it is empty."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 256, 0).decode().split()
        if len(text) >= 2:
            return f"pid {text[0]} on {text[1]}"
    return "pid unknown"
