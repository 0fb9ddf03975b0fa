"""The napari layers the segmentation widget works with, and the conversions between them.

* the **image** the user segments: 2D ``(row, col)``, 2D RGB ``(row, col, 3|4)``, a stack
  ``(z, row, col)`` or an RGB stack ``(z, row, col, 3|4)``;
* a **prompt Points layer**: each point carries a boolean feature ``positive`` (positive points
  are drawn as green discs, negative ones as red crosses);
* a **box Shapes layer**: rectangles, one box prompt per slice (the last one drawn counts);
* a **preview Labels layer** holding one slice, ``(1, H, W)`` placed at the current z through its
  translate (``(H, W)`` for a 2D image), so it costs one slice of memory whatever the stack size;
* the **target Labels layer**, with the image's spatial shape, that committed objects go into.

Every coordinate leaving this module is in the image's *data* coordinates, ``(z, row, col)`` or
``(row, col)``: prompt layers may carry any scale/translate, they are mapped through world
coordinates. Nothing here imports Qt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "POSITIVE_COLOR",
    "NEGATIVE_COLOR",
    "ImageGeometry",
    "image_geometry",
    "current_slice",
    "make_points_layer",
    "make_boxes_layer",
    "make_preview_layer",
    "make_target_layer",
    "check_target_layer",
    "show_preview",
    "slice_prompts",
    "SlicePrompts",
    "negative_only_slices",
    "seed_slices",
    "remove_slice_prompts",
    "next_free_label",
    "write_slice_labels",
    "write_volume_labels",
]

POSITIVE_COLOR = "lime"
NEGATIVE_COLOR = "red"


@dataclass(frozen=True)
class ImageGeometry:
    """Spatial layout of an image layer.

    Attributes
    ----------
    shape : tuple of int
        Spatial shape: ``(Z, H, W)`` for a stack, ``(H, W)`` for a 2D image (no RGB axis).
    rgb : bool
        Whether the layer's data has a trailing colour axis.
    """

    shape: tuple[int, ...]
    rgb: bool

    @property
    def is_stack(self) -> bool:
        return len(self.shape) == 3

    @property
    def n_slices(self) -> int:
        return self.shape[0] if self.is_stack else 1

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.shape[-2], self.shape[-1]


def _level0(data):
    """The full-resolution array of a (possibly multiscale) layer's data."""
    return data[0] if isinstance(data, (list, tuple)) else data


def image_geometry(image) -> ImageGeometry:
    """Spatial shape of an napari Image layer; ValueError for layouts the widget cannot segment."""
    data = _level0(image.data)
    rgb = bool(getattr(image, "rgb", False))
    shape = tuple(int(s) for s in (data.shape[:-1] if rgb else data.shape))
    if len(shape) not in (2, 3):
        raise ValueError(
            f"image layer {image.name!r} has {len(shape)} spatial dimensions {shape}; the "
            "segmentation widget works on 2D images (row, col) and stacks (z, row, col). "
            "Split time points or channels into separate layers first "
            "(e.g. 'Split Stack' in the layer's context menu)."
        )
    if min(shape[-2:]) < 2:
        raise ValueError(f"image layer {image.name!r} has a degenerate slice shape {shape[-2:]}")
    return ImageGeometry(shape=shape, rgb=rgb)


def current_slice(viewer, image) -> int:
    """Index of the image's z slice shown in the viewer (0 for a 2D image), clipped to the stack.

    Uses ``image.world_to_data(viewer.dims.point)``, so the image's scale and translate count.
    """
    geom = image_geometry(image)
    if not geom.is_stack:
        return 0
    z = float(image.world_to_data(viewer.dims.point)[0])
    return int(np.clip(round(z), 0, geom.n_slices - 1))


def _transform_kwargs(image) -> dict:
    """scale/translate/rotate/shear/affine of ``image`` (spatial axes only), for a new layer."""
    return {
        "scale": np.asarray(image.scale, dtype=float),
        "translate": np.asarray(image.translate, dtype=float),
        "rotate": np.asarray(image.rotate, dtype=float),
        "shear": np.asarray(image.shear, dtype=float),
        "affine": image.affine,
    }


def make_points_layer(image, name: str | None = None):
    """A Points layer for prompts, aligned with ``image``; feature ``positive`` (bool)."""
    from napari.layers import Points

    geom = image_geometry(image)
    layer = Points(
        ndim=len(geom.shape),
        name=name or f"{image.name} prompts",
        features={"positive": np.array([], dtype=bool)},
        face_color="positive",
        face_color_cycle={True: POSITIVE_COLOR, False: NEGATIVE_COLOR},
        border_color="white",
        border_width=0.1,
        size=max(3.0, min(geom.slice_shape) / 60),
        **_transform_kwargs(image),
    )
    layer.feature_defaults["positive"] = True
    return layer


