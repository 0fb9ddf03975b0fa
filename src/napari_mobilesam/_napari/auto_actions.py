"""The Segment widget's automatic segmentation actions (one slice, the whole stack).

:class:`AutomaticActions` is a part of :class:`~.annotator.Annotator` kept in its own module: it
uses the annotator's session, long-task runner, preview and target layer. The controls and the
stack run are in :mod:`.auto_panel`; the engine call is
:meth:`~napari_mobilesam.core.session.Session.segment_automatically` (one slice) or
:meth:`~napari_mobilesam.core.session.Session.segment_stack_automatically` (the stack).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from . import prompt_layers as pl
from .auto_panel import StackRun, describe_stack, write_stack
from .workers import Task

__all__ = ["AutomaticActions"]


class AutomaticActions:
    """Automatic segmentation of the slice in view or of the stack (mixed into ``Annotator``)."""

    def _auto_request(self, session):
        try:
            return self._c.automatic.request(session)
        except (InputError, ValueError) as exc:
            self._say.report(exc, "segmenting automatically")
            return None

    def segment_slice_automatically(self) -> Task | None:
        """Find every object of the current slice (worker) with the chosen mode (AIS or the point
        grid) and show their outlines in the preview; C commits them all."""
        if not self._ready_for_engine():
            return None
        session, z = self.session, self.current_z()
        how = self._auto_request(session)
        if how is None:
            return None

        def done(answer):
            if session is not self.session:
                return
            labels, n, outlines = answer
            self._new_generation()  # a click's preview still on its way is dropped
            self._prediction = None
            self._set_preview(z, labels, "auto", outlines)
            self._say.status(f"Slice {z}: {n} objects found ({how.name}). C commits them all, Shift-C discards.")

        def run(report, cancelled):  # the labels' conversion, count and outlines here, not on the GUI thread
            labels = session.segment_automatically(z, how.params, mode=how.mode, ais_params=how.ais_params,
                                                   apg_params=how.apg_params)
            labels = np.asarray(labels, dtype=np.uint32)
            return labels, len(np.unique(labels)) - 1, pl.outline_labels(labels)

        return self._runner.start(run, f"segmenting slice {z} automatically ({how.name})", 0, done)

    def segment_stack_automatically(self) -> Task | None:
        """Segment every slice (or the limited range) with the chosen mode in a worker, stitched
        through z, and write the result into the target layer as one undo step."""
        if not self._ready_for_engine():
            return None
        geom = pl.image_geometry(self.image)
        if not geom.is_stack:
            self._say.info("This image is 2D: use 'Auto-segment slice'.")
            return None
        session = self.session
        how = self._auto_request(session)
        if how is None:
            return None
        lo, hi = self._z_range() or (0, geom.n_slices)
        run = StackRun(how, list(range(lo, hi)))

        def done(result):  # finished or stopped (a cancelled run never gets here)
            if session is self.session:
                self._write_stack(result, run)

        task = run.start(self._runner, session, geom.shape, done)
        if task is not None:
            self._stack_run = run
            self._say.status(f"0 of {len(run.zs)} slices done.")
        return task

    def _stack_progress(self) -> None:
        """After each slice of a stack run (GUI thread): say how far it got."""
        run, runner = getattr(self, "_stack_run", None), self._runner
        if (run is not None and runner.running and runner.live is not None and runner.live is run.live
                and not runner.task.cancelled and not runner.task.stop_requested):
            self._say.status(f"{run.done} of {len(run.zs)} slices done.")

    def _write_stack(self, result, run: StackRun) -> None:
        self._stack_run = None
        volume, done = result
        stopped = len(done) < len(run.zs)
        if not done or not np.any(volume):
            self._say.status("Stopped before any slice was done: nothing was written." if stopped
                             else f"No object found on {run.what}: nothing was written.")
            return
        try:
            target = self.target_layer(create=True)
            ids = write_stack(target, volume, self._c.keep_existing.value)
        except Exception as exc:  # noqa: BLE001
            self._say.report(exc, "writing the automatic segmentation")
            return
        self._say.status(describe_stack(run, done, stopped, ids, target.name))
