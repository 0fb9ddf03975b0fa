"""Stitching per-slice labels through z: `Stitcher` gives each object one id across slices.

The labels of slice z are matched one-to-one to those of the previous slice (optimal assignment,
``scipy.optimize.linear_sum_assignment``) when their IoU, or the share of the smaller one inside
the other, is high enough, and a size-change rule keeps objects touching in z apart. It works slice
by slice, so a whole stack never has to sit in memory. Slices are (H, W) integer arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["Stitcher", "stitch_labels", "overlap_iou", "label_ids"]


# Pixels handled at once: counting, matching and relabelling go through a slice in bands of rows of
# about this many pixels, so their temporaries stay bounded whatever the slice size.
_BAND_PIXELS = 1 << 20
# Above this many (reference x new) label pairs the assignment is solved per group of overlapping
# labels instead of on one dense matrix (same optimum; a 10,000 x 10,000 slice has ~30,000 nuclei).
_DENSE_PAIRS = 1 << 20


def _rows(a: np.ndarray) -> np.ndarray:
    """``a`` as 2D rows (a view for a C-contiguous array): (H, W) stays, (N,) becomes (1, N)."""
    a = np.asarray(a)
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)


def _bands(a2: np.ndarray):
    """Row slices of ``a2`` ((R, C)) of about ``_BAND_PIXELS`` pixels each."""
    step = max(1, _BAND_PIXELS // max(1, a2.shape[1]))
    return (slice(r, min(r + step, a2.shape[0])) for r in range(0, a2.shape[0], step))


def _masked(band: np.ndarray, ids: np.ndarray | None, keep: bool) -> np.ndarray:
    """``band`` with the labels in ``ids`` kept (``keep``) or set to 0 (not ``keep``)."""
    if ids is None:
        return band
    return np.where(np.isin(band, ids) == keep, band, 0)


def label_ids(a: np.ndarray, *, counts: bool = False):
    """Sorted distinct values of a labels array (with their pixel counts), band by band."""
    a2 = _rows(a)
    ids, cnt = [], []
    for rows in _bands(a2):
        u, c = np.unique(a2[rows], return_counts=True)
        ids.append(u)
        cnt.append(c)
    if not ids:
        ids, cnt = [np.zeros(0, a2.dtype)], [np.zeros(0, np.int64)]
    u, inv = np.unique(np.concatenate(ids), return_inverse=True)
    if not counts:
        return u
    return u, np.bincount(inv.reshape(-1), weights=np.concatenate(cnt), minlength=len(u)).astype(np.int64)


def _pairs(a: np.ndarray, b: np.ndarray, drop_a: np.ndarray | None = None,
           keep_b: np.ndarray | None = None):
    """Pixel counts of every (label of ``a``, label of ``b``) pair that shares pixels, background
    included, counted band by band: ``(pair_a, pair_b, counts)``. ``drop_a``: ids of ``a`` taken
    as background; ``keep_b``: the only ids of ``b`` not taken as background."""
    a2, b2 = _rows(a), _rows(b)
    if a2.shape != b2.shape:
        raise ValueError(f"label arrays differ in shape: {np.shape(a)} and {np.shape(b)}")
    pa, pb, pc = [], [], []
    for rows in _bands(a2):
        ba = _masked(a2[rows], drop_a, keep=False).reshape(-1)
        bb = _masked(b2[rows], keep_b, keep=True).reshape(-1)
        ua, ia = np.unique(ba, return_inverse=True)
        ub, ib = np.unique(bb, return_inverse=True)
        codes, cnt = np.unique(ia.reshape(-1).astype(np.int64) * len(ub) + ib.reshape(-1), return_counts=True)
        pa.append(ua[codes // len(ub)])
        pb.append(ub[codes % len(ub)])
        pc.append(cnt)
    if not pa:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    pa, pb, pc = np.concatenate(pa), np.concatenate(pb), np.concatenate(pc)
    ua, ia = np.unique(pa, return_inverse=True)
    ub, ib = np.unique(pb, return_inverse=True)
    codes, inv = np.unique(ia.reshape(-1).astype(np.int64) * len(ub) + ib.reshape(-1), return_inverse=True)
    counts = np.bincount(inv.reshape(-1), weights=pc, minlength=len(codes))
    return ua[codes // len(ub)].astype(np.int64), ub[codes % len(ub)].astype(np.int64), counts


def _sparse_contingency(a, b, drop_a=None, keep_b=None):
    """Shared pixel counts of the labels of ``a`` and ``b`` (background left out), sparse:
    ``(ids_a, ids_b, rows, cols, inter, area_a, area_b)`` with ``inter[k]`` the pixels shared by
    ``ids_a[rows[k]]`` and ``ids_b[cols[k]]`` (only pairs that share pixels)."""
    pa, pb, cnt = _pairs(a, b, drop_a, keep_b)
    ids_a, ia = np.unique(pa, return_inverse=True)
    ids_b, ib = np.unique(pb, return_inverse=True)
    area_a = np.bincount(ia.reshape(-1), weights=cnt, minlength=len(ids_a))
    area_b = np.bincount(ib.reshape(-1), weights=cnt, minlength=len(ids_b))
    sel_a, sel_b = ids_a != 0, ids_b != 0
    new_a = np.cumsum(sel_a) - 1
    new_b = np.cumsum(sel_b) - 1
    both = sel_a[ia] & sel_b[ib]
    return (ids_a[sel_a], ids_b[sel_b], new_a[ia[both]], new_b[ib[both]], cnt[both],
            area_a[sel_a], area_b[sel_b])


def _contingency(a: np.ndarray, b: np.ndarray):
    """Pixel counts shared by every label of ``a`` and of ``b`` (background left out), as a dense
    (A, B) float64 matrix: ``(ids_a, ids_b, inter, area_a, area_b)``."""
    ids_a, ids_b, rows, cols, cnt, area_a, area_b = _sparse_contingency(a, b)
    inter = np.zeros((len(ids_a), len(ids_b)), np.float64)
    inter[rows, cols] = cnt
    return ids_a, ids_b, inter, area_a, area_b


def overlap_iou(
    a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every label of ``a`` and every label of ``b`` (two (H, W) slices).

    Returns
    -------
    ids_a : (A,) int64, ids_b : (B,) int64, iou : (A, B) float64
        Background (0) is left out.
    """
    ids_a, ids_b, inter, area_a, area_b = _contingency(a, b)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return ids_a, ids_b, iou


