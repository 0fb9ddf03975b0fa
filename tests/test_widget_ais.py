"""micro-sam models and automatic instance segmentation (AIS) in the Segment widget.

Buttons are clicked as a user does (``QTest`` on the native Qt buttons), keys go to the canvas.
Most tests segment with ``fake_ais_model()`` (``tests/fake_ais.py``): the real AIS path (micro-sam's input conversion, the
model's encoder call, the decoder call, cropping and resizing the maps, the seeded watershed, the
z-stitching, the widget) around a STAND-IN network, ``PoolingFakeEncoder`` + ``BrightBlobsFakeDecoder``
(NOT a model: the "embedding" is the image average-pooled, the "foreground" is where it is bright),
because the real decoder costs tens of seconds per slice on the test machine. The real path with
micro-sam's file layouts (the parity fixture's random weights) is tested once, through the model menu.
"""

from __future__ import annotations

import numpy as np
import pytest
from fake_ais import fake_ais_model
from qtpy.QtCore import Qt
from qtpy.QtTest import QTest
from test_user_flow import go_to, key, wait_idle

from napari_mobilesam._napari import segment_widget as sw
from napari_mobilesam._napari.settings import (
    MODEL_CHOICES,
    WidgetSettings,
    load_settings,
)
from napari_mobilesam.core.session import Session
from napari_mobilesam.models.choice import ModelChoice
from napari_mobilesam.testing import GroundTruthOracle

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def fake_sam():
    return fake_ais_model()


def _open(make_napari_viewer, data, name="nuclei"):
    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(data, name=name)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    return viewer, widget, image


def _click(button) -> None:
    """A real click: QTest's mouse click on a push button, Qt's click() on a check box (whose
    clickable area is its box and text, not the middle of the row)."""
    if hasattr(button.native, "isChecked") and button.native.isCheckable():
        button.native.click()
    else:
        QTest.mouseClick(button.native, Qt.MouseButton.LeftButton)


def _shown(w) -> bool:
    return not w.native.isHidden()


# --------------------------------------------------------------------------- model menu
def test_model_menu_offers_microsam_models_and_remembers_a_microsam_file(make_napari_viewer, stack, tmp_path):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    labels = {key: label for label, key in widget._model._choices()}
    for name in ("vit_t_lm", "vit_t_em_organelles", "vit_b_lm", "vit_b_em_organelles"):
        assert name in labels and name in labels[name], labels
    assert "light microscopy" in labels["vit_t_lm"] and "electron microscopy" in labels["vit_t_em_organelles"]
    assert all("slower" in labels[n] for n in ("vit_b_lm", "vit_b_em_organelles"))
    # a registry model: no file fields; it loads by name
    widget._model_combo.value = "vit_t_em_organelles"
    assert not _shown(widget._checkpoint) and not _shown(widget._decoder)
    assert widget.model_request() == ModelChoice("vit_t_em_organelles", "", "auto")
    # a micro-sam file: checkpoint and decoder fields; MobileSAM's file choice has no decoder field
    widget._model_combo.value = "checkpoint"
    assert _shown(widget._checkpoint) and not _shown(widget._decoder)
    model, decoder = tmp_path / "mine.pt", tmp_path / "mine_decoder.pt"
    widget._model_combo.value = "microsam_file"
    assert _shown(widget._checkpoint) and _shown(widget._decoder)
    widget._checkpoint.value = model
    widget._decoder.value = decoder
    widget._device_combo.value = "cpu"
    want = ModelChoice("checkpoint", str(model), "cpu", decoder=str(decoder))
    assert widget.model_request() == want
    assert load_settings() == WidgetSettings("microsam_file", str(model), "cpu", str(decoder))
    # a new widget (napari restarted) shows the same choice
    again = sw.SegmentWidget(viewer)
    assert again._model_combo.value == "microsam_file" and again.model_request() == want
    assert not again._decoder.native.isHidden()
    assert set(MODEL_CHOICES) <= {key for _label, key in again._model._choices()}
    again.close_widget()  # never docked: nothing else closes it (it holds gil_share until then)


