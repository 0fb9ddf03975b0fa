"""The Segment widget on big (tiled) slices, driven by real Qt mouse and key events.

Slices larger than 1536 pixels are cut into 1024-pixel tiles by ``Session(tile="auto")``; the
widget must show and write masks at full resolution, embed only the tiles the user works in (in a
worker, not on the GUI thread), propagate and segment automatically on tiled slices. The model is
the REAL engine with the tiny random ``vit_t_test`` encoder (seeded: masks are arbitrary but
deterministic), so shapes, tiles and writes are checked, not mask quality. Input helpers come from
``test_user_flow``.
"""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt
from test_user_flow import CTRL, SHIFT, click, go_to, key, wait_idle, wait_preview

from napari_mobilesam.models.choice import ModelChoice


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MOBILESAM_CONFIG", str(tmp_path / "config"))
    monkeypatch.delenv("NAPARI_MOBILESAM_DEV", raising=False)


def _disks(shape, centers, radius=14, dtype=np.uint8, high=200):
    """A noisy dark image with bright disks at ``centers`` ((row, col)) on every slice."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 20, size=shape).astype(dtype)
    rr, cc = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    disk = rr**2 + cc**2 <= radius**2
    for r, c in centers:
        img[..., r - radius : r + radius + 1, c - radius : c + radius + 1][..., disk] = high
    return img


def _open(make_napari_viewer, qtbot, data, engine_sam_test):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 800)
    image = viewer.add_image(data, name="big")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    widget.set_model(engine_sam_test, ModelChoice("vit_t_test", "", "cpu"))
    wait_idle(qtbot, widget)
    viewer.reset_view()
    qtbot.wait(100)
    return viewer, widget, image


def _preview(qtbot, widget, timeout=60_000):
    """Wait for the preview (the tile's embedding is computed in a worker first)."""
    wait_idle(qtbot, widget, timeout=timeout)
    wait_preview(qtbot, widget, timeout=timeout)
    return widget.preview_layer.data


# tile 0's core is rows/cols [0, 896); tile 10's is rows/cols [1664, 2432) (1024-pixel tiles, 128 halo)
NEAR_BORDER = (880, 880)
OTHER_TILE = (2000, 2000)


@pytest.fixture
def follow_two_tiles(monkeypatch):
    """The random model's masks cover most of a slice, so following one object through all 16
    tiles of a 2600-pixel slice (on the GUI thread) takes ~20 s per click on 2 busy cores; here an
    object is followed into at most one neighbouring tile (the engine allows 16)."""
    from napari_mobilesam.core import tiles

    monkeypatch.setattr(tiles, "_MAX_TILES_PER_OBJECT", 2)


@pytest.mark.gui
def test_click_commit_and_undo_on_a_tiled_2d_image(make_napari_viewer, qtbot, engine_sam_test, follow_two_tiles):
    data = _disks((2600, 2600), [NEAR_BORDER, OTHER_TILE])
    viewer, widget, image = _open(make_napari_viewer, qtbot, data, engine_sam_test)
    session = widget.session
    assert session.tiled and session.cache is not None
    assert session.cache.stats.computed == 0  # nothing embedded before a click
    # 1. a click near the border of tile 0: the preview comes at full resolution
    click(viewer, image, NEAR_BORDER)
    preview = _preview(qtbot, widget)
    assert preview.shape == data.shape and preview.any()
    # only tile 0 (and the one the mask was followed into) were embedded: never the whole slice
    grid = session.predictor.grid
    assert grid.tile_at(*NEAR_BORDER).index == 0
    assert session.cache.is_cached(session.predictor.tile_predictor(0).source, 0)
    assert not session.cache.is_cached(session.source, 0)
    first = session.cache.stats.computed
    assert 1 <= first <= 2
    shown = preview > 0
    # 2. C commits it at full resolution
    key(viewer, Qt.Key.Key_C)
    target = widget.target_layer(create=False)
    assert target.data.shape == data.shape
    np.testing.assert_array_equal(target.data == 1, shown)
    # 3. a click on another tile works too
    assert grid.tile_at(*OTHER_TILE).index == 10
    click(viewer, image, OTHER_TILE)
    preview2 = _preview(qtbot, widget)
    assert preview2.shape == data.shape and preview2.any()
    assert not np.array_equal(preview2 > 0, shown)
    assert session.cache.stats.computed > first
    key(viewer, Qt.Key.Key_C)
    assert set(np.unique(target.data)) == {0, 1, 2}
    # 4. Ctrl-Z on the labels layer takes the second commit back
    viewer.layers.selection.active = target
    key(viewer, Qt.Key.Key_Z, CTRL)
    assert set(np.unique(target.data)) == {0, 1}
    np.testing.assert_array_equal(target.data == 1, shown)


@pytest.fixture
def encoder_threads(monkeypatch):
    """Records, for every encoder run, whether it ran on the GUI (main) thread and its input shape."""
    import threading

    from napari_mobilesam.core import embeddings

    calls: list[tuple[bool, tuple[int, int]]] = []
    real = embeddings.compute_embedding

    def recording(sam, rgb):
        calls.append((threading.current_thread() is threading.main_thread(), tuple(rgb.shape[:2])))
        return real(sam, rgb)

    monkeypatch.setattr(embeddings, "compute_embedding", recording)
    return calls


@pytest.mark.gui
def test_the_gui_thread_never_runs_the_encoder_when_a_mask_spreads_over_tiles(
    make_napari_viewer, qtbot, engine_sam_test, encoder_threads, monkeypatch, tmp_path
):
    """A click near a tile border: the tile holding it is embedded in a worker, the preview shows
    what that tile gives, and the tiles the mask runs into are embedded in the worker too (the
    preview grows as they arrive). No encoder run on the GUI thread; the final preview is the
    engine's whole prediction."""
    from napari_mobilesam.core import tiles

    monkeypatch.setattr(tiles, "_MAX_TILES_PER_OBJECT", 3)  # a few tiles: the test stays short
    monkeypatch.setenv("NAPARI_MOBILESAM_CACHE", str(tmp_path))  # no tile from an earlier test on disk
    data = _disks((2600, 2600), [NEAR_BORDER])
    viewer, widget, image = _open(make_napari_viewer, qtbot, data, engine_sam_test)
    session = widget.session
    click(viewer, image, NEAR_BORDER)
    preview = _preview(qtbot, widget, timeout=180_000) > 0
    assert len(encoder_threads) >= 2, f"the mask was not followed into another tile: {encoder_threads}"
    assert not any(on_gui for on_gui, _ in encoder_threads), encoder_threads
    assert {shape for _, shape in encoder_threads} == {(1024, 1024)}  # tiles, never the whole slice
    # every tile the object needs is embedded now: the engine's prediction is decoder-only and
    # equals what the widget shows
    n = len(encoder_threads)
    clicked = np.asarray(widget.points_layer.data, float).reshape(-1, 2)  # where the click landed
    full = session.predict(0, clicked, np.ones(len(clicked), int))
    assert len(encoder_threads) == n
    np.testing.assert_array_equal(preview, full.mask)
    grid = session.predictor.grid
    assert len({grid.tile_at(r, c).index for r, c in np.argwhere(preview)[:: 97]}) >= 2, "merged across tiles"


@pytest.fixture
def lenient_propagation(monkeypatch):
    """The random model predicts IoUs below the default stop threshold (0.5) and masks that jump
    between slices, so propagation would stop after the seed; here it stops only at the stack's end."""
    import functools

    from napari_mobilesam.volume import propagation

    lenient = functools.partial(propagation.propagate, min_score=0.0, min_overlap=0.0, area_ratio=(0.0, 1e9))
    monkeypatch.setattr(propagation, "propagate", lenient)


@pytest.mark.gui
def test_shift_s_propagates_through_a_stack_of_tiled_slices(
    make_napari_viewer, qtbot, engine_sam_test, follow_two_tiles, lenient_propagation
):
    """3 x 2000 x 2000 uint16 (9 tiles a slice): a click, Shift-S (a worker), labels on every
    slice at full resolution, one undo step. (Found: a propagation prompt made from a large mask
    had points outside the tile holding its box centre, and failed with a PromptError.)"""
    data = _disks((3, 2000, 2000), [(1200, 1000)], dtype=np.uint16, high=40_000)
    viewer, widget, image = _open(make_napari_viewer, qtbot, data, engine_sam_test)
    assert widget.session.tiled and widget.session.n_slices == 3
    go_to(viewer, image, 1)
    click(viewer, image, [1, 1200, 1000])
    preview = _preview(qtbot, widget)
    assert preview.shape == (1, 2000, 2000)
    shown = preview[0] > 0
    key(viewer, Qt.Key.Key_S, SHIFT)
    assert widget.busy  # the propagation runs in a worker
    wait_idle(qtbot, widget, timeout=120_000)
    target = widget.target_layer(create=False)
    assert target.data.shape == data.shape
    for z in range(3):
        assert (target.data[z] > 0).any(), f"nothing written on slice {z}: {widget.status!r}"
    assert (target.data[1] > 0)[shown].all()  # the seed slice holds (at least) what was previewed
    # one undo step takes the whole propagation back
    viewer.layers.selection.active = target
    key(viewer, Qt.Key.Key_Z, CTRL)
    assert not target.data.any()


@pytest.mark.gui
def test_automatic_segmentation_of_the_slice_in_view_on_a_tiled_image(
    make_napari_viewer, qtbot, engine_sam_test
):
    """The widget's automatic button on a 1600 x 700 slice (longer than 1536: 2 tiles, each one
    encoder pass and a grid of prompts): a worker, then a preview of the whole slice's shape."""
    data = _disks((1600, 700), [(300, 300), (800, 400), (1300, 500)])
    viewer, widget, image = _open(make_napari_viewer, qtbot, data, engine_sam_test)
    assert widget.session.tiled and len(widget.session.predictor.grid) == 2
    widget._auto_btn.native.click()  # a real button click
    assert widget.busy  # runs in a worker
    wait_idle(qtbot, widget, timeout=300_000)
    assert widget._preview_kind == "auto", widget.status
    assert widget.preview_layer.data.shape == data.shape
    assert "objects found" in widget.status
    assert widget.session.cache.stats.computed == 2  # each tile once, never the whole slice


def test_a_prompt_reaching_beyond_its_tile_is_clipped_to_it():
    """Engine part of the propagation fix: in the tile chosen for a prompt (by its box centre),
    points outside the tile's window are dropped and the box is clipped, instead of the tile's
    predictor rejecting the prompt."""
    from napari_mobilesam.core.predictor import Prompt
    from napari_mobilesam.core.tiles import TileGrid, _shift

    grid = TileGrid((2000, 2000))
    p = Prompt(points=np.array([[1200.0, 1000.0], [100.0, 100.0]]), labels=np.array([1, 1]),
               box=np.array([700.0, 600.0, 1700.0, 1500.0]))
    tile = grid.tile_at(1200, 1050)  # the box centre
    r0, _, c0, _ = tile.outer
    q = _shift(p, r0, c0, tile.shape)
    h, w = tile.shape
    np.testing.assert_array_equal(q.points, [[1200.0 - r0, 1000.0 - c0]])
    np.testing.assert_array_equal(q.labels, [1])
    assert q.box.min() >= 0 and q.box[[0, 2]].max() <= h - 1 and q.box[[1, 3]].max() <= w - 1
    np.testing.assert_array_equal(_shift(p, r0, c0).points, p.points - (r0, c0))  # no shape: as before
