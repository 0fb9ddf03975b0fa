"""Devices: which torch device to run on, which ones this machine offers, what its CPU can do.

Every part of napari-mobilesam (model loading, distillation, the widgets' device menus) asks here.
Device names are torch's: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; ``"auto"`` or ``None``
picks CUDA, then Apple's MPS, then the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DeviceError

__all__ = ["choose_device", "device_choices", "cpu_has_bf16", "cpu_has_amx"]


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def choose_device(device: Any = None, local_rank: int = 0):
    """``device`` as a ``torch.device``.

    ``None`` or ``"auto"`` picks CUDA (``cuda:<local_rank>`` for multi-process training), then MPS,
    then the CPU. A named device must exist on this machine: raises :class:`DeviceError` for a name
    that is no device or a CUDA/MPS device that is not available, saying what to use instead.
    """
    import torch

    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DeviceError(
            f"invalid device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} asked for, but this machine has no usable CUDA GPU "
                "(or torch was built without CUDA): use device 'cpu' or 'auto' (--device cpu)"
            )
        n = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", local_rank % n)
        elif dev.index >= n:
            raise DeviceError(f"device {device!r} asked for, but this machine has {n} CUDA GPU(s): use cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not _mps_available(torch):
        raise DeviceError(f"device {device!r} asked for, but Apple MPS is not available here: use device 'cpu'")
    return dev


def device_choices() -> list[str]:
    """``["auto", "cpu"]`` plus ``"cuda"`` / ``"mps"`` where torch can use them (for menus)."""
    choices = ["auto", "cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            choices.append("cuda")
        if _mps_available(torch):
            choices.append("mps")
    except Exception:  # noqa: BLE001 - a broken torch shows up when the model loads
        pass
    return choices


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 instructions (AVX512-BF16 or AMX; OpenVINO uses both)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX-BF16 tiles (where torch's bf16 autocast beats float32 on a CPU)."""
    return "amx_bf16" in _cpu_flags()