def _relabel(labels: np.ndarray, mapping: dict[int, int], out: np.ndarray) -> None:
    """``out = mapping[labels]`` (0 stays 0; every nonzero id of ``labels`` must be a key), band by
    band; ``out`` may be ``labels`` itself."""
    keys = np.fromiter(mapping.keys(), np.int64, len(mapping))
    vals = np.fromiter(mapping.values(), np.int64, len(mapping))
    order = np.argsort(keys)
    keys, vals = keys[order], vals[order]
    src, dst = _rows(labels), _rows(out)
    for rows in _bands(src):
        band = src[rows]
        fg = band != 0
        new = np.zeros(band.shape, out.dtype)
        if len(keys):
            new[fg] = vals[np.searchsorted(keys, band[fg])]
        dst[rows] = new


def _assign(rows: np.ndarray, cols: np.ndarray, weight: np.ndarray, n_rows: int, n_cols: int):
    """The (row, col) pairs of a maximum-weight one-to-one matching among the given pairs
    (``linear_sum_assignment``): on one dense matrix when it is small, else per connected group
    of pairs (the same optimum, without an n_rows x n_cols matrix)."""
    if not len(rows):
        return []
    if n_rows * n_cols <= _DENSE_PAIRS:
        w = np.zeros((n_rows, n_cols))
        w[rows, cols] = weight
        r, c = linear_sum_assignment(-w)
        return [(i, j) for i, j in zip(r, c) if w[i, j] > 0]
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows)), (rows, n_rows + cols)), shape=(n_rows + n_cols,) * 2)
    _, comp = connected_components(graph, directed=False)
    out = []
    order = np.argsort(comp[rows], kind="stable")
    bounds = np.flatnonzero(np.diff(comp[rows][order])) + 1
    for part in np.split(order, bounds):
        ur, ir = np.unique(rows[part], return_inverse=True)
        uc, ic = np.unique(cols[part], return_inverse=True)
        w = np.zeros((len(ur), len(uc)))
        w[ir, ic] = weight[part]
        r, c = linear_sum_assignment(-w)
        out += [(int(ur[i]), int(uc[j])) for i, j in zip(r, c) if w[i, j] > 0]
    return out


