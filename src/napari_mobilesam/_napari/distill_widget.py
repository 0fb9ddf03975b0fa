"""Dock panel: fine-tune MobileSAM on the open images by decoupled distillation.

The panel collects the settings (teacher checkpoint, image layers or a folder of TIFFs, epochs,
learning rate, batch size, device, output file), refuses invalid ones with a message before
anything runs, then runs :func:`napari_mobilesam.distillation.run.iter_distill` through
:func:`napari_mobilesam._napari.workers.start_task` (the same background tasks as the Segment panel:
a progress bar in napari's activity dock, cancellable there too). Its events drive the panel's
progress bar, a status line and a live plot of the training loss (per step) and the validation
embedding MSE (per epoch). Cancel stops after the current step and keeps a training state; running
again with the same settings resumes from it. Errors are napari notifications, like the Segment
panel's, and stay in the status line.

When the run ends nothing switches by itself: the panel reports the validation before and after
(and says clearly when it got worse) and enables *Use this model for segmentation*. That button
(:meth:`DistillWidget.offer_model`) writes ``model="distilled", checkpoint=<output>`` to the
segmentation widget's saved settings (:mod:`napari_mobilesam._napari.settings`), calls
``use_model("distilled", <output>)`` on an open segmentation widget, and emits
:attr:`DistillWidget.model_ready` with the path.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import napari
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    RadioButtons,
    Select,
    SpinBox,
)
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal
from qtpy.QtCore import QObject
from qtpy.QtCore import Signal as QtSignal

from ..models.devices import device_choices
from . import gc_freeze, gil_share
from .controls import DockContainer, wrapping
from .distill_plot import LossPlot
from .workers import Task, start_task

__all__ = ["DistillWidget", "LossPlot"]

log = logging.getLogger(__name__)

_STUDENTS = {"vit_t": "MobileSAM (current default weights)", "checkpoint": "MobileSAM checkpoint file"}
_DEV_STUDENTS = {"vit_t_test": "vit_t_test (tiny, random: development)"}

#: One tooltip per control, by attribute name (every control has one; a test checks it).
TOOLTIPS = {
    "_teacher": "The bigger model to learn from: a SAM ViT-B/L/H checkpoint (e.g. sam_vit_b_01ec64.pth) "
                "or a MobileSAM-format .pt file",
    "_data_from": "Train on open image layers, or on every TIFF/PNG/JPEG file of a folder",
    "_layers": "Image layers to train on (2D images or z-stacks); select several with Ctrl/Shift-click",
    "_folder": "Folder whose image files (.tif, .tiff, .png, .jpg) are used for training (not recursive)",
    "_student": "The MobileSAM weights training starts from: the default weights or a checkpoint file",
    "_student_ckpt": "MobileSAM-format checkpoint to start from (e.g. an earlier distilled model)",
    "_epochs": "Passes over the training slices; more epochs fit your images more closely",
    "_lr": "Peak learning rate of AdamW (e.g. 1e-4); lower it if the loss jumps or the run diverges",
    "_batch": "Slices per training step; larger needs more memory",
    "_val_fraction": "Share of the slices held out to check the result (mask mIoU against the teacher); "
                     "0 skips the check",
    "_mask_loss": "Weight of the mask term through the frozen decoder (0: match the teacher's embeddings only)",
    "_device": "Where training runs: auto picks a GPU when there is one",
    "_output": "File the distilled model is written to (.pt); its settings and figures go beside it as .pt.json",
    "_overwrite": "Replace the output file if it exists (otherwise an existing file is refused)",
    "_run_btn": "Start (or resume, with the same settings) the distillation in the background",
    "_cancel_btn": "Stop after the current step; the progress is kept and Distil resumes it",
    "_progress": "Teacher embeddings, then training steps (also shown in napari's activity dock)",
    "_use_btn": "Switch the Segment panel to the distilled model (it is never switched without asking)",
}


USE_TEXT = "Use this model for segmentation"
USE_ANYWAY_TEXT = "Use this model anyway (validation got worse)"
CANCELLED_TEXT = "Cancelled. The progress is kept: press Distil again to resume."


class _EventRelay(QObject):
    """Carries :class:`DistillEvent` objects from the worker thread to the GUI thread (queued)."""

    event = QtSignal(object)


def _validation_got_worse(before: dict, after: dict) -> bool | None:
    """True when the held-out mask mIoU fell (same mIoU: when the embedding MSE rose); None without validation."""
    b, a = before.get("miou"), after.get("miou")
    if b is None or a is None or not (math.isfinite(b) and math.isfinite(a)):
        return None
    if abs(a - b) > 1e-6:
        return a < b
    return after.get("mse", 0.0) > before.get("mse", 0.0)  # same masks: judge by the embeddings


class DistillWidget(DockContainer):
    """The distillation dock panel (see the module docstring).

    Public API used by scripts and tests: :meth:`config` (the settings as a ``DistillConfig``, or
    a ``DistillError`` naming what is wrong), :meth:`run`, :meth:`cancel`, :attr:`busy` (a run
    has started and its end is not handled yet), :attr:`task` / :attr:`worker` (the background
    task of the last run and its napari worker), :attr:`result` (the last ``DistillResult``),
    :meth:`offer_model` (the *Use this model* button), :attr:`model_ready` (emitted with the output
    path when the user chose the new model), :meth:`enable_dev_models`.
    """

    model_ready = Signal(str)

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        from .settings import dev_mode

        self._viewer = viewer
        self._students = dict(_STUDENTS, **(_DEV_STUDENTS if dev_mode() else {}))
        self.task: Task | None = None
        self.worker = None
        self.result = None
        self._busy = False
        self._cancel_event = threading.Event()
        self._steps_per_epoch = 0
        self._relay: _EventRelay | None = None
        self._make_controls()
        self._layout_controls()
        for name, text in TOOLTIPS.items():
            getattr(self, name).tooltip = text

        self._data_from.changed.connect(self._on_data_from)
        self._student.changed.connect(self._on_student)
        self._run_btn.changed.connect(lambda: self.run())
        self._cancel_btn.changed.connect(lambda: self.cancel())
        self._use_btn.changed.connect(lambda: self.offer_model())
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._refresh_layers)

    def _make_controls(self) -> None:
        from ..distillation.config import DistillConfig

        d = DistillConfig(teacher=None, images=None, output="")
        self._teacher = FileEdit(label="teacher", mode="r", filter="*.pth *.pt")
        self._data_from = RadioButtons(label="images from", choices=["layers", "folder"], value="layers",
                                       orientation="horizontal")
        self._layers = Select(label="image layers", choices=self._image_layer_choices)
        self._folder = FileEdit(label="folder", mode="d", visible=False)
        self._student = ComboBox(label="student", choices=self._student_choices)
        self._student_ckpt = FileEdit(label="student file", mode="r", filter="*.pt *.pth", visible=False)
        self._epochs = SpinBox(label="epochs", min=1, max=1000, value=d.epochs)
        self._lr = LineEdit(label="learning rate", value=f"{d.lr:g}")
        self._batch = SpinBox(label="batch size", min=1, max=256, value=d.batch_size)
        self._val_fraction = FloatSpinBox(label="held-out share", min=0.0, max=0.9, step=0.05,
                                          value=d.val_fraction)
        self._mask_loss = FloatSpinBox(label="mask-loss weight", min=0.0, max=100.0, step=0.1,
                                       value=d.mask_loss_weight)
        self._device = ComboBox(label="device", choices=device_choices(), value="auto")
        self._output = FileEdit(label="output", mode="w", filter="*.pt")
        self._overwrite = CheckBox(text="overwrite an existing output file", value=False)
        self._run_btn = PushButton(text="Distil")
        self._cancel_btn = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self._status = Label(value="")
        self._use_btn = PushButton(text=USE_TEXT, enabled=False)

    def _layout_controls(self) -> None:
        self.extend([
            self._teacher, self._data_from, self._layers, self._folder, self._student,
            self._student_ckpt, self._epochs, self._lr, self._batch, self._val_fraction,
            self._mask_loss, self._device, self._output, self._overwrite,
            Container(widgets=[self._run_btn, self._cancel_btn], layout="horizontal", labels=False),
            self._progress, self._status,
        ])
        self.plot = LossPlot()
        self.inner.layout().addWidget(self.plot)
        self.append(self._use_btn)
        self.end_layout()
        wrapping(self._status)  # a long report wraps instead of widening the dock

    # ---- choices

    def _image_layer_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _student_choices(self, _widget=None) -> list[tuple[str, str]]:
        return [(label, key) for key, label in self._students.items()]

    def _refresh_layers(self, event=None) -> None:
        self._layers.reset_choices()

    def _on_data_from(self, value=None) -> None:
        layers = self._data_from.value == "layers"
        self._layers.visible, self._folder.visible = layers, not layers

    def _on_student(self, value=None) -> None:
        self._student_ckpt.visible = self._student.value == "checkpoint"

    def enable_dev_models(self) -> None:
        """Offer the tiny random ``vit_t_test`` student (also shown when NAPARI_MOBILESAM_DEV=1)."""
        self._students.update(_DEV_STUDENTS)
        self._student.reset_choices()

    # ---- settings

    def _images(self) -> list:
        """What to train on: SliceSources of the chosen layers, or the chosen folder."""
        from ..core.source import SliceSource
        from ..errors import DistillError

        if self._data_from.value == "layers":
            layers = list(self._layers.value)
            if not layers:
                raise DistillError("choose at least one image layer to train on (or use a folder)")
            images = []
            for layer in layers:
                if layer.multiscale:
                    raise DistillError(f"layer {layer.name!r} is multiscale: use a single-scale image")
                images.append(SliceSource(layer.data, rgb=layer.rgb))
            return images
        folder = Path(str(self._folder.value))
        if str(self._folder.value) in ("", ".") or not folder.is_dir():
            raise DistillError("choose a folder of TIFF images to train on")
        return [folder]

    def config(self):
        """The panel's settings as a ``DistillConfig``; raises ``DistillError`` naming the problem.

        Checks what can be checked without reading big files: the teacher and output paths, at
        least one image, numbers in range. The teacher's content is checked at the start of the run,
        before any computation.
        """
        from ..distillation.config import DistillConfig, check_config
        from ..errors import DistillError

        teacher = Path(str(self._teacher.value))
        if str(self._teacher.value) in ("", ".") or not teacher.is_file():
            raise DistillError("choose the teacher checkpoint file (a SAM ViT-B/L/H .pth)")
        images = self._images()
        try:
            lr = float(self._lr.value)
        except ValueError:
            raise DistillError(f"learning rate {self._lr.value!r} is not a number (e.g. 1e-4)") from None
        output = str(self._output.value)
        if output in ("", "."):
            raise DistillError("choose the output file for the distilled model (.pt)")
        student_ckpt = None
        student_model = self._student.value
        if student_model == "checkpoint":
            student_model = "vit_t"
            student_ckpt = Path(str(self._student_ckpt.value))
            if not student_ckpt.is_file():
                raise DistillError("choose the student checkpoint file, or start from the default weights")
        cfg = DistillConfig(
            teacher=teacher, images=images, output=Path(output), student_model=student_model,
            student_checkpoint=student_ckpt, epochs=int(self._epochs.value), lr=lr,
            batch_size=int(self._batch.value), val_fraction=float(self._val_fraction.value),
            mask_loss_weight=float(self._mask_loss.value), device=self._device.value,
            overwrite=bool(self._overwrite.value),
        )
        check_config(cfg)
        return cfg

    # ---- running

    @property
    def busy(self) -> bool:
        """True from :meth:`run` until the task's end has been handled on the GUI thread."""
        return self._busy

    def run(self):
        """Check the settings and start the run as a background task; returns its napari worker
        (None when the settings were refused: the reason is a notification and in the status line)."""
        from ..errors import DistillError

        if self._busy:
            return self.worker
        try:
            cfg = self.config()
        except DistillError as exc:
            self._error(f"Not started: {exc}")
            return None
        self._cancel_event.clear()
        self.result = None
        self.plot.clear()
        self._progress.max, self._progress.value = 1, 0
        self._use_btn.enabled, self._use_btn.text = False, USE_TEXT
        self._status.value = "starting…"
        self._relay = _EventRelay()
        self._relay.event.connect(self._on_event)  # looked up now: tests may replace _on_event
        self._busy = True
        self._run_btn.enabled, self._cancel_btn.enabled = False, True
        gc_freeze.hold(self)  # full collections in the run skip what exists now (see gc_freeze)
        gil_share.hold(self)  # the GUI gets the GIL back sooner from the run's thread
        self.task = start_task(
            self._work(cfg, self._relay), description="MobileSAM: distillation",
            on_result=self._on_done, on_error=self._on_error, on_finished=self._on_finished,
        )
        self.worker = self.task.worker
        return self.worker

    def _work(self, cfg, relay: _EventRelay):
        """The task body (worker thread): runs the distillation and relays every event."""
        from ..distillation import run as distill_run

        def work(report, cancelled):
            gen = distill_run.iter_distill(cfg, cancel=lambda: self._cancel_event.is_set() or cancelled())
            try:
                while True:
                    try:
                        ev = next(gen)
                    except StopIteration as stop:
                        return stop.value
                    if ev.kind in ("cache", "step"):
                        report(ev.step, max(ev.total, 1))
                    relay.event.emit(ev)
            finally:
                gen.close()  # an unexpected exit still saves the training state

        return work

    def cancel(self) -> None:
        """Stop after the current step; a training state is kept, so running again resumes."""
        if self._busy:
            self._cancel_event.set()
            if self.task is not None:
                self.task.stop()
            self._status.value = "cancelling after the current step…"

    def _on_event(self, ev) -> None:
        if ev.kind == "info":
            self._status.value = ev.message
            if "damaged" in ev.message:
                show_warning(ev.message)
        elif ev.kind == "cache":
            self._set_progress(ev.step, ev.total)
            self._status.value = f"teacher embeddings {ev.step}/{ev.total}"
        elif ev.kind == "step":
            self._set_progress(ev.step, ev.total)
            self.plot.total_steps = ev.total
            self._steps_per_epoch = ev.total // max(int(self._epochs.value), 1)
            self.plot.add_train(ev.step, ev.values["loss"])
            self._status.value = f"epoch {ev.epoch + 1}, step {ev.step}/{ev.total}: loss {ev.values['loss']:.4g}"
        elif ev.kind == "val":
            self.plot.add_val(ev.epoch * self._steps_per_epoch, ev.values["mse"])
            when = "before training" if ev.epoch == 0 else f"after epoch {ev.epoch}"
            self._status.value = (f"validation {when}: embedding MSE {ev.values['mse']:.4g}, "
                                  f"mask mIoU {ev.values['miou']:.3f}")

    def _set_progress(self, step: int, total: int) -> None:
        """Move the progress bar; its maximum only when it changes (setting it relays the bar out
        and repaints the panel, on the GUI thread)."""
        total = max(int(total), 1)
        if self._progress.max != total:
            self._progress.max = total
        if self._progress.value != step:
            self._progress.value = step

    def _on_done(self, result) -> None:
        self.result = result
        if result is None:
            return
        if result.cancelled:
            self._status.value = CANCELLED_TEXT
            return
        b, a = result.before, result.after
        figures = (f"teacher-vs-student mask mIoU {b['miou']:.3f} before, {a['miou']:.3f} after; "
                   f"embedding MSE {b['mse']:.4g} → {a['mse']:.4g}")
        worse = _validation_got_worse(b, a)
        self._use_btn.text = USE_ANYWAY_TEXT if worse else USE_TEXT
        if worse:
            message = (f"Done: {result.output}, but validation got WORSE: {figures}. "
                       "The current model is probably better for these images: keep it, or try a lower "
                       "learning rate, more epochs or more images.")
            show_warning(message)
        else:
            note = "no held-out slices, so no check" if worse is None else "validation improved"
            message = (f"Done: {result.output} ({note}: {figures}). Press '{USE_TEXT}' to segment with it.")
            show_info(message)
        self._status.value = message
        self._use_btn.enabled = True

    def _on_error(self, exc: BaseException) -> None:
        from ..errors import DistillError

        if not isinstance(exc, DistillError):  # not a settings problem: keep the traceback
            log.error("distillation failed", exc_info=exc)
        self._error(f"Distillation failed: {exc}")

    def _on_finished(self) -> None:
        if self.result is None and self.task is not None and self.task.cancelled:
            self._status.value = CANCELLED_TEXT  # cancelled from the activity dock
        self._run_btn.enabled, self._cancel_btn.enabled = True, False
        self._busy = False
        gc_freeze.release(self)
        gil_share.release(self)

    def _error(self, message: str) -> None:
        """Show an error as a napari notification and in the status line, as the Segment panel does."""
        self._status.value = message
        show_error(message)

    # ---- handing the model over

    def offer_model(self) -> str | None:
        """Make the last output the segmentation widget's model; returns its path (None: no output).

        What the *Use this model for segmentation* button does (never called by the run itself):
        writes ``model="distilled", checkpoint=<path>`` to the segmentation widget's saved
        settings, tells every open segmentation widget (``use_model``), and emits :attr:`model_ready`.
        """
        from .settings import load_settings, save_settings

        if self.result is None or self.result.output is None:
            return None
        path = str(self.result.output)
        settings = load_settings()
        settings.model, settings.checkpoint = "distilled", path
        save_settings(settings)
        for widget in self._segment_widgets():
            widget.use_model("distilled", path)
        self.model_ready.emit(path)
        self._status.value = f"The Segment panel now uses {path}."
        return path

    def _segment_widgets(self) -> list:
        """Open Segment panels of this viewer (napari's public ``Window.dock_widgets``)."""
        from .segment_widget import SegmentWidget

        window = getattr(self._viewer, "window", None)
        docks = getattr(window, "dock_widgets", None) or {}
        return [w for w in list(docks.values()) if isinstance(w, SegmentWidget)]
