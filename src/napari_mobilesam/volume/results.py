"""What a propagation run returns: stop-reason codes with their plain-language text, per-slice
records, per-direction stops and the result (labels volume (Z, H, W), coordinates (z, row, col))."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["STOP_REASONS", "SliceRecord", "Stop", "PropagationResult", "describe_stops"]

# Stop reasons (per direction)
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
PROTECTED = "protected"


#: Plain-language meaning of every stop reason, next to the codes above.
STOP_REASONS = {
    EMPTY: "the mask vanished",
    LOW_SCORE: "the model was unsure (low predicted IoU)",
    LOW_IOU: "the mask changed too much from the slice before",
    LOW_OVERLAP: "the mask jumped away from the previous slice's object",
    AREA_CHANGE: "the area changed too much",
    NEIGHBOUR: "ran into another object",
    Z_RANGE: "end of the chosen z-range",
    STACK_END: "end of the stack",
    NEGATIVE_PROMPT: "a slice marked with negative points only",
    MET: "met another part of the same object",
    CANCELLED: "stopped on request (Stop button)",
    EMPTY_SEED: "the seed prompts gave an empty mask",
    PROTECTED: "a slice corrected by hand (kept)",
}


def describe_stops(result: PropagationResult) -> str:
    """One line per object and direction: where propagation stopped and why."""
    lines = []
    names = {1: "up (z+)", -1: "down (z-)", 0: "seed"}
    for stop in sorted(result.stops, key=lambda s: (s.label, s.seed_z, -s.direction)):
        why = STOP_REASONS.get(stop.reason, stop.reason)
        lines.append(
            f"{names.get(stop.direction, stop.direction)} from z={stop.seed_z}: "
            f"last slice z={stop.last_z}, stopped at z={stop.at_z}: {why}"
        )
    return "\n".join(lines)


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
