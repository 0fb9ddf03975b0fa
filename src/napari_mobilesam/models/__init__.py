"""Models: the registry and builders, TinyViT, checkpoints, weights downloads, devices and the
inference backends (torch, OpenVINO, the fast mask decoder)."""
