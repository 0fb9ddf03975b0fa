"""The model part of the Segment widget: which model, checkpoint, decoder and device; loading in a worker.

The menu offers MobileSAM, micro-sam's models (downloaded on first use, with their AIS decoder),
and files: a MobileSAM checkpoint, a micro-sam model file (a model fine-tuned in micro-sam, its
decoder inside the file or in the separate *decoder* field, shown only for that choice) and a
distilled model. The *advanced* box beside the device shows the engine's other model options
(:class:`~napari_mobilesam.models.choice.ModelChoice`'s backend, precision, semantics and, for
models with micro-sam's AIS decoder, the decoder's precision); they apply whether shown or not and
are remembered with the other choices.

:class:`ModelPanel` owns its controls and its state (the loaded model, the load in progress, the
last failed choice). A failed load is not retried by itself: every click on the image would
otherwise start the download again and pop up the same error; *Load model* retries.

On the CPU the first start of new weights does not wait for their OpenVINO conversion
(:meth:`~napari_mobilesam.models.choice.ModelChoice.load_without_waiting`): the model runs the
exact torch path at once while a low-priority process converts, shown as a task in the activity
dock; then the fast encoder takes over (:class:`ConversionFollower`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton

from ..errors import WeightsError
from ..models.choice import FILE_MODELS, ModelChoice
from .settings import (
    DEV_MODEL_CHOICES,
    MICROSAM_FILE,
    WidgetSettings,
    device_choices,
    load_settings,
    model_choices,
    save_settings,
)
from .workers import Task, start_task

__all__ = ["ModelPanel", "model_error_message", "options_note", "MICROSAM_MODELS"]

#: Registry names of micro-sam's published models (two files each: the model and its AIS decoder).
MICROSAM_MODELS = ("vit_t_lm", "vit_t_em_organelles", "vit_b_lm", "vit_b_em_organelles")
#: Widget keys whose weights come from the file in 'checkpoint'.
_FILE_KEYS = (*FILE_MODELS, MICROSAM_FILE)
#: Widget keys of models with micro-sam's AIS decoder: the AIS decoder precision applies to them.
_DECODER_KEYS = (*MICROSAM_MODELS, MICROSAM_FILE)

#: The advanced options: ModelChoice's value -> the label shown (short: the dock keeps its width).
BACKENDS = {
    "auto": "auto (fastest here)",
    "openvino": "OpenVINO (CPU)",
    "torch": "torch",
    "eager": "eager (as built)",
}
PRECISIONS = {
    "auto": "auto (per model)",
    "fp32": "float32 (exact)",
    "mixed": "mixed (bf16 front)",
    "bf16": "bf16 (fastest)",
}
SEMANTICS = {
    "auto": "auto (per model)",
    "microsam": "as in micro-sam",
    "standard": "standard (as trained)",
}
AIS_PRECISIONS = {
    "auto": "auto (the encoder's)",
    "fp32": "float32 (exact)",
    "mixed": "mixed (faster)",
    "bf16": "bf16 (fastest)",
}

_BACKEND_TIP = (
    "How the image encoder runs. auto: OpenVINO on a CPU, optimised torch on a GPU. "
    "OpenVINO: CPUs only (converted once per model, then cached). torch: BatchNorm folded, "
    "channels-last (GPUs, or CPUs without OpenVINO). eager: the model exactly as built, "
    "float32 only, the slowest (for checks)"
)
_PRECISION_TIP = (
    "The image encoder's number format. auto: float32 for models with an AIS decoder (micro-sam's: "
    "the decoder amplifies rounding about 20 times, float32 keeps micro-sam's labels), otherwise "
    "mixed where the CPU has bf16. float32: exact. mixed: bf16 except the encoder's last stage "
    "(about 1.4x faster than float32 with OpenVINO; masks IoU 0.998 on the test fixture). bf16: "
    "the fastest, masks move most (IoU 0.95). With a micro-sam model, mixed or bf16 puts 12-15 % "
    "of the pixels in other AIS objects on the test fixture"
)
_SEMANTICS_TIP = (
    "How the weights are run. as in micro-sam: TinyViT's attention biases at zero and the AIS "
    "decoder's BatchNorm on each call's statistics, which is what micro-sam computes and how its "
    "published accuracy was measured. standard: the weights as trained (biases on, BatchNorm "
    "running statistics), as MobileSAM's and SAM's published results. auto: as in micro-sam for "
    "micro-sam's models and files with a decoder, standard for MobileSAM and SAM"
)
_AIS_PRECISION_TIP = (
    "The AIS decoder's number format (most of an AIS slice's time; OpenVINO on a CPU with bf16, "
    "elsewhere it stays float32). auto: the encoder's precision. float32: micro-sam's labels "
    "exactly. mixed: its high-resolution convolutions in bf16, 0.67-0.79x the decoder time, "
    "99.5-99.8 % of pixels in the same objects on the test fixture. bf16: the whole decoder, "
    "0.41-0.48x the time, 97-98.5 % the same"
)


def _advanced_combo(label: str, choices: dict[str, str], tooltip: str) -> ComboBox:
    combo = ComboBox(label=label, choices=[(text, key) for key, text in choices.items()], value="auto")
    combo.tooltip = tooltip
    _narrow(combo, 12)
    return combo


#: A model load's bar appears in the activity dock only if the load lasts longer: a cached start
#: takes 1.7-2.6 s in napari here, and adding a bar costs the GUI thread a whole-window repaint
#: (napari's ``add_progress_bar`` processes events: 147 ms in software OpenGL, the longest gap of
#: the model-load row). The status line says "loading" at once; a first start (download,
#: conversion) still shows its bar.
_LOAD_PROGRESS_AFTER_MS = 3000


def _microsam_offline_message(model: str) -> str:
    from ..models.weights import weights_path

    folder = weights_path(model).parent
    return (
        f"Could not download the micro-sam model {model} ({model}.pt and its decoder "
        f"{model}_decoder.pt): is this computer offline? Get both files on a connected computer "
        "(links in the Models page of the documentation), then either put them in "
        f"{folder} under those names, or choose the model 'micro-sam model file' and pick the model "
        "in 'checkpoint' and the decoder in 'decoder'; or connect and press Load model."
    )


def model_error_message(exc: BaseException, request: ModelChoice) -> str:
    """A short message for a failed load, worded for the widget's controls (not the Python API)."""
    text = str(exc) or type(exc).__name__
    offline = isinstance(exc, WeightsError) or "download" in text.lower()
    if request.model == "vit_t" and not request.has_file and offline:
        return (
            "Could not download the MobileSAM weights (mobile_sam.pt): is this computer offline? "
            "Get mobile_sam.pt on a connected computer, then choose the model 'MobileSAM "
            "checkpoint file' and pick the file in 'checkpoint'; or connect and press Load model."
        )
    if request.model in MICROSAM_MODELS and not request.has_file and offline:
        return _microsam_offline_message(request.model)
    first = text.split(". ")[0].strip().rstrip(".")
    if len(first) > 220:
        first = first[:217] + "…"
    return f"Could not load {request.describe()}: {first}. Check the model choice, then press Load model."


