"""Per-slice image embeddings, computed lazily and cached in memory and (optionally) on disk.

`EmbeddingCache.get(source, z)` returns the SAM image embedding of slice ``z`` of a
`~napari_mobilesam.core.source.SliceSource`. Entries are keyed by the slice's RGB content (which already
includes the normalisation) and the model's identity, so the same slice seen through two sources or
two runs is computed once.

- Memory: an LRU bounded by a byte budget; entries are stored as float16 by default (2 MiB a slice).
- Disk (``disk_dir``): one ``.npy`` file per entry under a folder per model identity, written to a
  temporary file and renamed into place, so a crash mid-write never leaves an entry that loads wrong.
  Each file ends with a checksum of its key and values (after the ``.npy`` data, which ``np.load``
  ignores): an unreadable, malformed or well-formed-but-wrong entry is detected, recomputed and
  replaced (counted in ``stats.damaged``). The folder is bounded too
  (``max_disk_bytes``, default 4 GiB, all models together): when a new entry takes it over the
  budget, the least recently used entries are deleted (reading an entry marks it used).
- `precompute` runs a range of slices with progress and cancellation callbacks; `prefetch` computes
  slices in one background thread (e.g. the neighbours of the slice being annotated).

No napari or Qt here; torch is imported by this module (it is only imported lazily by the package).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.backends import tensor_version
from ..models.registry import model_identity
from .disk_cache import EMBED_SHAPE, DiskCache
from .preprocess import encoder_size, input_size_for, preprocess_rgb
from .source import SliceSource

__all__ = ["Embedding", "EmbeddingCache", "CacheStats", "compute_embedding", "model_identity_of"]


DEFAULT_MAX_BYTES = 512 * 2**20
DEFAULT_MAX_DISK_BYTES = 4 * 2**30
@dataclass(frozen=True)
class Embedding:
    """The image embedding of one slice.

    Attributes
    ----------
    features : torch.Tensor
        (1, 256, 64, 64) float32, on the model's device.
    input_size : (h, w)
        Size of the slice after resizing its longest side to the encoder's input (1024).
    original_size : (H, W)
        Size of the slice itself (rows, cols).
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass
class CacheStats:
    """Counters of an `EmbeddingCache` (requests = hits + disk_hits + computed)."""

    hits: int = 0
    disk_hits: int = 0
    computed: int = 0
    evictions: int = 0
    disk_evictions: int = 0
    damaged: int = 0  # disk entries found unreadable or with a wrong checksum (recomputed)
    entries: int = 0
    bytes: int = 0

    @property
    def requests(self) -> int:
        return self.hits + self.disk_hits + self.computed

    @property
    def hit_rate(self) -> float:
        """Share of requests served without running the encoder (memory or disk), 0..1."""
        return (self.hits + self.disk_hits) / self.requests if self.requests else 0.0


def model_identity_of(sam: Any) -> str:
    """A stable string naming the model, its weights and backend, used in cache keys (see
    :func:`napari_mobilesam.models.registry.model_identity`: it follows in-place weight changes)."""
    return str(model_identity(sam))


def compute_embedding(sam: Any, rgb: np.ndarray) -> Embedding:
    """Run the image encoder on one (H, W, 3) uint8 RGB image.

    Resize (longest side to the encoder size, bilinear with antialiasing), normalise with the model's
    pixel mean/std, zero-pad bottom/right to a square, encode. Returns float32 features.
    """
    with torch.inference_mode():
        x, (h, w) = preprocess_rgb(rgb, encoder_size(sam), mean=sam.pixel_mean, std=sam.pixel_std,
                                   device=sam.pixel_mean.device)
        feats = sam.image_encoder(x[None])
    if not isinstance(feats, torch.Tensor):
        feats = torch.as_tensor(np.asarray(feats))
    feats = feats.float()
    if tuple(feats.shape[1:]) != EMBED_SHAPE or feats.shape[0] != 1:
        raise RuntimeError(f"the image encoder returned {tuple(feats.shape)}, expected (1, 256, 64, 64)")
    return Embedding(feats, (h, w), (int(rgb.shape[0]), int(rgb.shape[1])))


