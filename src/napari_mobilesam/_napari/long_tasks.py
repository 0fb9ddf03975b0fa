"""The segmentation widget's long operations: propagation through z and automatic segmentation.

:class:`LongTasksMixin` is part of :class:`~napari_mobilesam._napari.segment_widget.SegmentWidget`
(kept in its own module to keep both files short). Each operation runs in a worker
(:func:`~napari_mobilesam._napari.workers.start_task`) with progress in napari's activity dock and
the widget's Cancel button; one runs at a time; a cancelled run writes nothing; a finished one is
written into the target Labels layer as one undo step. A propagation can also be stopped (the
widget's Stop button): it ends at once and the slices done so far are written, as one undo step.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Labels

from ..core.session import describe_stops
from . import prompt_layers as pl
from .workers import Task, start_task

__all__ = ["LongTasksMixin"]


class LongTasksMixin:
    """Propagation, automatic segmentation and cancel for the segmentation widget.

    Uses the widget's state: ``_image``, ``_points``, ``_boxes``, ``_session``, ``_sam``,
    ``_long_task``, the z-range and target controls, and its preview/commit helpers.
    """

    def _start_long(
        self, fn, description: str, total: int, on_result, *, stoppable: bool = False, live=None
    ) -> Task | None:
        """Run ``fn`` as the widget's long task. ``live``: the volume it fills as it goes, shown
        in the preview layer on the slice in view while it runs."""
        if self._long_task is not None and not self._long_task.done:
            self._info("Another MobileSAM task is running: wait for it or press Cancel.")
            return None

        def finished():
            self._cancel_btn.enabled = False
            self._stop_btn.enabled = False
            if self._live is live:
                self._live = None
                if self._preview_kind == "live":
                    self._clear_preview_state()

        self._cancel_btn.enabled = True
        self._stop_btn.enabled = stoppable
        self._live = live
        self._long_task = start_task(
            fn,
            description=description,
            total=total,
            on_result=on_result,
            on_error=lambda exc: self._report(exc, description[len("MobileSAM: "):]),
            on_finished=finished,
            on_progress=None if live is None else (lambda done, total: self._show_live()),
        )
        self._status.value = f"{description[len('MobileSAM: '):].capitalize()}…"
        return self._long_task

    def _show_live(self) -> None:
        """While a propagation runs, show what it has written on the slice in view (unless the
        user's own prompts are previewed there)."""
        live = self._live
        if live is None or self._image is None or self._preview_kind not in (None, "live"):
            return
        if tuple(live.shape) != tuple(pl.image_geometry(self._image).shape):  # another image now
            return
        z = self.current_z()
        if not 0 <= z < live.shape[0]:
            return
        here = live[z]
        if here.any():
            self._set_preview(z, here.astype(np.uint32), "live")
        elif self._preview_kind == "live":
            self._clear_preview_state()

    def cancel(self) -> None:
        """Cancel the running propagation / automatic segmentation (nothing is written)."""
        if self._long_task is not None and not self._long_task.done:
            self._long_task.cancel()
            self._status.value = "Cancelled: nothing was written."

    def stop(self) -> None:
        """End the running propagation early and write the slices it has done (one undo step)."""
        task = self._long_task
        if task is not None and not task.done and self._stop_btn.enabled:
            task.stop()
            self._stop_btn.enabled = False
            self._status.value = "Stopping: the slices done so far will be written…"

    def segment_slice_automatically(self) -> Task | None:
        """Find every object of the current slice (worker) and show them in the preview."""
        if not self._ready_for_engine():
            return None
        session, z = self._session, self.current_z()

        def done(labels):
            if session is not self._session:
                return
            self._prediction = None
            self._set_preview(z, np.asarray(labels, dtype=np.uint32), "auto")
            n = len(np.unique(labels)) - 1
            self._status.value = f"Slice {z}: {n} objects found. C commits them all, Shift-C discards."

        return self._start_long(
            lambda report, cancelled: session.segment_automatically(z),
            f"MobileSAM: segmenting slice {z} automatically",
            0,
            done,
        )

    def _ready_for_engine(self) -> bool:
        if self._image is None:
            self._warn("No image layer: open or pick an image first.")
            return False
        if self._session is None:
            self._info("The model is loading; try again in a moment." if self._sam is None else "No session.")
            if self._sam is None:
                self.load_model()
            return False
        return True

    def _z_range(self) -> tuple[int, int] | None:
        """The (start, stop) z-range for propagation, or None when not limited."""
        if not self._limit_z.value:
            return None
        lo, hi = sorted((int(self._z_from.value), int(self._z_to.value)))
        return lo, hi + 1

    def propagate(self) -> Task | None:
        """Follow the current object through the stack (worker; one undo step at the end).

        The current slice's prompts seed it, and so do the prompts on every other slice that holds
        a positive point or a box (all prompts in the layers describe the object being made);
        slices with negative points only are walls it does not cross.
        """
        if not self._ready_for_engine():
            return None
        if not pl.image_geometry(self._image).is_stack:
            self._info("Propagation needs a stack (z, row, col); this image is 2D.")
            return None
        z = self.current_z()
        prompts = pl.slice_prompts(self._image, z, self._points, self._boxes)
        if not prompts.has_positive:
            self._info(f"Nothing to propagate on slice {z}: click on an object first.")
            return None
        z_range = self._z_range()
        if z_range is not None and not z_range[0] <= z < z_range[1]:
            self._warn(f"Slice {z} lies outside the z-range {z_range[0]}–{z_range[1] - 1}: widen it.")
            return None
        stops = pl.negative_only_slices(self._image, self._points, self._boxes)
        more = {}
        for zs in pl.seed_slices(self._image, self._points, self._boxes):
            if zs == z or (z_range is not None and not z_range[0] <= zs < z_range[1]):
                continue
            sp = pl.slice_prompts(self._image, zs, self._points, self._boxes)
            more[zs] = (sp.points, sp.labels, sp.box)
        seeds = sorted([z, *more])
        session = self._session
        live = np.zeros(pl.image_geometry(self._image).shape, np.uint8)

        def run(report, cancelled):
            return session.propagate_prompts(
                z, prompts.points, prompts.labels, prompts.box, more_seeds=more,
                stop_points=stops, z_range=z_range, progress=report, cancel=cancelled, live=live,
            )

        def done(result):  # a finished or stopped run (a cancelled one never gets here)
            if session is not self._session:
                return
            where = f"slice {z}" if len(seeds) == 1 else "slices " + ", ".join(map(str, seeds))
            self._write_propagation(result, None, f"object from {where}", clear_z=seeds)

        n = pl.image_geometry(self._image).n_slices
        what = f"slice {z}" if len(seeds) == 1 else f"{len(seeds)} slices"
        return self._start_long(
            run, f"MobileSAM: propagating from {what}", n, done, stoppable=True, live=live
        )

    def propagate_selected_label(self) -> Task | None:
        """Extend the target layer's selected label through z from every slice where it appears."""
        if not self._ready_for_engine():
            return None
        target = self._target_combo.value
        if not isinstance(target, Labels):
            self._info("Pick a Labels layer in 'labels' and select one of its labels (picker, key L).")
            return None
        try:
            pl.check_target_layer(target, self._image)
        except ValueError as exc:
            self._report(exc, "propagating a label")
            return None
        label = int(target.selected_label)
        volume = np.asarray(target.data)
        session, z_range = self._session, self._z_range()
        live = np.zeros(volume.shape, np.min_scalar_type(max(label, 1)))

        def run(report, cancelled):
            return session.propagate_label(
                volume, label, z_range=z_range, progress=report, cancel=cancelled, live=live
            )

        def done(result):  # a finished or stopped run (a cancelled one never gets here)
            if session is not self._session:
                return
            self._write_propagation(result, label, f"label {label}", clear_z=None)

        n = pl.image_geometry(self._image).n_slices
        return self._start_long(
            run, f"MobileSAM: propagating label {label}", n, done, stoppable=True, live=live
        )

    def _write_propagation(self, result, label: int | None, what: str, clear_z: list[int] | None) -> None:
        if result.cancelled and not any(r.accepted for r in result.records):
            self._status.value = "Stopped before any slice was done: nothing was written."
            return
        try:
            target = self.target_layer(create=True) if label is None else self._target_combo.value
            ids = pl.write_volume_labels(
                target, result.labels, keep_existing=self._keep_existing.value, label=label
            )
        except Exception as exc:  # noqa: BLE001
            self._report(exc, f"writing the propagated {what}")
            return
        if clear_z is not None:  # the seeds' prompts are used up (walls stay)
            for zs in clear_z:
                self._remove_prompts(zs)
            self._clear_preview_state()
        self.last_propagation = result
        zs = sorted({r.z for r in result.records if r.accepted})
        span = f"z={zs[0]}–{zs[-1]}" if zs else "no slice"
        name = f"id {ids[0]}" if ids else "nothing new"
        how = "Stopped propagating" if result.cancelled else "Propagated"
        self._status.value = (
            f"{how} {what} ({name}) over {span} into {target.name!r}; one undo step.\n"
            + describe_stops(result)
        )
