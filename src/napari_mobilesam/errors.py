"""The errors napari-mobilesam raises: one class per family, each message naming the problem and
the fix.

::

    MobileSAMError
    ├── InputError        bad image, stack, layout or settings          (CLI exit 3)
    │   └── PromptError   a prompt or prompts table that cannot be used
    ├── OutputError       output exists, is the input, or cannot be written  (CLI exit 4)
    ├── ModelError        model choice, checkpoint or weights            (CLI exit 5)
    │   ├── DeviceError   a device that does not exist or is not available here
    │   ├── CheckpointError
    │   └── WeightsError
    │       └── WeightsHashError
    └── DistillError      distillation data or settings

``InputError``, ``PromptError``, ``DeviceError``, ``CheckpointError`` and ``DistillError`` are also ``ValueError``
and ``WeightsError`` is also a ``RuntimeError``, so code written against the built-in classes
keeps working.
"""

from __future__ import annotations

__all__ = [
    "MobileSAMError",
    "InputError",
    "PromptError",
    "OutputError",
    "ModelError",
    "DeviceError",
    "CheckpointError",
    "WeightsError",
    "WeightsHashError",
    "DistillError",
]


class MobileSAMError(Exception):
    """Base of every error napari-mobilesam raises on purpose."""


class InputError(MobileSAMError, ValueError):
    """An input that cannot be used as asked: unreadable file, wrong shape or layout, bad setting."""


class PromptError(InputError):
    """A prompt (empty, outside the slice, NaN, wrong shape) or a prompts table (CSV, Points/Shapes
    data, arrays) that is malformed or does not fit the stack."""


class OutputError(MobileSAMError):
    """An output that exists (and may not be replaced), is the input, or cannot be written."""


class ModelError(MobileSAMError):
    """A model that cannot be chosen or loaded (unknown name, device, backend)."""


class DeviceError(ModelError, ValueError):
    """A device name that is not a device, or a device this machine does not have."""


class CheckpointError(ModelError, ValueError):
    """A checkpoint file or state dict that cannot be used, with the reason and the fix."""


class WeightsError(ModelError, RuntimeError):
    """Weights that are not in the cache and could not be fetched (says what to do instead)."""


class WeightsHashError(WeightsError, ValueError):
    """A downloaded or cached file whose hash is not the pinned one (nothing was kept)."""


class DistillError(MobileSAMError, ValueError):
    """Invalid distillation input or settings; the message names the problem and the fix."""
