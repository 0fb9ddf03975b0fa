"""What keeps the GUI thread from stalling while workers run (see benchmarks/interaction.py --stalls)."""

from __future__ import annotations

import pytest


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
