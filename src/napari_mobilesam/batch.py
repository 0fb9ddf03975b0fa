"""Whole stacks from scripts: prompts files, segmentation, propagation, automatic mode, dask.

Everything here works without napari (a viewer is optional: pass ``viewer=`` and the result is
added as a Labels layer). Coordinates are napari's: stacks are (z, row, col), points are
(z, row, col), boxes are (z, row0, col0, row1, col1).

Main entry points
-----------------
- :func:`read_prompts_csv`, :func:`prompts_from_points`, :func:`prompts_from_shapes`,
  :func:`prompts_from_arrays` -> :class:`Prompts`
- :func:`segment_stack` — each object on the slices where it has prompts.
- :func:`propagate_stack` — objects prompted on some slices, followed through z.
- :func:`segment_stack_auto` — automatic instance segmentation, stitched through z.
- :func:`open_stack` / :func:`read_stack_metadata` / :func:`LabelsTiffWriter` — TIFF in and out,
  lazily (one page at a time), keeping the resolution metadata.

Stacks larger than memory: give a dask array (or a lazily opened TIFF from :func:`open_stack`) and
``out="labels.tif"``: slices are read, segmented and written one at a time, so memory is bounded by
the embedding cache budget (``cache_bytes``) rather than by the stack. With ``client=`` (a
``dask.distributed.Client``) slices are spread over the cluster's workers; each worker loads the
model once and keeps it for every later slice.
"""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .automatic import AutoParams, Stitcher, segment_slice

__all__ = [
    "Prompts",
    "PromptsError",
    "StackMetadata",
    "BatchError",
    "read_prompts_csv",
    "prompts_from_points",
    "prompts_from_shapes",
    "prompts_from_arrays",
    "segment_stack",
    "propagate_stack",
    "segment_stack_auto",
    "open_stack",
    "read_stack_metadata",
    "LabelsTiffWriter",
    "add_labels_layer",
    "parse_z_range",
    "preload_model_on_workers",
]

LABELS_DTYPE = np.int32
# Batch runs visit each slice once: a small embedding cache is enough (one slice is 2 MiB).
DEFAULT_CACHE_BYTES = 64 * 2**20
MIN_AUTO_CACHE_BYTES = 4 * 2**20  # automatic mode decodes a slice in several calls


class BatchError(ValueError):
    """A batch job cannot run as asked (bad input file, shapes that don't fit, existing output)."""


class PromptsError(BatchError):
    """A prompts table (CSV, Points/Shapes data, arrays) is malformed or does not fit the stack."""


# =========================================================================== prompts


