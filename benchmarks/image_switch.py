"""Picking another image in the Segment widget: how long the GUI thread is busy.

``xvfb-run -a python benchmarks/image_switch.py [--images 4] [--rounds 3] [--objects 300000]``

A shown napari viewer with ``--images`` images (a 16 x 256 x 256 stack and 2D slices of it) and
the Segment (MobileSAM) widget. Each pick swaps the helper layers (prompts, boxes, preview) and the
labels layer made for the image while it is empty: the previous image's four are taken out of the
layer list and the new image's put in. Timed: setting
the widget's image choice until Qt has processed the events it posted (the canvas drawn). The
process holds ``--objects`` extra Python objects, as a session with a model, napari and a few
layers does, because napari runs a full garbage collection whenever the canvas rebuilds its scene
after a layer is removed.

Rows: the widget as it is (the swap is one batched layer-list update: one scene rebuild); the
same with the labels layer made at the first commit instead of at the pick (what the widget did
before 2026-12-03: three layers swapped, and a fourth inserted later, at the first commit or
propagation); and the baseline, the widget's swap with each layer removed on its own (one rebuild
per removed layer). All measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe_machine  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="images in the viewer (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="picks of every image (default 3)")
    ap.add_argument("--objects", type=int, default=300_000, help="extra Python objects alive (default 300000)")
    args = ap.parse_args(argv)

    import contextlib

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mobilesam._napari import annotator, helper_layers
    from napari_mobilesam.data import synthetic_nuclei

    stack = synthetic_nuclei(shape=(16, 256, 256), n_nuclei=10)
    viewer = napari.Viewer(show=True)
    images = [viewer.add_image(stack.image, name="stack")]
    images += [viewer.add_image(stack.image[i], name=f"slice {i}") for i in range(1, args.images)]
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    for _ in range(5):
        QApplication.processEvents()
    alive = [{"i": i} for i in range(args.objects)]  # noqa: F841  (kept alive on purpose)

    def picks() -> list[float]:
        times = []
        for _ in range(args.rounds):
            for image in images[1:] + images[:1]:
                t0 = time.perf_counter()
                widget._image_combo.value = image
                QApplication.processEvents()
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    picks()  # every image's helper layers exist from here on
    rows = [("one batched update per pick (the widget)", picks())]
    at_pick = annotator.MADE_AT_PICK_MAX_VOXELS
    annotator.MADE_AT_PICK_MAX_VOXELS = 0
    try:
        rows.append(("the same, labels layer made at the first commit", picks()))
    finally:
        annotator.MADE_AT_PICK_MAX_VOXELS = at_pick
    batched = helper_layers.HelperLayers._batch
    helper_layers.HelperLayers._batch = lambda self: contextlib.nullcontext()
    try:
        rows.append(("baseline: each layer removed on its own", picks()))
    finally:
        helper_layers.HelperLayers._batch = batched
    layers = len(viewer.layers)
    viewer.close()

    base = statistics.median(rows[-1][1])
    print(f"\nPicking another image: {args.images} images, {args.rounds} rounds, "
          f"{args.objects} extra objects; {layers} layers in the viewer at the end")
    print(f"{'what':50s} {'median ms':>10s} {'max ms':>8s} {'n':>4s} {'vs baseline':>12s}")
    for name, times in rows:
        med = statistics.median(times)
        print(f"{name:50s} {med:10.0f} {max(times):8.0f} {len(times):4d} {med / base:11.2f}x")
    print(f"\nmachine: {describe_machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
