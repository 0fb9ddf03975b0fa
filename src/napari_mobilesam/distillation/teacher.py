"""Teachers and the teacher-embedding cache of decoupled distillation.

- :func:`load_teacher` reads a SAM ViT-B/L/H checkpoint (segment-anything layout) or a
  MobileSAM-format checkpoint and returns its image encoder; :func:`vit_teacher_encoder` builds
  small or ViT-B-shaped random teachers for tests and benchmarks.
- :class:`TeacherCache` stores one teacher embedding per slice on disk as float16
  ``(256, 64, 64)``, keyed by the slice's content and the teacher's identity; writes are atomic, so
  a killed run leaves only complete entries and the next run resumes where it stopped.
- :func:`fill_teacher_cache` computes the missing entries.

No napari or Qt here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.preprocess import preprocess_rgb
from ..errors import DistillError
from ..files import atomic_write_bytes

__all__ = [
    "Teacher",
    "load_teacher",
    "teacher_from_module",
    "vit_teacher_encoder",
    "save_teacher_checkpoint",
    "TeacherCache",
    "fill_teacher_cache",
    "default_cache_root",
    "PREPROCESS_VERSION",
]

#: Bump when the way an input image is made from a slice changes: old cache entries then miss.
PREPROCESS_VERSION = "1"


# --------------------------------------------------------------------------------------------
# teachers


@dataclass
class Teacher:
    """A teacher image encoder and the identity that keys its cached embeddings.

    ``encoder`` maps ``(B, 3, img_size, img_size)`` float32 to ``(B, 256, img_size/16, img_size/16)``;
    it is None until :meth:`load` runs (a fully cached run never loads it).
    """

    identity: str
    description: str
    img_size: int = 1024
    loader: Callable[[], Any] | None = None
    encoder: Any = None

    def load(self) -> Any:
        """Return the encoder (loading it on first use), frozen, in eval mode."""
        if self.encoder is None:
            if self.loader is None:
                raise DistillError("this teacher has no encoder and no loader")
            self.encoder = self.loader()
        self.encoder.eval().requires_grad_(False)
        return self.encoder


def vit_teacher_encoder(kind: str = "tiny", *, seed: int = 0) -> Any:
    """A randomly initialised SAM ViT image encoder (segment-anything's ``ImageEncoderViT``).

    ``kind="tiny"``: embed dim 32, 2 blocks (one windowed, one global), 1 head — fast enough for
    tests, same 1024 input and ``(256, 64, 64)`` output as every SAM encoder.
    ``kind="vit_b"``: SAM ViT-B's shape (768 dims, 12 blocks, 12 heads, global blocks 2/5/8/11),
    for benchmarks. Relative position tables are randomised too (SAM initialises them to zero).
    """
    import torch
    from segment_anything.modeling import ImageEncoderViT

    shapes = {
        "tiny": dict(embed_dim=32, depth=2, num_heads=1, global_attn_indexes=(1,)),
        "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    }
    if kind not in shapes:
        raise ValueError(f"unknown teacher kind {kind!r}: use one of {sorted(shapes)}")
    torch.manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=1024, patch_size=16, out_chans=256, qkv_bias=True, use_rel_pos=True, window_size=14,
        mlp_ratio=4.0, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), **shapes[kind],
    )
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.normal_(0.0, 0.02)
    return enc.eval()


def save_teacher_checkpoint(encoder: Any, path: str | os.PathLike) -> Path:
    """Write ``encoder`` as a segment-anything-style checkpoint (``image_encoder.*`` keys)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}, path)
    return path


def _vit_from_state_dict(sd: dict, path: Path) -> Any:
    """Build a segment-anything ``ImageEncoderViT`` whose settings are read off the weights."""
    import torch
    from segment_anything.modeling import ImageEncoderViT

    w = sd["patch_embed.proj.weight"]
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if "pos_embed" not in sd or "blocks.0.attn.rel_pos_h" not in sd:
        raise DistillError(
            f"teacher {str(path)!r} is a ViT without absolute/relative position tables: "
            "only SAM's ViT-B/L/H image encoders are supported as ViT teachers"
        )
    grid = int(sd["pos_embed"].shape[1])
    head_dim = int(sd["blocks.0.attn.rel_pos_h"].shape[1])
    window, global_idx = 0, []
    for i in range(depth):
        size = (int(sd[f"blocks.{i}.attn.rel_pos_h"].shape[0]) + 1) // 2
        if size == grid:
            global_idx.append(i)
        else:
            window = size
    enc = ImageEncoderViT(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        num_heads=embed_dim // head_dim, mlp_ratio=sd["blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
        out_chans=int(sd["neck.0.weight"].shape[0]), qkv_bias="blocks.0.attn.qkv.bias" in sd,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), use_abs_pos=True, use_rel_pos=True,
        window_size=window, global_attn_indexes=tuple(global_idx),
    )
    try:
        enc.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise DistillError(f"teacher {str(path)!r} does not load as a SAM ViT encoder: {exc}") from exc
    return enc


