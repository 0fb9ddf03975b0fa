"""The widgets' bounded gc.freeze (``_napari/gc_freeze.py``): what is released is still freed, and
closing the widget leaves the process's garbage collector as it found it."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

# imported at collection time, before any viewer: also loads triton safely (see _preload.py)
from napari_mobilesam._napari import gc_freeze
from napari_mobilesam._napari import segment_widget as sw
from napari_mobilesam.models.choice import ModelChoice

pytestmark = [pytest.mark.gui, pytest.mark.gc_unfrozen]  # the process unfrozen: these test the freeze


def _widget_with_model(make_napari_viewer, qtbot, sam):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((4, 64, 64), np.float32), name="img")
    widget = sw.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment (MobileSAM)")
    widget.set_model(sam, ModelChoice("vit_t_test"))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    return viewer, widget


def _new_sam(seed):
    from napari_mobilesam.models.registry import build_sam

    return build_sam("vit_t_test", seed=seed)


def test_a_layer_removed_after_the_freeze_has_its_data_freed(make_napari_viewer, qtbot):
    before = gc.get_freeze_count()
    viewer, widget = _widget_with_model(make_napari_viewer, qtbot, _new_sam(0))
    assert gc_freeze.held() and gc.get_freeze_count() > before
    layer = viewer.add_labels(np.zeros((4, 64, 64), np.int32), name="big")
    gc_freeze.freeze()  # the layer is frozen now, as after a later model load
    data = weakref.ref(layer.data)
    holder = weakref.ref(layer)
    viewer.layers.remove(layer)
    del layer
    done = gc_freeze.collections_done()
    qtbot.waitUntil(lambda: holder() is None and data() is None, timeout=10_000)
    assert gc_freeze.collections_done() == done + 1  # it took the unfreeze-collect-freeze round
    assert gc.get_freeze_count() > 0  # and everything else is frozen again
    widget.close_widget()


def test_frozen_cyclic_garbage_is_kept_without_the_round(make_napari_viewer, qtbot):
    """What the round is for: a removed layer is cyclic garbage that gc.collect() leaves alone
    while it is frozen (the control for the test above)."""
    viewer, widget = _widget_with_model(make_napari_viewer, qtbot, _new_sam(0))
    layer = viewer.add_labels(np.zeros((4, 64, 64), np.int32), name="big")
    gc_freeze.freeze()
    holder = weakref.ref(layer)
    widget.close_widget()  # no more rounds (and the freeze is undone) ...
    gc.freeze()  # ... so freeze by hand, as a holder would
    try:
        viewer.layers.remove(layer)
        del layer
        gc.collect()
        assert holder() is not None
        gc.unfreeze()
        gc.collect()
        assert holder() is None
    finally:
        gc.unfreeze()


def test_a_replaced_model_and_its_session_are_freed(make_napari_viewer, qtbot):
    _viewer, widget = _widget_with_model(make_napari_viewer, qtbot, _new_sam(0))
    old_sam, old_session = weakref.ref(widget._model.sam), weakref.ref(widget.session)
    gc_freeze.freeze()
    widget.set_model(_new_sam(1), ModelChoice("vit_t_test"))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    qtbot.waitUntil(lambda: old_sam() is None and old_session() is None, timeout=20_000)
    assert gc.get_freeze_count() > 0
    widget.close_widget()


def test_closing_the_widget_undoes_the_freeze(make_napari_viewer, qtbot):
    assert gc.get_freeze_count() == 0
    _viewer, widget = _widget_with_model(make_napari_viewer, qtbot, _new_sam(0))
    assert gc.get_freeze_count() > 0
    widget.close_widget()
    assert gc.get_freeze_count() == 0 and not gc_freeze.held()


def test_a_freeze_made_by_someone_else_is_left_alone(make_napari_viewer, qtbot):
    gc.freeze()
    try:
        theirs = gc.get_freeze_count()
        _viewer, widget = _widget_with_model(make_napari_viewer, qtbot, _new_sam(0))
        # frozen objects still go by reference counting: the count can only fall
        assert gc.get_freeze_count() <= theirs  # we froze nothing more
        widget.close_widget()
        assert 0.9 * theirs < gc.get_freeze_count() <= theirs  # and unfroze nothing of theirs
    finally:
        gc.unfreeze()


def test_the_check_waits_while_a_thread_still_uses_what_was_released(make_napari_viewer, qtbot, monkeypatch):
    """A replaced session whose prefetch is finishing a slice is still alive at the check: the
    check waits while its ``busy`` says so (no full collection, which would free nothing), and
    when the thread lets go it is freed by reference counting, with no round at all."""
    import threading

    monkeypatch.setattr(gc_freeze, "_RECHECK_MS", 50)
    viewer, widget = _widget_with_model(make_napari_viewer, qtbot, _new_sam(0))

    class Released:  # a FAKE session: a worker thread holds it until ``go`` is set
        def __init__(self):
            self.go = threading.Event()

        def busy(self):
            return not self.go.is_set()

    released = Released()
    go = released.go
    worker = threading.Thread(target=lambda s=released: s.go.wait(30))
    worker.start()
    ref = weakref.ref(released)
    rounds = gc_freeze.collections_done()
    gc_freeze.collect_when_gone(released, after_ms=0, wait_while=released.busy)
    del released  # only the worker's frame holds it now
    qtbot.wait(400)  # several checks fall due meanwhile
    assert ref() is not None and gc_freeze.collections_done() == rounds  # waited, no collection
    go.set()
    worker.join(10)
    qtbot.waitUntil(lambda: ref() is None, timeout=5_000)
    qtbot.wait(200)
    assert gc_freeze.collections_done() == rounds  # freed by reference counting: no round
    widget.close_widget()
