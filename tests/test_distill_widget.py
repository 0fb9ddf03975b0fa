"""The distillation dock panel in a real napari viewer (under Xvfb): a short training with the tiny
teacher and the ``vit_t_test`` student, cancel and resume, progress in napari's activity dock, errors
as napari notifications, the hand-over to the Segment panel only when the user asks for it (and a
clear warning when validation got worse), settings refused before anything runs, tooltips."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.gui

TIMEOUT_MS = 300_000


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    d = tmp_path / "config"
    monkeypatch.setenv("NAPARI_MOBILESAM_CONFIG", str(d))
    return d


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    from napari_mobilesam.distillation.data import (
        save_teacher_checkpoint,
        vit_teacher_encoder,
    )

    return save_teacher_checkpoint(vit_teacher_encoder("tiny", seed=1),
                                   tmp_path_factory.mktemp("teacher") / "tiny_sam_vit.pth")


def _panel(viewer):
    from napari_mobilesam._napari.distill_widget import DistillWidget

    _dock, widget = viewer.window.add_plugin_dock_widget(
        "napari-mobilesam", "Fine-tune by distillation (MobileSAM)"
    )
    assert isinstance(widget, DistillWidget)
    widget.enable_dev_models()
    return widget


@pytest.fixture
def notes(monkeypatch):
    """Every napari notification the panel shows, as (level, message)."""
    import napari_mobilesam._napari.distill_widget as dw

    shown = []
    for level in ("error", "warning", "info"):
        monkeypatch.setattr(dw, f"show_{level}", lambda m, level=level: shown.append((level, m)))
    return shown


def _fill(widget, layer, teacher, output, epochs):
    widget._teacher.value = teacher
    widget._data_from.value = "layers"
    widget._layers.value = [layer]
    widget._student.value = "vit_t_test"
    widget._epochs.value = epochs
    widget._batch.value = 2
    widget._lr.value = "2e-3"
    widget._val_fraction.value = 0.25
    widget._device.value = "cpu"
    widget._output.value = output


def test_panel_trains_cancels_resumes_and_offers_the_model(make_napari_viewer, qtbot, tmp_path,
                                                          teacher_file, config_dir, monkeypatch, notes):
    from napari_mobilesam._napari.settings import load_settings
    from napari_mobilesam.data import synthetic_nuclei
    from napari_mobilesam.models.registry import build_sam

    viewer = make_napari_viewer()
    layer = viewer.add_image(synthetic_nuclei(shape=(4, 64, 64), n_nuclei=4, seed=2).image, name="nuclei")
    viewer.add_labels(np.zeros((4, 64, 64), dtype=np.uint16), name="not an image")
    import napari_mobilesam._napari.segment_widget as sw

    seg_messages = []  # the tiny vit_t_test student does not load as a full MobileSAM: its error goes here
    monkeypatch.setattr(sw, "show_error", seg_messages.append)
    _seg_dock, segment = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    widget = _panel(viewer)
    assert widget._segment_widgets() == [segment]  # found through napari's public dock_widgets
    segment_model = segment._model_combo.value
    assert [c for c in widget._layers.choices] == [layer]  # only Image layers are offered
    output = tmp_path / "student.pt"
    _fill(widget, layer, teacher_file, output, epochs=2)
    offered = []
    widget.model_ready.connect(offered.append)

    # 1. Cancel pressed when the first training step shows up. The run checks the cancel event
    # after each step, but the GUI thread sees a step only some time after the worker moved on; to
    # stop after exactly one step, the worker waits after that step until the GUI has cancelled.
    import threading

    import napari_mobilesam.distillation.run as distill_module

    real_iter = distill_module.iter_distill
    show_event = widget._on_event
    pressed = threading.Event()

    def press_cancel_on_first_step(ev):  # GUI thread
        show_event(ev)
        if ev.kind == "step" and not pressed.is_set():
            widget.cancel()
            pressed.set()

    def wait_for_the_gui(cfg, cancel=None):  # worker thread
        gen = real_iter(cfg, cancel=cancel)
        try:
            while True:
                ev = next(gen)
                yield ev
                if ev.kind == "step":
                    assert pressed.wait(120), "the GUI never saw the step"
        except StopIteration as stop:
            return stop.value

    monkeypatch.setattr(distill_module, "iter_distill", wait_for_the_gui)
    widget._on_event = press_cancel_on_first_step  # run() connects it to the worker
    worker = widget.run()
    assert worker is not None and widget.busy
    assert widget._cancel_btn.enabled and not widget._run_btn.enabled
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert widget.result.cancelled and not output.exists()
    assert "Cancelled" in widget._status.value
    assert widget._run_btn.enabled and not widget._cancel_btn.enabled
    assert not offered

    # 2. run again: resumes from the saved state and finishes
    monkeypatch.setattr(distill_module, "iter_distill", real_iter)
    widget._on_event = show_event
    worker = widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    result = widget.result
    assert result is not None and not result.cancelled, widget._status.value
    assert result.resumed_from is not None and result.resumed_from.name == "state-e0000-s0000001.pt"
    assert output.exists() and "Done" in widget._status.value
    build_sam("vit_t_test", output)  # loads strictly
    # the live plot got the training losses of the resumed run and one validation per epoch + before
    assert len(widget.plot.train) == 2 * 2 - 1 and len(widget.plot.val) == 3
    assert widget._progress.value == widget._progress.max == 4
    # the run went through start_task: its progress bar in napari's activity dock counted the steps
    assert widget.task.worker is worker and widget.task.description == "MobileSAM: distillation"
    assert widget.task.pbar.total == 4 and widget.task.pbar.n == 4
    widget.plot.repaint()  # paints without error with data

    # 3. nothing switched by itself (behaviour changed by #11 item 10): the panel says how validation
    # went and waits for "Use this model"
    assert not offered
    assert segment._model_combo.value == segment_model
    assert load_settings().checkpoint != str(output)
    assert widget._use_btn.enabled and "Use this model" in widget._use_btn.text
    assert notes and notes[-1][0] in ("info", "warning") and "mIoU" in notes[-1][1]
    assert ("WORSE" in widget._status.value) == (notes[-1][0] == "warning")

    # 4. the user presses "Use this model": settings saved and the open Segment panel switched
    widget._use_btn.native.click()
    assert offered == [str(output)]
    saved = load_settings()
    assert saved.model == "distilled" and saved.checkpoint == str(output)
    assert json.loads((config_dir / "segment_widget.json").read_text())["checkpoint"] == str(output)
    assert segment._model_combo.value == "distilled" and str(segment._checkpoint.value) == str(output)
    qtbot.waitUntil(lambda: not segment._model.loading, timeout=TIMEOUT_MS)
    assert "Segment panel now uses" in widget._status.value


def test_panel_refuses_invalid_settings_before_running(make_napari_viewer, qtbot, tmp_path, teacher_file,
                                                        config_dir, notes):
    import torch

    from napari_mobilesam.data import synthetic_nuclei

    viewer = make_napari_viewer()
    layer = viewer.add_image(synthetic_nuclei(shape=(3, 48, 48), n_nuclei=3, seed=2).image, name="nuclei")
    widget = _panel(viewer)
    output = tmp_path / "student.pt"
    _fill(widget, layer, teacher_file, output, epochs=1)

    widget._teacher.value = tmp_path / "missing.pth"
    assert widget.run() is None and "teacher checkpoint" in widget._status.value
    widget._teacher.value = teacher_file
    widget._layers.value = []
    assert widget.run() is None and "at least one image layer" in widget._status.value
    widget._layers.value = [layer]
    widget._lr.value = "fast"
    assert widget.run() is None and "not a number" in widget._status.value
    widget._lr.value = "1e-3"
    output.write_bytes(b"keep me")
    assert widget.run() is None and "already exists" in widget._status.value
    assert output.read_bytes() == b"keep me"
    widget._data_from.value = "folder"
    widget._folder.value = tmp_path / "no_such_folder"
    assert widget.run() is None and "folder" in widget._status.value
    widget._data_from.value = "layers"

    # a file that is not a SAM encoder: refused by the worker before any computation
    bad = tmp_path / "classifier.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    widget._teacher.value = bad
    widget._output.value = tmp_path / "other.pt"
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert "not a SAM image encoder" in widget._status.value
    assert widget.result is None and not (tmp_path / "other.pt").exists()

    # every refusal above was also a napari notification, like the Segment panel's errors
    errors = [m for level, m in notes if level == "error"]
    for text in ("teacher checkpoint", "at least one image layer", "not a number", "already exists",
                 "folder", "not a SAM image encoder"):
        assert any(text in m for m in errors), (text, errors)
    assert errors[-1].startswith("Distillation failed:")


def test_worse_validation_is_said_clearly_and_nothing_switches(make_napari_viewer, qtbot, tmp_path,
                                                               config_dir, notes):
    """The end of a run whose validation got worse, fed a hand-made ``DistillResult`` (a fake: the
    real end-of-run path is in the training test above)."""
    from napari_mobilesam._napari.settings import load_settings
    from napari_mobilesam.distillation.config import DistillResult

    viewer = make_napari_viewer()
    widget = _panel(viewer)
    offered = []
    widget.model_ready.connect(offered.append)
    fake = DistillResult(output=tmp_path / "student.pt", metadata=None, run_dir=tmp_path,
                         before={"mse": 0.01, "miou": 0.91, "n_slices": 2},
                         after={"mse": 0.02, "miou": 0.84, "n_slices": 2}, history=[])
    widget._on_done(fake)
    assert "WORSE" in widget._status.value and "0.910 before, 0.840 after" in widget._status.value
    assert notes[-1][0] == "warning" and "WORSE" in notes[-1][1]
    assert widget._use_btn.enabled and "anyway" in widget._use_btn.text
    assert not offered and load_settings().checkpoint != str(fake.output)

    better = DistillResult(output=tmp_path / "student.pt", metadata=None, run_dir=tmp_path,
                           before={"mse": 0.02, "miou": 0.84, "n_slices": 2},
                           after={"mse": 0.01, "miou": 0.91, "n_slices": 2}, history=[])
    widget._on_done(better)
    assert "WORSE" not in widget._status.value and "validation improved" in widget._status.value
    assert notes[-1][0] == "info" and widget._use_btn.text == "Use this model for segmentation"
    assert not offered


def test_every_control_has_a_tooltip(make_napari_viewer, config_dir):
    from magicgui.widgets import Container, Label

    from napari_mobilesam._napari.distill_widget import TOOLTIPS

    viewer = make_napari_viewer()
    widget = _panel(viewer)

    def controls(container):
        for w in container:
            if isinstance(w, Container):
                yield from controls(w)
            elif not isinstance(w, Label):
                yield w

    found = list(controls(widget))
    assert len(found) >= 15
    missing = [w.label or w.text for w in found if not (w.tooltip or "").strip()]
    assert not missing, missing
    assert all(len(t) > 20 for t in TOOLTIPS.values())


def test_cancelling_the_background_task_keeps_the_progress(make_napari_viewer, qtbot, tmp_path, teacher_file,
                                                           config_dir, monkeypatch, notes):
    """``Task.cancel()`` (quitting the napari worker, not the panel's Cancel button) also stops after
    the current step, keeps a training state and leaves the panel ready to resume."""
    import threading

    import napari_mobilesam.distillation.run as distill_module
    from napari_mobilesam.data import synthetic_nuclei

    viewer = make_napari_viewer()
    layer = viewer.add_image(synthetic_nuclei(shape=(4, 48, 48), n_nuclei=3, seed=2).image, name="nuclei")
    widget = _panel(viewer)
    output = tmp_path / "student.pt"
    _fill(widget, layer, teacher_file, output, epochs=2)

    real_iter, show_event, pressed = distill_module.iter_distill, widget._on_event, threading.Event()

    def cancel_task_on_first_step(ev):  # GUI thread
        show_event(ev)
        if ev.kind == "step" and not pressed.is_set():
            widget.task.cancel()
            pressed.set()

    def wait_for_the_gui(cfg, cancel=None):  # worker thread: hold after the first step until cancelled
        gen = real_iter(cfg, cancel=cancel)
        try:
            while True:
                ev = next(gen)
                yield ev
                if ev.kind == "step":
                    assert pressed.wait(120), "the GUI never saw the step"
        except StopIteration as stop:
            return stop.value

    monkeypatch.setattr(distill_module, "iter_distill", wait_for_the_gui)
    widget._on_event = cancel_task_on_first_step
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert widget.task.cancelled and "Cancelled" in widget._status.value
    assert not output.exists()
    states = [p.name for p in output.with_name("student.pt.distill").glob("*/state-*.pt")]
    assert states == ["state-e0000-s0000001.pt"]
    assert widget._run_btn.enabled and not widget._cancel_btn.enabled and not widget._use_btn.enabled
    assert not [m for level, m in notes if level == "error"]
