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


def _as_int32(labels: np.ndarray) -> np.ndarray:
    """A tile's (non-negative) labels as int32: ids kept when they fit, else renumbered 1..n."""
    if labels.size and labels.max() > np.iinfo(np.int32).max:
        from skimage.segmentation import relabel_sequential

        labels = relabel_sequential(labels)[0]
    return labels.astype(np.int32)


def merge_tile_labels(shape: tuple[int, int], pieces: Iterable[tuple[Tile, np.ndarray]], *,
                      min_new: float = 0.0, min_pixels: int = 1, rescue: bool = False,
                      extend: bool = False) -> np.ndarray:
    """Whole-slice ``(H, W)`` int32 labels from per-tile labels.

    ``pieces``: ``(tile, labels)`` with ``labels`` of the tile's ``outer`` shape (0 = background,
    any integer dtype), consumed one at a time (a generator keeps one tile in memory). An object is
    kept when its centre of mass lies in the tile's core; it is written where no earlier object is,
    with a new id (1, 2, ... in tile order). Only the output is slice-sized: each object is written
    within its bounding box.

    Two tiles see an object crossing their cores from slightly different pixels (their halos), so
    their two versions of it may both have their centre in their own core (two copies) or both in
    the other's (none kept). The options handle that:

    - ``min_new``: an object is written as a new one only if at least this fraction of its pixels
      is still free; less means a neighbour wrote (its version of) the same object already.
    - ``extend`` (with ``min_new``): such an object's free pixels *inside this tile's core* are
      added to the written object it overlaps most: an object larger than the halo, cut at the
      window's edge of the tile that kept it, is continued by the tile holding the rest of it.
    - ``rescue``: an object whose centre lies in the core of a tile merged *before* is considered
      too (that tile's version of it may have had its centre here and not been kept).
    - ``min_pixels``: objects with fewer free pixels are not written as new ones.
    """
    out = np.zeros(shape, dtype=np.int32)
    next_id = 1
    merged: list[Tile] = []
    for tile, labels in pieces:
        labels = np.asarray(labels)
        if labels.shape != tile.shape:
            raise ValueError(f"tile {tile.index} labels are {labels.shape}, expected {tile.shape}")
        if labels.dtype.kind not in "iu" or labels.dtype.itemsize > 4:  # e.g. AIS's uint64
            labels = _as_int32(labels)
        ids = np.unique(labels)
        ids = ids[ids != 0]
        if not len(ids):
            merged.append(tile)
            continue
        r0, r1, c0, c1 = tile.outer
        earlier = [t for t in merged if t.core[0] < r1 and t.core[1] > r0 and t.core[2] < c1 and t.core[3] > c0] if rescue else []
        centres = ndi.center_of_mass(np.ones(labels.shape, np.uint8), labels, ids)
        view = out[tile.region]
        objects = ndi.find_objects(labels)
        for obj_id, (cr, cc) in zip(ids, centres):
            row, col = cr + r0, cc + c0
            if not tile.in_core(row, col) and not any(t.in_core(row, col) for t in earlier):
                continue
            box = objects[int(obj_id) - 1]
            obj = labels[box] == obj_id
            sel = obj & (view[box] == 0)
            n_new = int(np.count_nonzero(sel))
            if n_new == 0:
                continue
            if min_new and n_new < min_new * np.count_nonzero(obj):
                if extend:
                    _extend(view[box], obj, sel & _core_mask(tile, box))
                continue
            if n_new < min_pixels:
                continue
            view[box][sel] = next_id
            next_id += 1
        merged.append(tile)
    return out


def _core_mask(tile: Tile, box: tuple[slice, slice]) -> np.ndarray:
    """Which pixels of ``box`` (a window in ``tile``'s outer coordinates) lie in its core: a bool
    array broadcasting to the box's shape."""
    r0, _, c0, _ = tile.outer
    q0, q1, p0, p1 = tile.core
    rows = np.arange(box[0].start, box[0].stop) + r0
    cols = np.arange(box[1].start, box[1].stop) + c0
    return ((rows >= q0) & (rows < q1))[:, None] & ((cols >= p0) & (cols < p1))[None, :]


def _extend(window: np.ndarray, obj: np.ndarray, add: np.ndarray) -> None:
    """Write ``add`` (free pixels) into ``window`` with the id that ``obj`` overlaps most there."""
    if not add.any():
        return
    under = window[obj]
    under = under[under > 0]
    ids, counts = np.unique(under, return_counts=True)
    window[add] = ids[np.argmax(counts)]


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

