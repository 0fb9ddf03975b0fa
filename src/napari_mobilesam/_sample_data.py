"""npe2 sample-data providers (the napari layer: returns LayerData tuples)."""

from __future__ import annotations

from .data import cell_image, synthetic_nuclei


def nuclei_3d():
    """The synthetic nuclei stack with its ground-truth labels (hidden by default)."""
    stack = synthetic_nuclei()
    return [
        (
            stack.image,
            {"name": "nuclei", "colormap": "gray", "contrast_limits": _limits(stack.image)},
            "image",
        ),
        (stack.labels, {"name": "nuclei ground truth", "visible": False, "opacity": 0.5}, "labels"),
    ]


def cell_2d():
    """scikit-image's 2D ``cell`` image."""
    return [(cell_image(), {"name": "cell", "colormap": "gray"}, "image")]


def _limits(image):
    import numpy as np

    lo, hi = np.percentile(image, (0.5, 99.8))
    return [float(lo), float(hi)]
