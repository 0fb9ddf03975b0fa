"""OME-Zarr in: a local OME-NGFF image store opened lazily, one multiscale level at a time.

:func:`open_ome_zarr` returns ``(data, OmeZarrMetadata)`` like :func:`..io.stacks.open_stack`:
``data`` is a dask array chunked as the store is (nothing is read until a slice is computed), laid
out (Z, Y, X), (Y, X), a time-lapse (T, Y, X), or any of these with one channel axis (named by
``meta.channel_axis``: pass it to ``SliceSource(data, channel_axis=...)``). Axes, units and the
physical pixel size come from the store's NGFF ``multiscales`` metadata (versions 0.4 and 0.5 are
written by ome-zarr-py; older ones are read where ome-zarr-py reads them), read with ome-zarr-py.

Labels are written by :class:`.omezarr_write.OmeZarrLabelsWriter`. Coordinates are napari's:
(z, row, col).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .stacks import StackMetadata

__all__ = [
    "OmeZarrLevel",
    "OmeZarrMetadata",
    "is_ome_zarr",
    "list_levels",
    "open_ome_zarr",
    "ngff_unit",
    "imagej_unit",
]

# NGFF (UCUM-style) unit names <-> the short names ImageJ/TIFF metadata use.
_TO_IMAGEJ = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm",
              "meter": "m", "angstrom": "A"}
_FROM_IMAGEJ = {"micron": "micrometer", "microns": "micrometer", "um": "micrometer",
                "µm": "micrometer", "\u03bcm": "micrometer", "nm": "nanometer",
                "mm": "millimeter", "cm": "centimeter", "m": "meter", "a": "angstrom"}


def ngff_unit(unit: str | None) -> str | None:
    """An NGFF spatial unit name for a TIFF/ImageJ unit (``"micron"`` -> ``"micrometer"``), or None
    when there is no known equivalent (the unit is then left out of the written metadata)."""
    from ome_zarr.axes import KNOWN_SPATIAL_UNITS

    if not unit:
        return None
    u = str(unit).strip()
    u = _FROM_IMAGEJ.get(u.lower(), u.lower())
    return u if u in KNOWN_SPATIAL_UNITS else None


def imagej_unit(unit: str | None) -> str | None:
    """The ImageJ/TIFF name of an NGFF unit (``"micrometer"`` -> ``"micron"``)."""
    if not unit:
        return None
    return _TO_IMAGEJ.get(str(unit), str(unit))


@dataclass(frozen=True)
class OmeZarrLevel:
    """One resolution level of a multiscale image.

    Attributes
    ----------
    index : level number (0 = full resolution)
    path : the level's array inside the image group (e.g. ``"s0"`` or ``"0"``)
    shape, chunks : per stored axis
    dtype : numpy dtype name
    scale : physical size of one pixel per stored axis (1.0 where the metadata gives none)
    translation : physical offset per stored axis
    """

    index: int
    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass
class OmeZarrMetadata(StackMetadata):
    """:class:`StackMetadata` of one level of an OME-Zarr image, plus the NGFF details.

    ``resolution`` (pixels per unit along columns, rows), ``spacing`` (z step) and ``unit`` (ImageJ
    style, e.g. ``"micron"``) are filled from the chosen level's scale, so ``meta.scale`` is the
    (z, row, col) voxel size and a labels TIFF written with this metadata keeps it.

    Attributes
    ----------
    store : the image group's path
    ngff_version : e.g. ``"0.4"`` or ``"0.5"``
    level : the level that was opened
    levels : every level of the image
    axes : names of the returned array's axes, e.g. ``("z", "y", "x")`` or ``("c", "z", "y", "x")``
    units : NGFF unit per returned axis (None where not given)
    voxel_size : physical pixel size per returned axis at this level
    translation : physical offset per returned axis at this level
    channel_axis : index of the channel axis in the returned array, or None
    stored_axes : names of all stored axes (before a time point was picked or size-1 axes dropped)
    """

    store: str = ""
    ngff_version: str = ""
    level: int = 0
    levels: tuple[OmeZarrLevel, ...] = ()
    axes: tuple[str, ...] = ()
    units: tuple[str | None, ...] = ()
    voxel_size: tuple[float, ...] = ()
    translation: tuple[float, ...] = ()
    channel_axis: int | None = None
    stored_axes: tuple[str, ...] = ()
    axis_types: tuple[str, ...] = field(default=(), repr=False)

    @property
    def spatial_axes(self) -> tuple[str, ...]:
        """The returned axes without the channel axis (what a labels array has)."""
        return tuple(a for i, a in enumerate(self.axes) if i != self.channel_axis)

    @property
    def spatial_shape_index(self) -> tuple[int, ...]:
        """Positions of :attr:`spatial_axes` in the returned array."""
        return tuple(i for i in range(len(self.axes)) if i != self.channel_axis)


@contextlib.contextmanager
def _quiet_ome_zarr():
    """ome-zarr-py logs a warning for every v0.4 store it opens (it expects 0.5): hide it."""
    log = logging.getLogger("ome_zarr")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _location(path: str | os.PathLike):
    """ome-zarr-py's ZarrLocation of an image group, with clear errors for anything else."""
    import zarr
    from ome_zarr.io import parse_url

    p = Path(path)
    if not p.exists():
        raise InputError(f"input {p} not found: give the folder of an OME-Zarr image (e.g. image.zarr)")
    if not p.is_dir():
        raise InputError(
            f"input {p} is a file, not a Zarr store: an OME-Zarr image is a folder (e.g. image.zarr)"
        )
    with _quiet_ome_zarr():
        loc = parse_url(p)
    if loc is None:
        try:
            zarr.open_array(str(p), mode="r")
            is_array = True
        except Exception:
            is_array = False
        if is_array:
            raise InputError(
                f"{p} is a plain Zarr array without OME-NGFF metadata: open it with "
                "zarr.open_array(...) and pass the array, or write it as OME-Zarr "
                "(ome_zarr.writer.write_image)"
            )
        raise InputError(
            f"{p} is not a Zarr store (no zarr.json or .zgroup inside): give the folder of an "
            "OME-Zarr image (e.g. image.zarr)"
        )
    attrs = loc.root_attrs
    if "multiscales" not in attrs and "bioformats2raw.layout" in attrs and (p / "0").is_dir():
        return _location(p / "0")  # bioformats2raw output: the first image is series 0
    if "multiscales" not in attrs:
        hint = ""
        if "plate" in attrs or "well" in attrs:
            hint = " This is an HCS plate/well: give the path of one field image (e.g. plate.zarr/A/1/0)."
        elif "labels" in attrs:
            hint = " This is a labels group: give the path of one label image inside it."
        raise InputError(
            f"{p} is a Zarr group without OME-NGFF 'multiscales' metadata, so its axes and levels "
            f"are unknown.{hint} Write images with ome-zarr-py (ome_zarr.writer.write_image) or "
            "open a plain Zarr array yourself and pass it as an array."
        )
    return loc


