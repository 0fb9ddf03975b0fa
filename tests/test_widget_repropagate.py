"""Re-propagating a corrected label from the slice in view, driven through real input.

A shown viewer gets real Qt mouse and key events on the vispy canvas (helpers in
``test_user_flow.py``). Prompts are answered by ``GroundTruthOracle`` (a stand-in for the predictor,
NOT a model): first with its ``"eroded"`` error (a model a little wrong: every mask one pixel too
small), then exact, so the slices a re-propagation rewrites are told apart from the ones it keeps.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from test_user_flow import (
    CTRL,
    SHIFT,
    click,
    drag,
    go_to,
    key,
    nucleus,
    open_session,
    wait_idle,
    wait_preview,
)

from napari_mobilesam.core.session import Session


def _tall_object(stack):
    """(z, row, col, gt id) of a nucleus spanning at least 7 slices; z is its 3rd slice."""
    best = None
    for i in range(len(stack.centers)):
        _z, _r, _c, gt = nucleus(stack, i)
        zs = np.flatnonzero((stack.labels == gt).any(axis=(1, 2)))
        if best is None or len(zs) > len(best[1]):
            best = (gt, zs)
    gt, zs = best
    assert len(zs) >= 7, f"the test stack has no nucleus through 7 slices ({len(zs)})"
    z = int(zs[0]) + 2
    rows, cols = np.nonzero(stack.labels[z] == gt)
    k = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return z, int(rows[k]), int(cols[k]), gt


def _object_and_neighbour(make_napari_viewer, qtbot, stack):
    """A session where label 1 (a tall nucleus) was propagated by a slightly wrong model, and
    label 2 (another nucleus) committed; the oracle is exact afterwards."""
    viewer, dock, widget, image, oracle = open_session(make_napari_viewer, qtbot, stack)
    oracle.error = "eroded"
    z, r, c, gt = _tall_object(stack)
    go_to(viewer, image, z)
    click(viewer, image, [z, r, c])
    wait_preview(qtbot, widget)
    key(viewer, Qt.Key.Key_C)
    key(viewer, Qt.Key.Key_S, SHIFT)  # no prompts: propagates the object committed on this slice
    wait_idle(qtbot, widget)
    target = widget.target_layer(create=False)
    assert (target.data == 1).any(axis=(1, 2)).sum() >= 5, widget.status
    other = next(i for i in range(len(stack.centers)) if nucleus(stack, i)[3] != gt)
    z2, r2, c2, _gt2 = nucleus(stack, other)
    go_to(viewer, image, z2)
    qtbot.wait(200)
    click(viewer, image, [z2, r2, c2])
    wait_preview(qtbot, widget)
    key(viewer, Qt.Key.Key_C)
    assert (target.data == 2).any()
    oracle.error = "exact"
    return viewer, widget, image, oracle, target, (z, r, c, gt)


def _refine_with_clicks(viewer, qtbot, widget, image, target, z, r, c):
    go_to(viewer, image, z)
    qtbot.wait(200)
    target.selected_label = 1
    widget._c.target.value = target
    widget._c.refine.native.click()
    click(viewer, image, [z, r, c])
    qtbot.waitUntil(lambda: "replaces" in widget.status, timeout=5000)
    key(viewer, Qt.Key.Key_C)
    assert "Replaced object 1" in widget.status


def _brush(viewer, qtbot, image, target, z, rc0, rc1):
    """Paint label 1 with napari's brush by dragging the mouse on slice z."""
    go_to(viewer, image, z)
    qtbot.wait(200)
    viewer.layers.selection.active = target
    target.selected_label = 1
    target.brush_size = 3
    target.mode = "paint"
    drag(viewer, image, [z, *rc0], [z, *rc1])
    target.mode = "pan_zoom"


def test_repropagate_rewrites_up_to_the_slice_corrected_by_hand_in_one_undo_step(
    make_napari_viewer, qtbot, stack
):
    viewer, widget, image, _oracle, target, (z, r, c, gt) = _object_and_neighbour(make_napari_viewer, qtbot, stack)
    truth = stack.labels == gt
    assert not np.array_equal(target.data[z] == 1, truth[z])  # the model was wrong there
    # 1. refine label 1 on slice z with a click, C replaces it there
    _refine_with_clicks(viewer, qtbot, widget, image, target, z, r, c)
    np.testing.assert_array_equal(target.data[z] == 1, truth[z])
    # 2. correct slice z+3 by hand with the brush, in the background beside the object
    rows, cols = np.nonzero(target.data[z + 3] == 1)
    row, col = int(rows.min()) - 4, int(np.median(cols))
    assert (target.data[z + 3, row - 2 : row + 3, col - 4 : col + 5] == 0).all()
    drawn_before = int((target.data[z + 3] == 1).sum())
    _brush(viewer, qtbot, image, target, z + 3, (row, col - 3), (row, col + 3))
    assert (target.data[z + 3] == 1).sum() > drawn_before, "the brush painted nothing"
    assert z + 3 in widget._annotator.hand_edits.slices(target, 1)
    before = np.asarray(target.data).copy()
    # 3. back on slice z, Shift-R re-propagates label 1 from there
    go_to(viewer, image, z)
    qtbot.wait(200)
    viewer.layers.selection.active = target
    target.selected_label = 1
    key(viewer, Qt.Key.Key_R, SHIFT)
    wait_idle(qtbot, widget)
    after = np.asarray(target.data).copy()
    for q in range(0, z + 3):  # below z to the object's end, and between z and z+3: the new propagation
        np.testing.assert_array_equal(after[q] == 1, truth[q], err_msg=f"slice {q}: {widget.status}")
    np.testing.assert_array_equal(after[z + 3 :], before[z + 3 :])  # the hand-corrected slice and beyond
    np.testing.assert_array_equal(after == 2, before == 2)  # the other object is untouched
    assert set(np.unique(after[after != before])) <= {0, 1}
    assert "Re-propagated label 1 from slice" in widget.status
    assert f"up: to z={z + 2}, stopped at z={z + 3}: a slice corrected by hand" in widget.status
    assert "down:" in widget.status and f"Kept as corrected by hand: slice {z + 3}" in widget.status
    # 4. one Ctrl-Z on the labels layer takes the whole re-propagation back
    viewer.layers.selection.active = target
    key(viewer, Qt.Key.Key_Z, CTRL)
    np.testing.assert_array_equal(target.data, before)


