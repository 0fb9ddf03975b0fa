"""What keeps the GUI thread from stalling while workers run (see benchmarks/interaction.py --stalls)."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("keep_ids", [False, True])
@pytest.mark.parametrize("keep_existing", [False, True])
def test_propagation_write_works_on_the_touched_slices_only_and_matches_label_writes(keep_ids, keep_existing):
    """The end of a propagation writes on the GUI thread: only the slices the result touches are
    processed, with exactly the rules (ids, overwrites, one undo step) of label_writes."""
    import numpy as np
    from napari.layers import Labels

    from napari_mobilesam._napari import label_writes as lw
    from napari_mobilesam._napari.long_tasks import PropagationRun, write_propagation

    rng = np.random.default_rng(0)
    existing = np.zeros((12, 32, 32), np.int32)
    existing[5:8, 4:12, 4:12] = 3
    existing[1, 20:24, 20:24] = 9
    volume = np.zeros((12, 32, 32), np.uint8)
    volume[4:9, 6:20, 6:20] = 2
    volume[6, 0:5, 0:5] = 3
    volume[rng.random(volume.shape) < 0.01] = 0
    result = type("Result", (), {"labels": volume})()
    run = PropagationRun([], "test", keep_ids=keep_ids)

    ours, reference = Labels(existing.copy()), Labels(existing.copy())
    written = write_propagation(ours, result, run, keep_existing)
    if keep_ids:
        expected = {i: i for i in lw.write_objects(reference, volume, keep_existing=keep_existing)}
    else:
        ids = lw.write_volume_labels(reference, volume, keep_existing=keep_existing)
        expected = dict(zip([2, 3], ids))
    np.testing.assert_array_equal(ours.data, reference.data)
    assert written == expected
    ours.undo()  # one undo step restores the layer
    np.testing.assert_array_equal(ours.data, existing)
    empty = type("Result", (), {"labels": np.zeros_like(volume)})()
    assert write_propagation(ours, empty, run, keep_existing) == {}


@pytest.mark.gui
def test_live_preview_repaints_only_when_the_slice_in_view_changes(make_napari_viewer, qtbot, stack, monkeypatch):
    """During a propagation every finished slice reports progress; the preview layer (a canvas
    repaint each time) is only refreshed when the slice in view got new labels."""
    import numpy as np
    from qtpy.QtCore import Qt

    from napari_mobilesam._napari import prompt_layers as pl

    viewer, _dock, widget, image, oracle = open_session(make_napari_viewer, qtbot, stack)
    z, r, c, _ = nucleus(stack, 0)
    click(viewer, image, (z, r, c), qtbot=qtbot)
    wait_preview(qtbot, widget)
    shown, steps = [], []
    real_show = pl.show_preview
    monkeypatch.setattr(pl, "show_preview", lambda *a, **k: (shown.append(a[3]), real_show(*a, **k)))
    oracle.delay = 0.05
    key(viewer, Qt.Key.Key_S, SHIFT)
    relay = widget._annotator._runner.task._relay
    relay.progressed.connect(lambda done, total: steps.append(done))
    go_to(viewer, image, z + 1)  # watch a neighbouring slice fill while the run goes on
    wait_idle(qtbot, widget)
    assert len(steps) >= 5
    live = [None if labels is None else np.asarray(labels) for labels in shown]
    assert any(a is not None for a in live), "the slice in view never showed the run's labels"
    repeats = sum(a is not None and b is not None and np.array_equal(a, b) for a, b in zip(live, live[1:]))
    assert repeats == 0, f"{repeats} of {len(live)} live refreshes repainted unchanged labels"
    assert len(live) < len(steps)
    target = widget.target_layer(create=False)
    assert target is not None and (target.data > 0).sum() > 0


# --------------------------------------------------------------------------- the preview's decoder
def _recording_threads(monkeypatch, obj, name):
    """Wrap ``obj.name`` (a model call) so that every call records whether it ran on the GUI thread."""
    import threading

    calls = []
    real = getattr(obj, name)

    def wrapped(*args, **kwargs):
        calls.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


def _gated(monkeypatch, oracle, *, hold_decoder: bool):
    """Make the oracle's calls wait for the returned Event: the preview decoder's calls
    (``hold_decoder``) or every other thread's (the propagation worker's): orders without timing."""
    import threading

    gate = threading.Event()
    real = oracle.predict

    def predict(*args, **kwargs):
        if (threading.current_thread().name == "mobilesam-preview-decoder") == hold_decoder:
            assert gate.wait(60), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(oracle, "predict", predict)
    return gate


def _two_nuclei_on_a_slice(stack):
    """(z, (row, col, id), (row, col, id)): the deepest interior pixels of two objects of one slice."""
    import numpy as np
    from scipy import ndimage as ndi

    for z in range(stack.labels.shape[0]):
        ids = [i for i in np.unique(stack.labels[z]) if i]
        if len(ids) < 2:
            continue
        found = []
        for i in ids:
            depth = ndi.distance_transform_edt(stack.labels[z] == i)
            if depth.max() >= 4:
                r, c = np.unravel_index(int(depth.argmax()), depth.shape)
                found.append((int(r), int(c), int(i)))
        if len(found) >= 2:
            return z, found[0], found[1]
    raise AssertionError("no slice with two nuclei in the test stack")


@pytest.mark.gui
def test_a_click_during_a_propagation_gets_its_preview_and_the_gui_thread_never_calls_the_model(
    make_napari_viewer, qtbot, stack, monkeypatch
):
    """Shift-S runs; the user clicks another nucleus on another slice: its preview appears while
    the propagation still runs, and no model call (preview or propagation) ran on the GUI thread.
    (The predictor here is the GroundTruthOracle, a stand-in; the real decoder is checked below.)"""
    import numpy as np
    from qtpy.QtCore import Qt

    viewer, _dock, widget, image, oracle = open_session(make_napari_viewer, qtbot, stack)
    on_gui = _recording_threads(monkeypatch, oracle, "predict")
    z, r, c, gt = nucleus(stack, 0)
    click(viewer, image, (z, r, c), qtbot=qtbot)
    wait_preview(qtbot, widget)
    gate = _gated(monkeypatch, oracle, hold_decoder=False)  # the propagation waits for the gate
    key(viewer, Qt.Key.Key_S, SHIFT)
    assert widget._annotator._runner.running
    z2 = next(q for q in range(stack.labels.shape[0]) if abs(q - z) > 2 and stack.labels[q].any())
    ids2 = [i for i in np.unique(stack.labels[z2]) if i]
    r2, c2 = np.argwhere(stack.labels[z2] == ids2[0])[len(np.argwhere(stack.labels[z2] == ids2[0])) // 2]
    go_to(viewer, image, z2)
    click(viewer, image, (z2, r2, c2), qtbot=qtbot)
    seen = {}

    def previewed():
        if widget._preview_z == z2 and widget._preview_kind == "object":
            seen.setdefault("during", widget._annotator._runner.running)
            return True
        return False

    qtbot.waitUntil(previewed, timeout=20_000)
    gate.set()
    assert seen["during"], "the click's preview waited for the propagation to end"
    np.testing.assert_array_equal(widget.preview_layer.data[0] > 0, stack.labels[z2] == ids2[0])
    wait_idle(qtbot, widget)
    assert len(on_gui) >= 5 and not any(on_gui), f"{sum(on_gui)} of {len(on_gui)} model calls on the GUI thread"
    target = widget.target_layer(create=False)
    assert target is not None and (target.data == 1).sum() > 0


@pytest.mark.gui
def test_stale_preview_answers_are_dropped_and_requests_coalesce(make_napari_viewer, qtbot, stack, monkeypatch):
    """Answers for an older prompt set or another slice never reach the preview; while one
    decoding runs, newer requests replace each other (the newest is decoded next)."""
    import numpy as np

    from napari_mobilesam._napari import prompt_layers as pl

    viewer, _dock, widget, image, oracle = open_session(make_napari_viewer, qtbot, stack)
    gate = _gated(monkeypatch, oracle, hold_decoder=True)  # the first decoding waits for the gate
    shown = []
    real_show = pl.show_preview
    monkeypatch.setattr(pl, "show_preview", lambda *a, **k: (shown.append((a[2], a[3])), real_show(*a, **k)))
    za, ra, ca, gt_a = nucleus(stack, 0)
    zb = next(q for q in range(stack.labels.shape[0]) if abs(q - za) > 2 and stack.labels[q].any())
    gt_b = int(next(i for i in np.unique(stack.labels[zb]) if i))
    rb, cb = np.argwhere(stack.labels[zb] == gt_b)[len(np.argwhere(stack.labels[zb] == gt_b)) // 2]
    calls0, submits = oracle.calls, []
    decoder = widget._annotator._decoder
    real_submit = decoder.submit
    monkeypatch.setattr(decoder, "submit", lambda request: (submits.append(request), real_submit(request)))
    click(viewer, image, (za, ra, ca), qtbot=qtbot)  # its decoding starts and waits
    go_to(viewer, image, zb)  # before it answers: another slice, another object
    click(viewer, image, (zb, rb, cb), qtbot=qtbot)
    for k in range(1, 4):  # more prompts while a decoding runs: their requests replace each other
        widget.points_layer.add([zb, rb, cb + (k % 2)])
    gate.set()
    qtbot.waitUntil(lambda: widget._preview_z == zb and widget.preview_layer.data.any(), timeout=10_000)
    wait_idle(qtbot, widget)
    # A's decoding ran; every request made meanwhile replaced the previous one: one more decoding
    assert len(submits) >= 5 and oracle.calls - calls0 == 2, (oracle.calls - calls0, len(submits))
    previews = [(z, labels) for z, labels in shown if labels is not None]
    assert previews and all(z == zb for z, _ in previews), "an answer for an older slice was shown"
    np.testing.assert_array_equal(widget.preview_layer.data[0] > 0, stack.labels[zb] == gt_b)


@pytest.mark.gui
def test_c_right_after_a_click_commits_the_newest_prompts(make_napari_viewer, qtbot, stack):
    """The preview still shows object A when the prompts become object B and C is pressed at
    once: B (the newest prompts) is committed when its mask arrives, not A."""
    import numpy as np
    from qtpy.QtCore import Qt

    viewer, _dock, widget, image, oracle = open_session(make_napari_viewer, qtbot, stack)
    z, (ra, ca, gt_a), (rb, cb, gt_b) = _two_nuclei_on_a_slice(stack)
    go_to(viewer, image, z)
    click(viewer, image, (z, ra, ca), qtbot=qtbot)
    wait_preview(qtbot, widget)
    np.testing.assert_array_equal(widget.preview_layer.data[0] > 0, stack.labels[z] == gt_a)
    oracle.delay = 0.4
    points = widget.points_layer
    points.data = np.array([[z, rb, cb]], float)  # the prompts are now object B only
    key(viewer, Qt.Key.Key_C)  # at once: the preview still shows A
    assert widget._annotator.decoding
    wait_idle(qtbot, widget)
    qtbot.waitUntil(lambda: widget.target_layer(create=False) is not None, timeout=5000)
    target = widget.target_layer(create=False)
    qtbot.waitUntil(lambda: target.data[z].any(), timeout=5000)
    np.testing.assert_array_equal(target.data[z] > 0, stack.labels[z] == gt_b)
    assert "Committed" in widget.status


@pytest.mark.gui
def test_the_real_decoder_never_runs_on_the_gui_thread(make_napari_viewer, qtbot, stack, engine_sam_test, monkeypatch):
    """vit_t_test through the real session: a click's preview and a propagation call the mask
    decoder only from background threads."""

    from napari_mobilesam._napari import segment_widget as sw
    from napari_mobilesam.models.choice import ModelChoice

    viewer = make_napari_viewer()
    image = viewer.add_image(stack.image, name="nuclei")
    widget = sw.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    on_gui = _recording_threads(monkeypatch, engine_sam_test.mask_decoder, "forward")
    widget.set_model(engine_sam_test, ModelChoice("vit_t_test", "", "cpu"))
    z = 6
    go_to(viewer, image, z)
    qtbot.waitUntil(lambda: widget.session.is_embedded(z), timeout=60_000)
    widget.points_layer.add([z, 64, 64])
    qtbot.waitUntil(lambda: widget._prediction is not None and widget._preview_z == z, timeout=60_000)
    assert widget.propagate() is not None
    wait_idle(qtbot, widget, timeout=120_000)
    assert widget.last_propagation is not None or "nothing" in widget.status.lower()
    assert on_gui and not any(on_gui), f"{sum(on_gui)} of {len(on_gui)} decoder calls on the GUI thread"


@pytest.mark.gui
@pytest.mark.parametrize("keep_ids", [False, True])
@pytest.mark.parametrize("keep_existing", [False, True])
def test_a_planned_write_reads_and_writes_over_turns_with_one_refresh(qtbot, keep_ids, keep_existing):
    """write_plan_in_steps (the end of a propagation): the labels and ids of write_propagation,
    one undo step, the layer read and written over several event-loop turns, and the layer
    refreshed once at the end (no partial refresh per step: each one repainted the canvas and
    the layer list's thumbnail)."""
    import numpy as np
    from napari.layers import Labels
    from qtpy.QtCore import QTimer

    from napari_mobilesam._napari.long_tasks import (
        PropagationRun,
        WritePlan,
        write_plan_in_steps,
        write_propagation,
    )

    existing = np.zeros((6, 64, 64), np.int32)
    existing[2, :10, :10] = 4
    existing[3, 50:58, 50:58] = 7
    volume = np.zeros((6, 64, 64), np.uint8)
    volume[1:5, 5:40, 5:40] = 1
    volume[3, 45:60, 45:60] = 2
    volume[0, 0:6, 0:6] = 4 if keep_ids else 3
    run = PropagationRun([], "t", keep_ids=keep_ids)
    ours, reference = Labels(existing.copy()), Labels(existing.copy())
    expected = write_propagation(reference, type("R", (), {"labels": volume})(), run, keep_existing)
    refreshes, partial = [], []
    real_refresh = ours.refresh
    ours.refresh = lambda *a, **k: (refreshes.append(1), real_refresh(*a, **k))
    ours.events.labels_update.connect(lambda e: partial.append(1))
    ticks, finished = [], []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(len(finished)))
    timer.start(0)
    write_plan_in_steps(ours, WritePlan.of(volume), run, keep_existing,
                        lambda exc, ids: finished.append((exc, ids)), step=500, turn_s=0.0)
    assert not finished, "a write of many steps returned before the event loop ran"
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    timer.stop()
    assert finished == [(None, expected)] and len(ticks) >= 2
    np.testing.assert_array_equal(ours.data, reference.data)
    assert len(refreshes) == 1 and not partial, (len(refreshes), len(partial))
    ours.undo()
    np.testing.assert_array_equal(ours.data, existing)
    small = []  # a plan of one step is written at once, before the call returns
    write_plan_in_steps(ours, WritePlan.of(volume), run, keep_existing, lambda exc, ids: small.append(exc))
    assert small == [None]
    np.testing.assert_array_equal(ours.data, reference.data)
    with pytest.raises(ValueError, match="does not fit"):
        write_plan_in_steps(ours, WritePlan.of(volume[:3]), run, keep_existing, lambda *a: None)


