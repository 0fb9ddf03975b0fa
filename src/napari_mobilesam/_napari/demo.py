"""Open napari with the napari-mobilesam dock widgets and the synthetic nuclei stack.

Run as ``python -m napari_mobilesam._napari.demo`` (``./quickstart demo`` does this).
"""

from __future__ import annotations

import argparse


def build_viewer(sample: str = "nuclei_3d"):
    """Create a viewer set up by :func:`open_demo`."""
    import napari

    viewer = napari.Viewer(title="napari-mobilesam demo")
    open_demo(viewer, sample)
    return viewer


def open_demo(viewer, sample: str = "nuclei_3d") -> list:
    """Open the sample data and every dock widget the plugin declares in ``viewer``.

    The first widget (segmentation) is shown; the others are tabbed behind it. Returns the widgets.
    """
    from npe2 import PluginManager

    viewer.open_sample("napari-mobilesam", sample)
    manifest = PluginManager.instance().get_manifest("napari-mobilesam")
    added = [
        viewer.window.add_plugin_dock_widget("napari-mobilesam", widget.display_name, tabify=i > 0)
        for i, widget in enumerate(manifest.contributions.widgets or [])
    ]
    if added:
        from qtpy.QtCore import QTimer

        # Show the segmentation widget's tab once Qt has laid the tabs out.
        QTimer.singleShot(0, added[0][0].raise_)
    return [widget for _dock, widget in added]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sample", default="nuclei_3d", choices=["nuclei_3d", "cell_2d"], help="sample to open"
    )
    args = parser.parse_args(argv)
    import napari

    build_viewer(args.sample)
    napari.run()


if __name__ == "__main__":
    main()
