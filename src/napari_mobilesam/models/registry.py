"""Model registry and builders: MobileSAM (``vit_t``), SAM (``vit_b``/``vit_l``/``vit_h``), tests.

* :func:`build_sam` — the exact float32 PyTorch model, in eval mode, weights loaded strictly.
* :func:`load_model` — the same model with the fastest inference backend for the device applied
  (see :mod:`napari_mobilesam.models.backends`); ``backend="torch", precision="fp32"`` asks for exact float32.
* :func:`model_identity` — a string naming model, weights, backend and precision, for cache keys.

Every model is a ``segment_anything.modeling.Sam`` (prompt encoder, mask decoder and container from
``segment-anything``; for ``vit_t`` our :class:`~napari_mobilesam.models.tiny_vit.TinyViT` as
``image_encoder``), so ``segment_anything.SamPredictor`` drives it unchanged. Inputs are
``(B, 3, 1024, 1024)`` float32 and embeddings ``(B, 256, 64, 64)`` float32 for every model.

``vit_t_test`` is a tiny random encoder with the same module tree and input/output shapes, for fast
tests only: it is never downloaded and never the default.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import state_dict_digest

# SAM's input normalisation, in 0..255 RGB units (every SAM-family model, MobileSAM included).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

__all__ = ["MODELS", "ModelSpec", "build_sam", "load_model", "model_identity", "model_info"]

# Attribute set on every Sam we build: {"model": name, "source": where the weights came from}.
INFO_ATTR = "napari_mobilesam_info"


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry. ``builder(seed)`` returns a randomly initialised float32 ``Sam``."""

    name: str
    description: str
    builder: Callable[[], Any]
    needs_weights: bool = True


def _sam_parts(encoder, *, decoder_depth: int = 2, mlp_dim: int = 2048, iou_hidden: int = 256):
    from segment_anything.modeling import (
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=decoder_depth, embedding_dim=256, mlp_dim=mlp_dim, num_heads=8
            ),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_hidden,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


def _build_vit_t():
    from .tiny_vit import TinyViT, TinyViTConfig

    return _sam_parts(TinyViT(TinyViTConfig()))


def _build_vit_t_test():
    from .tiny_vit import TinyViT, TinyViTConfig

    cfg = TinyViTConfig(
        embed_dims=(16, 32, 32, 64),
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 2),
        num_classes=10,
    )
    return _sam_parts(TinyViT(cfg), decoder_depth=1, mlp_dim=256, iou_hidden=64)


def _build_segment_anything(name: str):
    def build():
        from segment_anything import sam_model_registry

        return sam_model_registry[name](checkpoint=None)

    return build


MODELS: dict[str, ModelSpec] = {
    "vit_t": ModelSpec("vit_t", "MobileSAM (TinyViT-5M encoder), the default", _build_vit_t),
    "vit_b": ModelSpec("vit_b", "SAM ViT-B (segment-anything)", _build_segment_anything("vit_b")),
    "vit_l": ModelSpec("vit_l", "SAM ViT-L (segment-anything)", _build_segment_anything("vit_l")),
    "vit_h": ModelSpec("vit_h", "SAM ViT-H (segment-anything)", _build_segment_anything("vit_h")),
    "vit_t_test": ModelSpec(
        "vit_t_test",
        "tiny random TinyViT for tests (same tree and shapes, not a usable model)",
        _build_vit_t_test,
        needs_weights=False,
    ),
}


def _spec(model: str) -> ModelSpec:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    return MODELS[model]


