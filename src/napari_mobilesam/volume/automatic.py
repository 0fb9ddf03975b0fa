"""Automatic instance segmentation of one slice: candidate prompts -> masks -> one label image.

Pipeline for one slice (all arrays in napari's (row, col) order):

1. `volume.candidates.candidate_points` — prompt positions from the image itself (one per blob,
   plus a coarse grid), with a contrast test relative to the slice's own noise.
2. The points go through the predictor's batched decoder (``SlicePredictor.predict_many``, which
   decodes in chunks of bounded size), three masks per point, in two rounds: one point per blob
   first, then the other candidates except those lying on an object already found.
3. :func:`filter_masks` — keep masks with a high predicted IoU and stability and a plausible area.
4. :func:`mask_nms` — greedy non-maximum suppression on mask IoU (and containment).
5. :func:`paint_masks` — the survivors become one (H, W) int32 label image, best score first;
   fragments smaller than ``min_area`` are dropped.

Through z, `volume.stitch.Stitcher` gives each object one id. Nothing here imports torch, napari or
Qt: the predictor is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..core.batching import batch_bounds
from .candidates import _split_candidates, candidate_points
from .params import AutoParams
from .stitch import Stitcher, overlap_iou, stitch_labels

__all__ = [
    "AutoParams",
    "SliceResult",
    "Stitcher",
    "candidate_points",
    "filter_masks",
    "mask_nms",
    "paint_masks",
    "remove_small_fragments",
    "segment_slice",
    "stitch_labels",
    "relabel_sequential",
    "overlap_iou",
    "batch_bounds",
]


# --------------------------------------------------------------------------- per-slice filtering


def filter_masks(
    masks: np.ndarray,
    iou: np.ndarray,
    stability: np.ndarray,
    params: AutoParams | None = None,
) -> np.ndarray:
    """Which masks pass the quality filters.

    Parameters
    ----------
    masks : (K, H, W) bool
    iou, stability : (K,) float
        Predicted IoU and stability score of each mask.
    params : AutoParams, optional
        Uses ``min_iou``, ``min_stability``, ``min_area`` and ``max_area_fraction``.

    Returns
    -------
    (K,) bool
        True for the masks to keep.
    """
    p = params or AutoParams()
    masks = np.asarray(masks, bool)
    iou = np.asarray(iou, float).reshape(-1)
    stability = np.asarray(stability, float).reshape(-1)
    if masks.ndim != 3 or not (len(masks) == len(iou) == len(stability)):
        raise ValueError(
            f"need masks (K, H, W) with K IoU and stability scores, got masks {masks.shape}, "
            f"iou {iou.shape}, stability {stability.shape}"
        )
    area = masks.sum(axis=(1, 2))
    max_area = p.max_area_fraction * masks.shape[1] * masks.shape[2]
    return (
        (iou >= p.min_iou)
        & (stability >= p.min_stability)
        & (area >= max(p.min_area, 1))
        & (area <= max_area)
    )


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return (0, 0, 0, 0)
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def mask_nms(
    masks: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float = 0.6,
    containment: float | None = 0.85,
) -> np.ndarray:
    """Greedy non-maximum suppression on masks.

    Masks are visited from the best score down; one is dropped when its IoU with an already kept
    mask exceeds ``iou_threshold``, or (when ``containment`` is set) when more than that fraction
    of the smaller of the two lies inside the other. Ties keep the earlier index.

    Parameters
    ----------
    masks : (K, H, W) bool
    scores : (K,) float
    iou_threshold : float in [0, 1]
    containment : float in [0, 1] or None

    Returns
    -------
    (M,) int64
        Indices of the kept masks, best score first.
    """
    masks = np.asarray(masks, bool)
    scores = np.asarray(scores, float).reshape(-1)
    if masks.ndim != 3 or len(masks) != len(scores):
        raise ValueError(f"need masks (K, H, W) and K scores, got {masks.shape} and {scores.shape}")
    order = np.argsort(-scores, kind="stable")
    areas = masks.sum(axis=(1, 2))
    boxes = [_bbox(m) for m in masks]
    kept: list[int] = []
    for i in order:
        if areas[i] == 0:
            continue
        r0, c0, r1, c1 = boxes[i]
        drop = False
        for j in kept:
            s0, d0, s1, d1 = boxes[j]
            rr0, cc0, rr1, cc1 = max(r0, s0), max(c0, d0), min(r1, s1), min(c1, d1)
            if rr0 >= rr1 or cc0 >= cc1:
                continue
            inter = int(np.count_nonzero(masks[i, rr0:rr1, cc0:cc1] & masks[j, rr0:rr1, cc0:cc1]))
            if inter == 0:
                continue
            union = areas[i] + areas[j] - inter
            if inter / union > iou_threshold or (
                containment is not None and inter / min(areas[i], areas[j]) > containment
            ):
                drop = True
                break
        if not drop:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def remove_small_fragments(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Keep each label's largest connected piece and drop labels smaller than ``min_area``.

    Parameters
    ----------
    labels : (H, W) integer array
    min_area : int
        Pixels.

    Returns
    -------
    (H, W) int32
        A new array (the input is not modified); ids are kept, not renumbered.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be one (H, W) slice, got shape {labels.shape}")
    out = labels.astype(np.int32, copy=True)
    for lab, sl in enumerate(ndi.find_objects(out), start=1):
        if sl is None:
            continue
        region = out[sl] == lab
        comp, n = ndi.label(region)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            region_keep = comp == (1 + int(np.argmax(sizes)))
            out[sl][region & ~region_keep] = 0
            region = region_keep
        if region.sum() < min_area:
            out[sl][region] = 0
    return out


def paint_masks(
    masks: np.ndarray, scores: np.ndarray, min_area: int = 0
) -> np.ndarray:
    """Turn overlapping masks into one label image, the best score winning shared pixels.

    Parameters
    ----------
    masks : (K, H, W) bool
    scores : (K,) float
    min_area : int
        Fragments (after overlaps are resolved) smaller than this are dropped.

    Returns
    -------
    (H, W) int32
        0 is background; labels are numbered 1..N in decreasing score, without gaps.
    """
    masks = np.asarray(masks, bool)
    scores = np.asarray(scores, float).reshape(-1)
    if masks.ndim != 3 or len(masks) != len(scores):
        raise ValueError(f"need masks (K, H, W) and K scores, got {masks.shape} and {scores.shape}")
    out = np.zeros(masks.shape[1:], np.int32)
    for n, i in enumerate(np.argsort(-scores, kind="stable"), start=1):
        out[masks[i] & (out == 0)] = n
    out = remove_small_fragments(out, min_area)
    return relabel_sequential(out)


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber the labels 1..N in order of their current id (0 stays background).

    Parameters
    ----------
    labels : integer array of any shape

    Returns
    -------
    int32 array of the same shape
    """
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if len(ids) == 0:
        return np.zeros(labels.shape, np.int32)
    lut_keys = np.concatenate([[0], ids])
    pos = np.searchsorted(lut_keys, labels)
    return pos.astype(np.int32)


