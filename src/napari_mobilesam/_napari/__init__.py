"""The napari layer: dock widgets, magicgui panels and the demo launcher.

Everything napari- or Qt-specific lives in this subpackage; the engine around it imports none of it.
Importing it first loads torch's optional ``triton`` safely (see ``_preload.py``): napari's OpenGL
context is already up when a widget module is imported, and a later plain import of triton can
crash the process on Mesa drivers.
"""

from ._preload import preload_triton

preload_triton()