@dataclass
class Prompts:
    """Point and box prompts for several objects through a stack.

    Attributes
    ----------
    points : (N, 3) float64
        Point positions in (z, row, col) pixels.
    point_labels : (N,) int8
        1 for a positive point (on the object), 0 for a negative one (not on it).
    point_ids : (N,) int64
        Object id (>= 1) of each point; the same id on several slices is the same object.
    boxes : (M, 5) float64
        Boxes as (z, row0, col0, row1, col1) with row0 <= row1 and col0 <= col1.
    box_ids : (M,) int64
        Object id (>= 1) of each box.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    point_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    box_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, np.float64).reshape(-1, 3)
        self.point_labels = np.asarray(self.point_labels).astype(np.int8).reshape(-1)
        self.point_ids = np.asarray(self.point_ids).astype(np.int64).reshape(-1)
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 5)
        self.box_ids = np.asarray(self.box_ids).astype(np.int64).reshape(-1)
        n, m = len(self.points), len(self.boxes)
        if len(self.point_labels) != n or len(self.point_ids) != n:
            raise PromptsError(
                f"{n} points need {n} labels and {n} object ids, got {len(self.point_labels)} "
                f"labels and {len(self.point_ids)} ids"
            )
        if len(self.box_ids) != m:
            raise PromptsError(f"{m} boxes need {m} object ids, got {len(self.box_ids)}")
        if not np.isfinite(self.points).all() or not np.isfinite(self.boxes).all():
            raise PromptsError("prompt coordinates must be finite numbers (found NaN or inf)")
        if not np.isin(self.point_labels, (0, 1)).all():
            raise PromptsError(
                f"point labels must be 1 (positive) or 0 (negative), got "
                f"{sorted(set(self.point_labels.tolist()) - {0, 1})}"
            )
        if (self.point_ids < 1).any() or (self.box_ids < 1).any():
            raise PromptsError("object ids must be integers >= 1 (0 is the background)")
        if m and ((self.boxes[:, 1] > self.boxes[:, 3]) | (self.boxes[:, 2] > self.boxes[:, 4])).any():
            raise PromptsError("boxes must be (z, row0, col0, row1, col1) with row0 <= row1 and col0 <= col1")

    def __len__(self) -> int:
        return len(self.points) + len(self.boxes)

    @property
    def object_ids(self) -> np.ndarray:
        """(K,) int64 sorted ids of every object with at least one prompt."""
        return np.unique(np.concatenate([self.point_ids, self.box_ids]))

    @property
    def slices(self) -> np.ndarray:
        """(S,) int64 sorted indices of the slices holding prompts."""
        zs = np.concatenate([self.points[:, 0], self.boxes[:, 0]])
        return np.unique(np.round(zs).astype(np.int64))

    def validate(self, shape: Sequence[int]) -> None:
        """Check every prompt lies inside a stack of ``shape`` (Z, H, W); raise PromptsError if not.

        Also checks each object has something to segment on every slice it is prompted on (at least
        one positive point or a box), and that z values are whole slice indices.
        """
        z_n, h, w = (int(s) for s in shape)
        if len(self) == 0:
            raise PromptsError("there are no prompts: give at least one positive point or a box")
        zs = np.concatenate([self.points[:, 0], self.boxes[:, 0]])
        if np.abs(zs - np.round(zs)).max(initial=0) > 1e-6:
            raise PromptsError("z must be a whole slice index (found a fractional z)")
        for what, z, r, c in (
            ("point", self.points[:, 0], self.points[:, 1], self.points[:, 2]),
            ("box corner", self.boxes[:, 0], self.boxes[:, 1], self.boxes[:, 2]),
            ("box corner", self.boxes[:, 0], self.boxes[:, 3], self.boxes[:, 4]),
        ):
            bad = (np.round(z) < 0) | (np.round(z) >= z_n) | (r < -0.5) | (r > h - 0.5) | (c < -0.5) | (c > w - 0.5)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise PromptsError(
                    f"{int(bad.sum())} {what}(s) lie outside the stack of shape (Z={z_n}, H={h}, "
                    f"W={w}), e.g. (z={z[i]:g}, row={r[i]:g}, col={c[i]:g}). Coordinates are "
                    "(z, row, col) in pixels: check the column order and the image's scale"
                )
        for oid, z, item in self.iter_objects():
            if item["box"] is None and not (item["labels"] == 1).any():
                raise PromptsError(
                    f"object {oid} on slice {z} has only negative points: add a positive point "
                    "or a box"
                )

    def iter_objects(self) -> Iterator[tuple[int, int, dict]]:
        """Yield ``(object_id, z, prompt)`` for each object on each slice it is prompted on.

        ``prompt`` is ``{"points": (k, 2) float64 (row, col), "labels": (k,) int64,
        "box": (4,) float64 (row0, col0, row1, col1) or None}``; with several boxes for one object
        on one slice, their union box is used.
        """
        pz = np.round(self.points[:, 0]).astype(np.int64)
        bz = np.round(self.boxes[:, 0]).astype(np.int64)
        keys = sorted(set(zip(self.point_ids.tolist(), pz.tolist())) | set(zip(self.box_ids.tolist(), bz.tolist())))
        for oid, z in keys:
            sel = (self.point_ids == oid) & (pz == z)
            bsel = (self.box_ids == oid) & (bz == z)
            box = None
            if bsel.any():
                b = self.boxes[bsel, 1:]
                box = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])
            yield int(oid), int(z), {
                "points": self.points[sel, 1:].copy(),
                "labels": self.point_labels[sel].astype(np.int64),
                "box": box,
            }

    def on_slice(self, z: int) -> list[tuple[int, dict]]:
        """``[(object_id, prompt), ...]`` for slice ``z`` (see :meth:`iter_objects`)."""
        return [(oid, item) for oid, zz, item in self.iter_objects() if zz == z]

    def __add__(self, other: Prompts) -> Prompts:
        return Prompts(
            np.concatenate([self.points, other.points]),
            np.concatenate([self.point_labels, other.point_labels]),
            np.concatenate([self.point_ids, other.point_ids]),
            np.concatenate([self.boxes, other.boxes]),
            np.concatenate([self.box_ids, other.box_ids]),
        )


_CSV_ALIASES = {
    "z": ("z", "axis-0", "slice", "plane"),
    "row": ("row", "axis-1", "y"),
    "col": ("col", "column", "axis-2", "x"),
    "label": ("label", "positive", "polarity", "point_label"),
    "object_id": ("object_id", "object id", "object", "id", "obj", "object-id"),
}


def read_prompts_csv(path: str | os.PathLike) -> Prompts:
    """Read point prompts from a CSV file with a header row.

    Columns (any order, case-insensitive; extra columns are ignored):

    - ``z``, ``row``, ``col`` — the point in (z, row, col) pixels (napari's Points CSV export
      names them ``axis-0``, ``axis-1``, ``axis-2``; those are accepted too);
    - ``label`` — 1 (or true/positive) for a point on the object, 0 (or false/negative) for a
      point off it; optional, default 1;
    - ``object_id`` — integer >= 1 naming the object; optional only when every point is positive
      (then each point is its own object).

    A 2D table (no z column) puts every point on slice 0.

    Returns
    -------
    Prompts

    Raises
    ------
    PromptsError
        Unreadable file, missing columns, or a bad value (the message gives the line number).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptsError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptsError(f"cannot read prompts file {path}: {e}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise PromptsError(f"prompts file {path} is empty: it needs a header row and one row per point")
    try:
        dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(lines, dialect))
    header = [h.strip().lower() for h in rows[0]]
    cols: dict[str, int] = {}
    for key, names in _CSV_ALIASES.items():
        for name in names:
            if name in header:
                cols[key] = header.index(name)
                break
    missing = [k for k in ("row", "col") if k not in cols]
    if missing:
        raise PromptsError(
            f"prompts file {path} lacks column(s) {missing}; its header is {rows[0]}. Expected "
            "columns: z,row,col,label,object_id (coordinates in pixels, napari's order)"
        )
    pts, labs, ids = [], [], []
    for lineno, row in enumerate(rows[1:], start=2):
        def get(key, default=None):
            if key not in cols:
                return default
            i = cols[key]
            if i >= len(row) or not row[i].strip():
                raise PromptsError(f"{path}, line {lineno}: missing value for column {header[i]!r}")
            return row[i].strip()

        zrc = (get("z", "0"), get("row"), get("col"))
        try:
            z, r, c = (float(v) for v in zrc)
        except ValueError:
            raise PromptsError(f"{path}, line {lineno}: z, row and col must be numbers, got {row}") from None
        lab = get("label", "1").lower()
        if lab in ("1", "1.0", "true", "positive", "pos", "+"):
            lab_v = 1
        elif lab in ("0", "0.0", "false", "negative", "neg", "-", "-1"):
            lab_v = 0
        else:
            raise PromptsError(
                f"{path}, line {lineno}: label must be 1 (positive) or 0 (negative), got {lab!r}"
            )
        oid = get("object_id")
        if oid is None:
            if lab_v == 0:
                raise PromptsError(
                    f"{path}, line {lineno}: a negative point needs an object_id column saying "
                    "which object it belongs to"
                )
            oid_v = len(ids) + 1
        else:
            try:
                oid_f = float(oid)
            except ValueError:
                oid_f = -1.0
            if oid_f != int(oid_f) or oid_f < 1:
                raise PromptsError(
                    f"{path}, line {lineno}: object_id must be a whole number >= 1, got {oid!r}"
                )
            oid_v = int(oid_f)
        pts.append((z, r, c))
        labs.append(lab_v)
        ids.append(oid_v)
    if not pts:
        raise PromptsError(f"prompts file {path} has a header but no points")
    return Prompts(np.array(pts), np.array(labs), np.array(ids))


