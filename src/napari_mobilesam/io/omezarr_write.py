"""OME-Zarr out: labels written slice by slice as an NGFF multiscale label image.

:class:`OmeZarrLabelsWriter` writes a (Z, H, W) or (H, W) labels array one slice at a time, with a
nearest-neighbour pyramid (each level halves rows and columns; z is kept) computed from each slice
as it arrives, so memory never holds more than one slice. It writes either

- a standalone label store (``labels.zarr``: a multiscale image with ``image-label`` metadata), or
- an NGFF ``labels/<name>`` group beside an OME-Zarr image (:meth:`OmeZarrLabelsWriter.beside`),
  listed in the image's ``labels`` metadata, so napari's OME-Zarr reader shows it over the image.

The NGFF metadata (multiscales, axes, coordinate transformations, image-label, the labels list) is
written by ome-zarr-py; the arrays are zarr arrays chunked (1, up to 1024, up to 1024).

Crash safety: the output is built in a sibling folder ``<name>.partial`` whose root carries the
attribute ``"napari_mobilesam": {"partial": true}`` and a progress file
(``mobilesam-progress.json``: the finished slices as [start, stop) runs, rewritten atomically
after each finished slice). Only
:meth:`~OmeZarrLabelsWriter.close` moves it into place, so a killed run never touches an existing
output and never leaves an incomplete store under the final name. ``resume=True`` reopens the
partial output and :attr:`~OmeZarrLabelsWriter.done` tells which slices are already written.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, OutputError
from ..files import atomic_write_text
from .omezarr import OmeZarrMetadata, _quiet_ome_zarr, ngff_unit, open_ome_zarr
from .stacks import StackMetadata

__all__ = ["OmeZarrLabelsWriter", "PARTIAL_SUFFIX", "PROGRESS_FILE", "partial_path"]

PARTIAL_SUFFIX = ".partial"
PROGRESS_FILE = "mobilesam-progress.json"
_MARK = "napari_mobilesam"
_CHUNK = 1024
_LABEL_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64))


def partial_path(path: str | os.PathLike) -> Path:
    """Where an unfinished output for ``path`` is built (``<path>.partial``)."""
    p = Path(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def _default_levels(h: int, w: int) -> int:
    """Levels until the longest side is at most 512 pixels (at most 8, sides stay >= 1)."""
    n = 1
    while n < 8 and max(h, w) >> (n - 1) > 512 and min(h, w) >> n >= 1:
        n += 1
    return n


def _ranges(zs: Iterable[int]) -> list[list[int]]:
    """Sorted slice indices as half-open [start, stop) runs: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    runs: list[list[int]] = []
    for z in sorted(zs):
        if runs and runs[-1][1] == z:
            runs[-1][1] = z + 1
        else:
            runs.append([z, z + 1])
    return runs


def _fmt(version: str | None):
    from ome_zarr.format import CurrentFormat, format_from_version

    return CurrentFormat() if version is None else format_from_version(str(version))


