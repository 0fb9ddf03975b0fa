"""Tiled slices: large slices seen by the model at full resolution, one overlapping tile at a time.

SAM resizes a slice's longest side to 1024 pixels, so a 4096 × 4096 frame is shrunk fourfold and
small nuclei vanish. Here a slice larger than ``tile`` is cut into overlapping ``tile × tile``
windows (``halo`` pixels of overlap on each inner side); each window is embedded at full
resolution and cached per (slice, tile) in the same byte-bounded :class:`EmbeddingCache` as whole
slices (a tile is keyed by its own RGB content), computed lazily when a prompt needs it and
prefetched around where the user works.

:class:`TiledPredictor` has :class:`~napari_mobilesam.core.predictor.SlicePredictor`'s interface
(``predict``, ``predict_many``, ``n_slices``, ``slice_shape``, ``cache``, ``prefetch_around``), so
propagation and the batch API work on tiled slices unchanged. A prompt is answered in the tile
whose core holds it (the halo covers objects crossing the core's border); a mask reaching a tile's
inner edge is continued in the neighbouring tile, prompted with the part already found, and the
pieces are merged. Masks are returned in whole-slice coordinates, (row, col) like everywhere.

Memory: a tile's pixels are read through ``SliceSource.rgb(z, region)`` (a lazy array reads only
that window), so what is held is bounded by the embedding cache's budget plus one tile's image,
whatever the slice size; only the returned masks are slice-sized.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from .predictor import Prediction, Prompt, SlicePredictor, as_prompt
from .source import SliceSource

__all__ = ["Tile", "TileGrid", "TileView", "TiledPredictor", "DEFAULT_TILE", "DEFAULT_HALO"]

#: Tile side: the encoder's input size, so a tile is seen at full resolution (no resizing).
DEFAULT_TILE = 1024
#: Overlap on each inner side: objects up to ``halo`` pixels past a tile's core are complete in it.
DEFAULT_HALO = 128
# How many tiles one object may be followed through before it is cut (bounds the work per prompt).
_MAX_TILES_PER_OBJECT = 16


@dataclass(frozen=True)
class Tile:
    """One window of a slice: ``outer`` is what the model sees, ``core`` the part it owns.

    Both are ``(row0, row1, col0, col1)``, half-open, in slice coordinates; cores of a grid's
    tiles partition the slice, outers overlap by up to ``2 * halo``.
    """

    index: int
    grid_pos: tuple[int, int]
    outer: tuple[int, int, int, int]
    core: tuple[int, int, int, int]

    @property
    def shape(self) -> tuple[int, int]:
        r0, r1, c0, c1 = self.outer
        return r1 - r0, c1 - c0

    @property
    def region(self) -> tuple[slice, slice]:
        r0, r1, c0, c1 = self.outer
        return slice(r0, r1), slice(c0, c1)

    def in_core(self, row: float, col: float) -> bool:
        r0, r1, c0, c1 = self.core
        return r0 <= row < r1 and c0 <= col < c1


def _starts(n: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(outer0, outer1, core0, core1) along one axis of length ``n``."""
    if n <= tile:
        return [(0, n, 0, n)]
    stride = tile - 2 * halo
    n_tiles = int(np.ceil((n - 2 * halo) / stride))
    out = []
    for i in range(n_tiles):
        core0 = 0 if i == 0 else halo + i * stride
        core1 = n if i == n_tiles - 1 else halo + (i + 1) * stride
        outer0 = min(max(core0 - halo, 0), n - tile)  # full-size tiles, shifted inside the slice
        out.append((outer0, outer0 + tile, core0, core1))
    return out