def _feature(features: Any, names: Sequence[str]) -> np.ndarray | None:
    if features is None:
        return None
    for name in names:
        try:
            col = features[name]
        except (KeyError, IndexError, TypeError):
            continue
        return np.asarray(col)
    return None


def prompts_from_points(
    data: np.ndarray,
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    object_ids: Sequence[int] | np.ndarray | None = None,
    features: Any = None,
) -> Prompts:
    """Prompts from napari Points data.

    Parameters
    ----------
    data : (N, 3) or (N, 2) float
        ``points_layer.data``: (z, row, col), or (row, col) for a 2D image (slice 0). Use data
        coordinates (napari's layer data, not world coordinates).
    labels : (N,) int or bool, optional
        1/True positive, 0/False negative. Default: ``features["label"]`` (or ``"positive"``) when
        present, else all positive.
    object_ids : (N,) int, optional
        Default: ``features["object_id"]`` when present, else each point its own object.
    features : DataFrame or mapping, optional
        ``points_layer.features``.
    """
    data = np.asarray(data, np.float64)
    if data.ndim != 2 or data.shape[1] not in (2, 3):
        raise PromptsError(f"points data must be (N, 2) or (N, 3), got shape {data.shape}")
    if data.shape[1] == 2:
        data = np.concatenate([np.zeros((len(data), 1)), data], axis=1)
    if labels is None:
        labels = _feature(features, ("label", "positive", "point_label"))
    if labels is None:
        labels = np.ones(len(data), np.int8)
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.int8)
    if object_ids is None:
        object_ids = _feature(features, ("object_id", "object", "id"))
    if object_ids is None:
        if (np.asarray(labels) == 0).any():
            raise PromptsError("negative points need object_ids saying which object each belongs to")
        object_ids = np.arange(1, len(data) + 1)
    if len(labels) != len(data) or len(object_ids) != len(data):
        raise PromptsError(
            f"{len(data)} points need as many labels and object ids, got {len(labels)} and "
            f"{len(object_ids)}"
        )
    return Prompts(data, labels, object_ids)


def prompts_from_shapes(
    data: Sequence[np.ndarray],
    *,
    object_ids: Sequence[int] | np.ndarray | None = None,
    shape_types: Sequence[str] | None = None,
) -> Prompts:
    """Box prompts from napari Shapes data (rectangles).

    Parameters
    ----------
    data : list of (4, 3) or (4, 2) arrays
        ``shapes_layer.data``: each rectangle's corners in (z, row, col) (all four on one slice) or
        (row, col) for a 2D image. The axis-aligned bounding box of the corners is used.
    object_ids : (M,) int, optional
        Default: each box its own object, numbered 1..M.
    shape_types : list of str, optional
        ``shapes_layer.shape_type``; only ``"rectangle"`` is accepted.
    """
    boxes = []
    for i, verts in enumerate(data):
        v = np.asarray(verts, np.float64)
        if shape_types is not None and shape_types[i] != "rectangle":
            raise PromptsError(f"shape {i} is a {shape_types[i]!r}; only rectangles can be box prompts")
        if v.ndim != 2 or v.shape[1] not in (2, 3) or len(v) < 2:
            raise PromptsError(f"shape {i} must be (4, 3) or (4, 2) corner coordinates, got {v.shape}")
        if v.shape[1] == 2:
            v = np.concatenate([np.zeros((len(v), 1)), v], axis=1)
        if np.ptp(v[:, 0]) > 1e-6:
            raise PromptsError(f"rectangle {i} is not on one slice (its corners have z {v[:, 0]})")
        boxes.append((v[0, 0], v[:, 1].min(), v[:, 2].min(), v[:, 1].max(), v[:, 2].max()))
    ids = np.arange(1, len(boxes) + 1) if object_ids is None else np.asarray(object_ids)
    if len(ids) != len(boxes):
        raise PromptsError(f"{len(boxes)} boxes need {len(boxes)} object ids, got {len(ids)}")
    return Prompts(boxes=np.array(boxes).reshape(-1, 5), box_ids=ids)


