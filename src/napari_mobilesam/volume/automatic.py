"""Automatic instance segmentation: per-slice masks from candidate prompts, stitched through z.

Pipeline for one slice (all arrays in napari's (row, col) order):

1. :func:`candidate_points` — prompt positions taken from the image itself: one point per blob
   (peaks of the distance transform of the Otsu foreground of the smoothed slice; Laplacian-of-
   Gaussian peaks add touching objects the distance map merges), plus a coarse grid for whatever
   the blobs miss. Slices without contrast (background and noise) get no blob points.
2. The points go through the predictor's batched decoder (``SlicePredictor.predict_many``), three
   masks per point, in two rounds: one point per blob first, then the other candidates except
   those lying on an object already found. The decoder costs about as much per point as a tenth
   of the encoder, so the number of points decides the speed: about one per object here, against
   1024 for SAM's dense 32 x 32 grid.
3. :func:`filter_masks` — keep masks with a high predicted IoU and stability and a plausible area.
4. :func:`mask_nms` — greedy non-maximum suppression on mask IoU (and containment).
5. :func:`paint_masks` — the survivors become one (H, W) int32 label image, best score first;
   fragments smaller than ``min_area`` are dropped.

Through z, :class:`Stitcher` gives each object one id: the labels of slice z are matched to those
of the previous slice by optimal assignment of their IoU (``scipy.optimize.linear_sum_assignment``).
It works slice by slice, so a whole stack never has to sit in memory.

Nothing here imports torch, napari or Qt: the predictor is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

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
    "segment_slices",
    "batch_bounds",
]


@dataclass(frozen=True)
class AutoParams:
    """Settings of automatic segmentation (every size is in pixels of the original slice).

    Attributes
    ----------
    blob_sigma : float
        Gaussian smoothing (pixels) applied before thresholding and peak finding.
    min_distance : int
        Minimum distance between two blob candidates; about the radius of the smallest object.
    polarity : {"auto", "bright", "dark"}
        Whether objects are brighter or darker than the background. ``"auto"`` takes the minority
        side of the Otsu threshold as the objects.
    grid : int
        Points per side of the coarse grid added to the blob candidates (0: none). Grid points
        closer than ``min_distance`` to a blob candidate are left out.
    max_points : int
        Upper bound on the number of prompts per slice (the strongest blobs are kept first).
    points_per_batch : int
        Prompts decoded per batched decoder call (the rest in power-of-two batches, see
        :func:`batch_bounds`). 16 was fastest on a 2-core CPU; 64 was slower per prompt.
    min_iou : float
        Minimum predicted IoU of a kept mask.
    min_stability : float
        Minimum stability score (IoU of the mask thresholded at +1 and -1) of a kept mask.
    min_area : int
        Masks and painted fragments smaller than this are dropped.
    max_area_fraction : float
        Masks covering more than this fraction of the slice (background) are dropped.
    nms_iou : float
        Two masks overlapping with a higher IoU are duplicates; the lower-scoring one goes.
    containment : float
        A mask whose area lies inside a better mask by more than this fraction goes (sub-parts).
    stitch_iou : float
        Minimum IoU between labels of neighbouring slices for them to share an id.
    stitch_overlap : float
        Or: minimum fraction of the smaller of two labels of neighbouring slices inside the other.
    stitch_gap : int
        Slices an object may be missed on and still keep its id through z.
    min_contrast : float
        Blob prompts only where objects stand out: the median difference between the Otsu
        classes must be at least this many times the pixel noise (estimated from a high-pass of
        the slice). Slices of background and noise give no blob prompts (the grid still runs).
    blobs : bool
        Take prompts from blob detection (True) or use the grid alone (False: SAM's "everything"
        mode when ``grid`` is dense, e.g. 32).
    skip_covered : bool
        Decode in two rounds: first one point per blob (distance peaks), then the other candidates
        (Laplacian extras, grid) except those lying on an object the first round found.
    """

    blob_sigma: float = 2.0
    min_distance: int = 7
    polarity: str = "auto"
    grid: int = 4
    max_points: int = 256
    points_per_batch: int = 16
    min_iou: float = 0.80
    min_stability: float = 0.85
    min_area: int = 30
    max_area_fraction: float = 0.25
    nms_iou: float = 0.6
    containment: float = 0.85
    stitch_iou: float = 0.3
    stitch_overlap: float = 0.6
    stitch_gap: int = 1
    min_contrast: float = 6.0
    blobs: bool = True
    skip_covered: bool = True

    def __post_init__(self) -> None:
        if self.polarity not in ("auto", "bright", "dark"):
            raise ValueError(f"polarity must be 'auto', 'bright' or 'dark', got {self.polarity!r}")
        for name in ("min_iou", "min_stability", "max_area_fraction", "nms_iou", "containment",
                     "stitch_iou", "stitch_overlap"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
        for name in ("min_distance", "max_points", "points_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if min(self.grid, self.min_area, self.blob_sigma, self.min_contrast, self.stitch_gap) < 0:
            raise ValueError("grid, min_area, blob_sigma, min_contrast and stitch_gap must not be negative")

    def replace(self, **changes) -> AutoParams:
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        return AutoParams(**{**asdict(self), **changes})


# --------------------------------------------------------------------------- candidate prompts


def _to_gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3].mean(axis=-1)
    if image.ndim != 2:
        raise ValueError(
            f"expected one slice as (H, W) or (H, W, 3) RGB, got an array of shape {image.shape}"
        )
    return image.astype(np.float32, copy=False)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.max() == values.min():
        return float(values.max())
    return float(threshold_otsu(values))


def _contrast(gray: np.ndarray, smooth: np.ndarray, fg: np.ndarray) -> float:
    """Median difference between foreground and background (smoothed) in units of pixel noise."""
    diff = abs(float(np.median(smooth[fg])) - float(np.median(smooth[~fg])))
    hp = gray - ndi.gaussian_filter(gray, 1.0)
    noise = 1.4826 * float(np.median(np.abs(hp - np.median(hp))))
    if noise <= 1e-12:
        return np.inf if diff > 0 else 0.0
    return diff / noise


def candidate_points(
    image: np.ndarray, params: AutoParams | None = None
) -> np.ndarray:
    """Prompt positions for automatic segmentation of one slice.

    Parameters
    ----------
    image : (H, W) array of any real dtype, or (H, W, 3) uint8 RGB
        The slice. RGB is averaged to gray.
    params : AutoParams, optional
        Uses ``blob_sigma``, ``min_distance``, ``polarity``, ``grid`` and ``max_points``.

    Returns
    -------
    (N, 2) float64 array
        Points in (row, col) pixel coordinates: blob centres first (strongest first), then the
        grid points that lie away from every blob (and, when the slice has blobs, not in plain
        background farther than ``min_distance`` from the foreground).
    """
    p = params or AutoParams()
    primary, extra, grid = _candidates(image, p)
    out = np.concatenate([primary, extra, grid], axis=0)[: p.max_points]
    return np.ascontiguousarray(out, dtype=np.float64)


def _candidates(image: np.ndarray, p: AutoParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distance peaks, Laplacian extras, grid points), each (N, 2) float64 (row, col)."""
    from skimage.feature import peak_local_max

    gray = _to_gray(image)
    h, w = gray.shape
    smooth = ndi.gaussian_filter(gray, p.blob_sigma) if p.blob_sigma > 0 else gray
    thr = _otsu(smooth)
    fg = smooth > thr
    polarity = p.polarity
    if polarity == "auto":
        polarity = "bright" if fg.mean() <= 0.5 else "dark"
    if polarity == "dark":
        fg = smooth < thr
    blobs = np.zeros((0, 2), np.float64)
    extra_pts = np.zeros((0, 2), np.float64)
    if p.blobs and fg.any() and not fg.all() and _contrast(gray, smooth, fg) >= p.min_contrast:
        # One peak per object: maxima of the (smoothed) distance to the background split
        # touching round objects at their neck.
        dist = ndi.distance_transform_edt(fg)
        dist = ndi.gaussian_filter(dist, 1.0)
        peaks = peak_local_max(
            dist,
            min_distance=int(p.min_distance),
            threshold_abs=max(1.0, p.min_distance / 3.0),
            labels=ndi.label(fg)[0],
            num_peaks=p.max_points,
            exclude_border=False,
        )
        if len(peaks):
            order = np.argsort(-dist[peaks[:, 0], peaks[:, 1]], kind="stable")
            blobs = peaks[order].astype(np.float64)
        # Touching objects whose union has a single distance peak still show one blob each in
        # the Laplacian of Gaussian at the object scale: add those peaks, skipping duplicates.
        sigma = max(p.min_distance / np.sqrt(2.0), p.blob_sigma, 1.0)
        log = -ndi.gaussian_laplace(gray, sigma) * sigma**2
        if polarity == "dark":
            log = -log
        ipeaks = peak_local_max(
            log,
            min_distance=int(p.min_distance),
            threshold_abs=max(0.2 * float(log.max()), 1e-12),
            labels=fg.astype(np.int32),
            num_peaks=p.max_points,
            exclude_border=False,
        ).astype(np.float64)
        # A Laplacian peak inside the inscribed disk of a distance peak is the same object.
        reach = np.maximum(dist[blobs[:, 0].astype(int), blobs[:, 1].astype(int)], p.min_distance) \
            if len(blobs) else np.zeros(0)
        extra = [q for q in ipeaks if not len(blobs) or (np.hypot(*(blobs - q).T) >= reach).all()]
        if extra:
            extra_pts = np.asarray(extra, np.float64)
    grid = np.zeros((0, 2), np.float64)
    if p.grid > 0:
        step_r, step_c = h / p.grid, w / p.grid
        gr, gc = np.meshgrid(
            (np.arange(p.grid) + 0.5) * step_r, (np.arange(p.grid) + 0.5) * step_c, indexing="ij"
        )
        grid = np.stack([gr.ravel(), gc.ravel()], axis=1)
        found = np.concatenate([blobs, extra_pts])
        if len(found):
            d = np.sqrt(((grid[:, None, :] - found[None, :, :]) ** 2).sum(-1)).min(axis=1)
            grid = grid[d >= p.min_distance]
            # The slice has clear objects (blobs passed the contrast test): grid points in plain
            # background, farther than min_distance from any foreground, would only find it.
            far = ndi.distance_transform_edt(~fg) > p.min_distance
            gi = np.clip(np.round(grid).astype(int), 0, [h - 1, w - 1])
            grid = grid[~far[gi[:, 0], gi[:, 1]]]
    return blobs, extra_pts, grid