def test_outline_labels_keeps_each_objects_border_with_its_id():
    """The automatic preview's outlines (computed in the worker): border pixels of each object,
    with its id; the inside of large objects is empty; objects thinner than the outline stay whole."""
    import numpy as np

    from napari_mobilesam._napari.prompt_layers import outline_labels

    labels = np.zeros((40, 40), np.uint32)
    labels[5:25, 5:25] = 3
    labels[5:25, 25:35] = 8  # touches 3: both keep a border along the contact
    labels[30, 2:10] = 5  # one pixel thick: kept whole
    out = outline_labels(labels, thickness=2)
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert set(np.unique(out)) == {0, 3, 5, 8}
    assert ((out == 0) | (out == labels)).all(), "an outline pixel changed its id"
    np.testing.assert_array_equal(out[30, 2:10], 5)
    assert not out[9:21, 9:21].any(), "the inside of a large object was kept"
    assert (out[5:25, 5] == 3).all() and (out[5, 5:25] == 3).all()  # its border
    assert (out[10:20, 24] == 3).all() and (out[10:20, 25] == 8).all()  # the contact, both sides


@pytest.mark.gui
def test_the_automatic_preview_shows_outlines_computed_off_the_gui_thread(make_napari_viewer, qtbot, stack,
                                                                         monkeypatch):
    """An automatic segmentation's preview is drawn from outlines made in the worker: the preview
    layer holds them as plain labels (napari's contour mode, which recomputes outlines on the GUI
    thread at each refresh, stays off), and C commits the whole objects."""
    import threading

    import numpy as np

    from napari_mobilesam._napari import prompt_layers as pl

    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack)
    z, _r, _c, _ = nucleus(stack, 0)
    go_to(viewer, image, z)
    on_gui = []
    real = pl.outline_labels
    monkeypatch.setattr(pl, "outline_labels",
                        lambda *a, **k: (on_gui.append(threading.current_thread() is threading.main_thread()),
                                         real(*a, **k))[1])
    assert widget.segment_slice_automatically() is not None
    wait_idle(qtbot, widget)
    labels = widget._annotator._preview_labels
    assert widget._preview_kind == "auto" and labels is not None and labels.any()
    assert on_gui == [False], on_gui
    preview = widget.preview_layer
    assert preview.contour == 0
    np.testing.assert_array_equal(np.asarray(preview.data)[0], real(labels))
    ids = widget.commit()
    target = widget.target_layer(create=False)
    assert len(ids) == len(np.unique(labels)) - 1
    np.testing.assert_array_equal(target.data[z] > 0, labels > 0)  # whole objects, not outlines