def prompts_from_arrays(
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    object_ids: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    box_ids: np.ndarray | None = None,
) -> Prompts:
    """Prompts from plain arrays: ``points`` (N, 3) (z, row, col), ``labels`` (N,) 1/0 (default
    all positive), ``object_ids`` (N,) (default 1..N), ``boxes`` (M, 5) (z, row0, col0, row1,
    col1), ``box_ids`` (M,) (default continuing after the points' ids)."""
    pts = prompts_from_points(np.zeros((0, 3)) if points is None else points, labels=labels,
                              object_ids=object_ids)
    if boxes is None:
        return pts
    boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
    if box_ids is None:
        start = int(pts.point_ids.max(initial=0))
        box_ids = np.arange(start + 1, start + 1 + len(boxes))
    return pts + Prompts(boxes=boxes, box_ids=box_ids)


def _as_prompts(prompts: Any) -> Prompts:
    if isinstance(prompts, Prompts):
        return prompts
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts_csv(prompts)
    # napari layers (duck-typed: no napari import here)
    layer_type = type(prompts).__name__
    if layer_type == "Points":
        return prompts_from_points(prompts.data, features=prompts.features)
    if layer_type == "Shapes":
        return prompts_from_shapes(prompts.data, shape_types=list(prompts.shape_type))
    arr = np.asarray(prompts, np.float64)
    if arr.ndim == 2 and arr.shape[1] in (2, 3):
        return prompts_from_points(arr)
    raise PromptsError(
        "prompts must be a Prompts object, a CSV path, a napari Points or Shapes layer, or an "
        f"(N, 3) array of (z, row, col) points; got {type(prompts).__name__}"
    )


# =========================================================================== stacks and TIFF I/O


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
    """

    resolution: tuple[float, float] | None = None
    resolution_unit: int | None = None
    spacing: float | None = None
    unit: str | None = None

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
        meta = StackMetadata()
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
        raise BatchError(f"input file not found: {path}")
    if path.is_dir():
        raise BatchError(f"input {path} is a folder; give a TIFF file")
    try:
        return tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises several types for garbage
        raise BatchError(f"cannot read {path} as a TIFF file: {e}") from None


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
                raise BatchError(f"cannot decode the image data in {path}: {e}") from None
    import dask
    import dask.array as da

    path_s = str(Path(path))
    reader = dask.delayed(_read_page, pure=True)
    parts = [da.from_delayed(reader(path_s, i), page_shape, dtype) for i in range(len(pages))]
    arr = da.stack(parts).reshape(shape)
    return arr, meta


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
    end are written as zeros on close). The file is written to ``<name>.partial`` and renamed when
    complete, so an interrupted run never leaves a truncated file under the final name and never
    replaces an existing file with a broken one.

    Parameters
    ----------
    path : output file (``.tif``/``.tiff``)
    shape : (Z, H, W)
    dtype : uint16 or uint32 (default uint32)
    metadata : StackMetadata, optional
        Resolution (and z spacing/unit) copied from the input.
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
        check_output_path(self.path, overwrite)
        if len(shape) != 3:
            raise ValueError(f"shape must be (Z, H, W), got {shape!r}")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"labels are written as uint16 or uint32, not {self.dtype}")
        self.metadata = metadata or StackMetadata()
        self.compression = compression
        self.overwrite = overwrite
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._queue: list[np.ndarray] = []
        self._next = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    def __enter__(self) -> LabelsTiffWriter:
        import tifffile

        meta = self.metadata
        kwargs: dict[str, Any] = {}
        if meta.resolution is not None:
            kwargs["resolution"] = tuple(float(v) for v in meta.resolution)
            if meta.resolution_unit is not None:
                kwargs["resolutionunit"] = int(meta.resolution_unit)
        md: dict[str, Any] = {"axes": "ZYX"}
        if meta.spacing is not None:
            md["spacing"] = float(meta.spacing)
        if meta.unit is not None:
            md["unit"] = str(meta.unit)
        self._partial.parent.mkdir(parents=True, exist_ok=True)
        self._tw = tifffile.TiffWriter(self._partial, bigtiff=self._nbytes() > 2**31)

        def run():
            try:
                self._tw.write(
                    self._pages(), shape=self.shape, dtype=self.dtype,
                    compression=self.compression, photometric="minisblack", metadata=md,
                    **kwargs,
                )
            except BaseException as e:  # surfaced in write()/close()
                self._error = e
                with self._cond:
                    self._cond.notify_all()

        self._thread = threading.Thread(target=run, name="labels-tiff-writer", daemon=True)
        self._thread.start()
        return self

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
            raise BatchError(f"writing {self.path} failed: {self._error}") from self._error
        a = np.asarray(labels_slice)
        if a.shape != self.shape[1:]:
            raise ValueError(f"slice shape {a.shape} does not match the stack's {self.shape[1:]}")
        if self._next >= self.shape[0]:
            raise ValueError(f"all {self.shape[0]} slices are already written")
        if a.size and (a.min() < 0 or a.max() > np.iinfo(self.dtype).max):
            raise BatchError(f"label ids must lie in 0..{np.iinfo(self.dtype).max} for {self.dtype} output")
        with self._cond:
            while len(self._queue) >= 2 and self._error is None:  # bounded: no pile-up in memory
                self._cond.wait(0.1)
            self._queue.append(a.astype(self.dtype))
            self._next += 1
            self._cond.notify_all()

    def close(self, *, ok: bool = True) -> None:
        """Finish the file (remaining slices as zeros) and move it into place; ``ok=False``
        discards the partial file."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._tw.close()
        if ok and self._error is None:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)
            if self._error is not None and ok:
                raise BatchError(f"writing {self.path} failed: {self._error}") from self._error

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace an existing file unless ``overwrite``; check the folder is writable."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise BatchError(f"output {path} already exists; pass overwrite=True (--overwrite) to replace it")
    if path.is_dir():
        raise BatchError(f"output {path} is a folder; give a file name such as labels.tif")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise BatchError(f"cannot write to folder {parent}")
    return path


