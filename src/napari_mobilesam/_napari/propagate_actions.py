"""The Segment widget's propagation actions: one object, or labels of a Labels layer, through z.

:class:`PropagateActions` is a part of :class:`~.annotator.Annotator` kept in its own module: it
uses the annotator's session, long-task runner, prompt layers and target layer. The run itself
(what is propagated, how the result is written and reported) is in :mod:`.long_tasks`; the voxels
to write are found in the worker (:class:`~.long_tasks.WritePlan`), so the GUI thread only applies
them. Coordinates: image data ``(z, row, col)``.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Labels

from . import prompt_layers as pl
from .long_tasks import (
    PropagationRun,
    WritePlan,
    describe_propagation,
    label_run,
    write_plan_in_steps,
)
from .workers import Task

__all__ = ["PropagateActions"]


class PropagateActions:
    """Propagation through z (mixed into ``Annotator``)."""

    def propagate(self) -> Task | None:
        """Follow the current object through the stack (worker; one undo step at the end).

        Every slice holding a positive point or a box is a seed (all prompts in the layers
        describe the object being made); slices with negative points only are walls it does not
        cross. Without prompts on the slice in view, every object committed on it is propagated.
        """
        if not self._ready_for_engine():
            return None
        if not pl.image_geometry(self.image).is_stack:
            self._say.info("Propagation needs a stack (z, row, col); this image is 2D.")
            return None
        z, z_range = self.current_z(), self._z_range()
        if not pl.has_positive(self._slice_prompt(z)):
            target = self.target_layer(create=False)
            if target is not None and np.asarray(pl._level0(target.data)[z]).any():
                return self.propagate_labels("labels on this slice")
            self._say.info(f"Nothing to propagate on slice {z}: click on an object first.")
            return None
        if z_range is not None and not z_range[0] <= z < z_range[1]:
            self._say.warn(f"Slice {z} lies outside the range {z_range[0]}–{z_range[1] - 1}: widen it.")
            return None
        obj = pl.object_prompts(pl.layer_prompts(self.image, self._points, self._boxes), 1, z_range)
        seeds = pl.seed_slices(obj)
        where = f"slice {z}" if len(seeds) == 1 else "slices " + ", ".join(map(str, seeds))
        run = PropagationRun([obj], f"object from {where}", keep_ids=False, clear_z=seeds, z_range=z_range)
        return self._start_propagation(run, None)

    def propagate_selected_label(self) -> Task | None:
        """Extend the target layer's selected label through z from every slice where it appears."""
        return self.propagate_labels("selected label")

    def propagate_labels(self, scope: str | None = None) -> Task | None:
        """Extend labels of the target Labels layer through the stack in one pass (one undo step).

        ``scope`` (default: the widget's choice): ``"selected label"``, ``"labels on this slice"``,
        ``"all labels"`` or ``"these ids"`` (the ids field). Slices where a label already is are
        kept as drawn; the report says where and why each label stopped.
        """
        if not self._ready_for_engine():
            return None
        target = self._c.target.value
        if not isinstance(target, Labels):
            target = self.target_layer(create=False)
        if not isinstance(target, Labels):
            self._say.info("Pick a Labels layer in 'labels' first (and select a label: picker, key L).")
            return None
        if self._empty_made_target(target):
            return None
        try:
            pl.check_target_layer(target, self.image)
            run = label_run(
                pl._level0(target.data), scope or self._c.scope.value, selected=int(target.selected_label),
                ids_text=self._c.ids.value, z=self.current_z(), z_range=self._z_range(),
            )
        except ValueError as exc:
            self._say.report(exc, "propagating labels")
            return None
        return self._start_propagation(run, target)

    def _start_propagation(self, run: PropagationRun, target: Labels | None) -> Task | None:
        session = self.session
        shape = pl.image_geometry(self.image).shape

        def done(answer):  # a finished or stopped run (a cancelled one never gets here)
            if session is self.session:
                self._write_propagation(*answer, run, target)

        return run.start(self._runner, session, shape, done)

    def _write_propagation(self, result, plan: WritePlan, run: PropagationRun, target: Labels | None) -> None:
        """Write a finished (or stopped) run: the voxels come from the worker's ``plan``; a large
        write (reading the layer at those voxels, then writing them) is spread over several
        event-loop turns, still one undo step, with one layer refresh at the end."""
        if result.cancelled and not any(r.accepted for r in result.records):
            self._say.status("Stopped before any slice was done: nothing was written.")
            return
        try:
            target = target if target is not None else self.target_layer(create=True)
        except Exception as exc:  # noqa: BLE001
            self._say.report(exc, f"writing the propagated {run.what}")
            return

        def written(exc: BaseException | None, ids: dict) -> None:
            self._writing = False
            if exc is not None:
                self._say.report(exc, f"writing the propagated {run.what}")
                return
            if self.closed:
                return
            for zs in run.clear_z:  # the seeds' prompts are used up (walls stay)
                self._remove_prompts(zs)
            if run.clear_z:
                self._clear_preview_state()
            self.last_propagation = result
            self._say.status(describe_propagation(result, run, ids, target.name))

        self._writing = True
        try:  # reading the layer and writing it, a bounded slice of GUI time per event-loop turn
            write_plan_in_steps(target, plan, run, self._c.keep_existing.value, written)
        except Exception as exc:  # noqa: BLE001 - the plan does not fit the layer
            self._writing = False
            self._say.report(exc, f"writing the propagated {run.what}")
