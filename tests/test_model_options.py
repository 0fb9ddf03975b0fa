"""The advanced model options of the Segment widget (backend, precision, semantics, AIS decoder
precision): shown by the *advanced* box, set through the real controls, loaded into the model,
remembered in the settings file.

The models are the micro-sam fixture's files (random weights in micro-sam's layouts) chosen as a
*micro-sam model file*, loaded by the Load model button. The fast tests use the eager backend (no
OpenVINO conversion); one slow test converts for OpenVINO, which the AIS decoder precision needs.
"""

from __future__ import annotations

import json

import pytest
from qtpy.QtCore import Qt
from qtpy.QtTest import QTest
from test_user_flow import wait_idle

from napari_mobilesam._napari import segment_widget as sw
from napari_mobilesam._napari.settings import (
    WidgetSettings,
    load_settings,
    settings_path,
)
from napari_mobilesam.models.choice import ModelChoice
from napari_mobilesam.models.registry import ais_decoder, model_info

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _no_neighbour_prefetch(monkeypatch):
    """Each load embeds the slice in view and then prefetches its four neighbours: four more
    encoder passes per load (eager float32, seconds each at one thread) that these tests, about
    which options reach the model, do not look at, and that slowed the OpenVINO conversion
    running meanwhile. Prefetching is tested in test_segment_widget.py."""
    from napari_mobilesam._napari.embedder import SliceEmbedder

    monkeypatch.setattr(SliceEmbedder, "neighbours", staticmethod(lambda z: []))


def _open(make_napari_viewer, stack):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.add_image(stack.image, name="nuclei")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    return viewer, dock, widget


def _shown(w) -> bool:
    return not w.native.isHidden()


def _pick(combo, key: str) -> None:
    """Choose ``key`` in a combo box as a user does: the Qt combo box's item (shown with its label)
    becomes the current one."""
    native = combo.native
    index = next((i for i in range(native.count()) if native.itemData(i) == key), -1)
    assert index >= 0, (key, [native.itemText(i) for i in range(native.count())])
    native.setCurrentIndex(index)
    assert combo.value == key


def _toggle(box) -> None:
    box.native.click()  # Qt's click on a check box (its clickable area is the box and its text)


def _choose_fixture_file(widget, msdir) -> None:
    _pick(widget._model_combo, "microsam_file")
    widget._checkpoint.value = msdir / "vit_t.pt"
    widget._decoder.value = msdir / "vit_t_decoder.pt"
    _pick(widget._device_combo, "cpu")


def _fixture_with_options(make_napari_viewer, stack, msdir, backend: str, precision: str):
    """The widget with the fixture's micro-sam model file chosen, the advanced rows shown and
    ``backend`` / ``precision`` picked; (widget, its model panel)."""
    _, _, widget = _open(make_napari_viewer, stack)
    panel = widget._model
    _choose_fixture_file(widget, msdir)
    _toggle(panel.advanced)
    _pick(panel.backend, backend)
    _pick(panel.precision, precision)
    return widget, panel


def _load(qtbot, widget, timeout=300_000) -> None:
    QTest.mouseClick(widget._model.load_btn.native, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, widget, timeout=timeout)


def test_advanced_rows_hidden_until_asked_ais_row_only_for_decoder_models_dock_keeps_its_width(
        make_napari_viewer, qtbot, stack):
    viewer, dock, widget = _open(make_napari_viewer, stack)
    panel = widget._model
    qtbot.wait(300)
    width = dock.width()
    assert not panel.advanced.value
    assert not any(_shown(combo) for combo in panel.options)
    _toggle(panel.advanced)
    assert panel.advanced.value
    assert all(_shown(c) for c in (panel.backend, panel.precision, panel.semantics))
    assert not _shown(panel.ais_precision)  # MobileSAM has no AIS decoder
    for key, has_decoder in (("vit_t_lm", True), ("vit_b_em_organelles", True), ("checkpoint", False),
                             ("microsam_file", True), ("distilled", False), ("vit_t", False)):
        _pick(widget._model_combo, key)
        assert _shown(panel.ais_precision) == has_decoder, key
    _pick(widget._model_combo, "vit_t_lm")
    qtbot.wait(300)
    assert dock.width() <= width + 2, (width, dock.width())
    for combo in (*panel.options, panel.advanced):
        assert len(combo.tooltip or "") > 40, combo.label
    assert "micro-sam" in panel.semantics.tooltip and "published accuracy" in panel.semantics.tooltip
    assert "99" in panel.ais_precision.tooltip and "time" in panel.ais_precision.tooltip
    _toggle(panel.advanced)
    assert not any(_shown(combo) for combo in panel.options)