def make_boxes_layer(image, name: str | None = None):
    """An empty Shapes layer for box prompts, aligned with ``image``, in rectangle mode."""
    from napari.layers import Shapes

    geom = image_geometry(image)
    layer = Shapes(
        ndim=len(geom.shape),
        name=name or f"{image.name} boxes",
        edge_color="yellow",
        face_color="transparent",
        edge_width=max(1.0, min(geom.slice_shape) / 200),
        **_transform_kwargs(image),
    )
    return layer


def make_preview_layer(image, name: str | None = None):
    """A one-slice Labels layer, ``(1, H, W)`` uint32 (``(H, W)`` for a 2D image)."""
    from napari.layers import Labels

    geom = image_geometry(image)
    shape = (1, *geom.slice_shape) if geom.is_stack else geom.slice_shape
    layer = Labels(
        np.zeros(shape, dtype=np.uint32),
        name=name or f"{image.name} preview",
        opacity=0.55,
        **_transform_kwargs(image),
    )
    layer.editable = False
    return layer


def make_target_layer(image, name: str | None = None):
    """An empty Labels layer with the image's spatial shape (uint32), aligned with ``image``."""
    from napari.layers import Labels

    geom = image_geometry(image)
    return Labels(
        np.zeros(geom.shape, dtype=np.uint32),
        name=name or f"{image.name} labels",
        **_transform_kwargs(image),
    )


def check_target_layer(labels, image) -> None:
    """ValueError unless the Labels layer's voxel grid matches the image's spatial shape."""
    geom = image_geometry(image)
    shape = tuple(_level0(labels.data).shape)
    if shape != geom.shape:
        raise ValueError(
            f"labels layer {labels.name!r} has shape {shape} but image {image.name!r} has "
            f"spatial shape {geom.shape}: pick a Labels layer of the same shape, or '(new layer)' "
            "to create one."
        )
    if isinstance(labels.data, (list, tuple)):
        raise ValueError(f"labels layer {labels.name!r} is multiscale: pick a single-scale layer")


def show_preview(preview, image, z: int, slice_labels: np.ndarray | None) -> None:
    """Put ``slice_labels`` ((H, W) int or bool; None clears) into ``preview`` at slice ``z``.

    For a stack the preview layer's translate is moved so that its single slice sits on the
    image's slice ``z`` in world coordinates (any image scale/translate/rotation respected).
    """
    geom = image_geometry(image)
    if slice_labels is None:
        data = np.zeros(geom.slice_shape, dtype=np.uint32)
    else:
        data = np.asarray(slice_labels)
        if data.shape != geom.slice_shape:
            raise ValueError(f"preview of shape {data.shape}, expected {geom.slice_shape}")
        data = data.astype(np.uint32, copy=False)
    if geom.is_stack:
        data = data[None]
    if geom.is_stack and slice_labels is not None:  # an empty preview can stay where it is
        origin = np.zeros(3)
        step = np.array([float(z), 0.0, 0.0])
        offset_world = np.asarray(image.data_to_world(step)) - np.asarray(image.data_to_world(origin))
        offset = np.linalg.solve(image.affine.linear_matrix, offset_world)
        translate = np.asarray(image.translate, dtype=float) + offset
        if not np.allclose(preview.translate, translate):  # the setter costs ms even when unchanged
            preview.translate = translate
    current = preview.data
    if isinstance(current, np.ndarray) and current.shape == data.shape and current.dtype == data.dtype:
        current[...] = data  # in place + refresh: cheaper than replacing the layer's data
        preview.refresh(extent=False)
    else:
        preview.data = data


def _to_image_coords(layer, coords: np.ndarray, image) -> np.ndarray:
    """Map ``coords`` ((N, D), data coordinates of ``layer``) into ``image`` data coordinates."""
    out = [np.asarray(image.world_to_data(layer.data_to_world(c)), dtype=float) for c in coords]
    return np.asarray(out, dtype=float).reshape(len(coords), -1)


