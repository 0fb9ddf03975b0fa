"""The distillation panel's live plot: training loss per step and validation MSE per epoch (QPainter)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["LossPlot"]


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
