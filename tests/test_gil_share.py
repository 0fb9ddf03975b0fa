"""The short GIL switch interval the widgets hold (``_napari/gil_share.py``): set while a widget
holds it, the value found before put back by the last release, a shorter one left alone."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from napari_mobilesam._napari import gil_share


@pytest.fixture
def interval():
    """A 5 ms interval and no holder: a widget another test left open (never docked, not yet
    collected) must not decide what these tests see."""
    before, holders, state = sys.getswitchinterval(), set(gil_share._holders), dict(gil_share._state)
    gil_share._holders.clear()
    gil_share._state["before"] = None
    sys.setswitchinterval(0.005)
    yield
    gil_share._holders.clear()
    gil_share._holders.update(holders)
    gil_share._state.update(state)
    sys.setswitchinterval(before)


def test_held_by_two_restored_by_the_last(interval):
    a, b = object(), object()
    gil_share.hold(a)
    gil_share.hold(b)
    assert sys.getswitchinterval() == pytest.approx(gil_share.INTERVAL_S)
    gil_share.release(a)
    assert sys.getswitchinterval() == pytest.approx(gil_share.INTERVAL_S)
    gil_share.release(a)  # twice: no effect
    gil_share.release(b)
    assert sys.getswitchinterval() == pytest.approx(0.005) and not gil_share.held()


def test_a_shorter_interval_is_left_alone(interval):
    sys.setswitchinterval(0.0002)
    a = object()
    gil_share.hold(a)
    assert sys.getswitchinterval() == pytest.approx(0.0002)
    gil_share.release(a)
    assert sys.getswitchinterval() == pytest.approx(0.0002)


def test_a_change_made_meanwhile_is_kept(interval):
    a = object()
    gil_share.hold(a)
    sys.setswitchinterval(0.01)  # someone else's choice
    gil_share.release(a)
    assert sys.getswitchinterval() == pytest.approx(0.01)


@pytest.mark.gui
def test_the_segment_widget_holds_it_until_its_dock_closes(make_napari_viewer, qtbot, interval):
    from napari_mobilesam._napari.segment_widget import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 32, 32), np.float32))
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment (MobileSAM)")
    assert sys.getswitchinterval() == pytest.approx(gil_share.INTERVAL_S)
    widget.close_widget()
    assert sys.getswitchinterval() == pytest.approx(0.005)
