"""The helper layers of the image being segmented: prompts (Points), boxes (Shapes), preview (Labels).

Only the image in use has its helper layers in the viewer: picking another image takes the
previous image's set out of the layer list (kept, with its prompts, and put back when that image is
picked again), so the layer list does not grow with every image. A helper layer the user deletes
is created again at once; the helpers of a deleted image are removed and forgotten.
Nothing here reads the widget: the widget passes the callbacks the new layers need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from . import prompt_layers as pl

__all__ = ["HelperSet", "HelperLayers"]


@dataclass
class HelperSet:
    """The three helper layers of one image."""

    points: object
    boxes: object
    preview: object

    def layers(self) -> tuple:
        return self.points, self.boxes, self.preview


class HelperLayers:
    """Helper layers per image, only the current image's in the viewer.

    Parameters
    ----------
    layers : napari LayerList
    on_prompts_changed : callable(event)
        Connected to the ``data`` events of each new Points and Shapes layer.
    on_points_press : callable(layer, event)
        Inserted first in each new Points layer's mouse-drag callbacks.
    """

    def __init__(self, layers, on_prompts_changed: Callable, on_points_press: Callable):
        self._layers = layers
        self._on_prompts_changed = on_prompts_changed
        self._on_points_press = on_points_press
        self._sets: dict[int, HelperSet] = {}  # id(image) -> its helpers
        self._images: dict[int, object] = {}  # id(image) -> image (to tell deleted ones)
        self.current: HelperSet | None = None
        self.image = None
        self.changing = False  # True while this object adds or removes layers
        self._batching = False  # inside napari's batched layer-list update

    def owns(self, layer) -> bool:
        """Whether ``layer`` is a helper layer of any image."""
        return any(any(layer is h for h in s.layers()) for s in self._sets.values())

    @contextlib.contextmanager
    def _batch(self):
        """napari's batched layer-list update: the canvas rebuilds its scene graph (and runs its
        full garbage collection) once for all the layers taken out and put back, not once per
        removed layer (about 0.3 s each with a few hundred thousand Python objects alive).
        napari's batch does not nest (an inner end resumes the updates): only the outermost
        one here opens it."""
        batched = getattr(self._layers, "batched_update", None)
        if self._batching or batched is None:
            yield
            return
        self._batching = True
        try:
            with batched():
                yield
        finally:
            self._batching = False

    def show(self, image) -> HelperSet | None:
        """Make ``image``'s helpers the ones in the viewer (creating missing ones); None clears."""
        self.changing = True
        try:
            with self._batch():
                if self.current is not None and image is not self.image:
                    self._take_out(self.current)
                self.image, self.current = image, None
                if image is not None:
                    self.current = self._ensure(image)
        finally:
            self.changing = False
        return self.current

    def restore_missing(self) -> bool:
        """Create again the current image's helper layers the user deleted; True when any was."""
        if self.image is None or self.current is None:
            return False
        gone = [layer for layer in self.current.layers() if layer is None or layer not in self._layers]
        if gone:
            self.changing = True
            try:
                with self._batch():
                    self.current = self._ensure(self.image, fresh=gone)
            finally:
                self.changing = False
        return bool(gone)

    def forget_layer(self, layer) -> bool:
        """The user deleted ``layer``: a helper is made anew when next needed; True if it was one."""
        found = False
        for helpers in self._sets.values():
            for name in ("points", "boxes", "preview"):
                if getattr(helpers, name) is layer:
                    setattr(helpers, name, None)
                    found = True
        return found

    def forget_deleted_images(self) -> None:
        """Remove the helpers of images no longer in the viewer."""
        for key, image in list(self._images.items()):
            if image not in self._layers:
                helpers = self._sets.pop(key)
                del self._images[key]
                self._take_out(helpers)
                if helpers is self.current:
                    self.current, self.image = None, None

    def _take_out(self, helpers: HelperSet) -> None:
        self.changing = True
        try:
            with self._batch():
                for layer in helpers.layers():
                    if layer is not None and layer in self._layers:
                        self._layers.remove(layer)
        finally:
            self.changing = False

    def _ensure(self, image, fresh=()) -> HelperSet:
        """``image``'s helpers, all in the viewer: kept ones put back, those in ``fresh`` (deleted
        by the user) and missing ones made anew."""
        layers = self._layers
        old = self._sets.get(id(image))

        def reuse(name: str, make: Callable):
            layer = None if old is None else getattr(old, name)
            return make(image) if layer is None or any(layer is f for f in fresh) else layer

        preview = reuse("preview", pl.make_preview_layer)
        boxes = reuse("boxes", self._new_boxes)
        points = reuse("points", self._new_points)
        for layer in (preview, boxes, points):  # the prompts on top: clicks go to them
            if layer not in layers:
                layers.append(layer)
        helpers = HelperSet(points, boxes, preview)
        self._sets[id(image)] = helpers
        self._images[id(image)] = image
        return helpers

    def _new_points(self, image):
        points = pl.make_points_layer(image)
        points.events.data.connect(self._on_prompts_changed)
        points.mouse_drag_callbacks.insert(0, self._on_points_press)
        return points

    def _new_boxes(self, image):
        boxes = pl.make_boxes_layer(image)
        boxes.events.data.connect(self._on_prompts_changed)
        return boxes
