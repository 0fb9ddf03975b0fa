"""The on-disk half of :class:`~napari_mobilesam.core.embeddings.EmbeddingCache`.

Layout: ``<disk_dir>/<model tag>-<dtype>/<2 hex>/<slice key>.npy``. Each entry is a ``.npy``
array ``(1, 256, 64, 64)`` followed by a checksum of its key and values, written atomically
(:func:`napari_mobilesam.files.atomic_write`). An entry that is unreadable, of the wrong shape or
dtype, or whose checksum does not match (a damaged file, or another slice's entry under this name)
is counted in ``stats.damaged`` and recomputed by the caller. The folder is shared by every model
and bounded by ``max_bytes``: least recently used entries (by modification time, refreshed on
every read) are deleted first.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..files import atomic_write

__all__ = ["DiskCache", "EMBED_SHAPE"]

EMBED_SHAPE = (256, 64, 64)
_CHECKSUM_TAG = b"MSAMSUM1"  # then a 16-byte blake2b digest of the entry's key and values


def _entry_checksum(key: str, arr: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(key.encode())
    h.update(str(arr.dtype).encode() + repr(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.digest()


class DiskCache:
    """Embeddings of one model on disk, in a folder shared by every model.

    Parameters
    ----------
    root : path
        The shared cache folder (created if needed).
    identity : str
        The model's identity (:func:`~napari_mobilesam.models.registry.model_identity`).
    dtype : torch.float16 or torch.float32
        How entries are stored.
    max_bytes : int or None
        Budget of ``root`` (all models); None: unbounded.
    stats : CacheStats
        Where ``damaged`` and ``disk_evictions`` are counted.
    """

    def __init__(self, root: str | os.PathLike, identity: str, dtype: Any, max_bytes: int | None, stats: Any):
        self.root = Path(root)
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.stats = stats
        self._estimate: int | None = None  # bytes in root, as last scanned + written since
        self._lock = threading.Lock()
        tag = hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()
        self.model_dir = self.root / f"{tag}-{str(dtype).rsplit('.', 1)[-1]}"
        if self.root.exists() and not self.root.is_dir():
            raise InputError(
                f"embedding cache folder {self.root} is a file; give a folder (or None for a "
                "memory-only cache)"
            )
        try:
            self.model_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cannot create the embedding cache folder {self.model_dir}: {exc.strerror or exc}; "
                "choose a folder you can write to"
            ) from None

    def path(self, key: str) -> Path:
        return self.model_dir / key[:2] / f"{key}.npy"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def load(self, key: str) -> torch.Tensor | None:
        """The entry ``key``, or None when absent, unreadable or not matching its checksum (then
        the caller recomputes and replaces it)."""
        path = self.path(key)
        if not path.exists():
            return None
        want = np.float16 if self.dtype == torch.float16 else np.float32
        try:
            buf = io.BytesIO(path.read_bytes())
            arr = np.lib.format.read_array(buf, allow_pickle=False)
            trailer = buf.read()
        except (OSError, ValueError, EOFError):
            arr, trailer = None, b""
        ok = (
            arr is not None and arr.shape == (1, *EMBED_SHAPE) and arr.dtype == want
            and trailer == _CHECKSUM_TAG + _entry_checksum(key, arr) and bool(np.isfinite(arr).all())
        )
        if not ok:
            if path.exists():
                with self._lock:
                    self.stats.damaged += 1
            return None
        try:
            os.utime(path)  # recently used: the budget evicts by modification time
        except OSError:
            pass  # a read-only cache still serves
        return torch.from_numpy(arr)

    def save(self, key: str, feats: torch.Tensor) -> None:
        """Write ``feats`` as entry ``key`` (atomically, with its checksum), then keep the budget."""
        path = self.path(key)
        arr = feats.cpu().numpy()
        checksum = _CHECKSUM_TAG + _entry_checksum(key, arr)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
                np.save(f, arr, allow_pickle=False)
                f.write(checksum)

        atomic_write(path, write)
        self._after_write(path)

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry under ``root`` (all models)."""
        out = []
        for path in self.root.glob("*/*/*.npy"):
            try:
                st = path.stat()
            except OSError:  # removed meanwhile (another process)
                continue
            out.append((st.st_mtime, st.st_size, path))
        return out

    def _after_write(self, written: Path) -> None:
        """Keep ``root`` within ``max_bytes``: delete least recently used entries.

        The folder is scanned when this process first writes and whenever its running estimate
        goes over the budget; eviction goes down to 90% of the budget so that it does not run
        again at every write. The entry just written is kept.
        """
        if self.max_bytes is None:
            return
        with self._lock:
            try:
                size = written.stat().st_size
            except OSError:
                size = 0
            if self._estimate is None:
                self._estimate = sum(e[1] for e in self._entries())
            else:
                self._estimate += size
            if self._estimate <= self.max_bytes:
                return
            entries = sorted(self._entries(), key=lambda e: e[0])
            total = sum(e[1] for e in entries)
            goal = int(0.9 * self.max_bytes)
            for _mtime, nbytes, path in entries:
                if total <= goal:
                    break
                if path == written:
                    continue
                try:
                    path.unlink()
                except OSError:
                    continue
                total -= nbytes
                self.stats.disk_evictions += 1
            self._estimate = total
