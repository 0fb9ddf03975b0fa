"""Decoupled distillation of the TinyViT encoder from a SAM teacher on the user's own images.

In the order of a run: settings, events and results (:mod:`.config`), images and slices
(:mod:`.data`), teachers and the teacher-embedding cache (:mod:`.teacher`), the run in named steps
(:mod:`.run`, with :class:`.trainer.Trainer`), training pieces (:mod:`.train`), training states
(:mod:`.states`), the command line (:mod:`.command`; ``python -m napari_mobilesam.distillation``).
"""