def _narrow(combo: ComboBox, chars: int = 22) -> None:
    """Size a combo box by ``chars`` characters, not by its longest choice (long model names
    would otherwise widen the dock and shrink the canvas); the open list shows names in full."""
    from qtpy.QtWidgets import QComboBox

    native = combo.native
    native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    native.setMinimumContentsLength(chars)
    native.view().setMinimumWidth(native.view().sizeHintForColumn(0) + 24)


class ModelPanel:
    """Model, checkpoint and device controls, the loaded model and its loading task.

    Parameters
    ----------
    saved : WidgetSettings
        The remembered choices to show first.
    on_loaded : callable(sam, request)
        Called on the GUI thread with a freshly loaded model.
    on_error : callable(message)
        Called on the GUI thread with a short message when loading fails.
    """

    def __init__(self, saved: WidgetSettings, on_loaded: Callable, on_error: Callable[[str], None]):
        self._on_loaded = on_loaded
        self._on_error = on_error
        self.extra: dict[str, str] = {}
        self.sam = None
        self.request: ModelChoice | None = None  # what ``sam`` was loaded from
        self.task: Task | None = None
        self.failed: ModelChoice | None = None  # the last choice that failed to load
        self.conversion = ConversionFollower(self)
        self._closed = False
        self.combo = ComboBox(label="model", choices=self._choices)
        self.combo.tooltip = (
            "Which weights segment: MobileSAM (natural images), micro-sam's microscopy models "
            "(light microscopy or EM organelles; they also segment whole slices automatically "
            "with their AIS decoder), or a .pt file of yours"
        )
        _narrow(self.combo)
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pt *.pth *.pth.tar")
        self.checkpoint.tooltip = "The MobileSAM / micro-sam / distilled model file (.pt) to load"
        self.checkpoint.line_edit.tooltip = self.checkpoint.tooltip
        self.checkpoint.choose_btn.tooltip = "Browse for the model file"
        self.decoder = FileEdit(label="decoder", mode="r", filter="*.pt *.pth")
        self.decoder.tooltip = (
            "micro-sam's AIS decoder file (*_decoder.pt) when it is not inside the model file; "
            "leave empty when the model file holds it (micro-sam's fine-tuned models do)"
        )
        self.decoder.line_edit.tooltip = self.decoder.tooltip
        self.decoder.choose_btn.tooltip = "Browse for the decoder file"
        self.device = ComboBox(label="device", choices=device_choices())
        self.device.tooltip = "Where the model runs: auto picks a GPU when there is one"
        self.advanced = CheckBox(text="advanced", value=False)
        self.advanced.tooltip = (
            "Show the advanced model options (encoder backend and precision, semantics, AIS decoder "
            "precision); they apply whether shown or not"
        )
        self.device_row = Container(widgets=[self.device, self.advanced], layout="horizontal",
                                    labels=False, label="device")
        self.device_row.margins = (0, 0, 0, 0)
        self.backend = _advanced_combo("backend", BACKENDS, _BACKEND_TIP)
        self.precision = _advanced_combo("precision", PRECISIONS, _PRECISION_TIP)
        self.semantics = _advanced_combo("semantics", SEMANTICS, _SEMANTICS_TIP)
        self.ais_precision = _advanced_combo("AIS decoder", AIS_PRECISIONS, _AIS_PRECISION_TIP)
        self.load_btn = PushButton(text="Load model")
        self.load_btn.tooltip = "Load (or reload) the chosen model; the first start takes longest"
        self.status = Label(value="model: not loaded")
        self.status.tooltip = "The model in use"
        self._restore(saved)
        for control in (self.combo, self.checkpoint, self.decoder, self.device, *self.options):
            control.changed.connect(self._on_choice_changed)
        self.advanced.changed.connect(self._on_advanced_toggled)
        self.load_btn.changed.connect(lambda: self.load(retry=True))

    @property
    def widgets(self) -> list:
        return [self.combo, self.checkpoint, self.decoder, self.device_row, *self.options,
                self.load_btn, self.status]

    @property
    def options(self) -> tuple[ComboBox, ...]:
        """The advanced option controls (backend, precision, semantics, AIS decoder precision)."""
        return (self.backend, self.precision, self.semantics, self.ais_precision)

    def _choices(self, _widget=None) -> list[tuple[str, str]]:
        return [(label, key) for key, label in {**model_choices(), **self.extra}.items()]

    def _restore(self, saved: WidgetSettings) -> None:
        self.combo.value = saved.model if saved.model in model_choices() else "vit_t"
        if saved.checkpoint:
            self.checkpoint.value = saved.checkpoint
        if saved.decoder:
            self.decoder.value = saved.decoder
        if saved.device in self.device.choices:
            self.device.value = saved.device
        for combo, value in zip(self.options, (saved.backend, saved.precision, saved.semantics,
                                               saved.ais_precision)):
            combo.value = value if value in combo.choices else "auto"  # an unknown value: the default
        self.advanced.value = saved.advanced
        self._update_visibility()

    def _update_visibility(self) -> None:
        self.checkpoint.visible = self.combo.value in _FILE_KEYS
        self.decoder.visible = self.combo.value == MICROSAM_FILE
        shown = bool(self.advanced.value)
        for combo in self.options[:3]:
            combo.visible = shown
        self.ais_precision.visible = shown and self._has_decoder_choice()

    def _has_decoder_choice(self) -> bool:
        """Whether the chosen model comes with micro-sam's AIS decoder (its precision applies)."""
        return self.combo.value in _DECODER_KEYS

    @staticmethod
    def _path(edit: FileEdit) -> str:
        text = str(edit.value)
        return "" if text in (".", "") else text

    def choice(self) -> ModelChoice:
        """The model, checkpoint, decoder, device and advanced options currently chosen (a
        micro-sam model file loads as ``ModelChoice("checkpoint", file, decoder=decoder file)``;
        the AIS decoder precision only for models with micro-sam's decoder, else ``"auto"``)."""
        key = self.combo.value
        checkpoint = self._path(self.checkpoint) if key in _FILE_KEYS else ""
        options = {
            "backend": self.backend.value,
            "precision": self.precision.value,
            "semantics": self.semantics.value,
            "ais_precision": self.ais_precision.value if self._has_decoder_choice() else "auto",
        }
        if key == MICROSAM_FILE:
            return ModelChoice("checkpoint", checkpoint, self.device.value, decoder=self._path(self.decoder),
                               **options)
        return ModelChoice(key, checkpoint, self.device.value, **options)

    def _save(self) -> None:
        key = self.combo.value
        if key not in model_choices():  # dev-only test models are not persisted
            return
        save_settings(replace(
            load_settings(), model=key, checkpoint=self._path(self.checkpoint) if key in _FILE_KEYS else "",
            device=self.device.value, decoder=self._path(self.decoder) if key == MICROSAM_FILE else "",
            backend=self.backend.value, precision=self.precision.value, semantics=self.semantics.value,
            ais_precision=self.ais_precision.value, advanced=bool(self.advanced.value),
        ))  # the widget's other settings (autosave) as they are

    def _on_advanced_toggled(self, _value=None) -> None:
        self._update_visibility()
        self._save()

    def _on_choice_changed(self, _value=None) -> None:
        self._update_visibility()
        request = self.choice()
        self.failed = None
        self._save()
        if self.request is not None and request != self.request:
            self.status.value = f"model: {self.request.describe()} (choice changed: Load model to switch)"

    def enable_dev_models(self) -> None:
        self.extra.update(DEV_MODEL_CHOICES)
        self.combo.reset_choices()

    @property
    def closed(self) -> bool:
        return self._closed

    @closed.setter
    def closed(self, value: bool) -> None:
        """Closing the widget stops a running OpenVINO conversion (its process ends at once)."""
        self._closed = bool(value)
        if value:
            self.conversion.cancel()

    @property
    def loading(self) -> bool:
        return self.task is not None and not self.task.done

    def load(self, request: ModelChoice | None = None, *, retry: bool = False) -> Task | None:
        """Load ``request`` (default: the chosen model) in a worker; None when nothing started.

        Without ``retry``, a choice that already failed is not loaded again (the error stays in
        the status line; *Load model* passes ``retry``).
        """
        request = request or self.choice()
        if self.loading:
            return self.task
        if request.model in FILE_MODELS and not request.has_file:
            self._fail(request, "Choose the checkpoint file (.pt) in 'checkpoint' first, then press Load model.")
            return None
        if request == self.failed and not retry:
            return None
        self.failed = None
        self.status.value = f"model: loading {request.describe()}…"
        self.task = start_task(
            lambda report, cancelled: load_for_widget(request),
            description=f"MobileSAM: loading {request.describe()}",
            on_result=lambda loaded: self._loaded(*loaded, request),
            on_error=lambda exc: self._fail(request, model_error_message(exc, request), exc),
            progress_after_ms=_LOAD_PROGRESS_AFTER_MS,
        )
        return self.task

    def _loaded(self, sam, conversion, request: ModelChoice) -> None:
        if self.closed:
            if conversion is not None:
                conversion.cancel()
            return
        self._on_loaded(sam, request)
        if conversion is not None:
            self.conversion.follow(conversion, sam, request)

    def _fail(self, request: ModelChoice, message: str, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self.failed = request
        self.status.value = f"model: failed to load {request.describe()}"
        self._on_error(message)

    def set_loaded(self, sam, request: ModelChoice) -> None:
        if sam is not self.conversion.sam:
            self.conversion.cancel()  # another model now: its conversion is of no use
        self.sam, self.request, self.failed = sam, request, None
        extra = " (with AIS decoder)" if self.has_decoder else ""
        self.status.value = f"model: {request.describe()}{extra} ✓{options_note(sam, request)}"

    @property
    def has_decoder(self) -> bool:
        """Whether the loaded model has micro-sam's AIS decoder (automatic instance segmentation)."""
        if self.sam is None:
            return False
        from ..models.registry import ais_decoder

        return ais_decoder(self.sam) is not None


def options_note(sam, request: ModelChoice) -> str:
    """Status lines (each starting with a newline; short: a long line would widen the dock) naming
    the advanced options that are not "auto", which apply even while their rows are hidden, and
    a reduced AIS decoder precision the loaded model does not run."""
    chosen = [request.backend, request.precision, request.semantics]
    chosen = [value for value in chosen if value != "auto"]
    if request.ais_precision != "auto":
        chosen.append(f"AIS {request.ais_precision}")
    note = f"\noptions: {', '.join(chosen)}" if chosen else ""
    if request.ais_precision in ("mixed", "bf16") and sam is not None:
        from ..models.registry import ais_decoder

        decoder = ais_decoder(sam)
        # the only fallback is float32 (a torch decoder has no precision: float32 too)
        if decoder is not None and getattr(decoder, "precision", "fp32") != request.ais_precision:
            why = ("CPU without bf16" if getattr(decoder, "backend_name", "") == "openvino"
                   else "needs OpenVINO")
            note += f"\nAIS decoder in float32 ({why})"
    return note


def load_for_widget(request: ModelChoice):
    """``request.load_without_waiting()`` (worker thread), then what the widget's first session
    of this model would otherwise compute on the GUI thread: the prompt encoder's dense positional
    encoding (cached on the model, tens of ms), the weights' digests of the model's identity, and
    the session modules' imports."""
    import torch

    from ..core import predictor, session, tiles  # noqa: F401 - imported here, not on the GUI thread
    from ..models.registry import model_identity

    sam, conversion = request.load_without_waiting()
    with torch.no_grad():  # as SlicePredictor asks for it: the cached tensor is the one it gets
        sam.prompt_encoder.get_dense_pe()
    model_identity(sam)
    return sam, conversion


class ConversionFollower:
    """Follows a background OpenVINO conversion of the loaded model and switches it when done.

    A task in the activity dock waits for the converting process and compiles the result (off
    the GUI thread); the switch itself happens on the GUI thread. Meanwhile the model status says
    that masks use the exact path; a failed conversion keeps the torch model and says so.
    """

    MESSAGE = "converting the encoder for fast CPU inference… masks use the exact path meanwhile"

    def __init__(self, panel: ModelPanel):
        self._panel = panel
        self.sam = None
        self.running = None  # the BackgroundConversion followed
        self.task: Task | None = None

    def follow(self, conversion, sam, request: ModelChoice) -> None:
        self.cancel()
        self.sam, self.running = sam, conversion
        # short lines: a long one would widen the dock (and shrink the canvas) for good
        self._panel.status.value = (f"model: {request.describe()} ✓ (exact path)\n"
                                    + self.MESSAGE.replace("… ", "…\n"))

        def wait_and_build(report, cancelled):
            if not conversion.wait(cancelled=cancelled):
                if conversion.state == "failed":
                    raise RuntimeError(conversion.error)
                return None  # cancelled
            return conversion.build()

        self.task = start_task(
            wait_and_build,
            description=f"MobileSAM: {self.MESSAGE}",
            on_result=lambda parts: self._switch(conversion, sam, request, parts),
            on_error=lambda exc: self._failed(conversion, request, exc),
        )

    def _current(self, conversion) -> bool:
        return not self._panel.closed and conversion is self.running and self._panel.sam is self.sam

    def _switch(self, conversion, sam, request: ModelChoice, parts) -> None:
        if parts is None or not self._current(conversion):
            return
        conversion.switch(sam, parts)
        self.running = None
        self._panel.status.value = (f"model: {request.describe()} ✓ (fast OpenVINO encoder)"
                                    f"{options_note(sam, request)}")

    def _failed(self, conversion, request: ModelChoice, exc: BaseException) -> None:
        if not self._current(conversion):
            return
        self.running = None
        message = (f"The fast CPU encoder could not be built ({str(exc)[:200]}); masks keep using "
                   "the exact torch path.")
        self._panel.status.value = f"model: {request.describe()} ✓ (exact path:\nthe conversion failed)"
        self._panel._on_error(message)

    def cancel(self) -> None:
        """Stop following: the converting process ends, the model stays as it is."""
        conversion, self.running, self.sam = self.running, None, None
        if conversion is not None:
            conversion.cancel()
        task, self.task = self.task, None
        if task is not None and not task.done:
            task.cancel()
