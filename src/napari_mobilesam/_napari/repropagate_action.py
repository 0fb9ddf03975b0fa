"""Re-propagate a corrected label from the slice in view, keeping the slices corrected by hand.

:class:`HandEdits` remembers, per Labels layer and label, the slices the user corrected by hand in
this session: a refinement committed with ``C`` on a slice, and napari's own brush, fill and
polygon edits (seen through the layer's ``paint`` event). :class:`RepropagateActions` is a part of
:class:`~.annotator.Annotator` kept in its own module: it runs
:func:`~napari_mobilesam.volume.repropagate.repropagate` in the long-task runner (live preview,
Stop keeps the slices decided, Cancel writes nothing) and writes the result as one undo step that
changes only that label's pixels. Coordinates: labels ``(z, row, col)``.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Labels

from ..core.session import STOP_REASONS
from . import prompt_layers as pl
from .workers import Task

__all__ = ["HandEdits", "RepropagateActions", "changed_slices_text"]


class HandEdits:
    """Slices corrected by hand, per Labels layer and label (this session only).

    Parameters
    ----------
    layers : napari LayerList
        Its Labels layers are watched (also the ones added later) for napari's brush, fill and
        polygon edits.
    ignore : callable(layer) -> bool
        True for the widget's own helper layers (the preview), never watched.
    """

    def __init__(self, layers, ignore):
        self._layers, self._ignore = layers, ignore
        self._edits: dict[int, dict[int, set[int]]] = {}  # id(layer) -> label -> slices
        self._watched: dict[int, tuple[Labels, object]] = {}  # id(layer) -> (layer, callback)
        layers.events.inserted.connect(self._on_inserted)
        layers.events.removed.connect(self._on_removed)
        for layer in list(layers):
            self._watch(layer)

    def add(self, layer: Labels, label: int, z: int) -> None:
        """Remember that ``label`` was corrected by hand on slice ``z`` of ``layer``."""
        self._edits.setdefault(id(layer), {}).setdefault(int(label), set()).add(int(z))

    def slices(self, layer: Labels, label: int) -> set[int]:
        """The slices where ``label`` of ``layer`` was corrected by hand."""
        return set(self._edits.get(id(layer), {}).get(int(label), ()))

    def close(self) -> None:
        """Stop watching (the widget is closing)."""
        pairs = [(self._layers.events.inserted, self._on_inserted), (self._layers.events.removed, self._on_removed)]
        pairs += [(layer.events.paint, callback) for layer, callback in self._watched.values()]
        self._watched.clear()
        for event, slot in pairs:
            try:
                event.disconnect(slot)
            except Exception:  # noqa: BLE001 - napari may be tearing the viewer down
                pass

    def _on_inserted(self, event) -> None:
        self._watch(event.value)

    def _on_removed(self, event) -> None:
        layer = event.value
        entry = self._watched.pop(id(layer), None)
        if entry is not None:
            layer.events.paint.disconnect(entry[1])
        self._edits.pop(id(layer), None)

    def _watch(self, layer) -> None:
        if not isinstance(layer, Labels) or id(layer) in self._watched or self._ignore(layer):
            return

        def on_paint(event, layer=layer):
            self._record(layer, event.value)

        layer.events.paint.connect(on_paint)
        self._watched[id(layer)] = (layer, on_paint)

    def _record(self, layer: Labels, item) -> None:
        """Note the slices and labels of one undo item made by napari's painting tools.

        napari's brush, fill and polygon store a masked atom (a bounding box and one new label)
        or, in older napari, ``(indices, old values, one new label)``; the widget's own writes
        store an array of new values per pixel and are not hand edits.
        """
        shape = _level0_shape(layer)
        if len(shape) != 3:
            return
        for atom in item or ():
            if hasattr(atom, "slice_key"):  # napari >= 0.6 masked paint atom
                zs = range(*atom.slice_key[0].indices(shape[0]))
                new, old = atom.new_value, atom.old_values
            else:
                indices, old, new = atom
                if np.ndim(new) != 0:
                    continue  # written by the widget (one value per pixel)
                zs = np.unique(np.asarray(indices[0]))
            labels = {int(v) for v in np.unique(np.asarray(old)) if v} | ({int(new)} if int(new) else set())
            for label in labels:
                for z in zs:
                    self.add(layer, label, int(z))


def _level0_shape(layer) -> tuple[int, ...]:
    return tuple(pl._level0(layer.data).shape)


def _ranges(zs) -> str:
    """``[2, 3, 4, 7]`` -> ``"2–4, 7"``."""
    zs = sorted(set(int(z) for z in zs))
    parts, start = [], None
    for i, z in enumerate(zs):
        start = z if start is None else start
        if i + 1 == len(zs) or zs[i + 1] != z + 1:
            parts.append(str(start) if start == z else f"{start}–{z}")
            start = None
    return ", ".join(parts)


def changed_slices_text(zs) -> str:
    return f"slice {_ranges(zs)}" if len(set(zs)) == 1 else f"slices {_ranges(zs)}" if zs else "no slice"


class _OneLabel:
    """The live view of a re-propagation: ``volume[z]`` shows only ``label`` (uint8 0/1)."""

    def __init__(self, volume: np.ndarray, label: int):
        self._volume, self._label = volume, label
        self.shape = volume.shape

    def __getitem__(self, z):
        return (self._volume[z] == self._label).astype(np.uint8)


class RepropagateActions:
    """Re-propagation of the selected label from the slice in view (mixed into ``Annotator``)."""

    def _repropagation_target(self):
        """(layer, label, z) to re-propagate, or None after saying why not."""
        if not self._ready_for_engine():
            return None
        if not pl.image_geometry(self.image).is_stack:
            self._say.info("Re-propagation needs a stack (z, row, col); this image is 2D.")
            return None
        target = self._c.target.value
        if not isinstance(target, Labels):
            target = self.target_layer(create=False)
        if not isinstance(target, Labels):
            self._say.info("Pick the Labels layer in 'labels' and select the label to re-propagate "
                           "(picker, key L).")
            return None
        if self._empty_made_target(target):
            return None
        try:
            pl.check_target_layer(target, self.image)
        except ValueError as exc:
            self._say.report(exc, "re-propagating")
            return None
        z, label = self.current_z(), int(target.selected_label)
        if label == 0:
            self._say.info("No label selected (0 is the background): select the label to re-propagate "
                           "(picker, key L).")
            return None
        if not np.any(np.asarray(pl._level0(target.data)[z]) == label):
            self._say.info(f"Label {label} is not on slice {z}: go to the slice you corrected, or select "
                           "a label of this slice (picker, key L).")
            return None
        if self._refining is not None and self._refining[1] == label and self._slice_prompt(z) is not None:
            self._say.info(f"Label {label} is being refined on slice {z}: press C to commit the "
                           "correction first (or Shift-C to drop it), then re-propagate.")
            return None
        return target, label, z

    def repropagate_selected_label(self) -> Task | None:
        """Propagate the target layer's selected label again from the slice in view (worker).

        Its mask on this slice is the seed; its slices up and down are rewritten until a slice
        corrected by hand (kept, as is everything past it), the end of the object, the stack's
        end or the limited range. Only this label's pixels change; one undo step.
        """
        picked = self._repropagation_target()
        if picked is None:
            return None
        target, label, z = picked
        volume = pl._level0(target.data)
        n = volume.shape[0]
        hand = self.hand_edits.slices(target, label) - {z}
        limits = set()
        if self._z_range() is not None:
            lo, hi = self._z_range()
            if not lo <= z < hi:
                self._say.warn(f"Slice {z} lies outside the range {lo}–{hi - 1}: widen it.")
                return None
            limits = {q for q in (lo - 1, hi) if 0 <= q < n}
        before = np.array(volume, copy=True)
        work = before.copy()
        session = self.session

        def run(report, cancelled):
            from ..volume.repropagate import repropagate

            return repropagate(session.predictor, work, label, z, protected=hand | limits, inplace=True,
                               progress=report, cancel=cancelled)

        def done(result):  # finished or stopped (a cancelled run never gets here)
            if session is self.session:
                self._write_repropagation(result, target, label, z, before, hand, limits)

        return self._runner.start(run, f"re-propagating label {label} from slice {z}", n, done,
                                  stoppable=True, live=_OneLabel(work, label))

    def _write_repropagation(self, result, target, label, z, before, hand, limits) -> None:
        if target not in self._viewer.layers:
            self._say.warn(f"The labels layer {target.name!r} was deleted: nothing was written.")
            return
        after = np.asarray(result.labels)
        change = after != before
        if result.cancelled:  # Stop: only the slices decided so far change
            decided = np.zeros(len(after), bool)
            decided[[r.z for r in result.records if r.label == label]] = True
            change &= decided[:, None, None]
        try:
            rewritten = write_changes(target, before, after, change)
        except Exception as exc:  # noqa: BLE001
            self._say.report(exc, f"writing the re-propagated label {label}")
            return
        self.last_propagation = result
        self._say.status(describe_repropagation(result, label, z, rewritten, hand, limits, target.name))


def write_changes(target: Labels, before: np.ndarray, after: np.ndarray, change: np.ndarray) -> list[int]:
    """Write ``after`` where ``change`` into ``target`` (one undo step), except pixels the user
    changed since ``before`` was taken; returns the slices that changed."""
    current = np.asarray(pl._level0(target.data))
    index = np.nonzero(change & (current == before))
    if len(index[0]):
        with target.block_history():
            target.data_setitem(index, after[index])
    return sorted(int(q) for q in np.unique(index[0]))


def describe_repropagation(result, label, z, rewritten, hand, limits, target_name) -> str:
    """The report: what changed, then one line per direction saying where and why it stopped."""
    how = "Stopped re-propagating" if result.cancelled else "Re-propagated"
    lines = [f"{how} label {label} from slice {z} in {target_name!r}: "
             + (f"{changed_slices_text(rewritten)} rewritten; one undo step." if rewritten
                else "nothing changed.")]
    for s in sorted(result.stops_for(label), key=lambda s: -s.direction):
        if s.direction == 0:
            continue
        reason = s.reason
        if reason == "protected" and s.at_z in limits and s.at_z not in hand:
            reason = "z_range"
        way = "up" if s.direction > 0 else "down"
        lines.append(f"• {way}: to z={s.last_z}, stopped at z={s.at_z}: {STOP_REASONS.get(reason, reason)}")
    if hand:
        lines.append(f"Kept as corrected by hand: {changed_slices_text(hand)}.")
    return "\n".join(lines)
