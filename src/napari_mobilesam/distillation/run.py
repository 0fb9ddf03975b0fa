"""Fine-tuning MobileSAM on your own images by decoupled distillation.

The student is MobileSAM's image encoder (initialised from the current weights); the teacher is a
bigger SAM-family encoder (SAM ViT-B/L/H through segment-anything, or another MobileSAM-format
checkpoint). Only the student's encoder is trained, so that its ``(256, 64, 64)`` embedding of
each slice matches the teacher's (MSE, optionally plus a mask term through the frozen decoder).
The prompt encoder and mask decoder stay frozen and are shared.

Decoupled: every training slice's teacher embedding is computed once and kept in a float16 disk
cache (:class:`~napari_mobilesam.distillation.data.TeacherCache`), reused across runs; the teacher never
runs during training. Augmentations are the 8 flips/quarter turns applied to both the input and the
cached embedding.

Entry points
------------
- :func:`distill` (blocking) and :func:`iter_distill` (a generator of :class:`DistillEvent`, for
  GUIs) take a :class:`DistillConfig`.
- ``napari-mobilesam distill --teacher sam_vit_b.pth --images stack.tif -o student.pt``
  (:mod:`.command`); also ``python -m napari_mobilesam.distillation ...``.
- Several processes or GPUs: the same command under ``torchrun`` (DistributedDataParallel; NCCL on
  GPUs, gloo on CPUs), e.g. ``torchrun --nproc_per_node 2 -m napari_mobilesam.distillation ...``.

Outputs: ``student.pt`` in the official MobileSAM state-dict layout (loads with
``build_sam("vit_t", "student.pt")`` and in the official code) and ``student.pt.json`` (teacher, data,
settings, validation metrics before and after). Training states go to ``student.pt.distill/<run>/``
after every epoch (and on cancel); rerunning the same command resumes from the newest readable one
(:mod:`.states`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import DistillError
from .config import (
    STUDENT_MODELS,
    DistillConfig,
    DistillEvent,
    DistillResult,
    Setup,
    check_config,
)
from .data import open_images, split_slices
from .teacher import (
    Teacher,
    TeacherCache,
    default_cache_root,
    fill_teacher_cache,
    load_teacher,
    teacher_from_module,
)
from .trainer import Trainer

__all__ = [
    "DistillConfig",
    "DistillEvent",
    "DistillResult",
    "DistillError",
    "distill",
    "iter_distill",
    "STUDENT_MODELS",
]


#: Kept for callers of the old private name.
_check_config = check_config


def _teacher(cfg: DistillConfig, cache_root: Path) -> Teacher:
    if isinstance(cfg.teacher, Teacher):
        return cfg.teacher
    if isinstance(cfg.teacher, (str, os.PathLike)):
        return load_teacher(cfg.teacher, cache_root=cache_root)
    if hasattr(cfg.teacher, "state_dict"):
        return teacher_from_module(cfg.teacher)
    raise DistillError(
        f"teacher must be a checkpoint path, got {type(cfg.teacher).__name__}: give a SAM .pth file"
    )


def _fingerprint(cfg, teacher, student_source, train, val, world) -> str:
    """Names a run: a resumed run must have the same teacher, data, student and settings."""
    parts = {
        "teacher": teacher.identity,
        "student": [cfg.student_model, student_source],
        "train": [r.key for r in train],
        "val": [r.key for r in val],
        "world": world,
        **{k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps",
                                        "grad_clip", "augment", "mask_loss_weight", "mask_points",
                                        "seed")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _clean(values: dict) -> dict:
    """JSON-safe copy: NaN/inf become None."""
    out = {}
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def _setup(cfg: DistillConfig) -> Setup:
    """Check the settings, describe the teacher, open and split the images, build the student."""
    from ..models.checkpoint import CheckpointError, file_sha256
    from ..models.registry import build_sam
    from ..models.weights import WeightsError

    out = check_config(cfg)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else default_cache_root()
    teacher = _teacher(cfg, cache_root)
    sources = open_images(cfg.images, channel_axis=cfg.channel_axis)
    train, val = split_slices(
        sources, max_slices_per_image=cfg.max_slices_per_image, val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    try:
        sam = build_sam(cfg.student_model, cfg.student_checkpoint, seed=cfg.seed)
    except CheckpointError as exc:
        raise DistillError(f"student: {exc}") from exc
    except WeightsError as exc:  # default weights not downloadable (offline...)
        raise DistillError(f"student weights: {exc}; or give --student /path/to/mobile_sam.pt") from exc
    if cfg.student_checkpoint is not None:
        student_source = "file-sha256:" + file_sha256(Path(cfg.student_checkpoint).expanduser())
    else:
        student_source = f"default(seed={cfg.seed})"
    return Setup(cfg, out, cache_root, teacher, sources, train, val, sam, student_source)


def _fill_cache(s: Setup, cache: TeacherCache, env: Any, device: Any,
                cancel: Callable[[], bool] | None) -> Generator[DistillEvent, None, bool]:
    """Step 1: teacher embeddings, each process its share, then everyone waits for the full cache.

    Yields ``"cache"`` events; returns True when cancelled (finished entries are kept).
    """
    everything = s.train + s.val
    share = everything[env.rank :: env.world]
    n_missing = len(cache.missing(r.key for r in share))
    if n_missing:
        yield DistillEvent("info", message=f"computing {n_missing} teacher embeddings into {cache.dir}")
    done = 0
    for ref in share:
        if cancel is not None and cancel():
            yield DistillEvent("info", message="cancelled while filling the teacher cache; finished entries are kept")
            return True
        if cache.has(ref.key):
            continue
        fill_teacher_cache(cache, s.sources, [ref], device=device)
        done += 1
        yield DistillEvent("cache", step=done, total=n_missing)
    if s.teacher.loader is not None:
        s.teacher.encoder = None  # free the teacher before training (it can be loaded again)
    env.barrier()
    still = cache.missing(r.key for r in everything)
    if still:
        raise DistillError(
            f"{len(still)} teacher embeddings are missing from {cache.dir} after filling it: with "
            "several machines, every process must see the same cache folder (--cache-dir on a "
            "shared file system)"
        )
    return False


def _write_output(s: Setup, t: Trainer, env: Any) -> Generator[DistillEvent, None, DistillResult]:
    """Step 5: the distilled model in the official layout, plus its metadata (process 0 only)."""
    from ..models.checkpoint import save_checkpoint

    cfg = s.cfg
    after = t.history[-1] if t.history else t.before
    result = DistillResult(None, None, t.run_dir, t.before, after, t.history, resumed_from=t.resumed_from)
    if env.is_main:
        s.sam.cpu()
        meta = {
            "model": cfg.student_model,
            "kind": "distilled",
            "teacher": {"description": s.teacher.description, "identity": s.teacher.identity,
                        "source": str(cfg.teacher) if isinstance(cfg.teacher, (str, os.PathLike)) else None},
            "student_init": s.student_source,
            "data": {"images": [name for name, _ in s.sources], "n_train": len(s.train), "n_val": len(s.val)},
            "settings": {f.name: (str(getattr(cfg, f.name)) if isinstance(getattr(cfg, f.name), os.PathLike)
                                  else getattr(cfg, f.name))
                         for f in fields(cfg) if f.name not in ("teacher", "images")},
            "processes": env.world,
            "metrics": {"before": _clean(t.before), "after": _clean(after),
                        "history": [_clean(h) for h in t.history]},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        meta["settings"]["output"] = str(s.out)
        meta["settings"]["cache_dir"] = str(s.cache_root)
        save_checkpoint(s.sam.state_dict(), s.out, meta)
        result.output, result.metadata = s.out, s.out.with_name(s.out.name + ".json")
        yield DistillEvent("saved", epoch=cfg.epochs, message=str(s.out))
    env.barrier()
    return result


def iter_distill(
    config: DistillConfig, *, cancel: Callable[[], bool] | None = None
) -> Generator[DistillEvent, None, DistillResult]:
    """Run a distillation, yielding :class:`DistillEvent` progress; returns a :class:`DistillResult`.

    Every setting is checked (files exist, the teacher is a SAM encoder, there are images) before
    any computation. ``cancel()`` returning True (checked after each step and cache entry), closing
    the generator, or Ctrl-C saves a training state and stops; the next run with the same settings
    resumes from it (from the newest readable one: a damaged newer state is moved aside as
    ``NAME.damaged``, with an ``"info"`` event saying so). Under ``torchrun`` every process runs
    this; only process 0 writes files and its events are the ones to show.

    The steps: 0 settings and data (:func:`_setup`), 1 teacher cache (:func:`_fill_cache`),
    2 optimiser, 3 resume, 4 epochs (:class:`Trainer`), 5 output (:func:`_write_output`).

    Raises
    ------
    DistillError
        Invalid settings or data (raised before the teacher or student runs), or a diverged run.
    """
    import torch

    from .train import choose_device, choose_precision, init_distributed

    cfg = config
    s = _setup(cfg)
    env = init_distributed(None if cfg.device in (None, "auto") else torch.device(cfg.device).type)
    try:
        device = choose_device(cfg.device, env.local_rank)
        precision = choose_precision(cfg.precision, device)
        fp = _fingerprint(cfg, s.teacher, s.student_source, s.train, s.val, env.world)
        run_dir = s.out.with_name(s.out.name + ".distill") / fp[:16]
        yield DistillEvent("info", message=(
            f"{len(s.train)} training and {len(s.val)} validation slices from {len(s.sources)} image(s); "
            f"teacher {s.teacher.description}; device {device}"
            + (f", process {env.rank + 1} of {env.world}" if env.world > 1 else "")))
        cache = TeacherCache(s.teacher, s.cache_root)
        if (yield from _fill_cache(s, cache, env, device, cancel)):
            return DistillResult(None, None, run_dir, {}, {}, [], cancelled=True)
        t = Trainer(s, cache, env, device, precision, fp, run_dir)
        yield from t.resume()
        yield from t.validate_before()
        t.wrap_ddp()
        try:
            for epoch in range(t.start_epoch, cfg.epochs):
                if (yield from t.run_epoch(epoch, cancel)):
                    return DistillResult(None, None, run_dir, t.before, {}, t.history, cancelled=True,
                                         resumed_from=t.resumed_from)
        except (GeneratorExit, KeyboardInterrupt):
            t.save_if_behind()
            raise
        return (yield from _write_output(s, t, env))
    finally:
        env.close()


def distill(
    config: DistillConfig,
    *,
    callback: Callable[[DistillEvent], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> DistillResult:
    """Run :func:`iter_distill` to the end, passing each event to ``callback``; see there.

    An exception raised by ``callback`` stops the run like a cancel (the training state is saved)
    and is then re-raised.
    """
    from ..core.heap import release_freed_memory

    gen = iter_distill(config, cancel=cancel)
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            if callback is not None:
                try:
                    callback(event)
                except BaseException:
                    gen.close()
                    raise
    finally:
        release_freed_memory()  # the run's freed activations back to the system (core.heap)


if __name__ == "__main__":  # the old spelling, ``python -m napari_mobilesam.distillation.run``
    import importlib  # not a module-level import: the command imports this module

    sys.exit(importlib.import_module("napari_mobilesam.distillation.command").main())
