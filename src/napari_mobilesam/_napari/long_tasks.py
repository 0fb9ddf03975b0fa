"""The Segment widget's long operations: one background task at a time, with Stop and Cancel.

:class:`LongTaskRunner` owns the running task, the volume it fills as it goes (``live``, shown on
the slice in view) and the Stop/Cancel buttons. It knows nothing of the widget: the widget passes
callbacks. Each task runs in a worker (:func:`~napari_mobilesam._napari.workers.start_task`) with
progress in napari's activity dock; a cancelled run writes nothing; Stop ends a propagation at once
and the slices done so far are written. After :meth:`LongTaskRunner.close` (the dock was closed)
no callback of a task reaches the widget again: nothing is written, no deleted button is touched.

The propagation runs themselves (what to propagate, how the result is written and reported) are
:class:`PropagationRun` values and the functions below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.session import STOP_REASONS
from .workers import Task, start_task

__all__ = [
    "BAR_AFTER_MS",
    "LongTaskRunner",
    "PropagationRun",
    "write_propagation",
    "prepare_write",
    "write_plan_in_steps",
    "WritePlan",
    "describe_propagation",
    "parse_ids",
    "label_run",
]


#: A long task's bar in napari's activity dock comes this long after the start, in its own turn of
#: the event loop: napari adds a bar with a whole-window repaint inside its own ``processEvents``,
#: and on top of the start's own work (status, buttons, the run's set-up) it made the longest GUI
#: stall of a propagation (about 110 ms on an idle 2-core machine with software OpenGL).
BAR_AFTER_MS = 200


class LongTaskRunner:
    """Runs one long task at a time and drives the Stop/Cancel buttons.

    Parameters
    ----------
    cancel_btn, stop_btn : magicgui PushButton
    on_status : callable(text or None)
        Shows a line in the widget's status (None: show the last one again, without the task's).
    on_error : callable(exc, doing)
        Reports a failed task.
    on_live : callable()
        Called on the GUI thread after each progress step while a ``live`` volume is filled.
    on_live_end : callable()
        Called when the task that filled the live volume ends.
    """

    def __init__(self, cancel_btn, stop_btn, *, on_status, on_error, on_live, on_live_end):
        self._cancel_btn = cancel_btn
        self._stop_btn = stop_btn
        self._on_status = on_status
        self._on_error = on_error
        self._on_live = on_live
        self._on_live_end = on_live_end
        self.task: Task | None = None
        self.live: np.ndarray | None = None
        self.doing = ""  # e.g. "propagating from slice 4", while a task runs
        self.closed = False

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done

    def start(
        self, fn, doing: str, total: int, on_result: Callable[[Any], None], *,
        stoppable: bool = False, live: np.ndarray | None = None,
    ) -> Task | None:
        """Run ``fn(report, cancelled)`` as the long task; None when another one still runs.

        ``live``: the volume ``fn`` fills as it goes, shown on the slice in view meanwhile.
        """
        if self.running:
            self._on_status(f"Still {self.doing}: wait for it, or press Stop or Cancel.")
            return None
        self._cancel_btn.enabled = True
        self._stop_btn.enabled = stoppable
        self.live, self.doing = live, doing
        self.task = start_task(
            fn,
            description=f"MobileSAM: {doing}",
            total=total,
            on_result=lambda result: self._deliver(on_result, result),
            on_error=lambda exc: self._deliver(lambda e: self._on_error(e, doing), exc),
            on_finished=lambda: self._finished(live),
            on_progress=None if live is None else (lambda done, n: None if self.closed else self._on_live()),
            progress_after_ms=BAR_AFTER_MS,
        )
        self._on_status("")  # the status shows the task's line while it runs
        return self.task

    def _deliver(self, fn, value) -> None:
        """Hand a result or an error to the widget (not after close); the task's line is done."""
        if not self.closed:
            self.doing = ""
            fn(value)

    def _finished(self, live) -> None:
        if self.closed:
            return
        if self.doing:  # cancelled: nothing was delivered
            self.doing = ""
            self._on_status(None)  # drop the task's line from the status
        self._cancel_btn.enabled = False
        self._stop_btn.enabled = False
        if self.live is live:
            self.live = None
            self._on_live_end()

    def cancel(self) -> bool:
        """Cancel the running task (nothing is written); True when one was running."""
        if not self.running:
            return False
        self.task.cancel()
        return True

    def stop(self) -> bool:
        """End the running propagation early, keeping the slices done; True when one was asked."""
        if not self.running or not self._stop_btn.enabled:
            return False
        self.task.stop()
        self._stop_btn.enabled = False
        return True

    def close(self) -> None:
        """Cancel the running task and cut every callback to the widget (the dock is closing)."""
        self.closed = True
        if self.running:
            self.task.cancel()
        self.live = None