class TileGrid:
    """Overlapping tiles covering an ``(H, W)`` slice.

    Parameters
    ----------
    shape : (H, W)
    tile : int
        Side of each (square) tile in pixels; a slice no larger than ``tile`` is one tile.
    halo : int
        Overlap on each inner side; ``0 <= 2 * halo < tile``.
    """

    def __init__(self, shape: tuple[int, int], tile: int = DEFAULT_TILE, halo: int = DEFAULT_HALO):
        tile, halo = int(tile), int(halo)
        if tile < 64:
            raise InputError(f"tile size {tile} is too small: use at least 64 pixels (default {DEFAULT_TILE})")
        if halo < 0 or 2 * halo >= tile:
            raise InputError(
                f"halo {halo} does not fit tile size {tile}: use 0 <= halo < tile / 2 (default {DEFAULT_HALO})"
            )
        self.shape = (int(shape[0]), int(shape[1]))
        self.tile, self.halo = tile, halo
        rows = _starts(self.shape[0], tile, halo)
        cols = _starts(self.shape[1], tile, halo)
        self.grid_shape = (len(rows), len(cols))
        self.tiles = [
            Tile(i * len(cols) + j, (i, j), (r[0], r[1], c[0], c[1]), (r[2], r[3], c[2], c[3]))
            for i, r in enumerate(rows)
            for j, c in enumerate(cols)
        ]

    @classmethod
    def from_cores(cls, shape: tuple[int, int], core: int | tuple[int, int] = 512,
                   halo: int | tuple[int, int] = 64) -> TileGrid:
        """micro-sam's tiling (bioimage-cpp's ``Blocking``): cores of ``core`` pixels (or (rows,
        cols)) from the top-left corner, the last ones smaller; each tile its core plus ``halo`` on
        every side, clipped to the slice (so border tiles are smaller)."""
        cr, cc = (int(core), int(core)) if np.isscalar(core) else (int(core[0]), int(core[1]))
        hr, hc = (int(halo), int(halo)) if np.isscalar(halo) else (int(halo[0]), int(halo[1]))
        if min(cr, cc) < 16 or min(hr, hc) < 0:
            raise InputError(f"core {core} and halo {halo}: use cores of at least 16 pixels and halo >= 0")
        grid = cls.__new__(cls)
        grid.shape = (int(shape[0]), int(shape[1]))
        grid.tile, grid.halo = max(cr, cc) + 2 * max(hr, hc), max(hr, hc)

        def axis(n, core, halo):
            return [(max(a - halo, 0), min(a + core + halo, n), a, min(a + core, n)) for a in range(0, n, core)]

        rows, cols = axis(grid.shape[0], cr, hr), axis(grid.shape[1], cc, hc)
        grid.grid_shape = (len(rows), len(cols))
        grid.tiles = [
            Tile(i * len(cols) + j, (i, j), (r[0], r[1], c[0], c[1]), (r[2], r[3], c[2], c[3]))
            for i, r in enumerate(rows)
            for j, c in enumerate(cols)
        ]
        return grid

    def __len__(self) -> int:
        return len(self.tiles)

    def tile_at(self, row: float, col: float) -> Tile:
        """The tile whose core holds the point ``(row, col)`` (clipped into the slice)."""
        row = min(max(float(row), 0.0), self.shape[0] - 1e-6)
        col = min(max(float(col), 0.0), self.shape[1] - 1e-6)
        for t in self.tiles:
            if t.in_core(row, col):
                return t
        raise AssertionError("cores cover the slice")  # pragma: no cover

    def neighbours(self, tile: Tile) -> list[Tile]:
        """The up to 8 tiles around ``tile``."""
        i, j = tile.grid_pos
        n_r, n_c = self.grid_shape
        return [
            self.tiles[a * n_c + b]
            for a in range(max(i - 1, 0), min(i + 2, n_r))
            for b in range(max(j - 1, 0), min(j + 2, n_c))
            if (a, b) != (i, j)
        ]


class TileView:
    """One tile of every slice of a source, with the slice interface the embedding cache uses.

    ``rgb(z)`` is the tile's window of ``source.rgb(z)`` (normalised with the whole slice's or
    stack's range), ``slice_key(z)`` names its content, ``slice_shape`` is the tile's shape.
    """

    def __init__(self, source: Any, tile: Tile):
        self.source = source
        self.tile = tile
        self.n_slices = source.n_slices
        self.slice_shape = tile.shape
        self.is_2d = getattr(source, "is_2d", False)

    def rgb(self, z: int) -> np.ndarray:
        return self.source.rgb(z, self.tile.region)

    def slice_key(self, z: int) -> str:
        return self.source.slice_key(z, self.tile.region)


