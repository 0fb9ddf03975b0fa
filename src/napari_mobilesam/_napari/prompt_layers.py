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
from typing import TYPE_CHECKING

import numpy as np

from ..io.prompts import (
    Prompts,
    prompts_from_points,
    prompts_from_shapes,
    scribble_points,
)
from .label_writes import (  # noqa: F401 (part of this module's interface)
    next_free_label,
    replace_label_on_slice,
    write_objects,
    write_slice_labels,
    write_volume_labels,
)

if TYPE_CHECKING:  # the engine's prompt types import torch: loaded when first used
    from ..core.predictor import Prompt
    from ..volume.propagation import ObjectPrompts

__all__ = [
    "POSITIVE_COLOR",
    "NEGATIVE_COLOR",
    "ImageGeometry",
    "image_geometry",
    "axis_name",
    "current_slice",
    "make_points_layer",
    "make_boxes_layer",
    "make_preview_layer",
    "make_target_layer",
    "check_target_layer",
    "show_preview",
    "outline_labels",
    "layer_prompts",
    "slice_prompt",
    "has_positive",
    "object_prompts",
    "negative_only_slices",
    "seed_slices",
    "remove_slice_prompts",
    "next_free_label",
    "write_slice_labels",
    "write_volume_labels",
    "write_objects",
    "replace_label_on_slice",
    "label_mask_input",
    "PREVIEW_COLOR",
    "preview_colormap",
]

POSITIVE_COLOR = "lime"
NEGATIVE_COLOR = "red"
#: Every object of the preview has this one colour (committed labels get napari's many colours).
PREVIEW_COLOR = "#ff00ff"


def preview_colormap():
    """A one-colour (magenta) label colormap: the preview never looks like committed labels."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: PREVIEW_COLOR, 0: "transparent"})


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


def axis_name(image) -> str:
    """Name of a stack's first axis for the interface: ``"t"`` for a time-lapse ``(t, row, col)``.

    Taken from the layer's ``axis_labels`` (``"t"``, ``"time"``, ``"frame"`` ... -> ``"t"``; any other
    given name as it is); napari's default numeric labels give ``"z"``.
    """
    labels = tuple(getattr(image, "axis_labels", ()) or ())
    first = str(labels[0]).strip() if labels else ""
    if first.lower() in ("t", "time", "frame", "frames", "timepoint", "tp"):
        return "t"
    if not first or first.lstrip("-").isdigit() or first.lower().startswith("axis"):
        return "z"
    return first


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
        opacity=0.5,
        colormap=preview_colormap(),
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


def outline_labels(labels: np.ndarray, thickness: int = 2) -> np.ndarray:
    """Each object's outline: the pixels of ``labels`` ((H, W) int) that lie at most
    ``thickness`` - 1 steps (4-connected) inside their object's border; 0 elsewhere.

    Computed with array shifts (call it in a worker for a large slice): the preview then shows
    outlines as plain labels, where napari's own contour mode would compute them on the GUI
    thread at every refresh.
    """
    labels = np.asarray(labels)
    inner = labels != 0  # pixels whose whole neighbourhood so far holds their own label
    for _ in range(max(1, int(thickness))):
        same = inner.copy()
        same[1:] &= inner[:-1] & (labels[1:] == labels[:-1])
        same[:-1] &= inner[1:] & (labels[:-1] == labels[1:])
        same[:, 1:] &= inner[:, :-1] & (labels[:, 1:] == labels[:, :-1])
        same[:, :-1] &= inner[:, 1:] & (labels[:, :-1] == labels[:, 1:])
        inner = same
    return np.where(inner, 0, labels).astype(labels.dtype, copy=False)


def show_preview(preview, image, z: int, slice_labels: np.ndarray | None, *, outlines: bool = False,
                 shown: np.ndarray | None = None) -> None:
    """Put ``slice_labels`` ((H, W) int or bool; None clears) into ``preview`` at slice ``z``.

    ``outlines``: draw each object's outline only (several objects of one colour stay apart);
    ``shown``: those outlines already computed (:func:`outline_labels`, e.g. in a worker), so
    the GUI thread only copies them.

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
        if outlines:
            data = outline_labels(data) if shown is None else np.asarray(shown)
            if data.shape != geom.slice_shape:
                raise ValueError(f"preview outlines of shape {data.shape}, expected {geom.slice_shape}")
        data = data.astype(np.uint32, copy=False)
    if geom.is_stack:
        data = data[None]
    if preview.contour != 0:  # outlines are drawn as labels: napari's contours cost the GUI thread
        preview.contour = 0
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


