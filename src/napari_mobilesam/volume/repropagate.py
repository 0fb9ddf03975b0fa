"""Re-propagate one corrected object from the slice where it was corrected.

After a user corrects object ``label`` on slice ``z`` (its pixels there are already the corrected
mask), `repropagate` follows it again from ``z`` only, up and down, and rewrites its slices beyond
``z`` in each direction until a slice the user corrected by hand (``protected``: those are kept, as
is everything past them). Inside that span the object's old pixels are erased first, so the result
there is exactly the new propagation (also where it now stops earlier); a run stopped early
(``cancel``) gives the object back its former pixels on the slices it did not reach. Other objects are never
touched: their pixels are existing labels the new masks may not cover.

Coordinates: labels (Z, H, W), slices ``z``; no napari or Qt here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import InputError
from .objects import ObjectPrompts
from .propagation import propagate
from .results import PROTECTED, Z_RANGE, PropagationResult

__all__ = ["repropagate", "repropagation_span"]


def repropagation_span(z: int, n: int, protected: Iterable[int] = ()) -> tuple[int, int]:
    """``(start, stop)`` (like ``range``) of the slices a re-propagation from ``z`` may rewrite:
    from the slice after the nearest protected slice below ``z`` to the one before the nearest
    protected slice above it (the stack's ends without one). ``z`` itself may be in ``protected``."""
    prot = {int(p) for p in protected} - {int(z)}
    below = [p for p in prot if p < z]
    above = [p for p in prot if p > z]
    return (max(below) + 1 if below else 0), (min(above) if above else n)


def repropagate(
    predictor: Any,
    labels: np.ndarray,
    label: int,
    z: int,
    *,
    protected: Iterable[int] = (),
    inplace: bool = False,
    **options: Any,
) -> PropagationResult:
    """Propagate object ``label`` again from its corrected mask on slice ``z``.

    Parameters
    ----------
    predictor : SlicePredictor (or anything `propagate` takes)
    labels : (Z, H, W) int array
        The labels volume with the correction already written on slice ``z``.
    label : int
        The corrected object's id; it must be present on slice ``z``.
    z : int
        The corrected slice (kept as it is; the seed).
    protected : iterable of int
        Slices corrected by hand: never rewritten, and propagation does not pass them (stop
        reason ``"protected"``). ``z`` may be among them.
    inplace : bool
        Write into ``labels`` (e.g. a Labels layer's data) instead of a copy.
    **options
        Any other `propagate` option (``min_score``, ``max_neighbour``, ``progress``, ``cancel``, ...);
        not ``z_range``, ``target``, ``overwrite``.

    Returns
    -------
    PropagationResult
        ``labels`` the whole volume (rewritten only inside `repropagation_span` and only for
        ``label``); records and stops of this run; a direction that reached a protected slice stops
        with ``"protected"``.
    """
    lab = np.asarray(labels)
    if lab.ndim != 3 or lab.dtype.kind not in "ui":
        raise InputError(f"labels must be a (Z, H, W) integer volume, got shape {lab.shape}, dtype {lab.dtype}")
    n = lab.shape[0]
    label, z = int(label), int(z)
    if not 0 <= z < n:
        raise InputError(f"slice {z} is outside the stack of {n} slices")
    bad = set(options) & {"z_range", "target", "overwrite", "inplace"}
    if bad:
        raise InputError(f"repropagate sets {sorted(bad)} itself: leave them out")
    prot = {int(p) for p in protected}
    outside = sorted(p for p in prot if not 0 <= p < n)
    if outside:
        raise InputError(f"protected slices {outside} are outside the stack of {n} slices")
    seed = lab[z] == label
    if not seed.any():
        raise InputError(f"object {label} is not on slice {z}: correct it there first, then re-propagate")
    out = lab if inplace else np.array(lab, copy=True)
    lo, hi = repropagation_span(z, n, prot)
    old: dict[int, np.ndarray] = {}  # the object's former pixels, put back where a Stop left them
    for q in range(lo, hi):  # the old propagation of this object inside the span goes
        if q != z:
            sl = out[q]
            old[q] = sl == label
            sl[old[q]] = 0
    res = propagate(predictor, [ObjectPrompts(label, masks={z: seed})], z_range=(lo, hi), target=out,
                    inplace=True, **options)
    if res.cancelled:  # slices the run never decided keep the object as it was
        decided = {r.z for r in res.records if r.label == label}
        for q, mask in old.items():
            if q not in decided:
                out[q][mask & (out[q] == 0)] = label
    res.stops = [replace(s, reason=PROTECTED) if s.reason == Z_RANGE and s.at_z in prot else s
                 for s in res.stops]
    return res
