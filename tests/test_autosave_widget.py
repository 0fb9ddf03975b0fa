"""The Segment widget's autosave, driven as a user does: real clicks and keys on the canvas, the
napari brush, a killed napari, the restore button clicked (the GroundTruthOracle stands in for
the model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt
from qtpy.QtTest import QTest
from test_user_flow import (
    CTRL,
    click,
    drag,
    go_to,
    key,
    nucleus,
    open_session,
    wait_preview,
)

from napari_mobilesam._napari import autosave_action
from napari_mobilesam.io import autosave as store

pytestmark = pytest.mark.gui


def _commit_nucleus(viewer, qtbot, widget, image, stack, index) -> None:
    z, r, c, _gt = nucleus(stack, index)
    go_to(viewer, image, z)
    qtbot.wait(100)
    click(viewer, image, (z, r, c))
    wait_preview(qtbot, widget)
    key(viewer, Qt.Key.Key_C)


def _wait_saved(qtbot, widget, timeout=15_000) -> None:
    saver = widget._autosaver
    qtbot.waitUntil(lambda: saver.saved_at is not None and not saver._dirty
                    and (saver._task is None or saver._task.done), timeout=timeout)


_FIRST_SESSION = r"""
import sys, time
import numpy as np, napari
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication
from napari_mobilesam.core.session import Session
from napari_mobilesam.data import synthetic_nuclei
from napari_mobilesam.testing import GroundTruthOracle
from test_user_flow import click, go_to, key, nucleus

def spin(until, timeout=30):
    end = time.time() + timeout
    while not until():
        assert time.time() < end, "timed out"
        QApplication.processEvents()
        time.sleep(0.01)

stack = synthetic_nuclei(shape=(12, 128, 128), n_nuclei=8, radius_range=(7, 12), z_radius_range=(2, 4), seed=0)
viewer = napari.Viewer(show=True)
viewer.window._qt_window.resize(1400, 900)
image = viewer.add_image(stack.image, name="nuclei")
_, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
widget.set_session(Session(None, image.data, rgb=False, predictor=GroundTruthOracle(stack.labels, np.asarray(image.data))))
viewer.reset_view()
for index in (0, 1):
    z, r, c = (int(round(v)) for v in stack.centers[index])
    go_to(viewer, image, z)
    spin(lambda: True)
    click(viewer, image, (z, r, c))
    spin(lambda: widget.preview_layer.data.any() and not widget._annotator.decoding)
    key(viewer, Qt.Key.Key_C)
saver = widget._autosaver
spin(lambda: saver.saved_at is not None and not saver._dirty and saver._task.done)
np.save(sys.argv[1], np.asarray(widget.target_layer(create=False).data))
print("SAVED", flush=True)
while True:  # napari runs on until it is killed
    QApplication.processEvents()
    time.sleep(0.01)
