"""The preview's prompt → mask decoding, in one background thread, newest request first.

The GUI thread never runs the model: :class:`PreviewDecoder` takes a :class:`DecodeRequest` (the
slice's prompt, read from the layers on the GUI thread) and answers it in its own thread. While one
request is being decoded, a newer one replaces the one waiting (latest wins: a burst of clicks
costs at most two decoder calls). Answers come back on the GUI thread through a queued Qt signal;
the caller drops the ones whose generation is no longer the newest (another prompt set, another
slice, another image or session since).

Everything the GUI would otherwise do with the mask (the ``uint32`` preview labels, the pixel
count) is computed here too, so applying an answer is one layer update.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Signal

__all__ = ["DecodeRequest", "DecodeAnswer", "PreviewDecoder"]

log = logging.getLogger(__name__)


@dataclass
class DecodeRequest:
    """One prompt → mask request of the preview.

    Attributes
    ----------
    gen : int
        The annotator's preview generation when it was asked (answers of older ones are dropped).
    session : Session
        The engine session (its predictor: ``Session.predict(..., embedded_only=True)``).
    image : napari Image layer
        The image it is for.
    z : int
        The slice.
    prompt : Prompt
        Points ``(N, 2)`` (row, col), labels ``(N,)``, box ``(row0, col0, row1, col1)`` or None.
    mask_input : (256, 256) float32 or None
        The mask prompt (the refined label's current mask as low-res logits).
    key : tuple
        The prompt's name for the tiles it runs into (``embedder.prompt_key``).
    """

    gen: int
    session: Any
    image: Any
    z: int
    prompt: Any
    mask_input: Any
    key: tuple

    def compute(self) -> DecodeAnswer:
        """Decode it (background thread): the prediction and its preview labels."""
        p = self.prompt
        pred = self.session.predict(self.z, p.points, p.labels, p.box, self.mask_input, embedded_only=True)
        mask = np.asarray(pred.mask)
        return DecodeAnswer(self, pred, mask.astype(np.uint32), int(np.count_nonzero(mask)))


@dataclass
class DecodeAnswer:
    """What came back: the request, the ``ObjectPrediction``, its ``(H, W)`` uint32 labels and
    the object's pixel count; or ``error`` (then the rest is None)."""

    request: DecodeRequest
    prediction: Any = None
    labels: np.ndarray | None = None
    n_pixels: int = 0
    error: BaseException | None = None


class _Relay(QObject):
    """Carries answers from the decoding thread to the GUI thread (queued signal)."""

    answered = Signal(object)


class PreviewDecoder:
    """One daemon thread decoding the newest preview request; ``on_answer(DecodeAnswer)`` is
    called on the GUI thread for each request decoded (the caller checks its generation).

    Parameters
    ----------
    on_answer : callable(DecodeAnswer)
        Called on the GUI thread (not after :meth:`close`).
    """

    def __init__(self, on_answer: Callable[[DecodeAnswer], None]):
        self._on_answer = on_answer
        self._relay = _Relay()
        self._relay.answered.connect(self._deliver)
        self._cond = threading.Condition()
        self._pending: DecodeRequest | None = None
        self._running: DecodeRequest | None = None
        self._thread: threading.Thread | None = None
        self.closed = False
        self.calls = 0  # requests decoded (the rest were replaced by newer ones while waiting)

    @property
    def busy(self) -> bool:
        """True while a request waits or is being decoded (or its answer is on its way)."""
        with self._cond:
            return self._pending is not None or self._running is not None

    def submit(self, request: DecodeRequest) -> None:
        """Decode ``request`` next, replacing a request still waiting (GUI thread)."""
        if self.closed:
            return
        with self._cond:
            self._pending = request
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mobilesam-preview-decoder", daemon=True)
            self._thread.start()

    def discard_pending(self) -> None:
        """Forget the request waiting (one being decoded still answers; the caller drops it)."""
        with self._cond:
            self._pending = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self.closed:
                    self._cond.wait()
                if self.closed:
                    return
                request, self._pending = self._pending, None
                self._running = request
            try:
                answer = request.compute()
            except Exception as exc:  # noqa: BLE001 - reported on the GUI thread
                answer = DecodeAnswer(request, error=exc)
            self.calls += 1
            try:
                self._relay.answered.emit(answer)
            except RuntimeError:  # the relay was deleted: the widget is gone
                log.debug("napari-mobilesam: preview answer after the widget closed", exc_info=True)
                return
            # waiting for the next request must not keep this one's session (and model) alive
            del request, answer

    def _deliver(self, answer: DecodeAnswer) -> None:
        with self._cond:
            if self._running is answer.request:
                self._running = None
        if not self.closed:
            self._on_answer(answer)

    def close(self) -> None:
        """Stop the thread after the current request; no answer is delivered afterwards."""
        with self._cond:
            self.closed = True
            self._pending = None
            self._cond.notify()
