"""Issue #11's bugs of the Segment widget, each reproduced through real input on a shown viewer.

Clicks and keys are Qt events on napari's vispy canvas (helpers in ``test_user_flow.py``); prompts
are answered by ``GroundTruthOracle`` (a stand-in for the predictor, NOT a model), except where the
real loader or the real encoder is the point (offline weights, embedding in the background).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt
from test_user_flow import (
    SHIFT,
    click,
    go_to,
    key,
    nucleus,
    open_session,
    wait_idle,
)

from napari_mobilesam._napari import segment_widget as sw


def _slow_propagation(make_napari_viewer, qtbot, stack, index=0):  # noqa: F811
    """Click nucleus ``index``, Shift-S with a slow oracle (0.3 s a slice); 3 decoder calls in."""
    viewer, dock, widget, image, oracle = open_session(make_napari_viewer, qtbot, stack, delay=0.3)
    z, r, c, gt = nucleus(stack, index)
    go_to(viewer, image, z)
    click(viewer, image, [z, r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=10_000)
    calls = oracle.calls
    key(viewer, Qt.Key.Key_S, SHIFT)
    qtbot.waitUntil(lambda: oracle.calls >= calls + 3, timeout=10_000)
    assert widget.busy
    return viewer, dock, widget, image, oracle, z, gt


def test_1_second_object_after_a_commit(make_napari_viewer, qtbot, stack):  # noqa: F811
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    z, r, c, _gt = nucleus(stack, 0)
    go_to(viewer, image, z)
    click(viewer, image, [z, r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    key(viewer, Qt.Key.Key_C)
    assert not widget.preview_layer.data.any()
    z2, r2, c2, gt2 = nucleus(stack, 1)
    go_to(viewer, image, z2)
    qtbot.wait(200)
    click(viewer, image, [z2, r2, c2])
    assert len(widget.points_layer.data) == 1, "the click after a commit added no point"
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    np.testing.assert_array_equal(widget.preview_layer.data[0] > 0, stack.labels[z2] == gt2)


def test_2_closing_the_dock_mid_propagation_releases_everything(make_napari_viewer, qtbot, stack):  # noqa: F811
    from napari.utils.key_bindings import coerce_keybinding

    viewer, dock, widget, image, oracle, z, _gt = _slow_propagation(make_napari_viewer, qtbot, stack)
    labels = viewer.add_labels(np.zeros(stack.labels.shape, np.uint16), name="mine")
    target = widget.target_layer(create=False)
    dock.title.close_button.click()  # napari's × button
    qtbot.wait(3000)  # the worker would have finished meanwhile
    assert target is None or not np.asarray(target.data).any(), "the propagation wrote after the close"
    for name in sw.KEYS:
        assert coerce_keybinding(name) not in viewer.keymap, name
    calls = oracle.calls
    viewer.layers.selection.active = labels
    key(viewer, Qt.Key.Key_C)
    key(viewer, Qt.Key.Key_S, SHIFT)
    qtbot.wait(500)
    assert oracle.calls == calls, "the hidden widget still reacts to keys"
    assert not labels.data.any()


def test_3_c_during_a_propagation_does_not_commit_its_live_view(make_napari_viewer, qtbot, stack):  # noqa: F811
    viewer, _dock, widget, image, _oracle, z, gt = _slow_propagation(make_napari_viewer, qtbot, stack)
    assert "C commits" not in widget.status
    go_to(viewer, image, z + 1)  # done by the worker: the live view shows it
    qtbot.waitUntil(lambda: widget._preview_kind == "live", timeout=10_000)
    key(viewer, Qt.Key.Key_C)
    wait_idle(qtbot, widget)
    target = widget.target_layer(create=False)
    ids = set(np.unique(np.asarray(target.data))) - {0}
    assert ids == {1}, f"the nucleus ended with ids {ids}"


_SCRIPT_CLOSE = """
import numpy as np, napari
from napari_mobilesam._napari.segment_widget import SegmentWidget
viewer = napari.Viewer(show=True)
viewer.add_image(np.random.default_rng(0).random((6, 64, 64)), name="img")
widget = SegmentWidget(viewer)
viewer.window.add_dock_widget(widget, name="Segment (MobileSAM)")
viewer.dims.set_point(0, 3)  # starts the slice timer
viewer.close()
print("closed cleanly")
"""


def test_4_a_script_closing_the_viewer_exits_cleanly(qtbot):
    """Closing the viewer from a script (no event loop) must not abort (was exit status 134)."""
    assert os.environ.get("DISPLAY"), "needs the Xvfb display"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for run in range(3):
        out = subprocess.run([sys.executable, "-c", _SCRIPT_CLOSE], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0 and "closed cleanly" in out.stdout, (run, out.returncode, out.stderr[-3000:])


_SCRIPT_ENDS_WHILE_RUNNING = """
import sys, tempfile, time
from pathlib import Path
import numpy as np, napari
from qtpy.QtWidgets import QApplication
from napari_mobilesam.core.session import Session
from napari_mobilesam.data import synthetic_nuclei
from napari_mobilesam.testing import GroundTruthOracle