def test_options_chosen_in_the_widget_reach_the_loaded_model(make_napari_viewer, qtbot, stack, msdir,
                                                               monkeypatch):
    """Eager backend (no conversion): a value the engine refuses, then two loads with other
    semantics; each time the loaded model is checked, not only the request."""
    import torch

    popups = []
    monkeypatch.setattr(sw, "show_error", popups.append)
    widget, panel = _fixture_with_options(make_napari_viewer, stack, msdir, "eager", "bf16")
    # the engine refuses bf16 with the eager backend: its message in the status line
    _load(qtbot, widget)
    assert widget.session is None and "failed" in panel.status.value
    assert "eager backend is float32 only" in widget.status, widget.status
    assert len(popups) == 1 and "eager backend is float32 only" in popups[0]

    _pick(panel.precision, "fp32")
    _pick(panel.semantics, "standard")
    _pick(panel.ais_precision, "mixed")
    want = ModelChoice("checkpoint", str(msdir / "vit_t.pt"), "cpu", backend="eager", precision="fp32",
                       decoder=str(msdir / "vit_t_decoder.pt"), semantics="standard", ais_precision="mixed")
    assert widget.model_request() == want
    _load(qtbot, widget)
    sam = widget.session.sam
    info = model_info(sam)
    assert (info["backend"], info["precision"], info["semantics"]) == ("eager", "fp32", "standard")
    assert ais_decoder(sam).batchnorm == "running"  # standard: the decoder's running statistics
    biases = [p for n, p in sam.image_encoder.named_parameters() if n.endswith("attention_biases")]
    assert biases and any(bool(torch.any(p != 0)) for p in biases)  # the trained biases are used
    status = panel.status.value
    assert "options: eager, fp32, standard, AIS mixed" in status, status
    assert "AIS decoder in float32 (needs OpenVINO)" in status, status  # eager: no reduced precision

    # another semantics: the loaded model is kept until Load model
    _pick(panel.semantics, "microsam")
    assert "choice changed: Load model to switch" in panel.status.value
    assert widget.session.sam is sam
    _load(qtbot, widget)
    sam = widget.session.sam
    assert model_info(sam)["semantics"] == "microsam"
    assert ais_decoder(sam).batchnorm == "batch"  # micro-sam: each call's statistics
    biases = [p for n, p in sam.image_encoder.named_parameters() if n.endswith("attention_biases")]
    assert all(not bool(torch.any(p != 0)) for p in biases)
    assert len(popups) == 1


def test_options_are_remembered_and_old_or_bad_settings_files_still_load(make_napari_viewer, stack, msdir):
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # a file written before the options existed
    path.write_text(json.dumps({"model": "vit_t_lm", "checkpoint": "", "device": "cpu", "decoder": ""}))
    assert load_settings() == WidgetSettings("vit_t_lm", "", "cpu", "")
    viewer, dock, widget = _open(make_napari_viewer, stack)
    panel = widget._model
    assert widget.model_request() == ModelChoice("vit_t_lm", "", "cpu")
    assert not panel.advanced.value and not any(_shown(c) for c in panel.options)

    # set through the controls: written at once, a new widget (napari restarted) shows them
    _toggle(panel.advanced)
    _pick(panel.backend, "torch")
    _pick(panel.precision, "mixed")
    _pick(panel.semantics, "standard")
    _pick(panel.ais_precision, "bf16")
    assert load_settings() == WidgetSettings("vit_t_lm", "", "cpu", "", "torch", "mixed", "standard",
                                             "bf16", True)
    again = sw.SegmentWidget(viewer)
    assert again.model_request() == ModelChoice("vit_t_lm", "", "cpu", backend="torch", precision="mixed",
                                                semantics="standard", ais_precision="bf16")
    assert again._model.advanced.value and _shown(again._model.ais_precision)
    # a model without a decoder: its request leaves the AIS precision at auto, the file keeps it
    _pick(again._model_combo, "vit_t")
    assert again.model_request().ais_precision == "auto"
    again.close_widget()
    assert load_settings().ais_precision == "bf16"

    # unknown values and wrong types fall back to the defaults, the rest is kept
    path.write_text(json.dumps({"model": "vit_t_lm", "device": "cpu", "backend": "tpu", "precision": 16,
                                "semantics": "standard", "ais_precision": "fp16", "advanced": "yes"}))
    third = sw.SegmentWidget(viewer)
    assert third.model_request() == ModelChoice("vit_t_lm", "", "cpu", semantics="standard")
    assert not third._model.advanced.value
    third.close_widget()


@pytest.mark.slow
def test_ais_decoder_precision_reaches_the_openvino_decoder_after_the_first_conversion(
        make_napari_viewer, qtbot, stack, msdir, monkeypatch, tmp_path, microsam_ais_decoder_ir):
    """The widget's first start of new weights converts in the background: the AIS decoder must
    get the chosen precision when the OpenVINO encoder takes over (it stayed torch float32).
    A cache of its own: the session's may hold these weights' IR already (no first start then);
    only the AIS decoder's IR (converted once per session, see conftest) is copied into it, so
    the switch compiles that decoder in its precision instead of converting it again."""
    pytest.importorskip("openvino")
    import openvino as ov
    from conftest import seed_ir

    from napari_mobilesam.models.backends.background import BackgroundConversion
    from napari_mobilesam.models.backends.openvino import _openvino_has_bf16

    monkeypatch.setattr(BackgroundConversion, "nice", 0)  # not waiting for idle time on a busy machine
    monkeypatch.setenv("NAPARI_MOBILESAM_CACHE", str(tmp_path / "cache"))
    seed_ir(microsam_ais_decoder_ir, tmp_path / "cache")
    widget, panel = _fixture_with_options(make_napari_viewer, stack, msdir, "openvino", "fp32")
    _pick(panel.ais_precision, "mixed")
    _load(qtbot, widget, timeout=600_000)
    assert "converting" in panel.status.value.lower() or "fast OpenVINO encoder" in panel.status.value, panel.status.value
    qtbot.waitUntil(lambda: "fast OpenVINO encoder" in panel.status.value, timeout=600_000)
    sam = widget.session.sam
    info = model_info(sam)
    assert (info["backend"], info["precision"], info["semantics"]) == ("openvino", "fp32", "microsam")
    decoder = ais_decoder(sam)
    assert decoder.backend_name == "openvino" and decoder.batchnorm == "batch"
    if _openvino_has_bf16(ov.Core()):
        assert decoder.precision == "mixed"
        assert "AIS decoder in" not in panel.status.value
    else:
        assert decoder.precision == "fp32" and "CPU without bf16" in panel.status.value
    assert "options: openvino, fp32, AIS mixed" in panel.status.value
