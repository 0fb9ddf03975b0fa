"""The segmentation dock widget, driven as a user would: prompts through the layers, keys, buttons.

Most tests answer prompts with ``GroundTruthOracle`` (``_napari/oracle.py``) -- a stand-in for the
predictor that returns the synthetic stack's ground-truth object under the prompt, so that *where*
labels land can be checked exactly. It is not a model. The real engine path (model loading in a
worker, tiny random ``vit_t_test`` encoder, embedding cache, prefetch, decoder) is covered by the
``test_real_engine_*`` tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from napari_mobilesam._napari import prompt_layers as pl

# imported at collection time, before any viewer: also loads triton safely (see _preload.py)
from napari_mobilesam._napari import segment_widget as sw
from napari_mobilesam._napari.settings import (
    WidgetSettings,
    load_settings,
    save_settings,
    settings_path,
)
from napari_mobilesam.core.session import Session
from napari_mobilesam.models.choice import ModelChoice
from napari_mobilesam.testing import GroundTruthOracle

WAIT_MS = 60_000


def _open(make_napari_viewer, data, *, rgb=False, scale=None, translate=None, name="nuclei"):
    viewer = make_napari_viewer()
    kwargs = {}
    if scale is not None:
        kwargs["scale"] = scale
    if translate is not None:
        kwargs["translate"] = translate
    image = viewer.add_image(data, name=name, rgb=rgb, **kwargs)
    widget = sw.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment (MobileSAM)")
    return viewer, widget, image


def _with_oracle(widget, image, gt, delay=0.0):
    oracle = GroundTruthOracle(gt, np.asarray(image.data), rgb=bool(image.rgb), delay=delay)
    widget.set_session(Session(None, image.data, rgb=bool(image.rgb), predictor=oracle))
    return oracle


def _go_to(viewer, image, z):
    """Show image slice z (through world coordinates, so scale/translate count)."""
    viewer.dims.set_point(0, float(image.data_to_world([z, 0, 0])[0]))


def _press(viewer, key):
    """Press a key as the canvas would deliver it (viewer and active layer keymaps)."""
    handler = viewer.window._qt_viewer.canvas._key_map_handler
    handler.press_key(key)
    handler.release_key(key)


def _wait_idle(qtbot, widget, timeout=WAIT_MS):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


@dataclass
class _MouseEvent:
    """The fields of a vispy mouse event that napari's layer callbacks read."""

    type: str
    modifiers: list
    position: tuple  # world coordinates
    pos: np.ndarray = field(default_factory=lambda: np.zeros(2))  # canvas pixels
    is_dragging: bool = False
    view_direction: list | None = None
    up_direction: list | None = None
    dims_displayed: list = field(default_factory=lambda: [1, 2])
    handled: bool = False


def _nucleus(stack, index=0):
    """(z, row, col) of a voxel at the centre of nucleus ``index`` and its label id."""
    z, r, c = (int(round(v)) for v in stack.centers[index])
    label = int(stack.labels[z, r, c])
    assert label, "the centre of a nucleus lies inside it"
    return z, r, c, label


# --------------------------------------------------------------------------- no viewer needed
def test_settings_roundtrip_and_bad_file(tmp_path):
    path = settings_path()
    assert str(path).startswith(str(tmp_path))
    assert load_settings() == WidgetSettings()  # missing file: defaults
    save_settings(WidgetSettings("checkpoint", "/data/student.pt", "cpu"))
    assert load_settings() == WidgetSettings("checkpoint", "/data/student.pt", "cpu")
    path.write_text("{not json")
    assert load_settings() == WidgetSettings()
    path.write_text(json.dumps({"model": "vit_t", "device": 3, "unknown": "x"}))
    assert load_settings() == WidgetSettings("vit_t", "", "auto")


def test_model_choices_hide_dev_model_unless_asked(monkeypatch):
    from napari_mobilesam._napari.settings import model_choices

    assert "vit_t_test" not in model_choices()
    monkeypatch.setenv("NAPARI_MOBILESAM_DEV", "1")
    assert "vit_t_test" in model_choices()


