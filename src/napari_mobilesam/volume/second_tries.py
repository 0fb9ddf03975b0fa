"""Second tries on one slice of a propagation (mixed into `volume.propagation`'s run).

- `SecondTries.retry`: a front whose candidate was another object or jumped away clicks again on
  the part of its previous mask that candidate and the other objects do not cover;
- `SecondTries.second_opinion`: a chosen mask under `fronts.SMALL_AREA` pixels (an object's tip,
  where one pixel of error is most of the mask) is asked again with more clicks on its candidates,
  and the answer those predictions agree on is kept (`fronts.consensus`).

The retry decodes all its prompts of the slice in one batched call, the second opinion front by
front. Decisions are tuples
``(front, low-res logits, Choice, stop reason or None)``. Coordinates (row, col), masks (H, W) bool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import fronts
from .fronts import (
    LOW_OVERLAP,
    NEIGHBOUR,
    Choice,
    Front,
    _into_neighbour,
    candidate_choices,
    consensus,
    stop_reason,
)

if TYPE_CHECKING:
    from ..core.predictor import Prediction

__all__ = ["SecondTries", "RETRIED", "iter_predictions"]

#: The stop reasons that get a retry (`SecondTries.retry`). (Retrying ``"area_change"`` too let an
#: object ending beside a neighbour take that neighbour's slice on the crowded benchmark stack.)
RETRIED = (NEIGHBOUR, LOW_OVERLAP)


class SecondTries:
    """`retry` and `second_opinion`, for a run with ``predictor``, ``rules``, ``taken(z, label)``,
    ``neighbours(z, label)``, ``choose(z, front, pred)`` and ``is_cancelled()``."""

    def retry(self, z: int, decided: list, small: dict | None) -> list:
        """Second chance for fronts whose candidate was another object (``"neighbour"``) or jumped
        away (``"low_overlap"``): clicks on the part of the previous mask that candidate (and other objects)
        do not cover (`Front.retry_prompts`), all retries of the slice in one decoder call.
        Returns ``decided`` with each retried entry replaced by its retry candidate that passes the
        stop rules with the best claim, if any; a small one's prediction goes into ``small`` (for
        `second_opinion`)."""
        todo = []
        for j, (f, _low, c, reason) in enumerate(decided):
            if reason not in RETRIED:
                continue
            held = self.taken(z, f.label)
            avoid = c.mask if held is None else (c.mask | held)
            todo.extend((j, p) for p in f.retry_prompts(self.rules, avoid))
        if not todo or self.is_cancelled():
            return decided
        out = list(decided)
        for t, pred in iter_predictions(self.predictor, z, [p for _, p in todo]):
            j = todo[t][0]
            f = decided[j][0]
            c = self.choose(z, f, pred)
            if stop_reason(c, f, self.rules) is None and (out[j][3] is not None or c.claim > out[j][2].claim):
                out[j] = (f, pred.low_res[c.k], _own(c), None)
                if small is not None and c.area < fronts.SMALL_AREA:
                    small[j] = _Kept(pred, c.k)
                elif small is not None:
                    small.pop(j, None)
        return out

    def second_opinion(self, z: int, decided: list, small: dict[int, _Kept]) -> list:
        """A second opinion on small masks (tips, where one pixel of error is most of the mask):
        more clicks on the first prediction's candidates (`Front.second_prompts`), decoded front
        by front, and the candidate these predictions agree on (`fronts.consensus`). Memory: the
        first predictions are kept bit-packed; one front's extra predictions at a time.
        ``small``: {index into ``decided``: the first prediction (`_Kept`, its answer the chosen
        candidate)}."""
        out = list(decided)
        for i, first in small.items():
            if self.is_cancelled():
                break
            f = decided[i][0]
            ok = self._allowed(z, f)
            masks = [c.mask for c in candidate_choices(first, f) if c.area and ok(c)]
            prompts = f.second_prompts(self.rules, masks, self.taken(z, f.label))
            if not prompts:
                continue
            ps = [first]
            for _, pred in iter_predictions(self.predictor, z, prompts):
                ps.append(_Kept(pred, int(np.argmax(np.asarray(pred.iou)))))
            won = consensus([_answer_first(p, f) for p in ps], ok)
            if won is not None:
                j, c = won
                out[i] = (f, ps[j].low_res[c.k], _own(c), None)
        return out

    def _allowed(self, z: int, f: Front) -> Callable[[Choice], bool]:
        """Whether a candidate may be taken by ``f`` on ``z``: it passes the stop rules and does not
        run into another object of the run."""
        others = self.neighbours(z, f.label)
        return lambda c: not _into_neighbour(c.mask, c.area, others, self.rules) and stop_reason(c, f, self.rules) is None


def iter_predictions(predictor: Any, z: int, prompts: list, keep: str = "all"):
    """`core.predictor.iter_predictions` (imported when first needed: it loads torch)."""
    from ..core.predictor import iter_predictions as it

    return it(predictor, z, prompts, keep=keep)


class _Kept:
    """What `second_opinion` keeps of a prediction: its masks bit-packed (a copy, not views into a
    batch: 1/8 of the bytes), its scores, its logits as they are (a tiled predictor knows their tile
    by the array) and ``first``, the index of its answer. ``masks`` unpacks them, (K, H, W) bool."""

    def __init__(self, pred: Prediction, first: int) -> None:
        masks = np.asarray(pred.masks, bool)
        self.shape = masks.shape
        self.bits = np.packbits(masks.reshape(len(masks), -1), axis=1)
        self.iou, self.stability = np.asarray(pred.iou), np.asarray(pred.stability)
        self.low_res, self.first = pred.low_res, int(first)

    @property
    def masks(self) -> np.ndarray:
        n = int(np.prod(self.shape[1:]))
        return np.unpackbits(self.bits, axis=1, count=n).astype(bool).reshape(self.shape)


def _answer_first(p: _Kept, f: Front) -> list[Choice]:
    """``p``'s candidates for ``f`` (`candidate_choices`), its answer ``p.first`` first."""
    cs = candidate_choices(p, f)
    return [cs[p.first], *(c for c in cs if c.k != p.first)]


def _own(c: Choice) -> Choice:
    """``c`` with its own copy of the mask (not a view keeping the prediction's masks alive)."""
    return replace(c, mask=np.array(c.mask, bool))
