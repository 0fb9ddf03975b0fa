"""Autosave of a labels volume: a Zarr array on disk that follows the labels, chunk by chunk.

Labels drawn in napari live in memory until the user saves the layer; a crash, a killed process
or a closed viewer loses them. The Segment widget keeps a copy on disk instead (``_napari/
autosave_action.py``), written a moment after each change; this module is that copy, usable
from a script too.

Layout: ``<folder>/<image name>-<key>.zarr``, a Zarr v3 array with the labels' shape and dtype,
chunked one slice per chunk for a stack ``(1, H, W)`` (within a slice, tiles of at most
:data:`TILE` pixels a side), zstd-compressed; chunks of zeros are not stored. ``key`` is a hash
of the image's name, source file and shape, so two images of the same name do not share a file.
Open it in napari (drag the folder in) or with ``zarr.open_array``; :func:`read_autosave` reads it
with its metadata.

A save writes only the chunks whose content changed since the last save (an xxh3-128 digest per
chunk, kept in memory and in the array's attributes), then the attributes (digests, time). Each
chunk is its own file, written to a temporary file and renamed (zarr's local store, 3.1.3 and
later); a save interrupted anywhere leaves every chunk either old or new, and the next save
rewrites what differs. A chunk that cannot be read back (a damaged file) comes
back as zeros and is named in :attr:`AutosavedLabels.damaged`.

An autosave that a session did not write or restore is never overwritten: the first save of a
new session moves it aside (``<name>-<key>-<its time>.zarr``, :data:`KEEP_OLDER` of them kept per
image) and starts a new file.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "TILE",
    "KEEP_OLDER",
    "ATTRS_KEY",
    "AutosavedLabels",
    "LabelsAutosave",
    "autosave_folder",
    "autosave_path",
    "find_autosaves",
    "read_autosave",
]

#: Largest chunk side within a slice.
TILE = 4096
#: Older autosaves of one image kept beside the current one (moved aside by a new session).
KEEP_OLDER = 5
#: The array attribute that holds this module's metadata.
ATTRS_KEY = "napari_mobilesam_autosave"


def autosave_folder() -> Path:
    """The default folder: ``$NAPARI_MOBILESAM_AUTOSAVE_DIR`` if set, otherwise ``autosave`` in
    the per-user data directory (``platformdirs.user_data_dir("napari-mobilesam")``)."""
    import os

    env = os.environ.get("NAPARI_MOBILESAM_AUTOSAVE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-mobilesam")) / "autosave"


def _slug(name: str) -> str:
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "labels")[:60]


def _key(image_name: str, shape: tuple[int, ...], source: str) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(f"{source}\n{image_name}\n{tuple(int(s) for s in shape)}".encode())[:10]


def autosave_path(folder: str | Path, image_name: str, shape: tuple[int, ...], source: str = "") -> Path:
    """Where the autosave of the labels of ``image_name`` (spatial ``shape``, read from file
    ``source`` if any) lives in ``folder``."""
    return Path(folder) / f"{_slug(image_name)}-{_key(image_name, shape, source)}.zarr"


def find_autosaves(folder: str | Path, image_name: str, shape: tuple[int, ...], source: str = "") -> list[Path]:
    """Every autosave of that image in ``folder`` that holds labels, newest first (the current
    one, then those a later session moved aside)."""
    main = autosave_path(folder, image_name, shape, source)
    if not main.parent.is_dir():
        return []
    metas = [(p, _meta(p)) for p in main.parent.glob(f"{main.stem}*.zarr") if p.is_dir()]
    found = [(float(m.get("saved", p.stat().st_mtime)), p) for p, m in metas if m.get("empty") is False]
    return [p for _saved, p in sorted(found, key=lambda item: item[0], reverse=True)]


def _meta(path: Path) -> dict:
    try:
        return dict(json.loads((path / "zarr.json").read_text())["attributes"][ATTRS_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    plane = tuple(min(int(s), TILE) for s in shape[-2:])
    return (1, *plane) if len(shape) == 3 else plane


def _regions(shape: tuple[int, ...], chunks: tuple[int, ...]):
    """Every chunk's index tuple (as a string key) and slices."""
    import itertools

    ranges = [range(0, int(s), int(c)) for s, c in zip(shape, chunks)]
    for start in itertools.product(*ranges):
        region = tuple(slice(a, min(a + c, s)) for a, c, s in zip(start, chunks, shape))
        yield ",".join(str(a // c) for a, c in zip(start, chunks)), region


def _size(region) -> tuple[int, ...]:
    return tuple(sl.stop - sl.start for sl in region)


def _digest(block: np.ndarray) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(block).view(np.uint8).reshape(-1))


@dataclass
class AutosavedLabels:
    """An autosave read back.

    Attributes
    ----------
    labels : ndarray
        ``(Z, H, W)`` or ``(H, W)``, the dtype it was saved in.
    image : str
        The name of the image the labels were drawn on.
    saved : float
        When it was last written (seconds since the epoch).
    damaged : list of str
        Chunks that could not be read (zeros in ``labels``), as ``"z,ty,tx"`` indices.
    path : Path
    """

    labels: np.ndarray
    image: str
    saved: float
    damaged: list
    path: Path

    @property
    def n_objects(self) -> int:
        return int(np.unique(self.labels).size - (1 if (self.labels == 0).any() else 0))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.saved))
        n = self.n_objects
        return f"{n} label{'' if n == 1 else 's'}, saved {when}"