def _tinyvit_from_state_dict(sd: dict, path: Path) -> Any:
    """A MobileSAM-format encoder: try every TinyViT entry of our model registry, strictly."""
    import torch

    from ..models.registry import MODELS

    errors = []
    for model in ("vit_t", "vit_t_test"):
        with torch.random.fork_rng(devices=[]):
            enc = MODELS[model].builder().image_encoder
        try:
            enc.load_state_dict(sd, strict=True)
            return enc.float()
        except RuntimeError as exc:
            errors.append(f"{model}: {str(exc).splitlines()[0]}")
    raise DistillError(
        f"teacher {str(path)!r} looks like a MobileSAM (TinyViT) encoder but matches no known "
        f"layout ({'; '.join(errors)})"
    )


def _encoder_from_checkpoint(path: Path) -> tuple[Any, str]:
    from ..models.checkpoint import CheckpointError, read_state_dict

    try:
        sd = read_state_dict(path)
    except CheckpointError as exc:
        raise DistillError(f"teacher: {exc}") from exc
    enc_sd = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    if not enc_sd:
        enc_sd = dict(sd)  # a bare encoder state dict
    if "patch_embed.proj.weight" in enc_sd:
        enc = _vit_from_state_dict(enc_sd, path)
        kind = {768: "SAM ViT-B", 1024: "SAM ViT-L", 1280: "SAM ViT-H"}.get(
            enc.patch_embed.proj.out_channels, f"SAM ViT ({enc.patch_embed.proj.out_channels} dims)"
        )
        return enc.float(), kind
    if any(k.startswith("patch_embed.seq.") for k in enc_sd) and any(k.startswith("layers.") for k in enc_sd):
        return _tinyvit_from_state_dict(enc_sd, path), "MobileSAM (TinyViT)"
    sample = ", ".join(list(sd)[:4])
    raise DistillError(
        f"teacher {str(path)!r} is not a SAM image encoder (keys start {sample}): give a SAM "
        "ViT-B/L/H checkpoint such as sam_vit_b_01ec64.pth, or a MobileSAM-format checkpoint"
    )


