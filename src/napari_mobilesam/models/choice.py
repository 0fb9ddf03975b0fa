"""The model a user chose, as one small picklable value that every part passes around.

The widget, the batch API, the command line and dask workers all describe a model as a
:class:`ModelChoice` and get the loaded ``Sam`` from :meth:`ModelChoice.load`; nothing else
interprets model names, checkpoint files, devices, backends or precisions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ModelError

__all__ = ["ModelChoice", "FILE_MODELS"]

#: Model names meaning "the architecture of the checkpoint file" (detected from its keys).
FILE_MODELS = ("checkpoint", "distilled")


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load, and how.

    Attributes
    ----------
    model : str
        A registry name (``"vit_t"``: MobileSAM, the default; ``"vit_b"``, ``"vit_l"``, ``"vit_h"``;
        ``"vit_t_test"``), or ``"checkpoint"`` / ``"distilled"``: the architecture of the
        ``checkpoint`` file, detected from its keys.
    checkpoint : str, path, state dict or None
        Weights for ``model``. Empty or None: the model's downloaded default weights (registry
        names only).
    device : str or None
        ``"auto"``/None (CUDA, then MPS, then the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    backend : str
        ``"auto"`` (the fastest for the device), ``"openvino"``, ``"torch"`` or ``"eager"`` (the
        model exactly as built).
    precision : str
        ``"auto"``, ``"fp32"`` (exact float32), ``"mixed"`` or ``"bf16"``.
    decoder : str, path, state dict or None
        An AIS decoder file (micro-sam's ``*_decoder.pt``) replacing the model's own. Empty: the
        model's published decoder (micro-sam models) or the checkpoint's ``decoder_state``.
    semantics : str
        ``"auto"`` (the model's default), ``"standard"`` or ``"microsam"``
        (see :mod:`napari_mobilesam.models.registry`).
    ais_precision : str
        The AIS decoder's precision (models with one, OpenVINO backend): ``"auto"`` (the
        encoder's; float32 unless ``precision`` asks for less), ``"fp32"``, ``"mixed"`` or
        ``"bf16"``: a faster decoder at the cost of exact micro-sam labels (docs/models.md).
    """

    model: str = "vit_t"
    checkpoint: Any = ""
    device: str | None = "auto"
    backend: str = "auto"
    precision: str = "auto"
    decoder: Any = ""
    semantics: str = "auto"
    ais_precision: str = "auto"

    @classmethod
    def of(cls, model: Any = "vit_t", checkpoint: Any = None, device: Any = None,
           backend: str = "auto", precision: str = "auto", *, decoder: Any = None,
           semantics: str = "auto", ais_precision: str = "auto") -> ModelChoice:
        """A choice from the batch API's loose arguments; ``model`` may already be a choice."""
        if isinstance(model, ModelChoice):
            return model
        if not isinstance(model, str):
            raise ModelError(
                f"model must be a model name such as 'vit_t', a ModelChoice or a Sam model, "
                f"not {type(model).__name__}"
            )
        if isinstance(checkpoint, (str, os.PathLike)) and str(checkpoint):
            checkpoint = str(Path(checkpoint).expanduser())
        if isinstance(decoder, (str, os.PathLike)) and str(decoder):
            decoder = str(Path(decoder).expanduser())
        return cls(model, checkpoint if checkpoint is not None else "",
                   "auto" if device is None else str(device), backend, precision,
                   decoder if decoder is not None else "", semantics, ais_precision)

    @property
    def has_file(self) -> bool:
        """Whether the weights come from a file (a path in ``checkpoint``)."""
        return isinstance(self.checkpoint, (str, os.PathLike)) and bool(str(self.checkpoint))

    def portable(self) -> ModelChoice:
        """This choice with the checkpoint as an absolute path, for other processes (dask workers).

        Raises ModelError when the weights are an in-memory state dict.
        """
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise ModelError("with a dask client, checkpoint must be a file path the workers can read")
        if self.decoder is not None and not isinstance(self.decoder, (str, os.PathLike)):
            raise ModelError("with a dask client, decoder must be a file path the workers can read")
        out = self
        if isinstance(self.decoder, (str, os.PathLike)) and str(self.decoder):
            out = replace(out, decoder=str(Path(self.decoder).expanduser().resolve()))
        if not self.has_file:
            return out
        return replace(out, checkpoint=str(Path(self.checkpoint).expanduser().resolve()))

    def describe(self) -> str:
        """Short text for messages, e.g. ``"student.pt on cpu"``."""
        what = Path(str(self.checkpoint)).name if self.has_file else self.model
        return f"{what} on {self.device or 'auto'}"

    def _weights(self) -> tuple[str, Any]:
        """(registry name, checkpoint for build_sam): reads a file model's state to detect it."""
        if self.model not in FILE_MODELS:
            return self.model, (self.checkpoint or None)
        if not self.has_file and not isinstance(self.checkpoint, dict):
            raise ModelError(
                "no checkpoint file chosen: pick the .pt file in the widget's checkpoint field "
                "(--checkpoint on the command line, checkpoint= in Python)"
            )
        from .checkpoint import detect_architecture, read_checkpoint, split_checkpoint

        state = self.checkpoint
        if not isinstance(state, dict):
            path = Path(state).expanduser()
            if not path.is_file():
                raise ModelError(f"checkpoint file not found: {path}")
            model, dec = read_checkpoint(path)
        else:
            model, dec = split_checkpoint(state, "the state dict")
        weights = model if dec is None else {"model_state": model, "decoder_state": dec}
        return detect_architecture(model) or "vit_t", weights

    def load(self):
        """Build the model and apply the backend (slow: seconds; call it off the GUI thread).

        Returns a ``segment_anything.modeling.Sam`` in eval mode. Raises :class:`ModelError` (or
        one of its subclasses) naming the problem and the fix. On the CPU, the first load of new
        weights waits for their OpenVINO conversion (see :meth:`load_without_waiting`).
        """
        return self._load(background=False)[0]

    def load_without_waiting(self):
        """Like :meth:`load`, but never waits for an OpenVINO conversion: ``(sam, conversion)``.

        When this choice means OpenVINO (backend ``"auto"`` or ``"openvino"`` on the CPU) and the
        weights' IR is not cached yet, ``sam`` runs the exact torch backend (float32) at once and
        ``conversion`` is the running
        :class:`~napari_mobilesam.models.backends.background.BackgroundConversion` (its
        ``build()`` then ``switch(sam, ...)`` move ``sam`` to OpenVINO); otherwise ``conversion``
        is None and ``sam`` is what :meth:`load` returns. The widget uses this; batch runs use
        :meth:`load`, which converts first (a whole stack gains more from the fast encoder than
        the conversion costs).
        """
        return self._load(background=True)

    def _background_applies(self, device) -> bool:
        if self.backend not in ("auto", "openvino"):
            return False
        from .backends.background import openvino_available
        from .devices import choose_device

        return choose_device(device).type == "cpu" and openvino_available()

    def _load(self, background: bool):
        from .registry import MODELS, build_sam, load_model, precision_for

        if self.model not in MODELS and self.model not in FILE_MODELS:
            raise ModelError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.backend not in ("auto", "openvino", "torch", "eager"):
            raise ModelError(f"unknown backend {self.backend!r}; choose auto, openvino, torch or eager")
        if self.precision not in ("auto", "fp32", "mixed", "bf16"):
            raise ModelError(f"unknown precision {self.precision!r}; choose auto, fp32, mixed or bf16")
        from .backends import AIS_PRECISIONS

        if self.ais_precision not in AIS_PRECISIONS:
            raise ModelError(f"unknown AIS decoder precision {self.ais_precision!r}; "
                             "choose auto, fp32, mixed or bf16")
        device = None if self.device in (None, "", "auto") else self.device
        try:
            model, checkpoint = self._weights()
            extra = {"decoder": self.decoder or None, "semantics": self.semantics}
            if (self.backend == "eager" and device in (None, "cpu")
                    and self.precision in ("auto", "fp32")):
                return build_sam(model, checkpoint, **extra), None  # the exact model: no backend
            if background and self._background_applies(device):
                from .backends.background import start_with_torch

                sam = build_sam(model, checkpoint, **extra)
                return start_with_torch(sam, device, precision_for(sam, self.precision),
                                        self.ais_precision)
            return load_model(model, checkpoint, device, backend=self.backend,
                              precision=self.precision, ais_precision=self.ais_precision,
                              **extra), None
        except ModelError:
            raise
        except (OSError, ConnectionError) as exc:
            hint = (
                " The default MobileSAM weights are downloaded on first use; this computer could "
                "not fetch them. Connect to the internet once, or download mobile_sam.pt elsewhere "
                "and choose it as the checkpoint file."
                if self.model == "vit_t" and not self.has_file
                else ""
            )
            raise ModelError(f"could not load {self.describe()}: {exc}.{hint}") from exc
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"could not load {self.describe()}: {exc}") from exc