"""


def test_labels_come_back_after_napari_was_killed(make_napari_viewer, qtbot, stack, tmp_path):
    """Two nuclei committed with real clicks and C in a napari that is then killed (SIGKILL);
    a new napari with the same image offers them, and a click on *Restore* adds them as a layer
    that becomes the target (its next commit goes into it and is autosaved into the same file)."""
    assert os.environ.get("DISPLAY"), "needs the Xvfb display"
    drawn = tmp_path / "drawn.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _FIRST_SESSION, str(drawn)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "SAVED", (line, proc.stderr.read()[-3000:] if proc.poll() is not None else "")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    before = np.load(drawn)
    assert len(np.unique(before)) == 3

    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    button = widget._c.restore
    assert button.visible and "Restore labels of" in button.text, widget.status
    assert "autosaved" in widget.status
    made = widget.target_layer(create=False)
    QTest.mouseClick(button.native, Qt.MouseButton.LeftButton)
    restored = widget._c.target.value
    assert restored is not made and restored in viewer.layers and "(autosaved" in restored.name
    np.testing.assert_array_equal(restored.data, before)
    assert not made.data.any(), "the layer that was there is left as it was"
    assert not button.visible
    _commit_nucleus(viewer, qtbot, widget, image, stack, 2)
    assert len(np.unique(restored.data)) == 4
    _wait_saved(qtbot, widget)
    found = store.find_autosaves(widget._autosaver.folder(), "nuclei", stack.image.shape)
    assert len(found) == 1, "the restored session continues the same file"
    np.testing.assert_array_equal(store.read_autosave(found[0]).labels, restored.data)


def test_brush_and_undo_are_autosaved_and_closing_the_dock_writes_at_once(make_napari_viewer, qtbot, stack):
    """A stroke of napari's brush (a real drag on the canvas) is saved AFTER_MS later; an undo
    (Ctrl-Z on the labels layer) too; a change followed by closing the dock at once is on disk."""
    viewer, dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    target = widget.target_layer()
    z = 5
    go_to(viewer, image, z)
    viewer.layers.selection.active = target
    target.mode = "paint"
    target.brush_size = 5
    target.selected_label = 9
    drag(viewer, image, (z, 30, 30), (z, 30, 60))
    assert (target.data[z] == 9).sum() > 50, "the brush stroke painted"
    _wait_saved(qtbot, widget)
    saved = store.read_autosave(store.find_autosaves(widget._autosaver.folder(), "nuclei", stack.image.shape)[0])
    np.testing.assert_array_equal(saved.labels, target.data)
    key(viewer, Qt.Key.Key_Z, CTRL)  # undo, the labels layer active
    assert not target.data.any()
    qtbot.wait(50)
    target.paint((z, 80, 80), 4)  # and at once a new change, then the dock closes
    dock.title.close_button.click()  # napari's × button
    qtbot.wait(50)
    path = store.autosave_path(widget._autosaver.folder(), "nuclei", stack.image.shape)
    np.testing.assert_array_equal(store.read_autosave(path).labels, target.data)


def test_an_autosave_a_session_did_not_restore_is_kept(make_napari_viewer, qtbot, stack):
    """A second session that ignores the offer and commits its own object writes a file of its
    own; the first one is kept, and a third session is offered the newest."""
    viewer, dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    _commit_nucleus(viewer, qtbot, widget, image, stack, 0)
    first = np.asarray(widget.target_layer().data).copy()
    dock.close()
    viewer.close()
    import time

    time.sleep(1.1)  # the file moved aside is named by its time (seconds)
    viewer, dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    assert widget._c.restore.visible
    _commit_nucleus(viewer, qtbot, widget, image, stack, 3)
    assert not widget._c.restore.visible, "labels drawn now: no offer to add a second set"
    second = np.asarray(widget.target_layer().data).copy()
    _wait_saved(qtbot, widget)
    found = store.find_autosaves(widget._autosaver.folder(), "nuclei", stack.image.shape)
    assert len(found) == 2
    np.testing.assert_array_equal(store.read_autosave(found[0]).labels, second)
    np.testing.assert_array_equal(store.read_autosave(found[1]).labels, first)


def test_an_unwritable_folder_turns_autosave_off_with_a_message_and_keeps_the_labels(
    make_napari_viewer, qtbot, stack, tmp_path
):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    widget._c.autosave_folder.value = blocker / "autosave"
    _commit_nucleus(viewer, qtbot, widget, image, stack, 0)
    drawn = np.asarray(widget.target_layer().data).copy()
    qtbot.waitUntil(lambda: widget._autosaver.last_error != "", timeout=15_000)
    assert not widget._c.autosave.value
    assert "Autosave is off: cannot autosave labels to" in widget.status
    assert "choose another autosave folder" in widget.status
    np.testing.assert_array_equal(widget.target_layer().data, drawn)
    from napari_mobilesam._napari.settings import load_settings

    assert load_settings().autosave, "switched off for this session only"
    # a working folder and autosave on again: saved
    widget._c.autosave_folder.value = tmp_path / "ok"
    widget._c.autosave.value = True
    _wait_saved(qtbot, widget)
    np.testing.assert_array_equal(
        store.read_autosave(store.autosave_path(tmp_path / "ok", "nuclei", stack.image.shape)).labels, drawn)
    assert load_settings().autosave_folder == str(tmp_path / "ok")


def test_autosave_off_writes_nothing(make_napari_viewer, qtbot, stack):
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    box = widget._c.autosave.native
    QTest.mouseClick(box, Qt.MouseButton.LeftButton, pos=QPoint(8, box.height() // 2))  # on its tick box
    assert not widget._c.autosave.value
    _commit_nucleus(viewer, qtbot, widget, image, stack, 0)
    qtbot.wait(autosave_action.AFTER_MS + 1000)
    assert not Path(widget._autosaver.folder()).exists() or not any(Path(widget._autosaver.folder()).iterdir())


_ENDS_WITH_THE_VIEWER_OPEN = r"""
import sys, time
import numpy as np, napari
from qtpy.QtWidgets import QApplication
from napari_mobilesam.data import synthetic_nuclei

stack = synthetic_nuclei(shape=(12, 128, 128), n_nuclei=8, radius_range=(7, 12), z_radius_range=(2, 4), seed=0)
viewer = napari.Viewer(show=True)
image = viewer.add_image(stack.image, name="nuclei")
_, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
target = widget.target_layer()
target.paint((3, 40, 40), 6)  # the brush, 0.2 s before the script ends: no autosave yet
end = time.time() + 0.2
while time.time() < end:
    QApplication.processEvents()
    time.sleep(0.01)
assert widget._autosaver.saved_at is None
np.save(sys.argv[1], np.asarray(target.data))
print("the script ends with the viewer open", flush=True)
"""


def test_a_script_ending_with_the_viewer_open_autosaves_its_last_change(qtbot, tmp_path, stack):
    """No event loop, no close: the viewer is closed at the interpreter's exit (workers
    ._close_viewers), so the widget writes its last change; exit status 0."""
    assert os.environ.get("DISPLAY"), "needs the Xvfb display"
    drawn = tmp_path / "drawn.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _ENDS_WITH_THE_VIEWER_OPEN, str(drawn)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert "the script ends with the viewer open" in out.stdout
    expected = np.load(drawn)
    assert expected.any()
    (path,) = store.find_autosaves(os.environ["NAPARI_MOBILESAM_AUTOSAVE_DIR"], "nuclei", stack.image.shape)
    np.testing.assert_array_equal(store.read_autosave(path).labels, expected)
