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
3. `stop_reason` — the plain stop rules (empty, low score, low overlap/IoU, area change);
4. neighbours — resolved by `volume.propagation` (all fronts due on one slice at once).

Everything is (row, col) on (H, W) bool masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .objects import prompts_from_mask

if TYPE_CHECKING:  # core.predictor imports torch: not needed to import this module
    from ..core.predictor import Prediction, Prompt

__all__ = ["Rules", "Front", "Choice", "Neighbours", "front_limit", "choose_candidate", "stop_reason", "overlap"]

# Stop reasons (per direction). Their plain-language text is ``propagation.STOP_REASONS``.
EMPTY = "empty"
LOW_SCORE = "low_score"
LOW_IOU = "low_iou"
LOW_OVERLAP = "low_overlap"
AREA_CHANGE = "area_change"
NEIGHBOUR = "neighbour"
Z_RANGE = "z_range"
STACK_END = "stack_end"
NEGATIVE_PROMPT = "negative_prompt"
MET = "met"
CANCELLED = "cancelled"
EMPTY_SEED = "empty_seed"


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
    overwrite: bool = False


def overlap(a: np.ndarray, b: np.ndarray, area_a: int, area_b: int) -> tuple[float, float]:
    """(IoU, intersection over the smaller area) of two (H, W) bool masks with known areas."""
    inter = int(np.count_nonzero(a & b))
    union = area_a + area_b - inter
    small = min(area_a, area_b)
    return (inter / union if union else 0.0), (inter / small if small else 0.0)


@dataclass
class Front:
    """One object followed in one direction from one seed slice.

    ``z`` is the last accepted slice, ``mask`` (H, W) bool what was written there (``area`` pixels),
    ``low_res`` its (256, 256) logits (None for a mask seed). ``limit`` is the last slice it may
    visit (inclusive) and ``limit_reason`` the stop reason there. ``pending`` holds a decoded
    prediction for ``z + direction`` that waits for a neighbour heading to the same slice.
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
    pending: Prediction | None = None

    @property
    def next_z(self) -> int:
        return self.z + self.direction

    def beyond_limit(self, z: int) -> bool:
        return (z - self.limit) * self.direction > 0

    def remaining(self) -> int:
        """Slices this front may still decode (an upper bound)."""
        return abs(self.limit - self.z) if self.active else 0

    def heading_to(self, z: int) -> bool:
        """Still active and will reach slice ``z`` later (not this step) unless it stops first."""
        ahead = (z - self.z) * self.direction
        return self.active and self.pending is None and ahead > 1 and not self.beyond_limit(z)

    def prompt(self, rules: Rules) -> Prompt:
        """The prompt for the next slice: box, deep positive points and the low-res logits."""
        from ..core.predictor import Prompt

        box, pts = prompts_from_mask(self.mask, n_points=rules.n_points, box_margin=rules.box_margin)
        low = self.low_res if (rules.use_mask_input and self.low_res is not None) else None
        return Prompt(points=pts, labels=np.ones(len(pts), int), box=box, mask_input=low, multimask=True)


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
    ``claim`` ranks fronts competing for the same pixels (higher wins).
    """

    k: int
    mask: np.ndarray
    area: int
    score: float
    stability: float
    iou: float
    overlap: float
    blocked: bool = False

    @property
    def claim(self) -> float:
        return self.iou + self.overlap + self.score


def _into_neighbour(mask: np.ndarray, area: int, others: Neighbours | None, rules: Rules) -> bool:
    """Does ``mask`` mostly cover another object of the run, or lie mostly inside one (overlap
    above ``max_neighbour`` of the smaller of the two areas)?"""
    if others is None or area == 0:
        return False
    ids, inter = np.unique(others.labels[mask], return_counts=True)
    for i, c in zip(ids, inter):
        if i != 0 and c > rules.max_neighbour * min(area, others.area(int(i))):
            return True
    return False


@dataclass
class Neighbours:
    """The run's other objects on one slice: ``labels`` (H, W) int (0 elsewhere) and their areas."""

    labels: np.ndarray
    areas: dict[int, int]

    def area(self, i: int) -> int:
        return self.areas.get(i, 0)

    @classmethod
    def on(cls, sl: np.ndarray, run_ids: np.ndarray, label: int) -> Neighbours | None:
        """From a labels slice: pixels of ids in ``run_ids`` other than ``label``; None if none."""
        ids = run_ids[run_ids != label]
        keep = np.isin(sl, ids)
        if not keep.any():
            return None
        lab = np.where(keep, sl, 0)
        u, c = np.unique(lab[keep], return_counts=True)
        return cls(lab, {int(a): int(b) for a, b in zip(u, c)})


def choose_candidate(pred: Prediction, front: Front, rules: Rules, others: Neighbours | None) -> Choice:
    """The best of ``pred``'s candidates for ``front`` (see the module docstring).

    ``others``: the run's other objects already on this slice, or None.
    """
    masks = np.asarray(pred.masks, bool)
    areas = masks.reshape(len(masks), -1).sum(1)
    best: Choice | None = None
    best_value = fallback_value = -np.inf
    fallback: Choice | None = None
    for k in range(len(masks)):
        iou, ov = overlap(masks[k], front.mask, int(areas[k]), front.area)
        c = Choice(k, masks[k], int(areas[k]), float(pred.iou[k]), float(pred.stability[k]), iou, ov)
        value = iou + rules.score_weight * c.score + rules.stability_weight * c.stability
        if value > fallback_value:
            fallback, fallback_value = c, value
        if areas[k] > 0 and _into_neighbour(masks[k], int(areas[k]), others, rules):
            continue
        if value > best_value:
            best, best_value = c, value
    if best is None:  # every candidate walks into a neighbour
        f = fallback
        return Choice(f.k, f.mask, f.area, f.score, f.stability, f.iou, f.overlap, blocked=True)
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
    if not lo <= ratio <= hi:
        return AREA_CHANGE
    return None
