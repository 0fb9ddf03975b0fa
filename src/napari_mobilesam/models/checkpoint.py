"""Safe, strict checkpoint reading and validation; saving with metadata.

File format
-----------
A checkpoint is a plain PyTorch state dict saved with ``torch.save`` (a ``dict`` of parameter name →
tensor, the official ``mobile_sam.pt`` layout), so files written here load in the official
MobileSAM / segment-anything code too. It is always read with ``torch.load(...,
weights_only=True)``: no pickled code runs.

Metadata (our distilled checkpoints) lives in a JSON file *beside* the checkpoint, named
``<checkpoint file name>.json`` (``student.pt`` → ``student.pt.json``). Keeping it outside the state
dict keeps the ``.pt`` file a pure official-layout state dict. The JSON object always holds
``"format": "napari-mobilesam-checkpoint/1"`` and ``"sha256"`` (of the ``.pt`` file it describes),
plus whatever the caller passed (model name, teacher, data, epochs, validation mIoU...).
``read_checkpoint_metadata`` refuses a JSON whose hash does not match the file (a checkpoint
replaced without its metadata).

Errors are :class:`CheckpointError` (a ``ValueError``) naming the file, the offending keys and the
fix; a SAM ViT checkpoint given where MobileSAM was expected (or the other way round) is detected
and said so.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files import atomic_write

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "read_checkpoint",
    "split_checkpoint",
    "validate_state_dict",
    "save_checkpoint",
    "read_checkpoint_metadata",
    "metadata_path",
    "file_sha256",
    "state_dict_digest",
    "detect_architecture",
]

METADATA_FORMAT = "napari-mobilesam-checkpoint/1"
_MAX_LISTED = 8




def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_digest(module) -> str:
    """SHA-256 (hex) over names, dtypes, shapes and bytes of ``module``'s state dict (cached).

    The cache is invalidated when any tensor is replaced or modified in place (``_version``).
    """
    import torch

    state = module.state_dict(keep_vars=True)
    signature = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    cached = getattr(module, "_napari_mobilesam_digest", None)
    if cached is not None and cached[0] == signature:
        return cached[1]
    h = hashlib.sha256()
    for k, v in state.items():
        t = v.detach()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    object.__setattr__(module, "_napari_mobilesam_digest", (signature, digest))
    return digest


def metadata_path(path: str | os.PathLike) -> Path:
    """Path of the metadata JSON that belongs to checkpoint ``path`` (``<name>.json`` beside it)."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def _listing(keys, limit: int = _MAX_LISTED) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _torch_load(p: Path) -> Any:
    """``torch.load(p, weights_only=True)`` on the CPU, failures as :class:`CheckpointError`."""
    import torch

    if not p.exists():
        raise CheckpointError(f"checkpoint file not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, expected a .pt/.pth file: {p}")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint file is empty (0 bytes): {p}; download it again")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError...
        text = str(exc)
        msg = text.splitlines()[0].strip() if text else type(exc).__name__
        if "weights only load failed" in text.lower() or "unsupported global" in text.lower():
            reason = (
                "it contains pickled Python objects (code) that a safe load "
                "(torch.load(weights_only=True)) refuses; save a plain state dict instead"
            )
            msg = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), msg)
        elif zipfile.is_zipfile(p) or "zip" in msg.lower() or isinstance(exc, EOFError):
            reason = "it is truncated or corrupt"
        else:
            reason = "it is not a PyTorch checkpoint"
        raise CheckpointError(
            f"cannot read checkpoint {p} ({size} bytes): {reason} ({msg}). "
            "Download it again or point to a valid state dict saved with torch.save."
        ) from exc


def _strip_sam_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """micro-sam's rule: a leading ``sam.`` is removed from every key that has one."""
    return {(k[4:] if k.startswith("sam.") else k): v for k, v in state.items()}


