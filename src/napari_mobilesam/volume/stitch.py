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

__all__ = ["Stitcher", "stitch_labels", "overlap_iou"]


def _contingency(a: np.ndarray, b: np.ndarray):
    """Pixel counts shared by every label of ``a`` and of ``b`` (background left out)."""
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    ids_a, inv_a = np.unique(a, return_inverse=True)
    ids_b, inv_b = np.unique(b, return_inverse=True)
    na, nb = len(ids_a), len(ids_b)
    inter = np.bincount(inv_a * nb + inv_b, minlength=na * nb).reshape(na, nb).astype(np.float64)
    area_a = inter.sum(axis=1)
    area_b = inter.sum(axis=0)
    sel_a = ids_a != 0
    sel_b = ids_b != 0
    return (
        ids_a[sel_a].astype(np.int64),
        ids_b[sel_b].astype(np.int64),
        inter[sel_a][:, sel_b],
        area_a[sel_a],
        area_b[sel_b],
    )


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

    def _match(self, ref: np.ndarray, labels: np.ndarray) -> dict[int, int]:
        """{local id: stack id} for the labels of ``labels`` optimally matched to ``ref``'s."""
        mapping: dict[int, int] = {}
        if not ref.any() or not labels.any():
            return mapping
        ids_ref, ids_new, inter, area_r, area_n = _contingency(ref, labels)
        if not inter.size:
            return mapping
        union = area_r[:, None] + area_n[None, :] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        smaller = np.minimum(area_r[:, None], area_n[None, :])
        cover = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
        ok = (inter > 0) & ((iou >= self.min_iou) | (cover >= self.min_overlap)) & ~self._regrows(ids_ref, area_n)
        rows, cols = linear_sum_assignment(-np.where(ok, iou + 1.0, 0.0))
        for r, c in zip(rows, cols):
            if ok[r, c]:
                mapping[int(ids_new[c])] = int(ids_ref[r])
        return mapping

    def _regrows(self, ids_ref: np.ndarray, area_new: np.ndarray) -> np.ndarray:
        """(R, N) bool: pairs the size-change rule forbids (see the class docstring)."""
        if not self.regrow:
            return np.zeros((len(ids_ref), len(area_new)), bool)
        last = np.array([self._last.get(int(i), 0) for i in ids_ref], float)
        peak = np.array([self._peak.get(int(i), 0) for i in ids_ref], float)
        ending = (last < 0.5 * peak)[:, None]
        return ending & (area_new[None, :] > self.regrow * last[:, None])

    def add(self, labels: np.ndarray) -> np.ndarray:
        """Stitch the next slice.

        Parameters
        ----------
        labels : (H, W) integer array
            Slice-local ids (any values; 0 is background).

        Returns
        -------
        (H, W) int32
            The slice with stack-wide ids.
        """
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"Stitcher.add takes one (H, W) slice, got shape {labels.shape}")
        if self._history and self._history[-1].shape != labels.shape:
            raise ValueError(
                f"slice shape changed from {self._history[-1].shape} to {labels.shape} within one "
                "stack"
            )
        ids_cur = np.unique(labels)
        ids_cur = ids_cur[ids_cur != 0]
        mapping: dict[int, int] = {}
        if self._history:
            mapping = self._match(self._history[-1], labels)
            seen = set(np.unique(self._history[-1]).tolist())
            for older in reversed(self._history[:-1]):
                left = [int(i) for i in ids_cur if int(i) not in mapping]
                if not left:
                    break
                # Only objects absent from the more recent slices, and not yet taken.
                ref = np.where(np.isin(older, list(seen | set(mapping.values()))), 0, older)
                mapping.update(self._match(ref, np.where(np.isin(labels, left), labels, 0)))
                seen |= set(np.unique(older).tolist())
        for lab in ids_cur:  # ascending: new ids follow the slice-local order
            if int(lab) not in mapping:
                self.n_objects += 1
                mapping[int(lab)] = self.n_objects
        out = np.zeros(labels.shape, np.int32)
        if mapping:
            keys = np.fromiter(mapping.keys(), np.int64, len(mapping))
            vals = np.fromiter(mapping.values(), np.int64, len(mapping))
            order = np.argsort(keys)
            keys, vals = keys[order], vals[order]
            fg = labels != 0
            out[fg] = vals[np.searchsorted(keys, labels[fg])]
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
            ids, areas = np.unique(out[out > 0], return_counts=True)
            for i, a in zip(ids.tolist(), areas.tolist()):
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
