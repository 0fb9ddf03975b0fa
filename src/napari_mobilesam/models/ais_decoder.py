"""The instance-segmentation (AIS) decoder of micro-sam's microscopy models, written from its spec.

micro-sam (Archit et al., Nature Methods 2025) ships, with each generalist model, a UNETR-style
decoder (torch_em's ``UNETR`` without its encoder) that maps SAM's image embedding to three maps:
foreground probability, distance to the object centre and distance to the object boundary. This
module is our own implementation of that network: its ``state_dict()`` has exactly the keys and
shapes of micro-sam's ``decoder_state`` (``vit_t_decoder.pt``), so the published files load
strictly, without micro-sam or torch_em.

Tensors: ``forward(embedding)``: ``(B, 256, 64, 64)`` float32 → ``(B, 3, 1024, 1024)`` float32 in
[0, 1] (channels: foreground, centre distances, boundary distances), in the encoder's padded
1024² input frame; :func:`maps_for_image` crops and resizes them to the original image.

Two upsampling variants exist (chosen from the keys, as micro-sam does): ConvTranspose2d(k=2, s=2)
(``...block.weight``, the published decoders) or bilinear ×2 then a 1×1 conv (``...conv.weight``,
what recent micro-sam trains). ``batchnorm``: ``"batch"`` normalises the decoder's BatchNorm layers
with each call's statistics (micro-sam leaves the decoder in training mode, so this is what its
users get), ``"running"`` uses the stored running statistics (standard inference).

Two forms of the same arithmetic: traced for OpenVINO (``torch.jit.is_tracing()``), the norms are
written as mean/variance ops (:func:`_spatial_mean`), which export accurately; run eagerly, they are
torch's fused ``instance_norm``/``batch_norm``, and on a CPU the 2×2 stride-2 transposed convolution
is one matrix product written into the upsampled layout (:func:`_conv_transpose_2x2`), because
torch's mkldnn deconvolution plus its output reorder took 2.2 s per 1024² map at one thread here
against 0.7 s (the whole decoder: 25 s at one thread before these fast paths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

__all__ = ["AISDecoder", "decoder_variant", "load_ais_decoder", "maps_for_image", "decode_maps", "MapsCache",
           "MAPS_CACHE", "BATCHNORM_MODES"]

BATCHNORM_MODES = ("batch", "running")
_EPS = 1e-5


class _Conv3(nn.Module):
    """3×3 conv (padding 1) under the attribute name ``block`` (torch_em's layout)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last two dims as two reductions (rows, then columns): the same value, but a
    float32 sum over a 1024² map stays accurate in backends that accumulate sequentially
    (OpenVINO's reductions lost 1e-2 on the maps with a single 1M-element reduction)."""
    return x.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True)


def _eager() -> bool:
    """True when running eagerly (not traced for export nor scripted): the fused torch ops apply."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting())


def _conv_transpose_2x2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride=2)`` for a 2×2 kernel, as one matrix product
    per image written into the upsampled layout: each input pixel yields the 2×2 output block it
    alone covers. ``x``: ``(B, C, H, W)``; ``weight``: ``(C, O, 2, 2)`` → ``(B, O, 2H, 2W)``."""
    b, c, h, w = x.shape
    o = weight.shape[1]
    out = torch.empty(b, o, h, 2, w, 2, dtype=x.dtype, device=x.device)
    wt = weight.reshape(c, o * 4).t()  # (O·2·2, C)
    bias4 = bias.repeat_interleave(4)[:, None]
    for i in range(b):
        y = torch.addmm(bias4, wt, x[i].reshape(c, h * w))  # (O·2·2, H·W)
        out[i].copy_(y.view(o, 2, 2, h, w).permute(0, 3, 1, 4, 2))
    return out.view(b, o, 2 * h, 2 * w)


class InstanceNorm(nn.Module):
    """``nn.InstanceNorm2d(affine=False)`` (per sample and channel, biased variance), written
    with :func:`_spatial_mean` so that its export is as accurate as torch. No parameters."""

    def __init__(self, eps: float = _EPS) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _eager():
            return F.instance_norm(x, eps=self.eps)
        d = x - _spatial_mean(x)
        return d * torch.rsqrt(_spatial_mean(d.square()) + self.eps)


class ConvBlock(nn.Module):
    """InstanceNorm → Conv3×3 → ReLU → InstanceNorm → Conv3×3 → ReLU (no affine norms)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            InstanceNorm(),
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.ReLU(inplace=True),
            InstanceNorm(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Upsampler(nn.Module):
    """×2 upsampling: ConvTranspose2d(k=2, s=2) (``block``) or bilinear then 1×1 conv (``conv``)."""

    def __init__(self, cin: int, cout: int, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        if transposed:
            self.block = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        else:
            self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            if x.device.type == "cpu" and _eager():
                return _conv_transpose_2x2(x, self.block.weight, self.block.bias)
            return self.block(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(x)


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose inference statistics are chosen by ``mode`` (see module docstring).

    ``"batch"`` is written with mean/var ops (biased variance over batch and space, see
    :func:`_spatial_mean`), which export to OpenVINO as they are; running statistics are never
    updated.
    """

    mode = "batch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "running":
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        if _eager():  # batch statistics; running statistics neither read nor updated
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        d = x - _spatial_mean(x).mean(dim=0, keepdim=True)
        var = _spatial_mean(d.square()).mean(dim=0, keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return d * scale + self.bias.view(1, -1, 1, 1)


class Deconv(nn.Module):
    """Upsampler → Conv3×3 → BatchNorm → ReLU (``block.0`` … ``block.3``)."""

    def __init__(self, cin: int, cout: int, transposed: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Upsampler(cin, cout, transposed), _Conv3(cout, cout), BatchNorm(cout, eps=_EPS), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Decoder(nn.Module):
    def __init__(self, features: tuple[int, ...], transposed: bool) -> None:
        super().__init__()
        pairs = list(zip(features[:-1], features[1:]))
        self.blocks = nn.ModuleList(ConvBlock(2 * cout, cout) for _, cout in pairs)
        self.samplers = nn.ModuleList(Upsampler(cin, cout, transposed) for cin, cout in pairs)


def _center_crop_channels(skip: torch.Tensor, channels: int) -> torch.Tensor:
    """The middle ``channels`` channels of ``skip`` (torch_em crops every non-batch dim)."""
    start = (skip.shape[1] - channels) // 2
    return skip[:, start : start + channels]


class AISDecoder(nn.Module):
    """micro-sam's AIS decoder for a 256-channel embedding (every SAM model micro-sam ships).

    ``forward(z)``: ``(B, 256, h, w)`` → ``(B, 3, 16h, 16w)`` sigmoid maps (foreground, centre
    distances, boundary distances). No skip connections from the image: every "skip" is a
    deconvolution chain of the embedding, centre-cropped along channels.
    """

    def __init__(self, transposed: bool = True, embed_dim: int = 256, out_channels: int = 3) -> None:
        super().__init__()
        feats = (512, 256, 128, 64)
        self.transposed = transposed
        self.base = ConvBlock(embed_dim, feats[0])
        self.decoder = _Decoder(feats, transposed)
        self.deconv1 = Deconv(embed_dim, feats[0], transposed)
        self.deconv2 = Deconv(feats[0], feats[1], transposed)
        self.deconv3 = Deconv(feats[1], feats[2], transposed)
        self.deconv4 = Deconv(feats[2], feats[3], transposed)
        self.deconv_out = Upsampler(feats[3], feats[3], transposed)
        self.decoder_head = ConvBlock(2 * feats[3], feats[3])
        self.out_conv = nn.Conv2d(feats[3], out_channels, 1)

    @property
    def batchnorm(self) -> str:
        """``"batch"`` (each call's statistics, micro-sam's behaviour) or ``"running"``."""
        return self.deconv1.block[2].mode

    @batchnorm.setter
    def batchnorm(self, mode: str) -> None:
        if mode not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, not {mode!r}")
        for m in self.modules():
            if isinstance(m, BatchNorm):
                m.mode = mode

    def forward(self, z12: torch.Tensor) -> torch.Tensor:
        z9 = self.deconv1(z12)
        z6 = self.deconv2(z9)
        z3 = self.deconv3(z6)
        z0 = self.deconv4(z3)
        x = self.base(z12)
        for sampler, block, skip in zip(self.decoder.samplers, self.decoder.blocks, (z9, z6, z3)):
            x = sampler(x)
            x = block(torch.cat([x, _center_crop_channels(skip, x.shape[1])], dim=1))
        x = self.deconv_out(x)
        x = self.decoder_head(torch.cat([x, z0], dim=1))
        return torch.sigmoid(self.out_conv(x))


def decoder_variant(state: Mapping[str, Any]) -> bool:
    """True for the ConvTranspose2d variant: some ``decoder.samplers`` key contains ``.block.``
    (micro-sam's rule); False for the bilinear-interpolation variant."""
    return any(k.startswith("decoder.samplers") and ".block." in k for k in state)


def load_ais_decoder(
    state: Mapping[str, Any], *, batchnorm: str = "batch", source: str = "decoder state"
) -> AISDecoder:
    """An :class:`AISDecoder` (float32, eval mode, no gradients) from micro-sam's ``decoder_state``.

    Strict: every key of the network must be present with its shape (a missing or mis-shaped key
    raises :class:`CheckpointError` naming it); extra keys are ignored, as micro-sam does.
    """
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{source} is not a decoder state dict (name -> tensor)")
    dec = AISDecoder(transposed=decoder_variant(state))
    want = dec.state_dict()
    missing = sorted(set(want) - set(state))
    shapes = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(want[k].shape)})"
        for k in sorted(set(want) & set(state))
        if tuple(state[k].shape) != tuple(want[k].shape)
    ]
    if missing or shapes:
        parts = [f"{source} does not match micro-sam's AIS decoder"]
        if missing:
            parts.append(f"{len(missing)} missing keys: {', '.join(missing[:8])}")
        if shapes:
            parts.append(f"wrong shapes: {'; '.join(shapes[:8])}")
        raise CheckpointError("; ".join(parts))
    dec.load_state_dict({k: state[k] for k in want}, strict=True)
    dec.float().eval().requires_grad_(False)
    dec.batchnorm = batchnorm
    return dec


