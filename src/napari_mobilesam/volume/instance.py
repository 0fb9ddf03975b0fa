"""Automatic instance segmentation (AIS) with micro-sam's decoder: maps → seeded watershed → labels.

For models with an AIS decoder (``vit_t_lm``, ``vit_t_em_organelles``, ...; see
:mod:`napari_mobilesam.models.ais_decoder`) one slice is segmented without any prompt:

1. :func:`napari_mobilesam.core.preprocess.microsam_rgb` turns the raw slice into micro-sam's
   uint8 RGB input (per-channel min/max), then SAM's usual resize/normalise/pad;
2. our image encoder (any backend) gives the ``(1, 256, 64, 64)`` embedding and the decoder the
   foreground, centre-distance and boundary-distance maps, cropped and resized to the slice;
3. :func:`instances_from_maps` — micro-sam's post-processing: Gaussian smoothing, seeds where both
   distances are small inside the foreground, a seeded watershed on the boundary distances
   restricted to the foreground, an optional size filter.

Whole slices, tiled slices and stacks (stitched through z) are run by
:mod:`napari_mobilesam.volume.ais`. All arrays are napari's (row, col) order.

The post-processing is written on SciPy / scikit-image and reproduces micro-sam 1.8.14's
(bioimage-cpp's Gaussian with mirror borders and radius ceil(3σ), 8-connected seeds numbered in
row-major order, 4-connected watershed) label for label on the parity fixture.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import InputError, ModelError

#: How tiled slices are post-processed (see :class:`AISParams`).
AIS_TILINGS = ("auto", "stitched", "blocks")

__all__ = [
    "AIS_TILINGS",
    "AISParams",
    "SliceWindows",
    "instances_from_maps",
    "decoder_maps",
    "tiled_decoder_maps",
    "smooth",
]


@dataclass(frozen=True)
class AISParams:
    """micro-sam's ``generate()`` parameters (its defaults).

    Attributes
    ----------
    center_distance_threshold, boundary_distance_threshold : float
        Seeds are where both smoothed distance maps are below these (0..1).
    foreground_threshold : float
        Pixels with (smoothed) foreground probability above this belong to objects.
    foreground_smoothing : float
        Gaussian sigma (pixels) for the foreground map; 0 skips it.
    distance_smoothing : float
        Gaussian sigma (pixels) for both distance maps; 0 skips it.
    min_size : int
        Objects with fewer pixels are removed and the ids made consecutive (0: keep all).
    tiling : {"auto", "stitched", "blocks"}
        How a tiled slice is post-processed (not a micro-sam parameter; untiled slices ignore it).
        ``"stitched"``: micro-sam's way, the tiles' maps stitched into whole-slice maps and
        post-processed as one image (about 50 bytes per slice pixel at the peak);
        ``"blocks"``: the same stitched maps post-processed one tile window at a time and the
        windows' objects merged (:mod:`napari_mobilesam.volume.ais_blocks`; held: one tile's
        work, about a line of tiles' maps, and the int32 output slice); ``"auto"``: stitched up
        to ``stitch_max_pixels``, blocks beyond.
    stitch_max_pixels : int
        Largest slice (rows × cols) that ``"auto"`` post-processes stitched. Default 2048²: about
        200 MiB at the peak there (traced), where a 10 000² slice would need about 5 GB; below it
        the labels are micro-sam's exactly (see ``docs/bigimages.md``).
    """

    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    foreground_smoothing: float = 1.0
    distance_smoothing: float = 1.6
    min_size: int = 0
    tiling: str = "auto"
    stitch_max_pixels: int = 2048 * 2048

    def __post_init__(self) -> None:
        for name in ("center_distance_threshold", "boundary_distance_threshold",
                     "foreground_threshold"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise InputError(f"{name} must lie in [0, 1], got {v!r}")
        for name in ("foreground_smoothing", "distance_smoothing", "min_size", "stitch_max_pixels"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.tiling not in AIS_TILINGS:
            raise InputError(f"unknown AIS tiling {self.tiling!r}: choose one of {', '.join(AIS_TILINGS)}")

    @property
    def smoothing_radius(self) -> int:
        """Pixels a smoothed map value depends on around it: ceil(3σ) of the larger sigma."""
        return int(math.ceil(3 * max(self.foreground_smoothing, self.distance_smoothing)))

    def tiling_for(self, shape: tuple[int, int]) -> str:
        """``"stitched"`` or ``"blocks"``: how a tiled slice of ``shape`` (rows, cols) is
        post-processed (``tiling``, with ``"auto"`` decided by ``stitch_max_pixels``)."""
        if self.tiling != "auto":
            return self.tiling
        return "stitched" if int(shape[0]) * int(shape[1]) <= self.stitch_max_pixels else "blocks"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter as bioimage-cpp/vigra computes it: mirror borders, radius ceil(3σ)."""
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return np.asarray(a, dtype=np.float32)
    return gaussian_filter(
        np.asarray(a, dtype=np.float32), sigma, mode="mirror", radius=int(math.ceil(3 * sigma))
    )


