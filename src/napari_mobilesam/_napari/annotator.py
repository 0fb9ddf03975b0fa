"""What the Segment widget does with the layers: preview, commit, refine, propagate, segment a slice.

:class:`Annotator` holds that state explicitly (the image and its engine session, what the preview
shows, the label being refined, the last propagation) and owns the two background helpers: the
:class:`~.embedder.SliceEmbedder` (embedding the slice in view) and the
:class:`~.long_tasks.LongTaskRunner` (propagation and automatic segmentation). The widget
(:mod:`.segment_widget`) builds the controls, follows the viewer and forwards its actions here;
messages go back through the ``say`` callbacks. Coordinates: image data ``(z, row, col)``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from napari.layers import Labels

from ..core.session import ObjectPrediction
from . import gc_freeze
from . import prompt_layers as pl
from .auto_actions import AutomaticActions
from .embedder import SliceEmbedder, prompt_key
from .long_tasks import LongTaskRunner
from .preview_decoder import DecodeAnswer, DecodeRequest, PreviewDecoder
from .propagate_actions import PropagateActions
from .repropagate_action import HandEdits, RepropagateActions

MADE_AT_PICK_MAX_VOXELS = 2**28  # the image's labels layer is made at the pick up to 1 GiB (uint32)

__all__ = ["Annotator"]


class Annotator(PropagateActions, AutomaticActions, RepropagateActions):
    """Preview, commit, refinement and long tasks for the image being segmented.

    Parameters
    ----------
    viewer : napari Viewer
    helpers : HelperLayers
        The image's prompts, boxes and preview layers.
    controls : SegmentControls
    model : ModelPanel
    say : namespace of callables
        ``status(text)``, ``info(text)``, ``warn(text)``, ``report(exc, doing)``, ``reset_choices()``.
    """

    def __init__(self, viewer, helpers, controls, model, say: SimpleNamespace):
        self._viewer, self._helpers, self._c, self._model, self._say = viewer, helpers, controls, model, say
        self.image = None
        self.session = None
        self.closed = False
        self._suspend_prompt_events = False
        self._refining: tuple[Labels, int] | None = None  # (layer, label) being corrected
        self._preview_z: int | None = None
        self._preview_labels = None  # (H, W) uint32 of what the preview shows
        self._preview_kind: str | None = None  # "object" | "auto" | "live"
        self._prediction: ObjectPrediction | None = None
        self._gen = 0  # the preview's generation: bumped whenever what it should show changes
        self._awaiting: int | None = None  # the generation being decoded for the current prompts
        self._asked_key = self._shown_key = None  # (session, image, prompt key) on its way / shown
        self._commit_on_answer = False  # C was pressed while the current prompts were decoded
        self._decoder = PreviewDecoder(self._on_answer)
        self.last_propagation = None  # the engine's PropagationResult of the last propagation
        self._writing = False  # a large result is being written over several event-loop turns
        self._runner = LongTaskRunner(
            controls.cancel, controls.stop, on_status=say.status, on_error=say.report,
            on_live=self._on_progress, on_live_end=self._live_ended,
        )
        self._embedder = SliceEmbedder(self.current_z, lambda z: self.update_preview(), say.status, say.report)
        self.hand_edits = HandEdits(viewer.layers, helpers.owns)  # slices corrected by hand

    @property
    def _points(self):
        return None if self._helpers.current is None else self._helpers.current.points

    @property
    def _boxes(self):
        return None if self._helpers.current is None else self._helpers.current.boxes

    @property
    def _preview(self):
        return None if self._helpers.current is None else self._helpers.current.preview

    def current_z(self) -> int:
        """The image's slice shown in the viewer (0 for 2D images)."""
        return 0 if self.image is None else pl.current_slice(self._viewer, self.image)

    def use(self, image, session) -> None:
        """Work on ``image`` with ``session`` (either may be None); drops the preview and a refinement."""
        if image is not self.image:
            self._clear_preview_state()
            self._refining = None
        if image is not self.image or session is not self.session:
            self._new_generation()
            self._commit_on_answer = False
        if self.session is not None and self.session is not session:
            self.session.close(wait=False)  # a running prefetch must not hold the GUI
            # its embeddings must not stay frozen; not while its prefetch (a thread holding the
            # cache, which holds the model) is still computing a slice
            cache = getattr(self.session, "cache", None)  # None for a session without one (an oracle's)
            gc_freeze.collect_when_gone(self.session, after_ms=1000,
                                        wait_while=None if cache is None else cache.busy)
        self.image, self.session = image, session
        self._embedder.use(session)

    def _select_prompts(self) -> None:
        """Make the prompts layer the active one, in add mode: the next click adds a point."""
        points = self._points
        if points is None or points not in self._viewer.layers:
            return
        self._viewer.layers.selection.active = points
        if points.mode == "add":
            # napari makes new layer controls (a layer put back in the list) with the pan/zoom
            # button checked whatever the layer's mode: say the mode again so that they show it
            points.events.mode(mode=points.mode)
        else:
            points.mode = "add"

    @property
    def busy(self) -> bool:
        if self._decoder.busy or self._writing:
            return True
        return any(t is not None and not t.done for t in (self._embedder.task, self._runner.task))

    def close(self) -> None:
        """Cancel background work; no callback reaches the layers afterwards."""
        self.closed = True
        self._decoder.close()
        self._runner.close()
        self.hand_edits.close()
        self._embedder.close()
        if self.session is not None:
            self.session.close(wait=False)  # a running prefetch must not hold the GUI
        self.session = None

    # ------------------------------------------------------------------ preview
    def on_slice_settled(self) -> None:
        """The user stopped on a slice: refresh its preview and make sure it is embedded."""
        if self.closed or self.session is None or self.image is None:
            return
        z = self.current_z()
        if self._preview_kind == "auto" and self._preview_z != z:
            self._clear_preview_state()
        if self._embedder.ready(z):
            self.session.prefetch(self._embedder.neighbours(z))
        self.update_preview()
        self._show_live()

    def _slice_prompt(self, z: int):
        """The engine's Prompt of slice z from the prompt layers (None: no prompt there)."""
        return pl.slice_prompt(pl.layer_prompts(self.image, self._points, self._boxes), z)

    def _refine_mask(self, z: int):
        """(H, W) bool: the refined label's current mask on slice z (None when not refining)."""
        if self._refining is None:
            return None
        layer, label = self._refining
        if layer not in self._viewer.layers:
            self._refining = None
            return None
        data = pl._level0(layer.data)
        return np.asarray(data[z] if data.ndim == 3 else data) == label

    def update_preview(self) -> bool:
        """Ask for the object of the current slice's prompts; the preview shows it when decoded.

        The prompt is read from the layers here (GUI thread); the decoder runs in the
        :class:`~.preview_decoder.PreviewDecoder` thread, newest request first, and the answer is
        shown by :meth:`_on_answer` unless the prompts, the slice, the image or the session
        changed meanwhile. Returns True when a decoding was asked for; False when there is
        nothing to decode (no prompts, no model yet, or the slice's embedding is still being
        computed in the background: the preview is asked for again when it is ready). While a
        label is refined, its current mask on the slice is the mask prompt.
        """
        if self.closed or self.image is None or self._points is None:
            self._new_generation()
            return False
        z = self.current_z()
        prompt = self._slice_prompt(z)
        base = self._refine_mask(z)
        key = None if prompt is None else (id(self.session), id(self.image), prompt_key(z, prompt, base))
        if key is not None and key in (self._shown_key, self._asked_key):
            return True  # shown already, or on its way: no second decoding of the same prompts
        self._new_generation()
        if prompt is None:
            if self._preview_kind == "object":
                self._clear_preview_state()
            return False
        if not pl.has_positive(prompt) and (base is None or not base.any()):
            self._clear_preview_state()
            self._say.status("Add a positive point or a box: negative points alone select nothing.")
            return False
        if self.session is None:
            if self._model.sam is None:
                self._model.load()
            return False
        self.session.set_focus(prompt.points, prompt.labels, prompt.box)  # the tile to embed (tiled slices)
        if not self._embedder.ready(z):
            return False
        mask_input = None if base is None or not base.any() else pl.label_mask_input(base)
        # decoder only: on tiled slices, tiles not embedded yet are embedded by the embedder
        self._awaiting, self._asked_key = self._gen, key
        self._decoder.submit(DecodeRequest(self._gen, self.session, self.image, z, prompt, mask_input,
                                           key[2]))
        return True

    def _new_generation(self) -> None:
        """What the preview should show changed: answers asked for before are dropped."""
        self._gen += 1
        self._awaiting = self._asked_key = self._shown_key = None
        self._decoder.discard_pending()

    @property
    def decoding(self) -> bool:
        """True while the mask of the current prompts is being decoded (not shown yet)."""
        return self._awaiting is not None

    def _on_answer(self, answer: DecodeAnswer) -> None:
        """A decoded preview (GUI thread): shown when it is still for the current prompts."""
        request = answer.request
        if (self.closed or request.gen != self._gen or request.session is not self.session
                or request.image is not self.image):
            return  # stale: another prompt set, slice, image or session since
        self._awaiting = None
        asked, self._asked_key = self._asked_key, None
        z = request.z
        if answer.error is not None:
            self._commit_on_answer = False
            self._say.report(answer.error, f"predicting on slice {z}")
            return
        pred = answer.prediction
        if pred.missing_tiles:
            self._embedder.follow(z, pred.missing_tiles, key=request.key)
        self._prediction = pred
        self._set_preview(z, answer.labels, "object")
        self._shown_key = None if pred.missing_tiles else asked  # complete: asking again changes nothing
        next_step = "" if self._runner.running else (
            " C replaces the label here." if self._refining else " C commits, Shift-S propagates."
        )
        self._say.status(
            f"Slice {z}: object of {answer.n_pixels} px, predicted IoU {pred.score:.2f}.{next_step}"
        )
        if self._commit_on_answer:
            self._commit_on_answer = False
            self.commit()

    def _set_preview(self, z: int, labels: np.ndarray | None, kind: str | None,
                     outlines: np.ndarray | None = None) -> None:
        """Show ``labels`` on slice z (an automatic result as its ``outlines``, computed from
        ``labels`` here when not given)."""
        self._preview_z = None if labels is None else z
        self._preview_labels = labels
        self._preview_kind = None if labels is None else kind
        if self._preview is not None and self.image is not None and self._preview in self._viewer.layers:
            pl.show_preview(self._preview, self.image, z, labels, outlines=kind == "auto", shown=outlines)

    def _clear_preview_state(self) -> None:
        self._new_generation()
        self._prediction = None
        self._set_preview(self._preview_z or 0, None, None)

    def _show_live(self) -> None:
        """While a propagation runs, show what it has written on the slice in view (unless the
        user's own prompts are previewed there)."""
        live = self._runner.live
        if live is None or self.image is None or self._preview_kind not in (None, "live"):
            return
        if tuple(live.shape) != tuple(pl.image_geometry(self.image).shape):  # another image now
            return
        z = self.current_z()
        if not 0 <= z < live.shape[0]:
            return
        here = live[z]
        if self._preview_kind == "live" and self._preview_z == z and np.array_equal(self._preview_labels, here):
            return  # unchanged: no layer refresh, no repaint (each costs the GUI thread a frame)
        if here.any():
            self._set_preview(z, here.astype(np.uint32), "live")
        elif self._preview_kind == "live":
            self._clear_preview_state()

    def _on_progress(self) -> None:
        """After each step of a long task that fills the live volume (GUI thread)."""
        self._stack_progress()
        self._show_live()

    def _live_ended(self) -> None:
        if self._preview_kind == "live":
            self._clear_preview_state()

    # ------------------------------------------------------------------ target, commit, clear
    def target_layer(self, create: bool = True) -> Labels | None:
        """The Labels layer commits go into: the one chosen in the widget, else the layer made for
        the image (put back in the viewer, or made with the image's shape, when asked for)."""
        choice = self._c.target.value
        if isinstance(choice, Labels) and choice in self._viewer.layers:
            pl.check_target_layer(choice, self.image)
            return choice
        if not create or self.image is None:
            return None
        target = self._helpers.ensure_target(self.image)
        self._say.reset_choices()
        self._c.target.value = target
        return target

    def _empty_made_target(self, target) -> bool:
        """True (and says so) when ``target`` is the layer made for the image, still empty."""
        if not self._helpers.untouched(target):
            return False
        self._say.info(f"{target.name!r} holds no labels yet: commit an object first (C), or pick a "
                       "Labels layer that holds labels in 'labels'.")
        return True

    def choose_target_for_pick(self) -> bool:
        """At an image pick: whether to make the image's labels layer now: the widget's choice is
        not a Labels layer of the user's that fits this image (a layer made for another image
        never counts), and the layer has at most ``MADE_AT_PICK_MAX_VOXELS`` voxels (a bigger one,
        a full uint32 array, is made at the first commit or propagation, as before: a user who only
        looks at a big image does not get one)."""
        if int(np.prod(pl.image_geometry(self.image).shape, dtype=np.int64)) > MADE_AT_PICK_MAX_VOXELS:
            return False
        choice = self._c.target.value
        if not isinstance(choice, Labels) or choice not in self._viewer.layers or self._helpers.is_made_target(choice):
            return True
        try:
            pl.check_target_layer(choice, self.image)
        except ValueError:
            return True
        return False

    def commit(self) -> list[int]:
        """Write the previewed object(s) into the target layer (one undo step); returns the ids.

        While a label is refined, the preview replaces that label on the slice instead. Afterwards
        the prompts layer is active again, in add mode: the next click starts the next object.
        """
        if self.image is None:
            self._say.warn("No image layer: open an image first.")
            return []
        if self.decoding:  # the mask of the newest prompts is on its way: commit that one
            self._commit_on_answer = True
            self._say.status("Committing as soon as the mask of your last prompt is ready…")
            return []
        if self._preview_kind == "live":
            self._say.info(f"Still {self._runner.doing or 'working'}: what you see is its progress. C "
                           "commits your own prompts; Stop ends it and writes the slices done.")
            return []
        if self._preview_labels is None or not self._preview_labels.any():
            self._say.info("Nothing to commit: click on an object first (or segment the slice automatically).")
            return []
        z = self._preview_z or 0
        try:
            if self._refining is not None:
                ids, target = self._commit_refined(z), self._refining[0]
            else:
                target = self.target_layer(create=True)
                ids = pl.write_slice_labels(target, z, self._preview_labels, keep_existing=self._c.keep_existing.value)
        except Exception as exc:  # noqa: BLE001
            self._say.report(exc, "committing")
            return []
        self._remove_prompts(z)
        self._clear_preview_state()
        if ids:
            target.selected_label = ids[-1]
        what = f"object {ids[0]}" if len(ids) == 1 else f"{len(ids)} objects"
        verb = "Replaced" if self._refining is not None else "Committed"
        self._refining = None
        self._select_prompts()
        self._say.status(f"{verb} {what} on slice {z} in {target.name!r} (Ctrl-Z on that layer undoes). "
                          "Click the next object.")
        return ids

    def _commit_refined(self, z: int) -> list[int]:
        layer, label = self._refining
        pl.check_target_layer(layer, self.image)
        pl.replace_label_on_slice(layer, z, label, self._preview_labels > 0, keep_existing=self._c.keep_existing.value)
        self.hand_edits.add(layer, label, z)
        return [label]

    def refine_selected_label(self) -> bool:
        """Correct the target layer's selected label on the slice in view: its mask is the mask
        prompt, clicks add to or cut from it, C replaces it on that slice (undoable)."""
        target = self._c.target.value
        if self.image is None or not isinstance(target, Labels):
            self._say.info("Pick the Labels layer in 'labels' and select the label to refine (picker, key L).")
            return False
        if self._empty_made_target(target):
            return False
        z, label = self.current_z(), int(target.selected_label)
        self._refining = (target, label)
        if not self._refine_mask(z).any():
            self._refining = None
            self._say.info(f"Label {label} is not on slice {z}: select a label of this slice (picker, key L).")
            return False
        self._new_generation()
        self._set_preview(z, self._refine_mask(z).astype(np.uint32), "object")
        self._select_prompts()
        self._say.status(f"Refining label {label} on slice {z}: click to add (Shift-click to cut), "
                          "C replaces it, Shift-C stops.")
        return True

    def clear_prompts(self) -> None:
        """Drop the prompts of the current slice (every prompt of a 2D image), the preview and a refinement."""
        if self.image is None:
            return
        self._remove_prompts(self.current_z())
        self._clear_preview_state()
        self._refining = None
        self._commit_on_answer = False
        self._say.status("Prompts cleared.")

    def _remove_prompts(self, z: int) -> None:
        """Delete the points and boxes lying on slice z, without recomputing the preview."""
        self._suspend_prompt_events = True
        try:
            pl.remove_slice_prompts(self.image, z, self._points, self._boxes)
        finally:
            self._suspend_prompt_events = False

    # ------------------------------------------------------------------ long tasks
    def cancel(self) -> None:
        """Cancel the running propagation / automatic segmentation (nothing is written)."""
        if self._runner.cancel():
            self._say.status("Cancelled: nothing was written.")

    def stop(self) -> None:
        """End the running propagation early and write the slices it has done (one undo step)."""
        if self._runner.stop():
            self._say.status("Stopping: the slices done so far will be written…")

    def _ready_for_engine(self) -> bool:
        if self.image is None:
            self._say.warn("No image layer: open or pick an image first.")
            return False
        if self.session is None:
            self._say.info("The model is loading; try again in a moment." if self._model.sam is None else "No session.")
            if self._model.sam is None:
                self._model.load()
            return False
        return True

    def _z_range(self) -> tuple[int, int] | None:
        """The (start, stop) range for propagation, or None when not limited."""
        if not self._c.limit.value:
            return None
        lo, hi = sorted((int(self._c.z_from.value), int(self._c.z_to.value)))
        return lo, hi + 1