def test_layer_helpers_respect_scale_translate_and_keep_existing():
    from napari.layers import Image, Labels

    image = Image(np.zeros((5, 40, 50)), scale=(2.0, 0.5, 0.5), translate=(10.0, 3.0, -4.0))
    points = pl.make_points_layer(image)
    boxes = pl.make_boxes_layer(image)
    # a point given in world coordinates ends up at the right image pixel
    world = image.data_to_world([3, 20, 30])
    points.add(points.world_to_data(world))
    points.feature_defaults["positive"] = False
    points.add(points.world_to_data(image.data_to_world([3, 5, 5])))
    points.add(points.world_to_data(image.data_to_world([1, 5, 5])))
    boxes.add_rectangles(np.array([[3, 2, 4], [3, 2, 14], [3, 12, 14], [3, 12, 4]], float))
    prompts = pl.layer_prompts(image, points, boxes)  # the engine's prompt types
    p = pl.slice_prompt(prompts, 3)
    np.testing.assert_allclose(p.points, [[20, 30], [5, 5]], atol=1e-6)
    assert p.labels.tolist() == [1, 0]
    np.testing.assert_allclose(p.box, [2, 4, 12, 14])
    assert pl.slice_prompt(prompts, 2) is None
    assert list(pl.negative_only_slices(pl.object_prompts(prompts))) == [1]

    labels = pl.make_target_layer(image)
    assert labels.data.shape == (5, 40, 50) and labels.data.dtype == np.uint32
    labels.data[2, :10, :10] = 9  # drawn by the user before
    mask = np.zeros((40, 50), bool)
    mask[5:15, 5:15] = True
    assert pl.write_slice_labels(labels, 2, mask) == [10]
    assert (labels.data[2, :10, :10] == 9).all(), "keep_existing must not paint over labels"
    assert (labels.data[2][mask & (np.arange(40)[:, None] >= 10)] == 10).all()
    labels.undo()
    assert set(np.unique(labels.data)) == {0, 9}
    # a fixed id extends a label; a volume write is one undo step
    vol = np.zeros((5, 40, 50), np.uint16)
    vol[0:4, 20:25, 20:25] = 1
    assert pl.write_volume_labels(labels, vol, label=9) == [9]
    assert (labels.data[0:4, 20:25, 20:25] == 9).all()
    labels.undo()
    assert not (labels.data[0:4, 20:25, 20:25]).any()
    with pytest.raises(ValueError, match="same shape"):
        pl.check_target_layer(Labels(np.zeros((5, 40, 49), np.uint8)), image)
    with pytest.raises(ValueError, match="spatial dimensions"):
        pl.image_geometry(Image(np.zeros((2, 3, 20, 20))))


