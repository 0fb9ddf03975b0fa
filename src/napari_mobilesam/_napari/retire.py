"""A replaced model is freed on a background thread, not on the GUI thread.

Freeing a loaded MobileSAM model costs 60–110 ms of CPU on the thread that drops its last
reference (measured on the 2-core test machine), almost all of it in OpenVINO's destructors of
its compiled models and infer requests. Those release the GIL, so on another thread they cost
the GUI nothing; on the GUI thread (where :meth:`SegmentWidget.set_model` replaced the model)
they were the longest stall of a model switch. :func:`retire` hands the object to this module's
thread, which waits until it holds the last reference (a prefetch thread of the replaced session
may still be finishing a slice with it), drops it, and gives the freed memory back to the system
(:func:`napari_mobilesam.core.heap.release_freed_memory`).

The caller must drop its own references after calling :func:`retire`; if others still hold the
object after :data:`MAX_WAIT_S`, the thread lets go of it and whoever drops it last frees it.
Before the interpreter exits, objects still waiting are let go at once and freed (an OpenVINO
object freed while the interpreter shuts down can crash it).
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
import time
from typing import Any

__all__ = ["Retirement", "retire", "pending", "MAX_WAIT_S"]

log = logging.getLogger(__name__)

#: How long the thread waits for other holders of a retired object before letting go of it.
MAX_WAIT_S = 30.0
_POLL_S = 0.05

_queue: queue.SimpleQueue = queue.SimpleQueue()
_lock = threading.Lock()
_pending: set[Retirement] = set()
_state: dict[str, Any] = {"thread": None, "exiting": False}


class Retirement:
    """One object on its way out. :meth:`busy` is true until the background thread has dropped
    it (a bound method the widgets' :func:`~napari_mobilesam._napari.gc_freeze.collect_when_gone`
    can wait on: a collection while it is still held would free nothing)."""

    def __init__(self, obj: Any, what: str):
        self._obj = obj
        self.what = what
        self._done = threading.Event()

    def busy(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the object was dropped by the thread (or ``timeout`` seconds); True if it was."""
        return self._done.wait(timeout)


def retire(obj: Any, what: str = "") -> Retirement:
    """Free ``obj`` on the background thread once the thread holds its only reference."""
    gone = Retirement(obj, what or type(obj).__name__)
    with _lock:
        _pending.add(gone)
        thread = _state["thread"]
        if thread is None or not thread.is_alive():
            thread = _state["thread"] = threading.Thread(target=_run, name="mobilesam-retire", daemon=True)
            thread.start()
    _queue.put(gone)
    return gone


def pending() -> int:
    """How many retired objects the thread has not dropped yet (for tests)."""
    with _lock:
        return len(_pending)


def _run() -> None:
    from ..core.heap import release_freed_memory

    while True:
        gone = _queue.get()
        obj, gone._obj = gone._obj, None
        deadline = time.monotonic() + MAX_WAIT_S
        # two references are ours: ``obj`` and getrefcount's argument
        while sys.getrefcount(obj) > 2 and time.monotonic() < deadline and not _state["exiting"]:
            time.sleep(_POLL_S)
        if sys.getrefcount(obj) > 2:
            log.debug("napari-mobilesam: %s still held elsewhere; freed by its last holder", gone.what)
        del obj
        with _lock:
            _pending.discard(gone)
            idle = not _pending
        gone._done.set()
        if idle:
            release_freed_memory()


@atexit.register
def _drain(timeout: float = 10.0) -> None:
    """At exit: stop waiting for other holders and let the thread free what it holds."""
    _state["exiting"] = True
    with _lock:
        left = list(_pending)
    end = time.monotonic() + timeout
    for gone in left:
        gone.wait(max(end - time.monotonic(), 0.0))