def _prompt_center(p: Prompt) -> tuple[float, float]:
    """(row, col) a prompt is about: its box's centre, else the mean of its positive points."""
    if p.box is not None:
        r0, c0, r1, c1 = np.asarray(p.box, dtype=float).reshape(4)
        return (r0 + r1) / 2, (c0 + c1) / 2
    if p.points is not None:
        pts = np.asarray(p.points, dtype=float).reshape(-1, 2)
        labels = np.ones(len(pts)) if p.labels is None else np.asarray(p.labels).reshape(-1)
        pos = pts[labels > 0] if (labels > 0).any() else pts
        return float(pos[:, 0].mean()), float(pos[:, 1].mean())
    raise InputError("a tiled slice needs a point or box prompt to know which tile to use (mask_input alone is not enough)")


def _shift(p: Prompt, dr: int, dc: int, shape: tuple[int, int] | None = None) -> Prompt:
    """``p`` moved by ``(-dr, -dc)``: slice coordinates to a tile's.

    With ``shape`` (the tile's ``(h, w)``), what lies outside the tile is left out: points
    outside it are dropped and the box is clipped to it (a prompt made from a large mask, e.g.
    by propagation, may reach beyond the window of the tile holding its centre; the object is
    then followed into the neighbouring tiles). The point chosen for the tile stays.
    """
    pts = None if p.points is None else np.asarray(p.points, dtype=float).reshape(-1, 2) - (dr, dc)
    box = None if p.box is None else np.asarray(p.box, dtype=float).reshape(4) - (dr, dc, dr, dc)
    labels = p.labels
    if shape is not None:
        h, w = shape
        if box is not None:
            box = np.clip(box, 0, [h - 1, w - 1, h - 1, w - 1])
        if pts is not None:
            inside = (pts[:, 0] >= 0) & (pts[:, 0] <= h - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= w - 1)
            if not inside.all():
                labels = None if labels is None else np.asarray(labels).reshape(-1)[inside]
                pts = pts[inside] if inside.any() else None
                labels = None if pts is None else labels
    return Prompt(pts, labels, box, p.mask_input, p.multimask)