class Stitcher:
    """Give objects one id through z by matching each slice's labels to the previous slice's.

    Feed slices in z order with :meth:`add`; each returns the slice relabelled with stack-wide
    ids. A label of slice z takes the id of the label of slice z-1 it is optimally assigned to
    (Hungarian assignment maximising total IoU) when their IoU is at least ``min_iou``, or when at
    least ``min_overlap`` of the smaller of the two lies inside the other (the tip of a nucleus is
    much smaller than its next slice, so its IoU is low although it is the same object). Labels
    left unmatched are then matched, the same way, to objects last seen up to ``max_gap`` slices
    further back (an object missed on one slice keeps its id); the rest get new ids, counting up
    from 1 in order of first appearance. Only ``max_gap + 1`` slices are held, so memory does not
    grow with the stack.

    Parameters
    ----------
    min_iou : float
        Minimum IoU for two labels of neighbouring slices to be the same object.
    min_overlap : float
        Alternatively, minimum fraction of the smaller label covered by the other (1.0: off).
    max_gap : int
        Slices an object may be missing from and still keep its id (0: neighbours only).
    regrow : float
        The size-change rule's growth factor (0: off).
    """

    def __init__(self, min_iou: float = 0.3, min_overlap: float = 0.6, max_gap: int = 1,
                 regrow: float = 1.3) -> None:
        for name, v in (("min_iou", min_iou), ("min_overlap", min_overlap)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap!r}")
        if regrow != 0 and regrow < 1:
            raise ValueError(f"regrow must be 0 (off) or at least 1, got {regrow!r}")
        self.regrow = float(regrow)
        self._peak: dict[int, int] = {}  # stack id -> largest area seen
        self._last: dict[int, int] = {}  # stack id -> area on the last slice it was on
        self.min_iou = float(min_iou)
        self.min_overlap = float(min_overlap)
        self.max_gap = int(max_gap)
        self.n_objects = 0
        self._history: list[np.ndarray] = []  # stitched slices, oldest first

    def _match(self, ref: np.ndarray, labels: np.ndarray, drop_ref: np.ndarray | None = None,
               keep_new: np.ndarray | None = None) -> dict[int, int]:
        """{local id: stack id} for the labels of ``labels`` optimally matched to ``ref``'s
        (``drop_ref``: ids of ``ref`` left out; ``keep_new``: the only ids of ``labels`` used)."""
        mapping: dict[int, int] = {}
        if not ref.any() or not labels.any():
            return mapping
        ids_ref, ids_new, rows, cols, inter, area_r, area_n = _sparse_contingency(ref, labels, drop_ref, keep_new)
        if not len(inter):
            return mapping
        union = area_r[rows] + area_n[cols] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        smaller = np.minimum(area_r[rows], area_n[cols])
        cover = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
        ok = (iou >= self.min_iou) | (cover >= self.min_overlap)
        ok &= ~self._regrows(ids_ref[rows], area_n[cols])
        rows, cols, weight = rows[ok], cols[ok], iou[ok] + 1.0
        for r, c in _assign(rows, cols, weight, len(ids_ref), len(ids_new)):
            mapping[int(ids_new[c])] = int(ids_ref[r])
        return mapping

    def _regrows(self, ids_ref: np.ndarray, area_new: np.ndarray) -> np.ndarray:
        """Per (reference id, new area) pair: whether the size-change rule forbids it (see the
        class docstring)."""
        if not self.regrow:
            return np.zeros(len(ids_ref), bool)
        last = np.array([self._last.get(int(i), 0) for i in ids_ref], float)
        peak = np.array([self._peak.get(int(i), 0) for i in ids_ref], float)
        return (last < 0.5 * peak) & (area_new > self.regrow * last)

    def add(self, labels: np.ndarray, *, inplace: bool = False) -> np.ndarray:
        """Stitch the next slice.

        Parameters
        ----------
        labels : (H, W) integer array
            Slice-local ids (any values; 0 is background).
        inplace : bool
            When ``labels`` is a writable int32 array, write the stack-wide ids into it instead
            of a new array, so a large slice is held once (other arrays are never modified).

        Returns
        -------
        (H, W) int32
            The slice with stack-wide ids (``labels`` itself when relabelled in place).
        """
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"Stitcher.add takes one (H, W) slice, got shape {labels.shape}")
        if self._history and self._history[-1].shape != labels.shape:
            raise ValueError(
                f"slice shape changed from {self._history[-1].shape} to {labels.shape} within one "
                "stack"
            )
        ids_cur = label_ids(labels)
        ids_cur = ids_cur[ids_cur != 0]
        mapping: dict[int, int] = {}
        if self._history:
            mapping = self._match(self._history[-1], labels)
            seen = set(label_ids(self._history[-1]).tolist())
            for older in reversed(self._history[:-1]):
                left = [int(i) for i in ids_cur if int(i) not in mapping]
                if not left:
                    break
                # Only objects absent from the more recent slices, and not yet taken.
                taken = np.array(sorted(seen | set(mapping.values())), np.int64)
                mapping.update(self._match(older, labels, drop_ref=taken, keep_new=np.array(left, np.int64)))
                seen |= set(label_ids(older).tolist())
        for lab in ids_cur:  # ascending: new ids follow the slice-local order
            if int(lab) not in mapping:
                self.n_objects += 1
                mapping[int(lab)] = self.n_objects
        inplace = inplace and labels.dtype == np.int32 and labels.flags.writeable
        out = labels if inplace else np.zeros(labels.shape, np.int32)
        _relabel(labels, mapping, out)
        self._history.append(out)
        self._remember(out)
        return out

    def add_stitched(self, labels: np.ndarray) -> None:
        """Take a slice that already has stack-wide ids (e.g. written by an interrupted run that is
        now resumed) as the next slice, so the following ones are matched to it."""
        out = np.asarray(labels).astype(np.int32, copy=False)
        if out.ndim != 2:
            raise ValueError(f"Stitcher.add_stitched takes one (H, W) slice, got shape {out.shape}")
        self.n_objects = max(self.n_objects, int(out.max(initial=0)))
        self._history.append(out)
        self._remember(out)

    def _remember(self, out: np.ndarray) -> None:
        del self._history[: -(self.max_gap + 1)]
        if self.regrow:
            ids, areas = label_ids(out, counts=True)
            for i, a in zip(ids.tolist(), areas.tolist()):
                if i <= 0:
                    continue
                self._last[i] = a
                self._peak[i] = max(a, self._peak.get(i, 0))


def stitch_labels(
    slices: Iterable[np.ndarray], min_iou: float = 0.3, min_overlap: float = 0.6, max_gap: int = 1,
    regrow: float = 1.3,
) -> Iterator[np.ndarray]:
    """Stitch per-slice labels lazily: yields each (H, W) int32 slice with stack-wide ids.

    ``np.stack(list(stitch_labels(stack)))`` stitches a whole (Z, H, W) array; passing a generator
    keeps only two slices in memory.
    """
    stitcher = Stitcher(min_iou, min_overlap, max_gap, regrow)
    for sl in slices:
        yield stitcher.add(sl)
