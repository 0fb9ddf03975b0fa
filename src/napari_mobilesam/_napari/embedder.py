"""Embedding the slice in view in a worker, one at a time, then prefetching its neighbours.

:class:`SliceEmbedder` holds the embedding task and the slice wanted next (the user may move on
while one is computed: the last slice asked for is embedded next, the ones passed over are not).
On tiled slices it also embeds, in the same worker, the tiles an object runs into
(:meth:`SliceEmbedder.follow`): the GUI thread only decodes, with the tiles embedded so far, and
the preview grows as the next tiles arrive.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .workers import Task, start_task

__all__ = ["SliceEmbedder", "prompt_key"]

#: A slice's progress bar appears only if its embedding takes longer (a cached one takes ms).
_PROGRESS_AFTER_MS = 300


def prompt_key(z: int, prompt, mask=None) -> tuple:
    """A hashable name of one slice's prompt (points, labels, box and an optional (H, W) bool mask
    prompt): tiles followed for one prompt are not asked for twice (see ``SliceEmbedder.follow``)."""
    def raw(a):
        return None if a is None else np.asarray(a).tobytes()

    mask_key = None if mask is None else hash(np.packbits(np.asarray(mask, bool)).tobytes())
    return (int(z), raw(prompt.points), raw(prompt.labels), raw(prompt.box), mask_key)


class SliceEmbedder:
    """Embeds slices of a session in a worker; calls ``on_ready(z)`` for the slice still wanted.

    Parameters
    ----------
    current_z : callable() -> int
        The slice in view now.
    on_ready : callable(z)
        Called on the GUI thread when slice ``z`` (the one in view) is embedded.
    on_status : callable(text), on_error : callable(exc, doing)
    """

    def __init__(self, current_z: Callable[[], int], on_ready: Callable[[int], None], on_status, on_error):
        self._current_z = current_z
        self._on_ready = on_ready
        self._on_status = on_status
        self._on_error = on_error
        self.session = None
        self.task: Task | None = None
        self.wanted: int | None = None
        self.closed = False
        # tiles an object runs into: (z, tile indices) still to embed; what was embedded for
        # the current prompt (a tile asked for twice was evicted: the cache is too small)
        self._tiles_wanted: tuple[int, tuple[int, ...]] | None = None
        self._follow_key = None
        self._followed: set[tuple[int, int]] = set()
        # slices embedded for this session: asking the cache means naming the slice by its content
        # (reading, normalising and hashing it: ms per slice, the stack's range once), which the
        # GUI thread leaves to the worker; a slice evicted since is embedded again by the decoder
        self._known: set[int] = set()

    def use(self, session) -> None:
        """Embed for ``session`` from now on (None: none); results for an older one are dropped."""
        self.session, self.wanted = session, None
        self._tiles_wanted, self._follow_key, self._followed = None, None, set()
        self._known = set()

    @staticmethod
    def neighbours(z: int) -> list[int]:
        return [z + 1, z - 1, z + 2, z - 2]

    def ready(self, z: int) -> bool:
        """True when slice z is embedded; otherwise start (or queue) its embedding in a worker."""
        session = self.session
        if session is None:
            return False
        if z in self._known or getattr(session, "cache", True) is None:  # no cache: nothing to embed
            return True
        if getattr(session, "tiled", False):  # which tiles: the focus decides (set on this thread)
            try:
                if session.is_embedded(z):
                    return True
            except Exception as exc:  # noqa: BLE001
                self._on_error(exc, f"reading slice {z}")
                return False
        self.wanted = z
        if self.task is not None and not self.task.done:
            return False  # picked up when the running embedding finishes
        self.task = start_task(
            lambda report, cancelled: session.embed(z),
            description=f"MobileSAM: embedding slice {z}",
            on_result=lambda _r: self._embedded(session, z),
            on_error=lambda exc: self._failed(session, exc, z),
            progress_after_ms=_PROGRESS_AFTER_MS,
        )
        self._on_status(f"Computing the embedding of slice {z}…")
        return False

    def follow(self, z: int, tiles, key=None) -> None:
        """Embed ``tiles`` (``Tile`` objects or indices) of slice ``z`` in the worker, then call
        ``on_ready(z)`` again: the tiles a previewed object runs into (tiled slices).

        ``key`` names the prompt they are for; a tile asked for twice for the same prompt was
        evicted from the cache meanwhile (its budget is smaller than the object's tiles), and
        is not embedded again, so the preview cannot cycle.
        """
        session = self.session
        if session is None or not getattr(session, "tiled", False):
            return
        if key != self._follow_key:
            self._follow_key, self._followed = key, set()
        asked = {int(getattr(t, "index", t)) for t in tiles}
        again = {i for i in asked if (z, i) in self._followed}
        wanted = tuple(sorted(asked - again))
        if again and (self.task is None or self.task.done):  # (not just still on their way)
            self._on_status(f"Slice {z}: the embedding cache is too small to hold every tile this "
                            "object spans; the preview shows part of it (raise the cache budget).")
        if not wanted:
            return
        self._tiles_wanted = (z, wanted)
        if self.task is not None and not self.task.done:
            return  # picked up when the running embedding finishes
        self._start_tiles()

    def _start_tiles(self) -> None:
        session, (z, wanted) = self.session, self._tiles_wanted
        self._tiles_wanted = None
        self._followed.update((z, i) for i in wanted)
        self.task = start_task(
            lambda report, cancelled: session.predictor.embed_tiles(z, wanted),
            description=f"MobileSAM: embedding {len(wanted)} more tile(s) of slice {z}",
            on_result=lambda _r: self._tiles_embedded(session, z),
            on_error=lambda exc: self._failed(session, exc, z),
        )
        self._on_status(f"Slice {z}: the object runs into {len(wanted)} more tile(s); embedding them…")

    def _tiles_embedded(self, session, z: int) -> None:
        if self.closed or session is not self.session:
            return
        self.task = None  # this one is over (its `finished` signal comes after this call)
        if self._tiles_wanted is not None:
            self._start_tiles()
        elif self._current_z() == z:
            self._on_ready(z)

    def _failed(self, session, exc, z) -> None:
        if not self.closed and session is self.session:
            self._on_error(exc, f"embedding slice {z}")

    def _embedded(self, session, z: int) -> None:
        if self.closed or session is not self.session:
            return  # another image or model since, or the widget is gone
        if not getattr(session, "tiled", False):
            self._known.add(z)
        self._on_status(f"Slice {z} ready.")
        self.task = None  # this one is over (its `finished` signal comes after this call)
        wanted = self._current_z()
        if wanted != z and self.wanted not in (None, z):
            self.ready(wanted)
            return
        session.prefetch(self.neighbours(z))
        if wanted == z:
            self._on_ready(z)  # may ask for the tiles the object runs into (follow)
        if self._tiles_wanted is not None and self.task is None:
            self._start_tiles()

    def close(self) -> None:
        self.closed = True
        if self.task is not None and not self.task.done:
            self.task.cancel()