def _axes_of(multiscale: dict, ndim: int, version: str) -> list[dict[str, Any]]:
    """Axes as dicts with name, type and unit (v0.1/0.2 stores have none: t, c, z, y, x)."""
    from ome_zarr.axes import Axes
    from ome_zarr.format import format_from_version

    raw = multiscale.get("axes")
    if raw is None:
        names = ["t", "c", "z", "y", "x"][-ndim:]
        return [{"name": n, "type": {"t": "time", "c": "channel"}.get(n, "space")} for n in names]
    try:
        axes = Axes(raw, fmt=format_from_version(version)).to_list()
    except Exception as e:  # ValueError for invalid axes
        raise InputError(f"the store's NGFF axes {raw!r} are invalid: {e}") from None
    out = []
    for a in axes:
        d = {"name": a} if isinstance(a, str) else dict(a)
        d.setdefault("type", {"t": "time", "c": "channel"}.get(d["name"], "space"))
        out.append(d)
    return out


def _scale_translation(ds: dict, multiscale: dict, ndim: int) -> tuple[list[float], list[float]]:
    """Per-axis scale and translation of one dataset (dataset transforms then global ones)."""
    scale, trans = [1.0] * ndim, [0.0] * ndim
    for t in list(ds.get("coordinateTransformations") or []) + list(
        multiscale.get("coordinateTransformations") or []
    ):
        if t.get("type") == "scale" and len(t.get("scale", ())) == ndim:
            trans = [tr * s for tr, s in zip(trans, t["scale"], strict=True)]
            scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=True)]
        elif t.get("type") == "translation" and len(t.get("translation", ())) == ndim:
            trans = [a + float(b) for a, b in zip(trans, t["translation"], strict=True)]
    return scale, trans


