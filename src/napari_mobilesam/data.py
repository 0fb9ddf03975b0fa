"""Demo and test data: a synthetic 3D nuclei stack with ground truth, and a 2D cell image.

Nothing here imports torch, Qt or napari. Everything is deterministic for a given seed, so tests
and benchmarks can rely on the exact same volumes.

Coordinates are napari's: arrays are indexed (z, row, col).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["NucleiStack", "synthetic_nuclei", "cell_image"]


@dataclass(frozen=True)
class NucleiStack:
    """A synthetic nuclei volume and its ground truth.

    Attributes
    ----------
    image : (Z, Y, X) uint16
        Blurred, noisy fluorescence-like intensities with an uneven background.
    labels : (Z, Y, X) uint16
        Instance labels, 0 for background, 1..N for the nuclei (touching nuclei keep distinct ids).
    centers : (N, 3) float
        Nucleus centres in (z, row, col) voxels; row ``i`` is label ``i + 1``.
    radii : (N, 3) float
        Semi-axes in (z, row, col) voxels, before the in-plane rotation.
    brightness : (N,) float
        Relative brightness of each nucleus (0..1).
    """

    image: np.ndarray
    labels: np.ndarray
    centers: np.ndarray
    radii: np.ndarray
    brightness: np.ndarray

    @property
    def n_objects(self) -> int:
        return int(len(self.centers))


def synthetic_nuclei(
    shape: tuple[int, int, int] = (40, 256, 256),
    n_nuclei: int = 28,
    seed: int = 0,
    radius_range: tuple[float, float] = (11.0, 22.0),
    z_radius_range: tuple[float, float] = (4.0, 9.0),
    touching_fraction: float = 0.25,
    photons: float = 800.0,
    offset: float = 100.0,
    crowded: bool = False,
) -> NucleiStack:
    """Generate a deterministic 3D stack of ellipsoidal nuclei with ground-truth instance labels.

    Parameters
    ----------
    shape : (Z, Y, X)
        Volume shape in voxels. A 2D-only use can take one slice of the result.
    n_nuclei : int
        Number of nuclei to place (fewer may fit in a small volume; see ``NucleiStack.n_objects``).
    seed : int
        Seed of the random generator; the same seed always gives the same stack.
    radius_range, z_radius_range : (min, max)
        In-plane and axial semi-axes, in voxels.
    touching_fraction : float
        Fraction of nuclei placed right against an earlier one (they share a boundary but keep
        their own label).
    photons : float
        Expected photon count at the brightest nucleus centre; sets the shot-noise level.
    offset : float
        Camera offset added to every voxel.
    crowded : bool
        A harder variant for 3D logic: most nuclei (at least 70%) touch an earlier one in x, y
        **or z** (about a third of them stacked on top of it, sharing a boundary across slices),
        packed closer, and at low contrast (at most 40 photons at the brightest centre).
        ``crowded=False`` gives exactly the same stacks as before.

    Returns
    -------
    NucleiStack
        ``image`` and ``labels`` are (Z, Y, X) uint16.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (Z, Y, X) with positive sizes, got {shape!r}")
    rng = np.random.default_rng(seed)
    if crowded:
        touching_fraction, photons = max(touching_fraction, 0.7), min(photons, 40.0)
    zs, ys, xs = shape
    labels = np.zeros(shape, np.uint16)
    # Normalised ellipsoid distance of the nucleus owning each voxel (to split overlaps fairly).
    owner_dist = np.full(shape, np.inf, np.float32)
    signal = np.zeros(shape, np.float32)

    centers: list[np.ndarray] = []
    radii: list[np.ndarray] = []
    bright: list[float] = []
    attempts = 0
    while len(centers) < n_nuclei and attempts < n_nuclei * 200:
        attempts += 1
        r_xy = rng.uniform(*radius_range, size=2)
        r_z = rng.uniform(*z_radius_range)
        rad = np.array([r_z, r_xy[0], r_xy[1]])
        touching = centers and rng.random() < touching_fraction
        if touching and crowded:
            c = _touching_center(rng, centers, radii, rad)
        elif touching:
            # Put it next to an existing nucleus, along a random in-plane direction.
            j = int(rng.integers(len(centers)))
            ang = rng.uniform(0, 2 * np.pi)
            dist = 0.92 * (radii[j][1:].mean() + rad[1:].mean())
            c = centers[j] + np.array([rng.uniform(-2, 2), dist * np.sin(ang), dist * np.cos(ang)])
        else:
            c = np.array(
                [rng.uniform(0.15 * zs, 0.85 * zs), rng.uniform(0, ys), rng.uniform(0, xs)]
            )
        # Keep the whole nucleus (roughly) inside the volume.
        margin = rad + 2
        if np.any(c < margin) or np.any(c > np.array(shape) - margin):
            continue
        # Reject heavy overlaps; touching ones may only graze their neighbour.
        ok = True
        for cj, rj in zip(centers, radii):
            d = np.linalg.norm((c - cj) / ((rad + rj) / 2))
            if d < ((1.6 if touching else 1.9) if crowded else (1.75 if touching else 2.3)):
                ok = False
                break
        if not ok:
            continue
        centers.append(c)
        radii.append(rad)
        bright.append(float(rng.uniform(0.45, 1.0)))

    for i, (c, rad, b) in enumerate(zip(centers, radii, bright), start=1):
        theta = rng.uniform(0, np.pi)
        lo = np.maximum(np.floor(c - rad.max() - 1).astype(int), 0)
        hi = np.minimum(np.ceil(c + rad.max() + 2).astype(int), shape)
        zz, yy, xx = np.meshgrid(
            *(np.arange(a, b_) for a, b_ in zip(lo, hi)), indexing="ij", sparse=True
        )
        dz, dy, dx = zz - c[0], yy - c[1], xx - c[2]
        # In-plane rotation of the ellipse.
        u = dy * np.cos(theta) + dx * np.sin(theta)
        v = -dy * np.sin(theta) + dx * np.cos(theta)
        d2 = (dz / rad[0]) ** 2 + (u / rad[1]) ** 2 + (v / rad[2]) ** 2
        d2 = np.broadcast_to(d2, tuple(hi - lo)).astype(np.float32)
        sl = tuple(slice(a, b_) for a, b_ in zip(lo, hi))
        inside = (d2 <= 1.0) & (d2 < owner_dist[sl])
        labels[sl][inside] = i
        owner_dist[sl][inside] = d2[inside]
        # Brighter rim-less body with a little chromatin texture, dimmer towards the edge.
        body = b * (1.0 - 0.35 * d2) * (0.85 + 0.15 * rng.random(d2.shape, dtype=np.float32))
        signal[sl][inside] = body[inside]

    # Optics: anisotropic blur (worse along z), then uneven background and shot noise.
    signal = ndi.gaussian_filter(signal, sigma=(1.0, 1.2, 1.2))
    zz, yy, xx = np.meshgrid(
        np.linspace(0, 1, zs), np.linspace(0, 1, ys), np.linspace(0, 1, xs), indexing="ij", sparse=True
    )
    background = 0.06 + 0.05 * xx + 0.03 * yy + 0.02 * np.cos(np.pi * zz)
    expected = photons * (signal + background)
    noisy = rng.poisson(expected).astype(np.float32) + offset
    noisy += rng.normal(0.0, 3.0, size=shape).astype(np.float32)  # read noise
    image = np.clip(noisy, 0, np.iinfo(np.uint16).max).astype(np.uint16)

    return NucleiStack(
        image=image,
        labels=labels,
        centers=np.array(centers, float).reshape(-1, 3),
        radii=np.array(radii, float).reshape(-1, 3),
        brightness=np.array(bright, float),
    )


def _touching_center(rng, centers, radii, rad) -> np.ndarray:
    """Centre of a nucleus with semi-axes ``rad`` touching a random earlier one: side by side in
    the plane (2 in 3) or stacked along z (1 in 3), its boundary against the other's."""
    j = int(rng.integers(len(centers)))
    reach = 0.95 * (radii[j] + rad)  # per axis (z, row, col)
    if rng.random() < 1 / 3:  # stacked: mostly along z, a little sideways
        ang = rng.uniform(0, 2 * np.pi)
        side = rng.uniform(0.0, 0.35)
        direction = np.array([rng.choice([-1.0, 1.0]), side * np.sin(ang), side * np.cos(ang)])
    else:
        ang = rng.uniform(0, 2 * np.pi)
        direction = np.array([rng.uniform(-0.2, 0.2), np.sin(ang), np.cos(ang)])
    direction /= np.linalg.norm(direction)
    return centers[j] + reach * direction


def cell_image() -> np.ndarray:
    """scikit-image's bundled ``cell`` image: a (Y, X) uint8 phase-contrast cell, 660 × 550."""
    from skimage import data

    return data.cell()
