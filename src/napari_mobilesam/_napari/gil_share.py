"""A shorter GIL switch interval while a widget has work that runs Python in worker threads.

Why: CPython hands the GIL from a thread that keeps running Python code (the model loading's
weights-only unpickler, TinyViT's construction, a propagation's front logic, a distillation
step) to a waiting thread only after the switch interval, 5 ms by default, and on a loaded
machine the holder is often preempted while it holds it, so the GUI thread, which gives the
GIL up at every turn of Qt's event loop and needs it back for every Python callback, waits far
longer. Measured on the 2-core test machine (load average 5, a thread looping
``torch.load(weights_only=True)`` beside an idle viewer, 10 ms heartbeat, three rounds of 6 s):
longest heartbeat gaps 97, 266 and 9 ms with 5 ms; 16, 11 and 8 ms with 1 ms.

What: while a widget holds it (:func:`hold`: the Segment widget once it has a model, the Distil
panel during a run) the interval is :data:`INTERVAL_S`; the last :func:`release` puts back the
value found at the first hold. An interval already shorter (set by the user or another plugin)
is left alone, and so is one changed by someone else meanwhile.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["hold", "release", "held", "INTERVAL_S"]

#: The switch interval while held (seconds).
INTERVAL_S = 0.001

_holders: set[int] = set()
_state: dict[str, float | None] = {"before": None}


def held() -> bool:
    """Whether a widget holds the short interval now."""
    return bool(_holders)


def hold(holder: Any) -> None:
    """Use the short interval until :func:`release` with the same ``holder``."""
    if not _holders:
        before = sys.getswitchinterval()
        if before > INTERVAL_S:
            _state["before"] = before
            sys.setswitchinterval(INTERVAL_S)
        else:
            _state["before"] = None  # already as short or shorter: not ours to change
    _holders.add(id(holder))


def release(holder: Any) -> None:
    """``holder`` no longer needs it; the last release restores the interval found at the first hold."""
    if id(holder) not in _holders:
        return
    _holders.discard(id(holder))
    if _holders or _state["before"] is None:
        return
    if abs(sys.getswitchinterval() - INTERVAL_S) < 1e-9:  # not changed by someone else meanwhile
        sys.setswitchinterval(_state["before"])
    _state["before"] = None
