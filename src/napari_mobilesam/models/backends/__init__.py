"""Inference backends behind ``Sam.image_encoder`` (and ``Sam.mask_decoder``).

A backend replaces modules of a built ``Sam`` (see :func:`napari_mobilesam.models.registry.build_sam`) with
wrappers that have the same call signature, so ``segment_anything.SamPredictor`` and our own code
use them transparently:

* ``"eager"``: the model as built (exact float32, what the official code runs).
* ``"torch"``: :class:`TorchEncoder` — Conv-BatchNorm folded into the convolutions, channels-last
  memory, optional bf16 autocast (CUDA, or CPUs with AMX). GPUs use this.
* ``"openvino"``: :class:`OpenVINOEncoder` for CPUs — converted from our torch module on first use
  and kept on disk as IR under ``<cache>/openvino/<key>/`` (``key`` from the weights' SHA-256 and
  the OpenVINO version), so later starts only read and compile it. The precision (fp32, bf16,
  or ``mixed``: bf16 for the front of the encoder, fp32 for its last stage and neck) is chosen
  when compiling, from the same IR. On the CPU the prompt-to-mask step also runs through OpenVINO
  (:class:`OpenVINOMaskDecoder`, float32, same outputs as the torch decoder): the attention
  between prompt tokens and image tokens is reassociated (40% fewer operations) and the output
  up-scaling runs in token layout (:func:`fast_predict_masks`), the image embedding's token
  layout is kept between prompts and the dense positional encoding is computed once
  (:func:`cache_dense_pe`): segment-anything's torch decoder takes about 42 ms per prompt on two
  cores, this path about 16. The torch backend on the CPU uses the same decoder function
  (:class:`FastMaskDecoder`). micro-sam's AIS decoder runs through OpenVINO too
  (:class:`OpenVINOAISDecoder`, :func:`apply_decoder_backend`) in the encoder's precision:
  float32 (exact), ``mixed`` (its 512² and 1024² convolutions in bf16) or ``bf16``.

If OpenVINO is missing or fails, :func:`apply_backend` logs a warning and falls back to ``"torch"``.

Wrapped models are for inference only: wrapped parts have no trainable parameters and
``sam.state_dict()`` is no longer the checkpoint layout — train and save with ``build_sam``'s model.
Every wrapper carries ``backend_name``, ``precision`` and ``weights_digest`` (the SHA-256 of the
source module's weights) which :func:`napari_mobilesam.models.registry.model_identity` reads.

Tensors: the encoder takes ``(B, 3, S, S)`` float32 (``S = img_size``, 1024) and returns
``(B, 256, S/16, S/16)`` float32 on the model's device, whatever the backend and precision.
"""

from __future__ import annotations

import logging

from ..devices import choose_device, cpu_has_amx, cpu_has_bf16
from .decoder import FastMaskDecoder, cache_dense_pe, fast_predict_masks, tensor_version
from .openvino import (
    AIS_PRECISIONS,
    OpenVINOAISDecoder,
    OpenVINOEncoder,
    OpenVINOMaskDecoder,
    _openvino_has_bf16,
    openvino_ir,
)
from .torch import TorchEncoder, fold_batchnorm, split_encoder

__all__ = [
    "choose_device",
    "cpu_has_bf16",
    "fold_batchnorm",
    "TorchEncoder",
    "OpenVINOEncoder",
    "split_encoder",
    "OpenVINOMaskDecoder",
    "fast_predict_masks",
    "FastMaskDecoder",
    "cache_dense_pe",
    "apply_backend",
    "apply_decoder_backend",
    "ais_decoder_for",
    "OpenVINOAISDecoder",
    "AIS_PRECISIONS",
    "openvino_ir",
    "resolve_precision",
    "cpu_has_amx",
    "tensor_version",
    "BACKENDS",
    "PRECISIONS",
]

log = logging.getLogger(__name__)

# No module-level ``import torch`` here: the submodule ``.torch`` is bound to the package name
# ``torch``, so functions below import the library locally.

BACKENDS = ("auto", "eager", "torch", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "mixed")


def _is_tiny_vit(encoder) -> bool:
    from ..tiny_vit import TinyViT

    return isinstance(encoder, TinyViT)