def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.instance().processEvents()
        time.sleep(0.005)

viewer = napari.Viewer(show=True)
stack = synthetic_nuclei(shape=(12, 96, 96), n_nuclei=5, radius_range=(8, 12), z_radius_range=(3, 5), seed=3)
image = viewer.add_image(stack.image, name="nuclei")
if sys.argv[1] == "propagation":
    _, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    widget.set_session(Session(None, image.data, rgb=False,
                               predictor=GroundTruthOracle(stack.labels, np.asarray(image.data), delay=0.3)))
    z, r, c = (int(round(v)) for v in stack.centers[0])
    viewer.dims.set_point(0, z)
    widget.points_layer.add([z, r, c])
    spin(0.5)
    assert widget.propagate() is not None
else:
    from napari_mobilesam.distillation.data import save_teacher_checkpoint, vit_teacher_encoder
    folder = Path(tempfile.mkdtemp())
    _, panel = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Fine-tune by distillation (MobileSAM)")
    panel.enable_dev_models()
    panel._teacher.value = save_teacher_checkpoint(vit_teacher_encoder("tiny", seed=1), folder / "teacher.pth")
    panel._layers.value = [image]
    panel._student.value = "vit_t_test"
    panel._epochs.value, panel._batch.value = 50, 1
    panel._device.value = "cpu"
    panel._output.value = folder / "student.pt"
    assert panel.run() is not None
