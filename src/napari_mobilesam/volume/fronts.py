"""The steps of propagation through z: fronts, candidate choice, the stop rules, neighbours.

A *front* follows one object in one direction (+1 up, -1 down) from one seed slice, one slice at a
time, up to a limit (the next seed of the same object, a negative-only marker, the z range or the
stack's end). Each step:

1. `Front.prompt` — the next slice's prompt from the current mask (box with a margin, positive
   points deep inside it, the model's own low-res logits as ``mask_input``);
2. `choose_candidate` — among SAM's three masks, the one maximising
   ``iou_prev + score_weight * predicted_iou + stability_weight * stability``; candidates that run
   into another object of the same run (overlap above ``max_neighbour`` of the smaller area) are
   left out;
   a chosen mask under ``SMALL_AREA`` pixels (an object's tip, where one pixel of error is most of
   the mask) gets a second opinion: more clicks on its candidates (`Front.second_prompts`) and the
   answer those predictions agree on (`consensus`);
3. `stop_reason` — the plain stop rules (empty, low score, low overlap/IoU, area change, and
   regrowth: an object that shrank towards its end does not grow again, see `regrows`);
4. neighbours — resolved by `volume.propagation` (all fronts due on one slice at once).

Everything is (row, col) on (H, W) bool masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from .objects import prompts_from_mask

if TYPE_CHECKING:  # core.predictor imports torch: not needed to import this module
    from ..core.predictor import Prediction, Prompt

__all__ = [
    "Rules", "Front", "Choice", "Neighbours", "front_limit", "choose_candidate", "candidate_choices", "consensus",
    "stop_reason", "regrows", "overlap",
]

#: Weight of the centroid shift in `Choice.claim` (tuned on ±1 px oracles: centroids are the
#: evidence errors of a pixel disturb least).
SHIFT_WEIGHT = 3.0
#: Slices the area extrapolation (`Front.expected_area`) is fitted to.
AREA_WINDOW = 5
#: Retry clicks spread along the free side of a neighbour's edge (`Front.retry_prompts`).
RING_CLICKS = 32
#: About one retry click per this many pixels of that edge (a tip a few pixels wide is hit).
RING_SPACING = 2
#: A chosen mask smaller than this (pixels) gets a second opinion (`consensus`): on a tip of a few
#: pixels an error of one pixel is most of the mask.
SMALL_AREA = 64
#: Extra clicks of that second opinion (`Front.second_prompts`).
SECOND_CLICKS = 12

from .results import (  # noqa: F401  (the codes, re-exported)
    AREA_CHANGE,
    CANCELLED,
    EMPTY,
    EMPTY_SEED,
    LOW_IOU,
    LOW_OVERLAP,
    LOW_SCORE,
    MET,
    NEGATIVE_PROMPT,
    NEIGHBOUR,
    STACK_END,
    Z_RANGE,
)


@dataclass(frozen=True)
class Rules:
    """The settings of one propagation run (see `propagate` for their meaning)."""

    min_score: float = 0.5
    min_iou: float = 0.0
    min_overlap: float = 0.5
    area_ratio: tuple[float, float] = (0.0, 3.0)
    min_area: int = 1
    n_points: int = 1
    box_margin: float = 0.1
    use_mask_input: bool = True
    score_weight: float = 3.0
    stability_weight: float = 1.0
    max_neighbour: float = 0.5
    regrow: float = 1.3
    overwrite: bool = False


def overlap(a: np.ndarray, b: np.ndarray, area_a: int, area_b: int) -> tuple[float, float, float]:
    """(IoU, intersection over the smaller area, intersection over ``a``'s area) of two (H, W)
    bool masks with known areas."""
    inter = int(np.count_nonzero(a & b))
    union = area_a + area_b - inter
    small = min(area_a, area_b)
    return (inter / union if union else 0.0), (inter / small if small else 0.0), (inter / area_a if area_a else 0.0)


@dataclass
class Front:
    """One object followed in one direction from one seed slice.

    ``z`` is the last accepted slice, ``mask`` (H, W) bool what was written there (``area`` pixels),
    ``low_res`` its (256, 256) logits (None for a mask seed). ``limit`` is the last slice it may
    visit (inclusive) and ``limit_reason`` the stop reason there. ``peak`` is the largest area
    accepted so far (for the regrowth rule).
    """

    label: int
    seed_z: int
    direction: int
    z: int
    limit: int
    limit_reason: str
    mask: np.ndarray
    low_res: np.ndarray | None
    area: int
    active: bool = True
    peak: int = 0
    record: int | None = None  # index of the record of the last accepted step
    claim: float = 0.0  # `Choice.claim` of the last accepted step
    retracted: bool = False  # its last slice was taken over by another object

    areas: list[int] = field(default_factory=list)  # the last accepted areas, oldest first
    center: np.ndarray | None = None  # (row, col) centroid of ``mask``

    def __post_init__(self) -> None:
        self.peak = max(self.peak, self.area)
        self.areas = self.areas or [self.area]
        if self.center is None:
            self.center = centroid(self.mask)

    def accept(self, z: int, mask: np.ndarray, area: int, low_res, record: int, claim: float) -> None:
        """Move to slice ``z`` with the mask written there."""
        self.z, self.mask, self.area, self.low_res = z, mask, area, low_res
        self.peak, self.record, self.claim = max(self.peak, area), record, claim
        self.areas = [*self.areas[-(AREA_WINDOW - 1):], area]
        self.center = centroid(mask)

    def back(self, z: int, mask: np.ndarray) -> None:
        """Return to slice ``z`` (the one before the last) with the mask written there, active
        again: its last step was taken back (`volume.propagation` ``retract``). The logits of that
        slice are not kept, so the next prompt goes without ``mask_input``."""
        self.z, self.mask, self.area, self.low_res = z, mask, int(mask.sum()), None
        self.areas = self.areas[:-1] or [self.area]
        self.peak, self.record, self.active = max(self.areas), None, True
        self.center = centroid(mask)

    def expected_area(self) -> float | None:
        """The next slice's area extrapolated from the last (up to ``AREA_WINDOW``) slices by a
        least-squares parabola (a round object's area is a parabola in z; the fit evens out ±1 px
        errors), or None before three slices."""
        n = len(self.areas)
        if n < 3:
            return None
        coef = np.polyfit(np.arange(n, dtype=float), np.asarray(self.areas, float), 2)
        return max(0.0, float(np.polyval(coef, float(n))))

    @property
    def next_z(self) -> int:
        return self.z + self.direction

    def beyond_limit(self, z: int) -> bool:
        return (z - self.limit) * self.direction > 0

    def remaining(self) -> int:
        """Slices this front may still decode (an upper bound)."""
        return abs(self.limit - self.z) if self.active else 0

    def prompt(self, rules: Rules, taken: np.ndarray | None = None) -> Prompt:
        """The prompt for the next slice: box, deep positive points and the low-res logits.

        ``taken``: (H, W) bool, pixels of the next slice other objects already hold; when the
        first point falls on one, the points are taken from the rest of the mask (do not click on
        another object)."""
        from ..core.predictor import Prompt

        box, pts = prompts_from_mask(self.mask, n_points=rules.n_points, box_margin=rules.box_margin)
        if taken is not None and taken[tuple(np.round(pts[0]).astype(int))]:
            free = self.mask & ~taken
            if free.any():
                pts = prompts_from_mask(free, n_points=rules.n_points, box_margin=rules.box_margin)[1]
        low = self.low_res if (rules.use_mask_input and self.low_res is not None) else None
        return Prompt(points=pts, labels=np.ones(len(pts), int), box=box, mask_input=low, multimask=True)


    def retry_prompts(self, rules: Rules, avoid: np.ndarray) -> list[Prompt]:
        """Prompts for a second try on the next slice when the first candidate was another object
        or jumped away: clicks on the part of the previous mask that ``avoid`` ((H, W) bool: that
        candidate and other objects' pixels) does not cover, as a user would click again. An
        object's last slices often lie under a neighbour's, so its tip is a small patch beside it:
        one click on the free part's deepest pixel (far from the neighbour and the mask's edge) and
        one on the free pixel nearest the previous mask's centroid (where the tip of a round object
        is) and clicks spread along the free pixels touching ``avoid`` (a tip pressed
        against the neighbour; one per ``RING_SPACING`` pixels of that edge, at most ``RING_CLICKS``),
        each with the box of the free part.
        Empty when nothing of the previous mask is free."""
        from ..core.predictor import Prompt

        free = self.mask & ~avoid
        if not free.any():
            return []
        box, pts = prompts_from_mask(free, n_points=1, box_margin=rules.box_margin)
        clicks = [pts[0]]
        rows, cols = np.nonzero(free)
        clicks.append(np.array([rows, cols], float)[:, np.argmin((rows - self.center[0]) ** 2
                                                                  + (cols - self.center[1]) ** 2)])
        ring = free & ndi.binary_dilation(avoid)  # the free pixels touching the neighbour
        ring_pts = np.argwhere(ring).astype(float)
        clicks.extend(spread_points(ring_pts, min(RING_CLICKS, max(4, len(ring_pts) // RING_SPACING))))
        kept: list[np.ndarray] = []
        for c in clicks:
            if all(np.abs(c - k).sum() > 1.5 for k in kept):
                kept.append(c)
        low = self.low_res if (rules.use_mask_input and self.low_res is not None) else None
        return [Prompt(points=np.asarray([c]), labels=np.ones(1, int), box=box, mask_input=low, multimask=True)
                for c in kept]


    def second_prompts(self, rules: Rules, masks: list[np.ndarray], taken: np.ndarray | None) -> list[Prompt]:
        """Prompts for a second opinion on a small mask: one click each on up to ``SECOND_CLICKS``
        pixels of the candidates ``masks`` ((H, W) bool each: the first prediction's candidates
        that may be taken) minus ``taken`` (other objects' pixels), spread over the smallest
        candidate first (the core they share), then over the rest; each with the box of all of
        them, as a user would click again on the spots of a doubtful answer. Empty when no pixel
        is left."""
        from ..core.predictor import Prompt

        masks = [m & ~taken if taken is not None else m for m in masks]
        masks = sorted((m for m in masks if m.any()), key=np.count_nonzero)
        if not masks:
            return []
        region = np.any(masks, axis=0)
        box, pts = prompts_from_mask(region, n_points=1, box_margin=rules.box_margin)
        clicks: list[np.ndarray] = []
        for tier in (masks[0], region & ~masks[0]):
            coords = np.argwhere(tier).astype(float)
            if not len(coords) or len(clicks) >= SECOND_CLICKS:
                continue
            start = int(np.argmin(((coords - pts[0]) ** 2).sum(1)))
            coords[[0, start]] = coords[[start, 0]]
            clicks.extend(spread_points(coords, SECOND_CLICKS - len(clicks)))
        return [Prompt(points=np.asarray([c]), labels=np.ones(1, int), box=box, multimask=True) for c in clicks]


def spread_points(pts: np.ndarray, n: int) -> list[np.ndarray]:
    """Up to ``n`` of the (N, 2) points ``pts``, spread out (farthest-point order from the first)."""
    if not len(pts):
        return []
    out = [pts[0]]
    d = ((pts - pts[0]) ** 2).sum(1)
    while len(out) < n and d.max() > 0:
        k = int(np.argmax(d))
        out.append(pts[k])
        d = np.minimum(d, ((pts - pts[k]) ** 2).sum(1))
    return out


def centroid(mask: np.ndarray) -> np.ndarray:
    """(row, col) centroid of a (H, W) bool mask ((nan, nan) when empty)."""
    rows, cols = np.nonzero(mask)
    if not rows.size:
        return np.array([np.nan, np.nan])
    return np.array([rows.mean(), cols.mean()])


def front_limit(z: int, d: int, seeds: list[int], marks: list[int], lo_z: int, hi_z: int, n: int):
    """(last slice, reason) for a front from seed slice ``z`` in direction ``d``: the nearest of the
    z range / stack end, a negative-only marker of the object and the object's next seed (MET)."""
    if d > 0:
        limit, reason = hi_z - 1, (Z_RANGE if hi_z < n else STACK_END)
        for zs, why in (([m for m in marks if m > z], NEGATIVE_PROMPT), ([s for s in seeds if s > z], MET)):
            if zs and zs[0] - 1 < limit:
                limit, reason = zs[0] - 1, why
    else:
        limit, reason = lo_z, (Z_RANGE if lo_z > 0 else STACK_END)
        for zs, why in (([m for m in marks if m < z], NEGATIVE_PROMPT), ([s for s in seeds if s < z], MET)):
            if zs and zs[-1] + 1 > limit:
                limit, reason = zs[-1] + 1, why
    return limit, reason


@dataclass(frozen=True)
class Choice:
    """The chosen candidate ``k`` of one prediction, compared with the front's previous mask.

    ``blocked`` is True when every non-empty candidate ran into another object of the run.
    ``contain`` is the share of the candidate inside the previous mask, ``area_fit`` the relative
    difference between its area and the front's `Front.expected_area` (0 when unknown), ``shift``
    the distance of its centroid from the previous mask's in units of its own radius (centroids
    hardly move under ±1 px errors). ``claim`` ranks fronts competing for the same pixels (higher
    wins): IoU with the previous mask plus that share plus the predicted IoU minus ``area_fit``
    and ``SHIFT_WEIGHT * shift``, so the object whose previous slices hold the candidate, foretell its size and
    share its axis wins.
    """

    k: int
    mask: np.ndarray
    area: int
    score: float
    stability: float
    iou: float
    overlap: float
    contain: float = 0.0
    area_fit: float = 0.0
    shift: float = 0.0
    blocked: bool = False

    @property
    def claim(self) -> float:
        return self.iou + self.contain + self.score - self.area_fit - SHIFT_WEIGHT * self.shift


def _into_neighbour(mask: np.ndarray, area: int, others: Neighbours | None, rules: Rules) -> bool:
    """Does ``mask`` mostly cover another object of the run, or lie mostly inside one (overlap
    above ``max_neighbour`` of the smaller of the two areas), or lie mostly on existing labels?"""
    if others is None or area == 0:
        return False
    if others.held is not None and np.count_nonzero(mask & others.held) > rules.max_neighbour * area:
        return True
    if others.labels is None:
        return False
    ids, inter = np.unique(others.labels[mask], return_counts=True)
    for i, c in zip(ids, inter):
        if i != 0 and c > rules.max_neighbour * min(area, others.area(int(i))):
            return True
    return False


@dataclass
class Neighbours:
    """What a front may not walk into on one slice: the run's other objects (``labels`` (H, W) int,
    0 elsewhere, and their ``areas``) and existing labels of the target (``held`` (H, W) bool)."""

    labels: np.ndarray | None
    areas: dict[int, int]
    held: np.ndarray | None = None

    def area(self, i: int) -> int:
        return self.areas.get(i, 0)

    @classmethod
    def on(cls, sl: np.ndarray, run_ids: np.ndarray, label: int, overwrite: bool = False) -> Neighbours | None:
        """From a labels slice: pixels of ids in ``run_ids`` other than ``label``, and (unless
        ``overwrite``) pixels of other ids; None if there are none."""
        in_run = np.isin(sl, run_ids)
        held = None if overwrite else ((sl != 0) & ~in_run)
        held = held if held is not None and held.any() else None
        keep = in_run & (sl != label)
        if not keep.any():
            return None if held is None else cls(None, {}, held)
        lab = np.where(keep, sl, 0)
        u, c = np.unique(lab[keep], return_counts=True)
        return cls(lab, {int(a): int(b) for a, b in zip(u, c)}, held)


def candidate_choices(pred: Prediction, front: Front) -> list[Choice]:
    """Every candidate of ``pred`` compared with ``front``'s previous mask (see `Choice`)."""
    masks = np.asarray(pred.masks, bool)
    areas = masks.reshape(len(masks), -1).sum(1)
    expected = front.expected_area()
    out = []
    for k in range(len(masks)):
        iou, ov, contain = overlap(masks[k], front.mask, int(areas[k]), front.area)
        fit = 0.0 if expected is None else abs(areas[k] - expected) / max(areas[k], expected, 1.0)
        shift = 0.0
        if areas[k] and front.area:
            shift = float(np.hypot(*(centroid(masks[k]) - front.center))) / max(np.sqrt(areas[k] / np.pi), 1.0)
        out.append(Choice(k, masks[k], int(areas[k]), float(pred.iou[k]), float(pred.stability[k]), iou, ov,
                          contain, float(fit), shift))
    return out


def choose_candidate(pred: Prediction, front: Front, rules: Rules, others: Neighbours | None) -> Choice:
    """The best of ``pred``'s candidates for ``front`` (see the module docstring).

    ``others``: the run's other objects already on this slice, or None.
    """
    best = fallback = None
    best_value = fallback_value = -np.inf
    for c in candidate_choices(pred, front):
        value = c.iou + rules.score_weight * c.score + rules.stability_weight * c.stability
        if value > fallback_value:
            fallback, fallback_value = c, value
        if c.area > 0 and _into_neighbour(c.mask, c.area, others, rules):
            continue
        if value > best_value:
            best, best_value = c, value
    if best is None:  # every candidate walks into a neighbour
        return replace(fallback, blocked=True)
    return best


def consensus(options: list[list[Choice]], ok) -> tuple[int, Choice] | None:
    """The answer several predictions of the same slice agree on most (a second opinion on a
    small mask, where one pixel of error is most of the mask).

    ``options[j]``: the candidates of prediction ``j``, its answer first (prediction 0: the
    front's own prompt, its chosen candidate first); ``ok(choice)``: whether a candidate may be
    taken (stop rules, neighbours). Each prediction's answer is its first allowed candidate.
    Every prediction with an allowed candidate votes for each answer with the IoU of its own
    allowed candidate most like it; the answer with the most votes wins. Ties go to the smaller
    answer (equally agreed on, the smaller one is what the answers contain: on an object's last
    slices the area falls), then to the earlier. Returns ``(j, choice)`` or None when nothing is
    allowed. All masks (H, W) bool, compared inside the bounding box of them all.
    """
    allowed = [[c for c in cs if c.area > 0 and ok(c)] for cs in options]
    answers = [(j, cs[0]) for j, cs in enumerate(allowed) if cs]
    if not answers:
        return None
    union = np.any([c.mask for cs in allowed for c in cs], axis=0)
    rows, cols = np.nonzero(union)
    win = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    flat = [[c.mask[win].ravel() for c in cs] for cs in allowed if cs]
    best, best_key = None, None
    for j, h in answers:
        m = h.mask[win].ravel()
        votes = sum(max(np.count_nonzero(m & x) / max(np.count_nonzero(m | x), 1) for x in ms) for ms in flat)
        key = (round(votes, 6), -h.area)
        if best_key is None or key > best_key:
            best, best_key = (j, h), key
    return best


def stop_reason(c: Choice, front: Front, rules: Rules) -> str | None:
    """Why the chosen candidate ends the front (None: accept it)."""
    lo, hi = rules.area_ratio
    ratio = c.area / front.area if front.area else np.inf
    if c.area < rules.min_area:
        return EMPTY
    if c.blocked:
        return NEIGHBOUR
    if c.score < rules.min_score:
        return LOW_SCORE
    if c.overlap < rules.min_overlap:
        return LOW_OVERLAP
    if c.iou < rules.min_iou:
        return LOW_IOU
    if not lo <= ratio <= hi or regrows(c.area, front, rules):
        return AREA_CHANGE
    return None


def regrows(area: int, front: Front, rules: Rules) -> bool:
    """The regrowth rule: a front whose area fell below half its peak is near the object's end; a
    mask more than ``rules.regrow`` times its last area means entering another object touching it
    in z. (Growth by less is not told apart from ±1 px errors on a small mask.)"""
    return bool(rules.regrow) and front.area < 0.5 * front.peak and area > rules.regrow * front.area
