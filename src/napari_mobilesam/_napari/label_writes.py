"""Writes into a napari Labels layer, each one undo step (``data_setitem`` under ``block_history``).

Slices are ``(H, W)`` and volumes ``(Z, H, W)`` in the layer's data coordinates; a 2D layer's
"slice" is the whole layer. No Qt here.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "next_free_label",
    "write_slice_labels",
    "write_volume_labels",
    "write_objects",
    "replace_label_on_slice",
]


def _level0(data):
    """The full-resolution array of a (possibly multiscale) layer's data."""
    return data[0] if isinstance(data, (list, tuple)) else data


def next_free_label(labels) -> int:
    """One more than the largest id in a Labels layer (1 for an empty layer)."""
    data = np.asarray(_level0(labels.data))
    return int(data.max(initial=0)) + 1


def _write(labels, index: tuple[np.ndarray, ...], values: np.ndarray) -> None:
    """One undoable write of ``values`` at ``index`` into a Labels layer."""
    if len(index[0]) == 0:
        return
    with labels.block_history():
        labels.data_setitem(index, values)


def write_slice_labels(labels, z: int, slice_labels: np.ndarray, *, keep_existing: bool = True):
    """Commit the objects of ``slice_labels`` ((H, W); bool = one object) into slice z of ``labels``.

    Each object (each distinct non-zero value) gets the next free id of the layer, in increasing
    order of its value. With ``keep_existing`` (the default), pixels that already hold a label are
    left alone, so nothing drawn before is lost. The write is one undo step.

    Returns
    -------
    list of int
        The ids written (objects that landed entirely on existing labels are skipped).
    """
    src = np.asarray(slice_labels)
    data = _level0(labels.data)
    target = np.asarray(data[z] if data.ndim == 3 else data)
    if src.shape != target.shape:
        raise ValueError(f"slice of shape {src.shape} does not fit labels slice {target.shape}")
    ids, values = _relabel(src, target, keep_existing, next_free_label(labels))
    rows, cols = np.nonzero(values)
    index = (np.full(rows.shape, z), rows, cols) if data.ndim == 3 else (rows, cols)
    _write(labels, index, values[rows, cols])
    return ids


def write_volume_labels(
    labels, volume: np.ndarray, *, keep_existing: bool = True, label: int | None = None
) -> list[int]:
    """Commit the objects of ``volume`` (same shape as ``labels``) as one undo step.

    Same id and overwrite rules as :func:`write_slice_labels`; with ``label``, every non-zero
    voxel of ``volume`` is written as that id instead (extending an existing label).
    Returns the ids written.
    """
    src = np.asarray(volume)
    target = np.asarray(_level0(labels.data))
    if src.shape != target.shape:
        raise ValueError(f"volume of shape {src.shape} does not fit labels of shape {target.shape}")
    if label is not None:
        src = (src != 0).astype(np.uint8)
    first = next_free_label(labels) if label is None else int(label)
    ids, values = _relabel(src, target, keep_existing, first)
    index = np.nonzero(values)
    _write(labels, index, values[index])
    return ids


def write_objects(labels, volume: np.ndarray, *, keep_existing: bool = True) -> list[int]:
    """Write every non-zero voxel of ``volume`` with its own value (ids of ``labels``), one undo step.

    With ``keep_existing``, only background voxels and voxels already holding the same id are
    written. Returns the ids that got new voxels.
    """
    src = np.asarray(volume)
    target = np.asarray(_level0(labels.data))
    if src.shape != target.shape:
        raise ValueError(f"volume of shape {src.shape} does not fit labels of shape {target.shape}")
    write = (src != 0) & (target != src)
    if keep_existing:
        write &= target == 0
    index = np.nonzero(write)
    _write(labels, index, src[index])
    return sorted(int(v) for v in np.unique(src[index]))


def replace_label_on_slice(labels, z: int, label: int, mask: np.ndarray, *, keep_existing: bool = True) -> int:
    """Make ``mask`` ((H, W) bool) the label ``label`` on slice ``z`` (one undo step).

    Its old pixels outside ``mask`` become background; with ``keep_existing``, other labels are
    not painted over. Returns the number of pixels changed.
    """
    data = _level0(labels.data)
    current = np.asarray(data[z] if data.ndim == 3 else data)
    mask = np.asarray(mask, bool)
    if mask.shape != current.shape:
        raise ValueError(f"mask of shape {mask.shape} does not fit labels slice {current.shape}")
    paint = mask & (current != label)
    if keep_existing:
        paint &= current == 0
    erase = (current == label) & ~mask
    rows, cols = np.nonzero(paint | erase)
    values = np.where(paint[rows, cols], label, 0)
    index = (np.full(rows.shape, z), rows, cols) if data.ndim == 3 else (rows, cols)
    _write(labels, index, values)
    return len(rows)


def _relabel(src, target, keep_existing: bool, first_id: int):
    """Map each non-zero value of ``src`` to a new id from ``first_id``; 0 where not written."""
    mask = src != 0
    if keep_existing:
        mask &= target == 0
    old = np.unique(src[mask])
    ids = list(range(first_id, first_id + len(old)))
    out = np.zeros(src.shape, dtype=np.int64)
    if len(old):
        lut_index = np.searchsorted(old, src[mask])
        out[mask] = np.asarray(ids, dtype=np.int64)[lut_index]
    return ids, out
