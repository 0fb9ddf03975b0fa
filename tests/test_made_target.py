"""The Labels layer the Segment widget makes for an image's results (its *made target*).

It is made when the image is picked, so that neither the first commit nor a propagation has to
wait for napari to set up a new layer (0.15-0.4 s of GUI time on 2 cores). While empty it comes
and goes with the image's helper layers; once anything is written into it, it stays. Clicks and
keys are real Qt events on the canvas (helpers in ``test_user_flow.py``); prompts are answered
by ``GroundTruthOracle`` (a stand-in for the predictor, NOT a model).
"""

from __future__ import annotations

import numpy as np
from napari.layers import Labels
from qtpy.QtCore import Qt
from test_user_flow import (
    SHIFT,
    click,
    go_to,
    key,
    nucleus,
    open_session,
    wait_idle,
    wait_preview,
)

from napari_mobilesam.core.session import Session
from napari_mobilesam.testing import GroundTruthOracle


def _labels_layers(viewer) -> list:
    return [layer for layer in viewer.layers if isinstance(layer, Labels) and not layer.name.endswith("preview")]


def _count_inserts(viewer) -> list:
    inserted = []
    viewer.layers.events.inserted.connect(lambda event: inserted.append(event.value.name))
    return inserted


def _commit_at(viewer, qtbot, widget, image, zrc) -> None:
    """Show slice z, click (row, col) with the mouse, wait for the preview, press C."""
    z = zrc[0]
    go_to(viewer, image, z)
    qtbot.wait(200)
    click(viewer, image, list(zrc))
    wait_preview(qtbot, widget)
    key(viewer, Qt.Key.Key_C)


def test_the_image_pick_makes_the_target_so_commit_and_propagation_insert_no_layer(
    make_napari_viewer, qtbot, stack  # noqa: F811
):
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    target = widget.target_layer(create=False)
    assert target is not None and target.name == "nuclei labels" and target in viewer.layers
    assert widget._c.target.value is target
    assert viewer.layers.index(target) == viewer.layers.index(image) + 1
    assert viewer.layers.selection.active is widget.points_layer, "the prompts stay ready for clicks"
    inserted = _count_inserts(viewer)
    z, r, c, gt = nucleus(stack, 0)
    _commit_at(viewer, qtbot, widget, image, (z, r, c))
    assert (target.data[z] > 0).sum() == (stack.labels[z] == gt).sum()
    z2, r2, c2, gt2 = nucleus(stack, 1)
    go_to(viewer, image, z2)
    qtbot.wait(200)
    click(viewer, image, [z2, r2, c2])
    wait_preview(qtbot, widget)
    key(viewer, Qt.Key.Key_S, SHIFT)
    wait_idle(qtbot, widget)
    assert (target.data == 2).sum() == (stack.labels == gt2).sum()
    assert inserted == [], f"layers inserted while working: {inserted}"


def test_an_empty_target_goes_with_the_image_and_comes_back(make_napari_viewer, qtbot, stack):  # noqa: F811
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    first = widget.target_layer(create=False)
    other = viewer.add_image(stack.image[3], name="slice 3")
    widget._image_combo.value = other
    assert first not in viewer.layers, "an empty made layer goes with its image's helpers"
    second = widget.target_layer(create=False)
    assert second is not first and second.name == "slice 3 labels" and second.data.shape == stack.image.shape[1:]
    widget._image_combo.value = image
    assert widget.target_layer(create=False) is first and first in viewer.layers
    assert second not in viewer.layers
    assert [layer.name for layer in _labels_layers(viewer)] == ["nuclei labels"]


def test_a_target_with_labels_stays_and_each_image_commits_into_its_own(make_napari_viewer, qtbot, stack):  # noqa: F811
    """Two images of the same shape: before, the second image's commits went into the layer made
    for the first (it was still the widget's choice and fitted)."""
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    first = widget.target_layer(create=False)
    z, r, c, gt = nucleus(stack, 0)
    _commit_at(viewer, qtbot, widget, image, (z, r, c))
    twin = viewer.add_image(stack.image.copy(), name="twin")
    widget._image_combo.value = twin
    oracle = GroundTruthOracle(stack.labels, np.asarray(twin.data), rgb=False)
    widget.set_session(Session(None, twin.data, rgb=False, predictor=oracle))
    assert first in viewer.layers, "a layer holding labels stays when another image is picked"
    second = widget.target_layer(create=False)
    assert second is not first and second.name == "twin labels"
    written = first.data.copy()
    _commit_at(viewer, qtbot, widget, twin, (z, r, c))
    np.testing.assert_array_equal(first.data, written)
    assert ((second.data[z] > 0) == (stack.labels[z] == gt)).all()
    viewer.layers.remove(twin)
    qtbot.wait(100)
    assert second in viewer.layers, "the labels of a deleted image stay"