@dataclass
class PropagationRun:
    """One propagation: what goes in and how its result is written.

    Attributes
    ----------
    objects : list of ObjectPrompts
        The engine's objects through z (one per object; several run in one pass).
    what : str
        Words for the report, e.g. ``"object from slice 4"`` or ``"labels 3, 5"``.
    keep_ids : bool
        True: the objects' labels are ids of the target layer (extended as they are); False: each
        object gets the next free id of the target layer.
    clear_z : list of int
        Slices whose prompts are used up once the result is written (the seeds).
    z_range : (start, stop) or None
    """

    objects: list
    what: str
    keep_ids: bool
    clear_z: list[int] = field(default_factory=list)
    z_range: tuple[int, int] | None = None

    def start(self, runner: LongTaskRunner, session, shape: tuple[int, ...], on_result) -> Task | None:
        """Run it through ``session``'s predictor in ``runner`` (filling a live volume);
        ``on_result((PropagationResult, WritePlan))``."""
        from ..volume.propagation import propagate

        top = max(int(o.label) for o in self.objects)
        live = np.zeros(shape, np.min_scalar_type(max(top, 1)))
        objects, z_range = self.objects, self.z_range

        def run(report, cancelled):  # the write's voxel work is done here, not on the GUI thread
            result = propagate(
                session.predictor, objects, z_range=z_range, progress=report, cancel=cancelled,
                target=live, inplace=True,
            )
            return result, WritePlan.of(result.labels)

        return runner.start(run, f"propagating {self.what}", shape[0], on_result, stoppable=True, live=live)


@dataclass
class WritePlan:
    """Where a propagation result has labels, computed in the worker so that the GUI thread's
    write is proportional to the voxels written, not to the volume.

    Attributes
    ----------
    index : tuple of 3 int arrays
        ``(z, row, col)`` of every non-zero voxel of the result (C order), full-volume coordinates.
    values : (n,) int array
        The result's label at each of them.
    labels : (k,) int array
        The distinct labels, sorted; ``inverse`` ``(n,)`` maps each voxel to its entry.
    shape : (Z, H, W)
    """

    index: tuple
    values: np.ndarray
    labels: np.ndarray
    inverse: np.ndarray
    shape: tuple

    @classmethod
    def of(cls, volume) -> WritePlan:
        """The plan of a ``(Z, H, W)`` labels volume (worker thread; reads only the touched slices)."""
        volume = np.asarray(volume)
        touched = np.flatnonzero(volume.reshape(volume.shape[0], -1).any(axis=1))
        if not touched.size:
            empty = np.zeros(0, np.intp)
            return cls((empty, empty, empty), np.zeros(0, volume.dtype), np.zeros(0, volume.dtype), empty,
                       volume.shape)
        lo, hi = int(touched[0]), int(touched[-1]) + 1
        index = np.nonzero(volume[lo:hi])
        values = volume[lo:hi][index]
        labels, inverse = np.unique(values, return_inverse=True)
        return cls((index[0] + lo, *index[1:]), values, labels, inverse.reshape(-1), volume.shape)


def write_propagation(target, result, run: PropagationRun, keep_existing: bool,
                      plan: WritePlan | None = None) -> dict[int, int]:
    """Write ``result`` into the Labels layer ``target`` as one undo step (GUI thread).

    Same rules as :func:`~napari_mobilesam._napari.label_writes.write_objects` (``run.keep_ids``)
    and :func:`~napari_mobilesam._napari.label_writes.write_volume_labels`. ``plan`` (the result's
    :class:`WritePlan`, computed in the worker; computed here when None) holds the voxels to
    write, so the GUI thread only reads the layer at those voxels and writes them: a 40 × 512 ×
    512 volume costs the objects' voxels, not ten million voxels of masks and indices. Returns
    ``{object label: id written}`` (objects with nothing new to write are left out).
    """
    from . import label_writes as lw

    index, values, written = prepare_write(target, plan if plan is not None else WritePlan.of(result.labels),
                                           run, keep_existing)
    lw._write(target, index, values)
    return written


def prepare_write(target, plan: WritePlan, run: PropagationRun, keep_existing: bool):
    """``(index, values, written)``: what :func:`write_propagation` writes into ``target`` (its
    rules, against the layer as it is now), without writing it; O(voxels of the plan)."""
    steps = _write_steps(target, plan, run, keep_existing, len(plan.values) or 1)
    chunks = [chunk for chunk in steps if chunk is not None]
    if not chunks:
        return tuple(i[:0] for i in plan.index), plan.values[:0], steps.written
    index = tuple(np.concatenate([c[0][d] for c in chunks]) for d in range(len(plan.index)))
    return index, np.concatenate([c[1] for c in chunks]), steps.written