spin(1.0)
print("the script ends while the task runs", flush=True)
"""


@pytest.mark.parametrize("task", [
    "propagation",
    pytest.param("distillation", marks=pytest.mark.xfail(
        strict=False, reason="known: still a segmentation fault in Qt's teardown in some runs on a loaded "
        "machine (0 of 16 alone, 1 in a full suite run), after the task stopped; cause not found")),
])
def test_a_script_that_ends_while_a_task_runs_exits_cleanly(qtbot, task):
    """A script that starts a propagation or a distillation and ends without closing the viewer:
    the task is stopped before the interpreter shuts down (was exit status 139, a segmentation
    fault, and 134 for the distillation); the GroundTruthOracle stands in for the model in the
    propagation, the tiny dev models train in the distillation."""
    assert os.environ.get("DISPLAY"), "needs the Xvfb display"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _SCRIPT_ENDS_WHILE_RUNNING, task], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert "the script ends while the task runs" in out.stdout
    assert "napari-mobilesam: stopping before exit" in out.stderr, out.stderr[-2000:]


def test_5_a_long_report_does_not_widen_the_dock(make_napari_viewer, qtbot, stack):  # noqa: F811
    viewer, dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    qtbot.wait(300)
    width, window = dock.width(), viewer.window._qt_window.size()
    z, r, c, _gt = nucleus(stack, 0)
    go_to(viewer, image, z)
    click(viewer, image, [z, r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    key(viewer, Qt.Key.Key_S, SHIFT)
    wait_idle(qtbot, widget)
    assert widget.status.count("\n") >= 1 and "stopped at" in widget.status
    widget._status.value += " " + "a-very-long-unbreakable-word" * 8
    qtbot.wait(500)
    assert dock.width() <= width + 2, (width, dock.width())
    assert viewer.window._qt_window.size() == window, "the report made the window grow"


def _wheel_down(widget, notches: int) -> None:
    """A mouse-wheel turn over ``widget`` (towards the user: content moves up)."""
    from qtpy.QtCore import QPointF
    from qtpy.QtGui import QWheelEvent
    from qtpy.QtWidgets import QApplication

    at = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(at, QPointF(widget.mapToGlobal(at.toPoint())), QPoint(0, 0), QPoint(0, -120 * notches),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget, event)


def test_both_panels_fit_the_window_and_their_lower_controls_scroll_into_view(
    make_napari_viewer, qtbot, stack  # noqa: F811
):
    """The Segment widget with the distillation panel docked below it in a 1400 × 900 window: the
    window keeps its height (it grew to about 1600 px, past the bottom of the screen, and again
    with every longer status line, the canvas resizing and repainting each time), each dock keeps
    room for its first controls, and the controls below the fold scroll into view with the wheel
    and work when clicked."""
    from qtpy.QtTest import QTest

    from napari_mobilesam._napari.controls import DOCK_MIN_HEIGHT

    viewer, dock, widget, _image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    window = viewer.window._qt_window
    dock2, panel = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Fine-tune by distillation (MobileSAM)")
    qtbot.wait(300)
    assert window.height() <= 900, window.size()
    assert min(dock.height(), dock2.height()) >= DOCK_MIN_HEIGHT, (dock.height(), dock2.height())
    for panel_ in (widget, panel):  # as wide as the controls need: nothing cut off on the right
        assert panel_.native.viewport().width() >= panel_.inner.minimumSizeHint().width(), panel_
    canvas = viewer.window._qt_viewer.canvas.native
    size = canvas.size()
    panel._status.value = "\n".join(["validation before: embedding MSE 2.096, mask mIoU 1.000"] * 4)
    widget._status.value = "\n".join(["propagated 40 slices: object 1 stopped at z 3 and z 37"] * 4)
    qtbot.wait(300)
    assert canvas.size() == size and window.height() <= 900, (canvas.size(), window.size())

    # the shorter dock (napari sizes a new dock against the others): a checkbox below its fold
    short, check = (widget, widget._limit_z) if dock.height() < dock2.height() else (panel, panel._overwrite)
    box, viewport = check.native, short.native.viewport()

    def in_view() -> bool:
        top = box.mapTo(viewport, QPoint(0, 0)).y()
        return top >= 0 and top + box.height() <= viewport.height()

    assert short.native.verticalScrollBar().maximum() > 0
    assert not in_view(), (dock.height(), dock2.height(), viewport.height(), box.mapTo(viewport, QPoint(0, 0)).y())
    _wheel_down(viewport, 10)
    qtbot.waitUntil(in_view, timeout=2000)
    before = check.value
    QTest.mouseClick(box, Qt.MouseButton.LeftButton, pos=QPoint(8, box.height() // 2))
    assert check.value is (not before)


def test_the_panels_still_show_hide_and_close_as_magicgui_widgets(make_napari_viewer, qtbot):
    """magicgui's ``show()``, ``visible`` and ``close()`` act on the scroll area that holds the
    controls: ``show()`` outside a dock opens the panel as its own window (it showed nothing
    while they acted on the controls inside the scroll area)."""
    from napari_mobilesam._napari.distill_widget import DistillWidget
    from napari_mobilesam._napari.segment_widget import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 64, 64), np.uint8), name="img")
    for cls in (SegmentWidget, DistillWidget):
        panel = cls(viewer)
        panel.show()
        qtbot.waitUntil(lambda: panel.native.isVisible(), timeout=2000)  # noqa: B023
        assert panel.visible and panel.native.isWindow() and panel.inner.isVisible()
        panel.visible = False
        assert not panel.native.isVisible()
        panel.show()
        panel.close()
        assert not panel.native.isVisible() and not panel.visible
        if isinstance(panel, SegmentWidget):
            panel.close_widget()


def test_6_offline_first_click_one_short_message_naming_the_widget_choice(
    make_napari_viewer, qtbot, stack, monkeypatch  # noqa: F811
):
    import pooch
    import requests

    tries = []

    def offline(*args, **kwargs):
        tries.append(1)
        raise requests.exceptions.ConnectionError("network is unreachable " + "x" * 600)

    monkeypatch.setattr(pooch, "retrieve", offline)
    popups = []
    monkeypatch.setattr(sw, "show_error", popups.append)
    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(stack.image, name="nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    widget._model_combo.value = "vit_t"
    widget._device_combo.value = "cpu"
    z, r, c, _gt = nucleus(stack, 0)
    go_to(viewer, image, z)
    click(viewer, image, [z, r, c])  # no model yet: the click loads it
    wait_idle(qtbot, widget, timeout=120_000)
    click(viewer, image, [z, r + 2, c])
    click(viewer, image, [z, r, c + 2])
    wait_idle(qtbot, widget, timeout=120_000)
    assert len(popups) == 1, popups
    assert len(tries) == 1, "every click retried the download"
    assert "MobileSAM checkpoint file" in popups[0] and "mobile_sam.pt" in popups[0]
    assert "checkpoint=" not in popups[0] and len(popups[0]) < 300
    assert len(widget.status) < 300 and "MobileSAM checkpoint file" in widget.status
    # an empty checkpoint field: says what to do, starts nothing
    widget._model_combo.value = "checkpoint"
    widget._model.load_btn.native.click()
    assert "Choose the checkpoint file" in popups[-1] and " on auto" not in popups[-1]
    assert not widget.busy


def test_7_status_line_follows_images_and_running_tasks(make_napari_viewer, qtbot, stack, engine_sam_test):  # noqa: F811
    viewer, _dock, widget, image, _oracle, z, _gt = _slow_propagation(make_napari_viewer, qtbot, stack)
    go_to(viewer, image, z + 2)  # other slice: the preview and embedding messages must not hide the run
    qtbot.wait(500)
    assert widget.status.startswith("Propagating"), widget.status
    wait_idle(qtbot, widget)
    assert "Propagated" in widget.status
    other = viewer.add_image(stack.image[::-1].copy(), name="other")
    widget._image_combo.value = other
    assert "Propagated" not in widget.status and "other" in widget.status
    viewer.layers.remove(image)
    # the real engine: an embedding is running when its image, the last one, is deleted
    from napari_mobilesam.models.choice import ModelChoice

    widget.set_model(engine_sam_test, ModelChoice("vit_t_test", "", "cpu"))
    assert "Computing the embedding" in widget.status
    viewer.layers.remove(other)
    wait_idle(qtbot, widget)
    qtbot.wait(300)
    assert "Computing the embedding" not in widget.status, widget.status


def test_8_helper_layers_come_back_and_do_not_pile_up(make_napari_viewer, qtbot, stack):  # noqa: F811
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    viewer.layers.remove(widget.points_layer)
    qtbot.waitUntil(lambda: widget.points_layer is not None and widget.points_layer in viewer.layers, timeout=5000)
    assert viewer.layers.selection.active is widget.points_layer
    z, r, c, _gt = nucleus(stack, 0)
    go_to(viewer, image, z)
    qtbot.wait(200)
    click(viewer, image, [z, r, c])
    assert len(widget.points_layer.data) == 1
    images = [image] + [viewer.add_image(stack.image[i], name=f"slice {i}") for i in (2, 4, 6)]
    for each in images[1:] + images[:1]:
        widget._image_combo.value = each
    # the images, the current image's three helpers and its (empty) made labels layer
    assert len(viewer.layers) == len(images) + 3 + 1, [layer.name for layer in viewer.layers]
    assert len(widget.points_layer.data) == 1, "the first image's prompts were kept"


def test_9_preview_looks_unlike_committed_labels_and_every_control_has_a_tooltip(
    make_napari_viewer, qtbot, stack  # noqa: F811
):
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    z, r, c, gt = nucleus(stack, 0)
    go_to(viewer, image, z)
    click(viewer, image, [z, r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    widget.points_layer.visible = False  # the marker would cover the pixel compared
    qtbot.wait(300)
    from test_user_flow import canvas_pos

    pos = canvas_pos(viewer, image, [z, r + 3, c + 3])
    preview = viewer.screenshot(canvas_only=True, flash=False)[pos.y(), pos.x(), :3].astype(int)
    key(viewer, Qt.Key.Key_C)
    qtbot.wait(300)
    committed = viewer.screenshot(canvas_only=True, flash=False)[pos.y(), pos.x(), :3].astype(int)
    assert np.abs(preview - committed).sum() > 60, (preview, committed)
    assert preview[1] < preview[0] and preview[1] < preview[2], f"the preview is magenta: {preview}"

    def controls(container):
        for w in container:
            if hasattr(w, "__iter__") and not hasattr(w, "choices"):
                yield from controls(w)
            else:
                yield w

    missing = [getattr(w, "label", "") or getattr(w, "text", "") for w in controls(widget) if not w.tooltip]
    assert not missing, f"controls without a tooltip: {missing}"


def test_the_prompts_controls_show_add_mode_after_another_image_was_picked(make_napari_viewer, qtbot, stack):  # noqa: F811
    """napari makes a re-inserted layer's controls with the pan/zoom button checked, whatever the
    layer's mode: the widget showed the move tool while clicks added points."""
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    other = viewer.add_image(stack.image[3], name="slice 3")
    for each in (other, image):
        widget._image_combo.value = each
        qtbot.wait(50)
        controls = viewer.window._qt_viewer.controls.widgets[widget.points_layer]
        assert widget.points_layer.mode == "add"
        assert controls.addition_button.isChecked() and not controls.panzoom_button.isChecked()


