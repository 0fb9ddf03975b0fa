"""Reuse of freed tensor memory in this process (glibc's allocator, Linux).

glibc serves every allocation above its mmap threshold (at most 32 MiB, often less) with a fresh
``mmap`` and returns it to the system on ``free``; a thread other than the main one gets its own
arena, whose heaps cannot hold such blocks either. The eager models allocate and free tensors of
64–256 MiB at every layer (the AIS decoder's 512² and 1024² stages, the encoder's first stages,
training's activations and gradients), so each layer's output pages are faulted in and zeroed by
the kernel again: on this project's 2-core machine a float32 AIS decoder pass on one thread spent
about 7 s in the kernel for 6 s of computation, 1.4 s after :func:`reuse_freed_memory`.

:func:`reuse_freed_memory` (called when a model is built) keeps large blocks in the heap so freed
memory is reused, and makes threads started afterwards share the main arena;
:func:`release_freed_memory` (called when a batch run, a widget task or a distillation ends) gives
the free pages back to the system, so the process's resident memory after a run is what it holds,
not its peak. Set ``NAPARI_MOBILESAM_REUSE_MEMORY=0`` to leave the allocator as it is. Elsewhere
than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Freed memory kept at the top of the heap between two releases (and the largest block served from
#: the heap where glibc allows it; older glibc caps the mmap threshold at 32 MiB).
KEEP_BYTES = 1 << 30

_lock = threading.Lock()
_state: dict[str, object] = {}


def _libc():
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (AttributeError, ValueError, OSError):  # not glibc (or not a POSIX system)
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory() -> bool:
    """Keep freed blocks (up to :data:`KEEP_BYTES`) in the heap for reuse; idempotent.

    Returns whether the allocator was set (False off glibc or when switched off by
    ``NAPARI_MOBILESAM_REUSE_MEMORY=0``). Process-wide: threads that have not allocated yet share
    the main arena from then on.
    """
    with _lock:
        if "set" in _state:
            return bool(_state["set"])
        libc = _libc()
        ok = False
        if libc is not None and os.environ.get("NAPARI_MOBILESAM_REUSE_MEMORY", "1") != "0":
            threshold = KEEP_BYTES if libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) else 32 << 20
            if threshold != KEEP_BYTES:
                libc.mallopt(_M_MMAP_THRESHOLD, threshold)
            ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(_M_ARENA_MAX, 1))
            log.debug("allocator: blocks up to %d bytes from the heap, freed memory kept for reuse", threshold)
        _state["set"] = ok
        _state["libc"] = libc if ok else None
        return ok


def release_freed_memory() -> None:
    """Return the heap's free pages to the system (``malloc_trim``); a no-op unless
    :func:`reuse_freed_memory` set the allocator."""
    libc = _state.get("libc")
    if libc is not None:
        libc.malloc_trim(0)