def build_sam(model: str = "vit_t", checkpoint=None, *, seed: int = 0):
    """Build ``model`` as an exact float32 ``Sam`` on the CPU, in eval mode.

    ``checkpoint``: a path to a state dict file, a state dict (name → tensor), or ``None``. ``None``
    means the default downloaded weights for real models (fetched into the cache on first use, see
    :mod:`napari_mobilesam.models.weights`) and a random initialisation from ``seed`` for ``vit_t_test``.
    Weights are loaded strictly (every key, every shape); problems raise
    :class:`~napari_mobilesam.models.checkpoint.CheckpointError`. Floating tensors are cast to float32.
    """
    import torch

    from .checkpoint import read_state_dict, validate_state_dict

    spec = _spec(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = spec.builder()
    source: str
    if checkpoint is None and spec.needs_weights:
        from .weights import fetch_weights

        checkpoint = fetch_weights(model)
    if checkpoint is None:
        source = f"random(seed={seed})"
    else:
        if isinstance(checkpoint, Mapping):
            state, source = dict(checkpoint), "state dict"
        elif isinstance(checkpoint, (str, os.PathLike)):
            path = Path(checkpoint).expanduser()
            state, source = read_state_dict(path), str(path)
        else:
            raise TypeError(
                f"checkpoint must be a path, a state dict or None, not {type(checkpoint).__name__}"
            )
        validate_state_dict(state, sam.state_dict(), model=model, source=f"checkpoint {source}")
        sam.load_state_dict(state, strict=True)
    sam.float().eval()
    sam.requires_grad_(False)
    setattr(sam, INFO_ATTR, {"model": model, "source": source})
    return sam


def model_info(sam) -> dict[str, str]:
    """``{"model", "source", "backend", "precision", "device"}`` of a ``Sam`` built here."""
    info = dict(getattr(sam, INFO_ATTR, {"model": "unknown", "source": "unknown"}))
    enc = sam.image_encoder
    info["backend"] = getattr(enc, "backend_name", "eager")
    info["precision"] = getattr(enc, "precision", "fp32")
    info["device"] = str(getattr(enc, "device", None) or sam.pixel_mean.device)
    return info



def model_identity(sam) -> str:
    """Stable string naming model, weights, backend and precision, e.g. for embedding caches.

    ``"vit_t:<16 hex of the weights' SHA-256>:openvino:bf16"`` (backend ``eager``, ``torch`` or
    ``openvino``). The weights part covers the image
    encoder (taken from the source torch module when a backend wraps it) and the prompt encoder and
    mask decoder; it changes when any weight changes, also in place. Two models with equal
    identities give the same embeddings.
    """
    info = model_info(sam)
    enc = sam.image_encoder
    enc_digest = getattr(enc, "weights_digest", None) or state_dict_digest(enc)
    h = hashlib.sha256(enc_digest.encode())
    h.update(state_dict_digest(sam.prompt_encoder).encode())
    dec = sam.mask_decoder
    h.update((getattr(dec, "weights_digest", None) or state_dict_digest(dec)).encode())
    return f"{info['model']}:{h.hexdigest()[:16]}:{info['backend']}:{info['precision']}"


def load_model(
    model: str = "vit_t",
    checkpoint=None,
    device=None,
    *,
    backend: str = "auto",
    precision: str = "auto",
    fast_decoder: bool = True,
):
    """Build ``model`` (see :func:`build_sam`) and apply the fastest backend for ``device``.

    ``device``: ``None`` picks CUDA, then MPS, then the CPU; or a ``torch.device``/string.
    ``backend``: ``"auto"`` (OpenVINO on the CPU, optimised torch elsewhere), ``"openvino"``,
    ``"torch"`` (BatchNorm folded, channels-last, optional bf16 autocast) or ``"eager"`` (the model
    exactly as built). ``precision``: ``"auto"`` (``"mixed"`` where bf16 pays off, else
    ``"fp32"``), ``"fp32"``, ``"mixed"`` (bf16 except the encoder's last stage and neck) or
    ``"bf16"``. ``precision="fp32"`` is exact float32 (within 1e-5 of the official model) with
    every backend; ``backend="eager"`` is the unmodified model. ``fast_decoder=False`` keeps
    segment-anything's own torch mask decoder (by default the CPU runs the same function,
    rearranged to be cheaper, through OpenVINO or torch: see :mod:`napari_mobilesam.models.backends`). Returns a ``Sam`` in eval mode that
    ``SamPredictor`` can drive; :func:`model_identity` tells what was applied.
    """
    from .backends import apply_backend
    from .devices import choose_device

    dev = choose_device(device)
    sam = build_sam(model, checkpoint)
    return apply_backend(
        sam, device=dev, backend=backend, precision=precision, fast_decoder=fast_decoder
    )