def _read_levels(loc) -> tuple[list[OmeZarrLevel], list[dict[str, Any]], str]:
    attrs = loc.root_attrs
    ms = attrs["multiscales"][0]
    version = str(attrs.get("version") or ms.get("version") or loc.version)
    datasets = ms.get("datasets") or []
    if not datasets:
        raise InputError(f"{loc.path}: the NGFF multiscales metadata lists no datasets (levels)")
    levels = []
    axes = None
    for i, ds in enumerate(datasets):
        try:
            arr = loc.load(ds["path"])
        except Exception as e:
            raise InputError(
                f"{loc.path}: level {i} ({ds.get('path')!r}) listed in the metadata cannot be "
                f"opened: {e}"
            ) from None
        if axes is None:
            axes = _axes_of(ms, arr.ndim, version)
            if len(axes) != arr.ndim:
                raise InputError(
                    f"{loc.path}: the metadata names {len(axes)} axes but level 0 has "
                    f"{arr.ndim} dimensions {arr.shape}"
                )
        scale, trans = _scale_translation(ds, ms, arr.ndim)
        levels.append(OmeZarrLevel(
            index=i, path=str(ds["path"]), shape=tuple(int(s) for s in arr.shape),
            chunks=tuple(int(c[0]) for c in arr.chunks), dtype=str(arr.dtype),
            scale=tuple(scale), translation=tuple(trans),
        ))
    return levels, axes or [], version


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding an OME-Zarr image (NGFF ``multiscales`` metadata)."""
    try:
        _location(path)
    except InputError:
        return False
    return True


def list_levels(path: str | os.PathLike) -> list[OmeZarrLevel]:
    """The resolution levels of an OME-Zarr image, full resolution first (reads metadata only)."""
    with _quiet_ome_zarr():
        return _read_levels(_location(path))[0]


def open_ome_zarr(
    path: str | os.PathLike,
    *,
    level: int = 0,
    timepoint: int | None = None,
    lazy: bool = True,
) -> tuple[Any, OmeZarrMetadata]:
    """Open one level of an OME-Zarr image for segmentation.

    Parameters
    ----------
    path : folder of an OME-Zarr image (``image.zarr``; a bioformats2raw folder opens series 0)
    level : which resolution level (0 = full resolution; see :func:`list_levels`)
    timepoint : pick this time point of an image with both t and z axes (required then); a
        time-lapse without z is returned as (T, Y, X), segmented like a stack.
    lazy : True (default): a dask array read chunk by chunk; False: a numpy array read at once.

    Returns
    -------
    data : dask (or numpy) array, (Z, Y, X), (T, Y, X) or (Y, X), or with one channel axis where
        the store has more than one channel (size-1 t and c axes are dropped).
    meta : OmeZarrMetadata

    Raises
    ------
    InputError
        The path is missing, not a Zarr store, has no NGFF metadata, the level does not exist, or
        the axes cannot be read as slices.
    """
    with _quiet_ome_zarr():
        loc = _location(path)
        levels, axes, version = _read_levels(loc)
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise InputError(f"level must be an integer, got {level!r}")
        if not 0 <= int(level) < len(levels):
            listing = ", ".join(f"{lv.index}: {lv.shape}" for lv in levels)
            raise InputError(
                f"{loc.path} has no level {level}: it has {len(levels)} level(s) ({listing})"
            )
        lv = levels[int(level)]
        data = loc.load(lv.path)
    index, keep = _select_axes(loc.path, axes, lv.shape, timepoint)
    meta = _metadata(loc.path, version, int(level), levels, axes, keep)
    if len(meta.spatial_axes) not in (2, 3):
        raise InputError(
            f"{loc.path}: level {level} has axes {tuple(meta.axes)}; slices need (Y, X) or "
            "(Z, Y, X) (plus at most one channel axis)"
        )
    data = data[tuple(index)]
    if not lazy:
        data = np.asarray(data.compute())
    return data, meta


def _select_axes(store, axes, shape, timepoint) -> tuple[list[Any], list[int]]:
    """The index that picks a time point and drops size-1 t/c axes, and the axes that remain."""
    names = [a["name"] for a in axes]
    types = [a["type"] for a in axes]
    keep = list(range(len(names)))
    index: list[Any] = [slice(None)] * len(names)
    others = [n for n, t in zip(names, types, strict=True) if t not in ("space", "time", "channel")]
    if others:
        raise InputError(f"{store}: axes {others} are neither space, time nor channel axes")
    if "time" in types:
        ti = types.index("time")
        n_t = shape[ti]
        has_z = sum(t == "space" for t in types) >= 3
        if timepoint is not None:
            if not -n_t <= int(timepoint) < n_t:
                raise InputError(f"timepoint {timepoint} is out of range: the image has {n_t} time points")
            index[ti] = int(timepoint) % n_t
            keep.remove(ti)
        elif n_t == 1:
            index[ti] = 0
            keep.remove(ti)
        elif has_z:
            raise InputError(
                f"{store} has {n_t} time points and a z axis: choose one with timepoint=... "
                "(slices are segmented through z)"
            )
    elif timepoint is not None:
        raise InputError(f"timepoint={timepoint} given but {store} has no time axis")
    if "channel" in types:
        ci = types.index("channel")
        if shape[ci] == 1:
            index[ci] = 0
            keep.remove(ci)
    return index, keep


def _metadata(store, version, level, levels, axes, keep) -> OmeZarrMetadata:
    lv = levels[level]
    names = tuple(axes[i]["name"] for i in keep)
    types = tuple(axes[i]["type"] for i in keep)
    units = tuple(axes[i].get("unit") for i in keep)
    scale = tuple(float(lv.scale[i]) for i in keep)
    channel_axis = types.index("channel") if "channel" in types else None
    meta = OmeZarrMetadata(
        store=str(store), ngff_version=version, level=level, levels=tuple(levels), axes=names,
        units=units, voxel_size=scale, translation=tuple(float(lv.translation[i]) for i in keep),
        channel_axis=channel_axis, stored_axes=tuple(a["name"] for a in axes), axis_types=types,
    )
    spatial = [i for i in range(len(names)) if i != channel_axis]
    if len(spatial) >= 2:
        sy, sx = scale[spatial[-2]], scale[spatial[-1]]
        if sx > 0 and sy > 0:
            meta.resolution = (1.0 / sx, 1.0 / sy)
        unit = units[spatial[-1]]
        if unit:
            meta.unit = imagej_unit(unit)
            meta.resolution_unit = 1  # TIFF "no absolute unit": the unit travels as ImageJ metadata
        if len(spatial) == 3 and types[spatial[0]] == "space":
            meta.spacing = scale[spatial[0]]
    return meta