# --------------------------------------------------------------------------- one slice end to end


@dataclass
class SliceResult:
    """Automatic segmentation of one slice.

    Attributes
    ----------
    z : int
    labels : (H, W) int32
        Slice-local ids 1..N (stitching gives them stack-wide ids).
    n_prompts : int
        Candidate points decoded.
    n_masks : int
        Masks the decoder produced (three per point).
    n_kept : int
        Masks left after filtering and NMS.
    """

    z: int
    labels: np.ndarray
    n_prompts: int = 0
    n_masks: int = 0
    n_kept: int = 0


def segment_slice(
    predictor,
    z: int,
    params: AutoParams | None = None,
    *,
    image: np.ndarray | None = None,
) -> SliceResult:
    """Automatic instance segmentation of slice ``z``.

    Parameters
    ----------
    predictor : SlicePredictor-like
        Needs ``predict_many(z, prompts) -> list[Prediction]`` (each with ``masks`` (K, H, W) bool,
        ``iou`` (K,), ``stability`` (K,)) and, unless ``image`` is given, ``source.rgb(z)``.
    z : int
        Slice index in the predictor's source.
    params : AutoParams, optional
    image : (H, W) or (H, W, 3) array, optional
        The slice to take candidate points from (default: ``predictor.source.rgb(z)``).

    Returns
    -------
    SliceResult
        ``labels`` is (H, W) int32 with ids 1..N.
    """
    p = params or AutoParams()
    if image is None:
        image = predictor.source.rgb(z)
    first, second = _split_candidates(image, p)
    h, w = np.asarray(image).shape[:2]
    if len(first) + len(second) == 0:
        return SliceResult(z, np.zeros((h, w), np.int32))
    all_masks: list[np.ndarray] = []
    all_iou: list[np.ndarray] = []
    all_stab: list[np.ndarray] = []
    covered = np.zeros((h, w), bool)

    def decode(points: np.ndarray) -> None:
        for start, stop in batch_bounds(len(points), p.points_per_batch):
            chunk = points[start:stop]
            prompts = [{"points": pt[None, :], "labels": np.ones(1, np.int64)} for pt in chunk]
            for pred in predictor.predict_many(z, prompts):
                m = np.asarray(pred.masks, bool)
                iou = np.asarray(pred.iou, float).reshape(-1)
                stab = np.asarray(pred.stability, float).reshape(-1)
                keep = filter_masks(m, iou, stab, p)
                if keep.any():
                    all_masks.append(m[keep])
                    all_iou.append(iou[keep])
                    all_stab.append(stab[keep])
                    covered[m[keep][int(np.argmax(iou[keep] * stab[keep]))]] = True

    decode(first)
    # Second round (extra blob points, grid): points on an object already found are skipped.
    if len(second) and p.skip_covered:
        r = np.clip(np.round(second[:, 0]).astype(int), 0, h - 1)
        c = np.clip(np.round(second[:, 1]).astype(int), 0, w - 1)
        second = second[~covered[r, c]]
    decode(second)
    points = np.concatenate([first, second])
    n_masks = 3 * len(points)
    if not all_masks:
        return SliceResult(z, np.zeros((h, w), np.int32), len(points), n_masks, 0)
    masks = np.concatenate(all_masks)
    scores = np.concatenate(all_iou) * np.concatenate(all_stab)
    kept = mask_nms(masks, scores, p.nms_iou, p.containment)
    labels = paint_masks(masks[kept], scores[kept], p.min_area)
    return SliceResult(z, labels, len(points), n_masks, len(kept))
