"""Stacks in and labels out: lazy TIFF reading, streamed compressed labels TIFF, output checks.

Reading checks that a multi-page TIFF is complete (a file cut short by a failed copy is refused,
naming the first missing slice). Labels are written one slice at a time to a uniquely named hidden
``.NAME.*.partial`` file beside the output, renamed over ``NAME`` when complete, while an
exclusive lock on ``NAME`` keeps a second run from writing it at the same time; an unfinished
``.partial`` left by a killed run is named and removed by the next run. The input's resolution
metadata is kept (z spacing and unit as ImageJ metadata, which Fiji reads). Coordinates are
napari's: stacks are (z, row, col).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, MobileSAMError, OutputError
from ..files import OutputLock, same_file

__all__ = [
    "BatchError",
    "StackMetadata",
    "read_stack_metadata",
    "open_stack",
    "LabelsTiffWriter",
    "check_output_path",
    "parse_z_range",
]


BatchError = MobileSAMError  # any error of a batch job: input (InputError), output (OutputError), model


@dataclass
class StackMetadata:
    """Physical-size metadata of a TIFF stack, to be written back with its labels.

    Attributes
    ----------
    resolution : (x_res, y_res) or None
        Pixels per ``resolution_unit`` along columns and rows (TIFF XResolution, YResolution).
    resolution_unit : int or None
        TIFF ResolutionUnit (1 none, 2 inch, 3 centimetre).
    spacing : float or None
        Distance between slices (ImageJ ``spacing``), in ``unit``.
    unit : str or None
        Unit name (e.g. ``"micron"``) from ImageJ metadata.
    imagej : bool
        Whether the input was an ImageJ TIFF (its labels get ImageJ metadata too).
    path : Path or None
        The file the metadata was read from (an output may never replace it).
    """

    resolution: tuple[float, float] | None = None
    resolution_unit: int | None = None
    spacing: float | None = None
    unit: str | None = None
    imagej: bool = False
    path: Path | None = None

    @property
    def scale(self) -> tuple[float, float, float] | None:
        """(z, row, col) voxel size for a napari layer's ``scale``, when known."""
        if self.resolution is None:
            return None
        xr, yr = self.resolution
        if not xr or not yr:
            return None
        return (float(self.spacing or 1.0), 1.0 / float(yr), 1.0 / float(xr))


def read_stack_metadata(path: str | os.PathLike) -> StackMetadata:
    """Resolution, resolution unit, z spacing and unit of a TIFF file (missing ones are None)."""
    with _open_tiff(path) as tif:
        page = tif.pages.first
        tags = page.tags
        meta = StackMetadata(imagej=bool(tif.is_imagej), path=Path(path))
        xr, yr = tags.get("XResolution"), tags.get("YResolution")
        if xr is not None and yr is not None:
            def _f(v):
                return float(v[0]) / float(v[1]) if isinstance(v, tuple) else float(v)
            meta.resolution = (_f(xr.value), _f(yr.value))
        ru = tags.get("ResolutionUnit")
        if ru is not None:
            meta.resolution_unit = int(ru.value)
        ij = tif.imagej_metadata or {}
        if "spacing" in ij:
            meta.spacing = float(ij["spacing"])
        if "unit" in ij:
            meta.unit = str(ij["unit"])
        if meta.spacing is None and tif.is_shaped:
            try:
                desc = json.loads(page.description)
                meta.spacing = desc.get("spacing")
                meta.unit = desc.get("unit", meta.unit)
            except (ValueError, AttributeError):
                pass
        return meta


def _open_tiff(path):
    import tifffile

    path = Path(path)
    if not path.exists():
        raise InputError(f"input file not found: {path}")
    if path.is_dir():
        raise InputError(f"input {path} is a folder; give a TIFF file")
    try:
        return tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises several types for garbage
        raise InputError(f"cannot read {path} as a TIFF file: {e}") from None


def open_stack(path: str | os.PathLike, *, lazy: bool = True) -> tuple[Any, StackMetadata]:
    """Open a TIFF image or stack.

    Parameters
    ----------
    path : TIFF file
    lazy : bool
        True: a dask array that reads one TIFF page when a slice is needed (for stacks larger than
        memory; works with compressed files), or a read-only memory map for an uncompressed file
        whose pages are not indexed (ImageJ hyperstacks). False: a numpy array read at once.

    Returns
    -------
    data : (Z, H, W), (H, W) or with channels, numpy or dask array of the file's dtype
        The first series, axes as stored.
    meta : StackMetadata

    Raises
    ------
    BatchError
        The file is missing or not a readable TIFF.
    """
    meta = read_stack_metadata(path)
    with _open_tiff(path) as tif:
        _check_complete(tif, Path(path))
        series = tif.series[0]
        shape, dtype = tuple(series.shape), series.dtype
        pages = [p for p in series.pages]
        page_shape = tuple(pages[0].shape) if pages else ()
        indexed = len(pages) > 1 and int(np.prod(shape)) == len(pages) * int(np.prod(page_shape))
        if lazy and not indexed and len(shape) > 2:
            # e.g. an uncompressed ImageJ hyperstack, whose pages tifffile does not list: map the
            # file into memory instead of reading it (the OS pages slices in and out).
            try:
                import tifffile

                return tifffile.memmap(path, mode="r"), meta
            except Exception:  # compressed or not contiguous: read it
                pass
        if not lazy or not indexed:
            try:
                return series.asarray(), meta
            except Exception as e:
                raise InputError(f"cannot decode the image data in {path}: {e}") from None
    import dask
    import dask.array as da

    path_s = str(Path(path))
    reader = dask.delayed(_read_page, pure=True)
    parts = [da.from_delayed(reader(path_s, i), page_shape, dtype) for i in range(len(pages))]
    arr = da.stack(parts).reshape(shape)
    return arr, meta