def test_microsam_model_offline_says_what_to_do_in_the_widget(make_napari_viewer, qtbot, stack, monkeypatch):
    """The real weights code path with the network cut."""
    import pooch
    import requests

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("network is unreachable")

    monkeypatch.setattr(pooch, "retrieve", offline)
    popups = []
    monkeypatch.setattr(sw, "show_error", popups.append)
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    widget._model_combo.value = "vit_t_lm"
    widget._device_combo.value = "cpu"
    _click(widget._model.load_btn)
    wait_idle(qtbot, widget, timeout=120_000)
    assert len(popups) == 1, popups
    message = popups[0]
    assert "vit_t_lm.pt" in message and "vit_t_lm_decoder.pt" in message and "offline" in message
    assert "micro-sam model file" in message and "'decoder'" in message
    assert "checkpoint=" not in message and len(message) < 600
    assert widget.session is None and "failed" in widget._model_status.value


# --------------------------------------------------------------------------- the AIS section
def test_ais_mode_and_parameters_follow_the_loaded_model(make_napari_viewer, qtbot, stack, fake_sam,
                                                        engine_sam_test):
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    panel = widget._auto_panel
    widget.set_model(engine_sam_test, ModelChoice("vit_t_test"))  # no decoder
    assert list(panel.mode.choices) == ["grid"] and panel.mode.value == "grid"
    assert not _shown(panel.mode_row) and not _shown(panel.ais_section)  # nothing to choose
    widget.set_model(fake_sam, ModelChoice("vit_t_test"))  # with a decoder: AIS is the default
    assert panel.mode.value == "ais" and "ais" in list(panel.mode.choices)
    assert "AIS decoder" in widget._model_status.value
    assert _shown(panel.mode_row) and _shown(panel.show_ais) and not _shown(panel.ais_section)
    _click(panel.show_ais)
    assert panel.show_ais.value and _shown(panel.ais_section)
    panel.mode.value = "grid"
    assert not _shown(panel.ais_section) and not _shown(panel.show_ais)
    panel.mode.value = "ais"
    widget.set_model(engine_sam_test, ModelChoice("vit_t_test"))  # back to a model without one
    assert panel.mode.value == "grid" and not _shown(panel.ais_section) and not _shown(panel.mode_row)


def test_ais_slice_button_previews_the_engine_labels_and_c_commits_all(make_napari_viewer, qtbot, stack, fake_sam):
    from napari_mobilesam.volume.ais import segment_slice_ais
    from napari_mobilesam.volume.instance import AISParams

    viewer, widget, image = _open(make_napari_viewer, stack.image)
    widget.set_model(fake_sam, ModelChoice("vit_t_test"))
    z = int(round(stack.centers[0][0]))
    go_to(viewer, image, z)
    qtbot.wait(300)
    _click(widget._auto_btn)
    wait_idle(qtbot, widget)
    preview = np.asarray(widget.preview_labels).copy()  # the layer draws their outlines
    expected = segment_slice_ais(fake_sam, stack.image[z], AISParams())
    np.testing.assert_array_equal(preview, expected)
    n = int(expected.max())
    assert n >= 2 and f"{n} objects found (AIS)" in widget.status
    # the stand-in follows the nuclei: most objects are mostly one nucleus
    mostly_nuclei = [np.bincount(stack.labels[z][preview == i]).argmax() != 0 for i in range(1, n + 1)]
    assert sum(mostly_nuclei) >= n / 2, mostly_nuclei
    # the panel's parameters reach the post-processing
    sizes = np.bincount(expected.ravel())[1:]
    panel = widget._auto_panel
    _click(panel.show_ais)
    panel.min_size.value = int(np.median(sizes)) + 1
    panel.foreground.value = 0.45
    _click(widget._auto_btn)
    wait_idle(qtbot, widget)
    params = AISParams(foreground_threshold=0.45, min_size=int(np.median(sizes)) + 1)
    smaller = segment_slice_ais(fake_sam, stack.image[z], params)
    np.testing.assert_array_equal(widget.preview_labels, smaller)
    assert 0 < smaller.max() < n
    # C commits every object, one undo step
    key(viewer, Qt.Key.Key_C)
    target = widget.target_layer(create=False)
    np.testing.assert_array_equal(target.data[z], smaller)
    target.undo()
    assert not target.data.any()


