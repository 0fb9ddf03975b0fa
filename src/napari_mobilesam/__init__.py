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
    "build_sam": ".models.registry",
    "load_model": ".models.registry",
    "model_identity": ".models.registry",
    "SliceSource": ".core.source",
    "EmbeddingCache": ".core.embeddings",
    "SlicePredictor": ".core.predictor",
    "Prompt": ".core.predictor",
    "Prediction": ".core.predictor",
    "PromptError": ".core.predictor",
    "propagate": ".volume.propagation",
    "ObjectPrompts": ".volume.propagation",
    "PropagationResult": ".volume.propagation",
    "objects_from_labels": ".volume.propagation",
    "AutoParams": ".volume.automatic",
    "Stitcher": ".volume.automatic",
    "segment_slice": ".volume.automatic",
    "Prompts": ".io.prompts",
    "read_prompts_csv": ".io.prompts",
    "prompts_from_points": ".io.prompts",
    "prompts_from_shapes": ".io.prompts",
    "prompts_from_arrays": ".io.prompts",
    "segment_stack": ".batch",
    "propagate_stack": ".batch",
    "segment_stack_auto": ".batch",
    "open_stack": ".io.stacks",
    "open_image": ".io.images",
    "ModelChoice": ".models.choice",
    "Session": ".core.session",
    "TiledPredictor": ".core.tiles",
    "add_labels_layer": ".batch",
    "DistillConfig": ".distillation.run",
    "DistillEvent": ".distillation.run",
    "DistillResult": ".distillation.run",
    "DistillError": ".distillation.run",
    "iter_distill": ".distillation.run",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