def test_closing_a_session_without_waiting_leaves_a_running_prefetch_to_finish(engine_sam_test, stack):
    """The widget replaces its session (new model, new image) on the GUI thread: close(wait=False)
    returns while a prefetch is still embedding (it used to wait for that encoder call); the
    prefetch then finishes on its own thread, and prefetches still queued never run."""
    import threading

    from napari_mobilesam.core.session import Session

    session = Session(engine_sam_test, stack.image, cache_dir=None)
    cache = session.cache
    gate, started, ran = threading.Event(), threading.Event(), []
    real = cache._prefetch_one

    def held(source, z):  # the first prefetch waits for the gate: a long encoder call
        ran.append(z)
        if len(ran) == 1:
            started.set()
            assert gate.wait(60), "the test never opened the gate"
        return real(source, z)

    cache._prefetch_one = held
    futures = session.cache.prefetch(session.source, [3, 4, 5])
    assert started.wait(30)
    session.close(wait=False)  # returns although the prefetch of slice 3 is still running
    assert not futures[0].done()
    gate.set()
    futures[0].result(timeout=60)
    assert ran == [3] and all(f.cancelled() for f in futures[1:])
    assert cache._pool is None


def test_the_widgets_model_load_computes_the_dense_positional_encoding_in_its_worker(monkeypatch, stack):
    """What a new model's first session needs (the prompt encoder's dense positional encoding,
    tens of ms) is computed by the widget's loading worker; the GUI thread's Session then reuses it."""
    import threading

    from segment_anything.modeling.prompt_encoder import PromptEncoder

    from napari_mobilesam._napari.model_panel import load_for_widget
    from napari_mobilesam.core.session import Session
    from napari_mobilesam.models.choice import ModelChoice

    calls = []
    real = PromptEncoder.get_dense_pe

    def recorded(self):
        calls.append(threading.current_thread() is threading.main_thread())
        return real(self)

    monkeypatch.setattr(PromptEncoder, "get_dense_pe", recorded)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("loaded", load_for_widget(
        ModelChoice("vit_t_test", "", "cpu", backend="torch"))))
    worker.start()
    worker.join(300)
    sam, conversion = out["loaded"]
    assert conversion is None and calls == [False], calls
    Session(sam, stack.image, cache_dir=None).close()  # the GUI thread's part
    assert calls == [False], "the session computed the positional encoding again"


