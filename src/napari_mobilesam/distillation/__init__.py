"""Decoupled distillation of the TinyViT encoder from a SAM teacher on the user's own images:
data and teacher cache (:mod:`.data`), training steps (:mod:`.train`), the run (:mod:`.run`)."""
