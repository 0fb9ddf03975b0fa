"""Fast prompt-to-mask decoding: segment-anything's ``MaskDecoder`` reassociated, and its caches.

:func:`fast_predict_masks` computes ``MaskDecoder.predict_masks`` with about 40 % fewer operations
(cross-attention reassociated, output up-scaling in token layout); :class:`FastMaskDecoder` is the
torch module calling it; :class:`_DecoderCore` is what the OpenVINO decoder exports;
:class:`_TokenArrayCache` and :func:`cache_dense_pe` keep an image's token layout and the dense
positional encoding between prompts (:func:`tensor_version` tells in-place changes).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch import nn

from ..checkpoint import state_dict_digest

__all__ = [
    "fast_predict_masks",
    "FastMaskDecoder",
    "cache_dense_pe",
    "tensor_version",
]


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