class TiledPredictor:
    """Prompts → masks on slices cut into tiles; the interface of ``SlicePredictor``.

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
    source : SliceSource
        The stack; its slices may be any size.
    cache : EmbeddingCache, optional
        Shared (byte-bounded) cache; tiles are stored in it like slices.
    tile, halo : int
        See :class:`TileGrid`.
    tile_predictor : callable, optional
        ``tile_predictor(view)`` makes the predictor of one :class:`TileView` (default: a
        ``SlicePredictor`` sharing ``cache``); ``sam`` is then not used.
    """

    def __init__(self, sam: Any, source: Any, cache: Any = None, *, tile: int = DEFAULT_TILE,
                 halo: int = DEFAULT_HALO, tile_predictor: Callable[[TileView], Any] | None = None):
        if tile_predictor is None:
            first = SlicePredictor(sam, source, cache)  # checks the source and makes the cache
            self.source, self.cache = first.source, first.cache

            def tile_predictor(view: TileView) -> SlicePredictor:
                return SlicePredictor(sam, view, self.cache)
        else:  # e.g. a ground-truth oracle per tile in tests
            self.source = source if hasattr(source, "slice_key") else SliceSource(source)
            self.cache = cache
        self.sam = sam
        self.n_slices, self.slice_shape = self.source.n_slices, self.source.slice_shape
        self.grid = TileGrid(self.slice_shape, tile, halo)
        self._predictors = [tile_predictor(TileView(self.source, t)) for t in self.grid.tiles]
        # low-res logits we returned -> the tile they belong to (they are in its frame)
        self._frames: dict[int, tuple[weakref.ref, int]] = {}
        self._last_tile = 0

    def tile_predictor(self, tile: Tile | int) -> SlicePredictor:
        """The ``SlicePredictor`` of one tile (its coordinates are the tile's)."""
        return self._predictors[tile if isinstance(tile, int) else tile.index]

    # -- embeddings ---------------------------------------------------------------------------------
    def is_tile_embedded(self, z: int, tile: Tile | int) -> bool:
        """Whether ``tile`` of slice ``z`` is in the cache (memory or disk), so a prediction in it
        runs the decoder only. Always True without a cache (e.g. oracle tiles in tests)."""
        tile_pred = self.tile_predictor(tile)
        cache = getattr(tile_pred, "cache", None)
        return cache is None or cache.is_cached(tile_pred.source, z)

    def embed_tiles(self, z: int, tiles: Sequence[Tile | int]) -> None:
        """Compute (or load) the embeddings of ``tiles`` on slice ``z``. Slow: call it in a worker."""
        for tile in tiles:
            tile_pred = self.tile_predictor(tile)
            cache = getattr(tile_pred, "cache", None)
            if cache is not None:
                cache.get(tile_pred.source, z)

    def prefetch(self, zs: Sequence[int]) -> None:
        """Embed, in the background, the tile last worked on, on slices ``zs``."""
        tile_pred = self._predictors[self._last_tile]
        if hasattr(tile_pred, "prefetch"):
            tile_pred.prefetch(zs)

    def prefetch_around(self, z: int, radius: int = 2) -> None:
        """Prefetch the tile last worked on, on the slices around ``z``."""
        tile_pred = self._predictors[self._last_tile]
        if hasattr(tile_pred, "prefetch_around"):
            tile_pred.prefetch_around(z, radius)

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, z: int, points: Any = None, labels: Any = None, box: Any = None,
                mask_input: Any = None, multimask: bool = True, *, return_logits: bool = False) -> Prediction:
        """Masks ``(K, H, W)`` for one object on slice ``z``; arguments as ``SlicePredictor.predict``.

        ``mask_input`` should be the ``low_res`` of an earlier prediction of this predictor (it is
        in that prediction's tile's frame); the logits of ``return_logits`` are not available
        for tiled slices.
        """
        return self.predict_many(z, [Prompt(points, labels, box, mask_input, multimask)],
                                 return_logits=return_logits)[0]

    def predict_many(self, z: int, prompts: Sequence[Prompt | dict], *, return_logits: bool = False) -> list[Prediction]:
        """One ``Prediction`` per prompt, masks in whole-slice coordinates."""
        if return_logits:
            raise InputError("full-resolution logits are not available on tiled slices: use return_logits=False")
        return [self._predict_one(z, as_prompt(p)) for p in prompts]

    def predict_embedded(self, z: int, prompt: Prompt | dict) -> tuple[Prediction | None, list[Tile]]:
        """Like ``predict_many(z, [prompt])[0]``, but using only tiles already embedded: never
        runs the encoder (the widget calls it on the GUI thread).

        Returns ``(prediction, missing)``: ``missing`` lists the tiles the object runs into whose
        embedding is not cached yet (they were not followed; embed them with :meth:`embed_tiles`
        and ask again: once none is missing, the prediction is the one ``predict`` gives).
        ``prediction`` is None when the tile holding the prompt itself is missing.
        """
        missing: list[Tile] = []
        return self._predict_one(z, as_prompt(prompt), missing), missing

    def _frame_of(self, mask_input: Any) -> int | None:
        """The tile whose frame ``mask_input`` (or the array it is a view of) is in, if ours."""
        a = mask_input
        while a is not None:
            entry = self._frames.get(id(a))
            if entry is not None and entry[0]() is a:
                return entry[1]
            a = getattr(a, "base", None)
        return None

    def _remember(self, low_res: np.ndarray, tile: Tile) -> None:
        key = id(low_res)
        self._frames[key] = (weakref.ref(low_res), tile.index)
        weakref.finalize(low_res, self._frames.pop, key, None)

    def _predict_one(self, z: int, p: Prompt, missing: list[Tile] | None = None) -> Prediction | None:
        """The prediction for ``p`` in whole-slice coordinates. With a ``missing`` list, tiles
        not embedded yet are not used but appended to it (None returned if it is the first)."""
        tile = self.grid.tile_at(*_prompt_center(p))
        self._last_tile = tile.index
        if missing is not None and not self.is_tile_embedded(z, tile):
            missing.append(tile)
            return None
        if p.mask_input is not None:
            frame = self._frame_of(p.mask_input)
            if frame is not None and frame != tile.index:  # logits of another tile: not usable here
                p = Prompt(p.points, p.labels, p.box, None, p.multimask)
        r0, _, c0, _ = tile.outer
        pred = self._predictors[tile.index].predict_many(z, [_shift(p, r0, c0, tile.shape)])[0]
        H, W = self.slice_shape
        masks = np.zeros((len(pred.masks), H, W), dtype=bool)
        rows, cols = tile.region
        masks[:, rows, cols] = pred.masks
        self._continue(z, masks[pred.best], tile, missing)  # in place
        low_res = pred.low_res
        self._remember(low_res, tile)
        return Prediction(masks=masks, iou=pred.iou, stability=pred.stability, low_res=low_res, logits=None)

    # -- objects crossing tiles --------------------------------------------------------------------
    def _continue(self, z: int, mask: np.ndarray, first: Tile, missing: list[Tile] | None = None) -> np.ndarray:
        """``mask`` (whole slice, modified in place) extended through the neighbouring tiles it
        runs into (with a ``missing`` list: only through embedded ones, the others appended to
        it). Each tile's piece is merged in that tile's window: no slice-sized temporaries."""
        done = {first.index}
        todo = self._entered(mask[first.region], first, done)
        while todo and len(done) < _MAX_TILES_PER_OBJECT:
            tile = todo.pop(0)
            if tile.index in done:
                continue
            done.add(tile.index)
            if missing is not None and not self.is_tile_embedded(z, tile):
                missing.append(tile)
                continue
            piece = self._piece_in(z, mask, tile)
            if piece is None:
                continue
            mask[tile.region] |= piece
            todo += [t for t in self._entered(piece, tile, done) if t not in todo]
        return mask

    def _entered(self, win: np.ndarray, tile: Tile, done: set[int]) -> list[Tile]:
        """Neighbours of ``tile`` whose core the object reaches into, from ``win``: the object's
        mask in ``tile``'s window (``tile.shape``).

        An object that touches an inner edge of ``tile``'s window may go on beyond it; the
        neighbour holding that edge is then worth a look.
        """
        H, W = self.slice_shape
        r0, r1, c0, c1 = tile.outer
        touches = (
            (r0 > 0 and win[0].any()) or (r1 < H and win[-1].any())
            or (c0 > 0 and win[:, 0].any()) or (c1 < W and win[:, -1].any())
        )
        if not touches:
            return []
        out = []
        for nb in self.grid.neighbours(tile):
            if nb.index in done:
                continue
            q0, q1, p0, p1 = nb.core
            # the part of the object inside the neighbour's core and inside our window
            a0, a1, b0, b1 = max(q0, r0), min(q1, r1), max(p0, c0), min(p1, c1)
            if a0 < a1 and b0 < b1 and win[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0].any():
                out.append(nb)
        return out

    def _piece_in(self, z: int, mask: np.ndarray, tile: Tile) -> np.ndarray | None:
        """The object's mask in ``tile``'s window (``tile.shape`` bool, window coordinates),
        prompted with what is already known of it there (``mask``: whole slice)."""
        rows, cols = tile.region
        known = mask[rows, cols]
        flat = np.flatnonzero(known)  # in row-major order
        if len(flat) == 0:
            return None
        # positive points: up to 3 known pixels, spread over the known part (row-major order)
        picks = flat[np.linspace(0, len(flat) - 1, min(3, len(flat))).round().astype(int)]
        pts = np.stack(np.divmod(picks, known.shape[1]), axis=1).astype(float)
        pred = self._predictors[tile.index].predict_many(z, [Prompt(pts, np.ones(len(pts)), None, None, True)])[0]
        # the smallest candidate covering most of what is known (SAM's multimask gives part,
        # object and a larger whole), else the one covering the most
        cover = np.array([(m & known).sum() / known.sum() for m in pred.masks])
        good = np.flatnonzero(cover >= 0.8)
        if len(good):
            piece = pred.masks[good[np.argmin([pred.masks[i].sum() for i in good])]]
        else:
            piece = pred.masks[int(np.argmax(cover))]
        if not (piece & known).any():
            return None  # the model sees another object here: don't merge it
        return np.asarray(piece, bool)
