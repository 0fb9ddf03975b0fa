"""The first start does not wait for the OpenVINO conversion (models/backends/background.py).

The conversion runs in another process; the tests synchronise with it through its lock file
(held by the test, the conversion cannot finish) and its ``finished`` event, never with timing.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.core.session import Session
from napari_mobilesam.models.backends.background import _exclusive, lock_path
from napari_mobilesam.models.choice import ModelChoice
from napari_mobilesam.models.registry import build_sam, model_identity

pytest.importorskip("openvino")


@pytest.fixture(autouse=True)
def _normal_priority(monkeypatch):
    """The conversion runs at nice 19 in use; at normal priority here, so that tests on a machine
    kept busy by other jobs do not wait for idle time (the mechanism is the same)."""
    from napari_mobilesam.models.backends.background import BackgroundConversion

    monkeypatch.setattr(BackgroundConversion, "nice", 0)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_MOBILESAM_CACHE", str(folder))
    return folder


def held(path):
    """Hold the conversion's lock (the engine's own lock): a conversion process waits until the block ends."""
    return _exclusive(path)


def _image():
    img = np.zeros((2, 96, 96), np.uint8)
    img[:, 30:60, 30:60] = 200
    return img


CHOICE = ModelChoice("vit_t_test", device="cpu")


def test_first_mask_before_the_conversion_then_the_fast_encoder(fresh_cache, msdir, microsam_ais_decoder_ir):
    """Masks at once, the conversion behind them, then the fast encoder.

    The second start (same encoder) brings micro-sam's AIS decoder with ``ais_precision``
    "mixed" (this merges the former test of the switch with such a model, which converted the
    same encoder once more): torch float32 until the switch, then the OpenVINO decoder in its
    chosen precision (before, the decoder stayed torch float32 after a first start). The AIS
    decoder's IR (converted once per session, see conftest) is in the cache already: the switch
    compiles it in its precision."""
    from conftest import seed_ir

    seed_ir(microsam_ais_decoder_ir, fresh_cache)
    lock = lock_path(build_sam("vit_t_test").image_encoder)
    with held(lock):
        sam, conversion = CHOICE.load_without_waiting()
        # another start meanwhile: waits on the lock
        sam_ais, second = _ais_choice(msdir).load_without_waiting()
        assert conversion is not None and conversion.running and second.running
        _check_ais_torch(sam_ais)
        assert model_identity(sam).endswith(":torch:fp32")  # the exact path at once
        session = Session(sam, _image(), cache_dir=None)
        first = session.predict(0, points=np.array([[45.0, 45.0]]), labels=np.array([1]))
        assert first.mask[45, 45]
        assert session.is_embedded(0)
        assert not conversion.finished.is_set()  # the mask came while the conversion waits
    assert conversion.wait(timeout=600), conversion.error
    assert second.wait(timeout=600), second.error
    # never two conversions of one model at a time: one converted, the other found the IR
    assert sorted(c.output.split(" in ")[0] for c in (conversion, second)) == ["already cached", "converted"]
    _check_ais_switch(sam_ais, second)
    conversion.switch(sam, conversion.build())
    assert model_identity(sam).split(":")[2] == "openvino"
    assert not session.is_embedded(0)  # torch embeddings are not reused: recomputed lazily
    again = session.predict(0, points=np.array([[45.0, 45.0]]), labels=np.array([1]))
    assert session.cache.stats.computed == 2
    assert (again.mask == first.mask).mean() > 0.99
    # the next start finds the IR cached and starts on OpenVINO directly
    sam2, conversion2 = CHOICE.load_without_waiting()
    assert conversion2 is None and model_identity(sam2).split(":")[2] == "openvino"
    assert not list((fresh_cache / "openvino").glob(".encoder*"))  # no temporary folders left


def test_failed_conversion_keeps_torch_and_says_why(fresh_cache):
    fresh_cache.mkdir(parents=True)
    (fresh_cache / "openvino").write_text("not a folder")  # the conversion cannot write its IR
    sam, conversion = CHOICE.load_without_waiting()
    assert conversion is not None
    assert not conversion.wait(timeout=600)
    assert conversion.state == "failed" and "status" in conversion.error
    assert model_identity(sam).endswith(":torch:fp32")
    with pytest.raises(RuntimeError, match="not succeeded"):
        conversion.build()
    session = Session(sam, _image(), cache_dir=None)
    assert session.predict(0, points=np.array([[45.0, 45.0]]), labels=np.array([1])).mask[45, 45]


def test_cancel_stops_the_process_and_leaves_nothing(fresh_cache):
    lock = lock_path(build_sam("vit_t_test").image_encoder)
    with held(lock):
        sam, conversion = CHOICE.load_without_waiting()
        proc = conversion._proc
        conversion.cancel()
        assert conversion.finished.wait(30)
        assert proc.poll() is not None and conversion.state == "cancelled"
    assert not conversion.wait(timeout=1)
    assert [p.name for p in (fresh_cache / "openvino").iterdir()] == [lock.name]


def test_backends_other_than_openvino_never_convert(fresh_cache):
    for backend in ("torch", "eager"):
        sam, conversion = ModelChoice("vit_t_test", device="cpu", backend=backend).load_without_waiting()
        assert conversion is None and model_identity(sam).split(":")[2] == backend
    assert not (fresh_cache / "openvino").exists()


# --------------------------------------------------------------------------- the widget
@pytest.mark.gui
@pytest.mark.gc_unfrozen  # the widget's own freeze: its collections are counted
def test_widget_masks_while_converting_then_switches(make_napari_viewer, qtbot, stack, monkeypatch, fresh_cache):
    """Real clicks on the canvas: masks come from the torch path while the conversion waits on
    its lock, the activity dock shows the conversion, then the fast encoder takes over."""
    from test_user_flow import click, go_to, nucleus

    monkeypatch.setenv("NAPARI_MOBILESAM_DEV", "1")
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    image = viewer.add_image(stack.image, name="nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    widget._model_combo.value = "vit_t_test"
    widget._device_combo.value = "cpu"
    z, r, c, _ = nucleus(stack, 0)
    go_to(viewer, image, z)
    lock = lock_path(build_sam("vit_t_test").image_encoder)
    with held(lock):
        widget.load_model()
        qtbot.waitUntil(lambda: widget.session is not None and not widget.busy, timeout=120_000)
        follower = widget._model.conversion
        assert follower.running is not None and follower.running.running
        assert "converting the encoder for fast CPU inference" in widget._model.status.value
        assert any("converting the encoder" in t.description for t in [follower.task])
        click(viewer, image, (z, r, c), qtbot=qtbot)
        qtbot.waitUntil(lambda: widget._annotator._prediction is not None and widget._preview_z == z,
                        timeout=120_000)
        assert model_identity(widget._model.sam).endswith(":torch:fp32")
        assert not follower.running.finished.is_set()  # the mask came first
    qtbot.waitUntil(lambda: "fast OpenVINO encoder" in widget._model.status.value, timeout=600_000)
    assert model_identity(widget._model.sam).split(":")[2] == "openvino"
    assert not widget.session.is_embedded(z)  # the torch embedding is not reused
    widget.clear_prompts()
    click(viewer, image, (z, r + 1, c), qtbot=qtbot)
    qtbot.waitUntil(lambda: widget._annotator._prediction is not None and widget._preview_z == z
                    and widget.session.is_embedded(z), timeout=120_000)
    assert widget.session.cache.identity.split(":")[2] == "openvino"

    # another model replaces the switched one: it is freed by reference counting (the switch's
    # callbacks, still connected to napari's finished worker, do not hold it)
    import weakref

    from napari_mobilesam._napari import gc_freeze

    switched = weakref.ref(widget._model.sam)
    rounds = gc_freeze.collections_done()
    widget.load_model(ModelChoice("vit_t_test", "", "cpu", "eager"))
    qtbot.waitUntil(lambda: widget._model.sam is not None and widget._model.sam is not switched()
                    and not widget.busy, timeout=120_000)
    qtbot.waitUntil(lambda: switched() is None, timeout=5_000)
    assert gc_freeze.collections_done() == rounds  # no full collection was needed


@pytest.mark.gui
def test_closing_the_widget_stops_the_conversion(make_napari_viewer, qtbot, stack, monkeypatch, fresh_cache):
    monkeypatch.setenv("NAPARI_MOBILESAM_DEV", "1")
    viewer = make_napari_viewer(show=True)
    viewer.add_image(stack.image, name="nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    widget._model_combo.value = "vit_t_test"
    widget._device_combo.value = "cpu"
    with held(lock_path(build_sam("vit_t_test").image_encoder)):
        widget.load_model()
        qtbot.waitUntil(lambda: widget._model.conversion.running is not None, timeout=120_000)
        conversion = widget._model.conversion.running
        widget.close_widget()
        assert conversion.finished.wait(30) and conversion.state == "cancelled"
        assert conversion._proc.poll() is not None


def _ais_choice(msdir):
    return ModelChoice("vit_t_test", device="cpu", decoder=str(msdir / "vit_t_decoder.pt"),
                       ais_precision="mixed")


def _check_ais_torch(sam):
    from napari_mobilesam.models.registry import ais_decoder

    assert not hasattr(ais_decoder(sam), "backend_name")  # the torch module meanwhile


def _check_ais_switch(sam, conversion):
    import openvino as ov

    from napari_mobilesam.models.backends.openvino import _openvino_has_bf16
    from napari_mobilesam.models.registry import ais_decoder

    assert conversion.wait(timeout=600), conversion.error
    conversion.switch(sam, conversion.build())
    decoder = ais_decoder(sam)
    assert decoder.backend_name == "openvino" and decoder.batchnorm == "batch"
    assert decoder.precision == ("mixed" if _openvino_has_bf16(ov.Core()) else "fp32")
    assert model_identity(sam).split(":")[2] == "openvino"