def split_checkpoint(obj: Any, source: str = "the checkpoint") -> tuple[dict, dict | None]:
    """``(SAM state dict, AIS decoder state or None)`` from a loaded checkpoint object.

    Layouts: a plain state dict (``mobile_sam.pt``, micro-sam's ``vit_t.pt``); micro-sam's
    combined file ``{"model_state": ..., "decoder_state": ..., ...}`` (its fine-tuning and export
    format; ``sam.`` key prefixes stripped, other entries such as ``optimizer_state`` ignored);
    ``{"state_dict": ...}`` or ``{"model": ...}`` wrappers.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("model_state"), Mapping):
        model = _strip_sam_prefix(obj["model_state"])
        decoder = obj.get("decoder_state")
        if decoder is not None and not (
            isinstance(decoder, Mapping) and _looks_like_state_dict(decoder)
        ):
            raise CheckpointError(f"{source}: 'decoder_state' is not a state dict of tensors")
        if not _looks_like_state_dict(model):
            raise CheckpointError(f"{source}: 'model_state' is not a state dict of tensors")
        return model, (dict(decoder) if decoder is not None else None)
    if isinstance(obj, Mapping) and not _looks_like_state_dict(obj):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and _looks_like_state_dict(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not _looks_like_state_dict(obj):
        raise CheckpointError(
            f"{source} holds a {type(obj).__name__}, not a state dict of tensors; save the model "
            "with torch.save(model.state_dict(), path)"
        )
    return dict(obj), None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(SAM state dict, AIS decoder state or None)`` read safely from ``path``.

    See :func:`split_checkpoint` for the layouts; read with ``weights_only=True``. Errors are
    :class:`CheckpointError` naming the file and the problem.
    """
    p = Path(path).expanduser()
    return split_checkpoint(_torch_load(p), str(p))


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state dict from ``path`` safely (``weights_only=True``, tensors on the CPU).

    Returns ``{name: tensor}`` as stored (dtypes unchanged); for micro-sam's combined layout the
    SAM part (see :func:`read_checkpoint`). Raises :class:`CheckpointError` for a missing file, a
    file that is not a PyTorch checkpoint, a truncated file, a file that needs arbitrary code to
    unpickle, or one that holds something other than a state dict.
    """
    return read_checkpoint(path)[0]


def _looks_like_state_dict(obj: Mapping) -> bool:
    import torch

    return len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def detect_architecture(state_dict: Mapping[str, Any]) -> str | None:
    """Guess the family of a SAM-style state dict.

    Returns ``"vit_t"`` (MobileSAM TinyViT encoder), ``"vit_b"``/``"vit_l"``/``"vit_h"`` (SAM ViT,
    told apart by the width of ``image_encoder.pos_embed``), ``"sam_vit"`` for another ViT width, or
    ``None`` when neither is recognised.
    """
    if "image_encoder.pos_embed" in state_dict:
        width = int(state_dict["image_encoder.pos_embed"].shape[-1])
        return {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}.get(width, "sam_vit")
    if any(k.startswith("image_encoder.patch_embed.seq.") for k in state_dict):
        return "vit_t"
    return None


_FAMILY = {
    "vit_t": "a MobileSAM (TinyViT) checkpoint",
    "vit_b": "a SAM ViT-B checkpoint",
    "vit_l": "a SAM ViT-L checkpoint",
    "vit_h": "a SAM ViT-H checkpoint",
    "sam_vit": "a SAM ViT checkpoint",
}


def validate_state_dict(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    model: str = "vit_t",
    source: str = "the checkpoint",
) -> None:
    """Check ``state_dict`` against ``expected`` (a model's own ``state_dict()``) key by key.

    Raises :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys; when the
    file belongs to another model family (a SAM ViT checkpoint where MobileSAM was expected, or
    the reverse) the error says which family it is and which ``model=`` to choose instead.
    """
    import torch

    have, want = set(state_dict), set(expected)
    missing, extra = want - have, have - want
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(have & want)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or extra or shapes):
        bad = [
            k
            for k in sorted(want)
            if expected[k].is_floating_point() and not state_dict[k].is_floating_point()
        ]
        if bad:
            raise CheckpointError(f"{source}: non-floating tensors for parameters {_listing(bad)}")
        nonfinite = [
            k
            for k in sorted(want)
            if state_dict[k].is_floating_point() and not bool(torch.isfinite(state_dict[k]).all())
        ]
        if nonfinite:
            raise CheckpointError(
                f"{source} has NaN or infinite values in {_listing(nonfinite)}; the file is damaged "
                "or came from a diverged training run"
            )
        return
    found = detect_architecture(state_dict)
    wanted = detect_architecture(expected)
    if found is not None and wanted is not None and found != wanted and found in _FAMILY:
        hint = f" (use model={found!r})" if found in ("vit_t", "vit_b", "vit_l", "vit_h") else ""
        raise CheckpointError(
            f"{source} is {_FAMILY[found]}, but model {model!r} expects {_FAMILY[wanted]}{hint}"
        )
    if all(k.startswith("module.") for k in have):
        raise CheckpointError(
            f"{source}: every key starts with 'module.' (saved from a DistributedDataParallel "
            "wrapper); save model.module.state_dict() instead"
        )
    parts = [f"{source} does not match model {model!r}"]
    if missing:
        parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected keys: {_listing(extra)}")
    if shapes:
        parts.append(f"{len(shapes)} keys with the wrong shape: {'; '.join(shapes[:_MAX_LISTED])}")
    raise CheckpointError("; ".join(parts))



def save_checkpoint(
    state_dict: Mapping[str, Any],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``state_dict`` (name → tensor) to ``path`` atomically, plus metadata JSON beside it.

    Tensors are stored detached on the CPU. The metadata JSON (``<path>.json``) is always written:
    ``{"format": ..., "sha256": <of the .pt>, **metadata}``; ``metadata`` must be JSON-serialisable.
    An existing file at ``path`` is replaced only once the new one is completely written.
    Returns the checkpoint path.
    """
    import torch

    p = Path(path).expanduser()
    if not isinstance(state_dict, Mapping) or not _looks_like_state_dict(state_dict):
        raise CheckpointError("save_checkpoint expects a non-empty dict of name -> tensor")
    meta = dict(metadata or {})
    for reserved in ("format", "sha256"):
        if reserved in meta:
            raise ValueError(f"metadata key {reserved!r} is reserved; rename it")
    try:
        meta_text = json.dumps(meta)
    except TypeError as exc:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {exc}") from exc
    clean = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(p, lambda tmp: torch.save(clean, tmp))
    full = {"format": METADATA_FORMAT, "sha256": file_sha256(p), **json.loads(meta_text)}
    atomic_write(
        metadata_path(p), lambda tmp: tmp.write_text(json.dumps(full, indent=2), encoding="utf-8")
    )
    return p


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """Metadata saved with checkpoint ``path`` by :func:`save_checkpoint`, or ``None`` if none.

    Raises :class:`CheckpointError` when the JSON is unreadable or describes a different file
    (its ``sha256`` does not match the checkpoint's bytes).
    """
    p = Path(path).expanduser()
    mp = metadata_path(p)
    if not mp.exists():
        return None
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint metadata {mp}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise CheckpointError(f"{mp} is not napari-mobilesam checkpoint metadata")
    if p.exists() and meta.get("sha256") != file_sha256(p):
        raise CheckpointError(
            f"metadata {mp} describes a different file than {p} (SHA-256 mismatch); the checkpoint "
            "was replaced without its metadata: delete the stale .json or restore the checkpoint"
        )
    return meta
