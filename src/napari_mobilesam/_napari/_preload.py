"""Load torch's optional ``triton`` package safely inside a running napari (Linux).

napari creates an OpenGL context before any plugin widget is imported. With Mesa's drivers
(llvmpipe in VMs and headless machines, radeonsi on AMD GPUs) that context loads Mesa's own LLVM.
``triton`` (shipped with torch's Linux wheels, imported by ``torch._dynamo``, which ``torchvision``
and therefore ``segment_anything`` import) bundles another LLVM; loaded after Mesa's, its symbols
bind to Mesa's copy and the process dies with a segmentation fault. Loading triton once with
``RTLD_DEEPBIND`` makes it use its own symbols; later imports find it in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["preload_triton"]


def preload_triton() -> bool:
    """Import ``triton`` with ``RTLD_DEEPBIND`` if it is installed and not yet imported.

    Returns True when this call imported it. A no-op elsewhere than Linux, or when triton is absent
    or already imported; an import failure is ignored (torch then runs without triton, as on a
    machine where it is not installed).
    """
    deepbind = getattr(os, "RTLD_DEEPBIND", None)
    if sys.platform != "linux" or deepbind is None or "triton" in sys.modules:
        return False
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):
        return False
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | deepbind)
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - a broken triton must not stop the widget
        return False
    finally:
        sys.setdlopenflags(flags)
    return True
