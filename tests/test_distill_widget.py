"""The distillation dock panel in a real napari viewer (under Xvfb): a short training with the tiny
teacher and the ``vit_t_test`` student, cancel and resume, the hand-over to the segmentation widget's
settings, and settings refused before anything runs."""

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
                                                          teacher_file, config_dir, monkeypatch):
    from napari_mobilesam._napari.settings import load_settings
    from napari_mobilesam.data import synthetic_nuclei
    from napari_mobilesam.models.registry import build_sam

    viewer = make_napari_viewer()
    layer = viewer.add_image(synthetic_nuclei(shape=(4, 64, 64), n_nuclei=4, seed=2).image, name="nuclei")
    viewer.add_labels(np.zeros((4, 64, 64), dtype=np.uint16), name="not an image")
    widget = _panel(viewer)
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
    widget.plot.repaint()  # paints without error with data

    # 3. the model is offered to the segmentation widget
    assert offered == [str(output)]
    saved = load_settings()
    assert saved.model == "distilled" and saved.checkpoint == str(output)
    assert json.loads((config_dir / "segment_widget.json").read_text())["checkpoint"] == str(output)
    assert widget._use_btn.enabled


def test_panel_refuses_invalid_settings_before_running(make_napari_viewer, qtbot, tmp_path, teacher_file,
                                                        config_dir):
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
