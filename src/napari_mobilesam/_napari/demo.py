"""Open napari with the napari-mobilesam dock widgets and the synthetic nuclei stack.

Run as ``python -m napari_mobilesam._napari.demo`` (``./quickstart demo`` does this).
"""

from __future__ import annotations

import argparse


def build_viewer(sample: str = "nuclei_3d"):
    """Create a viewer with the sample data and every dock widget the plugin declares."""
    import napari
    from npe2 import PluginManager

    viewer = napari.Viewer(title="napari-mobilesam demo")
    viewer.open_sample("napari-mobilesam", sample)
    manifest = PluginManager.instance().get_manifest("napari-mobilesam")
    for widget in manifest.contributions.widgets or []:
        viewer.window.add_plugin_dock_widget("napari-mobilesam", widget.display_name)
    return viewer


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