def test_repropagate_cancel_writes_nothing_and_stop_keeps_the_slices_decided(make_napari_viewer, qtbot, stack):
    viewer, widget, image, oracle, target, (z, r, c, gt) = _object_and_neighbour(make_napari_viewer, qtbot, stack)
    _refine_with_clicks(viewer, qtbot, widget, image, target, z, r, c)
    before = np.asarray(target.data).copy()
    oracle.delay = 0.4
    viewer.layers.selection.active = target
    calls = oracle.calls
    widget._c.repropagate.native.click()  # the button this time
    qtbot.waitUntil(lambda: oracle.calls >= calls + 2, timeout=10_000)
    assert "Re-propagating label 1" in widget.status
    widget._cancel_btn.native.click()
    wait_idle(qtbot, widget)
    qtbot.wait(300)
    np.testing.assert_array_equal(target.data, before)
    assert "nothing was written" in widget.status
    # Stop after a few slices: the slices decided are written, the rest keep their old pixels
    calls = oracle.calls
    widget._c.repropagate.native.click()
    qtbot.waitUntil(lambda: oracle.calls >= calls + 2, timeout=10_000)
    widget._stop_btn.native.click()
    wait_idle(qtbot, widget)
    after = np.asarray(target.data)
    result = widget.last_propagation
    decided = {rec.z for rec in result.records if rec.label == 1}
    assert result.cancelled and "Stopped re-propagating label 1" in widget.status
    for q in range(len(after)):
        if q in decided:
            np.testing.assert_array_equal(after[q] == 1, (stack.labels[q] == gt), err_msg=f"slice {q}")
        else:
            np.testing.assert_array_equal(after[q], before[q], err_msg=f"slice {q} was not decided")
    assert any(q not in decided and (before[q] == 1).any() for q in range(len(after)))


def test_repropagate_says_why_it_cannot_start(make_napari_viewer, qtbot, stack):
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    z, r, c, _gt = nucleus(stack, 0)
    go_to(viewer, image, z)
    key(viewer, Qt.Key.Key_R, SHIFT)
    assert "'nuclei labels' holds no labels yet: commit an object first" in widget.status
    click(viewer, image, [z, r, c])
    wait_preview(qtbot, widget)
    key(viewer, Qt.Key.Key_C)
    target = widget.target_layer(create=False)
    target.selected_label = 0
    key(viewer, Qt.Key.Key_R, SHIFT)
    assert "No label selected" in widget.status
    target.selected_label = 1
    empty = next(q for q in range(target.data.shape[0]) if not (target.data[q] == 1).any())
    go_to(viewer, image, empty)
    qtbot.wait(200)
    key(viewer, Qt.Key.Key_R, SHIFT)
    assert f"Label 1 is not on slice {empty}" in widget.status
    assert not widget.busy
    flat = viewer.add_image(stack.image[z], name="one slice")
    widget._image_combo.value = flat
    widget.set_session(Session(None, flat.data, rgb=False, predictor=_oracle))
    widget.repropagate_selected_label()
    assert "this image is 2D" in widget.status
    assert not widget._c.repropagate.enabled


def test_repropagate_stays_inside_the_limited_range(make_napari_viewer, qtbot, stack):
    viewer, widget, image, _oracle, target, (z, r, c, gt) = _object_and_neighbour(make_napari_viewer, qtbot, stack)
    _refine_with_clicks(viewer, qtbot, widget, image, target, z, r, c)
    before = np.asarray(target.data).copy()
    widget._limit_z.value = True
    widget._z_from.value, widget._z_to.value = z - 1, z + 1
    key(viewer, Qt.Key.Key_R, SHIFT)
    wait_idle(qtbot, widget)
    after = np.asarray(target.data)
    for q in (z - 1, z, z + 1):
        np.testing.assert_array_equal(after[q] == 1, stack.labels[q] == gt, err_msg=f"slice {q}")
    outside = [q for q in range(len(after)) if not z - 1 <= q <= z + 1]
    np.testing.assert_array_equal(after[outside], before[outside])
    assert f"up: to z={z + 1}, stopped at z={z + 2}: end of the chosen z-range" in widget.status
    assert f"down: to z={z - 1}, stopped at z={z - 2}: end of the chosen z-range" in widget.status
    assert "corrected by hand" not in widget.status
