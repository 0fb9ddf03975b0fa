"""A replaced model is freed on a background thread (``_napari/retire.py``), not on the GUI thread
(freeing an OpenVINO model took 60–110 ms there: the longest stall of a model switch)."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest

from napari_mobilesam._napari import retire


class Tracer:
    """Records which thread ran its ``__del__`` (the thread that freed what holds it)."""

    def __init__(self, freed: list):
        self.freed = freed

    def __del__(self):
        self.freed.append(threading.current_thread().name)


def test_a_retired_object_is_freed_on_the_background_thread():
    freed: list = []
    obj = Tracer(freed)
    gone = retire.retire(obj, "tracer")
    del obj
    assert gone.wait(10)
    assert freed == ["mobilesam-retire"]
    assert not gone.busy()


def test_the_thread_waits_for_the_other_holders_then_frees_it_itself():
    freed: list = []
    obj = Tracer(freed)
    holder = {"obj": obj}  # e.g. a prefetch thread finishing a slice with the replaced model
    gone = retire.retire(obj, "tracer")
    del obj
    assert not gone.wait(0.3) and gone.busy() and freed == []  # still held elsewhere: waits
    del holder["obj"]
    assert gone.wait(10)
    assert freed == ["mobilesam-retire"]  # the last reference was the thread's


def test_after_max_wait_the_last_holder_frees_it(monkeypatch):
    monkeypatch.setattr(retire, "MAX_WAIT_S", 0.1)
    freed: list = []
    obj = Tracer(freed)
    keep = [obj]
    gone = retire.retire(obj, "tracer")
    del obj
    assert gone.wait(10) and freed == []  # the thread let go; the object lives on
    keep.clear()
    assert freed == [threading.current_thread().name]


@pytest.mark.gui
def test_set_model_frees_the_replaced_model_off_the_gui_thread(make_napari_viewer, qtbot):
    """Through the widget: the replaced model (and so its encoder, which the real model's
    OpenVINO parts hang on) is freed by the retire thread, not by the GUI thread."""
    from napari_mobilesam._napari import segment_widget as sw
    from napari_mobilesam.models.choice import ModelChoice
    from napari_mobilesam.models.registry import build_sam

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((4, 64, 64), np.float32), name="img")
    widget = sw.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment (MobileSAM)")
    freed: list = []
    first = build_sam("vit_t_test", seed=0)
    first.image_encoder.__dict__["tracer"] = Tracer(freed)
    widget.set_model(first, ModelChoice("vit_t_test"))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    ref = weakref.ref(first)
    del first
    widget.set_model(build_sam("vit_t_test", seed=1), ModelChoice("vit_t_test"))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    qtbot.waitUntil(lambda: ref() is None, timeout=20_000)
    # the model's weak reference dies as its deallocation starts; the encoder (and the tracer)
    # go later in that same deallocation, which a GIL switch can interrupt: wait for it
    qtbot.waitUntil(lambda: bool(freed), timeout=20_000)
    assert freed == ["mobilesam-retire"]
    widget.close_widget()
