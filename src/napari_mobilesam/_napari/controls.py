"""The Segment widget's controls (except the model's: :mod:`.model_panel`), each with a tooltip.

:class:`SegmentControls` only makes and lays out the magicgui widgets; the widget connects them.
The words that name the stack's axis (``z``, or ``t`` for a time-lapse) are set by
:meth:`SegmentControls.name_axis`.
"""

from __future__ import annotations

import logging

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
    TextEdit,
)
from qtpy.QtCore import QEvent, QObject, QSize, Qt
from qtpy.QtGui import QTextOption
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy

from .auto_panel import AutoPanel

__all__ = ["SegmentControls", "LABEL_SCOPES", "NEW_LAYER", "NO_CHANNEL", "hint_text", "error_message", "CloseWatcher",
           "DockContainer", "DOCK_MIN_HEIGHT", "wrapping"]

log = logging.getLogger(__name__)

NEW_LAYER = "(new layer)"
#: The channel combo boxes' choice for "no further channel".
NO_CHANNEL = "(none)"

#: What "Propagate labels" takes from the labels layer.
LABEL_SCOPES = ("selected label", "labels on this slice", "all labels", "these ids")


def hint_text(axis: str = "z") -> str:
    """The key and mouse help shown in the widget."""
    return (
        "Click: positive point · Shift/Ctrl-click: negative point · N: swap the two\n"
        "Boxes layer: draw a rectangle (R) for a box prompt, or scribble over the object (T)\n"
        f"C: commit · Shift-C: clear · Shift-S: propagate through {axis}"
    )


def wrapping(label: Label) -> Label:
    """A label that wraps its text and never widens the dock (long reports wrap instead)."""
    label.native.setWordWrap(True)
    policy = label.native.sizePolicy()
    policy.setHorizontalPolicy(QSizePolicy.Policy.Ignored)
    label.native.setSizePolicy(policy)
    return label


def _status_box(lines: int = 8) -> TextEdit:
    """A read-only text area for the status and reports: as wide as the dock lets it be (never
    wider), ``lines`` lines high, wrapping anywhere, scrolling when a report is longer."""
    box = TextEdit(value="")
    native = box.native
    native.setReadOnly(True)
    native.setFrameShape(QFrame.Shape.NoFrame)
    native.setStyleSheet("background: transparent")
    native.setWordWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)
    native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
    native.setFixedHeight(native.fontMetrics().lineSpacing() * lines + 8)
    return box


