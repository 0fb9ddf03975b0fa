"""Propagate objects through z: from annotated slices to a labels volume, with stop rules.

An object is given by prompts on one or more slices (points, boxes) and/or by existing masks (e.g. a
label taken from a napari Labels layer, see `objects_from_labels`). From every annotated ("seed")
slice the object is followed up and down, one slice at a time, by a *front* (`volume.fronts`):
the next slice's prompt comes from the current mask, the best of SAM's three candidates is chosen
(predicted IoU and stability first, agreement with the previous slice second; a small mask, an
object's tip, is asked again with more clicks and the answer they agree on is kept) and the stop
rules are applied (see ``STOP_REASONS`` for every reason a direction ends).

Objects know their neighbours. All fronts advance together, one slice per round; fronts due on the
same slice share one embedding and one batched decoder call. A candidate that mostly covers another
object of the run (already written on that slice) is left out, and when no candidate is left the
front stops with ``"neighbour"``. A front whose candidate lies mostly under the footprint of
another object's front that is heading to the same slice waits for it, so that both are decided
together: fronts on the same slice claim pixels in order of ``Choice.claim`` (agreement with their
own previous slice plus predicted IoU); a front left with little of its mask stops with
``"neighbour"``, otherwise it keeps the pixels nobody claimed before it. Existing labels in
``target`` are never overwritten (unless ``overwrite=True``). Every record's area, every extent and
every stop equals what is written into the labels volume.

Hooks: ``progress(done, total)`` after each decoded slice (``total`` is an upper bound that shrinks as
directions stop) and ``cancel()`` checked before each decoder call; a cancelled run returns what it
has, with ``cancelled=True``.

The predictor is anything with ``source.n_slices``, ``source.slice_shape`` and
``predict_many(z, prompts) -> list[Prediction]`` (a `SlicePredictor` in practice).
Coordinates: (z, row, col); no napari or Qt here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from . import fronts
from .fronts import (
    CANCELLED,
    EMPTY,
    EMPTY_SEED,
    MET,
    NEIGHBOUR,
    Choice,
    Front,
    Neighbours,
    Rules,
    choose_candidate,
    front_limit,
    stop_reason,
)
from .objects import (
    ObjectPrompts,
    as_objects,
    is_negative_only,
    objects_from_labels,
    prompts_from_mask,
)
from .results import (
    STOP_REASONS,
    PropagationResult,
    SliceRecord,
    Stop,
    describe_stops,
    labels_volume,
    z_bounds,
)
from .second_tries import SecondTries, _Kept, _own, iter_predictions

if TYPE_CHECKING:
    from ..core.predictor import Prediction

__all__ = [
    "ObjectPrompts",
    "SliceRecord",
    "Stop",
    "PropagationResult",
    "propagate",
    "objects_from_labels",
    "prompts_from_mask",
    "STOP_REASONS",
    "describe_stops",
]

# -- one run ----------------------------------------------------------------------------------------
class _Run(SecondTries):
    """The state of one propagation: the labels volume, records, stops and fronts."""

    def __init__(self, predictor: Any, objs: list[ObjectPrompts], rules: Rules, labels: np.ndarray,
                 z_lo: int, z_hi: int, progress: Callable | None, cancel: Callable | None) -> None:
        self.predictor, self.objs, self.rules, self.labels = predictor, objs, rules, labels
        self.n = int(predictor.source.n_slices)
        self.lo_z, self.hi_z = z_lo, z_hi
        self.progress, self.cancel = progress, cancel
        self.run_ids = np.array(sorted(o.label for o in objs), np.int64)
        self.records: list[SliceRecord] = []
        self.stops: list[Stop] = []
        self.done_z: dict[int, set[int]] = {o.label: set() for o in objs}
        self.fronts: list[Front] = []
        self.n_done = 0
        self.cancelled = False

    # -- writing and stopping ----------------------------------------------------------------------
    def writable(self, label: int, z: int, mask: np.ndarray) -> np.ndarray:
        """The pixels of ``mask`` this object may take on slice ``z``: background and its own, plus
        existing labels with ``overwrite`` (never another object of this run)."""
        sl = self.labels[z]
        if self.rules.overwrite:
            return mask & ~np.isin(sl, self.run_ids[self.run_ids != label])
        return mask & ((sl == 0) | (sl == label))

    def write(self, label: int, z: int, mask: np.ndarray) -> None:
        self.labels[z][mask] = label
        self.done_z[label].add(z)

    def stop(self, f: Front, at_z: int, reason: str) -> None:
        f.active = False
        self.stops.append(Stop(f.label, f.seed_z, f.direction, f.z, at_z, reason))

    def is_cancelled(self) -> bool:
        if not self.cancelled and self.cancel is not None and bool(self.cancel()):
            self.cancelled = True
        return self.cancelled

    # -- 1. seeds ----------------------------------------------------------------------------------
    def seeds(self) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray | None]]]:
        """Write every seed: masks as given, prompts decoded (all prompt seeds of a slice in one
        call; one click is ambiguous, so the candidate with the best predicted IoU,
        `Prediction.best`). Returns ``{label: {z: (written mask, low-res logits or None)}}``."""
        seeds: dict[int, dict[int, tuple[np.ndarray, np.ndarray | None]]] = {o.label: {} for o in self.objs}
        by_z: dict[int, list[tuple[int, Any]]] = {}
        for o in self.objs:
            for z, m in o.masks.items():
                self._check_in_range(o.label, z)
                self._seed(seeds, o.label, z, m, None, np.nan, np.nan, -1)
            for z, p in o.prompts.items():
                if not is_negative_only(p):
                    self._check_in_range(o.label, z)
                    by_z.setdefault(z, []).append((o.label, p))
        for z in sorted(by_z):
            if self.is_cancelled():
                break
            found = {}
            for t, pred in iter_predictions(self.predictor, z, [p for _, p in by_z[z]], keep="best"):
                found[t] = pred  # one candidate each: ``keep="best"`` holds a third of the masks
            for t, (label, _) in enumerate(by_z[z]):
                pred = found.pop(t)
                k = int(np.argmax(np.asarray(pred.iou))) if len(pred.masks) > 1 else 0
                self._seed(seeds, label, z, pred.masks[k], pred.low_res[k], float(pred.iou[k]),
                           float(pred.stability[k]), k)
        return seeds

    def _check_in_range(self, label: int, z: int) -> None:
        if not self.lo_z <= z < self.hi_z:
            raise InputError(f"object {label}: seed slice {z} lies outside z_range ({self.lo_z}, {self.hi_z})")

    def _seed(self, seeds, label, z, mask, low_res, score, stability, k) -> None:
        mask = self.writable(label, z, np.asarray(mask, bool))
        area = int(mask.sum())
        ok = area >= self.rules.min_area
        reason = None if ok else EMPTY_SEED
        self.records.append(SliceRecord(label, z, 0, None, ok, area, score, stability, 1.0, 1.0, k, reason))
        if ok:
            self.write(label, z, mask)
            seeds[label][z] = (mask, low_res)
        else:
            self.stops.append(Stop(label, z, 0, z, z, EMPTY_SEED))

    # -- 2. fronts ---------------------------------------------------------------------------------
    def make_fronts(self, seeds) -> None:
        """Up and down from every seed, each limited by the object's other seeds, its negative-only
        markers, the z range and the stack."""
        for o in self.objs:
            marks = sorted(z for z, p in o.prompts.items() if is_negative_only(p))
            szs = sorted(seeds[o.label])
            for z in szs:
                m, low = seeds[o.label][z]
                for d in (+1, -1):
                    limit, why = front_limit(z, d, szs, marks, self.lo_z, self.hi_z, self.n)
                    self.fronts.append(Front(o.label, z, d, z, limit, why, m, low, int(m.sum())))

    def remaining(self) -> int:
        return sum(f.remaining() for f in self.fronts)

    # -- 3. rounds ---------------------------------------------------------------------------------
    def round(self, prefetch: bool) -> bool:
        """Advance every active front by one slice. Returns False when nothing is left to do or
        the run was cancelled."""
        due: dict[int, list[Front]] = {}
        for f in self.fronts:
            if not f.active:
                continue
            if f.beyond_limit(f.next_z):
                self.stop(f, f.next_z, f.limit_reason)
            elif f.next_z in self.done_z[f.label]:
                self.stop(f, f.next_z, MET)
            else:
                due.setdefault(f.next_z, []).append(f)
        if not due:
            return False
        if prefetch and hasattr(self.predictor, "prefetch"):
            order = sorted(due)
            ahead = order[1:] + sorted({f.z + 2 * f.direction for fs in due.values() for f in fs})
            self.predictor.prefetch([z for z in ahead if self.lo_z <= z < self.hi_z])
        for z in sorted(due):
            # a take-over may have stopped one, or sent it back a slice (it is due there next round)
            group = [f for f in due[z] if f.active and f.next_z == z]
            if not group:
                continue
            if self.is_cancelled():
                return False
            prompts = [f.prompt(self.rules, self.taken(z, f.label)) for f in group]
            self.resolve(z, group, iter_predictions(self.predictor, z, prompts))
            if self.progress is not None:
                self.progress(self.n_done, self.n_done + self.remaining())
        return True

    def taken(self, z: int, label: int) -> np.ndarray | None:
        """(H, W) bool: pixels of slice ``z`` held by the run's other objects (None: none)."""
        held = np.isin(self.labels[z], self.run_ids[self.run_ids != label])
        return held if held.any() else None

    def resolve(self, z: int, group: list[Front], preds: Iterable[tuple[int, Prediction]]) -> None:
        """Decide the fronts due on slice ``z``: choose each one's candidate, apply the stop rules,
        then let them claim pixels in order of their claim (see the module docstring).

        ``preds``: ``(index into group, Prediction)`` as decoded; only the chosen mask and its
        logits are kept of each, so memory does not grow with the number of fronts."""
        decided: list = [None] * len(group)
        small: dict[int, _Kept] = {}
        for i, pred in preds:
            f = group[i]
            c = self.choose(z, f, pred)
            decided[i] = (f, pred.low_res[c.k], _own(c), stop_reason(c, f, self.rules))
            if decided[i][3] is None and c.area < fronts.SMALL_AREA:
                small[i] = _Kept(pred, c.k)
        decided = self.second_opinion(z, self.retry(z, decided, small), small)
        lost = self.claim(z, decided, defer=True)
        if lost:  # candidates that lost their pixels to a front decided first: one more try
            self.claim(z, self.retry(z, lost, None), defer=False)

    def claim(self, z: int, decided: list, defer: bool) -> list:
        """Write the decided fronts on slice ``z`` in order of their claim; a front losing most of
        its mask to fronts before it stops with ``"neighbour"``, or, with ``defer``, is returned
        (nothing recorded) for a retry once the others are written."""
        deferred = []
        decided = sorted(decided, key=lambda t: (t[3] is not None, -t[2].claim))
        for f, low, c, reason in decided:
            if z in self.done_z[f.label]:  # the other side of the same object got here first
                self.stop(f, z, MET)
                continue
            written = self.writable(f.label, z, c.mask) if reason is None else None
            if written is not None:
                sl = self.labels[z]
                lost = int(np.count_nonzero(c.mask & np.isin(sl, self.run_ids[self.run_ids != f.label])))
                if lost > self.rules.max_neighbour * c.area:
                    reason = NEIGHBOUR
                elif int(written.sum()) < self.rules.min_area:
                    reason = NEIGHBOUR if lost else EMPTY
                if reason == NEIGHBOUR and defer:
                    deferred.append((f, low, c, reason))
                    continue
            area = int(written.sum()) if reason is None else c.area
            self.records.append(
                SliceRecord(f.label, z, f.direction, f.z, reason is None, area, c.score, c.stability,
                            float(c.iou), float(c.overlap), c.k, reason)
            )
            self.n_done += 1
            if reason is not None:
                self.stop(f, z, reason)
                continue
            self.write(f.label, z, written)
            f.accept(z, written, area, low, len(self.records) - 1, c.claim)
        return deferred

    # -- neighbours --------------------------------------------------------------------------------
    def choose(self, z: int, f: Front, pred: Prediction) -> Choice:
        """``f``'s candidate on ``z``, leaving out those that run into another object of the run,
        unless that object only reached ``z`` as the last slice of a front and ``f``'s claim on it is
        better: then that slice is taken over (`retract`)."""
        c = choose_candidate(pred, f, self.rules, self.neighbours(z, f.label))
        if not c.blocked:
            return c
        free = choose_candidate(pred, f, self.rules, None)
        owners = self.takeable(z, free, f)
        if not owners:
            return c
        for g in owners:
            self.retract(g, z)
        return choose_candidate(pred, f, self.rules, self.neighbours(z, f.label))

    def neighbours(self, z: int, label: int) -> Neighbours | None:
        return Neighbours.on(self.labels[z], self.run_ids, label, self.rules.overwrite)

    def takeable(self, z: int, c: Choice, f: Front) -> list[Front]:
        """The fronts whose last slice is ``z``, covered by ``c``, with a weaker claim than ``c``
        (an empty list unless every object ``c`` runs into is such a front)."""
        nb = self.neighbours(z, f.label)
        if nb is None or nb.labels is None or c.area == 0:
            return []
        ids, inter = np.unique(nb.labels[c.mask], return_counts=True)
        owners = []
        for i, n_in in zip(ids.tolist(), inter.tolist()):
            if i == 0 or n_in <= self.rules.max_neighbour * min(c.area, nb.area(i)):
                continue
            g = next((g for g in self.fronts if g.label == i and g.z == z and g.record is not None
                      and g.z != g.seed_z and not g.retracted), None)
            if g is None:
                return []
            if not c.claim > g.claim:
                return []
            owners.append(g)
        return owners

    def retract(self, g: Front, z: int) -> None:
        """Take slice ``z`` back from front ``g`` (its last one): erase what it wrote there, mark
        the record rejected, and send ``g`` back to its previous slice to decide ``z`` again next
        round, now with the taker's pixels in place (its first candidate there was the taker, whose
        front had not arrived yet: an object's tip under a neighbour). Once per front."""
        sl = self.labels[z]
        sl[g.mask & (sl == g.label)] = 0
        self.done_z[g.label].discard(z)
        self.records[g.record] = replace(self.records[g.record], accepted=False, reason=NEIGHBOUR)
        g.retracted = True
        self.stops = [s for s in self.stops if (s.label, s.seed_z, s.direction) != (g.label, g.seed_z, g.direction)]
        g.back(z - g.direction, self.labels[z - g.direction] == g.label)

    def finish(self) -> PropagationResult:
        if self.progress is not None and not self.cancelled:
            self.progress(self.n_done, self.n_done)
        for f in self.fronts:
            if f.active:
                self.stop(f, f.next_z, CANCELLED)
        cache = getattr(self.predictor, "cache", None)
        if cache is not None and hasattr(cache, "cancel_prefetch"):
            cache.cancel_prefetch()
        return PropagationResult(self.labels, self.records, self.stops, self.cancelled)


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
    score_weight: float = 3.0,
    stability_weight: float = 1.0,
    max_neighbour: float = 0.5,
    regrow: float = 1.3,
    prefetch: bool = True,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> PropagationResult:
    """Segment objects through z from their annotated slices.

    Parameters
    ----------
    predictor : SlicePredictor (or anything with ``source`` and ``predict_many``)
    objects : list of ObjectPrompts, one ObjectPrompts, or ``{label: {z: Prompt | dict | (H, W) bool}}``
        (see `volume.objects.as_objects`)
    z_range : (start, stop), optional
        Only slices ``start <= z < stop`` are visited (like ``range``); seeds must lie inside.
    target : (Z, H, W) int array, optional
        Existing labels: kept (never overwritten unless ``overwrite``) and returned with the new
        objects added. Copied unless ``inplace=True``. Default: a new zero volume (uint16, or uint32
        for label ids above 65535).
    overwrite : bool
        Write masks over existing labels of ``target`` too (never over another object of this run).
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
    score_weight, stability_weight : float
        Candidate choice: maximise IoU-with-previous + ``score_weight`` * predicted IoU +
        ``stability_weight`` * stability (the model's own confidence first, so that a candidate
        is not chosen for being the largest; agreement with the previous slice breaks ties).
    max_neighbour : float
        A candidate overlapping another object of this run by more than this fraction of the
        smaller of the two is left out (stop reason ``"neighbour"`` when none is left); a front
        losing more than this fraction of its mask to fronts with a better claim stops too.
    regrow : float
        Regrowth rule (stop reason ``"area_change"``): once an object's area has fallen below half
        its largest, a mask more than ``regrow`` times the previous area belongs to another object
        touching it in z (0: off).
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
    objs = as_objects(objects, n, shape)
    lo_z, hi_z = z_bounds(z_range, n)
    lo, hi = area_ratio
    if not 0 <= lo <= 1 <= hi:
        raise InputError(f"area_ratio must be (low, high) with 0 <= low <= 1 <= high, got {area_ratio}")
    if n_points < 1:
        raise InputError(f"n_points must be >= 1, got {n_points}")
    rules = Rules(
        min_score=min_score, min_iou=min_iou, min_overlap=min_overlap, area_ratio=(lo, hi), min_area=min_area,
        n_points=n_points, box_margin=box_margin, use_mask_input=use_mask_input, score_weight=score_weight,
        stability_weight=stability_weight, max_neighbour=max_neighbour, regrow=regrow, overwrite=overwrite,
    )
    labels = labels_volume(target, inplace, (n, *shape), max(o.label for o in objs))
    run = _Run(predictor, objs, rules, labels, lo_z, hi_z, progress, cancel)
    run.make_fronts(run.seeds())
    while not run.cancelled and run.round(prefetch):
        pass
    return run.finish()