def read_autosave(path: str | Path) -> AutosavedLabels:
    """Read an autosave folder written by :class:`LabelsAutosave`.

    Raises ValueError (naming the path) when it is not such a folder; a chunk that cannot be read
    is zeros and listed in ``damaged``.
    """
    import zarr

    path = Path(path)
    try:
        arr = zarr.open_array(store=str(path), mode="r")
        meta = dict(arr.attrs.get(ATTRS_KEY) or {})
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for a folder that is not an array
        raise ValueError(f"{path} is not a napari-mobilesam labels autosave ({exc}); open a folder "
                         "named '<image>-<key>.zarr' from the autosave folder") from exc
    if arr.ndim not in (2, 3):
        raise ValueError(f"{path} holds a {arr.ndim}D array, not 2D or 3D labels")
    labels = np.zeros(arr.shape, arr.dtype)
    damaged = []
    for key, region in _regions(arr.shape, arr.chunks):
        try:
            labels[region] = arr[region]
        except Exception:  # noqa: BLE001 - a damaged chunk file: the others still come back
            damaged.append(key)
    return AutosavedLabels(labels, str(meta.get("image", path.stem)), float(meta.get("saved", path.stat().st_mtime)),
                           damaged, path)


class LabelsAutosave:
    """The autosave of one image's labels in ``folder``; :meth:`save` writes what changed.

    Parameters
    ----------
    folder : path
        Made if missing.
    image_name, source : str
        The image's name and the file it was read from ("" if none): they name the file.
    shape : tuple
        The labels' ``(Z, H, W)`` or ``(H, W)``.
    dtype
        The labels' integer dtype.

    Thread-safe: saves run one at a time.
    """

    def __init__(self, folder: str | Path, image_name: str, shape: tuple[int, ...], dtype, source: str = ""):
        self.folder = Path(folder)
        self.image_name, self.source = image_name, source
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        if len(self.shape) not in (2, 3) or self.dtype.kind not in "iu":
            raise ValueError(f"autosave needs 2D or 3D integer labels, not {self.dtype} of shape {self.shape}")
        self.path = autosave_path(self.folder, image_name, self.shape, source)
        self._lock = threading.Lock()
        self._array = None
        self._digests: dict[str, str] | None = None  # None until this session owns the file
        self._zero: dict[tuple[int, ...], str] = {}
        self._layout = dict(_regions(self.shape, _chunks(self.shape)))
        self.saves = 0

    def adopt(self) -> None:
        """Take over the file as it is on disk (after restoring from it): later saves update it
        instead of moving it aside."""
        with self._lock:
            self._open_existing()

    def _empty_digest(self, shape: tuple[int, ...]) -> str:
        shape = tuple(int(n) for n in shape)
        if shape not in self._zero:
            self._zero[shape] = _digest(np.zeros(shape, self.dtype))
        return self._zero[shape]

    def _open_existing(self) -> None:
        import zarr

        arr = zarr.open_array(store=str(self.path), mode="r+")
        if tuple(arr.shape) != self.shape or np.dtype(arr.dtype) != self.dtype:
            raise ValueError(f"{self.path} holds {arr.dtype} labels of shape {arr.shape}, not "
                             f"{self.dtype} of shape {self.shape}")
        for partial in self.path.rglob("*.partial"):  # a chunk being written when a process died
            partial.unlink(missing_ok=True)
        self._array = arr
        self._digests = dict((arr.attrs.get(ATTRS_KEY) or {}).get("digests", {}))

    def _create(self) -> None:
        import zarr

        if self.path.exists():
            self._move_aside()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._array = zarr.create_array(
            store=str(self.path), shape=self.shape, chunks=_chunks(self.shape), dtype=self.dtype, fill_value=0,
            config={"write_empty_chunks": False},
        )
        self._digests = {}

    def _move_aside(self) -> None:
        try:
            saved = read_autosave_time(self.path)
        except OSError:
            saved = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(saved))
        target = self.path.with_name(f"{self.path.stem}-{stamp}.zarr")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.stem}-{stamp}-{n}.zarr")
            n += 1
        self.path.rename(target)
        older = find_autosaves(self.folder, self.image_name, self.shape, self.source)
        for old in [p for p in older if p != self.path][KEEP_OLDER:]:
            shutil.rmtree(old, ignore_errors=True)

    def save(self, labels, cancelled: Callable[[], bool] | None = None) -> int:
        """Write the chunks of ``labels`` (the shape and dtype given at creation) that changed
        since the last save; returns how many were written. Raises OSError when the folder cannot
        be written (the message names it)."""
        if tuple(labels.shape) != self.shape:
            raise ValueError(f"labels of shape {tuple(labels.shape)} given to the autosave of shape {self.shape}")
        with self._lock:
            try:
                written = 0
                for key, region in self._layout.items():
                    if cancelled is not None and cancelled():
                        break
                    block = np.array(labels[region], dtype=self.dtype)  # a copy: the layer may change meanwhile
                    digest = _digest(block)
                    if (self._digests or {}).get(key, self._empty_digest(block.shape)) == digest:
                        continue  # unchanged (a chunk never written holds zeros)
                    if self._digests is None:  # the first change of this session: a file of its own
                        self._create()
                    self._array[region] = block
                    self._digests[key] = digest
                    written += 1
                if written:
                    empty = all(d == self._empty_digest(_size(self._layout[k])) for k, d in self._digests.items())
                    self._array.attrs[ATTRS_KEY] = {"image": self.image_name, "source": self.source,
                                                    "saved": time.time(), "empty": empty, "digests": self._digests}
            except OSError as exc:
                raise OSError(f"cannot autosave labels to {self.folder}: {exc.strerror or exc}; choose "
                              "another autosave folder (or turn autosave off)") from exc
            if self._digests is not None:
                self.saves += 1  # saves into this session's own file
            return written


def read_autosave_time(path: Path) -> float:
    """When the autosave at ``path`` was last written (its metadata, else the folder's time)."""
    try:
        return float(_meta(path)["saved"])
    except (KeyError, TypeError, ValueError):
        return path.stat().st_mtime
