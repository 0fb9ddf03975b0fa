"""Any image we read, by its path: TIFF (:mod:`.stacks`) or OME-Zarr (:mod:`.omezarr`)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import InputError
from .stacks import StackMetadata, is_zarr_path, open_stack

__all__ = ["open_image"]


def open_image(path: str | os.PathLike, *, lazy: bool = True, level: int = 0) -> tuple[Any, StackMetadata]:
    """Open a TIFF image or stack, or an OME-Zarr image (``*.zarr`` or a folder holding one).

    Parameters
    ----------
    path : TIFF file or OME-Zarr store
    lazy : bool
        Read slices when they are needed (dask or a memory map) instead of all at once.
    level : int
        OME-Zarr only: the resolution level (0 = full resolution; see
        :func:`napari_mobilesam.io.omezarr.list_levels`).

    Returns
    -------
    data : (Z, H, W), (H, W) or with channels, numpy or dask array
    meta : StackMetadata (an ``OmeZarrMetadata`` for OME-Zarr, with ``channel_axis`` and levels)
    """
    if is_zarr_path(path):
        from .omezarr import open_ome_zarr

        return open_ome_zarr(path, level=level, lazy=lazy)
    if level:
        raise InputError(
            f"{path} is a TIFF file with one resolution level: level {level} does not exist (use level 0)"
        )
    return open_stack(path, lazy=lazy)
