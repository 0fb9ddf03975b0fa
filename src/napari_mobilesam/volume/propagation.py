"""Propagate objects through z: from annotated slices to a labels volume, with stop rules.

An object is given by prompts on one or more slices (points, boxes) and/or by existing masks (e.g. a
label taken from a napari Labels layer, see `objects_from_labels`). From every annotated ("seed")
slice the object is followed up and down, one slice at a time:

1. the next slice's prompts come from the current mask: its bounding box with a margin, positive
   points deep inside it (maxima of its distance transform), and -- when the current mask came from
   the model -- the model's own low-res logits as ``mask_input``;
2. among SAM's three candidate masks the one that best agrees with the current mask (IoU) plus its
   predicted IoU wins;
3. the direction stops when the mask is empty or too small, its predicted IoU is below
   ``min_score``, its IoU or overlap with the previous mask is too low, its area changed by more than
   ``area_ratio`` allows, at the ``z_range`` limit, at the stack's end, at a slice the user marked
   with a negative-only prompt, or where it meets slices of the same object done from the other side
   (between two seeds the gap is filled from both ends, one slice each in turn).

Several objects run together: all objects due on a slice share one embedding and one batched decoder
call. Masks are written only into background pixels of the output -- never over other objects or
labels already in ``target`` -- unless ``overwrite=True``. The result holds the labels volume, one
`SliceRecord` per decoded slice and one `Stop` per direction.

Hooks: ``progress(done, total)`` after each decoded slice (``total`` is an upper bound that shrinks as
directions stop) and ``cancel()`` checked before each decoder call; a cancelled run returns what it
has, with ``cancelled=True``.

The predictor is anything with ``source.n_slices``, ``source.slice_shape`` and
``predict_many(z, prompts) -> list[Prediction]`` (a `SlicePredictor` in practice).
Coordinates: (z, row, col); no napari or Qt here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..core.predictor import Prediction, Prompt

__all__ = [
    "ObjectPrompts",
    "SliceRecord",
    "Stop",
    "PropagationResult",
    "propagate",
    "objects_from_labels",
    "prompts_from_mask",
]

# Stop reasons (per direction)
EMPTY = "empty"
LOW_SCORE = "low_score"
LOW_IOU = "low_iou"
LOW_OVERLAP = "low_overlap"
AREA_CHANGE = "area_change"
Z_RANGE = "z_range"
STACK_END = "stack_end"
NEGATIVE_PROMPT = "negative_prompt"
MET = "met"
CANCELLED = "cancelled"
EMPTY_SEED = "empty_seed"


@dataclass
class ObjectPrompts:
    """One object to propagate.

    Attributes
    ----------
    label : int
        The label id written into the output (> 0).
    prompts : dict z -> Prompt (or a dict of its fields)
        Prompts on annotated slices, points in (row, col). A prompt with only negative points (label
        0), no box and no mask marks a slice the object must not reach: propagation stops before it.
    masks : dict z -> (H, W) bool
        Existing masks of the object (e.g. from a Labels layer); kept as they are and used as seeds.
    """

    label: int
    prompts: dict[int, Any] = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceRecord:
    """What happened to one object on one decoded (or seed) slice.

    ``direction`` is +1 (up), -1 (down) or 0 (a seed slice); ``from_z`` the slice the prompts came
    from (None for seeds). ``score`` is the predicted IoU and ``stability`` the stability score of the
    chosen mask (NaN for a mask seed); ``iou_prev`` / ``overlap_prev`` compare it with the previous
    mask (IoU and intersection over the smaller area). ``accepted`` tells whether it was written;
    ``reason`` is the stop reason when it was not.
    """

    label: int
    z: int
    direction: int
    from_z: int | None
    accepted: bool
    area: int
    score: float
    stability: float
    iou_prev: float
    overlap_prev: float
    candidate: int
    reason: str | None = None


@dataclass(frozen=True)
class Stop:
    """Where and why one direction of one object stopped.

    ``last_z`` is the last slice accepted in that direction (the seed if none); ``at_z`` the slice
    that was rejected or not tried (may be -1 or n_slices at the stack's ends).
    """

    label: int
    seed_z: int
    direction: int
    last_z: int
    at_z: int
    reason: str


@dataclass
class PropagationResult:
    """Labels volume (Z, H, W) plus per-slice records and per-direction stops."""

    labels: np.ndarray
    records: list[SliceRecord]
    stops: list[Stop]
    cancelled: bool = False

    def extent(self, label: int) -> tuple[int, int] | None:
        """(first z, last z) of the slices accepted for ``label`` (seeds included), or None."""
        zs = [r.z for r in self.records if r.label == label and r.accepted]
        return (min(zs), max(zs)) if zs else None

    def stops_for(self, label: int) -> list[Stop]:
        return [s for s in self.stops if s.label == label]

    def records_for(self, label: int) -> list[SliceRecord]:
        return sorted((r for r in self.records if r.label == label), key=lambda r: r.z)


# -- prompts from a mask ----------------------------------------------------------------------------
def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def prompts_from_mask(
    mask: np.ndarray,
    *,
    n_points: int = 1,
    box_margin: float = 0.1,
    min_margin: int = 2,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Box and positive points for the next slice from a (H, W) bool mask.

    Returns ``(box, points)``: box (row0, col0, row1, col1) float, the mask's bounding box grown by
    ``box_margin`` of its size (at least ``min_margin`` pixels) on each side and clipped to the slice;
    points (n, 2) (row, col): the deepest pixel of the distance transform, then further points far
    from the ones chosen among pixels at least half as deep. None for an empty mask.
    """
    H, W = mask.shape
    bb = _bbox(mask)
    if bb is None:
        return None
    r0, c0, r1, c1 = bb
    mr = max(1, min_margin, box_margin * (r1 - r0 + 1))
    mc = max(1, min_margin, box_margin * (c1 - c0 + 1))
    box = np.array(
        [max(0.0, r0 - mr), max(0.0, c0 - mc), min(H - 1.0, r1 + mr), min(W - 1.0, c1 + mc)], float
    )
    crop = np.pad(mask[r0 : r1 + 1, c0 : c1 + 1], 1)
    dt = ndi.distance_transform_edt(crop)
    flat = int(np.argmax(dt))
    pr, pc = np.unravel_index(flat, dt.shape)
    points = [(pr, pc)]
    if n_points > 1:
        deep = np.argwhere(dt >= 0.5 * dt.max())
        d2 = ((deep - np.array([pr, pc])) ** 2).sum(1).astype(float)
        for _ in range(n_points - 1):
            if d2.max() <= 0:
                break
            k = int(np.argmax(d2))
            points.append(tuple(deep[k]))
            d2 = np.minimum(d2, ((deep - deep[k]) ** 2).sum(1))
    pts = np.array(points, float) + np.array([r0 - 1, c0 - 1])  # undo crop and padding
    return box, pts


def objects_from_labels(
    labels: np.ndarray, ids: Iterable[int] | None = None, *, zs: Iterable[int] | None = None
) -> list[ObjectPrompts]:
    """Objects seeded by existing masks: for each label id, its mask on every slice where it appears.

    Parameters
    ----------
    labels : (Z, H, W) int array (e.g. a napari Labels layer's data)
    ids : label ids to take (default: every non-zero id present)
    zs : only take seeds from these slices (default: all)
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be a (Z, H, W) volume, got shape {lab.shape}")
    if lab.dtype.kind not in "ui":
        raise ValueError(f"labels must have an integer dtype, got {lab.dtype}")
    z_list = range(lab.shape[0]) if zs is None else [int(z) for z in zs]
    wanted = None if ids is None else {int(i) for i in ids}
    objs: dict[int, ObjectPrompts] = {}
    for z in z_list:
        sl = lab[z]
        present = np.unique(sl)
        for i in present:
            i = int(i)
            if i <= 0 or (wanted is not None and i not in wanted):
                continue
            objs.setdefault(i, ObjectPrompts(i)).masks[z] = sl == i
    if wanted is not None:
        missing = wanted - set(objs)
        if missing:
            raise ValueError(f"label id(s) {sorted(missing)} do not appear in the given slices")
    return [objs[i] for i in sorted(objs)]


# -- normalisation of the objects argument ----------------------------------------------------------
def _is_negative_only(p: Prompt) -> bool:
    if p.box is not None or p.mask_input is not None or p.points is None:
        return False
    lab = np.ones(len(np.asarray(p.points).reshape(-1, 2))) if p.labels is None else np.asarray(p.labels)
    return lab.size > 0 and bool(np.all(lab == 0))


def _coerce_objects(objects: Any, n: int, shape: tuple[int, int]) -> list[ObjectPrompts]:
    if isinstance(objects, ObjectPrompts):
        objects = [objects]
    elif isinstance(objects, Mapping):
        objs = []
        for label, per_z in objects.items():
            o = ObjectPrompts(int(label))
            if not isinstance(per_z, Mapping):
                raise ValueError(
                    f"object {label}: expected a dict z -> prompt or mask, got {type(per_z).__name__}"
                )
            for z, v in per_z.items():
                if isinstance(v, np.ndarray) and v.ndim == 2:
                    o.masks[int(z)] = v
                else:
                    o.prompts[int(z)] = v
            objs.append(o)
        objects = objs
    out = []
    seen = set()
    for o in objects:
        if not isinstance(o, ObjectPrompts):
            raise ValueError(f"objects must be ObjectPrompts (or a dict label -> {{z: prompt}}), got {type(o).__name__}")
        label = int(o.label)
        if label <= 0:
            raise ValueError(f"label ids must be positive integers, got {o.label}")
        if label in seen:
            raise ValueError(f"label id {label} is given twice: merge its prompts into one ObjectPrompts")
        seen.add(label)
        prompts = {}
        for z, p in o.prompts.items():
            z = int(z)
            if not 0 <= z < n:
                raise ValueError(f"object {label}: prompt on slice {z}, but the stack has {n} slices")
            if isinstance(p, Mapping):
                p = Prompt(**p)
            if not isinstance(p, Prompt):
                raise ValueError(
                    f"object {label}: the prompt on slice {z} must be a Prompt or a dict of its fields "
                    f"(points, labels, box, mask_input, multimask), got {type(p).__name__}"
                )
            prompts[z] = p
        masks = {}
        for z, m in o.masks.items():
            z = int(z)
            if not 0 <= z < n:
                raise ValueError(f"object {label}: mask on slice {z}, but the stack has {n} slices")
            m = np.asarray(m)
            if m.shape != shape:
                raise ValueError(f"object {label}: mask on slice {z} has shape {m.shape}, slices are {shape}")
            masks[z] = m.astype(bool)
            if not masks[z].any():
                raise ValueError(f"object {label}: the mask on slice {z} is empty")
        both = set(prompts) & set(masks)
        if both:
            raise ValueError(f"object {label}: slices {sorted(both)} have both a prompt and a mask; give one")
        positive = [z for z, p in prompts.items() if not _is_negative_only(p)] + list(masks)
        if not positive:
            raise ValueError(
                f"object {label} has no positive prompt or mask: give at least one slice with a positive "
                "point, a box or a mask (negative-only prompts only mark where to stop)"
            )
        out.append(ObjectPrompts(label, prompts, masks))
    if not out:
        raise ValueError("no objects to propagate: give at least one ObjectPrompts")
    return out


# -- the propagation --------------------------------------------------------------------------------
@dataclass
class _Front:
    label: int
    seed_z: int
    direction: int
    z: int  # last accepted slice
    limit: int  # last slice this front may visit (inclusive)
    limit_reason: str
    mask: np.ndarray
    low_res: np.ndarray | None
    area: int
    active: bool = True


def _iou_overlap(a: np.ndarray, b: np.ndarray, area_a: int, area_b: int) -> tuple[float, float]:
    inter = int(np.count_nonzero(a & b))
    union = area_a + area_b - inter
    iou = inter / union if union else 0.0
    small = min(area_a, area_b)
    return iou, (inter / small if small else 0.0)


def propagate(
    predictor: Any,
    objects: Sequence[ObjectPrompts] | Mapping[int, Mapping[int, Any]] | ObjectPrompts,
    *,
    z_range: tuple[int, int] | None = None,
    target: np.ndarray | None = None,
    inplace: bool = False,
    overwrite: bool = False,
    min_score: float = 0.5,
    min_iou: float = 0.0,
    min_overlap: float = 0.5,
    area_ratio: tuple[float, float] = (0.0, 3.0),
    min_area: int = 1,
    n_points: int = 1,
    box_margin: float = 0.1,
    use_mask_input: bool = True,
    score_weight: float = 1.0,
    prefetch: bool = True,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> PropagationResult:
    """Segment objects through z from their annotated slices.

    Parameters
    ----------
    predictor : SlicePredictor (or anything with ``source`` and ``predict_many``)
    objects : list of ObjectPrompts, one ObjectPrompts, or ``{label: {z: Prompt | dict | (H, W) bool}}``
    z_range : (start, stop), optional
        Only slices ``start <= z < stop`` are visited (like ``range``); seeds must lie inside.
    target : (Z, H, W) int array, optional
        Existing labels: kept (never overwritten unless ``overwrite``) and returned with the new
        objects added. Copied unless ``inplace=True``. Default: a new zero volume (uint16, or uint32
        for label ids above 65535).
    overwrite : bool
        Write masks over non-zero pixels (other objects, existing labels) too.
    min_score : float
        Stop when the chosen mask's predicted IoU is below this.
    min_iou, min_overlap : float
        Stop when the IoU with the previous slice's mask, or its overlap (intersection over the
        smaller area), is below these. IoU is 0-disabled by default because objects end abruptly
        (an ellipsoid's last slice can be 1/50 of the one before); overlap catches jumps to a
        neighbour.
    area_ratio : (low, high)
        Stop when area / previous area falls outside [low, high] (default: any shrink, growth up to 3x).
    min_area : int
        Masks with fewer pixels count as empty.
    n_points : int
        Positive points derived from each mask (distance-transform maxima).
    box_margin : float
        Box margin as a fraction of the mask's size (at least 2 pixels).
    use_mask_input : bool
        Feed the model's low-res logits of the previous slice as ``mask_input``.
    score_weight : float
        Candidate choice: maximise IoU-with-previous + ``score_weight`` * predicted IoU.
    prefetch : bool
        Ask the predictor to compute the next slices' embeddings in the background meanwhile (this
        may embed up to one slice per direction beyond where the direction then stops).
    progress : callable(done, total), optional
        Called after each decoder call (one slice, all objects due there): ``done`` counts decoded
        object-slices, ``total`` is ``done`` plus the most that can still come (it shrinks as
        directions stop, and equals ``done`` at the end).
    cancel : callable() -> bool, optional
        Checked before every decoder call; when it returns True the run stops and returns what it
        has (``cancelled=True``, stop reason ``"cancelled"``).

    Returns
    -------
    PropagationResult
    """
    src = predictor.source
    n = int(src.n_slices)
    shape = tuple(src.slice_shape)
    objs = _coerce_objects(objects, n, shape)
    lo_z, hi_z = 0, n
    if z_range is not None:
        lo_z, hi_z = (int(v) for v in z_range)
        if not (0 <= lo_z < hi_z <= n):
            raise ValueError(f"z_range must be (start, stop) with 0 <= start < stop <= {n}, got {z_range}")
    lo, hi = area_ratio
    if not 0 <= lo <= 1 <= hi:
        raise ValueError(f"area_ratio must be (low, high) with 0 <= low <= 1 <= high, got {area_ratio}")
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")

    max_label = max(o.label for o in objs)
    if target is None:
        labels = np.zeros((n, *shape), np.uint16 if max_label <= np.iinfo(np.uint16).max else np.uint32)
    else:
        if tuple(target.shape) != (n, *shape):
            raise ValueError(f"target has shape {tuple(target.shape)}, the stack is {(n, *shape)}")
        if np.dtype(target.dtype).kind not in "ui":
            raise ValueError(f"target must be an integer labels volume, got dtype {target.dtype}")
        if max_label > np.iinfo(target.dtype).max:
            raise ValueError(f"label id {max_label} does not fit target dtype {target.dtype}")
        labels = target if inplace else np.array(target, copy=True)

    records: list[SliceRecord] = []
    stops: list[Stop] = []
    done_z: dict[int, set[int]] = {o.label: set() for o in objs}

    def write(label: int, z: int, mask: np.ndarray) -> None:
        sl = labels[z]
        if overwrite:
            sl[mask] = label
        else:
            sl[mask & ((sl == 0) | (sl == label))] = label

    def cancelled() -> bool:
        return cancel is not None and bool(cancel())

    # 1. seeds: masks are taken as given; prompts are decoded (all prompt seeds of a slice together)
    seeds: dict[int, dict[int, tuple[np.ndarray, np.ndarray | None, int]]] = {o.label: {} for o in objs}
    markers: dict[int, list[int]] = {o.label: [] for o in objs}
    by_z: dict[int, list[tuple[int, Prompt]]] = {}
    for o in objs:
        for z, m in o.masks.items():
            if not lo_z <= z < hi_z:
                raise ValueError(f"object {o.label}: seed slice {z} lies outside z_range {z_range}")
            area = int(m.sum())
            seeds[o.label][z] = (m, None, area)
            records.append(SliceRecord(o.label, z, 0, None, True, area, float("nan"), float("nan"), 1.0, 1.0, -1))
        for z, p in o.prompts.items():
            if _is_negative_only(p):
                markers[o.label].append(z)
                continue
            if not lo_z <= z < hi_z:
                raise ValueError(f"object {o.label}: seed slice {z} lies outside z_range {z_range}")
            by_z.setdefault(z, []).append((o.label, p))

    is_cancelled = False
    for z in sorted(by_z):
        if cancelled():
            is_cancelled = True
            break
        preds = predictor.predict_many(z, [p for _, p in by_z[z]])
        for (label, _), pred in zip(by_z[z], preds):
            k = pred.best
            m = pred.masks[k]
            area = int(m.sum())
            ok = area >= min_area
            records.append(
                SliceRecord(label, z, 0, None, ok, area, float(pred.iou[k]), float(pred.stability[k]),
                            1.0, 1.0, k, None if ok else EMPTY_SEED)
            )
            if ok:
                seeds[label][z] = (m, pred.low_res[k], area)
            else:
                stops.append(Stop(label, z, 0, z, z, EMPTY_SEED))

    # 2. fronts: up and down from every seed, limited by other seeds, markers, z_range, stack
    fronts: list[_Front] = []
    for o in objs:
        label = o.label
        for z, (m, low, area) in seeds[label].items():
            write(label, z, m)
            done_z[label].add(z)
        szs = sorted(seeds[label])
        marks = sorted(markers[label])
        for z in szs:
            for d in (+1, -1):
                if d > 0:
                    limit, reason = hi_z - 1, (Z_RANGE if hi_z < n else STACK_END)
                    nxt_mark = [mz for mz in marks if mz > z]
                    if nxt_mark and nxt_mark[0] - 1 < limit:
                        limit, reason = nxt_mark[0] - 1, NEGATIVE_PROMPT
                    nxt_seed = [s for s in szs if s > z]
                    if nxt_seed and nxt_seed[0] - 1 < limit:
                        limit, reason = nxt_seed[0] - 1, MET
                else:
                    limit, reason = lo_z, (Z_RANGE if lo_z > 0 else STACK_END)
                    prv_mark = [mz for mz in marks if mz < z]
                    if prv_mark and prv_mark[-1] + 1 > limit:
                        limit, reason = prv_mark[-1] + 1, NEGATIVE_PROMPT
                    prv_seed = [s for s in szs if s < z]
                    if prv_seed and prv_seed[-1] + 1 > limit:
                        limit, reason = prv_seed[-1] + 1, MET
                m, low, area = seeds[label][z]
                fronts.append(_Front(label, z, d, z, limit, reason, m, low, area))

    def remaining() -> int:
        return sum(abs(f.limit - f.z) for f in fronts if f.active)

    n_done = 0
    total = remaining()

    def stop(f: _Front, at_z: int, reason: str) -> None:
        f.active = False
        stops.append(Stop(f.label, f.seed_z, f.direction, f.z, at_z, reason))

    # 3. rounds: every active front advances one slice; fronts due on the same slice share a call
    while not is_cancelled:
        due: dict[int, list[_Front]] = {}
        for f in fronts:
            if not f.active:
                continue
            nz = f.z + f.direction
            if (f.direction > 0 and nz > f.limit) or (f.direction < 0 and nz < f.limit):
                stop(f, nz, f.limit_reason)
            elif nz in done_z[f.label]:
                stop(f, nz, MET)
            else:
                due.setdefault(nz, []).append(f)
        if not due:
            break
        order = sorted(due)
        if prefetch and hasattr(predictor, "prefetch"):
            ahead = order[1:] + sorted({f.z + 2 * f.direction for fs in due.values() for f in fs})
            predictor.prefetch([z for z in ahead if lo_z <= z < hi_z])
        for z in order:
            if cancelled():
                is_cancelled = True
                break
            group = due[z]
            prompts = []
            for f in group:
                box, pts = prompts_from_mask(f.mask, n_points=n_points, box_margin=box_margin)
                prompts.append(
                    Prompt(points=pts, labels=np.ones(len(pts), int), box=box,
                           mask_input=f.low_res if (use_mask_input and f.low_res is not None) else None,
                           multimask=True)
                )
            preds: list[Prediction] = predictor.predict_many(z, prompts)
            for f, pred in zip(group, preds):
                if z in done_z[f.label]:  # the other side got here first in this round
                    stop(f, z, MET)
                    continue
                areas = pred.masks.reshape(len(pred.masks), -1).sum(1)
                best_k, best_s, best_m = 0, -np.inf, (0.0, 0.0)
                for k in range(len(pred.masks)):
                    iou, ov = _iou_overlap(pred.masks[k], f.mask, int(areas[k]), f.area)
                    s = iou + score_weight * float(pred.iou[k])
                    if s > best_s:
                        best_k, best_s, best_m = k, s, (iou, ov)
                k = best_k
                m = pred.masks[k]
                area = int(areas[k])
                iou, ov = best_m
                ratio = area / f.area if f.area else np.inf
                reason = None
                if area < min_area:
                    reason = EMPTY
                elif float(pred.iou[k]) < min_score:
                    reason = LOW_SCORE
                elif ov < min_overlap:
                    reason = LOW_OVERLAP
                elif iou < min_iou:
                    reason = LOW_IOU
                elif not lo <= ratio <= hi:
                    reason = AREA_CHANGE
                records.append(
                    SliceRecord(f.label, z, f.direction, f.z, reason is None, area, float(pred.iou[k]),
                                float(pred.stability[k]), float(iou), float(ov), k, reason)
                )
                n_done += 1
                if reason is not None:
                    stop(f, z, reason)
                    continue
                write(f.label, z, m)
                done_z[f.label].add(z)
                f.z, f.mask, f.low_res, f.area = z, m, pred.low_res[k], area
            if progress is not None:
                total = n_done + remaining()
                progress(n_done, total)
    if progress is not None and not is_cancelled and total != n_done:
        progress(n_done, n_done)  # fronts that met in a gap: the bound was not reached
    if is_cancelled:
        for f in fronts:
            if f.active:
                stop(f, f.z + f.direction, CANCELLED)
    if hasattr(predictor, "cache") and hasattr(predictor.cache, "cancel_prefetch"):
        predictor.cache.cancel_prefetch()
    return PropagationResult(labels, records, stops, is_cancelled)