def maps_for_image(
    maps: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """Decoder maps ``(B, 3, S, S)`` in the padded frame → ``(B, 3, H, W)`` of the original image.

    As micro-sam: crop to ``input_size`` (the resized image inside the padding), then bilinear
    (align_corners=False, no antialias) resize to ``original_size`` (H, W).
    """
    h, w = input_size
    x = maps[..., :h, :w]
    if (h, w) != tuple(original_size):
        x = F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)
    return x


# --------------------------------------------------------------------------- decoded maps, cached


class MapsCache:
    """The last decoded maps, in memory, by what they are a function of.

    Decoding costs seconds (the decoder works at 1024² whatever the slice) while post-processing
    costs tens of milliseconds, so running AIS again with other thresholds, or APG after AIS on
    the same slice, reuses the maps instead of decoding again. Key: the decoder's weights
    (``weights_digest``, or the digest of its state dict), its class (backend), precision and
    BatchNorm mode, the embedding's
    shape and bytes (BLAKE2b) and the output geometry; so a hit is exactly what decoding would
    return. Bounded by ``max_bytes`` (least recently used first out). Thread-safe.
    """

    def __init__(self, max_bytes: int = 192 * 2**20) -> None:
        import threading
        from collections import OrderedDict

        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(decoder: Any, features: torch.Tensor, input_size, original_size) -> tuple | None:
        """The cache key, or None for a decoder we cannot identify (nothing is cached then)."""
        import hashlib

        digest = getattr(decoder, "weights_digest", None)
        if digest is None:
            if not isinstance(decoder, nn.Module):
                return None  # a plain callable (a test's recorder, say): not ours to identify
            from .checkpoint import state_dict_digest

            digest = state_dict_digest(decoder)
        f = features.detach().to("cpu", torch.float32).contiguous()
        h = hashlib.blake2b(f.numpy().tobytes(), digest_size=16).hexdigest()
        how = (type(decoder).__qualname__, getattr(decoder, "precision", None), getattr(decoder, "batchnorm", None))
        return (digest, how, tuple(f.shape), h,
                tuple(int(v) for v in input_size), tuple(int(v) for v in original_size))

    def get(self, key: tuple | None):
        if key is None:
            return None
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return hit

    def put(self, key: tuple | None, maps) -> None:
        if key is None or maps.nbytes > self.max_bytes:
            return
        maps.setflags(write=False)  # shared by every caller: nobody may change them
        with self._lock:
            self._items[key] = maps
            self._items.move_to_end(key)
            while sum(m.nbytes for m in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: The process's decoded maps (see :class:`MapsCache`).
MAPS_CACHE = MapsCache()


def decode_maps(decoder: Any, features: torch.Tensor, input_size: tuple[int, int],
                original_size: tuple[int, int]):
    """The decoder's ``(3, H, W)`` float32 maps (read-only numpy array) of one embedding
    ``(1, 256, 64, 64)``, cropped and resized to the image (:func:`maps_for_image`); the same
    maps decoded before in this process come from :data:`MAPS_CACHE`."""
    key = MAPS_CACHE.key(decoder, features, input_size, original_size)
    maps = MAPS_CACHE.get(key)
    if maps is None:
        with torch.inference_mode():
            maps = maps_for_image(decoder(features), input_size, original_size)[0].float().cpu().numpy()
        MAPS_CACHE.put(key, maps)
    return maps
