"""A stand-in AIS network for tests: NOT a model.

``fake_ais_model()`` is ``vit_t_test`` with ``PoolingFakeEncoder`` (the preprocessed image
average-pooled to the embedding's shape) and ``BrightBlobsFakeDecoder`` (foreground where that is
bright) attached as the AIS decoder, so the real AIS code path (micro-sam's input conversion, the
encoder and decoder calls, cropping and resizing the maps, the seeded watershed, stitching) runs in
milliseconds where micro-sam's decoder takes tens of seconds per slice on the test machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PoolingFakeEncoder(torch.nn.Module):
    """NOT an encoder: the preprocessed (1, 3, 1024, 1024) input averaged over colour and pooled
    to (1, 256, 64, 64) (one plane repeated), so the "embedding" follows the image."""

    img_size = 1024

    def forward(self, x):
        return F.avg_pool2d(x.mean(1, keepdim=True), 16).repeat(1, 256, 1, 1)


class BrightBlobsFakeDecoder(torch.nn.Module):
    """NOT micro-sam's decoder: foreground = sigmoid of the pooled brightness, both distance maps
    = 1 - foreground, upsampled to (1, 3, 1024, 1024) like the real decoder's output."""

    def forward(self, emb):
        fg = torch.sigmoid(4.0 * emb[:, :1])
        maps = torch.cat([fg, 1 - fg, 1 - fg], 1)
        return F.interpolate(maps, size=(1024, 1024), mode="bilinear", align_corners=False)


def fake_ais_model():
    """``vit_t_test`` with the stand-in encoder and decoder (a Sam the engine drives as usual)."""
    from napari_mobilesam.models.registry import DECODER_ATTR, build_sam

    sam = build_sam("vit_t_test", seed=0)
    sam.image_encoder = PoolingFakeEncoder()
    object.__setattr__(sam, DECODER_ATTR, BrightBlobsFakeDecoder())
    return sam
