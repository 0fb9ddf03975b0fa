"""Model registry and builders: MobileSAM (``vit_t``), SAM (``vit_b``/``vit_l``/``vit_h``), tests.

* :func:`build_sam` — the exact float32 PyTorch model, in eval mode, weights loaded strictly.
* :func:`load_model` — the same model with the fastest inference backend for the device applied
  (see :mod:`napari_mobilesam.models.backends`); ``backend="torch", precision="fp32"`` asks for exact float32.
* :func:`model_identity` — a string naming model, weights, backend and precision, for cache keys.

Every model is a ``segment_anything.modeling.Sam`` (prompt encoder, mask decoder and container from
``segment-anything``; for ``vit_t`` our :class:`~napari_mobilesam.models.tiny_vit.TinyViT` as
``image_encoder``), so ``segment_anything.SamPredictor`` drives it unchanged. Inputs are
``(B, 3, 1024, 1024)`` float32 and embeddings ``(B, 256, 64, 64)`` float32 for every model.

micro-sam's microscopy generalists (``vit_t_lm``, ``vit_t_em_organelles``: MobileSAM fine-tuned on
light / electron microscopy; ``vit_b_lm``, ``vit_b_em_organelles``: SAM ViT-B) come with an AIS
decoder (:mod:`napari_mobilesam.models.ais_decoder`), loaded with the model and returned by
:func:`ais_decoder`. ``semantics`` chooses between two inference behaviours of the same weights:
``"microsam"`` (what micro-sam computes: TinyViT's attention biases at zero, the AIS decoder's
BatchNorm on each call's statistics; the default for micro-sam's models, whose published accuracy
was measured that way) and ``"standard"`` (the weights as trained: biases on, BatchNorm running
statistics; the default for MobileSAM and SAM). See docs/models.md.

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

from ..core.heap import reuse_freed_memory
from . import DECODER_ATTR
from .checkpoint import state_dict_digest

# SAM's input normalisation, in 0..255 RGB units (every SAM-family model, MobileSAM included).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

__all__ = [
    "MODELS",
    "SEMANTICS",
    "ModelSpec",
    "ais_decoder",
    "build_sam",
    "load_model",
    "model_identity",
    "model_info",
    "precision_for",
]

SEMANTICS = ("auto", "standard", "microsam")

# Attribute set on every Sam we build: {"model": name, "source": where the weights came from}.
INFO_ATTR = "napari_mobilesam_info"


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry. ``builder(seed)`` returns a randomly initialised float32 ``Sam``."""

    name: str
    description: str
    builder: Callable[[], Any]
    needs_weights: bool = True
    semantics: str = "standard"


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
    "vit_t_lm": ModelSpec(
        "vit_t_lm",
        "micro-sam light microscopy generalist (MobileSAM fine-tuned; cells, nuclei), with AIS",
        _build_vit_t,
        semantics="microsam",
    ),
    "vit_t_em_organelles": ModelSpec(
        "vit_t_em_organelles",
        "micro-sam electron microscopy organelles (MobileSAM fine-tuned; mitochondria, nuclei), "
        "with AIS",
        _build_vit_t,
        semantics="microsam",
    ),
    "vit_b_lm": ModelSpec(
        "vit_b_lm",
        "micro-sam light microscopy generalist, SAM ViT-B (slower, more accurate), with AIS",
        _build_segment_anything("vit_b"),
        semantics="microsam",
    ),
    "vit_b_em_organelles": ModelSpec(
        "vit_b_em_organelles",
        "micro-sam electron microscopy organelles, SAM ViT-B (slower), with AIS",
        _build_segment_anything("vit_b"),
        semantics="microsam",
    ),
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


def _read_weights(checkpoint: Any) -> tuple[dict, dict | None, str]:
    """(SAM state, decoder state or None, source text) from a path or a state dict."""
    from .checkpoint import read_checkpoint, split_checkpoint

    if isinstance(checkpoint, Mapping):
        model, dec = split_checkpoint(dict(checkpoint), "the state dict")
        return model, dec, "state dict"
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint).expanduser()
        model, dec = read_checkpoint(path)
        return model, dec, str(path)
    raise TypeError(
        f"checkpoint must be a path, a state dict or None, not {type(checkpoint).__name__}"
    )


def _read_decoder(decoder: Any) -> tuple[dict, str]:
    """An AIS decoder state from a path (plain ``*_decoder.pt`` or a combined file) or a dict."""

    if isinstance(decoder, Mapping):
        inner = decoder.get("decoder_state")
        return dict(inner if isinstance(inner, Mapping) else decoder), "decoder state dict"
    path = Path(decoder).expanduser()
    model, dec = _read_weights(path)[:2]
    return (dec if dec is not None else model), f"decoder {path}"


