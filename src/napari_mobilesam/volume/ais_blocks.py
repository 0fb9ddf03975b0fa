"""Automatic instance segmentation (AIS) of large tiled slices, window by window, in bounded memory.

micro-sam's tiled AIS (:func:`~napari_mobilesam.volume.instance.tiled_decoder_maps` then
:func:`~napari_mobilesam.volume.instance.instances_from_maps`) stitches the tiles' decoder maps
(each tile's *core*) into ``(3, H, W)`` float32 whole-slice maps and smooths and watersheds them as
one image: about 50 bytes per slice pixel at its peak (traced: 200 MiB at 2048², so about 5 GB at
10 000²), growing with the slice. Here the same stitched maps are post-processed one tile window
at a time:

1. each tile's window (its ``outer``: core plus halo) is read from the slice, normalised as
   micro-sam does (per tile), embedded and decoded, once; its core is kept (uint16);
2. as soon as the cores around a tile are decoded, the tile's window of the *stitched* maps is
   assembled from them (:func:`stitched_windows`: exactly micro-sam's maps there, each tile's maps
   being used in its core only, as micro-sam does) and post-processed on the window (smoothing,
   seeds, watershed, size filter), giving window-local labels;
3. the window's objects are merged into the int32 whole-slice labels by
   :func:`~napari_mobilesam.volume.tiled.merge_tile_labels`: an object is kept by the tile whose
   core holds its centre, whole (with its pixels in the halo), so an object crossing cores is one
   instance; a copy already written by a neighbour is not written again (its free pixels in this
   core continue that object), and an object whose neighbour's version was not kept is rescued.

Held at once: one tile's image, embedding, maps, window and post-processing temporaries (about
50 bytes per *tile* pixel), the decoded cores not used up yet (about one line of tiles along the
slice's shorter side, at 6 bytes per pixel: 89 MiB at 10 000², 148 MiB at 20 000² in 1024-pixel
tiles, against outputs of 381 and 1526 MiB), the int32 output slice and the process's maps cache
(:data:`~napari_mobilesam.models.ais_decoder.MAPS_CACHE`, its own fixed budget).

Where the result can differ from post-processing the whole stitched maps:

- **Smoothing** is exact in every core when the halo is at least ceil(3σ) (the Gaussian's radius:
  5 pixels with micro-sam's σ = 1.6; tiles have a halo of 64 or 128): a core pixel's smoothed
  value depends on map values within that radius only, all inside the window, and the window's
  mirrored border changes values within that radius of its edge only. :func:`check_halo` refuses
  smaller halos.
- **Seeds and watershed** in a window see the objects around a core up to the halo: an object
  reaching further than the halo past the core holding its centre is cut at the window's edge,
  and what the next tile's core holds of it is added to it there; the rest (pixels beyond the
  halo and outside that tile's core) stays unlabelled.
- ``min_size`` is applied per window and to what an object adds to the output.

Measured on the micro-sam fixture (its stitched 1100 x 900 maps, micro-sam's 512-pixel tiles with
a 64-pixel halo): 99.96 % of pixels in the same instance as the whole-image result, 440 instances
for 439 (micro-sam's own block-wise post-processing: 99.98 %). All arrays are napari's (row, col)
order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..core.tiles import Tile
from ..errors import InputError
from .instance import AISParams, _decoder_of, decoder_maps, instances_from_maps
from .tiled import merge_tile_labels

__all__ = ["instances_by_blocks", "segment_slice_ais_blocks", "stitched_windows", "check_halo"]

# An object is written only if at least this fraction of its pixels is still free: less means a
# neighbouring tile wrote (its version of) the same object already.
MIN_NEW_FRACTION = 0.5


def check_halo(grid: Any, params: AISParams) -> None:
    """InputError if ``grid``'s halo is smaller than the smoothing radius ceil(3σ): the cores'
    smoothed maps would then depend on pixels outside the tile's window."""
    need = params.smoothing_radius
    multi = grid.grid_shape[0] > 1 or grid.grid_shape[1] > 1
    if multi and grid.halo < need:
        raise InputError(
            f"block-wise AIS needs a tile halo of at least {need} pixels (3 x the smoothing sigma, "
            f"{max(params.foreground_smoothing, params.distance_smoothing)}), got {grid.halo}: "
            "use a larger halo, smaller smoothing, or tiling='stitched'"
        )


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def _needs(grid: Any) -> list[list[int]]:
    """For each tile, the tiles whose core meets its window (itself included): the cores its
    stitched maps are made of. Found per grid row and column (cores are aligned in a grid)."""
    n_r, n_c = grid.grid_shape
    rows = [grid.tiles[i * n_c].core[:2] for i in range(n_r)]
    cols = [grid.tiles[j].core[2:] for j in range(n_c)]
    out = []
    for t in grid.tiles:
        r0, r1, c0, c1 = t.outer
        ii = [i for i, (q0, q1) in enumerate(rows) if q0 < r1 and r0 < q1]
        jj = [j for j, (p0, p1) in enumerate(cols) if p0 < c1 and c0 < p1]
        out.append([i * n_c + j for i in ii for j in jj])
    return out


