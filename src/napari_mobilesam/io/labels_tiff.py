"""Labels out: a (Z, H, W) labels stack streamed into a compressed TIFF, and the output checks.

Labels are written one slice at a time to a uniquely named hidden ``.NAME.*.partial`` file beside
the output and renamed over ``NAME`` when complete, while an exclusive lock on ``NAME`` keeps a
second run from writing it at the same time; an unfinished ``.partial`` left by a killed run is
named and removed by the next run. The input's resolution metadata is kept (z spacing and unit as
ImageJ metadata, which Fiji reads). Stacks are (z, row, col).
"""

from __future__ import annotations

import os
import secrets
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, OutputError
from ..files import OutputLock, same_file

__all__ = ["LabelsTiffWriter", "check_output_path"]


class LabelsTiffWriter:
    """Stream a (Z, H, W) labels stack into a compressed TIFF, one slice at a time.

    Use as a context manager and call :meth:`write` with slices in z order (missing slices at the
    end are written as zeros on close). On entering, an exclusive lock on ``path`` is taken (a
    second run writing the same name stops with :class:`OutputError`), and any unfinished
    ``.partial`` file a killed run left for ``path`` is named (a warning) and removed. The file is
    written to a uniquely named hidden ``.NAME.*.partial`` beside ``path`` and renamed when
    complete, so an interrupted run never leaves a truncated file under the final name and never
    replaces an existing file with a broken one.

    Parameters
    ----------
    path : output file (``.tif``/``.tiff``)
    shape : (Z, H, W)
    dtype : uint16 or uint32 (default uint32)
    metadata : StackMetadata, optional
        Resolution copied from the input; its z spacing and unit (or an ImageJ input) are written
        as ImageJ metadata, which Fiji reads. ``metadata.path`` (the input) is never replaced.
    overwrite : bool
        Replace an existing file; otherwise :class:`BatchError` is raised before anything runs.
    compression : str
        tifffile compression name (default ``"zlib"``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        *,
        dtype: Any = np.uint32,
        metadata: Any = None,
        overwrite: bool = False,
        compression: str = "zlib",
    ) -> None:
        self.path = Path(path)
        self.metadata = metadata
        self._inputs = [p for p in [getattr(metadata, "path", None)] if p is not None]
        check_output_path(self.path, overwrite, inputs=self._inputs)
        if len(shape) != 3:
            raise ValueError(f"shape must be (Z, H, W), got {shape!r}")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"labels are written as uint16 or uint32, not {self.dtype}")
        self.compression = compression
        self.overwrite = overwrite
        self._lock_file = OutputLock(self.path)
        self._partial: Path | None = None
        self._tw = None
        self._queue: list[np.ndarray] = []
        self._next = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    def _tiff_options(self) -> dict[str, Any]:
        """tifffile ``write`` options for the metadata: resolution tags and an ImageJ description
        (z spacing, unit) or tifffile's shape description."""
        import tifffile

        def field(name):
            return getattr(self.metadata, name, None)

        kwargs: dict[str, Any] = {}
        if field("resolution") is not None:
            kwargs["resolution"] = tuple(float(v) for v in field("resolution"))
            if field("resolution_unit") is not None:
                kwargs["resolutionunit"] = int(field("resolution_unit"))
        extra: dict[str, Any] = {}
        if field("spacing") is not None:
            extra["spacing"] = float(field("spacing"))
        if field("unit") is not None:
            extra["unit"] = str(field("unit"))
        if field("imagej") or extra:
            # ImageJ metadata, as Fiji reads it (tifffile's imagej=True refuses uint32 data)
            kwargs["description"] = tifffile.imagej_description(self.shape, "ZYX", **extra)
            kwargs["metadata"] = None
        else:
            kwargs["metadata"] = {"axes": "ZYX"}
        return kwargs

    def _clear_stale_partials(self) -> None:
        """Remove unfinished files of killed runs for this output (we hold its lock: they are
        nobody's), saying so."""
        parent = self.path.parent
        stale = [self.path.with_name(self.path.name + ".partial"),
                 *parent.glob(f".{self.path.name}.*.partial")]
        for p in stale:
            if p.exists():
                p.unlink(missing_ok=True)
                warnings.warn(f"removed {p}: an unfinished output left by an interrupted run; "
                              f"writing {self.path} afresh", stacklevel=3)

    def __enter__(self) -> LabelsTiffWriter:
        import tifffile

        self._lock_file.acquire()
        try:
            check_output_path(self.path, self.overwrite, inputs=self._inputs)  # now under the lock
            self._clear_stale_partials()
            options = self._tiff_options()
            # named before it exists, so that an interruption at any point can remove it
            self._partial = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.partial")
            try:
                os.close(os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                self._tw = tifffile.TiffWriter(self._partial, bigtiff=self._nbytes() > 2**31)
            except OSError as exc:
                raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}; choose an "
                                  "output in a folder you can write to") from None
            self._start(options)
        except BaseException:
            self._discard()
            raise
        return self

    def _start(self, options: dict) -> None:
        """Start the thread that compresses and writes the pages as they come."""

        def run():
            try:
                self._tw.write(
                    self._pages(), shape=self.shape, dtype=self.dtype,
                    compression=self.compression, photometric="minisblack", **options,
                )
            except BaseException as e:  # surfaced in write()/close()
                self._error = e
                with self._cond:
                    self._cond.notify_all()

        self._thread = threading.Thread(target=run, name="labels-tiff-writer", daemon=True)
        self._thread.start()

    def _nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def _pages(self) -> Iterator[np.ndarray]:
        for _ in range(self.shape[0]):
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                page = self._queue.pop(0) if self._queue else np.zeros(self.shape[1:], self.dtype)
                self._cond.notify_all()
            yield page

    def write(self, labels_slice: np.ndarray) -> None:
        """Append the next slice ((H, W) integer labels, values below the dtype's maximum)."""
        if self._error is not None:
            raise OutputError(f"writing {self.path} failed: {self._error}") from self._error
        a = np.asarray(labels_slice)
        if a.shape != self.shape[1:]:
            raise ValueError(f"slice shape {a.shape} does not match the stack's {self.shape[1:]}")
        if self._next >= self.shape[0]:
            raise ValueError(f"all {self.shape[0]} slices are already written")
        if a.size and (a.min() < 0 or a.max() > np.iinfo(self.dtype).max):
            raise InputError(f"label ids must lie in 0..{np.iinfo(self.dtype).max} for {self.dtype} output")
        with self._cond:
            while len(self._queue) >= 2 and self._error is None:  # bounded: no pile-up in memory
                self._cond.wait(0.1)
            self._queue.append(a.astype(self.dtype))
            self._next += 1
            self._cond.notify_all()

    def _discard(self) -> None:
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)
        self._lock_file.release()

    def close(self, *, ok: bool = True) -> None:
        """Finish the file (remaining slices as zeros) and move it into place; ``ok=False``
        discards the partial file."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._tw is not None:
                self._tw.close()
            if ok and self._error is None:
                with open(self._partial, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(self._partial, self.path)
            elif self._error is not None and ok:
                raise OutputError(f"writing {self.path} failed: {self._error}") from self._error
        except OSError as exc:
            raise OutputError(f"writing {self.path} failed: {exc.strerror or exc}") from None
        finally:
            self._discard()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a Zarr store (``*.zarr``, or a folder holding Zarr metadata)."""
    p = Path(path)
    if p.suffix.lower() == ".zarr":
        return True
    return p.is_dir() and any((p / m).exists() for m in ("zarr.json", ".zattrs", ".zgroup"))


def check_output_path(path: str | os.PathLike, overwrite: bool, inputs: Sequence[Any] = ()) -> Path:
    """Refuse an output that is one of ``inputs`` (whatever ``overwrite`` says), an existing file
    unless ``overwrite``, a folder, or a place that cannot be written. Returns ``path``."""
    path = Path(path)
    for src in inputs:
        if src is not None and same_file(path, src):
            raise OutputError(
                f"output {path} is the input image {src}: writing labels there would destroy it; "
                "choose another output name (e.g. NAME_labels.tif)"
            )
    if path.is_dir() and not is_zarr_path(path):  # a Zarr output is a folder by nature
        raise OutputError(f"output {path} is a folder; give a file name such as labels.tif")
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} already exists; pass overwrite=True (--overwrite) to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a folder; choose another output")
    if not os.access(existing, os.W_OK):
        raise OutputError(f"cannot write to folder {existing} (read-only or no permission); choose an "
                          "output in a folder you can write to")
    return path