class _write_steps:  # noqa: N801 - used like a generator function
    """The work of writing a :class:`WritePlan` into ``target``, ``step`` voxels at a time.

    Iterating yields None after each chunk of the first pass (reading the layer at the plan's
    voxels, deciding which voxels are written under the id rules of :func:`write_propagation`)
    and ``(index, values)`` for each chunk of the second pass (what to write). ``written``
    (``{object label: id written}``) is known once the first pass is done. Each item is
    O(``step``) work, so a caller can spread a write of millions of voxels over event-loop turns.
    """

    def __init__(self, target, plan: WritePlan, run: PropagationRun, keep_existing: bool, step: int):
        from . import label_writes as lw

        self.target, self.plan, self.run, self.keep_existing = target, plan, run, keep_existing
        self.step = max(1, int(step))
        self.written: dict[int, int] = {}
        self.data = lw._level0(target.data)
        if tuple(plan.shape) != tuple(self.data.shape):
            raise ValueError(f"volume of shape {tuple(plan.shape)} does not fit labels of shape "
                             f"{tuple(self.data.shape)}")

    def __iter__(self):
        from . import label_writes as lw

        plan, data, step = self.plan, self.data, self.step
        n = len(plan.values)
        if not n:
            return
        write = np.empty(n, bool)
        present = np.zeros(len(plan.labels), bool)
        for start in range(0, n, step):  # pass 1: which voxels, against the layer as it is now
            stop = min(n, start + step)
            index = tuple(i[start:stop] for i in plan.index)
            current = np.asarray(data[index]) if isinstance(data, np.ndarray) else _gather(data, index)
            if self.run.keep_ids:
                chunk = current != plan.values[start:stop]
                if self.keep_existing:
                    chunk &= current == 0
            else:
                chunk = current == 0 if self.keep_existing else np.ones(stop - start, bool)
            write[start:stop] = chunk
            present[plan.inverse[start:stop][chunk]] = True
            yield None
        if self.run.keep_ids:
            self.written = {int(v): int(v) for v in plan.labels[present]}
            new_id = None
        else:
            first = lw.next_free_label(self.target)
            ids = list(range(first, first + int(present.sum())))
            new_id = np.zeros(len(plan.labels), np.int64)
            new_id[present] = ids
            self.written = dict(zip((int(v) for v in plan.labels), ids))
        for start in range(0, n, step):  # pass 2: the voxels to write, chunk by chunk
            stop = min(n, start + step)
            chunk = write[start:stop]
            if not chunk.any():
                continue
            index = tuple(i[start:stop][chunk] for i in plan.index)
            if new_id is None:
                values = plan.values[start:stop][chunk]
            else:
                values = new_id[plan.inverse[start:stop][chunk]]
            yield index, values


#: Voxels handled per piece of work by :func:`write_plan_in_steps`.
WRITE_STEP = 32_768
#: GUI-thread time a stepped write may take per event-loop turn, in seconds.
WRITE_TURN_S = 0.015


def write_plan_in_steps(target, plan: WritePlan, run: PropagationRun, keep_existing: bool,
                        done: Callable[[BaseException | None, dict], None], step: int = WRITE_STEP,
                        turn_s: float = WRITE_TURN_S) -> None:
    """Write a propagation's ``plan`` into ``target`` under :func:`write_propagation`'s rules, as
    ONE undo step, with about ``turn_s`` of GUI-thread work per event-loop turn
    (reading the layer at the plan's voxels is spread too), one layer refresh at the end; then
    ``done(None, written)`` (``written``: ``{object label: id written}``), or ``done(exc, {})``.

    A plan of at most ``step`` voxels is written at once (``done`` is called before returning).
    Raises ValueError at once when the plan does not fit the layer.
    """
    steps = _write_steps(target, plan, run, keep_existing, step)
    if len(plan.values) <= step:
        try:
            chunks = [c for c in steps if c is not None]
            if chunks:
                from . import label_writes as lw

                lw._write(target, *chunks[0])
        except Exception as exc:  # noqa: BLE001 - handed to done
            done(exc, {})
            return
        done(None, steps.written)
        return
    _write_over_turns(target, iter(steps), lambda exc: done(exc, {} if exc is not None else steps.written),
                      turn_s)