def test_apg_mode_chosen_in_the_panel_previews_the_engine_labels(make_napari_viewer, qtbot, stack, fake_sam,
                                                                 engine_sam_test, monkeypatch):
    from napari_mobilesam.volume import apg
    from napari_mobilesam.volume.apg import APGParams, segment_slice_apg

    calls = []  # a spy around the real function: which parameters the panel sent

    def spy(predictor, z, params=None, *args, **kw):
        calls.append(params)
        return segment_slice_apg(predictor, z, params, *args, **kw)

    monkeypatch.setattr(apg, "segment_slice_apg", spy)

    viewer, widget, image = _open(make_napari_viewer, stack.image)
    panel = widget._auto_panel
    widget.set_model(engine_sam_test, ModelChoice("vit_t_test"))
    assert "apg" not in list(panel.mode.choices)  # no decoder, no APG
    widget.set_model(fake_sam, ModelChoice("vit_t_test"))
    assert "apg" in list(panel.mode.choices)
    panel.mode.value = "apg"
    assert _shown(panel.show_ais)  # APG's seeds take the same thresholds
    _click(panel.show_ais)
    panel.min_size.value = 7
    z = int(round(stack.centers[0][0]))
    go_to(viewer, image, z)
    qtbot.wait(300)
    _click(widget._auto_btn)
    wait_idle(qtbot, widget)
    expected = segment_slice_apg(widget.session.predictor, z, APGParams(min_size=7))
    np.testing.assert_array_equal(widget.preview_labels, expected)
    assert "(APG)" in widget.status
    assert calls and calls[0].min_size == 7 and calls[0].foreground_threshold == panel.foreground.value


def test_stack_button_writes_stitched_ais_labels_as_one_undo_step_keeping_drawn_labels(
    make_napari_viewer, qtbot, fake_sam
):
    from napari_mobilesam.data import synthetic_nuclei
    from napari_mobilesam.volume.ais import segment_stack_ais

    small = synthetic_nuclei(shape=(4, 96, 96), n_nuclei=5, radius_range=(9, 12), z_radius_range=(2, 3), seed=3)
    viewer, widget, image = _open(make_napari_viewer, small.image)
    widget.set_model(fake_sam, ModelChoice("vit_t_test"))
    drawn = np.zeros(small.labels.shape, np.int32)
    drawn[1, :20, :20] = 7  # the user's own label, over whatever AIS finds there
    user = viewer.add_labels(drawn.copy(), name="mine")
    widget._c.target.value = user
    assert widget._c.keep_existing.value
    _click(widget._auto_stack_btn)
    wait_idle(qtbot, widget)
    stitched = np.stack(list(segment_stack_ais(fake_sam, small.image)))
    assert stitched.max() >= 2
    data = np.asarray(user.data)
    assert (data[1, :20, :20] == 7).all(), "a label drawn before was painted over"
    free = drawn == 0
    # the same objects as the engine's stitched stack, with new ids (the layer's next free ones)
    new = data[free & (stitched > 0)]
    assert (new > 7).all()
    pairs = set(zip(stitched[free & (stitched > 0)].tolist(), new.tolist()))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    assert not data[free & (stitched == 0)].any()
    assert "Segmented 4 slices" in widget.status and "one undo step" in widget.status
    user.undo()
    np.testing.assert_array_equal(user.data, drawn)


# --------------------------------------------------------------------------- stop and cancel
def _slow_grid_session(make_napari_viewer, qtbot, stack, delay=0.05):
    """The point-grid mode answered by GroundTruthOracle (a stand-in predictor, NOT a model), slow."""
    viewer, widget, image = _open(make_napari_viewer, stack.image)
    oracle = GroundTruthOracle(stack.labels, np.asarray(image.data), delay=delay)
    widget.set_session(Session(None, image.data, rgb=False, predictor=oracle))
    assert widget._auto_panel.mode.value == "grid"
    return viewer, widget, image, oracle