def _order(grid: Any) -> list[int]:
    """Tile indices line by line along the longer side (row by row when there are at least as
    many rows of tiles as columns): the cores held at once are then about one line's worth of
    the slice's shorter side."""
    n_r, n_c = grid.grid_shape
    if n_c <= n_r:
        return list(range(n_r * n_c))
    return [i * n_c + j for j in range(n_c) for i in range(n_r)]


def stitched_windows(grid: Any, tile_maps: Callable[[Tile], np.ndarray]) -> Iterator[tuple[Tile, np.ndarray]]:
    """``(tile, maps)`` for every tile: ``maps`` ``(3, h, w)`` float32 over the tile's window, made
    of the cores of the tiles it overlaps, i.e. exactly micro-sam's stitched maps there (each
    tile's maps are trusted in its core only). ``tile_maps(tile)`` is called once per tile.

    Tiles are decoded line by line (:func:`_order`); a tile's window is yielded as soon as every
    core it needs is decoded, and a core is dropped once no window needs it any more. Cores are
    kept as uint16 (``round(value * 65535)``, maps lie in [0, 1]: 1.5e-5 of precision, as the
    micro-sam fixture stores its stitched maps), so what is held is about one line of tiles' cores
    at 6 bytes per pixel, plus one window.
    """
    needs = _needs(grid)
    needed_by: list[set[int]] = [set() for _ in grid.tiles]
    for t, ns in enumerate(needs):
        for n in ns:
            needed_by[n].add(t)
    # decoded cores: tile index -> (uint16 (3, h, w) maps, (row, col) of their top-left pixel)
    cores: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
    done: set[int] = set()
    order = _order(grid)
    waiting = list(order)  # windows not yielded yet, in order
    for index in order:
        tile = grid.tiles[index]
        maps = np.asarray(tile_maps(tile))
        if maps.shape != (3, *tile.shape):
            raise InputError(f"tile {tile.index}'s maps are {maps.shape}, expected {(3, *tile.shape)}")
        r0, r1, c0, c1 = tile.core
        o0, _, p0, _ = tile.outer
        core = maps[:, r0 - o0 : r1 - o0, c0 - p0 : c1 - p0]
        q = np.clip(core, 0.0, 1.0)
        q *= 65535.0
        cores[index] = np.rint(q, out=q).astype(np.uint16), (r0, c0)
        del maps, core, q
        while waiting and all(n in cores for n in needs[waiting[0]]):
            t = grid.tiles[waiting.pop(0)]
            yield t, _window(t, needs[t.index], cores)
            done.add(t.index)
            for n in needs[t.index]:
                needed_by[n].discard(t.index)
                if not needed_by[n]:
                    del cores[n]
                elif n in done:  # only the parts of it in windows still to come are needed
                    cores[n] = _crop(cores[n], [grid.tiles[d].outer for d in needed_by[n]])


