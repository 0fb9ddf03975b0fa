"""Automatic segmentation in the Segment widget: the mode, AIS's parameters and the stack run.

:class:`AutoPanel` holds the controls: the mode (AIS with micro-sam's decoder, APG -- micro-sam's
automatic prompt generation, prompts from the decoder's maps answered by SAM -- or the SAM point
grid; shown only when the loaded model has a decoder, AIS is then the default) and the seed and
size parameters AIS and APG share, in a section shown on demand. Another mode plugs in by adding its key to
:data:`~.settings.AUTO_MODES` (and the engine's ``core.session.AUTO_MODES``), its parameters as a
section like :attr:`AutoPanel.ais_section`, and a branch in :meth:`AutoPanel.request`.

The whole-stack run (:class:`StackRun`) goes through
:meth:`~napari_mobilesam.core.session.Session.segment_stack_automatically` in the widget's
:class:`~.long_tasks.LongTaskRunner`: progress in the activity dock, Stop keeps the slices done,
Cancel writes nothing; the result is written as one undo step (:func:`write_stack`). Arrays are
``(Z, H, W)`` in the image's data coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, SpinBox

from ..errors import InputError
from . import prompt_layers as pl
from .settings import AUTO_MODES
from .workers import Task

__all__ = ["AutoPanel", "AutoRequest", "StackRun", "write_stack", "describe_stack"]


@dataclass(frozen=True)
class AutoRequest:
    """What to run: ``mode`` (``"ais"``, ``"apg"`` or ``"grid"``), its parameters and words for
    messages."""

    mode: str
    ais_params: Any = None
    params: Any = None
    apg_params: Any = None

    @property
    def name(self) -> str:
        return {"ais": "AIS", "apg": "APG"}.get(self.mode, "SAM point grid")


def _spin(cls, label: str, tooltip: str, **kw):
    w = cls(label=label, **kw)
    w.tooltip = tooltip
    return w


class AutoPanel:
    """The automatic-segmentation controls (mode and AIS parameters) of the Segment widget."""

    def __init__(self) -> None:
        self.has_decoder = False
        self.mode = ComboBox(label="automatic", choices=self._mode_choices)
        self.mode.tooltip = (
            "How 'Auto-segment' finds objects: AIS (micro-sam's decoder predicts foreground and "
            "distance maps, a watershed splits them; micro-sam models only), APG (a prompt per "
            "object found in those maps, each answered by SAM: slower, SAM-shaped masks) or the "
            "SAM point grid (prompts on a grid of points, any model)"
        )
        self.show_ais = CheckBox(text="parameters", value=False)
        self.show_ais.tooltip = "Show micro-sam's seed and size parameters of AIS / APG"
        self.center = _spin(FloatSpinBox, "centre",
                            "Seeds are where the (smoothed) centre-distance map is below this "
                            "(0–1; lower: fewer, more central seeds, fewer splits)",
                            min=0.0, max=1.0, step=0.05, value=0.5)
        self.boundary = _spin(FloatSpinBox, "boundary",
                              "Seeds are also where the boundary-distance map is below this (0–1; "
                              "lower: fewer seeds near object borders)",
                              min=0.0, max=1.0, step=0.05, value=0.5)
        self.foreground = _spin(FloatSpinBox, "foreground",
                                "Pixels whose foreground probability is above this belong to "
                                "objects (0–1; higher: tighter, fewer objects)",
                                min=0.0, max=1.0, step=0.05, value=0.5)
        self.min_size = _spin(SpinBox, "min size",
                              "Objects smaller than this many pixels are dropped (0: keep all)",
                              min=0, max=1_000_000, step=10, value=0)
        row = lambda *w: Container(widgets=list(w), layout="horizontal", labels=True)  # noqa: E731
        self.mode_row = row(self.mode, self.show_ais)
        self.ais_section = Container(widgets=[row(self.center, self.boundary),
                                              row(self.foreground, self.min_size)], labels=False)
        self.ais_section.tooltip = "micro-sam's AIS post-processing parameters (its defaults: 0.5, 0.5, 0.5, 0)"
        self.mode.changed.connect(self._update_visibility)
        self.show_ais.changed.connect(self._update_visibility)
        self.set_has_decoder(False)

    @property
    def widgets(self) -> list:
        return [self.mode_row, self.ais_section]

    def all(self) -> list:
        """Every control (for tooltip checks)."""
        return [self.mode, self.show_ais, self.center, self.boundary, self.foreground, self.min_size]

    def _mode_choices(self, _widget=None) -> list[tuple[str, str]]:
        keys = [k for k in AUTO_MODES if k not in ("ais", "apg") or self.has_decoder]
        return [(AUTO_MODES[k], k) for k in keys]

    def set_has_decoder(self, has: bool) -> None:
        """Follow the loaded model: AIS is offered (and chosen) only when it has a decoder."""
        self.has_decoder = bool(has)
        self.mode.reset_choices()
        self.mode.value = "ais" if self.has_decoder else "grid"
        self._update_visibility()

    def _update_visibility(self, _value=None) -> None:
        # without a decoder the point grid is the only mode: no choice to show (and no height taken)
        self.mode_row.visible = self.has_decoder
        ais = self.has_decoder and self.mode.value in ("ais", "apg")
        self.show_ais.visible = ais
        self.ais_section.visible = ais and self.show_ais.value

    def ais_params(self):
        """The AIS parameters set in the panel (an ``AISParams``; smoothing at micro-sam's defaults)."""
        from ..volume.instance import AISParams

        return AISParams(center_distance_threshold=float(self.center.value),
                         boundary_distance_threshold=float(self.boundary.value),
                         foreground_threshold=float(self.foreground.value),
                         min_size=int(self.min_size.value))

    def apg_params(self):
        """APG's parameters: the panel's seed thresholds and minimum size (0 keeps APG's own
        default, 25 pixels), micro-sam's defaults for the rest."""
        from ..volume.apg import APGParams

        size = int(self.min_size.value)
        return APGParams(center_distance_threshold=float(self.center.value),
                         boundary_distance_threshold=float(self.boundary.value),
                         foreground_threshold=float(self.foreground.value),
                         **({"min_size": size} if size else {}))

    def request(self, session) -> AutoRequest:
        """What to run on ``session`` with the chosen mode; InputError when AIS is chosen for a
        session whose model has no decoder."""
        mode = session.automatic_mode(str(self.mode.value))
        if mode == "ais":
            return AutoRequest("ais", ais_params=self.ais_params())
        if mode == "apg":
            return AutoRequest("apg", apg_params=self.apg_params())
        return AutoRequest(mode)


@dataclass
class StackRun:
    """One automatic segmentation of the stack (or of slices ``zs``) with ``how``."""

    how: AutoRequest
    zs: list[int]
    done: int = 0  # slices finished so far (written by the worker, read on the GUI thread)
    live: Any = None  # the (Z, H, W) volume the run fills, once started

    @property
    def what(self) -> str:
        span = f"slices {self.zs[0]}–{self.zs[-1]}" if self.zs else "no slice"
        return f"{span} ({self.how.name})"

    def start(self, runner, session, shape: tuple[int, ...], on_result) -> Task | None:
        """Run it through ``session`` in ``runner``, filling a live ``(Z, H, W)`` volume."""
        if len(shape) != 3:
            raise InputError(f"segmenting a stack needs a (z, row, col) image, got shape {shape}")
        live = self.live = np.zeros(shape, np.int32)
        how, zs = self.how, list(self.zs)

        def run(report, cancelled):
            def progress(done, total):
                self.done = done
                report(done, total)

            return session.segment_stack_automatically(
                zs, how.params, mode=how.mode, ais_params=how.ais_params, apg_params=how.apg_params,
                progress=progress, cancel=cancelled, live=live,
            )

        return runner.start(run, f"segmenting {self.what} automatically", len(zs), on_result,
                            stoppable=True, live=live)


def write_stack(target, volume: np.ndarray, keep_existing: bool) -> list[int]:
    """Write the stitched ``(Z, H, W)`` labels into the Labels layer ``target`` as one undo step:
    each object gets the next free id; with ``keep_existing`` labels already drawn stay. Returns the
    ids written."""
    return pl.write_volume_labels(target, np.asarray(volume), keep_existing=keep_existing)


def describe_stack(run: StackRun, done: list[int], stopped: bool, ids: list[int], target_name: str) -> str:
    """The report: how many objects on how many slices, where, with which ids."""
    how = f"Stopped after {len(done)} of {len(run.zs)} slices" if stopped else f"Segmented {len(done)} slices"
    span = f" (z={min(done)}–{max(done)})" if done else ""
    id_text = f"ids {ids[0]}–{ids[-1]}" if len(ids) > 1 else (f"id {ids[0]}" if ids else "nothing new")
    return (f"{how}{span} automatically with {run.how.name}: {len(ids)} objects written into "
            f"{target_name!r} ({id_text}); one undo step.")
