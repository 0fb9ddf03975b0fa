"""Embedding the slice in view in a worker, one at a time, then prefetching its neighbours.

:class:`SliceEmbedder` holds the embedding task and the slice wanted next (the user may move on
while one is computed: the last slice asked for is embedded next, the ones passed over are not).
"""

from __future__ import annotations

from collections.abc import Callable

from .workers import Task, start_task

__all__ = ["SliceEmbedder"]


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

    def use(self, session) -> None:
        """Embed for ``session`` from now on (None: none); results for an older one are dropped."""
        self.session, self.wanted = session, None

    @staticmethod
    def neighbours(z: int) -> list[int]:
        return [z + 1, z - 1, z + 2, z - 2]

    def ready(self, z: int) -> bool:
        """True when slice z is embedded; otherwise start (or queue) its embedding in a worker."""
        session = self.session
        if session is None:
            return False
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
        )
        self._on_status(f"Computing the embedding of slice {z}…")
        return False

    def _failed(self, session, exc, z) -> None:
        if not self.closed and session is self.session:
            self._on_error(exc, f"embedding slice {z}")

    def _embedded(self, session, z: int) -> None:
        if self.closed or session is not self.session:
            return  # another image or model since, or the widget is gone
        self._on_status(f"Slice {z} ready.")
        wanted = self._current_z()
        if wanted != z and self.wanted not in (None, z):
            self.task = None
            self.ready(wanted)
            return
        session.prefetch(self.neighbours(z))
        if wanted == z:
            self._on_ready(z)

    def close(self) -> None:
        self.closed = True
        if self.task is not None and not self.task.done:
            self.task.cancel()