class SegmentControls:
    """Every control of the Segment widget below the model choice, with tooltips.

    Parameters
    ----------
    image_choices, target_choices, channel_choices : callable
        magicgui choice callbacks for the image, target-labels and channel combo boxes.
    """

    def __init__(self, image_choices, target_choices, channel_choices):
        self.image = ComboBox(label="image", choices=image_choices)
        self.image.tooltip = "The image layer to segment (2D, RGB, or a stack: z or t first)"
        self.channel2 = ComboBox(label="+ channel", choices=channel_choices, value=NO_CHANNEL)
        self.channel2.tooltip = (
            "A second channel the model sees with the image (an image layer of the same shape, e.g. a "
            "membrane stain beside the nuclei): the image goes to the model as red, this one as green"
        )
        self.channel3 = ComboBox(label="+ channel", choices=channel_choices, value=NO_CHANNEL)
        self.channel3.tooltip = "A third channel (blue); each channel is scaled to its own intensity range"
        self.hint = wrapping(Label(value=hint_text()))
        self.hint.tooltip = "How to prompt: these keys work while the widget is open"
        self.target = ComboBox(label="labels", choices=target_choices)
        self.target.tooltip = "The Labels layer objects are committed into ('(new layer)': made for you)"
        self.autosave = CheckBox(text="autosave labels", value=True)
        self.autosave.tooltip = (
            "Keep the labels layer on disk, written 2 s after each change (only the slices that "
            "changed), and offer it back when this image is opened again"
        )
        self.autosave_folder = FileEdit(label="autosave to", mode="d", value="")
        self.autosave_folder.tooltip = "Folder of the autosaves (at first: the per-user data folder of napari-mobilesam)"
        self.autosave_folder.line_edit.tooltip = self.autosave_folder.tooltip
        self.autosave_folder.choose_btn.tooltip = "Browse for the autosave folder"
        self.restore = PushButton(text="Restore autosaved labels", visible=False)
        self.restore.tooltip = "Add the labels autosaved for this image as a new Labels layer"
        self.keep_existing = CheckBox(text="keep existing labels (commit only paints background)", value=True)
        self.keep_existing.tooltip = "On: commits and propagations never paint over labels already there"
        self.commit = PushButton(text="Commit [C]")
        self.commit.tooltip = "Write the previewed object(s) into the labels layer (Ctrl-Z there undoes)"
        self.clear = PushButton(text="Clear prompts [Shift-C]")
        self.clear.tooltip = "Drop this slice's points and boxes and the preview"
        self.refine = PushButton(text="Refine selected label")
        self.refine.tooltip = (
            "Correct the labels layer's selected label on this slice: its mask is the starting "
            "prompt, add clicks, C replaces it on this slice (undoable)"
        )
        self.repropagate = PushButton(text="Re-propagate [Shift-R]")
        self.repropagate.tooltip = (
            "Re-propagate the selected label from this slice, after correcting it here: follow it again, up and "
            "down, rewriting its slices until a slice you corrected by hand (kept); only this label "
            "changes, one undo step"
        )
        self.limit = CheckBox(text="limit propagation to z-range", value=False)
        self.limit.tooltip = "Propagate (and segment the stack automatically) only between the two slices below"
        self.z_from = SpinBox(label="z from", min=0, max=0)
        self.z_from.tooltip = "First slice propagation may reach"
        self.z_to = SpinBox(label="z to", min=0, max=0)
        self.z_to.tooltip = "Last slice propagation may reach"
        self.propagate = PushButton(text="Propagate object [Shift-S]")
        self.propagate.tooltip = (
            "Follow the prompted object through the stack (all its prompted slices are seeds); "
            "without prompts: every object committed on this slice"
        )
        self.scope = ComboBox(label="which labels", choices=list(LABEL_SCOPES), value=LABEL_SCOPES[0])
        self.scope.tooltip = "Which labels of the labels layer 'Propagate labels' extends"
        self.ids = LineEdit(label="ids", value="")
        self.ids.tooltip = "Label ids for 'these ids', e.g. 3, 5-7"
        self.propagate_labels = PushButton(text="Propagate labels of the labels layer")
        self.propagate_labels.tooltip = (
            "Extend the chosen labels through the stack in one pass (one undo step); slices "
            "where a label already is are kept as drawn"
        )
        self.automatic = AutoPanel()
        self.auto = PushButton(text="Auto-segment slice")
        self.auto.tooltip = (
            "Find every object of this slice with the mode above (preview outlines); C commits them all"
        )
        self.auto_stack = PushButton(text="Auto-segment stack")
        self.auto_stack.tooltip = (
            "Find every object on every slice (or the limited range) with the mode above, one id "
            "per object through the stack; written as one undo step (Stop keeps the slices done)"
        )
        self.stop = PushButton(text="Stop, keep slices done", enabled=False)
        self.stop.tooltip = "End the propagation now and write the slices done so far (one undo step)"
        self.cancel = PushButton(text="Cancel", enabled=False)
        self.cancel.tooltip = "End the running task and write nothing"
        self.status = _status_box()
        self.status.tooltip = "What the widget is doing, and the last result"

    def layout(self, model_widgets: list) -> list:
        """The widgets in their order in the dock, rows grouped in horizontal containers."""

        def row(*widgets, labels=False):
            return Container(widgets=list(widgets), layout="horizontal", labels=labels)

        return [
            self.image,
            row(self.channel2, self.channel3, labels=True),
            *model_widgets,
            self.hint,
            self.target,
            self.autosave_folder,
            row(self.autosave, self.restore),
            self.keep_existing,
            row(self.commit, self.clear),
            row(self.refine, self.repropagate),
            self.limit,
            row(self.z_from, self.z_to, labels=True),
            self.propagate,
            self.scope,
            self.ids,
            self.propagate_labels,
            *self.automatic.widgets,
            row(self.auto, self.auto_stack),
            row(self.stop, self.cancel),
            self.status,
        ]

    def name_axis(self, axis: str) -> None:
        """Word the stack controls for its first axis (``"z"``, or ``"t"`` for a time-lapse)."""
        self.hint.value = hint_text(axis)
        self.limit.text = f"limit propagation to {axis}-range"
        self.z_from.label = f"{axis} from"
        self.z_to.label = f"{axis} to"
        self.propagate.text = f"Propagate object through {axis} [Shift-S]"

    def enable_stack(self, is_stack: bool) -> None:
        for w in (self.limit, self.z_from, self.z_to, self.propagate, self.propagate_labels, self.scope,
                  self.ids, self.auto_stack, self.repropagate):
            w.enabled = is_stack

    def all(self) -> list:
        """Every control (for tooltip checks)."""
        return [
            self.image, self.channel2, self.channel3, self.hint, self.target, self.autosave, self.autosave_folder, self.restore, self.keep_existing, self.commit, self.clear,
            self.refine, self.repropagate, self.limit, self.z_from, self.z_to, self.propagate, self.scope, self.ids,
            self.propagate_labels, self.auto, self.auto_stack, self.stop, self.cancel, self.status,
            *self.automatic.all(),
        ]