class OmeZarrLabelsWriter:
    """Write labels slice by slice into an OME-Zarr label image (see the module docstring).

    Parameters
    ----------
    path : the label image's folder: a standalone store (``labels.zarr``) or, for
        :meth:`beside`, ``image.zarr/labels/<name>``.
    shape : (Z, H, W) or (H, W)
    dtype : unsigned integer dtype of the labels (default uint32)
    metadata : StackMetadata or OmeZarrMetadata, optional
        Physical pixel size and unit (``meta.scale`` and ``meta.unit``; a TIFF's resolution works).
    voxel_size : per-axis physical pixel size, overriding ``metadata``
    axes : axis names (default ``("z", "y", "x")`` or ``("y", "x")``; ``"t"`` for a time-lapse)
    n_levels : pyramid levels including full resolution (default: halve until <= 512 pixels)
    chunks : (rows, cols) chunk size per slice (default up to 1024 x 1024)
    overwrite : replace an existing output (only when the new one is complete)
    resume : continue ``<path>.partial`` left by an interrupted run (see :attr:`done`)
    ngff_version : ``"0.4"`` (Zarr v2) or ``"0.5"`` (Zarr v3, ome-zarr-py's default)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        *,
        dtype: Any = np.uint32,
        metadata: StackMetadata | None = None,
        voxel_size: Sequence[float] | None = None,
        axes: Sequence[str] | None = None,
        n_levels: int | None = None,
        chunks: Sequence[int] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        ngff_version: str | None = None,
        _label_name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) not in (2, 3) or min(self.shape) < 1:
            raise InputError(f"labels shape must be (Z, H, W) or (H, W), got {tuple(shape)!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in _LABEL_DTYPES:
            raise InputError(f"labels are written as unsigned integers (uint8..uint64), not {self.dtype}")
        h, w = self.shape[-2:]
        self.n_levels = int(n_levels) if n_levels is not None else _default_levels(h, w)
        if not 1 <= self.n_levels <= 16 or min(h, w) >> (self.n_levels - 1) < 1:
            raise InputError(f"n_levels={n_levels} is not possible for slices of {h} x {w} pixels")
        self.chunks = tuple(int(c) for c in (chunks or (min(h, _CHUNK), min(w, _CHUNK))))
        self.axes = tuple(axes or (("z", "y", "x") if len(self.shape) == 3 else ("y", "x")))
        if len(self.axes) != len(self.shape):
            raise InputError(f"axes {self.axes} do not match the labels shape {self.shape}")
        self.voxel_size, self.unit = self._physical(metadata, voxel_size)
        self.fmt = _fmt(ngff_version)
        self.label_name = _label_name  # set by beside(): also list it in the image's labels group
        self.partial = partial_path(self.path)
        self.done: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._check_target(overwrite, resume)
        with _quiet_ome_zarr():
            if resume and self.partial.exists():
                self._reopen()
            else:
                if self.partial.exists():
                    shutil.rmtree(self.partial)
                self._create()

    # -- setup --------------------------------------------------------------------------------
    def _physical(self, metadata, voxel_size) -> tuple[tuple[float, ...], str | None]:
        n = len(self.shape)
        unit = ngff_unit(getattr(metadata, "unit", None)) if metadata is not None else None
        if voxel_size is not None:
            vs = tuple(float(v) for v in voxel_size)
            if len(vs) != n:
                raise InputError(f"voxel_size {vs} needs one value per axis {self.axes}")
        elif isinstance(metadata, OmeZarrMetadata) and metadata.voxel_size:
            vs = tuple(metadata.voxel_size[i] for i in metadata.spatial_shape_index)[-n:]
            unit = ngff_unit(metadata.units[-1] if metadata.units else None) or unit
        elif metadata is not None and metadata.scale is not None:
            vs = tuple(metadata.scale)[-n:]
        else:
            vs = (1.0,) * n
        if len(vs) != n or any(not np.isfinite(v) or v <= 0 for v in vs):
            raise InputError(f"voxel sizes must be positive, got {vs}")
        return vs, unit

    def _check_target(self, overwrite: bool, resume: bool) -> None:
        if self.partial.exists() and not resume and not overwrite:
            raise OutputError(
                f"an unfinished output from an interrupted run is at {self.partial}: pass resume=True "
                "(--resume) to continue it, or overwrite=True (--overwrite) to start again"
            )
        # resuming continues a run that was allowed to replace the output (it is replaced on close)
        if self.path.exists() and not overwrite and not (resume and self.partial.exists()):
            raise OutputError(
                f"output {self.path} already exists; pass overwrite=True (--overwrite) to replace it"
            )
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"output {self.path} is a file; an OME-Zarr output is a folder (e.g. labels.zarr)")
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise OutputError(f"cannot write to folder {parent}")

    def _level_shapes(self) -> list[tuple[int, ...]]:
        shapes = [self.shape]
        for _ in range(1, self.n_levels):
            s = shapes[-1]
            shapes.append((*s[:-2], s[-2] // 2, s[-1] // 2))
        return shapes

    def _axes_dicts(self) -> list[dict[str, str]]:
        out = []
        for a in self.axes:
            d = {"name": a, "type": "time" if a == "t" else "space"}
            if self.unit and a != "t":
                d["unit"] = self.unit
            out.append(d)
        return out

    def _progress(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype.str, "n_levels": self.n_levels,
                "chunks": list(self.chunks), "ngff_version": self.fmt.version,
                "done": _ranges(self.done)}

    def _create(self) -> None:
        import zarr
        from ome_zarr.writer import add_metadata, write_multiscales_metadata

        group = zarr.open_group(str(self.partial), mode="w", zarr_format=self.fmt.zarr_format)
        shapes = self._level_shapes()
        datasets = []
        transforms = self.fmt.generate_coordinate_transformations(shapes)
        for k, s in enumerate(shapes):
            kw: dict[str, Any] = {}
            if self.fmt.zarr_format == 2:
                kw["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
            else:
                kw["dimension_names"] = list(self.axes)
            ch = (1,) * (len(s) - 2) + (min(s[-2], self.chunks[0]), min(s[-1], self.chunks[1]))
            group.create_array(f"s{k}", shape=s, chunks=ch, dtype=self.dtype, fill_value=0, **kw)
            tr = transforms[k] if transforms else [{"type": "scale", "scale": [1.0] * len(s)}]
            tr[0]["scale"] = [float(a) * float(b) for a, b in zip(tr[0]["scale"], self.voxel_size, strict=True)]
            datasets.append({"path": f"s{k}", "coordinateTransformations": tr})
        write_multiscales_metadata(group, datasets=datasets, fmt=self.fmt, axes=self._axes_dicts(),
                                   name=self.label_name or self.path.stem)
        if self.label_name is None:  # standalone: the root is the label image
            add_metadata(group, {"image-label": {"version": self.fmt.version}}, fmt=self.fmt)
        group.attrs[_MARK] = {"partial": True, "final_path": self.path.name}
        self._group = group
        atomic_write_text(self.partial / PROGRESS_FILE, json.dumps(self._progress()))

    def _reopen(self) -> None:
        import zarr

        record = self.partial / PROGRESS_FILE
        if not record.exists():
            group = zarr.open_group(str(self.partial), mode="r+")
            if _MARK not in group.attrs and tuple(group["s0"].shape) == self.shape:
                # killed while close() moved a finished output into place: it is complete
                self._group, self.done = group, set(range(self.n_slices))
                return
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise OutputError(
                f"cannot resume {self.partial}: its progress record {record.name} is unreadable ({e}); "
                "pass overwrite=True (--overwrite) to start again"
            ) from None
        mine = self._progress()
        for key in ("shape", "dtype", "n_levels", "chunks", "ngff_version"):
            if saved.get(key) != mine[key]:
                raise OutputError(
                    f"cannot resume {self.partial}: it was started with {key}={saved.get(key)!r}, "
                    f"this run has {key}={mine[key]!r}; pass overwrite=True (--overwrite) to start again"
                )
        self._group = zarr.open_group(str(self.partial), mode="r+")
        self.done = {z for start, stop in saved.get("done", []) for z in range(int(start), int(stop))}

    # -- writing ------------------------------------------------------------------------------
    @property
    def n_slices(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    def pending(self, zs: Iterable[int] | None = None) -> list[int]:
        """The slices of ``zs`` (default: all) not written yet, in order."""
        zs = range(self.n_slices) if zs is None else zs
        return [int(z) for z in zs if int(z) not in self.done]

    def put(self, z: int, labels_slice: np.ndarray) -> None:
        """Write slice ``z`` ((H, W) integer labels; z = 0 for a 2D output) and its pyramid levels,
        then record it as done. Slices may come in any order and from several threads."""
        if self._closed:
            raise OutputError(f"{self.path}: the writer is closed")
        z = int(z)
        if not 0 <= z < self.n_slices:
            raise InputError(f"slice {z} is out of range: the output has {self.n_slices} slices")
        a = np.asarray(labels_slice)
        if a.shape != self.shape[-2:]:
            raise InputError(f"slice shape {a.shape} does not match the output's {self.shape[-2:]}")
        if a.dtype.kind not in "biu":
            raise InputError(f"labels must be integers, got {a.dtype}")
        if a.size and (a.min() < 0 or int(a.max()) > np.iinfo(self.dtype).max):
            raise InputError(f"label ids must lie in 0..{np.iinfo(self.dtype).max} for {self.dtype} output")
        try:
            for k in range(self.n_levels):
                self._put_level(k, z, a[:: 1 << k, :: 1 << k])
        except Exception as e:
            raise OutputError(f"writing slice {z} to {self.partial} failed: {e}") from e
        with self._lock:
            self.done.add(z)
            atomic_write_text(self.partial / PROGRESS_FILE, json.dumps(self._progress()))

    def _put_level(self, k: int, z: int, a: np.ndarray) -> None:
        """Write ``a`` (level 0 subsampled by ``2**k``: nearest neighbour, so no new label
        values) as slice ``z`` of level ``k``, one row of chunks at a time: what is converted to
        the output dtype at once is one chunk row, not the slice."""
        arr = self._group[f"s{k}"]
        h, w = arr.shape[-2:]
        step = arr.chunks[-2]
        for r0 in range(0, h, step):
            r1 = min(r0 + step, h)
            band = np.asarray(a[r0:r1, :w], dtype=self.dtype)
            if len(self.shape) == 3:
                arr[z, r0:r1] = band
            else:
                arr[r0:r1] = band

    def read(self, z: int) -> np.ndarray:
        """Slice ``z`` as written (full resolution), e.g. one an interrupted run finished."""
        arr = self._group["s0"]
        return np.asarray(arr[int(z)] if len(self.shape) == 3 else arr[...])

    def write(self, labels_slice: np.ndarray) -> None:
        """Write the first slice not written yet (``LabelsTiffWriter``-style sequential use)."""
        left = self.pending()
        if not left:
            raise InputError(f"all {self.n_slices} slices are already written")
        self.put(left[0], labels_slice)

    # -- finishing ----------------------------------------------------------------------------
    def close(self, *, ok: bool = True) -> None:
        """``ok=True``: finish the output (unwritten slices stay 0) and move it into place,
        replacing an existing one. ``ok=False``: keep the partial output for ``resume=True``."""
        if self._closed:
            return
        self._closed = True
        if not ok:
            return
        with _quiet_ome_zarr():
            del self._group.attrs[_MARK]
            (self.partial / PROGRESS_FILE).unlink(missing_ok=True)
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(self.partial, self.path)
            shutil.rmtree(old, ignore_errors=True)
            if self.label_name is not None:
                self._register_label()

    def discard(self) -> None:
        """Delete the partial output (nothing is kept for a resume)."""
        self._closed = True
        shutil.rmtree(self.partial, ignore_errors=True)

    def _register_label(self) -> None:
        """List the label in the image's ``labels`` group (ome-zarr-py writes the metadata)."""
        import zarr
        from ome_zarr.writer import add_metadata, get_metadata, write_label_metadata

        labels_dir = self.path.parent
        group = zarr.open_group(str(labels_dir), mode="a", zarr_format=self.fmt.zarr_format)
        names = [n for n in get_metadata(group).get("labels", []) if n != self.label_name]
        add_metadata(group, {"labels": names}, fmt=self.fmt)
        write_label_metadata(group, self.label_name, fmt=self.fmt)

    def __enter__(self) -> OmeZarrLabelsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    # -- beside an image ----------------------------------------------------------------------
    @classmethod
    def beside(
        cls,
        image: str | os.PathLike,
        name: str = "mobilesam",
        *,
        level: int = 0,
        timepoint: int | None = None,
        n_levels: int | None = None,
        **kwargs: Any,
    ) -> OmeZarrLabelsWriter:
        """A writer for ``image/labels/<name>``: labels for ``level`` of the OME-Zarr ``image``,
        with its spatial axes, shape and pixel size, in the image's NGFF version. The default
        pyramid has as many levels as the image has from ``level`` on."""
        if not name or "/" in name or name.startswith(".") or name == "labels":
            raise InputError(f"label name {name!r} is not a valid folder name")
        data, meta = open_ome_zarr(image, level=level, timepoint=timepoint)
        axes = meta.spatial_axes
        shape = tuple(int(data.shape[i]) for i in meta.spatial_shape_index)
        if n_levels is None:
            h, w = shape[-2:]
            n_levels = max(1, len(meta.levels) - level)
            while n_levels > 1 and min(h, w) >> (n_levels - 1) < 1:
                n_levels -= 1
        # the labels must use the image's Zarr format: 0.4 for Zarr v2 stores (0.1-0.4), else 0.5
        version = "0.5" if meta.ngff_version not in ("0.1", "0.2", "0.3", "0.4") else "0.4"
        if kwargs.get("ngff_version") not in (None, version):
            raise InputError(
                f"the image {image} is OME-Zarr {meta.ngff_version}: labels beside it are written "
                f"as {version}, not {kwargs['ngff_version']}"
            )
        kwargs["ngff_version"] = version
        target = Path(meta.store) / "labels" / name
        return cls(target, shape, metadata=meta, axes=axes, n_levels=n_levels, _label_name=name, **kwargs)
