"""napari's activity spinner, slowed down where each frame repaints the window in software.

While any progress bar exists, napari animates a spinner beside its activity button: a 90-frame
GIF at 33 frames a second. Each frame repaints a small label, but the window also holds the
OpenGL canvas, so Qt composes the whole window with OpenGL for every frame. With a GPU that is
about a millisecond. With software OpenGL (Mesa's llvmpipe: virtual machines, remote desktops,
analysis servers and computers without a GPU driver) it is 20-50 ms on 2 cores, and the spinner
alone kept the GUI thread busy 63-65 % of the time while our tasks ran, the worker threads
sharing the cores with llvmpipe's (``benchmarks/spinner.py``). There the widget runs napari's
spinner at :data:`SPEED_PERCENT` of its speed (5 frames a second): 11-17 %.

Only Qt's public API is used (the window's ``QLabel`` showing a ``QMovie``, the canvas's
``QOpenGLWidget``); a movie whose speed someone else changed is left alone.
"""

from __future__ import annotations

import weakref

__all__ = ["calm_spinners", "renderer", "is_software", "SPEED_PERCENT"]

#: napari's spinner speed on software OpenGL (percent of the GIF's own frame rate).
SPEED_PERCENT = 15

#: Lower-case parts of the GL_RENDERER strings of software rasterisers.
SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swrast", "software rasterizer", "basic render driver")

_seen: weakref.WeakSet = weakref.WeakSet()  # windows already looked at


def renderer(window) -> str | None:
    """The OpenGL renderer string of the first ``QOpenGLWidget`` in ``window`` (None: none, or
    no answer)."""
    from qtpy.QtWidgets import QOpenGLWidget

    for canvas in window.findChildren(QOpenGLWidget):
        if not canvas.isValid():  # not initialised yet (never shown)
            continue
        try:
            from vispy.gloo import gl

            canvas.makeCurrent()
            try:
                name = gl.glGetParameter(gl.GL_RENDERER)
            finally:
                canvas.doneCurrent()
        except Exception:  # noqa: BLE001 - no GL answer: treat as unknown
            return None
        return name if isinstance(name, str) else None
    return None


def is_software(name: str | None) -> bool:
    """Whether a GL_RENDERER string names a software rasteriser."""
    return bool(name) and any(part in name.lower() for part in SOFTWARE_RENDERERS)


def calm_spinners() -> int:
    """Slow the animated movies (napari's spinner) of every main window not looked at yet whose
    canvas renders in software; returns how many movies were slowed. Call on the GUI thread."""
    from qtpy.QtWidgets import QApplication, QLabel, QMainWindow

    app = QApplication.instance()
    if app is None:
        return 0
    slowed = 0
    for window in app.topLevelWidgets():
        if not isinstance(window, QMainWindow) or window in _seen:
            continue
        name = renderer(window)
        if name is None:  # canvas not ready: look again next time
            continue
        _seen.add(window)
        if not is_software(name):
            continue
        for label in window.findChildren(QLabel):
            movie = label.movie()
            if movie is not None and movie.speed() == 100:
                movie.setSpeed(SPEED_PERCENT)
                slowed += 1
    return slowed
