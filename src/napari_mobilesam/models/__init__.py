"""Models: the registry and builders, TinyViT, checkpoints, weights downloads, devices and the
inference backends (torch, OpenVINO, the fast mask decoder)."""

# Attribute of a ``Sam`` holding its AIS decoder (``ais_decoder.AISDecoder`` or a backend's
# wrapper), if any; read it with ``napari_mobilesam.models.registry.ais_decoder``.
DECODER_ATTR = "napari_mobilesam_decoder"
