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
  (:class:`FastMaskDecoder`).

If OpenVINO is missing or fails, :func:`apply_backend` logs a warning and falls back to ``"torch"``.

Wrapped models are for inference only: wrapped parts have no trainable parameters and
``sam.state_dict()`` is no longer the checkpoint layout — train and save with ``build_sam``'s model.
Every wrapper carries ``backend_name``, ``precision`` and ``weights_digest`` (the SHA-256 of the
source module's weights) which :func:`napari_mobilesam.models.registry.model_identity` reads.

Tensors: the encoder takes ``(B, 3, S, S)`` float32 (``S = img_size``, 1024) and returns
``(B, 256, S/16, S/16)`` float32 on the model's device, whatever the backend and precision.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import state_dict_digest
from ..devices import choose_device, cpu_has_amx, cpu_has_bf16

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
    "openvino_ir",
    "resolve_precision",
    "cpu_has_amx",
    "BACKENDS",
    "PRECISIONS",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "torch", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "mixed")
# Bumped whenever the way we export changes, so old IR in users' caches is not reused.
_IR_RECIPE = "3"



def _openvino_has_bf16(core) -> bool:
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - an odd plugin: just don't use bf16
        return False


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every Conv-BN pair (:class:`~napari_mobilesam.models.tiny_vit.ConvBN`) by one biased conv.

    Works in place on ``module`` (in eval mode) and returns it. The result computes the same
    function up to float rounding (about 1e-6 relative).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from ..tiny_vit import ConvBN

    module.eval()
    for name, child in list(module.named_children()):
        if isinstance(child, ConvBN):
            setattr(module, name, fuse_conv_bn_eval(child.c, child.bn))
        else:
            fold_batchnorm(child)
    return module