def test_the_users_brush_keeps_the_made_layer(make_napari_viewer, qtbot, stack):  # noqa: F811
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    made = widget.target_layer(create=False)
    made.paint((2, 20, 20), 5)  # what napari's brush calls
    other = viewer.add_image(stack.image[3], name="slice 3")
    widget._image_combo.value = other
    assert made in viewer.layers and made.data[2, 20, 20] == 5


def test_a_fitting_labels_layer_of_the_user_is_kept_and_no_layer_is_made(make_napari_viewer, qtbot, stack):  # noqa: F811
    viewer, _dock, widget, image, oracle = open_session(make_napari_viewer, qtbot, stack)
    made = widget.target_layer(create=False)
    mine = viewer.add_labels(np.zeros(stack.image.shape, np.uint16), name="mine")
    widget.reset_choices()
    widget._c.target.value = mine
    other = viewer.add_image(stack.image[3], name="slice 3")
    widget._image_combo.value = other  # "mine" does not fit a slice: that image gets its own
    assert widget.target_layer(create=False).name == "slice 3 labels"
    widget._c.target.value = mine
    inserted = _count_inserts(viewer)
    widget._image_combo.value = image
    assert widget._c.target.value is mine, "the user's choice fits this image: kept"
    assert made not in viewer.layers and not [n for n in inserted if n.endswith(" labels")], inserted
    widget.set_session(Session(None, image.data, rgb=False, predictor=oracle))  # (a model makes it itself)
    z, r, c, gt = nucleus(stack, 0)
    _commit_at(viewer, qtbot, widget, image, (z, r, c))
    assert ((mine.data[z] > 0) == (stack.labels[z] == gt)).all()


def test_a_deleted_made_layer_is_made_again_at_the_next_commit(make_napari_viewer, qtbot, stack):  # noqa: F811
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    made = widget.target_layer(create=False)
    viewer.layers.remove(made)
    qtbot.wait(100)
    assert made not in viewer.layers, "a made layer the user deletes is not forced back"
    z, r, c, gt = nucleus(stack, 0)
    _commit_at(viewer, qtbot, widget, image, (z, r, c))
    again = widget.target_layer(create=False)
    assert again is not made and again in viewer.layers
    assert ((again.data[z] > 0) == (stack.labels[z] == gt)).all()


def test_deleting_the_image_removes_its_empty_made_layer(make_napari_viewer, qtbot, stack):  # noqa: F811
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    made = widget.target_layer(create=False)
    viewer.layers.remove(image)
    qtbot.wait(100)
    assert made not in viewer.layers
    assert _labels_layers(viewer) == []


def test_a_big_image_gets_its_layer_at_the_first_commit(make_napari_viewer, qtbot, stack, monkeypatch):  # noqa: F811
    """Above ``MADE_AT_PICK_MAX_VOXELS`` (here lowered to below the test stack) the layer, a full
    uint32 array, is made only when the first object is committed."""
    from napari_mobilesam._napari import annotator

    monkeypatch.setattr(annotator, "MADE_AT_PICK_MAX_VOXELS", stack.image.size - 1)
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    assert widget.target_layer(create=False) is None and _labels_layers(viewer) == []
    z, r, c, gt = nucleus(stack, 0)
    _commit_at(viewer, qtbot, widget, image, (z, r, c))
    made = widget.target_layer(create=False)
    assert made.name == "nuclei labels" and ((made.data[z] > 0) == (stack.labels[z] == gt)).all()



def test_a_layer_that_cannot_be_made_at_the_pick_is_reported_at_the_commit(
    make_napari_viewer, qtbot, stack, monkeypatch  # noqa: F811
):
    """Out of memory when the pick makes the labels layer: the pick still works (prompts ready),
    and the commit, which tries again, says what went wrong; nothing is written."""
    from napari_mobilesam._napari import prompt_layers

    def no_memory(image, name=None):
        raise MemoryError("Unable to allocate 1.00 GiB for an array with shape (16, 128, 128)")

    monkeypatch.setattr(prompt_layers, "make_target_layer", no_memory)
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    assert widget.target_layer(create=False) is None and widget.points_layer in viewer.layers
    z, r, c, _gt = nucleus(stack, 0)
    _commit_at(viewer, qtbot, widget, image, (z, r, c))
    assert "memory" in widget.status.lower(), widget.status
    assert _labels_layers(viewer) == [] and widget.preview_layer.data.any(), "the object is still there to commit"