def parse_z_range(z_range: Any, n_slices: int) -> range:
    """Slices to process: ``None`` (all), ``(start, stop)`` (half-open, like ``range``; ``None``
    ends allowed, negative values count from the end) or a ``"start:stop"`` string."""
    if z_range is None:
        return range(n_slices)
    if isinstance(z_range, str):
        parts = z_range.split(":")
        if len(parts) != 2:
            raise BatchError(f"z range must look like START:STOP (e.g. 10:50), got {z_range!r}")
        try:
            z_range = tuple(int(p) if p.strip() else None for p in parts)
        except ValueError:
            raise BatchError(f"z range must be two integers START:STOP, got {z_range!r}") from None
    try:
        start, stop = z_range
    except (TypeError, ValueError):
        raise BatchError(f"z_range must be (start, stop), got {z_range!r}") from None
    r = range(n_slices)[slice(start, stop)]
    if len(r) == 0:
        raise BatchError(f"z range {z_range!r} selects no slices of a stack with {n_slices} slices")
    return r


# =========================================================================== models


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model: picklable, so dask workers can load it themselves."""

    model: str = "vit_t"
    checkpoint: str | None = None
    device: str | None = None
    backend: str = "auto"
    precision: str = "auto"

    def load(self):
        """Build the model (see ``build.load_model``)."""
        return _load_model(self.model, self.checkpoint, self.device, self.backend, self.precision)


def _load_model(model, checkpoint, device, backend, precision):
    """``build.load_model``; the exact eager model on the CPU needs no backend machinery."""
    from .build import build_sam, load_model

    if backend == "eager" and (device is None or str(device) == "cpu") and precision in ("auto", "fp32"):
        return build_sam(model, checkpoint)
    return load_model(model, checkpoint, device, backend=backend, precision=precision)


def _resolve_model(model: Any, checkpoint: Any, device: Any, backend: str, precision: str):
    """(sam, spec): ``model`` is a name (loaded here) or an already built ``Sam`` (spec None)."""
    if isinstance(model, str):
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = str(Path(checkpoint).expanduser())
        sam = _load_model(model, checkpoint, device, backend, precision)
        return sam, None
    if hasattr(model, "image_encoder") and hasattr(model, "mask_decoder"):
        return model, None
    raise TypeError(f"model must be a model name such as 'vit_t' or a Sam model, not {type(model).__name__}")


def _image_data(image: Any) -> tuple[Any, dict]:
    """Array and SliceSource options from an array or a napari Image layer (duck-typed)."""
    if type(image).__name__ == "Image" and hasattr(image, "data"):
        data = image.data
        if getattr(image, "multiscale", False):
            data = data[0]
        return data, {"rgb": bool(getattr(image, "rgb", False))}
    return image, {}


def _make_source(image: Any, channel_axis: int | None, normalize: str):
    from .image import SliceSource

    if isinstance(image, SliceSource):
        return image
    data, opts = _image_data(image)
    if channel_axis is not None:
        opts["channel_axis"] = channel_axis
    return SliceSource(data, normalize=normalize, **opts)


# =========================================================================== progress


def _progress_callback(progress: Any, total: int, desc: str):
    """Return (update(n=1), close()) for ``progress``: None, True (tqdm bar) or a callable."""
    if progress is None or progress is False:
        return (lambda n=1: None), (lambda: None)
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="slice")
        return bar.update, bar.close
    if callable(progress):
        done = [0]

        def update(n=1):
            done[0] += n
            progress(done[0], total)

        return update, (lambda: None)
    raise TypeError("progress must be None, True (a progress bar) or a callable(done, total)")


# =========================================================================== outputs


class _Output:
    """Collect slices in memory or stream them to a TIFF file."""

    def __init__(self, shape, out, overwrite, metadata, dtype):
        self.shape = tuple(shape)
        self.out = out
        if out is None:
            self.array = np.zeros(self.shape, LABELS_DTYPE)
            self.writer = None
        else:
            self.array = None
            self.writer = LabelsTiffWriter(out, self.shape, dtype=dtype, metadata=metadata,
                                           overwrite=overwrite)
        self._z = 0

    def __enter__(self):
        if self.writer is not None:
            self.writer.__enter__()
        return self

    def put(self, z: int, sl: np.ndarray) -> None:
        """Slices must come in increasing z; skipped ones are zeros."""
        if self.writer is None:
            self.array[z] = sl
            return
        while self._z < z:
            self.writer.write(np.zeros(self.shape[1:], np.int32))
            self._z += 1
        self.writer.write(sl)
        self._z = z + 1

    def __exit__(self, exc_type, exc, tb):
        if self.writer is not None:
            self.writer.__exit__(exc_type, exc, tb)

    def result(self):
        return self.array if self.writer is None else self.writer.path


def _finish(result, viewer, name, image, metadata):
    if viewer is not None:
        add_labels_layer(viewer, result, name=name, image=image, metadata=metadata)
    return result


# =========================================================================== segment from prompts


def _segment_objects_on_slice(predictor, z: int, objects: list[tuple[int, dict]]) -> np.ndarray:
    """(H, W) int32: each object's best mask on slice ``z``, the higher predicted IoU winning
    shared pixels."""
    # One click is ambiguous: take the best of SAM's three masks; more prompts: its single mask.
    prompts = [_prompt_dict(item) for _, item in objects]
    preds = predictor.predict_many(z, prompts)
    h, w = predictor.source.slice_shape
    masks, scores = [], []
    for pred in preds:
        iou = np.asarray(pred.iou, float).reshape(-1)
        k = int(np.argmax(iou))
        masks.append(np.asarray(pred.masks[k], bool))
        scores.append(iou[k])
    out = np.zeros((h, w), np.int32)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        out[masks[i] & (out == 0)] = objects[i][0]
    return out


def segment_stack(
    image: Any,
    prompts: Any,
    *,
    model: Any = "vit_t",
    checkpoint: Any = None,
    device: Any = None,
    backend: str = "auto",
    precision: str = "auto",
    z_range: Any = None,
    channel_axis: int | None = None,
    normalize: str = "stack",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    metadata: StackMetadata | None = None,
    out_dtype: Any = np.uint32,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Any = None,
    client: Any = None,
    viewer: Any = None,
    name: str = "mobilesam labels",
):
    """Segment each prompted object on each slice where it has prompts.

    Parameters
    ----------
    image : (Z, H, W) or (H, W) array (numpy, dask, zarr), napari Image layer, or SliceSource
        Any dtype; multichannel stacks need ``channel_axis``.
    prompts : Prompts, CSV path, napari Points/Shapes layer, or (N, 3) (z, row, col) array
        Points in (z, row, col), boxes in (z, row0, col0, row1, col1). The same object id on
        several slices is the same object (one label id).
    model : str or Sam
        A registry name (``"vit_t"``, ``"vit_t_test"``, ...) loaded with ``checkpoint``,
        ``device``, ``backend`` and ``precision`` (see ``build.load_model``), or a built model.
    z_range : (start, stop) or "start:stop", optional
        Only prompts on these slices are used (half-open, like ``range``).
    out : path, optional
        Stream the labels into this compressed TIFF instead of returning an array.
    overwrite : bool
        Allow replacing an existing ``out``.
    metadata : StackMetadata, optional
        Resolution metadata written to ``out`` (see :func:`open_stack`).
    cache_bytes : int
        Embedding cache budget in bytes (default 64 MiB; bounds the memory of a run; automatic
        mode keeps at least 4 MiB, since it decodes each slice in several calls).
    progress : None, True (a tqdm bar on stderr) or callable(done, total)
    client : dask.distributed.Client, optional
        Spread the prompted slices over the cluster (``model`` must then be a name).
    viewer : napari.Viewer, optional
        Add the result as a Labels layer named ``name``.

    Returns
    -------
    (Z, H, W) int32 labels (0 background, object ids elsewhere), or the output Path when ``out``
    is given. A 2D image gives (1, H, W).
    """
    prm = _as_prompts(prompts)
    source = _make_source(image, channel_axis, normalize)
    shape = (source.n_slices, *source.slice_shape)
    prm.validate(shape)
    zs = [z for z in parse_z_range(z_range, shape[0]) if z in set(prm.slices.tolist())]
    if not zs:
        raise PromptsError(f"no prompts lie in z range {z_range!r}")
    if out is not None:
        check_output_path(out, overwrite)
    by_slice = {z: prm.on_slice(z) for z in zs}
    update, close = _progress_callback(progress, len(zs), "segment")
    try:
        with _Output(shape, out, overwrite, metadata, out_dtype) as output:
            if client is not None:
                spec = _spec_for_client(model, checkpoint, device, backend, precision)
                jobs = ((z, source.rgb(z), by_slice[z]) for z in zs)
                for z, sl in _map_on_cluster(client, _worker_segment_prompts, spec, None, jobs):
                    output.put(z, sl)
                    update()
            else:
                predictor = _make_predictor(model, checkpoint, device, backend, precision, source,
                                            cache_bytes)
                for z in zs:
                    output.put(z, _segment_objects_on_slice(predictor, z, by_slice[z]))
                    update()
    finally:
        close()
    return _finish(output.result(), viewer, name, image, metadata)


def _make_predictor(model, checkpoint, device, backend, precision, source, cache_bytes):
    from .embeddings import EmbeddingCache
    from .predictor import SlicePredictor

    sam, _ = _resolve_model(model, checkpoint, device, backend, precision)
    cache = EmbeddingCache(sam, max_bytes=int(cache_bytes))
    return SlicePredictor(sam, source, cache)


# =========================================================================== propagation


def propagate_stack(
    image: Any,
    prompts: Any,
    *,
    model: Any = "vit_t",
    checkpoint: Any = None,
    device: Any = None,
    backend: str = "auto",
    precision: str = "auto",
    z_range: Any = None,
    channel_axis: int | None = None,
    normalize: str = "stack",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    metadata: StackMetadata | None = None,
    out_dtype: Any = np.uint32,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Any = None,
    viewer: Any = None,
    name: str = "mobilesam labels",
    **propagate_options: Any,
):
    """Segment prompted objects and follow each one through z (see ``propagate.propagate``).

    Parameters are those of :func:`segment_stack`; ``z_range`` limits how far objects are
    followed, and further keyword arguments go to ``propagate.propagate`` (stop rules).
    Propagation is sequential through z, so there is no ``client`` option.

    Returns
    -------
    (Z, H, W) int32 labels with the prompts' object ids, or the output Path when ``out`` is given.
    """
    from .propagate import propagate

    prm = _as_prompts(prompts)
    source = _make_source(image, channel_axis, normalize)
    shape = (source.n_slices, *source.slice_shape)
    prm.validate(shape)
    zr = parse_z_range(z_range, shape[0])
    if out is not None:
        check_output_path(out, overwrite)
    predictor = _make_predictor(model, checkpoint, device, backend, precision, source, cache_bytes)
    objects = _objects_for_propagate(prm, zr)
    kwargs = dict(propagate_options)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(zr) * len(objects), desc="propagate", unit="slice")

        def _bar(done, total):
            bar.total = max(int(total), int(done))
            bar.n = int(done)
            bar.refresh()

        kwargs.setdefault("progress", _bar)
    elif callable(progress):
        kwargs.setdefault("progress", progress)
    elif progress not in (None, False):
        raise TypeError("progress must be None, True (a progress bar) or a callable(done, total)")
    try:
        result = propagate(predictor, objects, z_range=(zr.start, zr.stop), **kwargs)
    finally:
        if bar is not None:
            bar.close()
    labels = np.asarray(result.labels)
    if out is None:
        return _finish(labels.astype(LABELS_DTYPE, copy=False), viewer, name, image, metadata)
    with _Output(shape, out, overwrite, metadata, out_dtype) as output:
        for z in range(shape[0]):
            output.put(z, labels[z])
    return _finish(output.result(), viewer, name, image, metadata)


def _objects_for_propagate(prm: Prompts, zr: range) -> dict[int, dict[int, dict]]:
    """Prompts grouped per object, ``{object_id: {z: prompt dict}}``, as ``propagate`` takes them."""
    objs: dict[int, dict[int, dict]] = {}
    for oid, z, item in prm.iter_objects():
        if z not in zr:
            continue
        objs.setdefault(oid, {})[z] = _prompt_dict(item)
    if not objs:
        raise PromptsError(f"no prompts lie in z range {zr.start}:{zr.stop}")
    return objs


def _prompt_dict(item: dict, multimask: bool | None = None) -> dict:
    """A predictor prompt from an :meth:`Prompts.iter_objects` item (no empty point arrays)."""
    has_pts = len(item["points"]) > 0
    if multimask is None:
        multimask = item["box"] is None and len(item["points"]) == 1
    return {
        "points": item["points"] if has_pts else None,
        "labels": item["labels"] if has_pts else None,
        "box": item["box"],
        "multimask": multimask,
    }


# =========================================================================== automatic


def segment_stack_auto(
    image: Any,
    *,
    model: Any = "vit_t",
    checkpoint: Any = None,
    device: Any = None,
    backend: str = "auto",
    precision: str = "auto",
    params: AutoParams | None = None,
    z_range: Any = None,
    channel_axis: int | None = None,
    normalize: str = "stack",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    metadata: StackMetadata | None = None,
    out_dtype: Any = np.uint32,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Any = None,
    client: Any = None,
    viewer: Any = None,
    name: str = "mobilesam auto",
):
    """Automatic instance segmentation of a stack, each object keeping one id through z.

    Each slice: candidate prompts from the image, batched decoding, filtering, NMS (see
    :mod:`napari_mobilesam.automatic`); then labels are stitched slice to slice by optimal IoU
    matching. Slices outside ``z_range`` stay 0.

    Parameters are those of :func:`segment_stack` (without prompts), plus ``params``
    (:class:`~napari_mobilesam.automatic.AutoParams`). With ``client`` (a
    ``dask.distributed.Client``) slices are segmented on the cluster's workers (each loads the
    model once; ``model`` must be a name and ``checkpoint`` a path) and stitched here in z order,
    with a bounded number of slices in flight.

    Returns
    -------
    (Z, H, W) int32 labels (ids 1..N in order of first appearance through z), or the output Path
    when ``out`` is given.
    """
    params = params or AutoParams()
    source = _make_source(image, channel_axis, normalize)
    shape = (source.n_slices, *source.slice_shape)
    zs = list(parse_z_range(z_range, shape[0]))
    if out is not None:
        check_output_path(out, overwrite)
    stitcher = Stitcher(params.stitch_iou, params.stitch_overlap, params.stitch_gap)
    update, close = _progress_callback(progress, len(zs), "auto")
    try:
        with _Output(shape, out, overwrite, metadata, out_dtype) as output:
            if client is not None:
                spec = _spec_for_client(model, checkpoint, device, backend, precision)
                jobs = ((z, source.rgb(z), None) for z in zs)
                for z, local in _map_on_cluster(client, _worker_segment_auto, spec, params, jobs):
                    output.put(z, stitcher.add(local))
                    update()
            else:
                predictor = _make_predictor(model, checkpoint, device, backend, precision, source,
                                            max(int(cache_bytes), MIN_AUTO_CACHE_BYTES))
                for z in zs:
                    res = segment_slice(predictor, z, params)
                    output.put(z, stitcher.add(res.labels))
                    update()
    finally:
        close()
    return _finish(output.result(), viewer, name, image, metadata)


# =========================================================================== dask.distributed


def _spec_for_client(model, checkpoint, device, backend, precision) -> ModelSpec:
    if not isinstance(model, str):
        raise BatchError(
            "with a dask client, give the model by name (model='vit_t') and the checkpoint as a "
            "file path the workers can read, so each worker can load it once"
        )
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise BatchError("with a dask client, checkpoint must be a file path the workers can read")
    ck = None if checkpoint is None else str(Path(checkpoint).expanduser().resolve())
    return ModelSpec(model, ck, None if device is None else str(device), backend, precision)


# Per-process state on dask workers: the model and its predictor machinery, loaded once.
_WORKER_MODELS: dict[ModelSpec, Any] = {}
_WORKER_LOCK = threading.Lock()
WORKER_LOAD_COUNT = {"n": 0}


def _worker_model(spec: ModelSpec):
    with _WORKER_LOCK:
        sam = _WORKER_MODELS.get(spec)
        if sam is None:
            sam = spec.load()
            _WORKER_MODELS[spec] = sam
            WORKER_LOAD_COUNT["n"] += 1
        return sam


def _preload(spec: ModelSpec) -> str:
    _worker_model(spec)
    return str(os.getpid())


def preload_model_on_workers(
    client: Any,
    model: str = "vit_t",
    checkpoint: str | os.PathLike | None = None,
    device: Any = None,
    backend: str = "auto",
    precision: str = "auto",
) -> dict[str, str]:
    """Load the model on every worker of a ``dask.distributed`` client now (it stays loaded for
    later :func:`segment_stack` / :func:`segment_stack_auto` calls with the same model arguments).

    Returns ``{worker address: worker process id}``.
    """
    spec = _spec_for_client(model, checkpoint, device, backend, precision)
    return client.run(_preload, spec)


def _one_slice_predictor(spec: ModelSpec, rgb: np.ndarray):
    from .image import SliceSource
    from .predictor import SlicePredictor

    sam = _worker_model(spec)
    source = SliceSource(np.asarray(rgb)[None], rgb=True, normalize="none")
    return SlicePredictor(sam, source, None)


def _worker_segment_auto(z: int, rgb: np.ndarray, _unused, spec: ModelSpec, params: AutoParams):
    predictor = _one_slice_predictor(spec, rgb)
    return z, segment_slice(predictor, 0, params).labels


def _worker_segment_prompts(z: int, rgb: np.ndarray, objects, spec: ModelSpec, _params):
    predictor = _one_slice_predictor(spec, rgb)
    return z, _segment_objects_on_slice(predictor, 0, objects)


def _map_on_cluster(client, func, spec, params, jobs, max_in_flight: int | None = None):
    """Run ``func(z, rgb, extra, spec, params)`` for each job on the cluster; yield ``(z, labels)``
    in the jobs' order, keeping at most ``max_in_flight`` slices submitted at once."""
    from distributed import as_completed

    if max_in_flight is None:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        max_in_flight = 2 * n_workers
    order: list[int] = []
    ready: dict[int, np.ndarray] = {}
    jobs = iter(jobs)
    ac = as_completed()
    in_flight = 0

    def submit_next() -> bool:
        nonlocal in_flight
        try:
            z, rgb, extra = next(jobs)
        except StopIteration:
            return False
        fut = client.submit(func, z, rgb, extra, spec, params, pure=False,
                            key=f"napari-mobilesam-{func.__name__}-{z}-{os.getpid()}-{id(ac)}")
        order.append(z)
        ac.add(fut)
        in_flight += 1
        return True

    for _ in range(max_in_flight):
        if not submit_next():
            break
    pos = 0
    try:
        for fut in ac:
            z, labels = fut.result()
            fut.release()
            in_flight -= 1
            ready[z] = labels
            while pos < len(order) and order[pos] in ready:
                zz = order[pos]
                yield zz, ready.pop(zz)
                pos += 1
            while in_flight + len(ready) < max_in_flight and submit_next():
                pass
    finally:
        for f in list(ac.futures):
            f.cancel()