def split_encoder(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder as consecutive parts for mixed precision: ``[(name, module), ...]``.

    TinyViT: ``front`` (patch embedding and stages 0-2, ``(B, 3, S, S)`` → ``(B, 320, S/16, S/16)``)
    and ``back`` (stage 3 and the neck → ``(B, 256, S/16, S/16)``). In bf16 the back part is the one
    that moves the masks (stage 3 alone in bf16 drops the worst mask IoU on the parity fixture to
    0.97; the front parts together cost < 0.002), so ``"mixed"`` runs the front in bf16 and the back in float32. Other encoders
    (SAM ViT) are one part, ``whole``.
    """
    from ..tiny_vit import TinyViT

    if isinstance(encoder, TinyViT):
        front = nn.Sequential(encoder.patch_embed, *encoder.layers[:-1])
        back = nn.Sequential(encoder.layers[-1], encoder.neck)
        return [("front", front), ("back", back)]
    return [("whole", encoder)]


def _part_precisions(precision: str, n_parts: int) -> list[str]:
    if precision == "mixed":
        if n_parts < 2:
            raise ValueError("precision 'mixed' needs a TinyViT encoder; use 'fp32' or 'bf16'")
        return ["bf16"] * (n_parts - 1) + ["fp32"]
    return [precision] * n_parts


class TorchEncoder(nn.Module):
    """Optimised torch image encoder: folded BN, channels-last, optional bf16 autocast.

    ``precision``: ``"fp32"``, ``"bf16"`` (autocast everywhere) or ``"mixed"`` (autocast for the
    front part only, see :func:`split_encoder`).
    ``forward(x)``: ``(B, 3, S, S)`` float32 → ``(B, 256, S/16, S/16)`` float32 (contiguous).
    """

    backend_name = "torch"

    def __init__(self, encoder: nn.Module, device: torch.device, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in ("fp32", "bf16", "mixed"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'mixed', not {precision!r}")
        self.weights_digest = state_dict_digest(encoder)
        self.img_size = encoder.img_size
        self.precision = precision
        self.device = torch.device(device)
        net = fold_batchnorm(copy.deepcopy(encoder)).to(self.device)
        net = net.to(memory_format=torch.channels_last).requires_grad_(False)
        parts = split_encoder(net)
        self.parts = nn.ModuleList(m for _, m in parts)
        self._precisions = _part_precisions(precision, len(parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        for part, prec in zip(self.parts, self._precisions):
            if prec == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    x = part(x)
            else:
                x = part(x.float())
        return x.float().contiguous()


def _ir_dir(kind: str, digest: str, img_size: int) -> Path:
    import openvino

    from ..weights import cache_dir

    key = hashlib.sha256(
        f"{kind}|{digest}|{img_size}|{openvino.__version__}|{_IR_RECIPE}".encode()
    ).hexdigest()[:24]
    return cache_dir() / "openvino" / f"{kind}-{key}"


def openvino_ir(module: nn.Module, kind: str, example, *, img_size: int, input_shapes=None):
    """Path of the OpenVINO IR (``model.xml``) of ``module``, converting it on first use.

    The folder name is a hash of ``kind``, the module's weights digest, ``img_size``, the OpenVINO
    version and our export recipe; it is written to a temporary folder and renamed, so concurrent
    or interrupted conversions never leave a half-written IR. Returns ``(xml_path, converted)``.
    """
    import openvino as ov

    target = _ir_dir(kind, state_dict_digest(module), img_size)
    xml = target / "model.xml"
    if xml.exists() and (target / "model.bin").exists():
        return xml, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        t0 = time.perf_counter()
        kwargs = {"example_input": example}
        if input_shapes is not None:
            kwargs["input"] = input_shapes
        with torch.no_grad(), warnings.catch_warnings():
            # tracing fixes the shapes we export for; its warnings say exactly that
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            ov_model = ov.convert_model(module, **kwargs)
        ov.save_model(ov_model, tmp / "model.xml", compress_to_fp16=False)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: use theirs
            if not xml.exists():
                raise
        log.info("converted %s to OpenVINO in %.1f s: %s", kind, time.perf_counter() - t0, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml, True


def _compile(xml: Path, precision: str):
    import openvino as ov

    core = ov.Core()
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
    }
    return core.compile_model(core.read_model(xml), "CPU", config)


class OpenVINOEncoder(nn.Module):
    """Image encoder running through OpenVINO on the CPU.

    ``precision``: ``"fp32"`` (exact to about 1e-5), ``"bf16"`` or ``"mixed"`` (bf16 front, fp32
    back, see :func:`split_encoder`). The encoder is converted as its parts, each kept as IR in
    the cache; the precision is applied when compiling, so all precisions share one IR.
    ``forward(x)``: ``(B, 3, S, S)`` float32 tensor → ``(B, 256, S/16, S/16)`` float32 CPU tensor
    (images run one at a time). ``torch_encoder`` is the source module (not registered, so it adds
    nothing to ``state_dict``). ``converted`` tells whether this construction converted anything
    (first use) or only read cached IR.
    """

    backend_name = "openvino"

    def __init__(self, encoder: nn.Module, precision: str = "fp32") -> None:
        super().__init__()
        import openvino as ov

        if precision not in ("fp32", "bf16", "mixed"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'mixed', not {precision!r}")
        if precision != "fp32" and not _openvino_has_bf16(ov.Core()):
            log.warning("this CPU has no bf16 support in OpenVINO; using float32")
            precision = "fp32"
        self.precision = precision
        self.img_size = encoder.img_size
        self.device = torch.device("cpu")
        self.weights_digest = state_dict_digest(encoder)
        object.__setattr__(self, "torch_encoder", encoder)
        s = encoder.img_size
        src = fold_batchnorm(copy.deepcopy(encoder).cpu().float())
        parts = split_encoder(src)
        self._lock = threading.Lock()
        self.ir_paths, self._requests, self.converted = [], [], False
        example = torch.zeros(1, 3, s, s)
        precisions = _part_precisions(precision, len(parts))
        for i, ((name, part), prec) in enumerate(zip(parts, precisions)):
            part.weights_digest = f"{self.weights_digest}:{name}"
            xml, converted = openvino_ir(part, f"encoder-{name}", example, img_size=s)
            self.converted |= converted
            self.ir_paths.append(xml)
            self._requests.append(_compile(xml, prec).create_infer_request())
            later_missing = any(
                not (_ir_dir(f"encoder-{n}", f"{self.weights_digest}:{n}", s) / "model.xml").exists()
                for n, _ in parts[i + 1 :]
            )
            if later_missing:  # the next part's example input (only needed to convert it)
                with torch.no_grad():
                    example = part(example)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.img_size, self.img_size):
            raise ValueError(
                f"expected a (B, 3, {self.img_size}, {self.img_size}) tensor, got {tuple(x.shape)}"
            )
        x = x.detach().to("cpu", torch.float32)
        outs = []
        with self._lock:  # an infer request serves one call at a time
            for i in range(x.shape[0]):
                h = x[i : i + 1].contiguous().numpy()
                for request in self._requests:
                    request.infer({0: h})
                    h = request.get_output_tensor(0).data
                outs.append(torch.from_numpy(h.copy()))
        return torch.cat(outs).float()


def _token_to_image(attn, tokens, image_k, image_v):
    """segment-anything ``Attention`` with few queries (prompt tokens) over many image tokens.

    ``tokens (B, Nq, C)`` queries, ``image_k (B, Nk, C)`` keys (image + positional encoding),
    ``image_v (B, Nk, C)`` values → ``(B, Nq, C)``. Same function as ``attn(q=tokens, k=image_k,
    v=image_v)``, reassociated so that no ``Nk × C`` projection is formed: the query is moved
    through the key projection (``q·(W_k x + b_k) = (W_kᵀ q)·x + const``; the constant per query
    cancels in the softmax) and the softmax weights are applied before the value projection
    (their rows sum to 1, so ``P (X W_vᵀ + b_v) = (P X) W_vᵀ + b_v``).
    """
    h = attn.num_heads
    q = attn.q_proj(tokens)
    b, nq, d_int = q.shape
    d = d_int // h
    c = image_k.shape[-1]
    q = q.view(b, nq, h, d).transpose(1, 2)  # (B, H, Nq, d)
    a = torch.einsum("bhqd,hdc->bhqc", q, attn.k_proj.weight.view(h, d, c)) / math.sqrt(d)
    scores = torch.matmul(a.reshape(b, h * nq, c), image_k.transpose(1, 2))  # (B, H·Nq, Nk)
    pv = torch.matmul(scores.softmax(dim=-1), image_v).view(b, h, nq, c)
    out = torch.einsum("bhqc,hdc->bhqd", pv, attn.v_proj.weight.view(h, d, c))
    out = out + attn.v_proj.bias.view(h, 1, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, nq, d_int))


def _image_to_token(attn, image_q, tokens_k, tokens_v):
    """segment-anything ``Attention`` with many queries (image tokens) over few prompt tokens.

    ``image_q (B, Nk, C)``, ``tokens_k``/``tokens_v (B, Nq, C)`` → ``(B, Nk, C)``; same function as
    ``attn(q=image_q, k=tokens_k, v=tokens_v)`` with the query projection folded into the keys
    (``(W_q x + b_q)·k = x·(W_qᵀ k) + b_q·k``) and the output projection into the values, so the
    only products over the ``Nk`` image tokens are ``Nk × C × (H·Nq)``.
    """
    h = attn.num_heads
    k = attn.k_proj(tokens_k)
    b, nq, d_int = k.shape
    d = d_int // h
    nk, c = image_q.shape[1], image_q.shape[2]
    k = k.view(b, nq, h, d).transpose(1, 2)  # (B, H, Nq, d)
    m = torch.einsum("bhqd,hdc->bchq", k, attn.q_proj.weight.view(h, d, c)) / math.sqrt(d)
    const = torch.einsum("bhqd,hd->bhq", k, attn.q_proj.bias.view(h, d)) / math.sqrt(d)
    scores = torch.matmul(image_q, m.reshape(b, c, h * nq)).view(b, nk, h, nq)
    p = (scores + const.unsqueeze(1)).softmax(dim=-1)  # softmax over the prompt tokens
    v = attn.v_proj(tokens_v).view(b, nq, h, d).transpose(1, 2)  # (B, H, Nq, d)
    c_out = attn.out_proj.weight.shape[0]
    u = torch.einsum("bhqd,chd->bhqc", v, attn.out_proj.weight.view(c_out, h, d))
    return torch.matmul(p.reshape(b, nk, h * nq), u.reshape(b, h * nq, c_out)) + attn.out_proj.bias


def _two_way_block(layer, queries, keys, query_pe, key_pe):
    """segment-anything ``TwoWayAttentionBlock.forward`` with the reassociated cross-attentions."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    image_k = keys + key_pe
    queries = layer.norm2(
        queries + _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, image_k, keys)
    )
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + query_pe
    keys = layer.norm4(keys + _image_to_token(layer.cross_attn_image_to_token, image_k, q, queries))
    return queries, keys


