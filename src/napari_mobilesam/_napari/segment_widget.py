"""The interactive dock widget: click on objects, see the mask at once, propagate, commit.

Workflow (see ``docs/usage.md``):

1. pick the image layer, the model and the device (remembered between napari sessions);
2. click in the image: a plain click adds a positive point (green), Shift- or Ctrl-click a
   negative one (red); ``N`` swaps the two. Draw rectangles in the boxes layer for box prompts;
3. the preview layer (one colour, magenta) shows the object after every prompt change. The model
   never runs on the GUI thread: the decoder answers in its own thread, newest prompts first
   (tens of ms once the slice is embedded); the embedding is computed in a background worker
   first, and the slice's neighbours are prefetched;
4. ``C`` / Commit writes the object into the target Labels layer under the next free id (one undo
   step), and the prompts layer is ready for the next object; ``Shift-C`` / Clear drops the prompts
   of the slice; *Refine selected label* corrects a committed label on one slice, and
   *Re-propagate* (``Shift-R``) follows it again from there, keeping the
   slices corrected by hand (:mod:`.repropagate_action`);
5. ``Shift-S`` / Propagate follows the object through the stack in a worker (progress and cancel in
   the activity dock and in the widget; Stop ends it early and keeps the slices done) and writes the
   result as one undo step. Without prompts it propagates every object committed on the slice;
   *Propagate labels* extends labels of a Labels layer (the selected one, a set, or all);
6. *Segment this slice / stack automatically* finds every object without prompts: AIS with a
   micro-sam model's decoder, or the SAM point grid (:mod:`.auto_panel`, :mod:`.auto_actions`).

The engine is reached through :class:`~napari_mobilesam.core.session.Session` (preview) and
:func:`~napari_mobilesam.volume.propagation.propagate` (through :mod:`.long_tasks`); prompts are the
engine's types (:mod:`.prompt_layers` converts the layers through :mod:`napari_mobilesam.io.prompts`).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from ..core.session import Session
from ..io.autosave import autosave_folder
from ..models.choice import ModelChoice
from . import gc_freeze, gil_share, retire
from . import prompt_layers as pl
from .annotator import Annotator
from .autosave_action import Autosaver
from .controls import (
    NEW_LAYER,
    NO_CHANNEL,
    CloseWatcher,
    DockContainer,
    SegmentControls,
    error_message,
    hint_text,
)
from .helper_layers import HelperLayers
from .model_panel import ModelPanel
from .settings import load_settings
from .workers import Task

if TYPE_CHECKING:
    import napari

__all__ = ["SegmentWidget", "KEYS", "HINT"]

log = logging.getLogger(__name__)

#: Key -> action, bound on the viewer while the widget lives.
KEYS: dict[str, str] = {"C": "commit", "Shift-C": "clear", "N": "toggle_sign", "Shift-S": "propagate",
                        "Shift-R": "repropagate"}

HINT = hint_text()
_DEBOUNCE_MS = 120


class SegmentWidget(DockContainer):
    """MobileSAM interactive segmentation dock widget.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose layers the widget uses (napari passes it when opening the widget).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self._init_state()
        self._build_controls()
        self._start_watching()
        self._on_image_changed(self._image_combo.value)
        gil_share.hold(self)  # worker threads running Python hand the GIL back to the GUI sooner

    # ------------------------------------------------------------------ construction steps
    def _init_state(self) -> None:
        self._helpers = HelperLayers(self._viewer.layers, self._on_prompts_changed, self._on_points_press)
        self._negative_default = False
        self._closed = False
        self._picking = False  # an image pick in progress (the channel choices are reset)
        self._note = ""  # the status line's text below the running task's line
        self._annotator: Annotator | None = None
        self._batch_depth = 0  # napari's batched layer-list updates in progress (not ours)
        self._batch_missed = False  # a layer change came in one: answered once at its end

    def _build_controls(self) -> None:
        settings = load_settings()
        self._model = ModelPanel(settings, self.set_model, self._model_failed)
        self._c = c = SegmentControls(self._image_choices, self._target_choices, self._channel_choices)
        c.autosave.value = settings.autosave
        c.autosave_folder.value = settings.autosave_folder or autosave_folder()  # shown as a real folder
        self.extend(c.layout(self._model.widgets))
        self.end_layout()
        # the names the tests and the distillation panel use
        self._image_combo, self._target_combo, self._hint, self._status = c.image, c.target, c.hint, c.status
        self._model_combo, self._checkpoint = self._model.combo, self._model.checkpoint
        self._device_combo, self._model_status = self._model.device, self._model.status
        self._keep_existing, self._commit_btn, self._clear_btn = c.keep_existing, c.commit, c.clear
        self._limit_z, self._z_from, self._z_to = c.limit, c.z_from, c.z_to
        self._propagate_btn, self._propagate_label_btn = c.propagate, c.propagate_labels
        self._auto_btn, self._stop_btn, self._cancel_btn = c.auto, c.stop, c.cancel
        self._auto_stack_btn, self._auto_panel, self._decoder = c.auto_stack, c.automatic, self._model.decoder
        say = SimpleNamespace(status=self._show_status, info=self._info, warn=self._warn,
                              report=self._report, reset_choices=self.reset_choices)
        self._annotator = Annotator(self._viewer, self._helpers, c, self._model, say)
        self._autosaver = Autosaver(c, self._viewer, say, on_restored=self._annotator._select_prompts)
        self._slice_timer = QTimer(self.native)
        self._slice_timer.setSingleShot(True)
        self._slice_timer.setInterval(_DEBOUNCE_MS)
        self._slice_timer.timeout.connect(self._on_slice_settled)
        self._restore_timer = QTimer(self.native)
        self._restore_timer.setSingleShot(True)
        self._restore_timer.setInterval(0)
        self._restore_timer.timeout.connect(self._restore_helpers)

    def _start_watching(self) -> None:
        c = self._c
        c.image.changed.connect(self._on_image_changed)
        c.channel2.changed.connect(self._on_channels_changed)
        c.channel3.changed.connect(self._on_channels_changed)
        c.target.changed.connect(self._follow_target)
        for button, action in (
            (c.commit, self.commit), (c.clear, self.clear_prompts), (c.refine, self.refine_selected_label),
            (c.repropagate, self.repropagate_selected_label),
            (c.propagate, self.propagate), (c.propagate_labels, self.propagate_labels),
            (c.auto, self.segment_slice_automatically), (c.auto_stack, self.segment_stack_automatically),
            (c.cancel, self.cancel), (c.stop, self.stop),
        ):
            button.changed.connect(lambda *_, act=action: act())
        self._viewer.layers.events.inserted.connect(self._on_layers_changed)
        self._viewer.layers.events.removed.connect(self._on_layers_changed)
        self._viewer.layers.events.begin_batch.connect(self._on_batch_begin)
        self._viewer.layers.events.end_batch.connect(self._on_batch_end)
        self._viewer.dims.events.current_step.connect(self._on_dims_changed)
        self._bind_keys()
        self._close_watcher = CloseWatcher(self.close_widget)
        self.native.installEventFilter(self._close_watcher)
        self.native.destroyed.connect(lambda *_: self.close_widget())

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _widget=None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _channel_choices(self, _widget=None) -> list[tuple[str, Any]]:
        """Image layers that can join the image as further channels: not RGB, same spatial shape."""
        image = self._image
        choices: list[tuple[str, Any]] = [(NO_CHANNEL, NO_CHANNEL)]
        if image is None or image.rgb:
            return choices
        try:
            shape = pl.image_geometry(image).shape
        except ValueError:
            return choices
        for layer in self._viewer.layers:
            if isinstance(layer, Image) and layer is not image and not layer.rgb:
                try:
                    if pl.image_geometry(layer).shape == shape:
                        choices.append((layer.name, layer))
                except ValueError:
                    continue
        return choices

    def channel_layers(self) -> list:
        """The image layers chosen as further channels (none, one or two), in order."""
        found = []
        for combo in (self._c.channel2, self._c.channel3):
            layer = combo.value
            if isinstance(layer, Image) and layer in self._viewer.layers and layer is not self._image \
                    and layer not in found:
                found.append(layer)
        return found

    def _on_channels_changed(self, _value=None) -> None:
        if self._closed or self._picking or self._image is None:
            return
        self._new_session()
        extra = self.channel_layers()
        names = " + ".join(repr(layer.name) for layer in [self._image, *extra])
        self._show_status(f"The model sees {names} as {'red, green' if len(extra) == 1 else 'red, green, blue'}."
                          if extra else f"The model sees {self._image.name!r} alone.")

    def _target_choices(self, _widget=None) -> list[tuple[str, Any]]:
        layers = [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Labels) and not self._helpers.owns(layer)
        ]
        return [(NEW_LAYER, NEW_LAYER), *layers]

    def _on_layers_changed(self, event=None) -> None:
        removed = getattr(event, "value", None) if getattr(event, "type", "") == "removed" else None
        if removed is not None:
            gc_freeze.collect_when_gone(removed)  # its data must not stay frozen
        if self._closed or self._helpers.changing:
            return
        if removed is not None:
            self._helpers.forget_layer(removed)
        if self._batch_depth:
            self._batch_missed = True
            return
        self.reset_choices()
        self._helpers.forget_deleted_images()
        if self._image is not None and self._image not in self._viewer.layers:
            self._on_image_changed(self._image_combo.value)
        elif self._helpers.current is not None:
            self._restore_timer.start()  # after the removal: not while napari clears the list

    def _on_batch_begin(self, _event=None) -> None:
        if not self._helpers.batching:
            self._batch_depth += 1

    def _on_batch_end(self, _event=None) -> None:
        """napari removed (or inserted) several layers in one batch (the viewer closing, the
        delete-layers button): the widget answers once, at its end, not once per layer (choosing
        and showing the next image's helpers while the viewer takes every layer out)."""
        if self._helpers.batching or not self._batch_depth:
            return
        self._batch_depth -= 1
        if not self._batch_depth and self._batch_missed:
            self._batch_missed = False
            self._on_layers_changed()

    def reset_choices(self, *args) -> None:
        """Refresh the image and labels choices (napari calls it at every layer change; within
        a batched layer-list update, once at its end)."""
        if getattr(self, "_batch_depth", 0):
            self._batch_missed = True
            return
        super().reset_choices(*args)

    def _restore_helpers(self) -> None:
        """Create again a helper layer the user deleted (unless the image went too)."""
        if self._closed or self._image is None or self._image not in self._viewer.layers:
            return
        if self._helpers.restore_missing():
            self._annotator._select_prompts()
        elif self._image is None and self._image_combo.value is not None:
            self._on_image_changed(self._image_combo.value)

    # ------------------------------------------------------------------ model
    def model_request(self) -> ModelChoice:
        """The model, checkpoint and device currently chosen in the widget."""
        return self._model.choice()

    def use_model(self, model: str, checkpoint: str = "", *, decoder: str = "", load: bool = True) -> Task | None:
        """Choose ``model`` (a key of the model list) and its ``checkpoint`` file (and, for
        ``"microsam_file"``, a separate ``decoder`` file), and load it.

        Called, for instance, by the distillation panel when a distilled model is ready. The
        choice is remembered like a choice made in the widget.
        """
        choices = {key for _label, key in self._model._choices()}
        if model not in choices:
            raise ValueError(f"unknown model {model!r}: choose one of {sorted(choices)}")
        self._model.combo.value = model
        if checkpoint:
            self._model.checkpoint.value = checkpoint
        if decoder:
            self._model.decoder.value = decoder
        return self.load_model() if load else None

    def enable_dev_models(self) -> None:
        """Offer the tiny random ``vit_t_test`` model (also shown when NAPARI_MOBILESAM_DEV=1)."""
        self._model.enable_dev_models()

    def load_model(self, request: ModelChoice | None = None) -> Task | None:
        """Load the chosen model in a worker (retrying a failed one); the preview then refreshes."""
        return self._model.load(request, retry=True)

    def _model_failed(self, message: str) -> None:
        self._show_status(message)
        show_error(message)

    def set_model(self, sam, request: ModelChoice | None = None) -> None:
        """Use an already loaded ``Sam`` (what the loader calls; tests pass ``vit_t_test`` here)."""
        request = request or ModelChoice(getattr(sam, "napari_mobilesam_info", {}).get("model", "custom"))
        old = self._model.sam
        self._model.set_loaded(sam, request)
        self._c.automatic.set_has_decoder(self._model.has_decoder)
        self._new_session()
        gone = None
        if old is not None and old is not sam:
            # freed on a background thread: OpenVINO's destructors take ~100 ms (GIL released)
            gone = retire.retire(old, "replaced model")
        if self._closed:
            return
        # the heavy imports and the model are in: full collections skip them from now on
        gc_freeze.hold(self)
        if gone is not None:  # a replaced model must not stay frozen (unless the thread freed it)
            gc_freeze.collect_when_gone(old, after_ms=1000, wait_while=gone.busy)
        del old
        gc_freeze.freeze()

    def set_session(self, session: Session, description: str = "custom session") -> None:
        """Use a ready-made :class:`Session` for the current image (e.g. one with an oracle predictor)."""
        self._annotator.use(self._image, session)
        self._c.automatic.set_has_decoder(session.has_ais)
        self._model.request = self._model.request or ModelChoice("custom")
        self._model.status.value = f"model: {description} ✓"
        self._on_slice_settled()

    @property
    def session(self) -> Session | None:
        """The engine session of the current (model, image) pair, or None."""
        return self._annotator.session

    @property
    def busy(self) -> bool:
        """True while a model load, an embedding or a long task runs in the background."""
        return self._model.loading or self._annotator.busy

    @property
    def status(self) -> str:
        """The text of the widget's status line."""
        return self._status.value

    def _new_session(self) -> None:
        image = self._image
        if self._model.sam is None or image is None:
            self._annotator.use(image, None)
            return
        try:
            session = Session(self._model.sam, self._session_input(image), rgb=bool(image.rgb))
        except Exception as exc:  # noqa: BLE001 - a bad image must not break the viewer
            self._annotator.use(image, None)
            self._report(exc, f"preparing image {image.name!r}")
            return
        self._annotator.use(image, session)
        self._on_slice_settled()

    def _session_input(self, image):
        """The image's data, or, with further channels chosen, a lazy multichannel source of them
        (channels last, each scaled to its own range; slices are read as the model needs them)."""
        extra = self.channel_layers()
        if not extra:
            return pl._level0(image.data)
        import dask.array as da

        from ..core.source import SliceSource

        planes = [da.asarray(pl._level0(layer.data)) for layer in [image, *extra]]  # numpy, zarr or dask
        return SliceSource(da.stack(planes, axis=-1), channel_axis=-1, normalize="auto")

    # ------------------------------------------------------------------ image and helper layers
    def _on_image_changed(self, image) -> None:
        if self._closed or (image is self._image and image is not None and self._points in self._viewer.layers):
            return
        self._annotator.use(None, None)
        if image is None:
            self._autosaver.follow(None, None)
            self._helpers.show(None)
            self._show_status("Open or pick an image layer to segment.")
            return
        try:
            geom = pl.image_geometry(image)
        except ValueError as exc:
            self._autosaver.follow(None, None)
            self._helpers.show(None)
            self._report(exc, "choosing the image")
            return
        self._annotator.use(image, None)
        self._picking = True  # another image: no further channels (they were the last image's)
        try:
            self._c.channel2.reset_choices()
            self._c.channel3.reset_choices()
            self._c.channel2.value = self._c.channel3.value = NO_CHANNEL
        finally:
            self._picking = False
        self._z_from.max = self._z_to.max = geom.n_slices - 1
        self._z_to.value = geom.n_slices - 1
        self._c.enable_stack(geom.is_stack)
        self._c.name_axis(pl.axis_name(image) if geom.is_stack else "z")
        made = self._annotator.choose_target_for_pick()
        self._helpers.show(image, target=made)
        self._helpers.current.points.feature_defaults["positive"] = not self._negative_default
        self._annotator._select_prompts()
        self.reset_choices()
        made_layer = self._helpers.target_of(image) if made else None
        if made_layer is not None and made_layer in self._viewer.layers:  # (None if making it failed)
            self._c.target.value = made_layer
        self._show_status(f"Image {image.name!r}: click on an object.")
        self._follow_target()
        self._autosaver.show_offer()  # its note (labels autosaved earlier) replaces the line above
        self._new_session()

    def _follow_target(self, _value=None) -> None:
        """The autosave follows the layer the widget writes into (the one picked in 'labels',
        else the one made for the image)."""
        if self._closed:
            return
        image, choice = self._image, self._c.target.value
        layer = choice if isinstance(choice, Labels) else None
        if layer is None and image is not None:
            layer = self._helpers.target_of(image)
        self._autosaver.follow(image, layer)

    @property
    def _image(self):
        return None if self._annotator is None else self._annotator.image

    _points = property(lambda self: self._annotator._points)
    _boxes = property(lambda self: self._annotator._boxes)
    _preview = property(lambda self: self._annotator._preview)

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
        self._show_status(f"Plain clicks now add {sign} points (N swaps back).")

    def _on_prompts_changed(self, event=None) -> None:
        action = str(getattr(event, "action", "")) if event is not None else ""
        if self._closed or self._annotator._suspend_prompt_events or action.endswith("ing"):  # adding/removing
            return
        if event is not None and getattr(event, "source", None) not in (self._points, self._boxes):
            return  # the prompts of another image
        self.update_preview()

    def _on_dims_changed(self, event=None) -> None:
        if not self._closed:
            self._slice_timer.start()

    def current_z(self) -> int:
        """The image's slice shown in the viewer (0 for 2D images)."""
        return self._annotator.current_z()

    # ------------------------------------------------------------------ actions (see Annotator)
    def _on_slice_settled(self) -> None:
        if not self._closed:
            self._annotator.on_slice_settled()

    def update_preview(self) -> bool:
        """Ask for the object of the current slice's prompts (shown when decoded, in the preview
        thread); True when a decoding was asked for. See :meth:`Annotator.update_preview`."""
        return self._annotator.update_preview()

    def commit(self) -> list[int]:
        """Write the previewed object(s) into the target layer (one undo step); returns the ids."""
        return self._annotator.commit()

    def clear_prompts(self) -> None:
        """Drop the prompts of the current slice, the preview and a refinement."""
        self._annotator.clear_prompts()

    def refine_selected_label(self) -> bool:
        """Correct the target layer's selected label on the slice in view (C replaces it there)."""
        return self._annotator.refine_selected_label()

    def repropagate_selected_label(self) -> Task | None:
        """Propagate the selected label again from the slice in view, keeping the slices corrected
        by hand (see :mod:`.repropagate_action`)."""
        return self._annotator.repropagate_selected_label()

    def target_layer(self, create: bool = True) -> Labels | None:
        """The Labels layer commits go into (created with the image's shape when asked for)."""
        return self._annotator.target_layer(create)

    def propagate(self) -> Task | None:
        """Follow the prompted object through the stack, or every object committed on the slice."""
        return self._annotator.propagate()

    def propagate_selected_label(self) -> Task | None:
        """Extend the target layer's selected label through the stack."""
        return self._annotator.propagate_labels("selected label")

    def propagate_labels(self, scope: str | None = None) -> Task | None:
        """Extend labels of the target layer (``scope``: see :meth:`Annotator.propagate_labels`)."""
        return self._annotator.propagate_labels(scope)

    def segment_slice_automatically(self) -> Task | None:
        """Find every object of the current slice (worker; AIS or the point grid, as chosen) and
        show their outlines in the preview."""
        return self._annotator.segment_slice_automatically()

    def segment_stack_automatically(self) -> Task | None:
        """Segment every slice (or the limited range) automatically in a worker, one id per object
        through the stack, written as one undo step."""
        return self._annotator.segment_stack_automatically()

    def cancel(self) -> None:
        """Cancel the running propagation / automatic segmentation (nothing is written)."""
        self._annotator.cancel()

    def stop(self) -> None:
        """End the running propagation early and write the slices it has done (one undo step)."""
        self._annotator.stop()

    @property
    def last_propagation(self):
        """The engine's PropagationResult of the last propagation written."""
        return self._annotator.last_propagation

    # what the preview shows (read by tests and benchmarks/interaction.py)
    _preview_kind = property(lambda self: self._annotator._preview_kind)
    _preview_z = property(lambda self: self._annotator._preview_z)
    _prediction = property(lambda self: self._annotator._prediction)

    @property
    def preview_labels(self):
        """(H, W) uint32: the objects the preview holds (what C commits; None: nothing). The
        preview layer draws an automatic result as these objects' outlines."""
        return self._annotator._preview_labels

    # ------------------------------------------------------------------ keys and closing
    def _bind_keys(self) -> None:
        actions = {
            "commit": lambda viewer: self.commit(),
            "clear": lambda viewer: self.clear_prompts(),
            "toggle_sign": lambda viewer: self.toggle_sign(),
            "propagate": lambda viewer: self.propagate(),
            "repropagate": lambda viewer: self.repropagate_selected_label(),
        }
        self._key_funcs = {key: actions[action] for key, action in KEYS.items()}
        for key, func in self._key_funcs.items():
            self._viewer.bind_key(key, func, overwrite=True)

    def close_widget(self) -> None:
        """Release the viewer: unbind the keys, drop viewer events, cancel background work.

        Called when the dock is closed (its × button), when the widget is deleted and when the
        viewer closes. Nothing a running task computes is written afterwards. Safe to call twice
        and while Qt is tearing the window down, or after Python's collector has cleared a
        widget that was never shown or closed (its Qt object's ``destroyed`` comes last).
        """
        if self.__dict__.get("_closed", True):  # closed, or already torn down
            return
        self._closed = True
        steps = (self._autosaver.close, self._unbind_keys, self._disconnect_viewer, self._slice_timer.stop,
                 self._restore_timer.stop, self._stop_background, self._drop_preview_layer,
                 lambda: gc_freeze.release(self), lambda: gil_share.release(self))
        for step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - PyQt aborts on an exception leaving a slot
                log.debug("napari-mobilesam: closing step %s failed", step, exc_info=True)

    def _unbind_keys(self) -> None:
        from napari.utils.key_bindings import coerce_keybinding

        for key, func in getattr(self, "_key_funcs", {}).items():
            if self._viewer.keymap.get(coerce_keybinding(key)) is func:  # not rebound by another widget
                self._viewer.bind_key(key, None)

    def _disconnect_viewer(self) -> None:
        self._viewer.layers.events.inserted.disconnect(self._on_layers_changed)
        self._viewer.layers.events.removed.disconnect(self._on_layers_changed)
        self._viewer.layers.events.begin_batch.disconnect(self._on_batch_begin)
        self._viewer.layers.events.end_batch.disconnect(self._on_batch_end)
        self._viewer.dims.events.current_step.disconnect(self._on_dims_changed)

    def _stop_background(self) -> None:
        self._model.closed = True
        self._annotator.close()

    def _drop_preview_layer(self) -> None:
        preview = self._preview
        if preview is not None and preview in self._viewer.layers:
            self._helpers.changing = True
            self._viewer.layers.remove(preview)

    # ------------------------------------------------------------------ messages
    def _show_status(self, text: str | None) -> None:
        """Show ``text`` in the status line (None: the last text again), under the running task's
        line while one runs."""
        if self._closed:
            return
        self._note = self._note if text is None else text
        runner = None if self._annotator is None else self._annotator._runner
        busy = runner is not None and runner.running and runner.doing
        head = f"{runner.doing[0].upper()}{runner.doing[1:]}…" if busy else ""
        self._status.value = "\n".join(t for t in dict.fromkeys((head, self._note)) if t)

    def _info(self, message: str) -> None:
        self._show_status(message)
        show_info(message)

    def _warn(self, message: str) -> None:
        self._show_status(message)
        show_warning(message)

    def _report(self, exc: BaseException, doing: str) -> None:
        """Show an error as a napari notification and in the status line (never raise)."""
        message = error_message(exc, doing)
        log.debug("napari-mobilesam: %s", message, exc_info=exc)
        self._show_status(message)
        show_error(message)