# =========================================================================== napari helper


def add_labels_layer(
    viewer: Any,
    labels: Any,
    *,
    name: str = "mobilesam labels",
    image: Any = None,
    metadata: StackMetadata | None = None,
):
    """Add ``labels`` ((Z, H, W) or (H, W) integer array, or a TIFF path) to ``viewer`` as a Labels
    layer aligned with ``image`` (a napari Image layer: its scale and translate are copied; for a
    2D image a (1, H, W) result is squeezed) or with ``metadata``'s voxel size. Returns the layer."""
    if isinstance(labels, (str, os.PathLike)):
        import tifffile

        labels = tifffile.imread(labels)
    labels = np.asarray(labels)
    kwargs: dict[str, Any] = {"name": name}
    if image is not None and type(image).__name__ == "Image":
        if labels.ndim == 3 and labels.shape[0] == 1 and (image.ndim - int(image.rgb)) == 2:
            labels = labels[0]
        kwargs["scale"] = tuple(image.scale)[-labels.ndim:]
        kwargs["translate"] = tuple(image.translate)[-labels.ndim:]
    elif metadata is not None and metadata.scale is not None and labels.ndim == 3:
        kwargs["scale"] = metadata.scale
    if labels.dtype.kind == "u" and labels.dtype.itemsize >= 4:
        labels = labels.astype(np.int64 if labels.max(initial=0) > np.iinfo(np.int32).max else np.int32)
    return viewer.add_labels(labels, **kwargs)