def instances_from_maps(
    foreground: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    params: AISParams | None = None,
) -> np.ndarray:
    """micro-sam's AIS post-processing of three ``(H, W)`` maps → ``(H, W)`` uint64 labels.

    Seeds are numbered 1..n in row-major order of first occurrence (as micro-sam's), background 0;
    with ``min_size > 0`` smaller objects are dropped and the ids made consecutive.
    """
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential, watershed

    p = params or AISParams()
    shapes = {np.shape(foreground), np.shape(center_distances), np.shape(boundary_distances)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InputError(f"the three maps must be (H, W) arrays of one shape, got {sorted(shapes)}")
    fg = smooth(foreground, p.foreground_smoothing)
    center = smooth(center_distances, p.distance_smoothing)
    boundary = smooth(boundary_distances, p.distance_smoothing)
    mask = fg > p.foreground_threshold
    seeds = label(
        (center < p.center_distance_threshold) & (boundary < p.boundary_distance_threshold) & mask,
        connectivity=2,
    )
    seg = watershed(boundary, markers=seeds, mask=mask, connectivity=1).astype(np.uint64)
    if p.min_size > 0:
        ids, counts = np.unique(seg, return_counts=True)
        small = ids[(counts < p.min_size) & (ids != 0)]
        if small.size:
            seg[np.isin(seg, small)] = 0
        seg = relabel_sequential(seg)[0].astype(np.uint64)
    return seg


def _decoder_of(sam: Any, decoder: Any) -> Any:
    if decoder is not None:
        return decoder
    from ..models.registry import ais_decoder

    dec = ais_decoder(sam)
    if dec is None:
        raise ModelError(
            "this model has no instance-segmentation decoder; choose a micro-sam model such as "
            "'vit_t_lm' or 'vit_t_em_organelles', or pass decoder=<path to *_decoder.pt>"
        )
    return dec


def decoder_maps(sam: Any, image: np.ndarray, decoder: Any = None) -> np.ndarray:
    """The decoder's ``(3, H, W)`` float32 maps (foreground, centre, boundary distances) of one slice
    (read-only: maps decoded before from the same embedding come from the process's maps cache,
    :data:`~napari_mobilesam.models.ais_decoder.MAPS_CACHE`).

    ``image``: ``(H, W)`` or ``(H, W, C)`` array, any numeric dtype, preprocessed as micro-sam does
    (:func:`~napari_mobilesam.core.preprocess.microsam_rgb`). ``sam`` runs the encoder with its
    backend; ``decoder`` defaults to the one loaded with the model.
    """
    import torch

    from ..core.preprocess import encoder_size, microsam_rgb, preprocess_rgb
    from ..models.ais_decoder import decode_maps

    dec = _decoder_of(sam, decoder)
    rgb = microsam_rgb(image)
    x, (h, w) = preprocess_rgb(rgb, encoder_size(sam), mean=sam.pixel_mean, std=sam.pixel_std)
    with torch.inference_mode():
        emb = sam.image_encoder(x[None].to(sam.pixel_mean.device))
    return decode_maps(dec, emb, (h, w), rgb.shape[:2])


def tiled_decoder_maps(
    sam: Any,
    image: np.ndarray,
    tile_shape: int | tuple[int, int] = (512, 512),
    halo: int | tuple[int, int] = (64, 64),
    decoder: Any = None,
    *,
    grid: Any = None,
) -> np.ndarray:
    """``(3, H, W)`` decoder maps of a large image, computed tile by tile as micro-sam does: each
    tile with its halo is normalised, embedded and decoded on its own, and its core is written into
    the full maps. ``grid``: a :class:`~napari_mobilesam.core.tiles.TileGrid` to use (e.g. a
    ``TiledPredictor``'s); default micro-sam's tiling, ``TileGrid.from_cores(shape, tile_shape, halo)``."""
    from ..core.tiles import TileGrid

    dec = _decoder_of(sam, decoder)
    image = np.asarray(image)
    grid = grid if grid is not None else TileGrid.from_cores(image.shape[:2], tile_shape, halo)
    maps = np.zeros((3, *image.shape[:2]), np.float32)
    for tile in grid.tiles:
        r0, r1, c0, c1 = tile.core
        o0, _, p0, _ = tile.outer
        part = decoder_maps(sam, image[tile.region], dec)
        maps[:, r0:r1, c0:c1] = part[:, r0 - o0 : r1 - o0, c0 - p0 : c1 - p0]
    return maps


class SliceWindows:
    """Slice ``z`` of a ``SliceSource`` read window by window: ``windows[rows, cols]`` is
    ``source.raw(z, (rows, cols))`` (a lazy array reads only that part), ``np.asarray(windows)``
    the whole slice; ``shape`` is the slice's ``(H, W)``."""

    def __init__(self, source: Any, z: int):
        self.source, self.z = source, int(z)
        self.shape = tuple(source.slice_shape)

    def __getitem__(self, region: tuple[slice, slice]) -> np.ndarray:
        return self.source.raw(self.z, tuple(region))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.source.raw(self.z)
        return a if dtype is None else a.astype(dtype, copy=False)
