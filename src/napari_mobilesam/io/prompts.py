"""Prompts for whole stacks: CSV files, napari Points/Shapes data and arrays -> :class:`Prompts`.

No napari import: Points/Shapes *data* (arrays, feature tables) are converted, not layers. Coordinates
are napari's: points are (z, row, col), boxes are (z, row0, col0, row1, col1).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PromptError

__all__ = [
    "Prompts",
    "PromptsError",
    "read_prompts_csv",
    "prompts_from_points",
    "prompts_from_shapes",
    "prompts_from_arrays",
    "scribble_points",
    "SCRIBBLE_MAX_POINTS",
]

#: At most this many positive points are taken along one scribble (SAM's masks get worse with
#: many points; micro-sam's own prompt generators stay in this range too).
SCRIBBLE_MAX_POINTS = 8
#: One point per this many pixels of scribble, up to :data:`SCRIBBLE_MAX_POINTS`.
SCRIBBLE_STEP = 12.0


PromptsError = PromptError  # the name this module used before the error classes were unified


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
        zrc, lab_v, oid_v = _parse_csv_row(_CsvRow(path, lineno, row, cols, header))
        pts.append(zrc)
        labs.append(lab_v)
        ids.append(oid_v if oid_v is not None else len(ids) + 1)
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


def scribble_points(vertices: np.ndarray, max_points: int = SCRIBBLE_MAX_POINTS,
                    step: float = SCRIBBLE_STEP) -> np.ndarray:
    """Points spread evenly along a scribble (a drawn path), its two ends included.

    Parameters
    ----------
    vertices : (K, 3) or (K, 2) float
        The path's vertices in (z, row, col) (all on one slice) or (row, col) pixels.
    max_points, step
        One point per ``step`` pixels of length, at least 2 (1 for a path of one point or of no
        length), at most ``max_points``.

    Returns
    -------
    (P, 3) or (P, 2) float64, in the vertices' layout.
    """
    v = np.asarray(vertices, np.float64)
    if v.ndim != 2 or v.shape[1] not in (2, 3) or len(v) == 0:
        raise PromptsError(f"a scribble needs (K, 3) or (K, 2) vertices, got shape {v.shape}")
    if v.shape[1] == 3 and np.ptp(v[:, 0]) > 1e-6:
        raise PromptsError(f"the scribble is not on one slice (its vertices have z {np.unique(v[:, 0])})")
    plane = v[:, -2:]
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(plane, axis=0), axis=1))])
    length = float(arc[-1])
    if length <= 0:
        return v[:1].copy()
    n = int(np.clip(np.ceil(length / float(step)) + 1, 2, max(2, int(max_points))))
    at = np.linspace(0.0, length, n)
    rows = np.interp(at, arc, plane[:, 0])
    cols = np.interp(at, arc, plane[:, 1])
    if v.shape[1] == 2:
        return np.stack([rows, cols], axis=1)
    return np.stack([np.full(n, v[0, 0]), rows, cols], axis=1)


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


@dataclass
class _CsvRow:
    """One data row of a prompts CSV, with what is needed to read it and to name it in errors."""

    path: Path
    lineno: int
    row: list
    cols: dict
    header: list

    def get(self, key: str, default: str | None = None) -> str | None:
        if key not in self.cols:
            return default
        i = self.cols[key]
        if i >= len(self.row) or not self.row[i].strip():
            raise PromptsError(f"{self.where}: missing value for column {self.header[i]!r}")
        return self.row[i].strip()

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.lineno}"


def _parse_csv_row(r: _CsvRow) -> tuple[tuple[float, float, float], int, int | None]:
    """((z, row, col), label 1/0, object id or None) of one prompts CSV row (PromptsError naming
    the file and line otherwise)."""
    texts = (r.get("z", "0"), r.get("row"), r.get("col"))  # (missing values are named here)
    try:
        z, row, col = (float(v) for v in texts)
    except ValueError:
        raise PromptsError(f"{r.where}: z, row and col must be numbers, got {r.row}") from None
    if not all(np.isfinite((z, row, col))):
        raise PromptsError(f"{r.where}: z, row and col must be finite numbers, got {r.row}; fix or "
                           "delete that line")
    lab = r.get("label", "1").lower()
    if lab in ("1", "1.0", "true", "positive", "pos", "+"):
        lab_v = 1
    elif lab in ("0", "0.0", "false", "negative", "neg", "-"):
        lab_v = 0
    else:
        raise PromptsError(f"{r.where}: label must be 1 (positive) or 0 (negative), got {lab!r}; "
                           "write 0 for a negative point")
    oid = r.get("object_id")
    if oid is None:
        if lab_v == 0:
            raise PromptsError(f"{r.where}: a negative point needs an object_id column saying which "
                               "object it belongs to")
        return (z, row, col), lab_v, None
    try:
        oid_f = float(oid)
    except ValueError:
        oid_f = -1.0
    if not np.isfinite(oid_f) or oid_f != int(oid_f) or oid_f < 1:
        raise PromptsError(f"{r.where}: object_id must be a whole number >= 1, got {oid!r}")
    return (z, row, col), lab_v, int(oid_f)