def _is_pixel_linear_upscaling(up) -> bool:
    """Whether ``up`` is segment-anything's ``output_upscaling``: ConvT(k2, s2), LayerNorm2d, act,
    ConvT(k2, s2), act — the structure :func:`_upscale_tokens` computes per pixel."""
    if not isinstance(up, nn.Sequential) or len(up) != 5:
        return False
    ct1, ln, _, ct2, _ = up
    return (
        all(
            isinstance(ct, nn.ConvTranspose2d)
            and ct.kernel_size == (2, 2)
            and ct.stride == (2, 2)
            and ct.padding == (0, 0)
            and ct.output_padding == (0, 0)
            and ct.groups == 1
            and ct.dilation == (1, 1)
            and ct.bias is not None
            for ct in (ct1, ct2)
        )
        and hasattr(ln, "eps")
        and getattr(ln, "weight", None) is not None
        and ln.weight.shape == (ct1.out_channels,)
    )


def _upscale_tokens(up, x, hyper, h: int, w: int):
    """Mask logits ``(B, n, 4h, 4w)`` from the image tokens ``x (B, h·w, C)`` and the per-mask
    weights ``hyper (B, n, C/8)``, computing ``output_upscaling`` without leaving token layout.

    A transposed convolution with kernel 2 and stride 2 maps every input pixel to its own 2 × 2
    output pixels, so it is a per-pixel linear map ``C_in → 4·C_out`` followed by a pixel
    shuffle; LayerNorm2d normalises each pixel over its channels. So the whole head runs as
    matrix products over pixels, with the pixel shuffle applied once, to the ``n`` mask logits
    at the end, instead of to the 32 up-scaled channels (moving ``(B, 32, 4h, 4w)`` between
    channel-first and channel-last layouts cost more than the convolutions themselves).
    """
    ct1, ln, act1, ct2, act2 = up
    b = x.shape[0]

    def per_pixel(ct, t):  # (B, P, C_in) -> (B, 4P, C_out), sub-pixels in (dy, dx) order
        cin, cout = ct.weight.shape[:2]
        weight = ct.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)
        return (torch.matmul(t, weight) + ct.bias.repeat(4)).reshape(b, -1, cout)

    t = per_pixel(ct1, x)  # pixels ordered (y, x, dy1, dx1)
    t = act1(nn.functional.layer_norm(t, (t.shape[-1],), ln.weight, ln.bias, ln.eps))
    t = act2(per_pixel(ct2, t))  # (y, x, dy1, dx1, dy2, dx2)
    m = torch.matmul(t, hyper.transpose(1, 2))  # (B, 16·h·w, n)
    n = hyper.shape[1]
    m = m.reshape(b, h, w, 2, 2, 2, 2, n).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return m.reshape(b, n, 4 * h, 4 * w)