def resolve_precision(backend: str, device, precision: str = "auto", encoder=None) -> str:
    """The precision ``"auto"`` means for ``backend`` on ``device``; explicit values pass through.

    Full bf16 moves masks too much (IoU 0.95 against the float32 model on the parity fixture), so
    ``"auto"`` never means ``"bf16"``: it means ``"mixed"`` (bf16 for the front of TinyViT, float32
    for stage 3 and the neck: IoU ≥ 0.998, see docs/benchmarks.md) where bf16 pays off — OpenVINO
    on CPUs with bf16, torch on CUDA devices with bf16 and on CPUs with AMX — and ``"fp32"``
    elsewhere (MPS, other CPUs, SAM ViT encoders, the eager backend).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if backend == "eager" or (encoder is not None and not _is_tiny_vit(encoder)):
        return "fp32"
    if backend == "openvino":
        import openvino as ov

        return "mixed" if _openvino_has_bf16(ov.Core()) else "fp32"
    if device.type == "cuda":
        import torch

        return "mixed" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "mixed" if cpu_has_amx() else "fp32"
    return "fp32"


def apply_backend(
    sam, device=None, backend: str = "auto", precision: str = "auto", *, fast_decoder: bool = True
):
    """Put ``sam`` (from ``build_sam``, exact float32) on ``device`` with ``backend``; returns it.

    ``backend``: ``"auto"`` (OpenVINO on the CPU, ``"torch"`` elsewhere), ``"openvino"`` (CPU only),
    ``"torch"`` or ``"eager"``; ``precision``: ``"auto"``, ``"fp32"``, ``"mixed"`` or ``"bf16"``
    (see :func:`resolve_precision`). With OpenVINO and ``fast_decoder=True`` the mask decoder runs
    through OpenVINO too (always float32; bf16 moves the masks too much), and with the torch
    backend on the CPU through :class:`FastMaskDecoder`; either way the prompt encoder's dense
    positional encoding is then cached (:func:`cache_dense_pe`). If OpenVINO is not installed or
    fails, a warning is logged and the torch backend is used. ``sam`` is modified in place.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if precision not in PRECISIONS:  # before OpenVINO, whose fallback would hide it
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if backend == "openvino" and device is not None and str(device).split(":")[0] not in ("cpu", "auto"):
        raise ValueError(f"the OpenVINO backend runs on the CPU, not on {device}; use backend='torch'")
    dev = choose_device(device)
    if hasattr(sam.image_encoder, "backend_name"):
        raise ValueError("a backend is already applied to this model; start from build_sam()")
    if backend == "auto":
        backend = "openvino" if dev.type == "cpu" else "torch"
    if backend == "openvino" and dev.type != "cpu":
        raise ValueError(f"the OpenVINO backend runs on the CPU, not on {dev}; use backend='torch'")
    sam.to(dev)
    if backend == "eager":
        if precision not in ("auto", "fp32"):
            raise ValueError("the eager backend is float32 only; use backend='torch' for bf16")
        return sam
    if backend == "openvino":
        try:
            prec = resolve_precision("openvino", dev, precision, sam.image_encoder)
            encoder = OpenVINOEncoder(sam.image_encoder, prec)
            new_decoder = OpenVINOMaskDecoder(sam.mask_decoder) if fast_decoder else None
        except Exception as exc:  # noqa: BLE001 - ImportError or any conversion failure
            log.warning(
                "OpenVINO backend unavailable (%s: %s); falling back to the torch backend",
                type(exc).__name__,
                exc,
            )
            backend = "torch"
        else:
            sam.image_encoder = encoder
            if new_decoder is not None:
                sam.mask_decoder = new_decoder
                cache_dense_pe(sam)
            return sam
    prec = resolve_precision("torch", dev, precision, sam.image_encoder)
    sam.image_encoder = TorchEncoder(sam.image_encoder, dev, prec)
    if fast_decoder and dev.type == "cpu":
        sam.mask_decoder = FastMaskDecoder(sam.mask_decoder)
        cache_dense_pe(sam)
    return sam


def apply_decoder_backend(decoder, sam, precision: str | None = None):
    """The AIS ``decoder`` (see ``registry.ais_decoder``) made to run like ``sam``'s encoder.

    With the OpenVINO encoder the decoder is converted too (:class:`OpenVINOAISDecoder`; on
    failure a warning and the torch module) in ``precision``: ``"fp32"`` (exact), ``"mixed"``
    (the convolutions of its 512² and 1024² stages in bf16) or ``"bf16"``; None or ``"auto"``
    (default) takes the encoder's precision, so a model's one ``precision`` reaches both
    (``"auto"`` is float32 for a model with an AIS decoder, see ``registry.precision_for``).
    Otherwise the torch module moves to the encoder's device and stays float32 (a warning when a
    reduced ``precision`` was asked for). ``None`` or an already converted decoder is returned as
    it is.
    """
    if precision not in (None, *AIS_PRECISIONS):
        raise ValueError(
            f"AIS decoder precision must be one of auto, {', '.join(AIS_PRECISIONS[1:])}, not {precision!r}"
        )
    if decoder is None or hasattr(decoder, "backend_name"):
        return decoder
    return ais_decoder_for(decoder, sam.image_encoder, sam.pixel_mean.device, precision)


def ais_decoder_for(decoder, encoder, device, precision: str | None = None):
    """The torch AIS ``decoder`` made to run like ``encoder`` (an encoder backend's module) on
    ``device``: :func:`apply_decoder_backend` for an encoder not yet in a ``Sam`` (the background
    conversion builds the OpenVINO encoder first, then the decoder that goes with it)."""
    if precision in (None, "auto"):
        precision = getattr(encoder, "precision", "fp32")
    if getattr(encoder, "backend_name", "eager") == "openvino":
        try:
            return OpenVINOAISDecoder(decoder, precision=precision)
        except Exception as exc:  # noqa: BLE001 - any conversion failure: keep torch
            log.warning("OpenVINO AIS decoder unavailable (%s: %s); using torch", type(exc).__name__, exc)
    elif precision != "fp32":
        log.warning("the AIS decoder runs in reduced precision with the OpenVINO backend only; "
                    "it runs in float32 here")
    return decoder.to(device)