def error_message(exc: BaseException, doing: str) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            f"Out of memory while {doing}. Your labels are unchanged. Close other programs, use "
            "the CPU device, or work on a cropped/downsampled image."
        )
    return f"Error while {doing}: {text}"


class CloseWatcher(QObject):
    """Calls ``on_close`` when the widget is taken out of its dock (napari's × button unparents it)."""

    def __init__(self, on_close):
        super().__init__()
        self._on_close = on_close

    def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
        try:
            if event.type() == QEvent.Type.ParentChange and obj.parent() is None:
                self._on_close()
        except Exception:  # noqa: BLE001 - an exception here would abort PyQt
            log.debug("napari-mobilesam: close watcher", exc_info=True)
        return False


#: The least height of a dock's controls before they scroll (napari shrinks a dock to its minimum
#: when it adds another one below it): the image, model and first buttons stay in view.
DOCK_MIN_HEIGHT = 300


class _DockScroll(QScrollArea):
    """Vertical scroll area of a :class:`DockContainer`: as wide as the controls need (no
    horizontal scrolling); its least height is the controls' or :data:`DOCK_MIN_HEIGHT`,
    whichever is smaller."""

    def __init__(self, inner):
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setWidget(inner)

    def _bar(self) -> int:
        return self.verticalScrollBar().sizeHint().width()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        need = self.widget().minimumSizeHint()
        return QSize(need.width() + self._bar(), min(need.height(), DOCK_MIN_HEIGHT))

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        want = self.widget().sizeHint()
        return QSize(want.width() + self._bar(), want.height())

    def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # controls shown or hidden: the dock asks again
        return super().eventFilter(obj, event)


class DockContainer(Container):
    """A magicgui Container that scrolls vertically inside its napari dock.

    napari docks a magicgui widget's ``native``, and a window cannot be shorter than the sum of
    its docks' least heights: the Segment widget alone asked for about 850 px, and with
    the distillation panel below it the window grew to about 1600 px, past the bottom of the
    screen, and grew again each time a status line got longer (the canvas resized and repainted
    with it). Here ``native`` is a scroll area around the controls (magicgui's own
    ``scrollable=True`` keeps the inner widget as ``native``, which napari would dock without
    the scroll area), so a dock needs at most :data:`DOCK_MIN_HEIGHT` and scrolls when the
    window is shorter than its controls. ``inner`` is magicgui's widget that holds the layout.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        backend = self._widget
        self.inner = backend._mgui_get_native_widget()
        self._scroll = _DockScroll(self.inner)
        self._scroll._magic_widget = self  # how napari's dock finds the magicgui widget
        # magicgui watches the inner widget's parent: docking moves the scroll area
        self._scroll.installEventFilter(backend._event_filter)
        # and it shows, hides and closes the inner widget: ``show()`` outside a dock, a window
        backend._mgui_set_visible = self._scroll.setVisible
        backend._mgui_get_visible = self._scroll.isVisible
        backend._mgui_close_widget = self._scroll.close

    @property
    def native(self):
        """The scroll area napari docks (the controls' layout is on :attr:`inner`)."""
        scroll = getattr(self, "_scroll", None)  # magicgui asks for it while being made
        return scroll if scroll is not None else self._widget._mgui_get_native_widget()

    def end_layout(self) -> None:
        """Call once the controls are in: keeps them at the top of a taller dock."""
        self.inner.layout().addStretch(1)