def _file_sha256(path: Path, cache_root: Path | None) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so large teachers hash once."""
    st = path.stat()
    memo_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = (cache_root / "file-hashes.json") if cache_root is not None else None
    table: dict[str, str] = {}
    if memo is not None and memo.exists():
        try:
            table = json.loads(memo.read_text())
        except (OSError, ValueError):
            table = {}
        if memo_key in table:
            return table[memo_key]
    from ..models.checkpoint import file_sha256

    digest = file_sha256(path)
    if memo is not None:
        table[memo_key] = digest
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(memo, json.dumps(table, indent=0).encode())
    return digest


def load_teacher(path: str | os.PathLike, *, cache_root: str | os.PathLike | None = None) -> Teacher:
    """Describe a teacher checkpoint without loading it; the encoder loads on :meth:`Teacher.load`.

    The checkpoint is read once here to check it is a SAM-family image encoder (SAM ViT-B/L/H in
    segment-anything's layout, or a MobileSAM-format TinyViT), so bad teachers are refused before
    anything runs. Its identity is the SHA-256 of the file.

    Raises
    ------
    DistillError
        Missing file, unreadable file, or not a SAM image encoder.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DistillError(f"teacher checkpoint {str(path)!r} does not exist: give the path of a SAM .pth file")
    enc, kind = _encoder_from_checkpoint(path)
    img_size = int(getattr(enc, "img_size", 1024))
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    digest = _file_sha256(path, root)
    del enc  # checked; loaded again only if an embedding is missing from the cache
    return Teacher(
        identity=f"file-sha256:{digest}",
        description=f"{kind} from {path.name}",
        img_size=img_size,
        loader=lambda: _encoder_from_checkpoint(path)[0],
    )


def teacher_from_module(module: Any, *, description: str | None = None) -> Teacher:
    """Use an in-memory encoder (or a ``Sam``, whose ``image_encoder`` is taken) as the teacher.

    The identity hashes every tensor of its state dict, so changed weights never reuse old cache
    entries.
    """
    enc = getattr(module, "image_encoder", module)
    from ..models.checkpoint import state_dict_digest

    return Teacher(
        identity=f"state-sha256:{state_dict_digest(enc)}",
        description=description or type(enc).__name__,
        img_size=int(getattr(enc, "img_size", 1024)),
        encoder=enc,
    )


# --------------------------------------------------------------------------------------------
# the teacher-embedding cache


def default_cache_root() -> Path:
    """The per-user cache root (``$NAPARI_MOBILESAM_CACHE`` if set), shared with the weights."""
    from ..models.weights import cache_dir

    return Path(cache_dir())


class TeacherCache:
    """Teacher embeddings on disk: one float16 ``(256, g, g)`` ``.npy`` file per slice.

    Files live in ``root / "distill" / <teacher folder>`` where the folder name hashes the
    teacher identity, its input size and :data:`PREPROCESS_VERSION`; the file name hashes the
    slice key (content + normalisation). Entries are written to a temporary file and renamed, so a
    reader never sees a partial entry; an unreadable entry counts as missing and is recomputed.
    The cache is never cleared automatically; delete the folder to reclaim space.
    """

    def __init__(self, teacher: Teacher, root: str | os.PathLike | None = None):
        self.teacher = teacher
        self.root = Path(root) if root is not None else default_cache_root()
        tag = hashlib.sha256(
            f"{teacher.identity}|{teacher.img_size}|{PREPROCESS_VERSION}".encode()
        ).hexdigest()[:20]
        self.dir = self.root / "distill" / f"teacher-{tag}"
        self.grid = teacher.img_size // 16
        self.hits = 0
        self.writes = 0

    def path(self, key: str) -> Path:
        """File of the entry for slice key ``key``."""
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".npy")

    def load(self, key: str) -> np.ndarray | None:
        """The cached ``(256, g, g)`` float16 embedding, or None when absent or unreadable."""
        p = self.path(key)
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if arr.shape != (256, self.grid, self.grid) or arr.dtype != np.float16:
            return None
        self.hits += 1
        return arr

    def has(self, key: str) -> bool:
        """Whether a complete entry exists (cheap: checks the file size, not the content)."""
        p = self.path(key)
        return p.is_file() and p.stat().st_size >= 256 * self.grid * self.grid * 2

    def store(self, key: str, embedding: Any) -> Path:
        """Write one embedding ``(256, g, g)`` (any float dtype; stored as float16) atomically."""
        arr = np.asarray(embedding, dtype=np.float32)
        if arr.shape != (256, self.grid, self.grid):
            raise ValueError(f"teacher embedding must be (256, {self.grid}, {self.grid}), got {arr.shape}")
        if not np.isfinite(arr).all() or np.abs(arr).max() > 65504:
            raise DistillError("teacher embedding is not finite in float16: the teacher's weights are broken")
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "teacher.json"
        if not info.exists():
            meta = {"identity": self.teacher.identity, "description": self.teacher.description,
                    "img_size": self.teacher.img_size, "preprocess_version": PREPROCESS_VERSION}
            atomic_write_bytes(info, json.dumps(meta, indent=1).encode())
        import io

        buf = io.BytesIO()
        np.save(buf, arr.astype(np.float16), allow_pickle=False)
        p = self.path(key)
        atomic_write_bytes(p, buf.getvalue())
        self.writes += 1
        return p

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys (in order, without repeats) that have no complete entry."""
        out, seen = [], set()
        for k in keys:
            if k not in seen and not self.has(k):
                out.append(k)
            seen.add(k)
        return out


def fill_teacher_cache(
    cache: TeacherCache,
    sources: Sequence[tuple[str, Any]],
    refs: Sequence[Any],
    *,
    device: Any = "cpu",
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> int:
    """Compute and store the teacher embedding of every slice in ``refs`` that is not cached yet.

    The teacher is loaded only if something is missing. Runs the teacher in float32 without
    gradients. ``progress(done, total)`` is called after each batch (total = missing entries);
    ``cancel()`` returning True stops after the current batch (finished entries are kept, so the
    next call resumes). Returns the number of entries written.
    """
    import torch

    todo_keys = set(cache.missing(r.key for r in refs))
    todo = []
    for r in refs:
        if r.key in todo_keys:
            todo.append(r)
            todo_keys.discard(r.key)
    if not todo:
        return 0
    enc = cache.teacher.load().to(device)
    written = 0
    if progress is not None:
        progress(0, len(todo))
    for start in range(0, len(todo), batch_size):
        if cancel is not None and cancel():
            break
        chunk = todo[start : start + batch_size]
        x = torch.stack([preprocess_rgb(sources[r.source][1].rgb(r.z), cache.teacher.img_size)[0] for r in chunk])
        with torch.inference_mode():
            emb = enc(x.to(device)).float().cpu().numpy()
        for r, e in zip(chunk, emb):
            cache.store(r.key, e)
            written += 1
        if progress is not None:
            progress(written, len(todo))
    return written
