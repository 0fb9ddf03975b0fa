"""The Segment widget's autosave: the labels layer it writes into is kept on disk, and offered
back when the same image is opened again (after a crash, a killed napari, a closed viewer).

What is saved: the widget's target Labels layer (the image's ``<image> labels`` or the Labels
layer picked in 'labels'), :data:`AFTER_MS` after its last change (a commit, a propagation, the
brush, the fill bucket, an undo), in a background task, as a Zarr array in the autosave folder
(:mod:`napari_mobilesam.io.autosave`: only the slices that changed are written). Closing the dock
or the viewer writes what is left at once.

What is offered: when an image is picked whose labels were autosaved by an earlier session, and
the layer the widget writes into holds no labels yet, a *Restore autosaved labels* button says
how many labels and when. It adds them as a new Labels layer (nothing already drawn is touched),
which becomes the target. An autosave is never overwritten by a session that neither wrote nor
restored it: that session's first save moves the old one aside (kept, newest five per image).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from napari.layers import Labels
from qtpy.QtCore import QTimer

from ..io import autosave as store
from . import prompt_layers as pl
from .workers import Task, start_task

__all__ = ["Autosaver", "AFTER_MS"]

log = logging.getLogger(__name__)

#: A save starts this long after the last change of the labels.
AFTER_MS = 2000
#: At the widget's close, how long to wait for a save still running.
CLOSE_WAIT_S = 60.0


def _source(image) -> str:
    try:
        return str(image.source.path or "")
    except AttributeError:
        return ""


class Autosaver:
    """Follows the widget's image and target layer (:meth:`follow`) and keeps the layer on disk.

    Parameters
    ----------
    controls
        The widget's :class:`~napari_mobilesam._napari.controls.SegmentControls` (``autosave``,
        ``autosave_folder``, ``restore``).
    viewer
        The napari viewer (the restored layer is added to it).
    say
        The widget's messages (``status``, ``warn``, ``report``).
    on_restored
        Called after a restore (the widget selects its prompts layer again).
    """

    def __init__(self, controls, viewer, say, on_restored=None):
        self._c, self._viewer, self._say, self._on_restored = controls, viewer, say, on_restored
        self._image = None
        self._layer: Labels | None = None
        self._stores: dict[tuple, store.LabelsAutosave] = {}
        self._dirty = False
        self._task: Task | None = None
        self._offer: Path | None = None
        self._closed = False
        self._switching_off = False
        self.saved_at: float | None = None  # when the last save ended (for the status line and tests)
        self.last_error: str = ""
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(AFTER_MS)
        self._timer.timeout.connect(self._save_in_background)
        self._read_choice()
        controls.restore.changed.connect(lambda *_: self.restore())
        controls.autosave.changed.connect(self._on_switched)
        controls.autosave_folder.changed.connect(self._on_folder_changed)

    # ------------------------------------------------------------------ what is followed
    @property
    def enabled(self) -> bool:
        return self._on and not self._closed

    def folder(self) -> Path:
        """The folder chosen in the widget (it shows the default one until the user picks another)."""
        return self._folder

    def _read_choice(self) -> None:
        """The controls' values, kept here: at the viewer's close the last save runs after Qt
        deleted the controls."""
        value = self._c.autosave_folder.value
        self._folder = Path(value).expanduser() if str(value or "").strip() else store.autosave_folder()
        self._on = bool(self._c.autosave.value)

    def follow(self, image, layer) -> None:
        """The widget now works on ``image`` and writes into ``layer`` (either may be None)."""
        if image is self._image and layer is self._layer:
            return
        self.flush()  # the previous layer's last changes, before it is let go
        if self._layer is not None:
            self._disconnect(self._layer)
        self._image, self._layer = image, layer
        if layer is not None:
            layer.events.paint.connect(self._on_changed)
            layer.events.set_data.connect(self._on_changed)
        self.update_offer()

    def _disconnect(self, layer) -> None:
        for emitter in (layer.events.paint, layer.events.set_data):
            try:
                emitter.disconnect(self._on_changed)
            except (TypeError, ValueError, RuntimeError):
                pass

    def _on_changed(self, _event=None) -> None:
        if not self.enabled:
            return
        self._dirty = True
        if self._offer is not None and self._has_labels(self._layer):
            self._offer = None  # labels drawn now: restoring would add a second set
            self.show_offer()
        self._timer.start()

    def _on_switched(self, _value=None) -> None:
        self._read_choice()
        if not self._switching_off:
            self._save_choice()
        if self.enabled and self._has_labels(self._layer):
            self._dirty = True
            self._timer.start()
        self.update_offer()

    def _on_folder_changed(self, _value=None) -> None:
        self._read_choice()
        self._stores.clear()  # files of their own in the new folder
        self._save_choice()
        self.update_offer()

    def _save_choice(self) -> None:
        from dataclasses import replace

        from .settings import load_settings, save_settings

        folder = self.folder()
        try:  # the default folder is saved as "" (it follows NAPARI_MOBILESAM_AUTOSAVE_DIR)
            save_settings(replace(load_settings(), autosave=bool(self._c.autosave.value),
                                  autosave_folder="" if folder == store.autosave_folder() else str(folder)))
        except OSError as exc:
            log.debug("napari-mobilesam: could not save the autosave choice: %s", exc)

    # ------------------------------------------------------------------ saving
    def _store_for(self, layer) -> store.LabelsAutosave | None:
        image = self._image
        if image is None or layer is None:
            return None
        data = pl._level0(layer.data)
        key = (id(image), str(self.folder()), tuple(data.shape), np.dtype(data.dtype).str)
        if key not in self._stores:
            self._stores[key] = store.LabelsAutosave(self.folder(), image.name, tuple(data.shape), data.dtype,
                                                     source=_source(image))
        return self._stores[key]

    def _save_in_background(self) -> None:
        if not self.enabled or not self._dirty or self._layer is None:
            return
        if self._task is not None and not self._task.done:
            self._timer.start()  # one save at a time: again after this one
            return
        try:
            target = self._store_for(self._layer)
        except ValueError as exc:  # not integer labels of 2 or 3 dimensions
            self._fail(str(exc))
            return
        data = pl._level0(self._layer.data)
        self._dirty = False
        # not cancellable: at the interpreter's exit the running tasks are stopped and waited
        # for (workers._stop_at_exit); this one ends with a whole save
        self._task = start_task(
            lambda report, cancelled: target.save(data), description="MobileSAM: autosaving labels",
            on_result=self._saved, on_error=self._failed, progress_after_ms=3000,
        )

    def _saved(self, written: int) -> None:
        self.saved_at = time.time()
        self.last_error = ""

    def _failed(self, exc: BaseException) -> None:
        self._dirty = True
        self._fail(str(exc))

    def _fail(self, message: str) -> None:
        """Stop autosaving and say why (once): the labels stay in the layer, nothing is lost."""
        self.last_error = message
        self._timer.stop()
        self._switching_off = True  # off for this session only, not in the saved settings
        try:
            self._c.autosave.value = False  # the user turns it on again after fixing the cause
        finally:
            self._switching_off = False
        self._say.warn(f"Autosave is off: {message}")

    def flush(self) -> None:
        """Write what changed now, on this thread (another layer or image followed, the dock or
        the viewer closed)."""
        self._timer.stop()
        if not self.enabled or not self._dirty or self._layer is None:
            return
        try:
            target = self._store_for(self._layer)
            if target is not None:
                target.save(pl._level0(self._layer.data))
                self._dirty = False
                self.saved_at = time.time()
        except Exception as exc:  # noqa: BLE001 - called from Qt slots and at exit: it must not raise
            log.warning("napari-mobilesam: the last autosave failed: %s", exc)

    def close(self) -> None:
        """The widget closes: the last changes are written (and a save still running has
        ended), nothing is followed any more."""
        if self._closed:
            return
        try:
            self.flush()
            if self._task is not None:
                self._task.body_returned.wait(CLOSE_WAIT_S)
        finally:
            self._closed = True
            self._timer.stop()
            if self._layer is not None:
                self._disconnect(self._layer)
            self._layer = self._image = None

    # ------------------------------------------------------------------ restoring
    @staticmethod
    def _has_labels(layer) -> bool:
        if layer is None:
            return False
        data = pl._level0(layer.data)
        return bool(np.asarray(data).any())

    def update_offer(self) -> None:
        """Offer the newest autosave of the image when the layer written into has no labels."""
        self._offer = None
        image = self._image
        if image is not None and self.enabled:
            try:
                shape = pl.image_geometry(image).shape
                found = store.find_autosaves(self.folder(), image.name, shape, _source(image))
            except (OSError, ValueError):
                found = []
            mine = {s.path for s in self._stores.values() if s.saves}
            found = [p for p in found if p not in mine]
            if found and not self._has_labels(self._layer):  # (a scan of the layer: only when needed)
                self._offer = found[0]
        self.show_offer()

    def show_offer(self) -> None:
        """Show or hide the Restore button for the offer found last, and say so in the status line."""
        button = self._c.restore
        if self._offer is None:
            button.visible = False
            return
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(store.read_autosave_time(self._offer)))
        button.text = f"Restore labels of {when}"
        button.tooltip = (f"Add the labels autosaved for this image on {when} as a new Labels layer "
                          f"(from {self._offer}); nothing already drawn changes")
        button.visible = True
        self._say.status(f"Labels of {self._image.name!r} were autosaved {when}: 'Restore' adds them as a layer.")

    def restore(self) -> Labels | None:
        """Add the offered autosave as a new Labels layer, the widget's target; returns it."""
        path, image = self._offer, self._image
        if path is None or image is None:
            return None
        try:
            saved = store.read_autosave(path)
            geom = pl.image_geometry(image)
            if tuple(saved.labels.shape) != tuple(geom.shape):
                raise ValueError(f"the autosave {path} has shape {saved.labels.shape}, the image {geom.shape}")
        except (OSError, ValueError) as exc:
            self._say.report(exc, "restoring the autosaved labels")
            return None
        when = time.strftime("%H:%M", time.localtime(saved.saved))
        layer = pl.make_target_layer(image, name=f"{image.name} labels (autosaved {when})")
        layer.data = saved.labels
        layers = self._viewer.layers
        # below the prompt layers (they stay visible and clickable), just above the image
        layers.insert(layers.index(image) + 1 if image in layers else len(layers), layer)
        self._c.target.value = layer  # follow() through the target's change; the offer goes
        own = self._store_for(layer)
        if own is not None and own.path == path and not own.saves:
            try:
                own.adopt()  # this session continues that file
            except Exception as exc:  # noqa: BLE001 - then its first save starts a new file, this one kept
                log.debug("napari-mobilesam: not continuing autosave %s: %s", path, exc)
        note = f" ({len(saved.damaged)} damaged chunks read as background)" if saved.damaged else ""
        self._say.status(f"Restored {saved.describe()} into {layer.name!r}{note}.")
        if self._on_restored is not None:
            self._on_restored()  # ready for the next click (the new layer took the selection)
        return layer
