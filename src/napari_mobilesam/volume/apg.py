"""Automatic prompt generation (APG): prompts from the AIS decoder's maps, decoded by SAM.

micro-sam's second automatic mode for models with an instance-segmentation decoder (``vit_t_lm``,
``vit_t_em_organelles``, ...). For one slice:

1. the slice's embedding is computed once, from micro-sam's input (:class:`MicroSAMInput`) by
   default, and kept in float32 in an :class:`~napari_mobilesam.core.embeddings.EmbeddingCache`
   that goes with the predictor's (same model and memory budget);
2. the AIS decoder turns it into foreground, centre-distance and boundary-distance maps
   (:mod:`napari_mobilesam.models.ais_decoder`);
3. :func:`apg_prompts` — micro-sam's prompt derivation: seeds are the 4-connected regions where
   both distance maps lie below their thresholds and the foreground map reaches its own (the maps
   as the decoder gives them, not smoothed as AIS smooths them); each seed gives a positive point
   at its centre, the seed pixel farthest from the seeds' outlines and the slice border
   (:func:`seed_centres`);
4. the prompts are decoded by SAM's prompt encoder and mask decoder on the SAME embedding (cache
   hit), ``batch_size`` prompts per predictor call (the predictor splits further into its own
   bounded batches); each prompt's mask (the best-scored of three with ``multimask``) is kept as
   its bounding-box crop, so memory follows the objects; ``refine_with_boxes`` decodes the boxes
   of those masks once more, as micro-sam's ``refine_with_box_prompts``;
5. :func:`select_masks` — micro-sam's ``apply_nms``: masks of at most ``min_size`` pixels are
   dropped, greedy non-maximum suppression on mask IoU (or intersection over the smaller mask)
   with ``nms_threshold`` removes duplicates (highest predicted IoU x stability first), the
   survivors are painted largest first, each only where no larger one lies, every 4-connected
   piece becomes an object, pieces under ``min_size`` are removed and ids made consecutive.

Checked against micro-sam 1.8.14 itself (``tests/data/microsam_apg.npz``): the same points, in the
same order, and the same selection labels, ids included. Kept on purpose: when the painted objects
leave no background, micro-sam's relabelling turns its first object into background; ours keeps it. Extras of ours, off by
default: smoothing the maps first, box prompts from the AIS watershed, ``min_iou`` /
``min_stability`` filters. Not offered: micro-sam's ``mask_threshold`` (masks are SAM's logits > 0,
micro-sam's default) and custom ``prompt_function``.

Tiled slices (a :class:`~napari_mobilesam.core.tiles.TiledPredictor`) run APG tile by tile and
keep each object in the tile whose core holds its centre
(:func:`~napari_mobilesam.volume.tiled.merge_tile_labels`). Stacks: :func:`segment_stack_apg`
stitches the slices through z. Arrays are napari's (row, col) order; labels are ``(H, W)`` uint32.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from ..core.batching import batch_bounds
from ..errors import InputError
from .instance import AISParams, _decoder_of, smooth

if TYPE_CHECKING:  # torch is imported only when a slice is segmented
    from ..core.predictor import Prompt

__all__ = [
    "APGParams",
    "MaskCrop",
    "MicroSAMInput",
    "PROMPT_KINDS",
    "apg_prompts",
    "apg_seeds",
    "box_prompts",
    "decode_prompts",
    "extended_box",
    "seed_centres",
    "select_masks",
    "segment_slice_apg",
    "segment_stack_apg",
    "microsam_maps",
]

#: What each AIS instance is prompted with.
PROMPT_KINDS = ("point", "box", "point+box")


@dataclass(frozen=True)
class APGParams:
    """Parameters of automatic prompt generation (defaults: micro-sam 1.8.14's
    ``AutomaticPromptGenerator.generate``; the settings marked *ours* are extras that micro-sam
    does not have, off by default).

    Attributes
    ----------
    center_distance_threshold, boundary_distance_threshold, foreground_threshold : float
        The seed thresholds (0..1): a seed is a 4-connected region where both distance maps are
        below theirs and the foreground map is at least its threshold.
    foreground_smoothing, distance_smoothing : float
        *Ours*: Gaussian sigmas (pixels) applied to the maps before the seeds are found, as AIS
        does. micro-sam's APG reads the decoder's maps unsmoothed (0, the default).
    prompts : {"point", "box", "point+box"}
        ``"point"`` (micro-sam): a positive point at the centre of each seed (the seed pixel
        farthest from the seed's outline and from the slice border). *Ours*: ``"box"`` or
        ``"point+box"`` prompt each seed with the box of the region the seeded watershed grows
        from it (extended by ``box_extension``).
    refine_with_boxes : bool
        micro-sam's ``refine_with_box_prompts``: decode once more with the box of each first mask
        (extended by ``box_extension``) and keep those masks instead.
    box_extension : float
        Boxes are grown by this fraction of their size on every side, clipped to the slice
        (micro-sam's 0.01).
    multimask : bool
        micro-sam's ``multimasking``: ask SAM for three masks per prompt and keep the one with the
        highest predicted IoU (default: the single mask).
    min_iou, min_stability : float
        *Ours*: masks with a lower predicted IoU / stability score are dropped (0: keep all).
    nms_threshold : float
        A mask overlapping a better one (higher predicted IoU x stability) by more than this is
        a duplicate (mask IoU, 0..1).
    intersection_over_min : bool
        Measure overlap as intersection over the smaller mask instead of IoU.
    min_size : int
        Masks of at most this many pixels are dropped before NMS, pieces of fewer pixels after
        painting (0: keep all).
    batch_size : int
        Prompts per predictor call (the predictor decodes in its own bounded batches within).
    """

    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    foreground_smoothing: float = 0.0
    distance_smoothing: float = 0.0
    prompts: str = "point"
    refine_with_boxes: bool = False
    box_extension: float = 0.01
    multimask: bool = False
    min_iou: float = 0.0
    min_stability: float = 0.0
    nms_threshold: float = 0.9
    intersection_over_min: bool = False
    min_size: int = 25
    batch_size: int = 32

    def __post_init__(self) -> None:
        def number(v, integer=False):
            kinds = (int, np.integer) if integer else (int, float, np.number)
            return isinstance(v, kinds) and not isinstance(v, (bool, np.bool_))

        for name in ("center_distance_threshold", "boundary_distance_threshold", "foreground_threshold",
                     "min_iou", "min_stability", "nms_threshold"):
            if not (number(v := getattr(self, name)) and 0.0 <= float(v) <= 1.0):
                raise InputError(f"APG {name} must be a number in [0, 1], got {v!r}")
        for name in ("foreground_smoothing", "distance_smoothing", "box_extension"):
            if not (number(v := getattr(self, name)) and 0.0 <= float(v) < 1e6):
                raise InputError(f"APG {name} must be a number >= 0, got {v!r}")
        if self.prompts not in PROMPT_KINDS:
            raise InputError(f"APG prompts must be one of {', '.join(PROMPT_KINDS)}, got {self.prompts!r}")
        for name, low in (("min_size", 0), ("batch_size", 1)):
            if not (number(v := getattr(self, name), integer=True) and v >= low):
                raise InputError(f"APG {name} must be a whole number >= {low}, got {v!r}")
        for name in ("multimask", "intersection_over_min", "refine_with_boxes"):
            if not isinstance(v := getattr(self, name), (bool, np.bool_)):
                raise InputError(f"APG {name} must be True or False, got {v!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def ais_params(self) -> AISParams:
        """The AIS watershed the ``"box"`` prompts come from (no size filter: every seed is prompted)."""
        return AISParams(self.center_distance_threshold, self.boundary_distance_threshold,
                         self.foreground_threshold, self.foreground_smoothing, self.distance_smoothing, 0)

    @classmethod
    def of(cls, params: Any) -> APGParams:
        """``params`` as APGParams: None (defaults), an APGParams, or a dict of its fields."""
        if params is None:
            return cls()
        if isinstance(params, cls):
            return params
        if isinstance(params, dict):
            unknown = sorted(set(params) - set(cls.__dataclass_fields__))
            if unknown:
                raise InputError(f"unknown APG setting(s) {unknown}; APGParams settings are: "
                                 f"{', '.join(cls.__dataclass_fields__)}")
            return cls(**params)
        raise InputError(f"APG params must be an APGParams (or a dict of its settings), not {type(params).__name__}")


# --------------------------------------------------------------------------- prompts from maps

#: micro-sam computes the seed centres' distance transform in blocks of this size, each with this
#: halo (python-elf's parallel distance transform): distances farther than the halo past a block
#: edge are cut short there, and the centres follow.
EDT_BLOCK, EDT_HALO = 512, 16


def _blockwise_edt(inside: np.ndarray) -> np.ndarray:
    """Euclidean distance of each True pixel to the nearest False one (float32), computed in
    ``EDT_BLOCK`` blocks with an ``EDT_HALO`` halo as micro-sam does (exact for a slice of at most
    one block)."""
    h, w = inside.shape
    if h <= EDT_BLOCK and w <= EDT_BLOCK:
        return ndi.distance_transform_edt(inside).astype(np.float32)
    out = np.empty((h, w), np.float32)
    for r in range(0, h, EDT_BLOCK):
        for c in range(0, w, EDT_BLOCK):
            r0, c0 = max(r - EDT_HALO, 0), max(c - EDT_HALO, 0)
            r1, c1 = min(r + EDT_BLOCK + EDT_HALO, h), min(c + EDT_BLOCK + EDT_HALO, w)
            d = ndi.distance_transform_edt(inside[r0:r1, c0:c1])
            rh, cw = min(EDT_BLOCK, h - r), min(EDT_BLOCK, w - c)
            out[r : r + rh, c : c + cw] = d[r - r0 : r - r0 + rh, c - c0 : c - c0 + cw]
    return out


def seed_centres(seeds: np.ndarray, n: int) -> np.ndarray:
    """``(n, 2)`` (row, col) centre of each seed 1..n, as micro-sam picks it: the pixel with the
    largest distance to the seeds' outer outlines (and to the slice border), the first such in
    row-major order."""
    from skimage.segmentation import find_boundaries

    inside = ~find_boundaries(seeds, mode="outer")
    inside[0, :] = inside[-1, :] = False
    inside[:, 0] = inside[:, -1] = False
    dist = _blockwise_edt(inside)
    points = np.zeros((n, 2))
    for i, sl in enumerate(ndi.find_objects(seeds, max_label=n)):
        if sl is None:
            continue
        d = np.where(seeds[sl] == i + 1, dist[sl], 0)
        k = np.unravel_index(int(np.argmax(d)), d.shape)
        points[i] = sl[0].start + k[0], sl[1].start + k[1]
    return points


def apg_seeds(maps: np.ndarray, params: APGParams | None = None) -> np.ndarray:
    """The ``(H, W)`` int32 seeds (1..n, row-major order of first occurrence) of the decoder's
    ``(3, H, W)`` maps: 4-connected regions where both distance maps lie below their thresholds
    and the foreground map reaches its threshold (micro-sam's APG; smoothed first only when asked)."""
    from skimage.measure import label

    p = params or APGParams()
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != 3:
        raise InputError(f"APG needs the decoder's (3, H, W) maps, got shape {maps.shape}")
    fg = smooth(maps[0], p.foreground_smoothing)
    center = smooth(maps[1], p.distance_smoothing)
    boundary = smooth(maps[2], p.distance_smoothing)
    hit = (center < p.center_distance_threshold) & (boundary < p.boundary_distance_threshold)
    hit &= fg >= p.foreground_threshold
    return label(hit, connectivity=1).astype(np.int32)


def apg_prompts(maps: np.ndarray, params: APGParams | None = None) -> tuple[list[Prompt], np.ndarray]:
    """One prompt per seed of the decoder's ``(3, H, W)`` maps (foreground, centre and boundary
    distances).

    Returns ``(prompts, seeds)``: ``prompts[i]`` belongs to seed ``i + 1`` of ``seeds``
    (:func:`apg_seeds`). Points are ``(row, col)`` at the seed's centre (:func:`seed_centres`);
    boxes (``prompts="box"`` or ``"point+box"``) ``(row0, col0, row1, col1)`` span the region the
    seeded watershed grows from the seed (:func:`~napari_mobilesam.volume.instance.instances_from_maps`'s
    watershed on these seeds), grown by ``box_extension``.
    """
    from ..core.predictor import Prompt

    p = params or APGParams()
    seeds = apg_seeds(maps, p)
    n = int(seeds.max())
    if n == 0:
        return [], seeds
    points = seed_centres(seeds, n) if p.prompts != "box" else None
    boxes = None
    if p.prompts != "point":
        from skimage.segmentation import watershed

        fg = smooth(np.asarray(maps[0]), p.foreground_smoothing)
        boundary = smooth(np.asarray(maps[2]), p.distance_smoothing)
        grown = watershed(boundary, markers=seeds, mask=fg >= p.foreground_threshold, connectivity=1)
        boxes = [None if sl is None else extended_box(sl[0].start, sl[1].start, sl[0].stop - 1,
                                                      sl[1].stop - 1, p.box_extension, seeds.shape)
                 for sl in ndi.find_objects(grown, max_label=n)]
    one = np.ones(1, int)
    prompts = []
    for i in range(n):
        pt = None if points is None else points[i][None]
        prompts.append(Prompt(points=pt, labels=None if pt is None else one,
                              box=None if boxes is None else boxes[i], multimask=bool(p.multimask)))
    return prompts, seeds


def extended_box(r0: int, c0: int, r1: int, c1: int, extension: float,
                 shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """The box of the pixels ``r0..r1`` x ``c0..c1`` (inclusive) grown by ``extension`` times its
    extent on every side (micro-sam's box prompts: extent = last - first pixel), clipped to the
    slice; a box one pixel thin is widened by half a pixel each way (SAM needs an area)."""
    h, w = shape
    dr, dc = extension * (r1 - r0), extension * (c1 - c0)
    b0, b1, a0, a1 = r0 - dr, r1 + dr, c0 - dc, c1 + dc
    if b1 - b0 < 1:
        b0, b1 = b0 - 0.5, b1 + 0.5
    if a1 - a0 < 1:
        a0, a1 = a0 - 0.5, a1 + 0.5
    return max(b0, -0.5), max(a0, -0.5), min(b1, h - 0.5), min(a1, w - 0.5)


# --------------------------------------------------------------------------- decoding and selection


@dataclass(frozen=True)
class MaskCrop:
    """One decoded mask, kept as its bounding-box crop: ``mask`` ``(h, w)`` bool at ``(row, col)``."""

    row: int
    col: int
    mask: np.ndarray
    iou: float
    stability: float

    @cached_property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1), ends exclusive."""
        return self.row, self.col, self.row + self.mask.shape[0], self.col + self.mask.shape[1]

    @property
    def score(self) -> float:
        """micro-sam's NMS score: predicted IoU x stability, in float32 as micro-sam computes it."""
        return float(np.float32(self.iou) * np.float32(self.stability))


def _crop(mask: np.ndarray, iou: float, stability: float) -> MaskCrop | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return MaskCrop(int(r0), int(c0), np.ascontiguousarray(mask[r0:r1, c0:c1]), float(iou), float(stability))


def decode_prompts(predictor: Any, z: int, prompts: list[Prompt], batch_size: int = 32) -> list[MaskCrop | None]:
    """Decode ``prompts`` on slice ``z``, ``batch_size`` per ``predictor.predict_many`` call.

    Each prompt's best mask (highest predicted IoU of its candidates) is kept as a
    :class:`MaskCrop` (None for an empty mask), so only one batch of full-slice masks is held.
    """
    out: list[MaskCrop | None] = []
    for start, stop in batch_bounds(len(prompts), batch_size):
        for pred in predictor.predict_many(z, prompts[start:stop]):
            iou = np.asarray(pred.iou, float).reshape(-1)
            stab = np.asarray(pred.stability, float).reshape(-1)
            k = int(np.argmax(iou))
            out.append(_crop(np.asarray(pred.masks[k], bool), iou[k], stab[k]))
    return out


def box_prompts(crops: Iterable[MaskCrop | None], shape: tuple[int, int],
                params: APGParams | None = None) -> list[Prompt | None]:
    """micro-sam's refinement prompts: the box of each decoded mask grown by ``box_extension``
    (None where the mask was empty)."""
    from ..core.predictor import Prompt

    p = params or APGParams()
    out: list[Prompt | None] = []
    for c in crops:
        if c is None:
            out.append(None)
            continue
        r0, c0, r1, c1 = c.box
        out.append(Prompt(box=extended_box(r0, c0, r1 - 1, c1 - 1, p.box_extension, shape),
                          multimask=bool(p.multimask)))
    return out


def _overlap(a: MaskCrop, b: MaskCrop, over_min: bool) -> float:
    ar0, ac0, ar1, ac1 = a.box
    br0, bc0, br1, bc1 = b.box
    r0, c0, r1, c1 = max(ar0, br0), max(ac0, bc0), min(ar1, br1), min(ac1, bc1)
    # micro-sam compares two masks only when their boxes (first to last pixel) overlap with an
    # area: boxes sharing a single row or column count as apart
    if r1 - r0 <= 1 or c1 - c0 <= 1:
        return 0.0
    inter = int(np.count_nonzero(a.mask[r0 - ar0 : r1 - ar0, c0 - ac0 : c1 - ac0]
                                 & b.mask[r0 - br0 : r1 - br0, c0 - bc0 : c1 - bc0]))
    if inter == 0:
        return 0.0
    if over_min:
        return inter / (min(a.area, b.area) + 1e-6)
    return inter / (a.area + b.area - inter)


def select_masks(crops: Iterable[MaskCrop | None], shape: tuple[int, int],
                 params: APGParams | None = None) -> np.ndarray:
    """Filter, de-duplicate and paint decoded masks into ``(H, W)`` uint32 labels (ids 1..N), as
    micro-sam's ``apply_nms`` does.

    Masks of at most ``min_size`` pixels (and, ours, below ``min_iou`` or ``min_stability``) are
    dropped; greedy NMS keeps the mask with the highest score (predicted IoU x stability) and
    removes every mask overlapping a kept one by more than ``nms_threshold``; the kept masks are
    painted largest first, each only where no larger one lies; every 4-connected piece of a
    painted mask becomes its own object, pieces of fewer than ``min_size`` pixels are removed and
    the ids numbered 1..N in row-major order of first occurrence.
    """
    from skimage.measure import label

    p = params or APGParams()
    cands = [c for c in crops if c is not None and c.iou >= p.min_iou and c.stability >= p.min_stability
             and c.area > p.min_size]
    cands.sort(key=lambda c: -c.score)
    kept: list[MaskCrop] = []
    for c in cands:
        if all(_overlap(c, k, p.intersection_over_min) <= p.nms_threshold for k in kept):
            kept.append(c)
    kept.sort(key=lambda c: -c.area)  # stable: equal areas keep the score order
    labels = np.zeros(shape, np.uint32)
    for i, c in enumerate(kept, start=1):
        r0, c0, r1, c1 = c.box
        view = labels[r0:r1, c0:c1]
        view[c.mask & (view == 0)] = i
    if not kept:
        return labels
    pieces = label(labels, background=0, connectivity=1)
    sizes = np.bincount(pieces.ravel())
    keep = sizes >= p.min_size
    keep[0] = True
    new_ids = np.zeros(len(sizes), np.uint32)
    new_ids[keep] = np.arange(int(keep.sum()), dtype=np.uint32)
    return new_ids[pieces]


# --------------------------------------------------------------------------- the model's input


class MicroSAMInput:
    """The slices (or tile windows) of a source as micro-sam's models see them.

    ``rgb(z)`` is :func:`~napari_mobilesam.core.preprocess.microsam_rgb` of the raw slice (per
    channel min/max to uint8, as micro-sam does, per tile for a tile view), ``slice_key(z)`` names
    that content as :meth:`SliceSource.slice_key` does (a key per content: a source normalised
    the same way, ``normalize="microsam"``, shares its cache entries).
    ``source``: a :class:`~napari_mobilesam.core.source.SliceSource` or a
    :class:`~napari_mobilesam.core.tiles.TileView` of one.
    """

    def __init__(self, source: Any) -> None:
        if hasattr(source, "tile") and hasattr(source, "source"):  # a TileView
            self._raw: Callable[[int], np.ndarray] = lambda z: source.source.raw(z, source.tile.region)
        elif hasattr(source, "raw"):
            self._raw = source.raw
        else:
            raise InputError("APG needs the raw slices (a SliceSource or a tile of one) to build "
                             "micro-sam's input; pass microsam_input=False to use the predictor's own")
        self.source = source
        self.n_slices = source.n_slices
        self.slice_shape = tuple(source.slice_shape)
        self.is_2d = getattr(source, "is_2d", False)
        self._last: tuple[int, np.ndarray, str] | None = None

    def _entry(self, z: int) -> tuple[int, np.ndarray, str]:
        last = self._last
        if last is None or last[0] != z:
            from ..core.preprocess import microsam_rgb

            rgb = microsam_rgb(self._raw(z))
            rgb.setflags(write=False)
            h = hashlib.blake2b(digest_size=20)  # SliceSource.slice_key's: one key per content
            h.update(repr(rgb.shape).encode())
            h.update(rgb.tobytes())
            last = self._last = (z, rgb, h.hexdigest())
        return last

    def rgb(self, z: int) -> np.ndarray:
        return self._entry(z)[1]

    def slice_key(self, z: int) -> str:
        return self._entry(z)[2]


_INPUT_PREDICTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INPUT_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: One float32 embedding (the input cache keeps at least one slice).
_EMBEDDING_BYTES = 256 * 64 * 64 * 4


def _input_cache(cache: Any) -> Any:
    """The float32 embedding cache of micro-sam's input that goes with ``cache``: ``cache`` itself
    when it stores float32 (a Session's, for models with an AIS decoder: keys name the content, so
    a slice the session embedded for clicks is not embedded again), else one of the same model and
    memory budget, memory only. float32: the AIS decoder amplifies an embedding's rounding about
    20 times, and float16 storage would move its maps by ~7e-3."""
    import torch

    if getattr(cache, "dtype", None) == torch.float32:
        return cache
    hit = _INPUT_CACHES.get(cache)
    if hit is None:
        from ..core.embeddings import EmbeddingCache

        hit = EmbeddingCache(cache.sam, max_bytes=max(int(cache.max_bytes), _EMBEDDING_BYTES),
                             dtype=torch.float32)
        _INPUT_CACHES[cache] = hit
    return hit


def _input_predictor(predictor: Any) -> Any:
    """A predictor of ``predictor``'s model over micro-sam's input, its embeddings kept in float32
    in a cache that goes with ``predictor``'s (one per session, shared by its tiles)."""
    hit = _INPUT_PREDICTORS.get(predictor)
    if hit is None:
        from ..core.predictor import SlicePredictor

        hit = SlicePredictor(predictor.sam, MicroSAMInput(predictor.source), _input_cache(predictor.cache),
                             max_batch=getattr(predictor, "max_batch", None))
        _INPUT_PREDICTORS[predictor] = hit
    return hit


# --------------------------------------------------------------------------- slices and stacks


def _slice_maps(predictor: Any, z: int, decoder: Any) -> np.ndarray:
    """The decoder's ``(3, H, W)`` maps (read-only) of slice ``z`` from the predictor's cached
    embedding; maps decoded before from the same embedding come from the maps cache."""
    from ..models.ais_decoder import decode_maps

    emb = predictor.cache.get(predictor.source, z)
    return decode_maps(decoder, emb.features, emb.input_size, emb.original_size)


def microsam_maps(predictor: Any, z: int, decoder: Any = None) -> np.ndarray:
    """The AIS decoder's ``(3, H, W)`` maps (read-only) of slice ``z`` of an untiled ``predictor``
    (a ``Session``'s), from its cached float32 embedding of micro-sam's input: what
    :func:`~napari_mobilesam.volume.instance.decoder_maps` computes for the raw slice, without
    embedding a slice the predictor already embedded, and decoded once per embedding (maps cache)."""
    return _slice_maps(_input_predictor(predictor), z, _decoder_of(predictor.sam, decoder))


def _segment_untiled(predictor: Any, z: int, p: APGParams, decoder: Any, maps: Any,
                     microsam_input: bool) -> np.ndarray:
    if maps is None:
        if microsam_input:
            predictor = _input_predictor(predictor)
        maps = _slice_maps(predictor, z, _decoder_of(predictor.sam, decoder))
    maps = np.asarray(maps, np.float32)
    shape = tuple(predictor.source.slice_shape)
    if maps.shape[1:] != shape:
        raise InputError(f"APG maps are {maps.shape[1:]} but slice {z} is {shape}")
    prompts, _ = apg_prompts(maps, p)
    crops = decode_prompts(predictor, z, prompts, p.batch_size)
    if p.refine_with_boxes:
        boxes = box_prompts(crops, shape, p)
        todo = [i for i, b in enumerate(boxes) if b is not None]
        crops = [None] * len(crops)
        for i, crop in zip(todo, decode_prompts(predictor, z, [boxes[i] for i in todo], p.batch_size)):
            crops[i] = crop
    return select_masks(crops, shape, p)


def segment_slice_apg(predictor: Any, z: int, params: APGParams | dict | None = None, decoder: Any = None,
                      *, maps: np.ndarray | None = None, microsam_input: bool = True) -> np.ndarray:
    """APG labels ``(H, W)`` uint32 (0 background, ids 1..N) of slice ``z``.

    Parameters
    ----------
    predictor : SlicePredictor or TiledPredictor
        E.g. ``Session.predictor``. Its model must have an AIS decoder (or pass ``decoder``); its
        embedding cache holds the slice's embedding, computed once for both decoders.
    params : APGParams or dict, optional
    decoder : callable, optional
        ``(1, 256, 64, 64)`` embedding → ``(1, 3, 1024, 1024)`` maps; default the model's own.
    maps : (3, H, W) array, optional
        Ready decoder maps (then neither the encoder nor the AIS decoder runs here; only the
        predictor's ``predict_many``, e.g. of a test oracle). Not with a tiled predictor.
    microsam_input : bool
        Embed micro-sam's input (:class:`MicroSAMInput`, default: what micro-sam's models expect)
        or the predictor's own source normalisation.
    """
    p = APGParams.of(params)
    if hasattr(predictor, "grid"):
        if maps is not None:
            raise InputError("ready maps cannot be given for a tiled slice: APG computes each tile's own")
        from .tiled import merge_tile_labels

        dec = _decoder_of(predictor.sam, decoder)
        pieces = ((t, _segment_untiled(predictor.tile_predictor(t), z, p, dec, None, microsam_input))
                  for t in predictor.grid.tiles)
        return merge_tile_labels(predictor.slice_shape, pieces).astype(np.uint32)
    if maps is None:
        _decoder_of(predictor.sam, decoder)  # a clear error before any work
    return _segment_untiled(predictor, z, p, decoder, maps, microsam_input)


def segment_stack_apg(
    predictor: Any,
    params: APGParams | dict | None = None,
    decoder: Any = None,
    *,
    zs: Iterable[int] | None = None,
    min_iou: float = 0.3,
    min_overlap: float = 0.6,
    max_gap: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Iterator[np.ndarray]:
    """APG of the slices ``zs`` (default all) of the predictor's stack, stitched through z.

    Yields ``(H, W)`` int32 slices in order (ids shared through z; see
    :class:`~napari_mobilesam.volume.stitch.Stitcher` for ``min_iou``, ``min_overlap``,
    ``max_gap``); ``progress(z)`` is called after each slice.
    """
    from .stitch import Stitcher

    p = APGParams.of(params)
    dec = _decoder_of(predictor.sam, decoder)
    stitcher = Stitcher(min_iou, min_overlap, max_gap)
    for z in range(predictor.n_slices) if zs is None else zs:
        yield stitcher.add(segment_slice_apg(predictor, z, p, dec))
        if progress is not None:
            progress(z)