def layer_prompts(image, points=None, boxes=None) -> Prompts:
    """Every prompt of the Points/Shapes layers as one object (id 1), in image data coordinates.

    The conversion is :func:`napari_mobilesam.io.prompts.prompts_from_points` /
    :func:`~napari_mobilesam.io.prompts.prompts_from_shapes` (the one napari -> prompts converter),
    after mapping the layers' data through world coordinates into the image's ``(z, row, col)``
    (``(row, col)`` for a 2D image: slice 0). Only rectangles are boxes; with several on one slice
    the most recently drawn one counts. Paths drawn in the boxes layer are scribbles: positive
    points spread along them (:func:`~napari_mobilesam.io.prompts.scribble_points`).
    """
    out = Prompts()
    coords = np.zeros((0, 3 if image_geometry(image).is_stack else 2))
    positive = np.zeros(0, bool)
    if points is not None and len(points.data):
        coords = _to_image_coords(points, np.asarray(points.data), image)
        positive = np.asarray(points.features["positive"], dtype=bool)
    if boxes is not None and len(boxes.data):  # scribbles (paths) are positive points along them
        for vertices, kind in zip(boxes.data, boxes.shape_type, strict=True):
            if kind == "path":
                path = _to_image_coords(boxes, np.asarray(vertices), image)
                if path.shape[1] == 3:
                    path[:, 0] = np.round(path[:, 0])
                along = scribble_points(path)
                coords = np.concatenate([coords, along.reshape(-1, coords.shape[1])])
                positive = np.concatenate([positive, np.ones(len(along), bool)])
    if len(coords):
        out = prompts_from_points(coords, labels=positive, object_ids=np.ones(len(coords), int))
    if boxes is not None and len(boxes.data):
        last: dict[int, np.ndarray] = {}  # slice -> corners of its last rectangle
        for vertices, kind in zip(boxes.data, boxes.shape_type, strict=True):
            if kind == "rectangle":
                corners = _to_image_coords(boxes, np.asarray(vertices), image)
                z = int(np.round(corners[0, 0])) if corners.shape[1] == 3 else 0
                if corners.shape[1] == 3:
                    corners[:, 0] = np.round(corners[:, 0])
                last[z] = corners
        if last:
            rects = [last[z] for z in sorted(last)]
            out = out + prompts_from_shapes(rects, object_ids=np.ones(len(rects), int))
    return out


def slice_prompt(prompts: Prompts, z: int) -> Prompt | None:
    """The engine's :class:`~napari_mobilesam.core.predictor.Prompt` for slice ``z`` (None: no prompt).

    Points ``(row, col)``, labels 1/0, box ``(row0, col0, row1, col1)``; see
    :meth:`~napari_mobilesam.core.predictor.Prompt.from_clicks` for the one-click rule.
    """
    from ..core.predictor import Prompt

    for _oid, item in prompts.on_slice(int(z)):
        return Prompt.from_clicks(item["points"], item["labels"], item["box"])
    return None


def has_positive(prompt: Prompt | None) -> bool:
    """Whether a slice prompt selects something (a positive point or a box)."""
    if prompt is None:
        return False
    return prompt.box is not None or bool(np.any(np.asarray(prompt.labels) == 1))


def object_prompts(prompts: Prompts, label: int = 1, z_range: tuple[int, int] | None = None) -> ObjectPrompts:
    """One object through z for :func:`~napari_mobilesam.volume.propagation.propagate`.

    Every prompted slice inside ``z_range`` (``(start, stop)`` like ``range``; None: all) is a
    seed; a slice with negative points only is a wall the object does not cross.
    """
    from ..volume.propagation import ObjectPrompts

    out = ObjectPrompts(int(label))
    for z in prompts.slices.tolist():
        if z_range is None or z_range[0] <= z < z_range[1]:
            out.prompts[int(z)] = slice_prompt(prompts, z)
    return out


def seed_slices(obj: ObjectPrompts) -> list[int]:
    """Sorted slices of ``obj`` holding a positive point or a box."""
    return sorted(z for z, p in obj.prompts.items() if has_positive(p))


def negative_only_slices(obj: ObjectPrompts) -> list[int]:
    """Sorted slices of ``obj`` with negative points only (walls)."""
    return sorted(z for z, p in obj.prompts.items() if not has_positive(p))


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


def label_mask_input(mask: np.ndarray, strength: float = 8.0) -> np.ndarray:
    """(256, 256) float32 logits of a (H, W) bool mask in SAM's low-res frame, for ``mask_input``.

    SAM's mask prompt lives in the encoder's padded square frame at 1/4 resolution: the slice is
    scaled so its long side is 256, placed top-left, the rest is background. Inside: ``+strength``,
    outside: ``-strength``.
    """
    from skimage.transform import resize

    from ..core.preprocess import input_size_for

    mask = np.asarray(mask, bool)
    h, w = input_size_for(mask.shape, 256)
    small = resize(mask.astype(np.float32), (h, w), order=1, anti_aliasing=False) >= 0.5
    out = np.full((256, 256), -strength, np.float32)
    out[:h, :w][small] = strength
    return out
