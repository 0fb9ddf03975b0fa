"""Make the screenshots of ``docs/usage.md`` (PNG files in ``docs/images/``).

    python docs/make_screenshots.py                   # model: real MobileSAM if its weights are cached
    python docs/make_screenshots.py --model oracle    # ground-truth oracle (no weights needed)
    python docs/make_screenshots.py --model checkpoint --checkpoint mobile_sam.pt

It opens napari with the synthetic nuclei stack and the Segment (MobileSAM) widget and goes through
the walk-through of the usage page: click, box, commit, propagate, automatic slice segmentation.
On a machine without a screen it restarts itself under ``xvfb-run`` (install the ``xvfb`` package).

``--model auto`` (the default) uses MobileSAM when ``mobile_sam.pt`` is already in the weights cache
and otherwise the ground-truth oracle (``napari_mobilesam.testing``), which answers every
prompt with the synthetic stack's true nucleus: it shows the interface, not the model's accuracy.
The script prints which one it used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "images"), help="folder for the PNG files")
    ap.add_argument("--model", default="auto", choices=["auto", "oracle", "vit_t", "checkpoint"])
    ap.add_argument("--checkpoint", default="", help="file for --model checkpoint")
    args = ap.parse_args(argv)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and shutil.which("xvfb-run"):
        return subprocess.call(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv])

    import tempfile

    # an autosave from an earlier run would show its Restore button in the pictures
    os.environ.setdefault("NAPARI_MOBILESAM_AUTOSAVE_DIR", tempfile.mkdtemp(prefix="mobilesam-shots-"))
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_mobilesam.core.session import Session
    from napari_mobilesam.data import synthetic_nuclei
    from napari_mobilesam.models.choice import ModelChoice
    from napari_mobilesam.models.weights import weights_path
    from napari_mobilesam.testing import GroundTruthOracle

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "auto":
        model = "vit_t" if weights_path("vit_t").exists() else "oracle"

    stack = synthetic_nuclei()
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(title="napari-mobilesam", show=True)
    viewer.window._qt_window.resize(1500, 950)
    image = viewer.add_image(stack.image, name="nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")

    def wait(cond=lambda: True, timeout=300.0, settle=0.3):
        end = time.perf_counter() + timeout
        while not cond():
            app.processEvents()
            time.sleep(0.01)
            if time.perf_counter() > end:
                raise TimeoutError(f"timed out; widget says: {widget.status}")
        end = time.perf_counter() + settle
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.01)

    def shot(name, canvas_only=True):
        path = out / name
        viewer.screenshot(str(path), canvas_only=canvas_only, flash=False)
        print(f"wrote {path}")

    if model == "oracle":
        oracle = GroundTruthOracle(stack.labels, stack.image)
        widget.set_session(Session(None, image.data, rgb=False, predictor=oracle), "ground-truth oracle (not a model)")
        print("model: ground-truth oracle (no MobileSAM weights in the cache)")
    else:
        widget.load_model(ModelChoice("vit_t" if model == "vit_t" else "checkpoint", args.checkpoint, "auto"))
        wait(lambda: not widget.busy)
        if widget.session is None:
            raise SystemExit(f"the model did not load: {widget.status}")
        print(f"model: {widget.model_request().describe()}")

    # nucleus A: the largest one; its centre slice; nucleus B: another one on the same slice
    sizes = np.bincount(stack.labels.ravel())[1:]
    a = int(np.argmax(sizes)) + 1
    z, ra, ca = (int(round(v)) for v in stack.centers[a - 1])
    others = [i for i in np.unique(stack.labels[z]) if i not in (0, a)]
    b = max(others, key=lambda i: (stack.labels[z] == i).sum())

    # 1. the widget as it opens
    viewer.dims.set_point(0, float(z))
    viewer.reset_view()
    wait(lambda: not widget.busy)
    shot("01_widget.png", canvas_only=False)

    # 2. a positive click on A, a negative click on B next to it
    widget.points_layer.add([z, ra, ca])
    wait(lambda: widget.preview_layer.data.any() and not widget.busy)
    rb, cb = np.argwhere(stack.labels[z] == b).mean(axis=0).round().astype(int)
    widget.points_layer.feature_defaults["positive"] = False  # what Shift-click does
    widget.points_layer.add([z, rb, cb])
    widget.points_layer.feature_defaults["positive"] = True
    wait(lambda: not widget.busy)
    viewer.camera.center = (float(z), (ra + rb) / 2, (ca + cb) / 2)
    viewer.camera.zoom *= 2.5
    shot("02_click_preview.png")
    widget.commit()
    wait()

    # 3. a box around B
    rows, cols = np.nonzero(stack.labels[z] == b)
    r0, r1, c0, c1 = rows.min() - 3, rows.max() + 3, cols.min() - 3, cols.max() + 3
    widget.boxes_layer.add_rectangles(np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], float))
    wait(lambda: widget.preview_layer.data.any() and not widget.busy)
    shot("03_box_prompt.png")

    # 4. commit B too, then propagate both committed objects in one pass (Shift-S without prompts)
    widget.commit()
    wait()
    widget.propagate()
    wait(lambda: not widget.busy)
    target = widget.target_layer(create=False)
    viewer.reset_view()
    shot("04_propagated.png", canvas_only=False)
    viewer.dims.ndisplay = 3
    image.visible = False
    widget.preview_layer.visible = False
    viewer.reset_view()
    viewer.camera.angles = (-10.0, 35.0, 130.0)
    viewer.camera.center = tuple(np.argwhere(target.data).mean(axis=0))
    viewer.camera.zoom *= 3.0
    wait(settle=1.0)
    shot("05_propagated_3d.png")
    viewer.dims.ndisplay = 2
    image.visible = widget.preview_layer.visible = True

    # 5. automatic segmentation of another slice into the preview
    z2 = min(z + 3, stack.image.shape[0] - 1)
    viewer.dims.set_point(0, float(z2))
    viewer.reset_view()
    wait(lambda: not widget.busy)
    widget.segment_slice_automatically()
    wait(lambda: not widget.busy)
    shot("06_automatic.png", canvas_only=False)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