def test_stack_cancel_writes_nothing_and_stop_keeps_the_slices_done(make_napari_viewer, qtbot, stack):
    viewer, widget, image, oracle = _slow_grid_session(make_napari_viewer, qtbot, stack)
    target = widget.target_layer(create=True)
    _click(widget._auto_stack_btn)
    qtbot.waitUntil(lambda: widget._cancel_btn.enabled and widget._stop_btn.enabled, timeout=5000)
    qtbot.waitUntil(lambda: oracle.calls > 3, timeout=30_000)
    assert widget.status.startswith("Segmenting slices 0–11")
    qtbot.waitUntil(lambda: "1 of 12 slices done" in widget.status, timeout=60_000)  # progress in the widget
    _click(widget._cancel_btn)
    wait_idle(qtbot, widget)
    qtbot.wait(300)
    assert not target.data.any() and "nothing was written" in widget.status
    # again, limited to slices 2-9, and Stop part-way
    widget._limit_z.value = True
    widget._z_from.value, widget._z_to.value = 2, 9
    _click(widget._auto_stack_btn)
    runner = widget._annotator._runner
    qtbot.waitUntil(lambda: runner.live is not None and runner.live[2:10].any(), timeout=120_000)
    _click(widget._stop_btn)
    wait_idle(qtbot, widget)
    status = widget.status
    assert "Stopped after" in status and "of 8 slices" in status and "one undo step" in status, status
    n_done = int(status.split("Stopped after ")[1].split(" ")[0])
    assert 1 <= n_done < 8
    written = np.flatnonzero(np.asarray(target.data).any(axis=(1, 2)))
    assert written.size and written.min() >= 2 and written.max() < 2 + n_done, (written, n_done)
    # the slices written hold the stack's nuclei, one id per nucleus through z
    zs = list(range(2, 2 + n_done))
    for gt in np.unique(stack.labels[zs]):
        if gt:
            ids = np.unique(target.data[zs][stack.labels[zs] == gt])
            assert len(ids[ids > 0]) == 1, (gt, ids)
    target.undo()
    assert not target.data.any()


def test_stack_button_on_a_2d_image_says_so(make_napari_viewer, qtbot, stack, fake_sam):
    viewer, widget, image = _open(make_napari_viewer, stack.image[3], name="one slice")
    widget.set_model(fake_sam, ModelChoice("vit_t_test"))
    assert not widget._auto_stack_btn.enabled
    assert widget.segment_stack_automatically() is None and "2D" in widget.status


# --------------------------------------------------------------------------- the real path
@pytest.mark.slow
def test_real_microsam_file_through_the_menu_then_ais_matches_microsam(make_napari_viewer, qtbot, reference_dir):
    """micro-sam's files (random weights, micro-sam's layouts) chosen in the menu and loaded by the
    Load model button; AIS of the fixture image through the widget agrees with micro-sam's labels."""
    from test_microsam import n_instances, same_assignment

    from napari_mobilesam.models.registry import model_info

    msdir = reference_dir / "microsam"
    expected = np.load(msdir / "microsam_expected.npz")
    viewer, widget, image = _open(make_napari_viewer, expected["image"], name="fixture")
    widget._model_combo.value = "microsam_file"
    widget._checkpoint.value = msdir / "vit_t.pt"
    widget._decoder.value = msdir / "vit_t_decoder.pt"
    widget._device_combo.value = "cpu"
    _click(widget._model.load_btn)
    wait_idle(qtbot, widget, timeout=1_200_000)
    assert widget.session is not None and widget._auto_panel.mode.value == "ais", widget.status
    _click(widget._auto_btn)
    wait_idle(qtbot, widget, timeout=600_000)
    labels = np.asarray(widget.preview_labels)  # the objects (the layer draws their outlines)
    want = expected["ais/default"]
    agreement = same_assignment(labels, want)
    precision = model_info(widget.session.sam)["precision"]
    print(f"widget AIS ({precision}) vs micro-sam: {agreement:.5f} same assignment, "
          f"{n_instances(labels)} vs {n_instances(want)} instances")
    count_diff, n_want = abs(n_instances(labels) - n_instances(want)), n_instances(want)
    assert precision == "fp32"  # a model with an AIS decoder defaults to float32 (see precision_for)
    assert agreement >= 0.999 and count_diff <= max(1, 0.02 * n_want)  # the README's end-to-end limits