def _expected_pages(tif) -> int | None:
    """Pages the file's own metadata (ImageJ or tifffile's shape) says its first image has."""
    first = tif.pages.first
    if tif.is_imagej:
        return int((tif.imagej_metadata or {}).get("images", 1))
    if tif.is_shaped and tif.shaped_metadata:
        shape = tif.shaped_metadata[0].get("shape")
        per_page = int(np.prod(first.shape)) if first.shape else 0
        if shape and per_page:
            return int(np.prod(shape)) // per_page
    return None


def _check_complete(tif, path: Path) -> None:
    """Refuse a TIFF cut short (an interrupted copy or download): fewer pages than its metadata
    names, or a page whose data runs past the end of the file. Raises InputError naming the first
    missing slice."""
    size = path.stat().st_size
    n_pages = len(tif.pages)
    expected = _expected_pages(tif)
    fix = ("The file is incomplete (an interrupted copy or download?): copy or export it again. "
           "Nothing was written.")
    # ImageJ files over 4 GiB list one page and store the others back to back after it
    contiguous = bool(tif.is_imagej and n_pages < (expected or 0) and tif.pages.first.is_contiguous)
    if expected is not None and n_pages < expected and not contiguous:
        raise InputError(
            f"{path} is truncated: its metadata describes {expected} slices but the file holds "
            f"only {n_pages}; slice {n_pages} onwards is missing. {fix}"
        )
    for i, page in enumerate(tif.pages):
        ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            raise InputError(f"{path} is truncated: slice {i} is cut short and "
                             f"{max(0, (expected or n_pages) - i - 1)} after it are missing. {fix}")
    if contiguous:
        first = tif.pages.first
        end = int(first.dataoffsets[0]) + expected * int(first.nbytes)
        if end > size:
            have = max(0, (size - int(first.dataoffsets[0])) // max(1, int(first.nbytes)))
            raise InputError(
                f"{path} is truncated: its metadata describes {expected} slices but the file holds "
                f"only {have}; slice {have} onwards is missing. {fix}"
            )


_TIFF_LOCAL = threading.local()


def _read_page(path: str, index: int) -> np.ndarray:
    """Read page ``index`` of the first series (file handle kept open per thread)."""
    import tifffile

    cache = getattr(_TIFF_LOCAL, "files", None)
    if cache is None:
        cache = _TIFF_LOCAL.files = {}
    tif = cache.get(path)
    if tif is None:
        tif = cache[path] = tifffile.TiffFile(path)
    return tif.series[0].pages[index].asarray()


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
        metadata: StackMetadata | None = None,
        overwrite: bool = False,
        compression: str = "zlib",
    ) -> None:
        self.path = Path(path)
        self.metadata = metadata or StackMetadata()
        self._inputs = [self.metadata.path] if self.metadata.path is not None else []
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

        meta = self.metadata
        kwargs: dict[str, Any] = {}
        if meta.resolution is not None:
            kwargs["resolution"] = tuple(float(v) for v in meta.resolution)
            if meta.resolution_unit is not None:
                kwargs["resolutionunit"] = int(meta.resolution_unit)
        extra: dict[str, Any] = {}
        if meta.spacing is not None:
            extra["spacing"] = float(meta.spacing)
        if meta.unit is not None:
            extra["unit"] = str(meta.unit)
        if meta.imagej or extra:
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
    if path.is_dir():
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


def parse_z_range(z_range: Any, n_slices: int) -> range:
    """Slices to process: ``None`` (all), ``(start, stop)`` (half-open, like ``range``; ``None``
    ends allowed, negative values count from the end) or a ``"start:stop"`` string."""
    if z_range is None:
        return range(n_slices)
    if isinstance(z_range, str):
        parts = z_range.split(":")
        if len(parts) != 2:
            raise InputError(f"z range must look like START:STOP (e.g. 10:50), got {z_range!r}")
        try:
            z_range = tuple(int(p) if p.strip() else None for p in parts)
        except ValueError:
            raise InputError(f"z range must be two integers START:STOP, got {z_range!r}") from None
    try:
        start, stop = z_range
    except (TypeError, ValueError):
        raise InputError(f"z_range must be (start, stop), got {z_range!r}") from None
    r = range(n_slices)[slice(start, stop)]
    if len(r) == 0:
        raise InputError(f"z range {z_range!r} selects no slices of a stack with {n_slices} slices")
    return r