class EmbeddingCache:
    """Lazily computed, cached slice embeddings for one model.

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
        The model (any backend behind ``sam.image_encoder``).
    max_bytes : int
        Memory budget of the LRU, in bytes (default 512 MiB = 256 slices in float16). 0 keeps nothing
        in memory (disk only).
    disk_dir : path, optional
        Folder for the on-disk cache; created if needed. ``None``: memory only.
    max_disk_bytes : int or None
        Budget of ``disk_dir`` (default 4 GiB = 2048 slices in float16), shared by every model and
        process using the folder; ``None``: unbounded. Least recently used entries go first.
    dtype : torch.dtype
        Storage dtype in memory and on disk: ``torch.float16`` (default) or ``torch.float32``.
        `get` always returns float32.
    """

    def __init__(
        self,
        sam: Any,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        disk_dir: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float16,
        max_disk_bytes: int | None = DEFAULT_MAX_DISK_BYTES,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if max_disk_bytes is not None and max_disk_bytes < 0:
            raise ValueError(f"max_disk_bytes must be >= 0 or None, got {max_disk_bytes}")
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        self.sam = sam
        self.max_bytes = int(max_bytes)
        self.dtype = dtype
        self.disk_dir = None if disk_dir is None else Path(disk_dir)
        self.max_disk_bytes = None if max_disk_bytes is None else int(max_disk_bytes)
        self._stats = CacheStats()
        self._disk: DiskCache | None = None
        self.identity = ""
        self._set_identity(model_identity_of(sam))
        self._mem: OrderedDict[str, tuple[torch.Tensor, tuple[int, int], tuple[int, int]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._encode_lock = threading.Lock()
        self._inflight: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._prefetch_jobs: list[Future] = []
        # the float32 tensor `get` returned last, reused while unchanged (see `get`)
        self._last_get: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def _set_identity(self, ident: str) -> None:
        self.identity = ident
        if self.disk_dir is not None:
            self._disk = DiskCache(self.disk_dir, ident, self.dtype, self.max_disk_bytes, self._stats)

    def _check_identity(self) -> None:
        """Drop the in-memory entries if the model's weights changed since they were computed."""
        ident = model_identity_of(self.sam)
        if ident != self.identity:
            with self._lock:
                self._mem.clear()
                self._last_get = None
                self._bytes = 0
                self._set_identity(ident)

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters (hits, disk_hits, computed, evictions, disk_evictions, entries,
        bytes)."""
        counters = ("hits", "disk_hits", "computed", "evictions", "disk_evictions", "damaged")
        with self._lock:
            s = CacheStats(**{k: getattr(self._stats, k) for k in counters})
            s.entries = len(self._mem)
            s.bytes = self._bytes
            return s

    def reset_stats(self) -> None:
        """Zero the hit/miss counters (entries are kept)."""
        with self._lock:
            self._stats = CacheStats()

    def clear_memory(self) -> None:
        """Drop every in-memory entry (the disk cache is kept)."""
        with self._lock:
            self._mem.clear()
            self._last_get = None
            self._bytes = 0

    def key(self, source: SliceSource, z: int) -> str:
        """Cache key of slice ``z``: the slice's RGB content hash (normalisation included)."""
        return source.slice_key(z)

    def __contains__(self, item: tuple[SliceSource, int]) -> bool:
        source, z = item
        with self._lock:
            return self.key(source, z) in self._mem

    def _put_mem(self, key: str, feats: torch.Tensor, input_size, original_size) -> None:
        nbytes = feats.numel() * feats.element_size()
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return
            if nbytes > self.max_bytes:
                return
            self._mem[key] = (feats, input_size, original_size)
            self._bytes += nbytes
            while self._bytes > self.max_bytes and self._mem:
                _, (old, _, _) = self._mem.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
                self._stats.evictions += 1

    # -- public API -------------------------------------------------------------------------------
    def get(self, source: SliceSource, z: int) -> Embedding:
        """The embedding of slice ``z`` of ``source``: from memory, else disk, else the encoder.

        Returns an `Embedding` with float32 ``features`` (1, 256, 64, 64) on the model's device.
        Thread-safe; a slice being computed in the background is waited for, not recomputed.
        """
        feats, input_size, original_size = self._entry(source, z)
        device = self.sam.pixel_mean.device
        with self._lock:
            # Asking again for the same slice returns the same float32 tensor (unless it was
            # changed in place), so the decoder can tell cheaply that the image is the same.
            last = self._last_get
            if (
                last is not None
                and last[0] is feats
                and last[1].device == device
                and tensor_version(last[1]) == last[2]
            ):
                return Embedding(last[1], input_size, original_size)
            out = feats.to(device=device, dtype=torch.float32)
            version = tensor_version(out)
            self._last_get = None if version is None else (feats, out, version)
        return Embedding(out, input_size, original_size)

    def _entry(self, source: SliceSource, z: int):
        """(stored features, input_size, original_size) of slice ``z``, filling the cache."""
        self._check_identity()
        key = self.key(source, z)
        with self._lock:
            entry = self._mem.get(key)
            if entry is not None:
                self._mem.move_to_end(key)
                self._stats.hits += 1
            else:
                fut = self._inflight.get(key)
                own = fut is None
                if own:
                    fut = Future()
                    self._inflight[key] = fut
        if entry is None:
            if own:
                try:
                    entry = self._fill(source, z, key)
                    fut.set_result(entry)
                except BaseException as exc:
                    fut.set_exception(exc)
                    raise
                finally:
                    with self._lock:
                        self._inflight.pop(key, None)
            else:
                entry = fut.result()
                with self._lock:
                    self._stats.hits += 1
        return entry

    def _fill(self, source: SliceSource, z: int, key: str):
        original_size = source.slice_shape
        input_size = input_size_for(original_size, encoder_size(self.sam))
        feats = None if self._disk is None else self._disk.load(key)
        if feats is not None:
            with self._lock:
                self._stats.disk_hits += 1
        else:
            rgb = source.rgb(z)
            identity = self.identity
            with self._encode_lock:
                emb = compute_embedding(self.sam, rgb)
            input_size = emb.input_size
            feats = emb.features.detach().to("cpu", self.dtype).contiguous()
            with self._lock:
                self._stats.computed += 1
            if model_identity_of(self.sam) != identity:
                # the model changed while it ran (e.g. switched to the OpenVINO encoder): the
                # result answers this call but is not stored under either identity
                return feats, input_size, original_size
            if self._disk is not None:
                self._disk.save(key, feats)
        self._put_mem(key, feats, input_size, original_size)
        return feats, input_size, original_size

    def put(self, source: SliceSource, z: int, features: Any) -> None:
        """Store an embedding computed elsewhere (e.g. on a dask worker) as slice ``z``'s.

        ``features``: ``(1, 256, 64, 64)`` (or ``(256, 64, 64)``) array or tensor from this model's
        encoder for ``source.rgb(z)``. Kept in memory (within the budget) and on disk when the
        cache has a ``disk_dir``; replaces what was stored for that slice.
        """
        feats = features if torch.is_tensor(features) else torch.from_numpy(np.asarray(features))
        if tuple(feats.shape) == EMBED_SHAPE:
            feats = feats[None]
        if tuple(feats.shape) != (1, *EMBED_SHAPE):
            raise ValueError(f"expected features of shape (1, 256, 64, 64), got {tuple(feats.shape)}")
        if not torch.isfinite(feats).all():
            raise ValueError("the features contain NaN or infinite values")
        self._check_identity()
        feats = feats.detach().to("cpu", self.dtype).contiguous()
        original_size = source.slice_shape
        input_size = input_size_for(original_size, encoder_size(self.sam))
        key = self.key(source, z)
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._bytes -= old[0].numel() * old[0].element_size()
        if self._disk is not None:
            self._disk.save(key, feats)
        self._put_mem(key, feats, input_size, original_size)

    def is_cached(self, source: SliceSource, z: int) -> bool:
        """Whether slice ``z`` is in memory or on disk for the model as it is now (no computation)."""
        self._check_identity()
        key = self.key(source, z)
        with self._lock:
            if key in self._mem:
                return True
        return self._disk is not None and self._disk.has(key)

    def precompute(
        self,
        source: SliceSource,
        zs: Iterable[int] | None = None,
        progress: Callable[[int, int], Any] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> int:
        """Make sure slices ``zs`` (default: all) are cached; returns how many were processed.

        ``progress(done, total)`` is called after each slice; ``cancel()`` is checked before each
        slice and stops early when it returns True. With a memory budget smaller than the range and
        no ``disk_dir``, the earliest slices are evicted again: give a ``disk_dir`` for big stacks.
        """
        zs = list(range(source.n_slices)) if zs is None else [int(z) for z in zs]
        total = len(zs)
        done = 0
        for z in zs:
            if cancel is not None and cancel():
                break
            self._entry(source, z)
            done += 1
            if progress is not None:
                progress(done, total)
        return done

    def prefetch(self, source: SliceSource, zs: Iterable[int], *, replace: bool = True) -> list[Future]:
        """Compute slices ``zs`` in a background thread, in the given order; returns their futures.

        Slices already cached or out of range are skipped. With ``replace`` (default), pending
        prefetches from earlier calls are cancelled first (the user moved on).
        """
        if replace:
            self.cancel_prefetch()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mobilesam-prefetch")
        futures = []
        for z in zs:
            z = int(z)
            if not 0 <= z < source.n_slices:
                continue
            fut = self._pool.submit(self._prefetch_one, source, z)
            futures.append(fut)
        with self._lock:
            self._prefetch_jobs = [f for f in self._prefetch_jobs if not f.done()] + futures
        return futures

    def _prefetch_one(self, source: SliceSource, z: int) -> None:
        if self.is_cached(source, z):
            return
        key = self.key(source, z)
        with self._lock:
            if key in self._inflight:
                return
        self._entry(source, z)

    def cancel_prefetch(self) -> None:
        """Cancel background prefetches that have not started (a running one finishes)."""
        with self._lock:
            for f in self._prefetch_jobs:
                f.cancel()
            self._prefetch_jobs = [f for f in self._prefetch_jobs if not f.done()]

    def busy(self) -> bool:
        """Whether an embedding is being computed or a prefetch is queued (its thread holds the
        model until it ends)."""
        with self._lock:
            return bool(self._inflight) or any(not f.done() for f in self._prefetch_jobs)

    def wait_prefetch(self, timeout: float | None = None) -> None:
        """Block until every submitted prefetch has finished (or ``timeout`` seconds)."""
        with self._lock:
            jobs = list(self._prefetch_jobs)
        for f in jobs:
            if not f.cancelled():
                f.result(timeout=timeout)

    def close(self, wait: bool = True) -> None:
        """Cancel pending prefetches and stop the background thread.

        ``wait=False`` returns at once: a prefetch already running finishes in its thread (its
        embedding lands in this cache, which is no longer used), then the thread ends. A GUI
        thread replacing a session passes it: waiting would freeze it for one encoder call.
        """
        self.cancel_prefetch()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
