"""napari's activity spinner: window repaints and GUI-thread time while a progress bar exists.

``xvfb-run -a python benchmarks/spinner.py [--seconds 3] [--runs 3]``

A shown napari viewer (1400 x 900) with a 16 x 512 x 512 image. While a napari progress bar
exists, napari animates a spinner (a 33 frames-a-second GIF) beside its activity button, and with
an OpenGL canvas in the window every frame makes Qt compose the whole window with OpenGL. Timed:
the window's paint events (``QEvent.UpdateRequest``: their number and the time the GUI thread
spends in them) over ``--seconds`` with the event loop running, median of ``--runs``:

* no progress bar;
* baseline: a progress bar, napari's spinner at its own speed;
* a progress bar after ``calm_spinners()`` (what the widget does before its first progress bar,
  on software OpenGL only; the row is skipped elsewhere).
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
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each measurement (default 3)")
    ap.add_argument("--runs", type=int, default=3, help="measurements per row (default 3)")
    args = ap.parse_args(argv)

    import napari
    import numpy as np
    from napari.utils import progress
    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication

    from napari_mobilesam._napari import spinner

    viewer = napari.Viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1400, 900)
    viewer.add_image(np.random.default_rng(0).random((16, 512, 512), dtype=np.float32))
    app = QApplication.instance()
    paints = {"n": 0, "s": 0.0}
    original = type(window).event

    def timed(self, event):
        if event.type() != QEvent.Type.UpdateRequest:
            return original(self, event)
        t0 = time.perf_counter()
        try:
            return original(self, event)
        finally:
            paints["s"] += time.perf_counter() - t0
            paints["n"] += 1

    type(window).event = timed

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.002)

    def measure(with_bar: bool) -> tuple[list[float], list[float]]:
        counts, shares = [], []
        for _ in range(args.runs):
            bar = progress(total=40, desc="measuring") if with_bar else None
            spin(0.3)  # the bar's own creation is not measured
            paints.update(n=0, s=0.0)
            spin(args.seconds)
            counts.append(paints["n"] / args.seconds)
            shares.append(100 * paints["s"] / args.seconds)
            if bar is not None:
                bar.close()
            spin(0.3)
        return counts, shares

    spin(1.0)
    name = spinner.renderer(window)
    rows = [("no progress bar", *measure(False)), ("baseline: progress bar, napari's spinner", *measure(True))]
    if spinner.is_software(name):
        spinner.calm_spinners()
        rows.append((f"progress bar, spinner at {spinner.SPEED_PERCENT} % (the widget)", *measure(True)))
    type(window).event = original
    viewer.close()

    base = statistics.median(rows[1][2])
    print(f"\nnapari's spinner: window paints over {args.seconds:g} s, median of {args.runs}; "
          f"OpenGL renderer: {name}")
    print(f"{'what':48s} {'paints/s':>9s} {'GUI busy painting %':>20s} {'vs baseline':>12s}")
    for label, counts, shares in rows:
        share = statistics.median(shares)
        ratio = f"{share / base:11.2f}x" if base else ""
        print(f"{label:48s} {statistics.median(counts):9.1f} {share:20.1f} {ratio}")
    print(f"\nmachine: {describe_machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
