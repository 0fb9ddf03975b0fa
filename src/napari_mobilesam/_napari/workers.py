"""Background work for the widget: napari thread workers with a progress bar and cancellation.

Every call that may take longer than a frame (loading a model, embedding a slice, propagating,
automatic segmentation) goes through :func:`start_task`, so the GUI thread never waits on torch.
The progress bar appears in napari's activity dock; the task can be cancelled from there, from
the widget's Cancel button, or by calling ``task.cancel()``.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, QTimer, Signal

from ..core.heap import release_freed_memory
from .spinner import calm_spinners

__all__ = ["Task", "start_task", "EXIT_WAIT_S"]

#: At the interpreter's exit, how long to wait for running tasks to stop (see :func:`_stop_at_exit`):
#: a cancelled distillation stops after its current step (about 10 s for the first one here).
EXIT_WAIT_S = 60.0

_running: set = set()  # Tasks whose body runs now (in a worker thread)
_running_lock = threading.Lock()


class _Relay(QObject):
    """Carries progress ``(done, total)`` from the worker thread to the GUI thread (queued signal)."""

    progressed = Signal(int, int)


class Task:
    """A running background job.

    Attributes
    ----------
    worker : napari FunctionWorker
        The underlying worker (signals ``returned``, ``errored``, ``finished``).
    description : str
        What the progress bar says.
    pbar : napari progress or None
        The bar in the activity dock (None until shown: see ``progress_after_ms``).
    """

    def __init__(self, worker, relay: _Relay, pbar, description: str):
        self.worker = worker
        self._relay = relay
        self.pbar = pbar
        self.description = description
        self.done = False
        self.stop_requested = False
        self.body_returned = threading.Event()  # set in the worker thread when ``fn`` returned

    def _on_finished(self) -> None:
        self.done = True

    @property
    def cancelled(self) -> bool:
        return bool(self.worker.abort_requested)

    def cancel(self) -> None:
        """Ask the job to stop; its result (if any) is dropped and ``on_result`` is not called."""
        self.worker.quit()

    def stop(self) -> None:
        """Ask the job to end early but keep what it has: ``cancelled()`` turns True in the job,
        which returns its partial result, and ``on_result`` is called with it."""
        self.stop_requested = True


def _call(holder: dict, name: str, arg: Any) -> None:
    callback = holder.get(name)
    if callback is not None:
        callback(arg)


def start_task(
    fn: Callable[[Callable[[int, int], None], Callable[[], bool]], Any],
    *,
    description: str,
    total: int = 0,
    on_result: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    progress_after_ms: int = 0,
) -> Task:
    """Run ``fn(report, cancelled)`` in a napari thread worker and return the :class:`Task`.

    Parameters
    ----------
    fn
        Called in the worker thread with ``report(done, total)`` (sets the progress bar; safe to
        call from any thread; ``total`` may change between calls) and ``cancelled()`` (True once
        cancel or stop was asked: long loops should check it and return early). Its return value
        goes to ``on_result`` (after a stop too, not after a cancel).
    description
        Label of the progress bar in the activity dock.
    total
        Initial number of steps for a determinate bar; 0 gives a busy indicator.
    on_result, on_error, on_finished
        Called on the GUI thread: with the result (not after a cancel), with the exception, and
        at the end in every case.
    on_progress
        Called on the GUI thread after each ``report(done, total)``.
    progress_after_ms
        Show the progress bar only if the task still runs after this long (0: at once). Adding a
        bar to napari's activity dock costs the GUI thread tens of ms; a task that is usually
        quick (embedding a slice that turns out to be cached) need not pay it.
    """
    from napari.qt.threading import create_worker
    from napari.utils import progress

    relay = _Relay()
    state = {"total": total, "n": 0}

    def show(done: int, new_total: int) -> None:
        state["total"], state["n"] = new_total, done
        pbar = task.pbar
        if pbar is None:
            return
        if new_total != pbar.total:
            pbar.total = new_total
        pbar.update(done - pbar.n)

    relay.progressed.connect(show)
    if on_progress is not None:
        relay.progressed.connect(on_progress)
    holder: dict[str, Any] = {"fn": fn}

    def run():
        worker, task, body = holder["worker"], holder["task"], holder.pop("fn")
        with _running_lock:
            _running.add(task)
        try:
            return body(relay.progressed.emit, lambda: bool(worker.abort_requested) or task.stop_requested)
        finally:
            release_freed_memory()  # in this thread (the call releases the GIL), not the GUI's
            with _running_lock:
                _running.discard(task)
            task.body_returned.set()

    run.__name__ = run.__qualname__ = description
    worker = create_worker(run, _start_thread=False, _ignore_errors=on_error is not None)
    holder["worker"] = worker
    task = Task(worker, relay, None, description)
    holder["task"] = task

    def make_pbar() -> None:
        if task.done or task.pbar is not None:
            return
        try:  # the bar starts napari's spinner: slowed where each frame costs a software repaint
            calm_spinners()
        except Exception:  # noqa: BLE001 - a cosmetic speed-up must never stop a task
            pass
        task.pbar = progress(total=state["total"], desc=description)
        if state["n"]:
            task.pbar.update(state["n"])
        worker.finished.connect(task.pbar.close)

    # the callbacks too are reached through the holder (emptied at the end, see below)
    holder["on_result"], holder["on_error"] = on_result, on_error
    if on_result is not None:
        worker.returned.connect(lambda value: _call(holder, "on_result", value))
    if on_error is not None:
        worker.errored.connect(lambda exc: _call(holder, "on_error", exc))
    if progress_after_ms > 0:
        QTimer.singleShot(int(progress_after_ms), make_pbar)
    else:
        make_pbar()
    if on_finished is not None:
        worker.finished.connect(on_finished)
    # napari's task list keeps finished workers (their function and signal connections), and
    # run -> holder -> worker -> run is a cycle: ``run`` takes ``fn`` out of the holder, the
    # callbacks are called through it, and it is emptied at the end, so what ``fn`` and the
    # callbacks hold (a session, a model) goes by reference counting, frozen or not (gc_freeze)
    worker.finished.connect(holder.clear)
    # ``done`` last: each slot of the worker's ``finished`` is its own queued call on the GUI
    # thread, and an event-loop pass can run between them; connected first, the task looked
    # done (the widget idle) before its end was handled (the live preview still shown)
    worker.finished.connect(task._on_finished)
    worker.start()
    return task


def _stop_at_exit(timeout: float = EXIT_WAIT_S) -> None:
    """A script that ends while a task runs (without closing the viewer or running napari's event
    loop): cancel every running task and wait until each body has returned and napari's worker
    has finished, at most ``timeout`` seconds in all. Otherwise the interpreter shuts down under a
    worker thread of Qt's pool that still runs Python: its next signal hits a deleted Qt object
    (abort, exit status 134) or the thread is stopped inside Qt's frames (segmentation fault, 139).
    Then the viewers still open are closed (:func:`_close_viewers`)."""
    with _running_lock:
        tasks = list(_running)
    if tasks:
        _stop_tasks(tasks, timeout)
    _close_viewers()


def _close_viewers() -> None:
    """Close the viewers a script left open, while Python still runs: our widgets close as they
    do when the user closes the window (the labels' last autosave is written). Otherwise PyQt's
    own exit handler, which runs after this one, deletes the windows while it walks its table of
    Python wrappers, and the Python code the deletion runs (the widgets' ``destroyed`` handlers)
    runs inside that walk: where the rare segmentation fault at the exit of a script that ended
    during a distillation was seen (docs/reliability.md)."""
    napari = sys.modules.get("napari")
    if napari is None:
        return
    for viewer in list(getattr(napari.Viewer, "_instances", ())):
        try:
            viewer.close()
        except Exception:  # noqa: BLE001 - Qt may be half torn down already
            pass


def _stop_tasks(tasks: list, timeout: float) -> None:
    names = ", ".join(task.description for task in tasks)
    print(f"napari-mobilesam: stopping before exit ({names}; up to {timeout:.0f} s)…", file=sys.stderr, flush=True)
    for task in tasks:
        try:
            task.cancel()
        except Exception:  # noqa: BLE001 - the worker may be gone already
            pass
    end = time.monotonic() + timeout
    for task in tasks:
        task.body_returned.wait(max(0.0, end - time.monotonic()))
    try:  # napari's run() still emits the end signals after the body: let the pool go idle
        from qtpy.QtCore import QCoreApplication, QThreadPool

        pool = QThreadPool.globalInstance()
        while pool.activeThreadCount() and time.monotonic() < end:
            time.sleep(0.01)
        # no event loop will deliver what the tasks posted (progress, a distillation's events);
        # dropped now, while Python runs: Qt would free those holding Python objects after it
        QCoreApplication.removePostedEvents(None)
    except Exception:  # noqa: BLE001 - Qt may be half torn down already
        pass


def _register_exit_handler() -> None:
    """Run :func:`_stop_at_exit` when the interpreter starts to shut down: with ``threading``'s
    own exit hooks (``threading._register_atexit``, what ``concurrent.futures`` uses), which run
    before Python joins its threads and before thread pools refuse new work, so a last autosave
    (zarr writes through such a pool) still works; ``atexit`` where that hook is missing."""
    import concurrent.futures.thread  # noqa: F401 - its hook (pools refuse new work) first registered, so run after ours

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_stop_at_exit)
            return
        except RuntimeError:  # the interpreter is already shutting down
            return
    atexit.register(_stop_at_exit)


_register_exit_handler()