def _predict_masks_tokens(decoder, image_tokens, pe_tokens, sparse, dense_tokens, h: int, w: int):
    """:func:`fast_predict_masks` on token layouts: ``image_tokens``/``pe_tokens (1, h·w, C)``,
    ``sparse (B, Nq, C)``, ``dense_tokens (B, 1 or h·w, C)`` (one row: the same dense embedding
    for every pixel, as without a mask prompt) → masks ``(B, 1 + num_multimask, 4h, 4w)``, IoUs."""
    b = sparse.shape[0]
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
    keys = image_tokens + dense_tokens
    tr = decoder.transformer
    queries = tokens
    for layer in tr.layers:
        queries, keys = _two_way_block(layer, queries, keys, tokens, pe_tokens)
    queries = queries + _token_to_image(
        tr.final_attn_token_to_image, queries + tokens, keys + pe_tokens, keys
    )
    hs = tr.norm_final_attn(queries)
    n = decoder.num_mask_tokens
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(n)], dim=1)
    if _is_pixel_linear_upscaling(decoder.output_upscaling):
        masks = _upscale_tokens(decoder.output_upscaling, keys, hyper, h, w)
    else:
        up = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, -1, h, w))
        _, cu, hu, wu = up.shape
        masks = torch.matmul(hyper, up.reshape(b, cu, hu * wu)).view(b, n, hu, wu)
    return masks, decoder.iou_prediction_head(hs[:, 0])


def _to_tokens(t):
    """``(B, C, h, w)`` → ``(B, h·w, C)``."""
    return t.flatten(2).transpose(1, 2)


def _dense_tokens(dense):
    """``dense (B, C, h, w)`` → ``(B, 1, C)`` when it is one vector broadcast over the pixels
    (the prompt encoder's no-mask embedding is an expanded view), else ``(B, h·w, C)``."""
    if dense.stride(2) == 0 and dense.stride(3) == 0:
        return dense[:, :, 0, 0].unsqueeze(1)
    return _to_tokens(dense)


