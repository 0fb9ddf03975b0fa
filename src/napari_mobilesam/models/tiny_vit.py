"""TinyViT image encoder of MobileSAM, written for this package.

The module tree (and so the state dict) has exactly the names and shapes of the official
``mobile_sam.pt`` under ``image_encoder.*``, so the official weights load strictly.

Shapes (default configuration, ``TinyViTConfig()``):

* input: ``(B, 3, 1024, 1024)`` float32, SAM-normalised and zero-padded (``Sam.preprocess``);
* ``patch_embed``: two stride-2 Conv-BN → ``(B, 64, 256, 256)``;
* ``layers.0``: MBConv blocks at 256×256, patch merging → 128 channels at 128×128;
* ``layers.1``: attention blocks (window 7), patch merging (stride 2) → 160 channels at 64×64;
* ``layers.2``: attention blocks (window 14), patch merging (stride 1) → 320 channels at 64×64;
* ``layers.3``: attention blocks (window 7), no merging;
* ``neck``: 1×1 conv, LayerNorm2d, 3×3 conv, LayerNorm2d → output ``(B, 256, 64, 64)`` float32.

Internally the convolutional parts work on ``(B, C, H, W)`` tensors and the attention stages on
``(B, H, W, C)`` tensors (so LayerNorm and Linear act on the last axis and the depthwise
``local_conv`` sees a channels-last view without copies).

The relative-position attention bias is gathered from the ``attention_biases`` parameter on every
forward pass (it is never cached), so the model is correct whatever order ``.eval()`` and
``load_state_dict`` are called in. ``norm_head``/``head`` (an unused ImageNet classifier) exist only
so that the official checkpoint loads strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

__all__ = ["TinyViTConfig", "TinyViT", "ConvBN"]


@dataclass(frozen=True)
class TinyViTConfig:
    """Hyper-parameters of the encoder; the defaults are MobileSAM's.

    ``merge_strides[i]`` is the stride of the patch merging after stage ``i`` (the last stage has
    none). ``out_chans`` must stay 256 for SAM's prompt encoder and mask decoder.
    """

    img_size: int = 1024
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    num_classes: int = 1000

    @property
    def out_size(self) -> int:
        """Side of the output grid (64 for 1024 input)."""
        side = self.img_size // 4
        for s in self.merge_strides:
            side = (side + 2 - 3) // s + 1
        return side


class ConvBN(nn.Module):
    """Bias-free ``Conv2d`` (``c``) followed by ``BatchNorm2d`` (``bn``), NCHW in and out."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


class PatchEmbed(nn.Module):
    """``(B, 3, S, S)`` → ``(B, C, S/4, S/4)``: Conv-BN stride 2, GELU, Conv-BN stride 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(cin, cout // 2, 3, 2), nn.GELU(), ConvBN(cout // 2, cout, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block, NCHW: 1×1 expand, GELU, 3×3 depthwise, GELU, 1×1, +input, GELU."""

    def __init__(self, dim: int, expand: float) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, 1)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)


class PatchMerging(nn.Module):
    """NCHW ``(B, C, H, W)`` → ``(B, C', H/s, W/s)``: 1×1 Conv-BN, GELU, 3×3 dw Conv-BN, GELU, 1×1."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(x)


def _bias_index(ws: int) -> torch.Tensor:
    """``(ws², ws²)`` int64: for positions i, j of a ws×ws window, ``|Δrow|·ws + |Δcol|``."""
    r = torch.arange(ws).repeat_interleave(ws)
    c = torch.arange(ws).repeat(ws)
    return (r[:, None] - r[None, :]).abs() * ws + (c[:, None] - c[None, :]).abs()


class WindowAttention(nn.Module):
    """Multi-head self-attention over tokens ``(N_windows, ws², C)`` with a learned relative bias.

    LayerNorm first (inside this module, as in the checkpoint layout); ``qkv`` output is split per
    head as ``[q | k | v]`` (head-major); scale ``head_dim ** -0.5``; additive bias
    ``attention_biases[h, |Δrow|·ws + |Δcol|]``.
    """

    def __init__(self, dim: int, num_heads: int, ws: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, ws * ws))
        self.register_buffer("bias_index", _bias_index(ws), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=-1)  # each (b, heads, n, hd)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)  # (heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """LayerNorm, Linear C→hidden, GELU, Linear hidden→C (acts on the last axis)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """One attention block on ``(B, H, W, C)`` tokens, shape preserved.

    ``x + attn(windows(x))`` (grid zero-padded bottom/right to a multiple of ``ws``, padded tokens
    attend unmasked, then cropped); then a 3×3 depthwise Conv-BN ``local_conv`` with no residual;
    then ``x + mlp(x)``.
    """

    def __init__(self, dim: int, num_heads: int, ws: int, mlp_ratio: float, local_k: int) -> None:
        super().__init__()
        self.ws = ws
        self.attn = WindowAttention(dim, num_heads, ws)
        self.local_conv = ConvBN(dim, dim, local_k, 1, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.ws
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        nh, nw = hp // ws, wp // ws
        t = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        t = self.attn(t)
        t = t.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        if ph or pw:
            t = t[:, :h, :w, :]
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks then patch merging; NCHW in and out."""

    def __init__(self, dim: int, depth: int, expand: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class BasicLayer(nn.Module):
    """Attention stage: NCHW in, blocks on NHWC tokens, optional patch merging, NCHW out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        ws: int,
        mlp_ratio: float,
        local_k: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, ws, mlp_ratio, local_k) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """MobileSAM's image encoder: ``(B, 3, S, S)`` float32 → ``(B, out_chans, S/16, S/16)`` float32.

    ``img_size`` (an attribute, as ``segment_anything.SamPredictor`` expects) is the square input
    side, 1024 for MobileSAM.
    """

    def __init__(self, config: TinyViTConfig | None = None) -> None:
        super().__init__()
        cfg = config or TinyViTConfig()
        n = len(cfg.embed_dims)
        if not (len(cfg.depths) == len(cfg.num_heads) == len(cfg.window_sizes) == n) or len(
            cfg.merge_strides
        ) != n - 1:
            raise ValueError(f"inconsistent TinyViT config lengths: {cfg}")
        self.config = cfg
        self.img_size = cfg.img_size
        dims = cfg.embed_dims
        self.patch_embed = PatchEmbed(cfg.in_chans, dims[0])
        layers: list[nn.Module] = []
        for i in range(n):
            down = PatchMerging(dims[i], dims[i + 1], cfg.merge_strides[i]) if i < n - 1 else None
            if i == 0:
                layers.append(ConvLayer(dims[0], cfg.depths[0], cfg.mbconv_expand, down))
            else:
                layers.append(
                    BasicLayer(
                        dims[i],
                        cfg.depths[i],
                        cfg.num_heads[i],
                        cfg.window_sizes[i],
                        cfg.mlp_ratio,
                        cfg.local_conv_size,
                        down,
                    )
                )
        self.layers = nn.ModuleList(layers)
        # Unused ImageNet classifier, kept so that the official state dict loads strictly.
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], cfg.num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], cfg.out_chans, 1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, 3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 3, img_size, img_size)`` → ``(B, out_chans, img_size/16, img_size/16)``."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)
