"""A whole annotation session driven by real Qt mouse and key events on napari's canvas.

The viewer is shown (Xvfb); clicks and keys are sent with ``QTest`` / ``QMouseEvent`` to the vispy
canvas widget (``viewer.window._qt_viewer.canvas.native``), at canvas pixels computed from the
camera (centre, zoom) for image data coordinates: the same path a mouse takes. Prompts are answered
by ``GroundTruthOracle`` (a stand-in for the predictor that returns the synthetic stack's
ground-truth object, NOT a model), so where labels land is checked exactly. The helpers here are
also used by ``test_user_flow_bugs.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from qtpy.QtCore import QEvent, QPoint, QPointF, Qt
from qtpy.QtGui import QMouseEvent
from qtpy.QtTest import QTest
from qtpy.QtWidgets import QApplication

from napari_mobilesam._napari import segment_widget as sw
from napari_mobilesam.core.session import Session
from napari_mobilesam.testing import GroundTruthOracle

NO_MOD = Qt.KeyboardModifier.NoModifier
SHIFT = Qt.KeyboardModifier.ShiftModifier
CTRL = Qt.KeyboardModifier.ControlModifier
LEFT = Qt.MouseButton.LeftButton


# --------------------------------------------------------------------------- real input helpers
def canvas(viewer):
    """The vispy canvas' Qt widget: where the mouse and the keyboard act."""
    return viewer.window._qt_viewer.canvas.native


def _camera(viewer):
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def canvas_pos(viewer, image, zrc) -> QPoint:
    """Canvas pixel of image data point ``zrc`` ((z, row, col) or (row, col)) in the 2D view."""
    world = np.asarray(image.data_to_world(list(zrc)), float)
    cam = _camera(viewer)
    center = np.asarray(cam.center, float)[-2:]
    native = canvas(viewer)
    y = (world[-2] - center[0]) * cam.zoom + native.height() / 2
    x = (world[-1] - center[1]) * cam.zoom + native.width() / 2
    return QPoint(int(round(x)), int(round(y)))


def look_at(viewer, image, zrc, span=64.0):
    """Pan and zoom so that image point ``zrc`` is in the middle of the canvas, with ``span`` data
    pixels across (as a user scrolls to an object before clicking it)."""
    world = np.asarray(image.data_to_world(list(zrc)), float)
    cam = _camera(viewer)
    native = canvas(viewer)
    cam.center = (*np.asarray(cam.center, float)[:-2], world[-2], world[-1])
    scale = float(np.asarray(image.scale)[-1])
    cam.zoom = 0.7 * min(native.width(), native.height()) / (span * scale)
    QApplication.processEvents()


def _mouse(viewer, kind, pos: QPoint, buttons, modifiers):
    native = canvas(viewer)
    local = QPointF(pos)
    button = LEFT if kind != QEvent.Type.MouseMove else Qt.MouseButton.NoButton
    event = QMouseEvent(kind, local, QPointF(native.mapToGlobal(pos)), button, buttons, modifiers)
    QApplication.sendEvent(native, event)


def click(viewer, image, zrc, modifiers=NO_MOD, qtbot=None):
    """A left click at image data point ``zrc`` (brought into view first)."""
    look_at(viewer, image, zrc)
    pos = canvas_pos(viewer, image, zrc)
    _mouse(viewer, QEvent.Type.MouseMove, pos, Qt.MouseButton.NoButton, modifiers)
    _mouse(viewer, QEvent.Type.MouseButtonPress, pos, LEFT, modifiers)
    _mouse(viewer, QEvent.Type.MouseButtonRelease, pos, Qt.MouseButton.NoButton, modifiers)
    QApplication.processEvents()