def _crop(core: tuple[np.ndarray, tuple[int, int]], windows: list[tuple[int, int, int, int]]):
    """``core`` cut to the bounding box of its parts inside ``windows`` (slice coordinates)."""
    a, (q0, p0) = core
    q1, p1 = q0 + a.shape[1], p0 + a.shape[2]
    r0 = max(min(w[0] for w in windows), q0)
    r1 = min(max(w[1] for w in windows), q1)
    c0 = max(min(w[2] for w in windows), p0)
    c1 = min(max(w[3] for w in windows), p1)
    if (r0, r1, c0, c1) == (q0, q1, p0, p1):
        return core
    return a[:, r0 - q0 : r1 - q0, c0 - p0 : c1 - p0].copy(), (r0, c0)


def _window(tile: Tile, parts: list[int], cores: dict[int, tuple[np.ndarray, tuple[int, int]]]) -> np.ndarray:
    """The float32 ``(3, h, w)`` maps of ``tile``'s window from the uint16 cores ``parts``."""
    r0, r1, c0, c1 = tile.outer
    win = np.empty((3, r1 - r0, c1 - c0), np.float32)
    filled = 0
    for n in parts:
        a, (q0, p0) = cores[n]
        q1, p1 = q0 + a.shape[1], p0 + a.shape[2]
        a0, a1, b0, b1 = max(q0, r0), min(q1, r1), max(p0, c0), min(p1, c1)
        if a0 >= a1 or b0 >= b1:
            continue
        src = a[:, a0 - q0 : a1 - q0, b0 - p0 : b1 - p0]
        np.multiply(src, np.float32(1 / 65535), out=win[:, a0 - r0 : a1 - r0, b0 - c0 : b1 - c0])
        filled += (a1 - a0) * (b1 - b0)
    if filled != win.shape[1] * win.shape[2]:  # cores partition the slice: never (a bug otherwise)
        raise AssertionError(f"tile {tile.index}'s window is not covered by its neighbours' cores")
    return win


def instances_by_blocks(
    shape: tuple[int, int],
    grid: Any,
    tile_maps: Callable[[Tile], np.ndarray],
    params: AISParams | None = None,
) -> np.ndarray:
    """Whole-slice ``(H, W)`` int32 labels (ids 1..N) from per-tile maps, window by window.

    ``grid``: a :class:`~napari_mobilesam.core.tiles.TileGrid` of the slice ``shape`` (rows, cols);
    ``tile_maps(tile)``: the ``(3, h, w)`` maps (foreground, centre distances, boundary distances)
    of ``tile.outer`` (``tile.shape``), called once per tile. Each tile's window of the stitched
    maps (:func:`stitched_windows`) is post-processed with :func:`instances_from_maps` and the
    tiles' objects are merged (see the module docstring).
    """
    p = params or AISParams()
    shape = (int(shape[0]), int(shape[1]))
    if tuple(grid.shape) != shape:
        raise InputError(f"the tile grid is for a {grid.shape} slice, not {shape}")
    check_halo(grid, p)

    def pieces() -> Iterator[tuple[Tile, np.ndarray]]:
        for tile, maps in stitched_windows(grid, tile_maps):
            labels = instances_from_maps(maps[0], maps[1], maps[2], p)
            del maps
            yield tile, labels

    return merge_tile_labels(shape, pieces(), min_new=MIN_NEW_FRACTION, min_pixels=max(1, p.min_size),
                             rescue=True, extend=True)


def segment_slice_ais_blocks(
    sam: Any,
    image: Any,
    grid: Any,
    params: AISParams | None = None,
    decoder: Any = None,
) -> np.ndarray:
    """AIS labels ``(H, W)`` int32 of a tiled slice, block by block (see the module docstring).

    ``image``: the slice, ``(H, W)`` or ``(H, W, C)``, anything indexed by ``image[rows, cols]``
    and having ``shape`` (a numpy, dask or zarr array, or
    :class:`~napari_mobilesam.volume.instance.SliceWindows` of a ``SliceSource``): only one tile's
    window is read at a time. ``grid``: the slice's ``TileGrid``.
    """
    dec = _decoder_of(sam, decoder)

    def tile_maps(tile: Tile) -> np.ndarray:
        return decoder_maps(sam, np.asarray(image[tile.region]), dec)

    return instances_by_blocks(tuple(image.shape[:2]), grid, tile_maps, params)
