"""The interactive dock widget: click on objects, see the mask at once, propagate, commit.

Workflow (see ``docs/usage.md``):

1. pick the image layer, the model and the device (remembered between napari sessions);
2. click in the image: a plain click adds a positive point (green), Shift- or Ctrl-click a
   negative one (red); ``N`` swaps the two. Draw rectangles in the boxes layer for box prompts;
3. the preview layer shows the object after every prompt change. The decoder runs on the GUI
   thread only when the slice's embedding is cached (tens of ms); otherwise the embedding is
   computed in a background worker first, and the slice's neighbours are prefetched;
4. ``C`` / Commit writes the object into the target Labels layer under the next free id (one
   undo step); ``Shift-C`` / Clear drops the prompts of the slice;
5. ``Shift-S`` / Propagate follows the object through the stack in a worker (progress and cancel
   in the activity dock and in the widget; Stop ends it early and keeps the slices done) and
   writes the result as one undo step.

The engine is reached only through :class:`~napari_mobilesam.core.session.Session`; the layers
are made and read by :mod:`.prompt_layers`; propagation and automatic segmentation live in
:mod:`.long_tasks`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from ..core.session import ObjectPrediction, Session
from ..models.choice import ModelChoice
from . import prompt_layers as pl
from .long_tasks import LongTasksMixin
from .settings import (
    WidgetSettings,
    device_choices,
    load_settings,
    model_choices,
    save_settings,
)
from .workers import Task, start_task

if TYPE_CHECKING:
    import napari

__all__ = ["SegmentWidget", "KEYS", "HINT"]

log = logging.getLogger(__name__)

#: Key -> action, bound on the viewer while the widget lives.
KEYS: dict[str, str] = {
    "C": "commit",
    "Shift-C": "clear",
    "N": "toggle_sign",
    "Shift-S": "propagate",
}

HINT = (
    "Click: positive point · Shift/Ctrl-click: negative point · N: swap the two\n"
    "Boxes layer: draw a rectangle (R) for a box prompt\n"
    "C: commit · Shift-C: clear · Shift-S: propagate through z"
)

_NEW_LAYER = "(new layer)"
_DEBOUNCE_MS = 120


def _error_message(exc: BaseException, doing: str) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            f"Out of memory while {doing}. Your labels are unchanged. Close other programs, use "
            "the CPU device, or work on a cropped/downsampled image."
        )
    return f"Error while {doing}: {text}"


class SegmentWidget(LongTasksMixin, Container):
    """MobileSAM interactive segmentation dock widget.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose layers the widget uses (napari passes it when opening the widget).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        saved = load_settings()
        self._extra_models: dict[str, str] = {}
        # state
        self._image: Image | None = None
        self._points = None
        self._boxes = None
        self._preview = None
        self._layer_sets: dict[int, tuple] = {}  # id(image) -> (points, boxes, preview)
        self._created_targets: dict[int, Labels] = {}  # id(image) -> Labels layer made for it
        self._sam = None
        self._sam_request: ModelChoice | None = None
        self._session: Session | None = None
        self._model_task: Task | None = None
        self._embed_task: Task | None = None
        self._embed_z: int | None = None
        self._long_task: Task | None = None
        self._negative_default = False
        self._suspend_prompt_events = False
        # what the preview layer shows
        self._preview_z: int | None = None
        self._preview_labels: np.ndarray | None = None
        self._preview_kind: str | None = None  # "object" | "auto" | "live"
        self._live: np.ndarray | None = None  # the volume a running propagation writes into
        self._prediction: ObjectPrediction | None = None
        self.last_propagation = None  # the engine's PropagationResult of the last propagation


        self._image_combo = ComboBox(label="image", choices=self._image_choices)
        self._model_combo = ComboBox(label="model", choices=self._model_choice_list)
        self._checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pt *.pth *.pth.tar")
        self._device_combo = ComboBox(label="device", choices=device_choices())
        self._load_btn = PushButton(text="Load model")
        self._model_status = Label(value="model: not loaded")
        self._hint = Label(value=HINT)
        self._target_combo = ComboBox(label="labels", choices=self._target_choices)
        self._keep_existing = CheckBox(text="keep existing labels (commit only paints background)", value=True)
        self._commit_btn = PushButton(text="Commit [C]")
        self._clear_btn = PushButton(text="Clear prompts [Shift-C]")
        self._limit_z = CheckBox(text="limit propagation to z-range", value=False)
        self._z_from = SpinBox(label="z from", min=0, max=0)
        self._z_to = SpinBox(label="z to", min=0, max=0)
        self._propagate_btn = PushButton(text="Propagate object [Shift-S]")
        self._propagate_label_btn = PushButton(text="Propagate selected label of target layer")
        self._auto_btn = PushButton(text="Segment this slice automatically")
        self._stop_btn = PushButton(text="Stop, keep slices done", enabled=False)
        self._stop_btn.tooltip = (
            "End the propagation now and write the slices done so far (one undo step)"
        )
        self._cancel_btn = PushButton(text="Cancel", enabled=False)
        self._cancel_btn.tooltip = "End the running task and write nothing"
        self._status = Label(value="")
        self.extend(
            [
                self._image_combo,
                self._model_combo,
                self._checkpoint,
                self._device_combo,
                self._load_btn,
                self._model_status,
                self._hint,
                self._target_combo,
                self._keep_existing,
                Container(widgets=[self._commit_btn, self._clear_btn], layout="horizontal", labels=False),
                self._limit_z,
                Container(widgets=[self._z_from, self._z_to], layout="horizontal"),
                self._propagate_btn,
                self._propagate_label_btn,
                self._auto_btn,
                Container(widgets=[self._stop_btn, self._cancel_btn], layout="horizontal", labels=False),
                self._status,
            ]
        )
        self._hint.native.setWordWrap(True)
        self._status.native.setWordWrap(True)
        self._model_status.native.setWordWrap(True)

        # restore the persisted choices
        choices = model_choices()
        self._model_combo.value = saved.model if saved.model in choices else "vit_t"
        if saved.checkpoint:
            self._checkpoint.value = saved.checkpoint
        if saved.device in self._device_combo.choices:
            self._device_combo.value = saved.device
        self._update_checkpoint_visibility()

        self._slice_timer = QTimer()
        self._slice_timer.setSingleShot(True)
        self._slice_timer.setInterval(_DEBOUNCE_MS)
        self._slice_timer.timeout.connect(self._on_slice_settled)

        # connections
        self._model_combo.changed.connect(self._on_model_choice_changed)
        self._checkpoint.changed.connect(self._on_model_choice_changed)
        self._device_combo.changed.connect(self._on_model_choice_changed)
        self._load_btn.changed.connect(lambda: self.load_model())
        self._image_combo.changed.connect(self._on_image_changed)
        self._commit_btn.changed.connect(lambda: self.commit())
        self._clear_btn.changed.connect(lambda: self.clear_prompts())
        self._propagate_btn.changed.connect(lambda: self.propagate())
        self._propagate_label_btn.changed.connect(lambda: self.propagate_selected_label())
        self._auto_btn.changed.connect(lambda: self.segment_slice_automatically())
        self._cancel_btn.changed.connect(lambda: self.cancel())
        self._stop_btn.changed.connect(lambda: self.stop())
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        viewer.dims.events.current_step.connect(self._on_dims_changed)
        self._bind_keys()
        self.native.destroyed.connect(self._on_destroyed)

        self._on_image_changed(self._image_combo.value)

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _widget=None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _target_choices(self, _widget=None) -> list[tuple[str, Any]]:
        own = {id(layers[2]) for layers in self._layer_sets.values()}
        layers = [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Labels) and id(layer) not in own
        ]
        return [(_NEW_LAYER, _NEW_LAYER), *layers]

    def _model_choice_list(self, _widget=None) -> list[tuple[str, str]]:
        return [(label, key) for key, label in {**model_choices(), **self._extra_models}.items()]

    def _on_layers_changed(self, event=None) -> None:
        self.reset_choices()
        if self._image is not None and self._image not in self._viewer.layers:
            self._on_image_changed(self._image_combo.value)

    # ------------------------------------------------------------------ model
    def model_request(self) -> ModelChoice:
        """The model, checkpoint and device currently chosen in the widget."""
        checkpoint = str(self._checkpoint.value) if self._model_combo.value in ("checkpoint", "distilled") else ""
        if checkpoint in (".", ""):
            checkpoint = ""
        return ModelChoice(self._model_combo.value, checkpoint, self._device_combo.value)

    def _update_checkpoint_visibility(self) -> None:
        self._checkpoint.visible = self._model_combo.value in ("checkpoint", "distilled")

    def _on_model_choice_changed(self, _value=None) -> None:
        self._update_checkpoint_visibility()
        request = self.model_request()
        if request.model in model_choices():  # dev-only test models are not persisted otherwise
            save_settings(WidgetSettings(request.model, request.checkpoint, request.device))
        if self._sam_request is not None and request != self._sam_request:
            self._model_status.value = f"model: {self._sam_request.describe()} (choice changed: Load model to switch)"

    def use_model(self, model: str, checkpoint: str = "", *, load: bool = True) -> Task | None:
        """Choose ``model`` (a key of the model list) and its ``checkpoint`` file, and load it.

        Called, for instance, by the distillation panel when a distilled model is ready. The
        choice is remembered like a choice made in the widget.
        """
        choices = {key for _label, key in self._model_choice_list()}
        if model not in choices:
            raise ValueError(f"unknown model {model!r}: choose one of {sorted(choices)}")
        self._model_combo.value = model
        if checkpoint:
            self._checkpoint.value = checkpoint
        return self.load_model() if load else None

    def enable_dev_models(self) -> None:
        """Offer the tiny random ``vit_t_test`` model (also shown when NAPARI_MOBILESAM_DEV=1)."""
        from .settings import DEV_MODEL_CHOICES

        self._extra_models.update(DEV_MODEL_CHOICES)
        self._model_combo.reset_choices()

    def load_model(self, request: ModelChoice | None = None) -> Task | None:
        """Load the chosen model in a worker; the preview refreshes when it is ready."""
        request = request or self.model_request()
        if self._model_task is not None and not self._model_task.done:
            return self._model_task
        self._model_status.value = f"model: loading {request.describe()}…"
        self._model_task = start_task(
            lambda report, cancelled: request.load(),
            description=f"MobileSAM: loading {request.describe()}",
            on_result=lambda sam: self.set_model(sam, request),
            on_error=lambda exc: self._on_model_error(exc, request),
        )
        return self._model_task

    def _on_model_error(self, exc: BaseException, request: ModelChoice) -> None:
        self._model_status.value = f"model: failed to load {request.describe()}"
        self._report(exc, f"loading {request.describe()}")

    def set_model(self, sam, request: ModelChoice | None = None) -> None:
        """Use an already loaded ``Sam`` (what the loader calls; tests pass ``vit_t_test`` here)."""
        self._sam = sam
        self._sam_request = request or ModelChoice(getattr(sam, "napari_mobilesam_info", {}).get("model", "custom"))
        self._model_status.value = f"model: {self._sam_request.describe()} ✓"
        self._new_session()

    def set_session(self, session: Session, description: str = "custom session") -> None:
        """Use a ready-made :class:`Session` for the current image (e.g. one with an oracle predictor)."""
        self._replace_session(session)
        self._sam_request = self._sam_request or ModelChoice("custom")
        self._model_status.value = f"model: {description} ✓"
        self._on_slice_settled()

    @property
    def session(self) -> Session | None:
        """The engine session of the current (model, image) pair, or None."""
        return self._session

    @property
    def busy(self) -> bool:
        """True while a model load, an embedding or a long task runs in the background."""
        tasks = (self._model_task, self._embed_task, self._long_task)
        return any(t is not None and not t.done for t in tasks)

    @property
    def status(self) -> str:
        """The text of the widget's status line."""
        return self._status.value

    def _new_session(self) -> None:
        if self._sam is None or self._image is None:
            self._replace_session(None)
            return
        try:
            data = pl._level0(self._image.data)
            session = Session(self._sam, data, rgb=bool(self._image.rgb))
        except Exception as exc:  # noqa: BLE001 - a bad image must not break the viewer
            self._replace_session(None)
            self._report(exc, f"preparing image {self._image.name!r}")
            return
        self._replace_session(session)
        self._on_slice_settled()

    def _replace_session(self, session: Session | None) -> None:
        if self._session is not None and self._session is not session:
            self._session.close()
        self._session = session
        self._embed_z = None

    # ------------------------------------------------------------------ image and prompt layers
    def _on_image_changed(self, image) -> None:
        if image is self._image and image is not None and self._points in self._viewer.layers:
            return
        self._clear_preview_state()
        self._image = None
        if image is None:
            self._replace_session(None)
            self._status.value = "Open or pick an image layer to segment."
            return
        try:
            geom = pl.image_geometry(image)
        except ValueError as exc:
            self._replace_session(None)
            self._report(exc, "choosing the image")
            return
        self._image = image
        self._z_from.max = self._z_to.max = geom.n_slices - 1
        self._z_to.value = geom.n_slices - 1
        for w in (self._limit_z, self._z_from, self._z_to, self._propagate_btn, self._propagate_label_btn):
            w.enabled = geom.is_stack
        self._ensure_prompt_layers()
        self._new_session()

    def _ensure_prompt_layers(self) -> None:
        """Use the current image's prompt, box and preview layers, creating any that is missing.

        Each image keeps its own set (switching images back and forth reuses them); a layer the
        user deleted is created again.
        """
        image = self._image
        if image is None:
            return
        layers = self._viewer.layers
        points, boxes, preview = self._layer_sets.get(id(image), (None, None, None))
        if preview is None or preview not in layers:
            preview = pl.make_preview_layer(image)
            layers.append(preview)
        if boxes is None or boxes not in layers:
            boxes = pl.make_boxes_layer(image)
            boxes.events.data.connect(self._on_prompts_changed)
            layers.append(boxes)
        if points is None or points not in layers:
            points = pl.make_points_layer(image)
            points.events.data.connect(self._on_prompts_changed)
            points.mouse_drag_callbacks.insert(0, self._on_points_press)
            layers.append(points)
            points.mode = "add"
            layers.selection.active = points
        points.feature_defaults["positive"] = not self._negative_default
        self._layer_sets[id(image)] = (points, boxes, preview)
        self._points, self._boxes, self._preview = points, boxes, preview
        self.reset_choices()

    @property
    def points_layer(self):
        """The Points layer holding the prompts (feature ``positive``)."""
        return self._points

    @property
    def boxes_layer(self):
        """The Shapes layer holding box prompts."""
        return self._boxes

    @property
    def preview_layer(self):
        """The one-slice Labels layer showing the current object(s)."""
        return self._preview

    @property
    def image_layer(self):
        return self._image

    def _on_points_press(self, layer, event) -> None:
        """Before the Points layer adds a clicked point: Shift/Ctrl make it negative."""
        modified = any(m in event.modifiers for m in ("Shift", "Control"))
        layer.feature_defaults["positive"] = bool(self._negative_default == modified)

    def toggle_sign(self) -> None:
        """Swap what plain and modified clicks add (positive <-> negative)."""
        self._negative_default = not self._negative_default
        if self._points is not None:
            self._points.feature_defaults["positive"] = not self._negative_default
        sign = "negative" if self._negative_default else "positive"
        self._status.value = f"Plain clicks now add {sign} points (N swaps back)."

    def _on_prompts_changed(self, event=None) -> None:
        action = str(getattr(event, "action", "")) if event is not None else ""
        if self._suspend_prompt_events or action.endswith("ing"):  # adding/removing/changing
            return
        if event is not None and getattr(event, "source", None) not in (self._points, self._boxes):
            return  # the prompts of another image
        self.update_preview()

    def _on_dims_changed(self, event=None) -> None:
        self._slice_timer.start()

    def current_z(self) -> int:
        """The image's slice shown in the viewer (0 for 2D images)."""
        if self._image is None:
            return 0
        return pl.current_slice(self._viewer, self._image)

    # ------------------------------------------------------------------ embedding and preview
    def _on_slice_settled(self) -> None:
        """The user stopped on a slice: refresh its preview and make sure it is embedded."""
        if self._session is None or self._image is None:
            return
        z = self.current_z()
        if self._preview_kind == "auto" and self._preview_z != z:
            self._clear_preview_state()
        if self._ensure_embedded(z):
            self._session.prefetch(self._neighbours(z))
        self.update_preview()
        self._show_live()

    def _ensure_embedded(self, z: int) -> bool:
        """True when slice z is ready; otherwise start (or queue) its embedding in a worker.

        Once a worker has embedded the slice, its neighbours are prefetched.
        """
        session = self._session
        if session is None:
            return False
        try:
            if session.is_embedded(z):
                return True
        except Exception as exc:  # noqa: BLE001
            self._report(exc, f"reading slice {z}")
            return False
        if self._embed_task is not None and not self._embed_task.done:
            self._embed_z = z  # picked up when the running embedding finishes
            return False
        self._embed_z = z
        self._embed_task = start_task(
            lambda report, cancelled: session.embed(z),
            description=f"MobileSAM: embedding slice {z}",
            on_result=lambda _r: self._on_embedded(session, z),
            on_error=lambda exc: self._report(exc, f"embedding slice {z}"),
        )
        self._status.value = f"Computing the embedding of slice {z}…"
        return False

    def _neighbours(self, z: int) -> list[int]:
        return [z + 1, z - 1, z + 2, z - 2]

    def _on_embedded(self, session: Session, z: int) -> None:
        if session is not self._session:
            return
        wanted = self.current_z()
        self._status.value = f"Slice {z} ready."
        if wanted != z and self._embed_z not in (None, z):
            self._embed_task = None
            self._ensure_embedded(wanted)
            return
        session.prefetch(self._neighbours(z))
        if wanted == z:
            self.update_preview()

    def update_preview(self) -> ObjectPrediction | None:
        """Predict the object from the current slice's prompts and show it (GUI thread, fast path).

        Returns the prediction, or None when there is nothing to show yet (no prompts, no model,
        or the slice's embedding is still being computed in the background).
        """
        if self._image is None or self._points is None:
            return None
        z = self.current_z()
        prompts = pl.slice_prompts(self._image, z, self._points, self._boxes)
        if prompts.empty:
            if self._preview_kind == "object":
                self._clear_preview_state()
            return None
        if not prompts.has_positive:
            self._clear_preview_state()
            self._status.value = "Add a positive point or a box: negative points alone select nothing."
            return None
        if self._session is None:
            if self._sam is None:
                self.load_model()
            return None
        if not self._ensure_embedded(z):
            return None
        try:
            pred = self._session.predict(z, prompts.points, prompts.labels, prompts.box)
        except Exception as exc:  # noqa: BLE001
            self._report(exc, f"predicting on slice {z}")
            return None
        self._prediction = pred
        self._set_preview(z, pred.mask.astype(np.uint32), "object")
        self._status.value = (
            f"Slice {z}: object of {int(pred.mask.sum())} px, predicted IoU {pred.score:.2f}. "
            "C commits, Shift-S propagates."
        )
        return pred

    def _set_preview(self, z: int, labels: np.ndarray | None, kind: str | None) -> None:
        self._preview_z = None if labels is None else z
        self._preview_labels = labels
        self._preview_kind = None if labels is None else kind
        if self._preview is not None and self._image is not None:
            pl.show_preview(self._preview, self._image, z, labels)

    def _clear_preview_state(self) -> None:
        self._prediction = None
        self._set_preview(self._preview_z or 0, None, None)

    # ------------------------------------------------------------------ target, commit, clear
    def target_layer(self, create: bool = True) -> Labels | None:
        """The Labels layer commits go into (created with the image's shape when asked for)."""
        choice = self._target_combo.value
        if isinstance(choice, Labels) and choice in self._viewer.layers:
            pl.check_target_layer(choice, self._image)
            return choice
        if not create or self._image is None:
            return None
        target = self._created_targets.get(id(self._image))
        if target is None or target not in self._viewer.layers:
            target = pl.make_target_layer(self._image)
            self._viewer.layers.insert(self._viewer.layers.index(self._image) + 1, target)
            self._created_targets[id(self._image)] = target
        self.reset_choices()
        self._target_combo.value = target
        return target

    def commit(self) -> list[int]:
        """Write the previewed object(s) into the target layer (one undo step); returns the ids."""
        if self._image is None:
            show_warning("No image layer: open an image first.")
            return []
        if self._preview_labels is None or not self._preview_labels.any():
            show_info("Nothing to commit: click on an object first (or segment the slice automatically).")
            return []
        z = self._preview_z or 0
        try:
            target = self.target_layer(create=True)
            ids = pl.write_slice_labels(target, z, self._preview_labels, keep_existing=self._keep_existing.value)
        except Exception as exc:  # noqa: BLE001
            self._report(exc, "committing")
            return []
        self._remove_prompts(z)
        self._clear_preview_state()
        if ids:
            target.selected_label = ids[-1]
        what = f"object {ids[0]}" if len(ids) == 1 else f"{len(ids)} objects"
        self._status.value = f"Committed {what} on slice {z} into {target.name!r} (Ctrl-Z on that layer undoes)."
        return ids

    def clear_prompts(self) -> None:
        """Drop the prompts of the current slice (every prompt of a 2D image) and the preview."""
        if self._image is None:
            return
        self._remove_prompts(self.current_z())
        self._clear_preview_state()
        self._status.value = "Prompts cleared."

    def _remove_prompts(self, z: int) -> None:
        """Delete the points and boxes lying on slice z, without recomputing the preview."""
        self._suspend_prompt_events = True
        try:
            pl.remove_slice_prompts(self._image, z, self._points, self._boxes)
        finally:
            self._suspend_prompt_events = False

    # ------------------------------------------------------------------ keys
    def _bind_keys(self) -> None:
        actions = {
            "commit": lambda viewer: self.commit(),
            "clear": lambda viewer: self.clear_prompts(),
            "toggle_sign": lambda viewer: self.toggle_sign(),
            "propagate": lambda viewer: self.propagate(),
        }
        self._key_funcs = {key: actions[action] for key, action in KEYS.items()}
        for key, func in self._key_funcs.items():
            self._viewer.bind_key(key, func, overwrite=True)

    def _on_destroyed(self, *_) -> None:
        """The dock widget is gone: release the viewer (keys, events) and background work."""
        from napari.utils.key_bindings import coerce_keybinding

        viewer = self._viewer
        for key, func in getattr(self, "_key_funcs", {}).items():
            if viewer.keymap.get(coerce_keybinding(key)) is func:  # not rebound by another widget
                viewer.bind_key(key, None)
        viewer.layers.events.inserted.disconnect(self._on_layers_changed)
        viewer.layers.events.removed.disconnect(self._on_layers_changed)
        viewer.dims.events.current_step.disconnect(self._on_dims_changed)
        self._slice_timer.stop()
        for task in (self._embed_task, self._long_task):
            if task is not None and not task.done:
                task.cancel()
        self._replace_session(None)

    # ------------------------------------------------------------------ messages
    def _info(self, message: str) -> None:
        show_info(message)

    def _warn(self, message: str) -> None:
        show_warning(message)

    def _report(self, exc: BaseException, doing: str) -> None:
        """Show an error as a napari notification and in the status line (never raise)."""
        message = _error_message(exc, doing)
        log.debug("napari-mobilesam: %s", message, exc_info=exc)
        self._status.value = message
        show_error(message)