def _split_candidates(image: np.ndarray, p: AutoParams) -> tuple[np.ndarray, np.ndarray]:
    """(first-round points, second-round points), each (N, 2) float64 (row, col), together at
    most ``max_points``: the distance peaks (one per object), then the Laplacian extras and the
    grid (decoded only where the first round found nothing)."""
    primary, extra, grid = _candidates(image, p)
    primary = primary[: p.max_points]
    secondary = np.concatenate([extra, grid])[: p.max_points - len(primary)]
    return primary, secondary


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


def batch_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of batches covering ``n`` items: full batches of ``size``, then the remainder
    split into decreasing powers of two (13 -> 8, 4, 1).

    Compiled decoders (OpenVINO) re-plan for every new batch shape, which costs more than the
    decoding; this way only a few shapes ever occur, whatever the number of prompts.
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    out = []
    start = 0
    while n - start >= size:
        out.append((start, start + size))
        start += size
    rest = n - start
    bit = 1 << max(rest.bit_length() - 1, 0)
    while rest > 0:
        if rest >= bit:
            out.append((start, start + bit))
            start += bit
            rest -= bit
        bit >>= 1
    return out


# --------------------------------------------------------------------------- stitching through z


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
    """

    def __init__(self, min_iou: float = 0.3, min_overlap: float = 0.6, max_gap: int = 1) -> None:
        for name, v in (("min_iou", min_iou), ("min_overlap", min_overlap)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap!r}")
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
        rows, cols = linear_sum_assignment(-iou)
        for r, c in zip(rows, cols):
            if inter[r, c] > 0 and (iou[r, c] >= self.min_iou or cover[r, c] >= self.min_overlap):
                mapping[int(ids_new[c])] = int(ids_ref[r])
        return mapping

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
        del self._history[: -(self.max_gap + 1)]
        return out


def stitch_labels(
    slices: Iterable[np.ndarray], min_iou: float = 0.3, min_overlap: float = 0.6, max_gap: int = 1
) -> Iterator[np.ndarray]:
    """Stitch per-slice labels lazily: yields each (H, W) int32 slice with stack-wide ids.

    ``np.stack(list(stitch_labels(stack)))`` stitches a whole (Z, H, W) array; passing a generator
    keeps only two slices in memory.
    """
    stitcher = Stitcher(min_iou, min_overlap, max_gap)
    for sl in slices:
        yield stitcher.add(sl)


def segment_slices(
    predictor,
    zs: Iterable[int],
    params: AutoParams | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> Iterator[SliceResult]:
    """Run :func:`segment_slice` on each z in ``zs`` (slice-local ids, not stitched).

    ``progress(z)`` is called after each slice.
    """
    for z in zs:
        res = segment_slice(predictor, int(z), params)
        if progress is not None:
            progress(int(z))
        yield res

