"""Dock panel: fine-tune MobileSAM on the open images by decoupled distillation.

The panel collects the settings (teacher checkpoint, image layers or a folder of TIFFs, epochs,
learning rate, batch size, device, output file), refuses invalid ones with a message before
anything runs, then runs :func:`napari_mobilesam.distillation.run.iter_distill` in a napari thread worker.
Its events drive a progress bar, a status line and a live plot of the training loss (per step) and
the validation embedding MSE (per epoch). Cancel stops after the current step and keeps a training
state; running again with the same settings resumes from it.

When the run ends the new model is offered to the segmentation widget: the panel writes
``model="distilled", checkpoint=<output>`` to the segmentation widget's saved settings
(:mod:`napari_mobilesam._napari.settings`, read when a segmentation widget opens), calls
``use_model("distilled", <output>)`` on an open segmentation widget that provides it, and emits
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
from psygnal import Signal
from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from ..models.devices import device_choices

__all__ = ["DistillWidget", "LossPlot"]

log = logging.getLogger(__name__)

_STUDENTS = {"vit_t": "MobileSAM (current default weights)", "checkpoint": "MobileSAM checkpoint file"}
_DEV_STUDENTS = {"vit_t_test": "vit_t_test (tiny, random: development)"}


class LossPlot(QWidget):
    """A small QPainter line plot: training loss per step and validation MSE per epoch.

    ``train``: list of (step, loss); ``val``: list of (step, mse) where step is the global step at
    which that validation ran (0 = before training). The y axis is logarithmic when the values
    span more than a factor of 20.
    """

    TRAIN = QColor(70, 130, 220)
    VAL = QColor(240, 150, 40)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.train: list[tuple[float, float]] = []
        self.val: list[tuple[float, float]] = []
        self.total_steps = 0
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def clear(self) -> None:
        self.train, self.val, self.total_steps = [], [], 0
        self.update()

    def add_train(self, step: float, loss: float) -> None:
        if math.isfinite(loss):
            self.train.append((step, loss))
            self.update()

    def add_val(self, step: float, mse: float) -> None:
        if math.isfinite(mse):
            self.val.append((step, mse))
            self.update()

    def _scale(self):
        ys = [y for _, y in self.train + self.val if y > 0]
        if not ys:
            return None
        lo, hi = min(ys), max(ys)
        log = hi / lo > 20
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        xmax = max([self.total_steps, 1] + [x for x, _ in self.train + self.val])
        return lo, hi, log, xmax

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        left, right, top, bottom = 46, 8, 8, 20
        p.fillRect(self.rect(), self.palette().base())
        p.setPen(QPen(self.palette().text().color(), 1))
        p.drawRect(left, top, w - left - right, h - top - bottom)
        scale = self._scale()
        if scale is None:
            p.drawText(left + 6, top + 16, "loss appears here while training runs")
            p.end()
            return
        lo, hi, log, xmax = scale

        def pt(x: float, y: float) -> QPointF:
            yv = math.log10(y) if log else y
            px = left + (w - left - right) * (x / xmax)
            py = top + (h - top - bottom) * (1 - (yv - lo) / (hi - lo))
            return QPointF(px, py)

        fmt = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3g}")
        p.drawText(2, top + 10, fmt(hi))
        p.drawText(2, h - bottom, fmt(lo))
        p.drawText(left, h - 4, f"step 0 … {int(xmax)}")
        for series, color in ((self.train, self.TRAIN), (self.val, self.VAL)):
            p.setPen(QPen(color, 2))
            pts = [pt(x, y) for x, y in series if y > 0]
            for a, b in zip(pts, pts[1:]):
                p.drawLine(a, b)
            for q in pts if series is self.val else pts[-1:]:
                p.drawEllipse(q, 3, 3)
        p.setPen(QPen(self.TRAIN, 2))
        p.drawText(w - right - 150, top + 14, "training loss")
        p.setPen(QPen(self.VAL, 2))
        p.drawText(w - right - 150, top + 28, "validation MSE")
        p.end()



class DistillWidget(Container):
    """The distillation dock panel (see the module docstring).

    Public API used by scripts and tests: :meth:`config` (the settings as a ``DistillConfig``, or
    a ``DistillError`` naming what is wrong), :meth:`run`, :meth:`cancel`, :attr:`busy` (a run
    has started and its end is not handled yet), :attr:`worker` (the napari worker of the last
    run), :attr:`result` (the last ``DistillResult``), :attr:`model_ready`
    (emitted with the output path when a model was written), :meth:`enable_dev_models`.
    """

    model_ready = Signal(str)

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        from ..distillation.run import DistillConfig
        from .settings import dev_mode

        self._viewer = viewer
        self._students = dict(_STUDENTS, **(_DEV_STUDENTS if dev_mode() else {}))
        d = DistillConfig(teacher=None, images=None, output="")
        self.worker = None
        self.result = None
        self._busy = False
        self._cancel_event = threading.Event()
        self._steps_per_epoch = 0

        self._teacher = FileEdit(label="teacher", mode="r", filter="*.pth *.pt")
        self._teacher.tooltip = "SAM ViT-B/L/H checkpoint (e.g. sam_vit_b_01ec64.pth) or a MobileSAM-format file"
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
        self._use_btn = PushButton(text="Use the new model for segmentation", enabled=False)
        self.extend([
            self._teacher, self._data_from, self._layers, self._folder, self._student,
            self._student_ckpt, self._epochs, self._lr, self._batch, self._val_fraction,
            self._mask_loss, self._device, self._output, self._overwrite,
            Container(widgets=[self._run_btn, self._cancel_btn], layout="horizontal", labels=False),
            self._progress, self._status,
        ])
        self.plot = LossPlot()
        self.native.layout().addWidget(self.plot)
        self.append(self._use_btn)
        self._status.native.setWordWrap(True)

        self._data_from.changed.connect(self._on_data_from)
        self._student.changed.connect(self._on_student)
        self._run_btn.changed.connect(lambda: self.run())
        self._cancel_btn.changed.connect(lambda: self.cancel())
        self._use_btn.changed.connect(lambda: self.offer_model())
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._refresh_layers)

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

    def config(self):
        """The panel's settings as a ``DistillConfig``; raises ``DistillError`` naming the problem.

        Checks what can be checked without reading big files: the teacher and output paths, at
        least one image, numbers in range. The teacher's content is checked at the start of the run,
        before any computation.
        """
        from ..core.source import SliceSource
        from ..distillation.data import DistillError
        from ..distillation.run import DistillConfig, _check_config

        teacher = Path(str(self._teacher.value))
        if str(self._teacher.value) in ("", ".") or not teacher.is_file():
            raise DistillError("choose the teacher checkpoint file (a SAM ViT-B/L/H .pth)")
        if self._data_from.value == "layers":
            layers = list(self._layers.value)
            if not layers:
                raise DistillError("choose at least one image layer to train on (or use a folder)")
            images = []
            for layer in layers:
                if layer.multiscale:
                    raise DistillError(f"layer {layer.name!r} is multiscale: use a single-scale image")
                images.append(SliceSource(layer.data, rgb=layer.rgb))
        else:
            folder = Path(str(self._folder.value))
            if str(self._folder.value) in ("", ".") or not folder.is_dir():
                raise DistillError("choose a folder of TIFF images to train on")
            images = [folder]
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
        _check_config(cfg)
        return cfg

    # ---- running

    @property
    def busy(self) -> bool:
        """True from :meth:`run` until the worker's end has been handled on the GUI thread."""
        return self._busy

    def run(self):
        """Check the settings and start the run in a worker; returns the worker (None if refused)."""
        from napari.qt.threading import create_worker

        from ..distillation.data import DistillError
        from ..distillation.run import iter_distill

        if self._busy:
            return self.worker
        try:
            cfg = self.config()
        except DistillError as exc:
            self._status.value = f"Not started: {exc}"
            return None
        self._cancel_event.clear()
        self.result = None
        self.plot.clear()
        self._progress.max, self._progress.value = 1, 0
        self._use_btn.enabled = False
        self._status.value = "starting…"

        def work():
            return (yield from iter_distill(cfg, cancel=self._cancel_event.is_set))

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)  # shown in the panel
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._busy = True
        self._run_btn.enabled, self._cancel_btn.enabled = False, True
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop after the current step; a training state is kept, so running again resumes."""
        if self._busy:
            self._cancel_event.set()
            self._status.value = "cancelling after the current step…"

    def _on_event(self, ev) -> None:
        if ev.kind == "info":
            self._status.value = ev.message
        elif ev.kind == "cache":
            self._progress.max, self._progress.value = max(ev.total, 1), ev.step
            self._status.value = f"teacher embeddings {ev.step}/{ev.total}"
        elif ev.kind == "step":
            self._progress.max, self._progress.value = max(ev.total, 1), ev.step
            self.plot.total_steps = ev.total
            self._steps_per_epoch = ev.total // max(int(self._epochs.value), 1)
            self.plot.add_train(ev.step, ev.values["loss"])
            self._status.value = f"epoch {ev.epoch + 1}, step {ev.step}/{ev.total}: loss {ev.values['loss']:.4g}"
        elif ev.kind == "val":
            self.plot.add_val(ev.epoch * self._steps_per_epoch, ev.values["mse"])
            when = "before training" if ev.epoch == 0 else f"after epoch {ev.epoch}"
            self._status.value = (f"validation {when}: embedding MSE {ev.values['mse']:.4g}, "
                                  f"mask mIoU {ev.values['miou']:.3f}")

    def _on_done(self, result) -> None:
        self.result = result
        if result is None:
            return
        if result.cancelled:
            self._status.value = "Cancelled. The progress is kept: press Distil again to resume."
            return
        b, a = result.before, result.after
        self._status.value = (f"Done: {result.output}. Teacher-vs-student mask mIoU {b['miou']:.3f} before, "
                              f"{a['miou']:.3f} after.")
        self._use_btn.enabled = True
        self.offer_model()

    def _on_error(self, exc: BaseException) -> None:
        from ..distillation.data import DistillError

        if not isinstance(exc, DistillError):  # not a settings problem: keep the traceback
            log.error("distillation failed", exc_info=exc)
        self._status.value = f"Failed: {exc}"

    def _on_finished(self) -> None:
        self._run_btn.enabled, self._cancel_btn.enabled = True, False
        self._busy = False

    # ---- handing the model over

    def offer_model(self) -> str | None:
        """Make the last output the segmentation widget's model; returns its path (None: no output).

        Writes ``model="distilled", checkpoint=<path>`` to the segmentation widget's saved
        settings, tells an open segmentation widget that has ``use_model(model, checkpoint)``,
        and emits :attr:`model_ready`.
        """
        from .settings import load_settings, save_settings

        if self.result is None or self.result.output is None:
            return None
        path = str(self.result.output)
        settings = load_settings()
        settings.model, settings.checkpoint = "distilled", path
        save_settings(settings)
        for widget in self._segment_widgets():
            use = getattr(widget, "use_model", None)
            if callable(use):
                use("distilled", path)
        self.model_ready.emit(path)
        return path

    def _segment_widgets(self) -> list:
        try:
            from .segment_widget import SegmentWidget
        except ImportError:  # pragma: no cover
            return []
        window = getattr(self._viewer, "window", None)
        docks = getattr(window, "dock_widgets", None) or getattr(window, "_dock_widgets", {}) or {}
        found = []
        for dock in list(docks.values()):
            inner = dock.widget() if hasattr(dock, "widget") else dock
            for obj in (dock, inner, getattr(inner, "_magic_widget", None)):
                if isinstance(obj, SegmentWidget):
                    found.append(obj)
        return found
