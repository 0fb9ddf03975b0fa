"""Scribble prompts: a path drawn in the boxes layer is positive points along it."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt
from test_user_flow import (
    SHIFT,
    drag,
    go_to,
    key,
    look_at,
    open_session,
    wait_idle,
    wait_preview,
)

from napari_mobilesam._napari import prompt_layers as pl
from napari_mobilesam.io.prompts import PromptsError, scribble_points


def test_points_are_spread_evenly_along_the_path_ends_included():
    path = np.array([[4, 10, 10], [4, 10, 40], [4, 40, 40]], float)  # 60 px long, an L
    pts = scribble_points(path, max_points=7, step=10)
    assert pts.shape == (7, 3) and np.all(pts[:, 0] == 4)
    np.testing.assert_allclose(pts[0], [4, 10, 10])
    np.testing.assert_allclose(pts[-1], [4, 40, 40])
    np.testing.assert_allclose(pts[3], [4, 10, 40])  # half-way along the arc: the corner
    steps = np.abs(np.diff(pts[:, 1:], axis=0)).sum(axis=1)
    np.testing.assert_allclose(steps, 10.0)
    assert len(scribble_points(path, max_points=8, step=100)) == 2  # short for its step: the two ends
    assert len(scribble_points(path, max_points=3, step=1)) == 3  # long: capped
    np.testing.assert_allclose(scribble_points(np.array([[5.0, 6.0], [5.0, 6.0]])), [[5.0, 6.0]])
    two_d = scribble_points(np.array([[0.0, 0.0], [0.0, 24.0]]), step=12)
    np.testing.assert_allclose(two_d, [[0, 0], [0, 12], [0, 24]])
    with pytest.raises(PromptsError, match="not on one slice"):
        scribble_points(np.array([[1, 0, 0], [2, 5, 5]], float))
    with pytest.raises(PromptsError, match="vertices"):
        scribble_points(np.zeros((3, 4)))


def _scribble_across(viewer, widget, image, stack, label):
    """On the slice where nucleus ``label`` is largest: T in the boxes layer (napari's path tool)
    and a real drag across the middle of the nucleus. Returns (z, row, col0, col1) of the stroke."""
    z = int(np.argmax((stack.labels == label).sum(axis=(1, 2))))
    rows, cols = np.nonzero(stack.labels[z] == label)
    r, c = int(np.median(rows)), int(np.median(cols))
    half = max(2, (cols.max() - cols.min()) // 4)
    go_to(viewer, image, z)
    look_at(viewer, image, (z, r, c))
    viewer.layers.selection.active = widget.boxes_layer
    key(viewer, Qt.Key.Key_T)
    assert widget.boxes_layer.mode == "add_path"
    drag(viewer, image, (z, r, c - half), (z, r, c + half), steps=8)
    return z, r, c - half, c + half


@pytest.mark.gui
def test_a_scribble_drawn_with_the_mouse_previews_commits_and_propagates(make_napari_viewer, qtbot, stack):
    """A real drag across a nucleus with napari's path tool in the boxes layer: the preview is
    that nucleus (the GroundTruthOracle answers the points along the stroke); C commits it and
    removes the scribble; a scribble is a seed of propagation like a click."""
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    sizes = [(stack.labels == i).sum() for i in range(1, stack.labels.max() + 1)]
    label = int(np.argmax(sizes)) + 1
    boxes = widget.boxes_layer
    z, r0, c_from, c_to = _scribble_across(viewer, widget, image, stack, label)
    assert list(boxes.shape_type) == ["path"], list(boxes.shape_type)
    wait_preview(qtbot, widget)
    np.testing.assert_array_equal(widget.preview_layer.data[0] > 0, stack.labels[z] == label)
    prompt = pl.slice_prompt(pl.layer_prompts(image, widget.points_layer, boxes), z)
    assert len(prompt.points) >= 3 and set(np.asarray(prompt.labels).tolist()) == {1}
    assert np.all(np.abs(prompt.points[:, 0] - r0) <= 1.5), prompt.points  # (row, col) along the stroke
    assert prompt.points[:, 1].min() <= c_from + 1.5 and prompt.points[:, 1].max() >= c_to - 1.5
    key(viewer, Qt.Key.Key_C)
    target = widget.target_layer(create=False)
    np.testing.assert_array_equal(target.data[z] > 0, stack.labels[z] == label)
    assert len(boxes.data) == 0, "the committed slice's scribble is used up"

    # a scribble on another nucleus, then Shift-S: it seeds the propagation as clicks do
    other = next(i for i in range(1, stack.labels.max() + 1)
                 if i != label and (stack.labels == i).sum(axis=(1, 2)).astype(bool).sum() >= 3)
    z2, _r, _c0, _c1 = _scribble_across(viewer, widget, image, stack, other)
    wait_preview(qtbot, widget)
    key(viewer, Qt.Key.Key_S, SHIFT)
    wait_idle(qtbot, widget)
    new_id = int(target.data[z2][stack.labels[z2] == other].max())
    assert new_id not in (0, 1)
    for zz in np.flatnonzero((stack.labels == other).any(axis=(1, 2))):
        np.testing.assert_array_equal(target.data[zz] == new_id, stack.labels[zz] == other, err_msg=f"slice {zz}")