def drag(viewer, image, start, end, steps=6):
    """Press at image point ``start``, move to ``end`` in steps, release (e.g. draw a rectangle)."""
    middle = (np.asarray(start, float) + np.asarray(end, float)) / 2
    look_at(viewer, image, middle, span=2 * float(np.abs(np.asarray(end) - np.asarray(start))[-2:].max()))
    a, b = canvas_pos(viewer, image, start), canvas_pos(viewer, image, end)
    _mouse(viewer, QEvent.Type.MouseMove, a, Qt.MouseButton.NoButton, NO_MOD)
    _mouse(viewer, QEvent.Type.MouseButtonPress, a, LEFT, NO_MOD)
    QTest.qWait(30)
    for i in range(1, steps + 1):
        p = QPoint(a.x() + (b.x() - a.x()) * i // steps, a.y() + (b.y() - a.y()) * i // steps)
        _mouse(viewer, QEvent.Type.MouseMove, p, LEFT, NO_MOD)
        QTest.qWait(50)  # napari follows a drag from event to event
    for _ in range(3):  # until the shape has caught up with the pointer
        _mouse(viewer, QEvent.Type.MouseMove, b, LEFT, NO_MOD)
        QTest.qWait(100)
    _mouse(viewer, QEvent.Type.MouseButtonRelease, b, Qt.MouseButton.NoButton, NO_MOD)
    QApplication.processEvents()


def key(viewer, qt_key, modifiers=NO_MOD):
    """A key press and release on the canvas (napari's viewer and layer keymaps see it)."""
    QTest.keyClick(canvas(viewer), qt_key, modifiers)
    QApplication.processEvents()


def go_to(viewer, image, z):
    viewer.dims.set_point(0, float(image.data_to_world([z, 0, 0])[0]))


def open_session(make_napari_viewer, qtbot, stack, *, delay=0.0, data=None, labels=None, **image_kwargs):
    """A shown viewer with the image, the widget docked through the plugin manifest, the oracle."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    image = viewer.add_image(stack.image if data is None else data, name="nuclei", **image_kwargs)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    oracle = GroundTruthOracle(stack.labels if labels is None else labels, np.asarray(image.data), delay=delay)
    widget.set_session(Session(None, image.data, rgb=False, predictor=oracle))
    viewer.reset_view()
    qtbot.wait(100)
    return viewer, dock, widget, image, oracle


def nucleus(stack, index):
    """(z, row, col) at the centre of nucleus ``index`` and its ground-truth id."""
    z, r, c = (int(round(v)) for v in stack.centers[index])
    return z, r, c, int(stack.labels[z, r, c])


def wait_preview(qtbot, widget, timeout=5000):
    """Wait until the preview shows the answer to the current prompts (something shown, and no
    decoding of newer prompts on its way: a drag asks for the boxes it passes through too); on
    failure say what the widget and layers hold."""
    annotator = getattr(widget, "_annotator", None)

    def shown() -> bool:
        return widget.preview_layer.data.any() and not (annotator is not None and annotator.decoding)

    try:
        qtbot.waitUntil(shown, timeout=timeout)
    except Exception as exc:
        viewer = widget._viewer
        raise AssertionError(
            f"no preview; status: {widget.status!r}; points: {widget.points_layer.data.tolist()}; "
            f"active: {viewer.layers.selection.active}; layers: {[layer.name for layer in viewer.layers]}"
        ) from exc


def wait_idle(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


# --------------------------------------------------------------------------- the whole session
def test_a_whole_session_with_real_mouse_and_keys(make_napari_viewer, qtbot, stack):
    viewer, dock, widget, image, oracle = open_session(make_napari_viewer, qtbot, stack)
    # 1. click -> preview of the nucleus
    z, r, c, gt1 = nucleus(stack, 0)
    go_to(viewer, image, z)
    click(viewer, image, [z, r, c])
    wait_preview(qtbot, widget)
    np.testing.assert_array_equal(widget.preview_layer.data[0] > 0, stack.labels[z] == gt1)
    # 2. C commits; the prompts layer is ready for the next object
    key(viewer, Qt.Key.Key_C)
    target = widget.target_layer(create=False)
    np.testing.assert_array_equal(target.data[z] == 1, stack.labels[z] == gt1)
    assert viewer.layers.selection.active is widget.points_layer and widget.points_layer.mode == "add"
    # 3. a second object on the same slice, by a click
    others = [i for i in range(len(stack.centers)) if i and nucleus(stack, i)[3] in stack.labels[z]]
    z2, r2, c2, gt2 = nucleus(stack, others[0]) if others else (None,) * 4
    if gt2 is not None:
        rows, cols = np.nonzero(stack.labels[z] == gt2)
        click(viewer, image, [z, int(np.median(rows)), int(np.median(cols))])
        wait_preview(qtbot, widget)
        key(viewer, Qt.Key.Key_C)
        assert set(np.unique(target.data[z])) == {0, 1, 2}
    # 4. a box prompt on another nucleus' slice, drawn with the mouse in the boxes layer
    z3, _r3, _c3, gt3 = nucleus(stack, 3)
    go_to(viewer, image, z3)
    rows, cols = np.nonzero(stack.labels[z3] == gt3)
    viewer.layers.selection.active = widget.boxes_layer
    widget.boxes_layer.mode = "add_rectangle"
    drag(viewer, image, [z3, rows.min() - 1, cols.min() - 1], [z3, rows.max() + 1, cols.max() + 1])
    assert len(widget.boxes_layer.data) == 1
    wait_preview(qtbot, widget)
    np.testing.assert_array_equal(widget.preview_layer.data[0] > 0, stack.labels[z3] == gt3)
    # 5. Shift-S propagates it (a slow oracle now, to press Stop in the middle)
    oracle.delay = 0.3
    calls = oracle.calls
    key(viewer, Qt.Key.Key_S, SHIFT)
    qtbot.waitUntil(lambda: oracle.calls >= calls + 3, timeout=10_000)
    assert "Propagating" in widget.status
    widget._stop_btn.native.click()  # Stop: a real button click
    wait_idle(qtbot, widget)
    assert "Stopped propagating" in widget.status
    new_id = int(target.data[z3][stack.labels[z3] == gt3].max())
    assert new_id >= 2 and (target.data == new_id).any()
    # 6. Ctrl-Z on the labels layer takes the whole propagation back
    viewer.layers.selection.active = target
    key(viewer, Qt.Key.Key_Z, CTRL)
    assert not (target.data == new_id).any()
    oracle.delay = 0.0
    # 7. refine label 1: pick it, clicks, C replaces it on its slice
    go_to(viewer, image, z)
    qtbot.wait(200)
    target.selected_label = 1
    widget._c.target.value = target
    widget._c.refine.native.click()
    assert widget._preview_kind == "object"
    click(viewer, image, [z, r, c])
    qtbot.waitUntil(lambda: "replaces" in widget.status, timeout=5000)
    key(viewer, Qt.Key.Key_C)
    assert "Replaced object 1" in widget.status
    # 8. multi-object propagation: Shift-S with no prompts propagates every object on the slice
    ids_here = sorted(int(i) for i in np.unique(target.data[z]) if i)
    key(viewer, Qt.Key.Key_S, SHIFT)
    wait_idle(qtbot, widget)
    for label in ids_here:
        gt = np.bincount(stack.labels[z][target.data[z] == label]).argmax()
        np.testing.assert_array_equal(target.data == label, stack.labels == gt, err_msg=f"label {label}")
        assert f"id {label}:" in widget.status
    # 9. switch images: the helper layers follow, the layer list does not grow
    n_layers = len(viewer.layers)
    second = viewer.add_image(stack.image[z], name="one slice")
    widget._c.image.value = second
    widget._c.image.value = image
    viewer.layers.remove(second)
    assert len(viewer.layers) == n_layers
    # (with a real model the widget makes the new session itself; the oracle is set again)
    widget.set_session(Session(None, image.data, rgb=False, predictor=oracle))
    # 10. delete a helper layer: it comes back, active, in add mode
    viewer.layers.remove(widget.points_layer)
    qtbot.waitUntil(lambda: widget.points_layer is not None and widget.points_layer in viewer.layers, timeout=5000)
    assert viewer.layers.selection.active is widget.points_layer and widget.points_layer.mode == "add"
    # 11. close the dock in the middle of a propagation: nothing written after, keys unbound
    oracle.delay = 0.3
    z4, r4, c4, _ = nucleus(stack, 5)
    go_to(viewer, image, z4)
    qtbot.wait(200)
    click(viewer, image, [z4, r4, c4])
    wait_preview(qtbot, widget)
    before = np.asarray(target.data).copy()
    key(viewer, Qt.Key.Key_S, SHIFT)
    qtbot.waitUntil(lambda: oracle.calls > 2, timeout=10_000)
    dock.title.close_button.click()
    qtbot.wait(2000)
    np.testing.assert_array_equal(target.data, before)
    from napari.utils.key_bindings import coerce_keybinding

    for name in sw.KEYS:
        assert coerce_keybinding(name) not in viewer.keymap, name


_CLOSE_SCRIPT = """
import numpy as np, napari
from qtpy.QtCore import QTimer
from napari_mobilesam.data import synthetic_nuclei
from napari_mobilesam.core.session import Session
from napari_mobilesam.testing import GroundTruthOracle
st = synthetic_nuclei(shape=(12, 96, 96), n_nuclei=5, radius_range=(8, 12), z_radius_range=(3, 4))
viewer = napari.Viewer(show=True)
image = viewer.add_image(st.image, name="nuclei")
dock, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
widget.set_session(Session(None, image.data, rgb=False, predictor=GroundTruthOracle(st.labels, st.image, delay=0.2)))
z, r, c = (int(round(v)) for v in st.centers[0])
viewer.dims.set_point(0, z)
widget.points_layer.add([z, r, c])
def go():
    widget.propagate()
    QTimer.singleShot(600, viewer.close)  # close mid-propagation, event loop running
QTimer.singleShot(300, go)
napari.run()
print("closed cleanly")
"""


def test_closing_the_viewer_mid_propagation_exits_cleanly_three_times(qtbot):
    """Closing the window while a propagation runs must not abort the process (exit status 0)."""
    assert os.environ.get("DISPLAY"), "needs the Xvfb display"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path])}
    for run in range(3):
        out = subprocess.run([sys.executable, "-c", _CLOSE_SCRIPT], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0 and "closed cleanly" in out.stdout, (run, out.returncode, out.stderr[-3000:])


def test_time_lapse_is_named_from_the_layer_axis_labels(make_napari_viewer, qtbot, stack):
    """A (t, row, col) image: the widget speaks of t, and propagation runs through t."""
    viewer, _dock, widget, image, _oracle = open_session(
        make_napari_viewer, qtbot, stack, axis_labels=("t", "y", "x")
    )
    assert "through t" in widget._propagate_btn.text and "t-range" in widget._limit_z.text
    assert widget._z_from.label == "t from" and "through t" in widget._hint.value
    z, r, c, gt = nucleus(stack, 2)
    go_to(viewer, image, z)
    click(viewer, image, [z, r, c])
    wait_preview(qtbot, widget)
    key(viewer, Qt.Key.Key_S, SHIFT)
    wait_idle(qtbot, widget)
    target = widget.target_layer(create=False)
    np.testing.assert_array_equal(target.data > 0, stack.labels == gt)
    plain = viewer.add_image(stack.image, name="plain stack")
    widget._image_combo.value = plain
    assert "through z" in widget._propagate_btn.text
