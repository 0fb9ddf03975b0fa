"""Automatic segmentation of slices too large for one look of the model: tile by tile, merged.

Each tile of a :class:`~napari_mobilesam.core.tiles.TileGrid` is segmented on its own (by
:func:`~napari_mobilesam.volume.automatic.segment_slice` or any per-tile segmenter, e.g. the
instance-segmentation decoder), and an object is kept by the tile whose core holds its centre, so
each object is found once; the halo makes objects up to ``halo`` pixels past a core complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..core.tiles import Tile, TiledPredictor

__all__ = ["merge_tile_labels", "segment_slice_tiled"]


def merge_tile_labels(shape: tuple[int, int], pieces: Iterable[tuple[Tile, np.ndarray]]) -> np.ndarray:
    """Whole-slice ``(H, W)`` int32 labels from per-tile labels.

    ``pieces``: ``(tile, labels)`` with ``labels`` of the tile's ``outer`` shape (0 = background).
    An object is kept when its centre of mass lies in the tile's core; it is written where no
    earlier object is, with a new id (1, 2, ... in tile order).
    """
    out = np.zeros(shape, dtype=np.int32)
    next_id = 1
    for tile, labels in pieces:
        labels = np.asarray(labels)
        if labels.shape != tile.shape:
            raise ValueError(f"tile {tile.index} labels are {labels.shape}, expected {tile.shape}")
        ids = np.unique(labels)
        ids = ids[ids != 0]
        if not len(ids):
            continue
        r0, _, c0, _ = tile.outer
        centres = ndi.center_of_mass(np.ones_like(labels), labels, ids)
        view = out[tile.region]
        objects = ndi.find_objects(labels)
        for obj_id, (cr, cc) in zip(ids, centres):
            if not tile.in_core(cr + r0, cc + c0):
                continue
            box = objects[int(obj_id) - 1]
            sel = (labels[box] == obj_id) & (view[box] == 0)
            if sel.any():
                view[box][sel] = next_id
                next_id += 1
    return out


def segment_slice_tiled(
    predictor: TiledPredictor,
    z: int,
    params: Any = None,
    segment: Callable[[Any, int, Any], Any] | None = None,
) -> np.ndarray:
    """Automatic instance labels ``(H, W)`` int32 of slice ``z`` of a tiled source.

    ``segment(tile_predictor, z, params)`` segments one tile and returns its labels or an object
    with ``.labels`` (default: :func:`~napari_mobilesam.volume.automatic.segment_slice`).
    """
    if segment is None:
        from .automatic import segment_slice as segment

    def pieces():
        for tile in predictor.grid.tiles:
            res = segment(predictor.tile_predictor(tile), z, params)
            yield tile, getattr(res, "labels", res)

    return merge_tile_labels(predictor.slice_shape, pieces())