# --------------------------------------------------------------------------- GUI
def test_widget_opens_from_manifest_creates_layers_and_binds_keys(make_napari_viewer, stack):
    viewer = make_napari_viewer()
    viewer.add_image(stack.image, name="nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    assert isinstance(widget, sw.SegmentWidget)
    assert widget.image_layer is viewer.layers["nuclei"]
    points, boxes, preview = widget.points_layer, widget.boxes_layer, widget.preview_layer
    for layer in (points, boxes, preview):
        assert layer in viewer.layers
    assert points.mode == "add" and viewer.layers.selection.active is points
    assert preview.data.shape == (1, 128, 128)
    from napari.utils.key_bindings import coerce_keybinding

    for key in sw.KEYS:
        assert coerce_keybinding(key) in viewer.keymap, key
    assert "Shift" in widget._hint.value and "N" in widget._hint.value


def test_click_preview_commit_and_undo(make_napari_viewer, qtbot, stack):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    _with_oracle(widget, image, stack.labels)
    z, r, c, gt_id = _nucleus(stack, 0)
    _go_to(viewer, image, z)
    widget.points_layer.add([z, r, c])  # what a click in add mode does
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    np.testing.assert_array_equal(widget.preview_layer.data[0] > 0, stack.labels[z] == gt_id)

    _press(viewer, "C")
    target = widget.target_layer(create=False)
    assert target is not None and target.data.shape == stack.labels.shape
    assert set(np.unique(target.data)) == {0, 1}
    np.testing.assert_array_equal(target.data[z] == 1, stack.labels[z] == gt_id)
    assert not target.data[np.arange(12) != z].any(), "commit writes only the current slice"
    assert len(widget.points_layer.data) == 0 and not widget.preview_layer.data.any()

    z2, r2, c2, gt2 = _nucleus(stack, 1)
    _go_to(viewer, image, z2)
    widget.points_layer.add([z2, r2, c2])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    widget._commit_btn.clicked.emit()
    assert 2 in target.data[z2] and set(np.unique(target.data)) == {0, 1, 2}
    target.undo()
    assert set(np.unique(target.data)) == {0, 1}
    target.undo()
    assert not target.data.any()


def test_modified_click_is_negative_and_toggle_key(make_napari_viewer, qtbot, stack):
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    viewer, widget, image = _open(make_napari_viewer, stack.image)
    _with_oracle(widget, image, stack.labels)
    points = widget.points_layer
    z, r, c, gt_id = _nucleus(stack, 2)
    _go_to(viewer, image, z)

    def click(pos, modifiers=()):
        """A press and release at world position ``pos`` with the canvas' event fields."""
        for kind, callbacks in (("mouse_press", mouse_press_callbacks), ("mouse_release", mouse_release_callbacks)):
            event = _MouseEvent(kind, list(modifiers), tuple(float(v) for v in pos))
            callbacks(points, ReadOnlyWrapper(event, exceptions=("handled",)))

    click(image.data_to_world([z, r, c]))
    click(image.data_to_world([z, 5, 5]), modifiers=["Shift"])
    click(image.data_to_world([z, 6, 6]), modifiers=["Control"])
    assert points.features["positive"].tolist() == [True, False, False]
    colors = points.face_color
    assert not np.allclose(colors[0], colors[1]) and np.allclose(colors[1], colors[2])
    _press(viewer, "N")
    click(image.data_to_world([z, 7, 7]))
    click(image.data_to_world([z, r, c + 1]), modifiers=["Shift"])
    assert points.features["positive"].tolist() == [True, False, False, False, True]
    # a negative point on the object removes it (oracle rule); the widget forwards both signs
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    points.feature_defaults["positive"] = False
    points.add([z, r, c])
    qtbot.waitUntil(lambda: not widget.preview_layer.data.any(), timeout=5000)


def test_box_prompt_and_clear_key(make_napari_viewer, qtbot, stack):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    _with_oracle(widget, image, stack.labels)
    z, r, c, gt_id = _nucleus(stack, 3)
    rows, cols = np.nonzero(stack.labels[z] == gt_id)
    _go_to(viewer, image, z)
    widget.points_layer.add([z + 2 if z + 2 < 12 else z - 2, 5, 5])  # a prompt on another slice
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    widget.boxes_layer.add_rectangles(np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], float))
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    np.testing.assert_array_equal(widget.preview_layer.data[0] > 0, stack.labels[z] == gt_id)
    _press(viewer, "Shift-C")
    assert len(widget.boxes_layer.data) == 0 and not widget.preview_layer.data.any()
    assert len(widget.points_layer.data) == 1, "clear drops the prompts of the current slice only"


def test_scale_and_translate_are_respected(make_napari_viewer, qtbot, stack):
    viewer, widget, image = _open(
        make_napari_viewer, stack.image, scale=(2.5, 0.4, 0.4), translate=(-7.0, 12.0, 3.0)
    )
    _with_oracle(widget, image, stack.labels)
    z, r, c, gt_id = _nucleus(stack, 4)
    _go_to(viewer, image, z)
    assert widget.current_z() == z
    points = widget.points_layer
    points.add(points.world_to_data(image.data_to_world([z, r, c])))
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    preview = widget.preview_layer
    np.testing.assert_allclose(preview.data_to_world([0, r, c]), image.data_to_world([z, r, c]))
    widget.commit()
    target = widget.target_layer(create=False)
    np.testing.assert_allclose(target.scale, image.scale)
    np.testing.assert_allclose(target.translate, image.translate)
    np.testing.assert_array_equal(target.data[z] > 0, stack.labels[z] == gt_id)


