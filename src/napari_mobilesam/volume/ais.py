"""AIS of one slice or a stack: the driver over :mod:`~napari_mobilesam.volume.instance`.

:func:`segment_slice_ais` runs a slice whole, or tiled in one of two ways (micro-sam's stitched
maps, or :mod:`~napari_mobilesam.volume.ais_blocks`' window by window);
:func:`segment_stack_ais` runs a stack slice by slice and stitches the labels through z.
All arrays are napari's (row, col) order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .ais_blocks import segment_slice_ais_blocks
from .instance import (
    AISParams,
    _decoder_of,
    decoder_maps,
    instances_from_maps,
    tiled_decoder_maps,
)
from .stitch import Stitcher

__all__ = ["segment_slice_ais", "segment_stack_ais"]


def segment_slice_ais(
    sam: Any,
    image: Any,
    params: AISParams | None = None,
    decoder: Any = None,
    *,
    tile_shape: int | tuple[int, int] | None = None,
    halo: int | tuple[int, int] = (64, 64),
    grid: Any = None,
) -> np.ndarray:
    """AIS labels ``(H, W)`` of one slice (see :func:`decoder_maps`, :func:`instances_from_maps`).

    ``image``: ``(H, W)`` or ``(H, W, C)`` array (numpy, or lazy: dask, zarr, :class:`SliceWindows`).

    With ``tile_shape`` (micro-sam's tiling, ``TileGrid.from_cores(shape, tile_shape, halo)``) or a
    ``grid`` the slice is done tile by tile, in one of two ways (``params.tiling``, see
    :class:`AISParams`; ``"auto"`` chooses by ``params.stitch_max_pixels``):

    - ``"stitched"``, micro-sam's: the tiles' maps are stitched by :func:`tiled_decoder_maps` and
      post-processed as one image. Labels uint64, micro-sam's. The whole slice is read and the
      maps and watershed temporaries are slice-sized (about 50 bytes per pixel).
    - ``"blocks"``: the tiles are read and decoded one at a time and the same stitched maps are
      post-processed window by window, the windows' objects merged
      (:func:`~napari_mobilesam.volume.ais_blocks.segment_slice_ais_blocks`). Labels int32 (the
      only slice-sized array); 99.96 % of pixels as the stitched path on the micro-sam fixture.

    Objects crossing tiles are one instance in both.

    Untiled, the labels are uint64 (micro-sam's dtype).
    """
    p = params or AISParams()
    if not hasattr(image, "shape"):
        image = np.asarray(image)
    if tile_shape is not None or grid is not None:
        from ..core.tiles import TileGrid

        shape = tuple(image.shape[:2])
        if grid is None:
            grid = TileGrid.from_cores(shape, tile_shape, halo)
        if p.tiling_for(shape) == "blocks":
            return segment_slice_ais_blocks(sam, image, grid, p, decoder)
        maps = tiled_decoder_maps(sam, np.asarray(image), decoder=decoder, grid=grid)
        return instances_from_maps(*maps, p)
    return instances_from_maps(*decoder_maps(sam, np.asarray(image), decoder), p)


def segment_stack_ais(
    sam: Any,
    stack: Any,
    params: AISParams | None = None,
    decoder: Any = None,
    *,
    min_iou: float = 0.3,
    min_overlap: float = 0.6,
    max_gap: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Iterator[np.ndarray]:
    """AIS of every slice of ``stack``, stitched through z; yields ``(H, W)`` int32 slices in order.

    ``stack``: a ``(Z, H, W)`` array (or any sequence of 2D slices; a ``SliceSource`` gives its raw
    slices). Only one slice is held at a time besides the stitcher's short history. ``min_iou``,
    ``min_overlap``, ``max_gap``: see :class:`~napari_mobilesam.volume.automatic.Stitcher`.
    ``progress(z)`` is called after each slice.
    """
    dec = _decoder_of(sam, decoder)
    stitcher = Stitcher(min_iou, min_overlap, max_gap)
    n = len(stack)
    for z in range(n):
        raw = stack.raw(z) if hasattr(stack, "raw") else np.asarray(stack[z])
        labels = segment_slice_ais(sam, raw, params, dec)
        yield stitcher.add(labels)
        if progress is not None:
            progress(z)
