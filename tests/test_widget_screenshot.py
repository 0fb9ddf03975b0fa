"""Screenshot under Xvfb: after a click, the preview overlay covers the clicked nucleus.

The prompt is answered by ``GroundTruthOracle`` (``_napari/oracle.py``: a stand-in for the
predictor that returns the ground-truth object, not a model), so the expected overlay is known
exactly; what is tested is the rendering path: the prompt layer, the one-slice preview layer at the
right z, its colours over the image, and the canvas.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from test_segment_widget import _nucleus

from napari_mobilesam._napari import segment_widget as sw
from napari_mobilesam.core.session import Session
from napari_mobilesam.testing import GroundTruthOracle


def _screen_to_data(viewer, image, shape, rows, cols):
    """Canvas pixels (screenshot rows/cols) -> image data (row, col) of the displayed slice."""
    cam = viewer.camera
    center = np.asarray(cam.center)[-2:]
    world_r = center[0] + (rows + 0.5 - shape[0] / 2) / cam.zoom
    world_c = center[1] + (cols + 0.5 - shape[1] / 2) / cam.zoom
    z_world = viewer.dims.point[0]
    data = np.array([image.world_to_data([z_world, r, c]) for r, c in zip(world_r, world_c)])
    return data[:, 1], data[:, 2]


def test_preview_overlay_covers_the_clicked_nucleus(make_napari_viewer, qtbot, stack, tmp_path):  # noqa: F811
    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(stack.image, name="nuclei", scale=(3.0, 1.0, 1.0))
    widget = sw.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    oracle = GroundTruthOracle(stack.labels, stack.image)
    widget.set_session(Session(None, image.data, rgb=False, predictor=oracle))
    z, r, c, gt_id = _nucleus(stack, 0)
    viewer.window._qt_window.resize(1400, 900)
    viewer.dims.set_point(0, float(image.data_to_world([z, 0, 0])[0]))
    widget.points_layer.add([z, r, c])
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=5000)
    viewer.reset_view()
    qtbot.wait(300)
    after = viewer.screenshot(str(tmp_path / "preview.png"), canvas_only=True, flash=False).astype(int)
    assert (tmp_path / "preview.png").stat().st_size > 0
    widget.preview_layer.visible = False  # same layout, same prompt marker: only the overlay differs
    qtbot.wait(300)
    before = viewer.screenshot(canvas_only=True, flash=False).astype(int)
    assert before.shape == after.shape

    changed = np.abs(after[..., :3] - before[..., :3]).sum(-1) > 40
    rows, cols = np.nonzero(changed)
    assert rows.size > 50, "the preview changed (almost) nothing on the canvas"
    dr, dc = _screen_to_data(viewer, image, changed.shape, rows, cols)
    inside = np.zeros(len(rows), bool)
    obj = ndi.binary_dilation(stack.labels[z] == gt_id, iterations=2)
    ok = (dr >= 0) & (dr < obj.shape[0]) & (dc >= 0) & (dc < obj.shape[1])
    inside[ok] = obj[dr[ok].astype(int), dc[ok].astype(int)]
    assert inside.mean() > 0.95, f"only {inside.mean():.0%} of the changed pixels lie on the nucleus"
    # and the overlay covers most of the nucleus (screen pixels per data pixel: zoom**2)
    area_screen = (stack.labels[z] == gt_id).sum() * viewer.camera.zoom**2
    assert rows.size > 0.6 * area_screen, (rows.size, area_screen)
