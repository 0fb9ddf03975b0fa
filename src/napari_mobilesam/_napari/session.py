"""The engine objects behind the widget for one (model, image) pair, and model loading.

:class:`Session` bundles a :class:`~napari_mobilesam.image.SliceSource`, an
:class:`~napari_mobilesam.embeddings.EmbeddingCache` and a
:class:`~napari_mobilesam.predictor.SlicePredictor`, and offers the few calls the widget makes:
is a slice embedded, embed it, prefetch neighbours, predict one object, segment a slice
automatically, propagate. All arrays are napari-ordered: points ``(row, col)``, boxes
``(row0, col0, row1, col1)``, masks ``(H, W)`` and stacks ``(Z, H, W)``.

Nothing here imports Qt or napari; torch is only reached through the engine modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ModelLoadError", "ModelRequest", "load_requested_model", "Session", "ObjectPrediction"]


class ModelLoadError(RuntimeError):
    """The model chosen in the widget could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelRequest:
    """What the user picked in the widget.

    Attributes
    ----------
    model : str
        ``"vit_t"`` (MobileSAM with its downloaded weights), ``"checkpoint"`` (a SAM/MobileSAM
        state-dict file), ``"distilled"`` (a distilled MobileSAM file) or ``"vit_t_test"``.
    checkpoint : str
        The file for ``"checkpoint"`` / ``"distilled"``; ignored otherwise.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    """

    model: str = "vit_t"
    checkpoint: str = ""
    device: str = "auto"

    def describe(self) -> str:
        what = Path(self.checkpoint).name if self.model in ("checkpoint", "distilled") else self.model
        return f"{what} on {self.device}"


def load_requested_model(request: ModelRequest):
    """Load the model the widget asked for (slow: call it in a worker).

    Returns
    -------
    segment_anything.modeling.Sam
        In eval mode, with the fastest backend for the device (``build.load_model``).

    Raises
    ------
    ModelLoadError
        With a message naming the problem and the fix (no file chosen, file missing, weights that
        cannot be downloaded offline, a checkpoint of the wrong architecture...).
    """
    from .. import build

    device = None if request.device in ("", "auto") else request.device
    try:
        if request.model in ("checkpoint", "distilled"):
            if not request.checkpoint:
                raise ModelLoadError(
                    "no checkpoint file chosen: pick the .pt file in the widget's 'checkpoint' field"
                )
            path = Path(request.checkpoint).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"checkpoint file not found: {path}")
            from ..checkpoint import detect_architecture, read_state_dict

            state = read_state_dict(path)
            arch = detect_architecture(state) or "vit_t"
            return build.load_model(arch, state, device)
        return build.load_model(request.model, None, device)
    except ModelLoadError:
        raise
    except (OSError, ConnectionError) as exc:
        hint = (
            " The default MobileSAM weights are downloaded on first use; this computer could not "
            "fetch them. Connect to the internet once, or download mobile_sam.pt elsewhere and "
            "choose it as 'MobileSAM checkpoint file'."
            if request.model == "vit_t"
            else ""
        )
        raise ModelLoadError(f"could not load {request.describe()}: {exc}.{hint}") from exc
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"could not load {request.describe()}: {exc}") from exc


@dataclass(frozen=True)
class ObjectPrediction:
    """One object predicted from the prompts of one slice.

    Attributes
    ----------
    z : int
    mask : (H, W) bool
    score : float
        The decoder's predicted IoU of the chosen mask.
    low_res : (256, 256) float32 or None
        The chosen mask's low-resolution logits (can seed the next prediction).
    """

    z: int
    mask: np.ndarray
    score: float
    low_res: np.ndarray | None = None


class Session:
    """Engine objects for one model and one image.

    Parameters
    ----------
    sam : Sam or None
        The model. None only together with ``predictor`` (a test oracle that needs no model).
    data : array-like
        The image layer's data: ``(H, W)``, ``(H, W, 3|4)``, ``(Z, H, W)`` or ``(Z, H, W, 3|4)``.
    rgb : bool
        Whether the last axis of ``data`` is colour.
    predictor : SlicePredictor-like, optional
        Replaces the engine's predictor (``predict``/``predict_many`` with the same signatures).
    cache_dir : path, optional
        On-disk embedding cache (default: ``$NAPARI_MOBILESAM_CACHE/embeddings`` when that
        variable is set, else memory only).
    """

    def __init__(self, sam, data, *, rgb: bool, predictor=None, cache_dir=None):
        from ..image import SliceSource

        self.sam = sam
        self.source = SliceSource(data, rgb=rgb)
        self.cache = None
        if predictor is None:
            from ..embeddings import EmbeddingCache
            from ..predictor import SlicePredictor

            if cache_dir is None and os.environ.get("NAPARI_MOBILESAM_CACHE"):
                cache_dir = Path(os.environ["NAPARI_MOBILESAM_CACHE"]) / "embeddings"
            self.cache = EmbeddingCache(sam, disk_dir=cache_dir)
            predictor = SlicePredictor(sam, self.source, self.cache)
        self.predictor = predictor

    @property
    def n_slices(self) -> int:
        return self.source.n_slices

    # -- embeddings ------------------------------------------------------------------------------
    def is_embedded(self, z: int) -> bool:
        """True when slice ``z``'s embedding is cached (a prediction there is fast)."""
        if self.cache is None:
            return True
        return self.cache.is_cached(self.source, z)

    def embed(self, z: int) -> None:
        """Compute (or load) slice ``z``'s embedding. Slow: call it in a worker."""
        if self.cache is not None:
            self.cache.get(self.source, z)

    def prefetch(self, zs) -> None:
        """Embed slices ``zs`` in the cache's background thread (earlier prefetches dropped)."""
        if self.cache is not None:
            zs = [z for z in zs if 0 <= z < self.n_slices]
            if zs:
                self.cache.prefetch(self.source, zs)

    def close(self) -> None:
        """Stop background prefetching."""
        if self.cache is not None:
            self.cache.close()

    # -- prompts ---------------------------------------------------------------------------------
    def predict(self, z: int, points, labels, box=None, mask_input=None) -> ObjectPrediction:
        """The best mask for the prompts of slice ``z``.

        ``points`` (N, 2) ``(row, col)``, ``labels`` (N,) 1/0, ``box`` ``(row0, col0, row1, col1)``
        or None. One lone point is ambiguous, so SAM's three candidates are asked for and the one
        with the highest predicted IoU is kept; with more prompts, the single-mask output is used.
        """
        points = None if points is None or len(points) == 0 else np.asarray(points, float)
        labels = None if points is None else np.asarray(labels, int)
        n_prompts = (0 if points is None else len(points)) + (box is not None)
        pred = self.predictor.predict(
            z, points=points, labels=labels, box=box, mask_input=mask_input, multimask=n_prompts == 1
        )
        iou = np.asarray(pred.iou, dtype=float).reshape(-1)
        best = int(np.argmax(iou))
        low_res = getattr(pred, "low_res", None)
        return ObjectPrediction(
            z=z,
            mask=np.asarray(pred.masks[best], dtype=bool),
            score=float(iou[best]),
            low_res=None if low_res is None else np.asarray(low_res[best], dtype=np.float32),
        )

    def segment_automatically(self, z: int, params: Any = None) -> np.ndarray:
        """All objects of slice ``z`` as an (H, W) int32 label image (ids 1..N). Slow: worker."""
        from ..automatic import segment_slice

        return segment_slice(self.predictor, z, params).labels
