"""napari's activity spinner is slowed on software OpenGL when the widget's first progress bar
appears (``_napari/spinner.py``); CI and the test machines render with Mesa's llvmpipe."""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import QLabel

from napari_mobilesam._napari import spinner
from napari_mobilesam._napari.workers import start_task


def _movies(viewer) -> list:
    return [label.movie() for label in viewer.window._qt_window.findChildren(QLabel) if label.movie() is not None]


def test_renderer_names():
    assert spinner.is_software("llvmpipe (LLVM 15.0.6, 256 bits)")
    assert spinner.is_software("Microsoft Basic Render Driver")
    assert not spinner.is_software("NVIDIA GeForce RTX 4090/PCIe/SSE2")
    assert not spinner.is_software("Mesa Intel(R) UHD Graphics 620 (KBL GT2)")
    assert not spinner.is_software(None) and not spinner.is_software("")


@pytest.fixture
def shown_viewer(make_napari_viewer, qtbot, monkeypatch):
    monkeypatch.setattr(spinner, "_seen", spinner.weakref.WeakSet())  # each test's window is new
    viewer = make_napari_viewer(show=True)
    qtbot.wait(50)
    assert _movies(viewer), "napari's activity spinner (a QLabel with a QMovie) was not found"
    return viewer


def test_the_first_progress_bar_slows_the_spinner_on_software_opengl(shown_viewer, qtbot):
    name = spinner.renderer(shown_viewer.window._qt_window)
    assert name, "no OpenGL renderer string from the shown canvas"
    task = start_task(lambda report, cancelled: report(1, 1), description="a short task", total=1)
    qtbot.waitUntil(lambda: task.done, timeout=10_000)
    want = spinner.SPEED_PERCENT if spinner.is_software(name) else 100
    assert [m.speed() for m in _movies(shown_viewer)] == [want] * len(_movies(shown_viewer)), name


def test_a_spinner_speed_set_by_someone_else_is_kept(shown_viewer):
    for movie in _movies(shown_viewer):
        movie.setSpeed(60)
    spinner.calm_spinners()
    assert {m.speed() for m in _movies(shown_viewer)} == {60}
