"""A bounded ``gc.freeze()`` for the widgets: full garbage collections stop scanning napari.

Why: a napari process with torch and OpenVINO loaded holds about 600 000 long-lived objects that
the cyclic garbage collector tracks (napari's layers, Qt wrappers, modules, torch's and our
models). CPython runs a full (generation 2) collection whenever the objects that survived the
young collections since the last full one pass a quarter of that number, about 140 000, which
napari, torch and our workers reach every few actions. Such a collection scans every tracked
object, 0.35–0.7 s on a 2-core machine, and holds the GIL all along, in whichever thread
allocates at that moment (the distillation or model-loading worker): the GUI thread cannot run,
the viewer stalls (``benchmarks/interaction.py --stalls --profile`` names them). Our own work adds
10 000–20 000 survivors per action; the rest is napari and its libraries, so it cannot be avoided
by allocating less.

What: while a widget holds it (:func:`hold`), the objects alive at chosen moments are moved to
Python's permanent generation (``gc.freeze()``, which costs nothing: it splices lists), so full
collections scan only what was created since. The Segment widget freezes when a model has been
set (after the heavy imports and the model load), the Distil panel when a run starts.

The cost, and its bound: cyclic garbage among frozen objects is never collected while frozen,
e.g. a napari layer alive at the freeze and deleted later, or a replaced model with its session
and embedding cache. So at the moments that create such garbage the freeze is undone, one full
collection runs and the survivors are frozen again (:func:`collect_when_gone`): a layer removed
from the viewer (one event-loop turn later), a model or a session replaced (one second later,
and not while the replaced session's cache still computes a slice: that thread holds the cache
and the model, and frees them when it ends); only if what was released is still alive then (not
freed by reference counting), and releases that fall due together cost one collection. The last :func:`release` (the dock closed, the
distillation finished) undoes the freeze. When something else in the process had frozen objects
before us, nothing here freezes or unfreezes anything (``gc.unfreeze`` cannot tell theirs from ours).
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any

__all__ = ["hold", "release", "freeze", "collect_when_gone", "held", "collections_done"]

log = logging.getLogger(__name__)

_holders: dict[int, str] = {}  # id(holder) -> what it is (for logs)
_state: dict[str, Any] = {"outside": False, "collections": 0, "timer": None, "waited": 0}
_released: list[tuple[weakref.ref, Any]] = []  # (what was released, wait_while or None)

#: How often a check waiting for a busy holder looks again, and for how long at most.
_RECHECK_MS = 500
_MAX_WAIT_MS = 60_000


def held() -> bool:
    """Whether a widget holds the freeze now (and it is ours to manage)."""
    return bool(_holders) and not _state["outside"]


def collections_done() -> int:
    """How many unfreeze-collect-freeze rounds ran in this process (for tests and benchmarks)."""
    return _state["collections"]


def hold(holder: Any) -> None:
    """Keep the freeze for ``holder`` (a widget) until :func:`release` with the same object, and
    freeze now. Nothing is frozen if objects were already frozen by someone else."""
    if not _holders:
        _state["outside"] = gc.get_freeze_count() > 0
        if _state["outside"]:
            log.debug("napari-mobilesam: objects were frozen before us; leaving gc alone")
    _holders[id(holder)] = type(holder).__name__
    freeze()


def freeze() -> None:
    """Move every object alive now to the permanent generation, if a holder keeps the freeze."""
    if held():
        gc.freeze()


def release(holder: Any) -> None:
    """``holder`` no longer needs the freeze; the last one undoes it (the objects go back to the
    oldest generation and are collected as usual again)."""
    if _holders.pop(id(holder), None) is None or _holders:
        return
    if not _state["outside"]:
        gc.unfreeze()
    _state["outside"] = False


def collect_when_gone(*objects: Any, after_ms: int = 0, wait_while=None) -> None:
    """``objects`` were just released (a removed layer, a replaced model or session). ``after_ms``
    later (at least one event-loop turn), if any of them is still alive (cyclic garbage, perhaps
    frozen), undo the freeze, collect everything and freeze again. Releases that fall due
    together cost one collection.

    ``wait_while``: a bound method telling whether a thread may still be using them (a replaced
    session's ``busy``: its prefetch finishing a slice holds the session and its model); while it
    says so the check is put off (every 0.5 s, 60 s at most): a collection then would free
    nothing and cost a full scan of the heap on the GUI thread. It is held weakly (a strong
    reference to a released session's method would keep the session alive)."""
    if not held():
        return
    for obj in objects:
        if obj is None:
            continue
        try:
            _released.append((weakref.ref(obj), None if wait_while is None else weakref.WeakMethod(wait_while)))
        except TypeError:  # not weakly referenceable: judge by the others
            continue
    if not _released:
        return
    _state["waited"] = 0
    timer = _state.get("timer")
    if timer is None:
        from qtpy.QtCore import QTimer

        timer = _state["timer"] = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(_collect_if_alive)
    if timer.isActive():
        after_ms = min(timer.remainingTime(), after_ms)  # the earliest one due decides
    timer.start(max(int(after_ms), 0))


def _busy(wait: weakref.WeakMethod | None) -> bool:
    method = None if wait is None else wait()
    return method is not None and bool(method())


def _collect_if_alive() -> None:
    alive = [(ref, wait) for ref, wait in _released if ref() is not None]
    if alive and held() and _state["waited"] < _MAX_WAIT_MS and any(_busy(w) for _, w in alive):
        _released[:] = alive  # still in use by a thread: look again later
        _state["waited"] += _RECHECK_MS
        _state["timer"].start(_RECHECK_MS)
        return
    _released.clear()
    if not alive or not held():
        return
    del alive
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _state["collections"] += 1