def test_propagate_key_writes_one_undo_step_and_reports_stops(make_napari_viewer, qtbot, stack):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    _with_oracle(widget, image, stack.labels)
    z, r, c, gt_id = _nucleus(stack, 0)
    _go_to(viewer, image, z)
    widget.points_layer.add([z, r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    _press(viewer, "Shift-S")
    _wait_idle(qtbot, widget)
    target = widget.target_layer(create=False)
    expected = stack.labels == gt_id
    np.testing.assert_array_equal(target.data > 0, expected)
    assert "mask vanished" in widget.status or "end of the stack" in widget.status, widget.status
    stops = widget.last_propagation.stops
    assert {s.direction for s in stops} == {1, -1}
    target.undo()
    assert not target.data.any(), "the whole propagation is one undo step"


def test_propagate_seeds_from_every_prompted_slice(make_napari_viewer, qtbot, stack):
    """Prompts of the object on other slices are seeds too; the gap between seeds is filled."""
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    _with_oracle(widget, image, stack.labels)
    z, r, c, gt_id = _nucleus(stack, 0)
    obj = stack.labels == gt_id
    zs = np.flatnonzero(obj.any(axis=(1, 2)))
    lo, hi = int(zs.min()), int(zs.max())
    assert hi - lo >= 4, "the test object spans several slices"

    def centre(zz):
        rr, cc = np.nonzero(obj[zz])
        return [zz, float(np.median(rr)), float(np.median(cc))]

    widget.points_layer.add(centre(lo + 1))  # a seed near the bottom, left uncommitted
    widget.points_layer.add([hi, 0, 0])  # a positive point off the object, above it: a 3rd seed
    widget.points_layer.feature_defaults["positive"] = False
    widget.points_layer.add([lo, 0, 0])  # a wall: negative points only
    widget.points_layer.feature_defaults["positive"] = True
    _go_to(viewer, image, hi - 1)
    widget.points_layer.add(centre(hi - 1))
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    widget.propagate()
    _wait_idle(qtbot, widget)
    result = widget.last_propagation
    seeds = sorted(rec.z for rec in result.records if rec.direction == 0)
    assert seeds == [lo + 1, hi - 1, hi], seeds
    target = widget.target_layer(create=False)
    written = np.asarray(target.data) > 0
    for zz in range(lo + 1, hi):  # from seed to seed, both ends filled
        np.testing.assert_array_equal(written[zz], obj[zz], err_msg=f"z={zz}")
    assert not written[lo].any(), "the negative-only slice is a wall"
    assert f"slices {lo + 1}, {hi - 1}, {hi}" in widget.status
    # the seeds' prompts are used up; the wall stays
    left = np.round(np.asarray(widget.points_layer.data)[:, 0]).astype(int).tolist()
    assert left == [lo]


def test_propagate_limited_to_z_range_and_negative_slice(make_napari_viewer, qtbot, stack):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    _with_oracle(widget, image, stack.labels)
    z, r, c, gt_id = _nucleus(stack, 0)
    zs = np.flatnonzero((stack.labels == gt_id).any(axis=(1, 2)))
    assert zs.min() < z - 1 and zs.max() > z + 1, "the test object spans several slices"
    widget._limit_z.value = True
    widget._z_from.value = z - 1
    widget._z_to.value = 11
    # a negative-only point two slices up marks a wall
    widget.points_layer.feature_defaults["positive"] = False
    widget.points_layer.add([z + 2, 0, 0])
    widget.points_layer.feature_defaults["positive"] = True
    _go_to(viewer, image, z)
    widget.points_layer.add([z, r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    widget._propagate_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    target = widget.target_layer(create=False)
    written = np.flatnonzero(target.data.any(axis=(1, 2)))
    assert written.tolist() == [z - 1, z, z + 1]
    assert "z-range" in widget.status and "negative points" in widget.status


def _slow_propagation_started(make_napari_viewer, qtbot, stack):
    """A propagation from nucleus 0's slice with a slow oracle (0.3 s a slice), 3 decoder calls
    in (the seed and both neighbours). Returns (viewer, widget, image, task, oracle, z, id)."""
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    oracle = _with_oracle(widget, image, stack.labels, delay=0.3)
    z, r, c, gt_id = _nucleus(stack, 0)
    _go_to(viewer, image, z)
    widget.points_layer.add([z, r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    assert not widget._stop_btn.enabled and not widget._cancel_btn.enabled  # only while running
    task = widget.propagate()
    assert task is not None and widget._stop_btn.enabled and widget._cancel_btn.enabled
    qtbot.waitUntil(lambda: oracle.calls >= 3, timeout=10_000)
    return viewer, widget, image, task, oracle, z, gt_id


def _slow_propagation_ended_by(button_name, make_napari_viewer, qtbot, stack):
    """`_slow_propagation_started`, then the widget's button ``button_name`` pressed and the
    widget idle again. Returns (widget, task, oracle, z, id)."""
    _, widget, _, task, oracle, z, gt_id = _slow_propagation_started(make_napari_viewer, qtbot, stack)
    getattr(widget, button_name).clicked.emit()
    _wait_idle(qtbot, widget, timeout=10_000)
    assert not widget._stop_btn.enabled and not widget._cancel_btn.enabled
    return widget, task, oracle, z, gt_id


def test_cancel_stops_propagation_and_writes_nothing(make_napari_viewer, qtbot, stack):
    widget, task, oracle, _z, _id = _slow_propagation_ended_by("_cancel_btn", make_napari_viewer, qtbot, stack)
    assert task.cancelled
    assert oracle.calls < 10, "propagation went on after cancel"
    target = widget.target_layer(create=False)
    assert target is None or not target.data.any()
    assert "Cancelled" in widget.status
    assert len(widget.points_layer.data) == 1, "a cancelled propagation keeps the prompts"


def test_stop_ends_propagation_and_keeps_the_slices_done(make_napari_viewer, qtbot, stack):
    widget, task, oracle, z, gt_id = _slow_propagation_ended_by("_stop_btn", make_napari_viewer, qtbot, stack)
    assert not task.cancelled
    result = widget.last_propagation
    assert result is not None and result.cancelled
    done = sorted({rec.z for rec in result.records if rec.accepted})
    target = widget.target_layer(create=False)
    written = sorted(set(np.nonzero(np.asarray(target.data))[0].tolist()))
    # what was done is written (the seed slice at least), and the run did not go on to the end
    assert z in written and written == done
    full_extent = sorted(set(np.nonzero(stack.labels == gt_id)[0].tolist()))
    assert len(written) < len(full_extent)
    assert oracle.calls < 10, "propagation went on after Stop"
    assert "Stopped propagating" in widget.status and "Stop button" in widget.status
    target.undo()  # one undo step removes it all
    assert not np.asarray(target.data).any()


def test_running_propagation_shows_its_progress_on_the_slice_in_view(make_napari_viewer, qtbot, stack):
    viewer, widget, image, _task, _oracle, z, gt_id = _slow_propagation_started(make_napari_viewer, qtbot, stack)
    _go_to(viewer, image, z + 1)  # a slice without prompts, already done by the worker
    expected = stack.labels[z + 1] == gt_id

    def shows_slice_above():
        shown = np.asarray(widget.preview_layer.data)[0] > 0
        return widget._preview_kind == "live" and np.array_equal(shown, expected)

    qtbot.waitUntil(shows_slice_above, timeout=5000)
    assert widget.busy, "shown while the propagation still runs"
    widget._cancel_btn.clicked.emit()
    _wait_idle(qtbot, widget, timeout=10_000)
    assert widget._preview_kind is None and not widget.preview_layer.data.any()
    target = widget.target_layer(create=False)
    assert target is None or not target.data.any()  # cancelled: the live view was not written


def test_propagate_selected_label_of_a_labels_layer(make_napari_viewer, qtbot, stack):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    _with_oracle(widget, image, stack.labels)
    z, r, c, gt_id = _nucleus(stack, 1)
    drawn = np.zeros(stack.labels.shape, np.uint16)
    drawn[z][stack.labels[z] == gt_id] = 7
    drawn[0, :3, :3] = 3  # another label that must stay
    user = viewer.add_labels(drawn, name="my labels")
    widget.reset_choices()
    widget._target_combo.value = user
    user.selected_label = 7
    widget._propagate_label_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    np.testing.assert_array_equal(user.data == 7, stack.labels == gt_id)
    assert (user.data[0, :3, :3] == 3).all()
    user.undo()
    np.testing.assert_array_equal(user.data, drawn)


def test_segment_slice_automatically_then_commit(make_napari_viewer, qtbot, stack):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    _with_oracle(widget, image, stack.labels)
    z = int(round(stack.centers[0][0]))
    _go_to(viewer, image, z)
    widget._auto_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    preview = widget.preview_layer.data[0]
    gt_ids = [i for i in np.unique(stack.labels[z]) if i]
    found = [i for i in np.unique(preview) if i]
    assert len(found) >= max(1, len(gt_ids) - 1), (found, gt_ids)
    # every previewed object is (mostly) one ground-truth object
    for i in found:
        ids, counts = np.unique(stack.labels[z][preview == i], return_counts=True)
        assert ids[np.argmax(counts)] != 0
    ids = widget.commit()
    assert len(ids) == len(found)
    target = widget.target_layer(create=False)
    assert len(np.unique(target.data[z])) - 1 == len(found)


def test_2d_rgb_image(make_napari_viewer, qtbot, stack):
    z, r, c, gt_id = _nucleus(stack, 0)
    gray = (stack.image[z] / stack.image[z].max() * 255).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    viewer, widget, image = _open(make_napari_viewer, rgb, rgb=True, name="rgb")
    _with_oracle(widget, image, stack.labels[z])
    assert widget.preview_layer.data.shape == (128, 128)
    widget.points_layer.add([r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    widget.commit()
    target = widget.target_layer(create=False)
    assert target.data.shape == (128, 128)
    np.testing.assert_array_equal(target.data > 0, stack.labels[z] == gt_id)
    assert not widget._propagate_btn.enabled


def test_errors_are_notifications_not_crashes(make_napari_viewer, qtbot, stack, monkeypatch):
    messages = []
    monkeypatch.setattr(sw, "show_error", messages.append)
    monkeypatch.setattr(sw, "show_warning", messages.append)
    monkeypatch.setattr(sw, "show_info", messages.append)
    viewer = make_napari_viewer()
    widget = sw.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.commit() == [] and widget.propagate() is None
    assert any("image" in m for m in messages)
    # an image the widget cannot segment
    viewer.add_image(np.zeros((2, 3, 32, 32)), name="4d")
    assert any("spatial dimensions" in m for m in messages)
    # a checkpoint that does not exist: notification, labels untouched
    image = viewer.add_image(stack.image, name="nuclei")
    widget._image_combo.value = image
    keep = viewer.add_labels(np.ones(stack.labels.shape, np.uint8), name="precious")
    widget.load_model(ModelChoice("checkpoint", "/nonexistent/student.pt", "cpu"))
    _wait_idle(qtbot, widget)
    assert any("checkpoint file not found" in m for m in messages), messages
    assert "failed" in widget._model_status.value
    assert keep.data.all()


def test_default_model_offline_gives_clear_notification(make_napari_viewer, qtbot, stack, monkeypatch):
    """The real weights code path with the network cut: the message says how to get the file."""
    import pooch
    import requests

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("network is unreachable")

    monkeypatch.setattr(pooch, "retrieve", offline)
    messages = []
    monkeypatch.setattr(sw, "show_error", messages.append)
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    widget.load_model(ModelChoice("vit_t", "", "cpu"))
    _wait_idle(qtbot, widget)
    assert messages and "mobile_sam.pt" in messages[-1] and "checkpoint" in messages[-1]
    assert widget.session is None


def test_settings_persist_across_widgets(make_napari_viewer, monkeypatch, stack, tmp_path):
    monkeypatch.setenv("NAPARI_MOBILESAM_DEV", "1")
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    ckpt = tmp_path / "student.pt"
    ckpt.write_bytes(b"")
    widget._model_combo.value = "distilled"
    widget._checkpoint.value = ckpt
    widget._device_combo.value = "cpu"
    assert load_settings() == WidgetSettings("distilled", str(ckpt), "cpu")
    again = sw.SegmentWidget(viewer)
    assert again.model_request() == ModelChoice("distilled", str(ckpt), "cpu")
    assert again._checkpoint.visible or not again.native.isVisible()


# --------------------------------------------------------------------------- the real engine
def test_real_engine_dev_model_loads_in_worker_and_commit_matches_preview(
    make_napari_viewer, qtbot, stack, monkeypatch
):
    """vit_t_test (random weights: arbitrary masks) through the real loader, cache and decoder."""
    monkeypatch.setenv("NAPARI_MOBILESAM_DEV", "1")
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    widget._model_combo.value = "vit_t_test"
    widget._device_combo.value = "cpu"
    z, r, c, _ = _nucleus(stack, 0)
    _go_to(viewer, image, z)
    widget.points_layer.add([z, r, c])  # no model yet: the click starts loading it
    # first load converts the encoder to OpenVINO (tens of seconds on a busy 2-core machine)
    _wait_idle(qtbot, widget, timeout=400_000)
    assert widget.session is not None and widget.session.cache is not None
    qtbot.waitUntil(lambda: widget.session.is_embedded(z), timeout=WAIT_MS)
    widget.update_preview()  # decoded in the preview thread (after the embedder has checked the slice)
    qtbot.waitUntil(lambda: not widget.busy and widget._prediction is not None, timeout=WAIT_MS)
    pred = widget._prediction
    assert pred.mask.shape == (128, 128)
    preview = widget.preview_layer.data[0].copy()
    np.testing.assert_array_equal(preview > 0, pred.mask)
    # vit_t_test's weights are seeded: this point gives a non-empty mask, so the commit is checked
    assert pred.mask.any(), "the seeded test model gave an empty mask: pick another point"
    widget.commit()
    target = widget.target_layer(create=False)
    np.testing.assert_array_equal(target.data[z] > 0, preview > 0)
    assert not target.data[np.arange(12) != z].any()


def test_real_engine_slice_change_embeds_in_background(make_napari_viewer, qtbot, stack, engine_sam_test):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    widget.set_model(engine_sam_test, ModelChoice("vit_t_test", "", "cpu"))
    _wait_idle(qtbot, widget)
    _go_to(viewer, image, 7)
    qtbot.waitUntil(lambda: widget.session.is_embedded(7), timeout=WAIT_MS)
    # then its neighbours are prefetched by the cache's background thread (9 is not a neighbour of
    # the slice shown when the model arrived: the middle one)
    qtbot.waitUntil(lambda: all(widget.session.is_embedded(z) for z in (6, 8, 9)), timeout=WAIT_MS)
    widget.points_layer.add([7, 64, 64])
    widget.update_preview()  # a cached slice: the worker finds it embedded, the preview thread decodes
    qtbot.waitUntil(lambda: widget._prediction is not None and widget._preview_z == 7, timeout=WAIT_MS)


def test_each_image_keeps_its_own_prompt_layers(make_napari_viewer, qtbot, stack):
    viewer, widget, first = _open(make_napari_viewer, stack.image)
    first_set = (widget.points_layer, widget.boxes_layer, widget.preview_layer)
    z, r, c, _ = _nucleus(stack, 0)
    second = viewer.add_image(stack.image[z], name="one slice")
    widget._image_combo.value = second
    assert widget.points_layer not in first_set and widget.points_layer.ndim == 2
    assert widget.preview_layer.data.shape == (128, 128)
    widget._image_combo.value = first
    assert (widget.points_layer, widget.boxes_layer, widget.preview_layer) == first_set
    # a deleted prompt layer comes back
    viewer.layers.remove(widget.points_layer)
    widget._image_combo.value = second
    widget._image_combo.value = first
    assert widget.points_layer in viewer.layers and widget.points_layer is not first_set[0]


def test_picking_another_image_rebuilds_the_canvas_scene_once(make_napari_viewer, qtbot, stack):
    """Swapping the helper layers (three out, three in) is one batched layer-list update: napari's
    canvas rebuilds its scene graph, with a full garbage collection each time, once per pick
    instead of once per removed layer (0.3-1 s each in a process with many objects)."""
    viewer, widget, first = _open(make_napari_viewer, stack.image)
    second = viewer.add_image(stack.image[0], name="one slice")
    canvas = viewer.window._qt_viewer.canvas
    rebuilds = []
    original = canvas._clean_and_update_scenegraph

    def counted():
        rebuilds.append(1)
        original()

    canvas._clean_and_update_scenegraph = counted
    for image, n in ((second, 1), (first, 2), (second, 3)):
        widget._image_combo.value = image
        assert len(rebuilds) == n, (image.name, len(rebuilds))
    # two images, the current one's three helpers and the empty labels layer made for it
    assert len(viewer.layers) == 2 + 3 + 1 and widget.points_layer in viewer.layers


def test_opening_the_widget_after_opengl_does_not_crash_torch_imports(qtbot):
    """napari's GL context first, then our widget, then torch._dynamo (triton): must not segfault.

    Without ``_preload.preload_triton`` this crashes on Mesa's llvmpipe (two LLVMs in one process).
    Runs in a child process on the Xvfb display pytest-xvfb provides.
    """
    import os
    import subprocess
    import sys

    code = (
        "import napari, numpy as np\n"
        "from qtpy.QtWidgets import QApplication\n"
        "v = napari.Viewer(show=True)\n"
        "v.add_image(np.zeros((8, 8)))\n"
        "QApplication.processEvents()\n"
        "import napari_mobilesam._napari.segment_widget\n"
        "import torch._dynamo, segment_anything\n"
        "print('alive')\n"
        "v.close()\n"
    )
    assert os.environ.get("DISPLAY"), "needs the Xvfb display"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "alive" in out.stdout, out.stderr[-2000:]


def test_out_of_memory_is_a_notification_and_keeps_labels(make_napari_viewer, qtbot, stack, monkeypatch):
    messages = []
    monkeypatch.setattr(sw, "show_error", messages.append)
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    oracle = _with_oracle(widget, image, stack.labels)
    z, r, c, gt_id = _nucleus(stack, 0)
    _go_to(viewer, image, z)
    widget.points_layer.add([z, r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    widget.commit()
    target = widget.target_layer(create=False)
    before = target.data.copy()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CPU out of memory: tried to allocate 4 GiB")

    monkeypatch.setattr(oracle, "predict", out_of_memory)
    monkeypatch.setattr(oracle, "predict_many", out_of_memory)
    z2, r2, c2, _ = _nucleus(stack, 1)
    _go_to(viewer, image, z2)
    widget.points_layer.add([z2, r2, c2])  # the preview fails on the GUI thread
    widget.segment_slice_automatically()  # and in a worker
    _wait_idle(qtbot, widget)
    assert len(messages) >= 2 and all("Out of memory" in m for m in messages), messages
    np.testing.assert_array_equal(target.data, before)


def test_closing_the_widget_releases_keys_and_viewer_events(make_napari_viewer, qtbot, stack):
    from napari.utils.key_bindings import coerce_keybinding

    viewer, widget, image = _open(make_napari_viewer, stack.image)
    viewer.window.remove_dock_widget(widget.native)
    widget.native.deleteLater()
    qtbot.waitUntil(lambda: coerce_keybinding("C") not in viewer.keymap, timeout=5000)
    viewer.dims.set_point(0, 3.0)  # no callback into the deleted widget
    viewer.add_image(stack.image[0], name="later")
    qtbot.wait(300)


def test_use_model_chooses_remembers_and_loads(make_napari_viewer, qtbot, stack, monkeypatch, tmp_path):
    """What the distillation panel calls when a distilled model is ready."""
    messages = []
    monkeypatch.setattr(sw, "show_error", messages.append)
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    missing = str(tmp_path / "student.pt")
    task = widget.use_model("distilled", missing)
    assert task is not None
    assert widget.model_request() == ModelChoice("distilled", missing, "auto")
    assert load_settings() == WidgetSettings("distilled", missing, "auto")
    _wait_idle(qtbot, widget)
    assert any("checkpoint file not found" in m for m in messages), messages
    with pytest.raises(ValueError, match="unknown model"):
        widget.use_model("vit_z", "")


def test_widget_opened_before_any_image_picks_up_the_first_one(make_napari_viewer, stack):
    viewer = make_napari_viewer()
    widget = sw.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.image_layer is None and "image" in widget.status
    image = viewer.add_image(stack.image, name="late")
    assert widget.image_layer is image
    assert widget.points_layer in viewer.layers and widget.preview_layer.data.shape == (1, 128, 128)


def test_real_engine_rapid_slice_changes_end_on_the_last_slice(make_napari_viewer, qtbot, stack, engine_sam_test):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    widget.set_model(engine_sam_test, ModelChoice("vit_t_test", "", "cpu"))
    widget.points_layer.add([10, 64, 64])  # a prompt waiting on slice 10
    for z in (2, 5, 8, 10):  # faster than the encoder
        _go_to(viewer, image, z)
        qtbot.wait(30)
    qtbot.waitUntil(lambda: widget.session.is_embedded(10) and not widget.busy, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget._preview_z == 10 and widget._prediction is not None, timeout=WAIT_MS)
    assert widget.current_z() == 10
