"""Candidate prompt points for automatic segmentation of one slice.

One point per blob (peaks of the distance transform of the Otsu foreground of the smoothed slice;
Laplacian-of-Gaussian peaks add touching objects the distance map merges), plus a coarse grid for
whatever the blobs miss. Whether a slice has blobs at all is decided relative to its own noise
(``AutoParams.min_contrast``): slices of background and noise get no blob points.

Large slices are analysed at a reduced working scale (an integer block mean, never coarser than a
third of ``min_distance``), so candidate points on a 5000 x 5000 slice take seconds.
Points are (row, col) in pixels of the original slice.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError
from .params import AutoParams

__all__ = ["candidate_points", "slice_contrast"]

#: Slices larger than this (pixels per side) are analysed at a reduced scale.
WORK_SIZE = 2048


def _to_gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3].mean(axis=-1)
    if image.ndim != 2:
        raise InputError(
            f"expected one slice as (H, W) or (H, W, 3) RGB, got an array of shape {image.shape}"
        )
    return image.astype(np.float32, copy=False)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.max() == values.min():
        return float(values.max())
    return float(threshold_otsu(values))


def _noise(gray: np.ndarray) -> float:
    """Robust pixel-noise estimate: MAD of a high-pass (on a central crop of large slices)."""
    h, w = gray.shape
    if h * w > 1024 * 1024:
        r0, c0 = max(0, h // 2 - 512), max(0, w // 2 - 512)
        gray = gray[r0 : r0 + 1024, c0 : c0 + 1024]
    hp = gray - ndi.gaussian_filter(gray, 1.0)
    return 1.4826 * float(np.median(np.abs(hp - np.median(hp))))


def _contrast(gray: np.ndarray, smooth: np.ndarray, fg: np.ndarray, noise: float | None = None) -> float:
    """Median difference between foreground and background (smoothed) in units of pixel noise."""
    step = max(1, int(np.sqrt(smooth.size / 4e6)))  # medians of a subsample on huge slices
    s, f = smooth[::step, ::step], fg[::step, ::step]
    diff = abs(float(np.median(s[f])) - float(np.median(s[~f])))
    noise = _noise(gray) if noise is None else noise
    if noise <= 1e-12:
        return np.inf if diff > 0 else 0.0
    return diff / noise


def slice_contrast(image: np.ndarray, params: AutoParams | None = None) -> float:
    """The contrast-to-noise ratio `AutoParams.min_contrast` is compared with, for one slice."""
    p = params or AutoParams()
    gray = _to_gray(image)
    smooth = ndi.gaussian_filter(gray, p.blob_sigma) if p.blob_sigma > 0 else gray
    fg, _ = _foreground(smooth, p.polarity)
    if not fg.any() or fg.all():
        return 0.0
    return _contrast(gray, smooth, fg)


def _foreground(smooth: np.ndarray, polarity: str) -> tuple[np.ndarray, str]:
    thr = _otsu(smooth)
    fg = smooth > thr
    if polarity == "auto":
        polarity = "bright" if fg.mean() <= 0.5 else "dark"
    if polarity == "dark":
        fg = smooth < thr
    return fg, polarity


def candidate_points(image: np.ndarray, params: AutoParams | None = None) -> np.ndarray:
    """Prompt positions for automatic segmentation of one slice.

    Parameters
    ----------
    image : (H, W) array of any real dtype, or (H, W, 3) uint8 RGB
        The slice. RGB is averaged to gray.
    params : AutoParams, optional
        Uses ``blob_sigma``, ``min_distance``, ``polarity``, ``grid``, ``min_contrast``, ``blobs``
        and ``max_points``.

    Returns
    -------
    (N, 2) float64 array
        Points in (row, col) pixel coordinates: blob centres first (strongest first), then the
        grid points that lie away from every blob (and, when the slice has blobs, not in plain
        background farther than ``min_distance`` from the foreground).
    """
    p = params or AutoParams()
    primary, extra, grid = _candidates(image, p)
    out = np.concatenate([primary, extra, grid], axis=0)[: p.max_points]
    return np.ascontiguousarray(out, dtype=np.float64)


def _working_scale(gray: np.ndarray, p: AutoParams) -> int:
    """Integer down-scaling for analysis: 1 unless the slice exceeds ``WORK_SIZE`` per side; never
    so coarse that ``min_distance`` falls under 3 working pixels."""
    big = max(gray.shape)
    if big <= WORK_SIZE:
        return 1
    return max(1, min(int(np.ceil(big / WORK_SIZE)), int(p.min_distance // 3)))


def _block_mean(gray: np.ndarray, s: int) -> np.ndarray:
    h, w = (gray.shape[0] // s) * s, (gray.shape[1] // s) * s
    return gray[:h, :w].reshape(h // s, s, w // s, s).mean(axis=(1, 3), dtype=np.float32)


def _candidates(image: np.ndarray, p: AutoParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distance peaks, Laplacian extras, grid points), each (N, 2) float64 (row, col)."""
    gray = _to_gray(image)
    h, w = gray.shape
    noise = _noise(gray)
    s = _working_scale(gray, p)
    if s > 1:  # analyse a block mean; its noise is the full-resolution noise over s
        gray = _block_mean(gray, s)
        noise /= s
        p = p.replace(blob_sigma=p.blob_sigma / s, min_distance=max(1, int(round(p.min_distance / s))))
    smooth = ndi.gaussian_filter(gray, p.blob_sigma) if p.blob_sigma > 0 else gray
    fg, polarity = _foreground(smooth, p.polarity)
    blobs = extra = np.zeros((0, 2), np.float64)
    if p.blobs and fg.any() and not fg.all() and _contrast(gray, smooth, fg, noise) >= p.min_contrast:
        blobs, extra = _blob_points(gray, fg, polarity, p)
    grid = _grid_points((h, w), fg, np.concatenate([blobs, extra]) * s + (s - 1) / 2, p, s)
    return blobs * s + (s - 1) / 2, extra * s + (s - 1) / 2, grid


