"""Atomic file writes: a file is either its old self or complete, never half written.

Every file napari-mobilesam writes for the user or for itself (checkpoints, training states,
embedding caches, settings, JSON memos) goes through :func:`atomic_write`: the data is written to a
uniquely named temporary file in the target's folder, flushed to disk, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows). A crash leaves at most a hidden ``.NAME.*.tmp``
file, never a damaged target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "OutputLock", "same_file"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = True) -> Path:
    """Create or replace ``path`` with what ``write(tmp_path)`` writes to ``tmp_path``.

    ``write`` gets the path of a fresh empty temporary file beside ``path`` (same folder, so the
    rename stays on one filesystem). If it raises, the temporary file is removed and ``path`` is
    untouched. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Create or replace ``path`` with ``data``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Create or replace ``path`` with ``text`` (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (after links; also for a file not yet
    created, by its resolved path)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.expanduser().resolve() == b.expanduser().resolve()
    except OSError:
        return False


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on open file ``fd`` without waiting; False when another holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class OutputLock:
    """An exclusive lock on an output file name, held while a run writes it.

    The lock is an OS file lock (``flock``; ``msvcrt.locking`` on Windows) on a hidden
    ``.NAME.lock`` file beside the output: the operating system releases it when the process
    ends, even after ``kill -9``, so a killed run never blocks the next one. A second process
    asking for the same name gets an :class:`~napari_mobilesam.errors.OutputError` naming the
    process that holds it. Use as a context manager.
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create the folder of output {self.target}: {exc.strerror or exc}; choose an "
                "output in a folder you can write to"
            ) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(
                    f"cannot write output {self.target}: {exc.strerror or exc}; choose an output in "
                    "a folder you can write to"
                ) from None
            if not _try_lock(fd):
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(
                    f"another run (process {holder}) is writing {self.target} right now; wait for it "
                    "to finish, or choose another output name"
                )
            try:  # the holder before us may have removed the file as we opened it: retry then
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiter then sees a new file
        os.close(self._fd)  # closing releases the lock
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