@dataclass(frozen=True)
class SlicePrompts:
    """The prompts lying on one slice, in image data coordinates.

    Attributes
    ----------
    points : (N, 2) float
        ``(row, col)`` pixel positions.
    labels : (N,) int
        1 for a positive point, 0 for a negative one.
    box : (4,) float or None
        ``(row0, col0, row1, col1)`` with ``row0 <= row1`` and ``col0 <= col1``.
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None

    @property
    def empty(self) -> bool:
        return len(self.points) == 0 and self.box is None

    @property
    def has_positive(self) -> bool:
        return bool(np.any(self.labels == 1)) or self.box is not None


def slice_prompts(image, z: int, points=None, boxes=None) -> SlicePrompts:
    """Collect the prompts of ``points`` (Points layer) and ``boxes`` (Shapes layer) on slice z.

    A point or box belongs to slice ``z`` when its image z coordinate rounds to ``z`` (2D images:
    every prompt). Only rectangles count as boxes; the most recently drawn one on the slice wins.
    """
    geom = image_geometry(image)
    pts = np.zeros((0, 2))
    lab = np.zeros(0, dtype=int)
    if points is not None and len(points.data):
        coords = _to_image_coords(points, np.asarray(points.data), image)
        keep = np.ones(len(coords), bool) if not geom.is_stack else np.round(coords[:, 0]) == z
        positive = np.asarray(points.features["positive"], dtype=bool)
        pts = coords[keep][:, -2:]
        lab = positive[keep].astype(int)
    box = None
    if boxes is not None:
        for vertices, kind in zip(boxes.data, boxes.shape_type, strict=True):
            if kind != "rectangle":
                continue
            coords = _to_image_coords(boxes, np.asarray(vertices), image)
            if geom.is_stack and not np.all(np.round(coords[:, 0]) == z):
                continue
            rc = coords[:, -2:]
            box = np.concatenate([rc.min(axis=0), rc.max(axis=0)])
    return SlicePrompts(points=pts, labels=lab, box=box)


def negative_only_slices(image, points=None, boxes=None) -> dict[int, np.ndarray]:
    """Slices of a stack whose prompts are negative points only: ``{z: (N, 2) (row, col)}``.

    Propagation treats such a slice as a wall the object must not cross.
    """
    geom = image_geometry(image)
    if not geom.is_stack or points is None or not len(points.data):
        return {}
    coords = _to_image_coords(points, np.asarray(points.data), image)
    positive = np.asarray(points.features["positive"], dtype=bool)
    zs = np.round(coords[:, 0]).astype(int)
    boxed = set()
    if boxes is not None:
        for vertices, kind in zip(boxes.data, boxes.shape_type, strict=True):
            if kind == "rectangle":
                boxed.add(int(np.round(_to_image_coords(boxes, np.asarray(vertices), image)[0, 0])))
    out = {}
    for z in np.unique(zs):
        here = zs == z
        if not positive[here].any() and int(z) not in boxed:
            out[int(z)] = coords[here][:, -2:]
    return out


def seed_slices(image, points=None, boxes=None) -> list[int]:
    """Slices of a stack holding a positive point or a box, sorted (``[]`` for a 2D image)."""
    if not image_geometry(image).is_stack:
        return []
    zs: set[int] = set()
    if points is not None and len(points.data):
        positive = np.asarray(points.features["positive"], dtype=bool)
        zs.update(_prompt_slices(points, image)[positive].tolist())
    if boxes is not None and len(boxes.data):
        rect = np.array([kind == "rectangle" for kind in boxes.shape_type], bool)
        zs.update(_prompt_slices(boxes, image)[rect].tolist())
    return sorted(int(z) for z in zs)


def _prompt_slices(layer, image) -> np.ndarray:
    """Image z index (rounded) of every point of a Points layer / every shape of a Shapes layer."""
    if not len(layer.data):
        return np.zeros(0, int)
    if hasattr(layer, "shape_type"):
        firsts = np.array([np.asarray(v)[0] for v in layer.data])
        return np.round(_to_image_coords(layer, firsts, image)[:, 0]).astype(int)
    return np.round(_to_image_coords(layer, np.asarray(layer.data), image)[:, 0]).astype(int)


def remove_slice_prompts(image, z: int, points=None, boxes=None) -> None:
    """Delete the points and boxes lying on slice ``z`` (every prompt of a 2D image)."""
    stack = image_geometry(image).is_stack
    for layer in (points, boxes):
        if layer is None or not len(layer.data):
            continue
        drop = _prompt_slices(layer, image) == z if stack else np.ones(len(layer.data), bool)
        if drop.any():
            layer.selected_data = set(np.flatnonzero(drop).tolist())
            layer.remove_selected()


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