def fast_predict_masks(decoder, image_embeddings, image_pe, sparse, dense):
    """``MaskDecoder.predict_masks`` of segment-anything, computed with fewer operations.

    Same parameters, same function (to float rounding, ~1e-6 relative), faster: the attention
    between the ``Nq`` prompt tokens and the 4096 image tokens is reassociated (see
    :func:`_token_to_image`, :func:`_image_to_token`), which removes about 40% of the decoder's
    floating-point work, and the output up-scaling runs in token layout (:func:`_upscale_tokens`).
    ``image_embeddings``/``image_pe`` ``(1, C, h, w)``, ``sparse (B, Nq, C)``, ``dense (B, C, h,
    w)`` → all mask logits ``(B, 1 + num_multimask, 4h, 4w)`` and IoUs.
    """
    h, w = image_embeddings.shape[-2:]
    return _predict_masks_tokens(
        decoder,
        _to_tokens(image_embeddings),
        _to_tokens(image_pe),
        sparse,
        _dense_tokens(dense),
        h,
        w,
    )


class _DecoderCore(nn.Module):
    """Export helper: all mask logits ``(B, 4, 4h, 4w)`` and IoUs ``(B, 4)`` from token inputs."""

    def __init__(self, decoder: nn.Module, h: int, w: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.h, self.w = h, w

    def forward(self, image_tokens, pe_tokens, sparse, dense_tokens):
        return _predict_masks_tokens(
            self.decoder, image_tokens, pe_tokens, sparse, dense_tokens, self.h, self.w
        )


class FastMaskDecoder(nn.Module):
    """Torch ``MaskDecoder`` computing :func:`fast_predict_masks` (same call and outputs).

    Used by the torch backend on the CPU when OpenVINO is not used. ``torch_decoder`` is the
    source module (not registered).
    """

    backend_name = "torch"
    precision = "fp32"

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.weights_digest = state_dict_digest(decoder)
        object.__setattr__(self, "torch_decoder", decoder)

    def forward(
        self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
        multimask_output: bool,
    ):
        dec = self.torch_decoder
        if image_embeddings.shape[0] != 1:
            return dec(image_embeddings, image_pe, sparse_prompt_embeddings,
                       dense_prompt_embeddings, multimask_output)
        masks, iou = fast_predict_masks(
            dec, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]


def tensor_version(t: torch.Tensor) -> int | None:
    """``t._version`` (bumped by every in-place change), or None for inference-mode tensors."""
    try:
        return t._version
    except RuntimeError:
        return None


class _TokenArrayCache:
    """The ``(1, h·w, C)`` float32 array of the last ``(1, C, h, w)`` tensor given, reused while
    that tensor comes back unchanged (one image's embedding and the dense positional encoding are
    passed again with every prompt).

    "Unchanged" is the same tensor object at the same version, else equal values. The value
    comparison runs in NumPy on one core (a parallel torch op here would leave torch's worker
    threads spinning while OpenVINO runs); it reads 8 MB, about 1 ms, so the identity check
    comes first.
    """

    def __init__(self) -> None:
        self._ref = None
        self._version = None
        self._source = None
        self._tokens = None

    def get(self, t: torch.Tensor):
        version = tensor_version(t)
        if (
            self._ref is not None
            and self._ref() is t
            and version is not None
            and version == self._version
        ):
            return self._tokens
        t32 = t.detach().to("cpu", torch.float32)
        a = t32.numpy()
        if self._source is None or a.shape != self._source.shape or not np.array_equal(a, self._source):
            self._source = a.copy()  # a copy: the caller may change its tensor in place later
            self._tokens = _to_tokens(t32).contiguous().numpy()
        self._ref, self._version = weakref.ref(t), version
        return self._tokens


class _CachedDensePE:
    """Stands in for ``PromptEncoder.get_dense_pe`` (segment-anything's ``SamPredictor`` calls it
    with every prompt, 0.8 ms here): returns one computed tensor while the positional-encoding
    matrix (same storage, version, device, dtype), the grid size and the returned tensor itself
    are unchanged, so the decoder also sees the same tensor and skips comparing it."""

    def __init__(self, prompt_encoder: nn.Module) -> None:
        self.prompt_encoder = prompt_encoder
        self._key = None
        self._pe = None
        self._pe_version = None

    def __call__(self) -> torch.Tensor:
        enc = self.prompt_encoder
        g = enc.pe_layer.positional_encoding_gaussian_matrix
        key = (g.data_ptr(), tensor_version(g), g.device, g.dtype, tuple(enc.image_embedding_size))
        if self._pe is not None and key == self._key and tensor_version(self._pe) == self._pe_version:
            return self._pe
        pe = type(enc).get_dense_pe(enc)
        version = tensor_version(pe)
        if key[1] is None or version is None or pe.requires_grad:  # cannot tell changes: no cache
            self._pe = self._key = None
            return pe
        self._key, self._pe, self._pe_version = key, pe, version
        return pe


def cache_dense_pe(sam) -> None:
    """Make ``sam.prompt_encoder.get_dense_pe()`` return a cached tensor (see `_CachedDensePE`)."""
    enc = sam.prompt_encoder
    if not isinstance(enc.__dict__.get("get_dense_pe"), _CachedDensePE):
        enc.get_dense_pe = _CachedDensePE(enc)


class OpenVINOMaskDecoder(nn.Module):
    """``segment_anything`` ``MaskDecoder`` running through OpenVINO on the CPU (fp32 or bf16).

    Same call as ``MaskDecoder.forward``: ``image_embeddings (1, 256, 64, 64)``, ``image_pe (1, 256,
    64, 64)``, ``sparse_prompt_embeddings (B, N, 256)``, ``dense_prompt_embeddings (B, 256, 64, 64)``,
    ``multimask_output`` → ``masks (B, 3 or 1, 256, 256)``, ``iou_pred (B, 3 or 1)`` float32. ``B``
    and ``N`` are dynamic. Inputs it was not exported for (batched image embeddings, other sizes,
    gradients) go to the torch decoder (``torch_decoder``).

    The IR computes :func:`fast_predict_masks` on token layouts; the token layout of the image
    embedding and of the positional encoding is kept between calls while they do not change, and
    a dense prompt embedding that is one vector broadcast over the pixels (no mask prompt) is
    passed as that vector.
    """

    backend_name = "openvino"

    def __init__(
        self, decoder: nn.Module, precision: str = "fp32", embed_shape=(256, 64, 64)
    ) -> None:
        super().__init__()
        import openvino as ov

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
        if precision == "bf16" and not _openvino_has_bf16(ov.Core()):
            precision = "fp32"
        self.precision = precision
        self.weights_digest = state_dict_digest(decoder)
        object.__setattr__(self, "torch_decoder", decoder)
        self.embed_shape = tuple(embed_shape)
        c, h, w = self.embed_shape
        core = _DecoderCore(copy.deepcopy(decoder).cpu().float().eval(), h, w)
        core.weights_digest = self.weights_digest
        example = (
            torch.zeros(1, h * w, c),
            torch.zeros(1, h * w, c),
            torch.zeros(2, 3, c),
            torch.zeros(2, h * w, c),
        )
        shapes = [
            ov.PartialShape([1, h * w, c]),
            ov.PartialShape([1, h * w, c]),
            ov.PartialShape([-1, -1, c]),
            ov.PartialShape([-1, -1, c]),
        ]
        self.ir_path, self.converted = openvino_ir(
            core, "decoder", example, img_size=h, input_shapes=shapes
        )
        self._compiled = _compile(self.ir_path, precision)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()
        self._image_tokens = _TokenArrayCache()
        self._pe_tokens = _TokenArrayCache()

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ):
        usable = (
            image_embeddings.shape[0] == 1
            and tuple(image_embeddings.shape[1:]) == self.embed_shape
            and tuple(image_pe.shape) == (1, *self.embed_shape)
            and image_embeddings.device.type == "cpu"
            and not (torch.is_grad_enabled() and sparse_prompt_embeddings.requires_grad)
            and sparse_prompt_embeddings.shape[1] > 0
        )
        if not usable:
            return self.torch_decoder(
                image_embeddings,
                image_pe,
                sparse_prompt_embeddings,
                dense_prompt_embeddings,
                multimask_output,
            )

        def arr(t):
            return t.detach().to(torch.float32).contiguous().numpy()

        with self._lock:  # an infer request (and the token caches) serve one call at a time
            inputs = {
                0: self._image_tokens.get(image_embeddings),
                1: self._pe_tokens.get(image_pe),
                2: arr(sparse_prompt_embeddings),
                3: arr(_dense_tokens(dense_prompt_embeddings)),
            }
            self._request.infer(inputs)
            masks = torch.from_numpy(self._request.get_output_tensor(0).data.copy())
            iou = torch.from_numpy(self._request.get_output_tensor(1).data.copy())
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]



def _is_tiny_vit(encoder) -> bool:
    from ..tiny_vit import TinyViT

    return isinstance(encoder, TinyViT)


def resolve_precision(backend: str, device: torch.device, precision: str = "auto", encoder=None) -> str:
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
