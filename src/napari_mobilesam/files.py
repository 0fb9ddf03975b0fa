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

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]


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
