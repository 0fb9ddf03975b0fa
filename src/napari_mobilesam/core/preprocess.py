"""SAM's input for one slice: the single place where an RGB slice becomes the encoder's tensor.

Inference (:func:`napari_mobilesam.core.embeddings.compute_embedding`) and distillation
(:mod:`napari_mobilesam.distillation`) both call :func:`preprocess_rgb`, so a student is trained on
exactly what it later sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from ..models.registry import PIXEL_MEAN, PIXEL_STD

__all__ = [
    "PIXEL_MEAN", "PIXEL_STD", "encoder_size", "input_size_for", "microsam_rgb", "preprocess_rgb",
]


def encoder_size(sam: Any) -> int:
    """The square input size of ``sam``'s image encoder (1024 for every SAM-family model)."""
    return int(getattr(sam.image_encoder, "img_size", 1024))


def input_size_for(original_size: tuple[int, int], long_side: int = 1024) -> tuple[int, int]:
    """(h, w) of a (H, W) image resized so its longest side is ``long_side`` (SAM's rule)."""
    h, w = original_size
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def preprocess_rgb(
    rgb: np.ndarray,
    img_size: int = 1024,
    *,
    mean: Any = PIXEL_MEAN,
    std: Any = PIXEL_STD,
    device: Any = None,
) -> tuple[Any, tuple[int, int]]:
    """SAM's input for one (H, W, 3) uint8 RGB slice.

    The longest side is resized to ``img_size`` (segment-anything's ``ResizeLongestSide``:
    bilinear, antialiased, uint8), normalised with ``mean``/``std`` (SAM's by default; a model's
    ``pixel_mean``/``pixel_std`` tensors work too), then zero-padded bottom and right.

    Returns ``(image, (h, w))``: a ``(3, img_size, img_size)`` float32 tensor on ``device`` and the
    size of the resized image inside the padded square.
    """
    import torch
    import torch.nn.functional as F
    from segment_anything.utils.transforms import ResizeLongestSide

    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        got = f"{rgb.shape} {rgb.dtype}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise InputError(f"expected an (H, W, 3) uint8 RGB image, got {got}")
    resized = ResizeLongestSide(img_size).apply_image(np.ascontiguousarray(rgb))
    h, w = resized.shape[:2]
    x = torch.as_tensor(resized, device=device).permute(2, 0, 1).float()
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(3, 1, 1)
    x = F.pad((x - mean_t) / std_t, (0, img_size - w, 0, img_size - h))
    return x.contiguous(), (h, w)


def microsam_rgb(image: np.ndarray) -> np.ndarray:
    """micro-sam's conversion of a raw slice to SAM's uint8 RGB (``micro_sam.util._to_image``).

    ``image``: ``(H, W)`` (repeated to 3 channels) or ``(H, W, 3)``, any real dtype. Per channel,
    in float32: subtract the minimum, divide by (the maximum after that + 1e-7), multiply by 255
    and truncate to uint8. Returns ``(H, W, 3)`` uint8 — identical to micro-sam's, so the micro-sam
    models see exactly the input they were trained and evaluated with. (Our default path for
    MobileSAM maps percentiles instead: :class:`napari_mobilesam.core.source.SliceSource`.)
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise InputError(
            f"expected an (H, W) or (H, W, 3) numeric image, got shape {a.shape} {a.dtype}"
        )
    from .source import minmax_to_uint8

    return minmax_to_uint8(a)
