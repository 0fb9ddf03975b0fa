"""Persisted choices of the segmentation widget (model, checkpoint, decoder file, device, the
advanced model options: backend, precision, semantics, AIS decoder precision; and autosave).

The choices are kept in a small JSON file so that they survive a napari restart:
``$NAPARI_MOBILESAM_CONFIG/segment_widget.json`` when that variable is set, otherwise in the
per-user configuration directory (``platformdirs.user_config_dir("napari-mobilesam")``).
A missing or unreadable file gives the defaults; it is never an error. Files written by an older
version (without the advanced options) load with those options at their defaults.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..files import atomic_write_text
from ..models.devices import device_choices

__all__ = [
    "MODEL_CHOICES",
    "MICROSAM_FILE",
    "AUTO_MODES",
    "DEV_MODEL_CHOICES",
    "WidgetSettings",
    "dev_mode",
    "device_choices",
    "model_choices",
    "settings_path",
    "load_settings",
    "save_settings",
]

log = logging.getLogger(__name__)

#: The widget's key for "a micro-sam model file" (a user's fine-tuned micro-sam model; its AIS
#: decoder inside the file or in a separate decoder file). It loads as ``ModelChoice("checkpoint",
#: file, decoder=decoder file)``.
MICROSAM_FILE = "microsam_file"

#: Model choices every user sees: key -> label shown in the widget. The micro-sam keys are the
#: registry's names (``models/registry.py``); their two files are downloaded on first use.
MODEL_CHOICES: dict[str, str] = {
    "vit_t": "MobileSAM (default weights, downloaded once)",
    "vit_t_lm": "micro-sam LM generalist (vit_t_lm: light microscopy, cells and nuclei)",
    "vit_t_em_organelles": "micro-sam EM organelles (vit_t_em_organelles: electron microscopy)",
    "vit_b_lm": "micro-sam LM generalist, ViT-B (vit_b_lm: light microscopy; about 10x slower)",
    "vit_b_em_organelles": "micro-sam EM organelles, ViT-B (vit_b_em_organelles; about 10x slower)",
    "checkpoint": "MobileSAM checkpoint file",
    MICROSAM_FILE: "micro-sam model file (e.g. fine-tuned in micro-sam)",
    "distilled": "Distilled model (file)",
}

#: Automatic segmentation modes offered by the widget: key -> label. ``"ais"`` needs a model with
#: an AIS decoder (the micro-sam models); ``"grid"`` works with every model.
AUTO_MODES: dict[str, str] = {
    "ais": "AIS (micro-sam)",
    "apg": "APG (micro-sam prompts)",
    "grid": "SAM point grid",
}
#: Extra choices shown only in development mode (``NAPARI_MOBILESAM_DEV=1``).
DEV_MODEL_CHOICES: dict[str, str] = {
    "vit_t_test": "vit_t_test (tiny, random weights: for development)",
}


def dev_mode() -> bool:
    """True when the environment variable ``NAPARI_MOBILESAM_DEV`` is set to 1/true/yes."""
    return os.environ.get("NAPARI_MOBILESAM_DEV", "").strip().lower() in {"1", "true", "yes"}


def model_choices(include_dev: bool | None = None) -> dict[str, str]:
    """The model choices to offer: ``MODEL_CHOICES`` plus the dev ones in development mode."""
    include_dev = dev_mode() if include_dev is None else include_dev
    return {**MODEL_CHOICES, **(DEV_MODEL_CHOICES if include_dev else {})}



@dataclass
class WidgetSettings:
    """What the widget remembers between sessions.

    Attributes
    ----------
    model : str
        A key of :func:`model_choices` (``"vit_t"``, ``"vit_t_lm"``, ``"checkpoint"``,
        ``"microsam_file"``, ``"distilled"``...).
    checkpoint : str
        Path of the checkpoint / distilled / micro-sam model file ("" when the model needs none).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    decoder : str
        Path of a separate micro-sam AIS decoder file (``*_decoder.pt``) for ``"microsam_file"``
        ("" when the decoder is inside the model file).
    backend, precision, semantics, ais_precision : str
        The advanced model options, as :class:`~napari_mobilesam.models.choice.ModelChoice`
        names them (``"auto"``: the engine's choice for the model and device).
    advanced : bool
        Whether the advanced model options are shown.
    autosave : bool
        Whether the labels of the image being segmented are autosaved (``io/autosave.py``).
    autosave_folder : str
        Where ("": :func:`napari_mobilesam.io.autosave.autosave_folder`).
    """

    model: str = "vit_t"
    checkpoint: str = ""
    device: str = "auto"
    decoder: str = ""
    backend: str = "auto"
    precision: str = "auto"
    semantics: str = "auto"
    ais_precision: str = "auto"
    advanced: bool = False
    autosave: bool = True
    autosave_folder: str = ""


def settings_path() -> Path:
    """The JSON file the settings are read from and written to."""
    base = os.environ.get("NAPARI_MOBILESAM_CONFIG")
    if base:
        return Path(base) / "segment_widget.json"
    import platformdirs

    return Path(platformdirs.user_config_dir("napari-mobilesam")) / "segment_widget.json"


def load_settings() -> WidgetSettings:
    """Read the saved settings; unknown keys are ignored, values of the wrong type fall back to
    the defaults (the widget also checks each value against its choices)."""
    path = settings_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return WidgetSettings()
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable widget settings %s: %s", path, exc)
        return WidgetSettings()
    if not isinstance(raw, dict):
        return WidgetSettings()
    kinds = {f.name: type(f.default) for f in fields(WidgetSettings)}
    values = {k: v for k, v in raw.items() if k in kinds and type(v) is kinds[k]}
    return WidgetSettings(**values)


def save_settings(settings: WidgetSettings) -> Path:
    """Write the settings atomically (temporary file + rename) and return the file's path."""
    return atomic_write_text(settings_path(), json.dumps(asdict(settings), indent=2))
