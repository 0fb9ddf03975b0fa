"""The napari layer: dock widgets, magicgui panels and the demo launcher.

Everything napari- or Qt-specific lives in this subpackage; the engine around it imports none of it.
"""
