"""The helper layers of the image being segmented: prompts (Points), boxes (Shapes), preview (Labels),
and the Labels layer made for the image's results (its *made target*).

Only the image in use has its helper layers in the viewer: picking another image takes the
previous image's set out of the layer list (kept, with its prompts, and put back when that image is
picked again), so the layer list does not grow with every image. A helper layer the user deletes
is created again at once; the helpers of a deleted image are removed and forgotten.

The made target is a result layer, not a helper: it is listed as a commit target, and once
anything is written into it (a commit, a propagation, the user's brush, new data) it stays in the
viewer for good. It is made when the image is picked, not at the first commit or propagation:
napari takes 0.15-0.4 s of GUI time to insert a Labels layer (its canvas visuals and controls), and
at the pick the user waits for the first slice's embedding anyway. Until something is written into
it, it goes and comes back with the image's helpers.
Nothing here reads the widget: the widget passes the callbacks the new layers need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from . import prompt_layers as pl

__all__ = ["HelperSet", "HelperLayers", "insert_unselected"]


def insert_unselected(layers, layer, index: int) -> None:
    """Insert ``layer`` into napari's LayerList without making it the active one.

    napari activates an inserted layer, which makes its layer list switch the layer controls
    panel (a relayout and repaint of the window: 0.3 s measured on 2 cores) and our widget then
    makes the prompts layer active again (a second switch). The selection stays as it was: the
    prompts layer stays ready for the next object. napari's switch is private (and warns that
    plugins may lose it from 0.10): without it the layer is inserted as usual.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the private-attribute warning
        activate = getattr(layers, "_activate_on_insert", None)
        if activate is not None:
            layers._activate_on_insert = False
    try:
        layers.insert(index, layer)
    finally:
        if activate is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                layers._activate_on_insert = activate


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
        self._targets: dict[int, object] = {}  # id(image) -> the Labels layer made for it
        self._touched: set[int] = set()  # id(layer) of made targets something was written into
        self.current: HelperSet | None = None
        self.image = None
        self.changing = False  # True while this object adds or removes layers
        self._batching = False  # inside napari's batched layer-list update

    def owns(self, layer) -> bool:
        """Whether ``layer`` is a helper layer of any image."""
        return any(any(layer is h for h in s.layers()) for s in self._sets.values())

    @contextlib.contextmanager
    def _changing(self):
        """``changing`` is True inside (nested uses keep it True until the outermost ends)."""
        before, self.changing = self.changing, True
        try:
            yield
        finally:
            self.changing = before

    @property
    def batching(self) -> bool:
        """Whether a batched layer-list update of these helpers is open."""
        return self._batching

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

    def show(self, image, target: bool = False) -> HelperSet | None:
        """Make ``image``'s helpers the ones in the viewer (creating missing ones); None clears.

        The previous image's made target goes with its helpers while nothing was written into
        it. With ``target``, ``image``'s made target is put in the viewer too (made now if it has
        none), in the same batched layer-list update.
        """
        # showing nothing opens no batch of its own (its end makes the canvas collect garbage):
        # the take-outs below open one only when a layer goes
        batch = self._batch() if image is not None else contextlib.nullcontext()
        with self._changing(), batch:
            if self.image is not None and image is not self.image:
                if self.current is not None:
                    self._take_out(self.current)
                self._take_out_untouched_target(self.image)
            self.image, self.current = image, None
            if image is not None:
                self.current = self._ensure(image)
                if target:
                    try:
                        self.ensure_target(image)
                    except (MemoryError, ValueError):
                        pass  # made (and the failure reported) at the first commit instead
        return self.current

    def restore_missing(self) -> bool:
        """Create again the current image's helper layers the user deleted; True when any was."""
        if self.image is None or self.current is None:
            return False
        gone = [layer for layer in self.current.layers() if layer is None or layer not in self._layers]
        if gone:
            with self._changing(), self._batch():
                self.current = self._ensure(self.image, fresh=gone)
        return bool(gone)

    def forget_layer(self, layer) -> bool:
        """The user deleted ``layer``: a helper is made anew when next needed; True if it was one."""
        found = False
        for key, made in list(self._targets.items()):
            if made is layer:  # a new one is made when next needed
                del self._targets[key]
                self._touched.discard(id(layer))
        for helpers in self._sets.values():
            for name in ("points", "boxes", "preview"):
                if getattr(helpers, name) is layer:
                    setattr(helpers, name, None)
                    found = True
        return found

    def forget_deleted_images(self) -> None:
        """Remove the helpers of images no longer in the viewer (and their made targets while
        nothing was written into them; one holding labels stays)."""
        for key, image in list(self._images.items()):
            if image not in self._layers:
                helpers = self._sets.pop(key, None)
                del self._images[key]
                if helpers is not None:
                    self._take_out(helpers)
                self._take_out_untouched_target(image)
                made = self._targets.pop(key, None)
                if made is not None:
                    self._touched.discard(id(made))
                if image is self.image:
                    self.current, self.image = None, None

    def _take_out(self, helpers: HelperSet) -> None:
        present = [layer for layer in helpers.layers() if layer is not None and layer in self._layers]
        if not present:  # no batch: its end makes the canvas rebuild its scene and collect garbage
            return
        with self._changing(), self._batch():
            for layer in present:
                self._layers.remove(layer)

    # ------------------------------------------------------------------ made targets
    def target_of(self, image):
        """The Labels layer made for ``image`` (in the viewer or taken out), or None."""
        return None if image is None else self._targets.get(id(image))

    def is_made_target(self, layer) -> bool:
        """Whether ``layer`` is the Labels layer made for one of the images."""
        return any(layer is made for made in self._targets.values())

    def untouched(self, layer) -> bool:
        """Whether ``layer`` is a made target nothing was written into yet."""
        return self.is_made_target(layer) and id(layer) not in self._touched

    def ensure_target(self, image):
        """``image``'s made target, in the viewer right above the image (put back, or made now
        with the image's shape), inserted without becoming the active layer."""
        layer = self._targets.get(id(image))
        if layer is None:
            layer = pl.make_target_layer(image)
            touched, key = self._touched, id(layer)
            for emitter in (layer.events.paint, layer.events.data):  # undoable writes, brush, fill; new data
                emitter.connect(lambda _event=None, key=key: touched.add(key))
            self._targets[id(image)] = layer
            self._images[id(image)] = image
        if layer not in self._layers:
            with self._changing():
                index = self._layers.index(image) + 1 if image in self._layers else len(self._layers)
                insert_unselected(self._layers, layer, index)
        return layer

    def _take_out_untouched_target(self, image) -> None:
        layer = self._targets.get(id(image))
        if layer is not None and id(layer) not in self._touched and layer in self._layers:
            with self._changing(), self._batch():
                self._layers.remove(layer)

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