def _write_over_turns(target, chunks, done: Callable[[BaseException | None], None], turn_s: float) -> None:
    """Apply ``chunks`` (``(index, values)`` to write, or None for work done elsewhere) to
    ``target`` under one ``block_history`` spanning event-loop turns, each turn taking about
    ``turn_s`` (0: one chunk per turn); ``data_setitem`` without refresh, then one refresh;
    then ``done``."""
    import time

    from qtpy.QtCore import QTimer

    history = target.block_history()  # one undo step over the turns
    history.__enter__()
    state = {"wrote": False}

    def finish(exc: BaseException | None) -> None:
        try:
            if state["wrote"]:
                target.refresh()  # once: the canvas and the layer list's thumbnail
        finally:
            history.__exit__(None, None, None)
        done(exc)

    def turn() -> None:
        end = time.perf_counter() + turn_s
        try:
            while True:
                chunk = next(chunks, StopIteration)
                if chunk is StopIteration:
                    finish(None)
                    return
                if chunk is not None:
                    target.data_setitem(*chunk, refresh=False)
                    state["wrote"] = True
                if time.perf_counter() > end:
                    break
        except Exception as exc:  # noqa: BLE001 - handed to done
            finish(exc)
            return
        QTimer.singleShot(1, turn)

    turn()


def _gather(data, index) -> np.ndarray:
    """``data[index]`` for array-likes without NumPy's point indexing (read the touched slices)."""
    lo, hi = int(index[0].min()), int(index[0].max()) + 1
    return np.asarray(data[lo:hi])[(index[0] - lo, *index[1:])]


def describe_propagation(result, run: PropagationRun, ids: dict[int, int], target_name: str) -> str:
    """The report: a summary line, then one line per object saying where and why it stopped."""
    how = "Stopped propagating" if result.cancelled else "Propagated"
    zs = sorted({r.z for r in result.records if r.accepted})
    span = f"z={zs[0]}–{zs[-1]}" if zs else "no slice"
    names = "" if run.keep_ids else " (" + (", ".join(f"id {i}" for i in ids.values()) or "nothing new") + ")"
    lines = [f"{how} {run.what}{names} over {span} into {target_name!r}; one undo step."]
    direction = {1: "up", -1: "down", 0: "seed"}
    for obj in run.objects:
        label = int(obj.label)
        extent = result.extent(label)
        where = f"z={extent[0]}–{extent[1]}" if extent else "nothing"
        stops = sorted(result.stops_for(label), key=lambda s: (s.seed_z, -s.direction))
        parts = [
            f"{direction.get(s.direction, s.direction)} from z={s.seed_z} to z={s.last_z}, "
            f"stopped at z={s.at_z}: {STOP_REASONS.get(s.reason, s.reason)}"
            for s in stops
        ]
        name = ids.get(label, label)
        lines.append(f"• id {name}: {where}; " + "; ".join(parts))
    return "\n".join(lines)


def parse_ids(text: str) -> list[int]:
    """Label ids from text such as ``"3, 5-7"`` -> ``[3, 5, 6, 7]``; ValueError naming the bad part."""
    ids: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"{part!r} is not a label id or range: write ids like 3, 5-7") from None
        if a < 1 or b < a:
            raise ValueError(f"{part!r}: ids are whole numbers >= 1, ranges go up (5-7)")
        ids.update(range(a, b + 1))
    return sorted(ids)


def label_run(volume, scope: str, *, selected: int, ids_text: str, z: int, z_range) -> PropagationRun:
    """The propagation of labels of a Labels layer's ``volume`` ((Z, H, W) int).

    ``scope``: ``"selected label"`` (``selected``), ``"labels on this slice"`` (every id on slice
    ``z``), ``"all labels"``, or ``"these ids"`` (parsed from ``ids_text``). Each label is seeded by
    its masks on every slice where it already is (inside ``z_range``): those slices are kept as
    drawn. ValueError when there is nothing to propagate.
    """
    from ..volume.propagation import objects_from_labels

    volume = np.asarray(volume)
    lo, hi = (0, volume.shape[0]) if z_range is None else z_range
    inside = volume[lo:hi]
    if scope == "selected label":
        ids = [int(selected)]
    elif scope == "labels on this slice":
        ids = [int(i) for i in np.unique(volume[z]) if i]
    elif scope == "these ids":
        ids = parse_ids(ids_text)
    else:
        ids = [int(i) for i in np.unique(inside) if i]
    if not ids:
        where = f"on slice {z}" if scope == "labels on this slice" else "in the labels layer"
        raise ValueError(f"there are no labels {where}: commit an object first, or pick another layer")
    present = np.isin(inside, ids).reshape(hi - lo, -1).any(axis=1)
    zs = np.flatnonzero(present) + lo
    missing = sorted(set(ids) - {int(i) for i in np.unique(inside[present]) if i}) if zs.size else ids
    if missing:
        span = "" if z_range is None else f" between {lo} and {hi - 1}"
        raise ValueError(
            f"label {', '.join(map(str, missing))} does not appear in the labels layer{span}: pick "
            "an existing label (the layer's picker tool, key L) before propagating it"
        )
    objects = objects_from_labels(volume, ids, zs=zs)
    what = f"label {ids[0]}" if len(ids) == 1 else f"{len(ids)} labels ({', '.join(map(str, ids))})"
    return PropagationRun(objects, what, keep_ids=True, z_range=z_range)
