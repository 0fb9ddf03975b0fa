"""Stacks in: lazy TIFF reading with its resolution metadata, and z ranges.

Reading checks that a multi-page TIFF is complete (a file cut short by a failed copy is refused,
naming the first missing slice). Labels out (:class:`LabelsTiffWriter`, :func:`check_output_path`)
live in :mod:`.labels_tiff` and are re-exported here. Coordinates are napari's: (z, row, col).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, MobileSAMError
from .labels_tiff import LabelsTiffWriter, check_output_path, is_zarr_path

__all__ = [
    "BatchError",
    "StackMetadata",
    "read_stack_metadata",
    "open_stack",
    "LabelsTiffWriter",
    "check_output_path",
    "is_zarr_path",
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
