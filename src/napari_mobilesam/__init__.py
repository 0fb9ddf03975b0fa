"""napari-mobilesam: MobileSAM segmentation of microscopy stacks, for napari and scripts.

Importing this package is cheap: it imports neither torch nor Qt nor napari (napari reads the
plugin manifest at start-up). The public functions below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "synthetic_nuclei": ".data",
    "cell_image": ".data",
    "NucleiStack": ".data",
    "build_sam": ".build",
    "load_model": ".build",
    "model_identity": ".build",
    "SliceSource": ".image",
    "EmbeddingCache": ".embeddings",
    "SlicePredictor": ".predictor",
    "Prompt": ".predictor",
    "Prediction": ".predictor",
    "PromptError": ".predictor",
    "propagate": ".propagate",
    "ObjectPrompts": ".propagate",
    "PropagationResult": ".propagate",
    "objects_from_labels": ".propagate",
    "AutoParams": ".automatic",
    "Stitcher": ".automatic",
    "segment_slice": ".automatic",
    "Prompts": ".prompts_io",
    "read_prompts_csv": ".prompts_io",
    "prompts_from_points": ".prompts_io",
    "prompts_from_shapes": ".prompts_io",
    "prompts_from_arrays": ".prompts_io",
    "segment_stack": ".batch",
    "propagate_stack": ".batch",
    "segment_stack_auto": ".batch",
    "open_stack": ".stack_io",
    "add_labels_layer": ".batch",
    "DistillConfig": ".distill",
    "DistillEvent": ".distill",
    "DistillResult": ".distill",
    "DistillError": ".distill",
    "iter_distill": ".distill",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module(module, __name__)
    # Bind every public name of that module now: importing a submodule sets the package attribute of
    # the same name to the module itself (e.g. ``propagate``), which must not shadow the function.
    for other, where in _LAZY.items():
        if where == module:
            globals()[other] = getattr(mod, other)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
