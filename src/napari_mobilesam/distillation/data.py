"""Image side of decoupled distillation: training slices and augmentations.

- :func:`open_images` turns napari layer data, arrays, TIFF files and folders into
  :class:`~napari_mobilesam.core.source.SliceSource` objects, so training sees exactly the per-slice uint8
  RGB that inference sees; :func:`split_slices` samples slices and holds some out for validation.
- :func:`dihedral` applies one of the 8 flips/90° rotations to an input image *and* its cached
  embedding (and the valid-pixel grid) in the same way.

Teachers and the teacher-embedding cache live in :mod:`.teacher` (re-exported here).
Coordinates follow napari: arrays are ``(row, col)`` / ``(z, row, col)``. No napari or Qt here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.preprocess import preprocess_rgb
from ..errors import DistillError
from .teacher import *  # noqa: F403  (re-exported for older imports; names in __all__)
from .teacher import __all__ as _teacher_names

# the image side, plus the teacher names this module re-exports for older imports
__all__ = ["DistillError", "SliceRef", "open_images", "split_slices", "preprocess_rgb", "dihedral",
           *_teacher_names]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------------------------
# images and slices


@dataclass(frozen=True)
class SliceRef:
    """One training or validation slice.

    Attributes
    ----------
    source : int
        Index into the list returned by :func:`open_images`.
    z : int
        Slice index inside that source (0 for a 2D image).
    key : str
        Content key of the slice after normalisation (``SliceSource.slice_key(z)``).
    """

    source: int
    z: int
    key: str


def _read_image_file(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from skimage import io as skio

    return np.asarray(skio.imread(path))


def _slice_source(cls: Any, data: Any, rgb: bool | None, name: str, channel_axis: int | None = None) -> Any:
    try:
        return cls(data, rgb=rgb, channel_axis=channel_axis)
    except (ValueError, TypeError) as exc:
        raise DistillError(f"{name} cannot be used as an image: {exc}") from exc


def open_images(
    images: Sequence[Any] | Any, *, rgb: bool | None = None, channel_axis: int | None = None
) -> list[tuple[str, Any]]:
    """Open every image to train on as a :class:`~napari_mobilesam.core.source.SliceSource`.

    Parameters
    ----------
    images : one item or a sequence of items
        Each item is a 2D ``(row, col)`` / 3D ``(z, row, col)`` array (numpy, dask, a napari
        layer's ``data``), an existing ``SliceSource``, a TIFF/PNG/JPEG file, or a folder (every
        ``.tif``/``.tiff``/``.png``/``.jpg`` file in it, sorted by name, non-recursive).
    rgb : bool or None
        Passed to ``SliceSource`` for arrays and files (None: let it decide from the shape).
    channel_axis : int or None
        Passed to ``SliceSource`` for arrays and files: the channel axis of multichannel data.

    Returns
    -------
    list of (name, SliceSource)
        ``name`` describes the origin (file path, or ``array[i]``) for messages and metadata.

    Raises
    ------
    DistillError
        When an item does not exist, a folder holds no image, or nothing was given.
    """
    from ..core.source import SliceSource

    if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "slice_key"):
        images = [images]
    items = list(images)
    if not items:
        raise DistillError("no images to train on: give at least one image array, TIFF file or folder")
    out: list[tuple[str, Any]] = []
    for i, item in enumerate(items):
        if hasattr(item, "slice_key") and hasattr(item, "rgb"):
            out.append((f"source[{i}]", item))
            continue
        if isinstance(item, (str, os.PathLike)):
            path = Path(item).expanduser()
            if not path.exists():
                raise DistillError(f"image path {str(path)!r} does not exist: give an existing TIFF file or folder")
            files = (
                sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                if path.is_dir()
                else [path]
            )
            if not files:
                raise DistillError(
                    f"folder {str(path)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}): "
                    "point at a folder of TIFF files"
                )
            for f in files:
                try:
                    arr = _read_image_file(f)
                except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
                    raise DistillError(f"cannot read image file {str(f)!r}: {exc}") from exc
                out.append((str(f), _slice_source(SliceSource, arr, rgb, str(f), channel_axis)))
            continue
        if not hasattr(item, "shape"):
            raise DistillError(
                f"image item {i} is a {type(item).__name__}: give an array, a file path or a folder"
            )
        out.append((f"array[{i}]", _slice_source(SliceSource, item, rgb, f"image {i}", channel_axis)))
    return out


def split_slices(
    sources: Sequence[tuple[str, Any]],
    *,
    max_slices_per_image: int | None = 32,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[SliceRef], list[SliceRef]]:
    """Sample slices from every source and hold some out for validation.

    Slices of a stack are taken evenly spaced in z (all of them when the stack has no more than
    ``max_slices_per_image``). The pooled slices are shuffled with ``seed`` and the first
    ``max(1, round(val_fraction * n))`` become the validation set (none when ``val_fraction`` is 0).
    Slices with identical content (same key) are kept once.

    Returns
    -------
    (train, val) : lists of :class:`SliceRef`

    Raises
    ------
    DistillError
        When too few slices remain to both train and validate.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DistillError(f"val_fraction must be in [0, 1), got {val_fraction}")
    refs: list[SliceRef] = []
    seen: set[str] = set()
    for s, (_name, src) in enumerate(sources):
        n = int(src.n_slices)
        if max_slices_per_image is not None and n > max_slices_per_image:
            zs = np.unique(np.linspace(0, n - 1, int(max_slices_per_image)).round().astype(int))
        else:
            zs = np.arange(n)
        for z in zs:
            key = src.slice_key(int(z))
            if key in seen:
                continue
            seen.add(key)
            refs.append(SliceRef(s, int(z), key))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(refs))
    refs = [refs[i] for i in order]
    n_val = 0 if val_fraction == 0 else max(1, int(round(val_fraction * len(refs))))
    if len(refs) - n_val < 1:
        raise DistillError(
            f"only {len(refs)} distinct slice(s) to train on: validation needs at least one more; "
            "add images, or set val_fraction=0 to skip validation"
        )
    return refs[n_val:], refs[:n_val]


def dihedral(op: int, *tensors: Any) -> tuple[Any, ...]:
    """Apply one of the 8 dihedral transforms to square tensors, all in the same way.

    ``op`` in 0..7: flip columns first when ``op >= 4``, then rotate by ``op % 4`` quarter turns
    (counter-clockwise, over the last two axes). An input ``(3, 1024, 1024)`` and its embedding
    ``(256, 64, 64)`` stay aligned because 1024 / 64 is the encoder's exact patch stride.
    Returns the transformed tensors in the order given.
    """
    import torch

    if not 0 <= op < 8:
        raise ValueError(f"dihedral op must be in 0..7, got {op}")
    out = []
    for t in tensors:
        if t.shape[-1] != t.shape[-2]:
            raise ValueError(f"dihedral transforms need square tensors, got {tuple(t.shape)}")
        if op >= 4:
            t = torch.flip(t, dims=(-1,))
        if op % 4:
            t = torch.rot90(t, op % 4, dims=(-2, -1))
        out.append(t)
    return tuple(out)