def resolve_semantics(model: str, semantics: str = "auto") -> str:
    """``"standard"`` or ``"microsam"``: what ``semantics="auto"`` means for ``model``."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {', '.join(SEMANTICS)}, not {semantics!r}")
    if semantics != "auto":
        return semantics
    return MODELS[model].semantics if model in MODELS else "standard"


def _apply_semantics(sam, semantics: str) -> None:
    """micro-sam semantics: TinyViT's attention biases are zero (micro-sam's mobile_sam builder
    caches them before the weights load and never refreshes the cache)."""
    import torch

    if semantics != "microsam":
        return
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if name.endswith("attention_biases"):
                p.zero_()


def build_sam(
    model: str = "vit_t",
    checkpoint=None,
    *,
    seed: int = 0,
    decoder=None,
    semantics: str = "auto",
):
    """Build ``model`` as an exact float32 ``Sam`` on the CPU, in eval mode.

    ``checkpoint``: a path to a checkpoint file, a state dict (name → tensor), or ``None``. ``None``
    means the default downloaded weights for real models (fetched into the cache on first use, see
    :mod:`napari_mobilesam.models.weights`) and a random initialisation from ``seed`` for ``vit_t_test``.
    Files may be plain state dicts or micro-sam's combined layout (``model_state`` with optional
    ``sam.`` prefixes and ``decoder_state``, see :func:`~napari_mobilesam.models.checkpoint.split_checkpoint`).
    Weights are loaded strictly (every key, every shape); problems raise
    :class:`~napari_mobilesam.models.checkpoint.CheckpointError`. Floating tensors are cast to float32.

    ``decoder``: an AIS decoder file or state dict; replaces the checkpoint's ``decoder_state`` and
    the model's published decoder (downloaded with the model when ``checkpoint`` is None). The
    decoder is attached to the model, see :func:`ais_decoder`. ``semantics``: ``"auto"`` (the
    model's default; ``"microsam"`` whenever a micro-sam AIS decoder comes with the weights, e.g. a
    model fine-tuned in micro-sam loaded as ``model="checkpoint"``), ``"standard"`` or
    ``"microsam"`` (see the module docstring).
    """
    import torch

    from .checkpoint import validate_state_dict

    spec = _spec(model)
    resolve_semantics(model, semantics)  # checks the value early
    reuse_freed_memory()  # eager layers reuse freed tensor memory from here on (core.heap)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = spec.builder()
    source: str
    dec_state = None
    if checkpoint is None and spec.needs_weights:
        from .weights import decoder_entry, fetch_weights

        checkpoint = fetch_weights(model)
        if decoder is None and decoder_entry(model) is not None:
            decoder = fetch_weights(decoder_entry(model))
    if checkpoint is None:
        source = f"random(seed={seed})"
    else:
        state, dec_state, source = _read_weights(checkpoint)
        validate_state_dict(state, sam.state_dict(), model=model, source=f"checkpoint {source}")
        sam.load_state_dict(state, strict=True)
    dec_source = source
    if decoder is not None and not (isinstance(decoder, str) and not decoder):
        dec_state, dec_source = _read_decoder(decoder)
    sam.float().eval()
    sam.requires_grad_(False)
    sem = resolve_semantics(model, semantics)
    if semantics == "auto" and dec_state is not None:
        sem = "microsam"  # a micro-sam decoder (file or checkpoint): micro-sam's model and format
    _apply_semantics(sam, sem)
    info = {"model": model, "source": source, "semantics": sem}
    if dec_state is not None:
        from .ais_decoder import load_ais_decoder

        batchnorm = "batch" if sem == "microsam" else "running"
        dec = load_ais_decoder(dec_state, batchnorm=batchnorm, source=dec_source)
        object.__setattr__(sam, DECODER_ATTR, dec)
        info["decoder"] = dec_source
    setattr(sam, INFO_ATTR, info)
    return sam


def precision_for(sam, precision: str = "auto") -> str:
    """The precision to apply to ``sam`` (from :func:`build_sam`) for a requested ``precision``.

    ``"auto"`` is ``"fp32"`` for a model with micro-sam's AIS decoder: the decoder amplifies the
    encoder's bf16 rounding about 20 times, and in ``"mixed"`` precision the parity fixture's AIS
    labels agreed with micro-sam's on only 86 % of pixels (≥ 99.9 % in float32). The encoder's
    float32 cost is small next to the decoder's. Otherwise ``precision`` is returned unchanged
    (the backend then resolves ``"auto"``).
    """
    if precision == "auto" and ais_decoder(sam) is not None:
        return "fp32"
    return precision


def ais_decoder(sam):
    """The AIS decoder loaded with ``sam`` (see :func:`build_sam`), or None when it has none.

    Call it as ``decoder(embedding)``: ``(1, 256, 64, 64)`` → ``(1, 3, 1024, 1024)`` maps.
    """
    return sam.__dict__.get(DECODER_ATTR)


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
    decoder=None,
    semantics: str = "auto",
    ais_precision: str = "auto",
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
    ``SamPredictor`` can drive; :func:`model_identity` tells what was applied. ``decoder`` and
    ``semantics``: see :func:`build_sam`; the AIS decoder runs with the same backend as the
    encoder. ``ais_precision``: the AIS decoder's precision with OpenVINO, ``"auto"`` (the
    encoder's: float32 unless ``precision`` asks for less), ``"fp32"`` (micro-sam's labels
    exactly), ``"mixed"`` (its 512² and 1024² convolutions in bf16) or ``"bf16"``; see
    docs/models.md for what each does to the labels and the time.
    """
    from .backends import AIS_PRECISIONS

    if ais_precision not in AIS_PRECISIONS:
        raise ValueError(f"ais_precision must be one of {', '.join(AIS_PRECISIONS)}, not {ais_precision!r}")
    from .backends import apply_backend, apply_decoder_backend
    from .devices import choose_device

    dev = choose_device(device)
    sam = build_sam(model, checkpoint, decoder=decoder, semantics=semantics)
    sam = apply_backend(
        sam, device=dev, backend=backend, precision=precision_for(sam, precision),
        fast_decoder=fast_decoder,
    )
    decoder_module = sam.__dict__.get(DECODER_ATTR)
    if decoder_module is not None:
        object.__setattr__(sam, DECODER_ATTR, apply_decoder_backend(decoder_module, sam, ais_precision))
    return sam