@pytest.mark.gui
def test_a_quick_model_load_adds_no_progress_bar_a_slow_one_does(make_napari_viewer, qtbot, stack, monkeypatch):
    """Adding a bar to napari's activity dock repaints the whole window on the GUI thread: a model
    load shows one only when it lasts longer than ``_LOAD_PROGRESS_AFTER_MS`` (the status line says
    "loading" at once)."""
    import time

    from napari_mobilesam._napari import model_panel
    from napari_mobilesam.models.choice import ModelChoice

    monkeypatch.setenv("NAPARI_MOBILESAM_DEV", "1")
    viewer = make_napari_viewer(show=True)
    viewer.add_image(stack.image, name="nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    quick = widget.load_model(ModelChoice("vit_t_test", "", "cpu", "eager"))
    assert "loading" in widget._model.status.value
    wait_idle(qtbot, widget)
    assert quick.done and quick.pbar is None

    real = model_panel.load_for_widget

    def slow(request):
        time.sleep(0.5)
        return real(request)

    monkeypatch.setattr(model_panel, "load_for_widget", slow)
    monkeypatch.setattr(model_panel, "_LOAD_PROGRESS_AFTER_MS", 100)
    slow_task = widget.load_model(ModelChoice("vit_t_test", "", "cpu", "torch"))
    qtbot.waitUntil(lambda: slow_task.pbar is not None, timeout=30_000)
    wait_idle(qtbot, widget)
    assert widget._model.request.backend == "torch"


@pytest.mark.gui
def test_a_propagation_gets_its_progress_bar_in_a_later_turn_of_the_event_loop(
    make_napari_viewer, qtbot, stack, monkeypatch
):
    """Shift-S starts the run at once (status, Stop and Cancel); napari's bar, whose insertion
    repaints the whole window, comes ``BAR_AFTER_MS`` later in its own event-loop turn, and then
    counts the slices against the engine's total (the GroundTruthOracle stands in for the model,
    0.1 s a slice). The bar is looked at when the start returns (the key's own event processing
    may outlast the delay on a loaded machine)."""
    import time

    from qtpy.QtCore import Qt

    from napari_mobilesam._napari.long_tasks import BAR_AFTER_MS, LongTaskRunner

    at_start = {}
    real_start = LongTaskRunner.start

    def start(self, *args, **kwargs):
        task = real_start(self, *args, **kwargs)
        at_start.update(pbar=task.pbar, t=time.monotonic())
        return task

    monkeypatch.setattr(LongTaskRunner, "start", start)
    viewer, _dock, widget, image, _oracle = open_session(make_napari_viewer, qtbot, stack, delay=0.1)
    z, r, c, _gt = nucleus(stack, 0)
    go_to(viewer, image, z)
    click(viewer, image, (z, r, c), qtbot=qtbot)
    wait_preview(qtbot, widget)
    key(viewer, Qt.Key.Key_S, SHIFT)
    task = widget._annotator._runner.task
    assert widget.busy and widget._stop_btn.enabled and at_start["pbar"] is None
    qtbot.waitUntil(lambda: task.pbar is not None, timeout=BAR_AFTER_MS + 5000)
    assert time.monotonic() - at_start["t"] >= BAR_AFTER_MS / 1000  # a timer never fires early
    # the bar starts at the stack's depth; by now the engine's reports may have lowered it to
    # their own upper bound, which shrinks where the object ends
    assert 0 < task.pbar.total <= stack.image.shape[0]
    qtbot.waitUntil(lambda: task.pbar.n > 0, timeout=10_000)
    wait_idle(qtbot, widget)


def test_a_task_is_done_only_after_its_end_was_handled(qtbot):
    """``Task.done`` (what the widget's ``busy`` reads) turns True after every other slot of the
    worker's ``finished`` signal ran: each slot is its own queued call on the GUI thread, and a
    test or the user could see the widget idle between them (a cancelled propagation's live
    preview was still shown after the widget said idle)."""
    from napari_mobilesam._napari.workers import start_task

    seen, holder = [], {}
    task = start_task(lambda report, cancelled: 7, description="MobileSAM: test task",
                      on_result=lambda value: seen.append(("result", holder["task"].done)),
                      on_finished=lambda: seen.append(("finished", holder["task"].done)))
    holder["task"] = task
    qtbot.waitUntil(lambda: task.done, timeout=10_000)
    assert seen == [("result", False), ("finished", False)]