def _blob_points(gray, fg, polarity: str, p: AutoParams) -> tuple[np.ndarray, np.ndarray]:
    """(distance peaks strongest first, Laplacian peaks not inside a distance peak's disk)."""
    from skimage.feature import peak_local_max

    # One peak per object: maxima of the (smoothed) distance to the background split touching
    # round objects at their neck. (One call over the whole slice: per-component calls cost
    # minutes on a large slice with thousands of specks.)
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg), 1.0)
    peaks = peak_local_max(
        dist,
        min_distance=int(p.min_distance),
        threshold_abs=max(1.0, p.min_distance / 3.0),
        num_peaks=p.max_points,
        exclude_border=False,
    )
    blobs = np.zeros((0, 2), np.float64)
    if len(peaks):
        order = np.argsort(-dist[peaks[:, 0], peaks[:, 1]], kind="stable")
        blobs = peaks[order].astype(np.float64)
    # Touching objects whose union has a single distance peak still show one blob each in the
    # Laplacian of Gaussian at the object scale: add those peaks, skipping duplicates.
    sigma = max(p.min_distance / np.sqrt(2.0), p.blob_sigma, 1.0)
    log = -ndi.gaussian_laplace(gray, sigma) * sigma**2
    if polarity == "dark":
        log = -log
    ipeaks = peak_local_max(
        log,
        min_distance=int(p.min_distance),
        threshold_abs=max(0.2 * float(log.max()), 1e-12),
        num_peaks=p.max_points,
        exclude_border=False,
    ).astype(np.float64)
    ipeaks = ipeaks[fg[ipeaks[:, 0].astype(int), ipeaks[:, 1].astype(int)]] if len(ipeaks) else ipeaks
    # A Laplacian peak inside the inscribed disk of a distance peak is the same object.
    reach = np.maximum(dist[blobs[:, 0].astype(int), blobs[:, 1].astype(int)], p.min_distance) \
        if len(blobs) else np.zeros(0)
    extra = [q for q in ipeaks if not len(blobs) or (np.hypot(*(blobs - q).T) >= reach).all()]
    return blobs, (np.asarray(extra, np.float64) if extra else np.zeros((0, 2), np.float64))


def _grid_points(shape, fg: np.ndarray, found: np.ndarray, p: AutoParams, s: int) -> np.ndarray:
    """The ``grid`` x ``grid`` points (original pixels) not within ``min_distance`` of a found
    point and, when blobs were found, not in plain background far from any foreground. ``fg`` and
    ``p`` are at the working scale ``s``."""
    if p.grid <= 0:
        return np.zeros((0, 2), np.float64)
    h, w = shape
    gr, gc = np.meshgrid((np.arange(p.grid) + 0.5) * h / p.grid, (np.arange(p.grid) + 0.5) * w / p.grid,
                         indexing="ij")
    grid = np.stack([gr.ravel(), gc.ravel()], axis=1)
    if not len(found):
        return grid
    reach = p.min_distance * s  # in original pixels
    d = np.sqrt(((grid[:, None, :] - found[None, :, :]) ** 2).sum(-1)).min(axis=1)
    grid = grid[d >= reach]
    # The slice has clear objects (blobs passed the contrast test): grid points in plain
    # background, farther than min_distance from any foreground, would only find it.
    r = int(p.min_distance)
    keep = []
    for row, col in grid:
        i, j = min(int(round(row / s)), fg.shape[0] - 1), min(int(round(col / s)), fg.shape[1] - 1)
        win = fg[max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
        yy, xx = np.nonzero(win)
        keep.append(bool(len(yy)) and ((yy + max(0, i - r) - i) ** 2 + (xx + max(0, j - r) - j) ** 2).min() <= r * r)
    return grid[np.asarray(keep, bool)] if len(grid) else grid


def _split_candidates(image: np.ndarray, p: AutoParams) -> tuple[np.ndarray, np.ndarray]:
    """(first-round points, second-round points), each (N, 2) float64 (row, col), together at
    most ``max_points``: the distance peaks (one per object), then the Laplacian extras and the
    grid (decoded only where the first round found nothing)."""
    primary, extra, grid = _candidates(image, p)
    primary = primary[: p.max_points]
    secondary = np.concatenate([extra, grid])[: p.max_points - len(primary)]
    return primary, secondary