def test_layers_deleted_together_get_one_answer_and_closing_the_viewer_opens_no_batch(
    make_napari_viewer, qtbot, stack  # noqa: F811
):
    """napari removes several layers in one batched update (the delete button on a selection, the
    viewer closing: every layer). The widget answered each removal on its own: it showed the next
    image's helpers while that image was about to go too, and each of its own layer swaps ended
    napari's batch early (the canvas rebuilt its scene and collected garbage: about 0.3 s a time
    while a closing viewer hung). The other images are stacks too: napari 0.9.2 itself crashes in
    software OpenGL when one delete takes a stack and a 2D image and leaves 2D images."""
    from qtpy.QtTest import QTest

    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    other = viewer.add_image(stack.image[3:9], name="stack 3")
    kept = viewer.add_image(stack.image[5:11], name="stack 5")
    inserted, batches = [], []
    viewer.layers.events.inserted.connect(lambda e: inserted.append(e.value.name))
    viewer.layers.events.end_batch.connect(lambda e: batches.append(1))
    viewer.layers.selection = {image, other}
    QTest.mouseClick(viewer.window._qt_viewer.layerButtons.deleteButton, Qt.MouseButton.LeftButton)
    qtbot.wait(100)
    assert image not in viewer.layers and other not in viewer.layers
    assert inserted and all(name.startswith("stack 5 ") for name in inserted), inserted
    assert widget.image_layer is kept and viewer.layers.selection.active is widget.points_layer
    assert not [layer.name for layer in viewer.layers if not layer.name.startswith("stack 5")]

    inserted.clear(), batches.clear()
    viewer.close()
    assert inserted == [] and len(batches) == 1, (inserted, len(batches))
