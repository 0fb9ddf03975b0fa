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
  (:func:`configure_parser` / :func:`run_cli`); also ``python -m napari_mobilesam.distillation.run ...``.
- Several processes or GPUs: the same command under ``torchrun`` (DistributedDataParallel; NCCL on
  GPUs, gloo on CPUs), e.g. ``torchrun --nproc_per_node 2 -m napari_mobilesam.distillation.run ...``.

Outputs: ``student.pt`` in the official MobileSAM state-dict layout (loads with
``build_sam("vit_t", "student.pt")`` and in the official code) and ``student.pt.json`` (teacher, data,
settings, validation metrics before and after). Training states go to ``student.pt.distill/<run>/``
after every epoch (and on cancel); rerunning the same command resumes from the newest one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .data import (
    DistillError,
    Teacher,
    TeacherCache,
    fill_teacher_cache,
    load_teacher,
    open_images,
    split_slices,
    teacher_from_module,
)

__all__ = [
    "DistillConfig",
    "DistillEvent",
    "DistillResult",
    "DistillError",
    "distill",
    "iter_distill",
    "configure_parser",
    "run_cli",
    "main",
]

STUDENT_MODELS = ("vit_t", "vit_t_test")


@dataclass
class DistillConfig:
    """Settings of one distillation run.

    Attributes
    ----------
    teacher : path, Teacher, or torch module
        A SAM ViT-B/L/H checkpoint (``sam_vit_b_01ec64.pth``...) or a MobileSAM-format checkpoint;
        in scripts also a :class:`~napari_mobilesam.distillation.data.Teacher` or an encoder module.
    images : sequence
        Arrays (2D ``(row, col)`` or stacks ``(z, row, col)``, e.g. napari layer data), TIFF files,
        folders of TIFFs, or ``SliceSource`` objects (see ``distill_data.open_images``).
    channel_axis : int or None
        Channel axis of multichannel arrays/files (as ``SliceSource`` takes it); None: none.
    output : path
        Where the distilled model goes (``.pt``); its metadata goes to ``<output>.json``.
    student_model : ``"vit_t"`` (MobileSAM) or ``"vit_t_test"`` (tiny, tests only)
    student_checkpoint : path or None
        Initial student weights; None means the default MobileSAM weights (random for vit_t_test).
    epochs, batch_size, lr, weight_decay, warmup_steps, grad_clip
        AdamW with linear warm-up (``warmup_steps``; None: 5% of the steps) and cosine decay;
        gradients clipped to norm ``grad_clip`` (0 disables). ``batch_size`` is per process.
    augment : bool
        Random flips/quarter turns of image and cached embedding together.
    mask_loss_weight, mask_points
        Weight of the optional mask term (0 disables) and random point prompts per image for it.
    val_fraction, val_prompts, max_slices_per_image
        Held-out share of the slices, random point prompts per held-out slice for the mask mIoU,
        and how many evenly spaced slices to take from each stack (None: all).
    device : ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``
    precision : ``"auto"`` (bf16/fp16 autocast on CUDA, float32 elsewhere), ``"fp32"``, ``"bf16"``, ``"fp16"``
    cache_dir : path or None
        Root of the teacher-embedding cache (None: the per-user cache, ``$NAPARI_MOBILESAM_CACHE``).
    seed : int
        Seeds the slice split, the order, augmentations and validation prompts.
    resume : bool
        Continue from the newest training state of the same run (same teacher, data and settings).
    overwrite : bool
        Replace an existing ``output``; without it an existing file is an error.
    keep_states : int
        Training-state files kept per run (the newest ones).
    save_every : int
        Also save a training state every this many steps inside an epoch (0: only at the end of
        each epoch and on cancel), so a crash in a long epoch loses little.
    """

    teacher: Any
    images: Any
    output: str | os.PathLike
    student_model: str = "vit_t"
    student_checkpoint: str | os.PathLike | None = None
    epochs: int = 4
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 5e-4
    warmup_steps: int | None = None
    grad_clip: float = 1.0
    augment: bool = True
    mask_loss_weight: float = 0.0
    mask_points: int = 4
    val_fraction: float = 0.1
    val_prompts: int = 8
    max_slices_per_image: int | None = 64
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str | os.PathLike | None = None
    seed: int = 0
    resume: bool = True
    overwrite: bool = False
    keep_states: int = 2
    save_every: int = 0
    channel_axis: int | None = None


@dataclass(frozen=True)
class DistillEvent:
    """Progress of a run, as yielded by :func:`iter_distill`.

    ``kind`` is one of:

    - ``"info"``: ``message`` says what is happening (resuming, teacher loaded...).
    - ``"cache"``: teacher embeddings; ``step`` done of ``total`` missing ones.
    - ``"step"``: a training step; ``epoch`` (0-based), ``step`` (global, 1-based) of ``total``,
      ``values`` = ``{"loss", "mse", "mask", "lr"}`` (this process's batch).
    - ``"val"``: validation; ``epoch`` = completed epochs (0 = before training),
      ``values`` = ``{"mse", "miou", "train_loss"}`` (train_loss NaN before training).
    - ``"saved"``: ``message`` is the path of the training state or final model written.
    """

    kind: str
    epoch: int = 0
    step: int = 0
    total: int = 0
    values: dict = field(default_factory=dict)
    message: str = ""


@dataclass
class DistillResult:
    """What a run produced.

    ``output`` / ``metadata`` are None when the run was cancelled (its training state is in
    ``run_dir``; run again to resume). ``before`` / ``after`` are validation figures
    ``{"mse", "miou", "n_slices"}``; ``history`` one dict per epoch.
    """

    output: Path | None
    metadata: Path | None
    run_dir: Path
    before: dict
    after: dict
    history: list
    cancelled: bool = False
    resumed_from: Path | None = None


def _check_config(cfg: DistillConfig) -> Path:
    out = Path(cfg.output).expanduser()
    if out.suffix not in (".pt", ".pth"):
        raise DistillError(f"output {str(out)!r} must end in .pt or .pth")
    if out.is_dir():
        raise DistillError(f"output {str(out)!r} is a folder: give a file name such as student.pt")
    if out.exists() and not cfg.overwrite:
        raise DistillError(
            f"output {str(out)!r} already exists: choose another file name or allow overwriting"
        )
    if not out.parent.exists():
        raise DistillError(f"the folder of output {str(out)!r} does not exist: create it first")
    if cfg.student_model not in STUDENT_MODELS:
        raise DistillError(f"student_model must be one of {STUDENT_MODELS}, got {cfg.student_model!r}")
    if cfg.student_checkpoint is not None and not Path(cfg.student_checkpoint).expanduser().is_file():
        raise DistillError(f"student checkpoint {str(cfg.student_checkpoint)!r} does not exist")
    if cfg.student_checkpoint is not None and Path(cfg.student_checkpoint).expanduser().resolve() == out.resolve():
        raise DistillError("output must differ from the student checkpoint (it would be overwritten)")
    checks = [
        (int(cfg.epochs) >= 1, f"epochs must be at least 1, got {cfg.epochs}"),
        (int(cfg.batch_size) >= 1, f"batch_size must be at least 1, got {cfg.batch_size}"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"learning rate must be positive, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {cfg.grad_clip}"),
        (cfg.mask_loss_weight >= 0, f"mask_loss_weight must be >= 0, got {cfg.mask_loss_weight}"),
        (int(cfg.mask_points) >= 1, f"mask_points must be at least 1, got {cfg.mask_points}"),
        (int(cfg.val_prompts) >= 1, f"val_prompts must be at least 1, got {cfg.val_prompts}"),
        (int(cfg.keep_states) >= 1, f"keep_states must be at least 1, got {cfg.keep_states}"),
        (int(cfg.save_every) >= 0, f"save_every must be >= 0 (0: every epoch only), got {cfg.save_every}"),
        (cfg.max_slices_per_image is None or int(cfg.max_slices_per_image) >= 1,
         f"max_slices_per_image must be at least 1 or None, got {cfg.max_slices_per_image}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DistillError(msg)
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise DistillError(f"precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.device not in (None, "auto"):
        import torch

        try:
            torch.device(cfg.device)
        except (RuntimeError, TypeError):
            raise DistillError(
                f"device {cfg.device!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
            ) from None
    return out


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


def iter_distill(
    config: DistillConfig, *, cancel: Callable[[], bool] | None = None
) -> Generator[DistillEvent, None, DistillResult]:
    """Run a distillation, yielding :class:`DistillEvent` progress; returns a :class:`DistillResult`.

    Every setting is checked (files exist, the teacher is a SAM encoder, there are images) before
    any computation. ``cancel()`` returning True (checked after each step and cache entry), closing
    the generator, or Ctrl-C saves a training state and stops; the next run with the same settings
    resumes from it. Under ``torchrun`` every process runs this; only process 0 writes files and
    its events are the ones to show.

    Raises
    ------
    DistillError
        Invalid settings or data (raised before the teacher or student runs), or a diverged run.
    """
    import torch

    from ..models.checkpoint import CheckpointError, file_sha256, save_checkpoint
    from ..models.registry import build_sam
    from ..models.weights import WeightsError
    from .train import (
        Validator,
        aug_op,
        choose_device,
        choose_precision,
        epoch_order,
        freeze_batchnorm,
        init_distributed,
        latest_state,
        load_state,
        make_batch,
        mask_distill_loss,
        save_state,
        warmup_cosine,
    )

    cfg = config
    out = _check_config(cfg)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else None
    from .data import default_cache_root

    cache_root = cache_root or default_cache_root()
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

    env = init_distributed(None if cfg.device in (None, "auto") else torch.device(cfg.device).type)
    try:
        device = choose_device(cfg.device, env.local_rank)
        autocast_dtype, use_scaler = choose_precision(cfg.precision, device)
        fp = _fingerprint(cfg, teacher, student_source, train, val, env.world)
        run_dir = out.with_name(out.name + ".distill") / fp[:16]
        yield DistillEvent("info", message=(
            f"{len(train)} training and {len(val)} validation slices from {len(sources)} image(s); "
            f"teacher {teacher.description}; device {device}"
            + (f", process {env.rank + 1} of {env.world}" if env.world > 1 else "")))

        # 1. teacher embeddings, each process its share, then everyone waits for the full cache
        cache = TeacherCache(teacher, cache_root)
        everything = train + val
        share = everything[env.rank :: env.world]
        n_missing = len(cache.missing(r.key for r in share))
        if n_missing:
            yield DistillEvent("info", message=f"computing {n_missing} teacher embeddings into {cache.dir}")
        done = 0
        for i, ref in enumerate(share):
            if cancel is not None and cancel():
                yield DistillEvent("info", message="cancelled while filling the teacher cache; finished entries are kept")
                return DistillResult(None, None, run_dir, {}, {}, [], cancelled=True)
            if cache.has(ref.key):
                continue
            fill_teacher_cache(cache, sources, [ref], device=device)
            done += 1
            yield DistillEvent("cache", step=done, total=n_missing)
        if teacher.loader is not None:
            teacher.encoder = None  # free the teacher before training (it can be loaded again)
        env.barrier()
        still = cache.missing(r.key for r in everything)
        if still:
            raise DistillError(
                f"{len(still)} teacher embeddings are missing from {cache.dir} after filling it: with "
                "several machines, every process must see the same cache folder (--cache-dir on a "
                "shared file system)"
            )

        # 2. student, optimiser, schedule
        encoder = sam.image_encoder.to(device)
        sam.prompt_encoder.to(device)
        sam.mask_decoder.to(device)
        sam.requires_grad_(False)
        encoder.requires_grad_(True)
        for name, p in encoder.named_parameters():
            if name.startswith(("head.", "norm_head.")):  # TinyViT's unused classifier
                p.requires_grad_(False)
        params = [p for p in encoder.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_local = len(epoch_order(len(train), 0, cfg.seed, env))
        steps_per_epoch = math.ceil(n_local / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.epochs
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, warmup))
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None

        start_epoch, start_step, history, before = 0, 0, [], None
        resumed_from = latest_state(run_dir) if cfg.resume else None
        if resumed_from is not None:
            state = load_state(resumed_from)
            encoder.load_state_dict(state["student"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_epoch, start_step = int(state["epoch"]), int(state["step_in_epoch"])
            history, before = list(state["history"]), dict(state["before"])
            yield DistillEvent("info", message=(
                f"resuming from {resumed_from} (epoch {start_epoch + 1}, step {start_step + 1})"))

        validator = Validator(sam, sources, val, cache, env, n_prompts=cfg.val_prompts, seed=cfg.seed,
                              device=str(device))
        if before is None:
            before = validator.run(encoder, autocast_dtype)
        yield DistillEvent("val", epoch=0, values={**before, "train_loss": float("nan")})
        for h in history:
            yield DistillEvent("val", epoch=h["epoch"], values=h)

        model = encoder
        if env.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(encoder, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=False)

        def state_now(epoch: int, step_in_epoch: int) -> dict:
            return {
                "fingerprint": fp, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "student": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "history": history, "before": before,
            }

        gen = torch.Generator().manual_seed(cfg.seed)
        resume_point = saved_at = (start_epoch, start_step)  # (epoch, steps done in it)
        try:
            for epoch in range(start_epoch, cfg.epochs):
                order = epoch_order(len(train), epoch, cfg.seed, env)
                model.train()
                freeze_batchnorm(encoder)
                loss_sum = [0.0, 0.0]
                first = start_step if epoch == start_epoch else 0
                for step in range(first, steps_per_epoch):
                    pos = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                    ops = [aug_op(cfg.seed, epoch, step * cfg.batch_size + j, cfg.augment) for j in range(len(pos))]
                    batch = make_batch(sources, [train[i] for i in pos], cache, ops, teacher.img_size)
                    x, target = batch["image"].to(device), batch["target"].to(device)
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        pred = model(x)
                        mse = torch.mean((pred.float() - target) ** 2)
                        loss = mse
                        mask_term = torch.zeros(())
                        if cfg.mask_loss_weight > 0:
                            mask_term = mask_distill_loss(sam, pred, target, batch["valid"], cfg.mask_points, gen)
                            loss = loss + cfg.mask_loss_weight * mask_term
                    if not torch.isfinite(loss):
                        raise DistillError(
                            f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {float(loss)}): "
                            "lower the learning rate or use precision='fp32'"
                        )
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(opt)
                    else:
                        loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    sched.step()
                    resume_point = (epoch, step + 1)
                    loss_sum[0] += float(loss.detach()) * len(pos)
                    loss_sum[1] += len(pos)
                    yield DistillEvent("step", epoch=epoch, step=epoch * steps_per_epoch + step + 1,
                                       total=total_steps, values={
                                           "loss": float(loss.detach()), "mse": float(mse.detach()),
                                           "mask": float(mask_term.detach()), "lr": sched.get_last_lr()[0]})
                    if (cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps_per_epoch
                            and env.is_main):
                        path = save_state(run_dir, state_now(*resume_point), keep=cfg.keep_states)
                        saved_at = resume_point
                        yield DistillEvent("saved", epoch=epoch, message=str(path))
                    if cancel is not None and cancel() and env.world == 1:
                        path = save_state(run_dir, state_now(*resume_point), keep=cfg.keep_states)
                        saved_at = resume_point
                        yield DistillEvent("saved", epoch=epoch, message=str(path))
                        yield DistillEvent("info", message=f"cancelled; run again to resume from {path}")
                        return DistillResult(None, None, run_dir, before, {}, history, cancelled=True,
                                             resumed_from=resumed_from)
                s = env.all_sum(loss_sum)
                metrics = validator.run(encoder, autocast_dtype)
                entry = {"epoch": epoch + 1, "train_loss": s[0] / max(s[1], 1), **metrics}
                history.append(entry)
                resume_point = saved_at = (epoch + 1, 0)
                path = save_state(run_dir, state_now(epoch + 1, 0), keep=cfg.keep_states) if env.is_main else None
                yield DistillEvent("val", epoch=epoch + 1, values=entry)
                if path is not None:
                    yield DistillEvent("saved", epoch=epoch + 1, message=str(path))
                env.barrier()
        except (GeneratorExit, KeyboardInterrupt):
            if env.is_main and env.world == 1 and resume_point != saved_at:
                save_state(run_dir, state_now(*resume_point), keep=cfg.keep_states)
            raise

        # 3. the distilled model, in the official layout, plus metadata
        after = history[-1] if history else before
        result = DistillResult(None, None, run_dir, before, after, history, resumed_from=resumed_from)
        if env.is_main:
            sam.cpu()
            meta = {
                "model": cfg.student_model,
                "kind": "distilled",
                "teacher": {"description": teacher.description, "identity": teacher.identity,
                            "source": str(cfg.teacher) if isinstance(cfg.teacher, (str, os.PathLike)) else None},
                "student_init": student_source,
                "data": {"images": [name for name, _ in sources], "n_train": len(train), "n_val": len(val)},
                "settings": {f.name: (str(getattr(cfg, f.name)) if isinstance(getattr(cfg, f.name), os.PathLike)
                                      else getattr(cfg, f.name))
                             for f in fields(cfg) if f.name not in ("teacher", "images")},
                "processes": env.world,
                "metrics": {"before": _clean(before), "after": _clean(after),
                            "history": [_clean(h) for h in history]},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            meta["settings"]["output"] = str(out)
            meta["settings"]["cache_dir"] = str(cache_root)
            save_checkpoint(sam.state_dict(), out, meta)
            result.output, result.metadata = out, out.with_name(out.name + ".json")
            yield DistillEvent("saved", epoch=cfg.epochs, message=str(out))
        env.barrier()
        return result
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
    gen = iter_distill(config, cancel=cancel)
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


# --------------------------------------------------------------------------------------------
# command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``distill`` subcommand's arguments to ``parser``."""
    d = DistillConfig(teacher=None, images=None, output="")
    parser.add_argument("--teacher", required=True, help="SAM ViT-B/L/H or MobileSAM-format checkpoint (.pth/.pt)")
    parser.add_argument("--images", required=True, nargs="+",
                        help="TIFF files and/or folders of TIFFs (2D images or stacks) to train on")
    parser.add_argument("-o", "--output", required=True, help="distilled model to write (.pt)")
    parser.add_argument("--channel-axis", type=int, default=None,
                        help="channel axis of multichannel images (up to 3 channels shown as RGB)")
    parser.add_argument("--student", default=None, metavar="CHECKPOINT",
                        help="initial student weights (default: the MobileSAM weights)")
    parser.add_argument("--student-model", default=d.student_model, choices=STUDENT_MODELS,
                        help="student architecture (vit_t_test: tiny, for tests)")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step and process")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    parser.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 disables")
    parser.add_argument("--no-augment", action="store_true", help="no flips/quarter turns")
    parser.add_argument("--mask-loss", type=float, default=d.mask_loss_weight, dest="mask_loss_weight",
                        help="weight of the mask term through the frozen decoder (0: embedding MSE only)")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction)
    parser.add_argument("--val-prompts", type=int, default=d.val_prompts)
    parser.add_argument("--max-slices", type=int, default=d.max_slices_per_image,
                        help="slices taken from each stack, evenly spaced")
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", default=d.precision, choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--cache-dir", default=None, help="teacher-embedding cache root")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--save-every", type=int, default=d.save_every, metavar="STEPS",
                        help="also save a training state every STEPS steps (default: each epoch only)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if a training state exists")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors and the summary")


def _config_from_args(args: argparse.Namespace) -> DistillConfig:
    return DistillConfig(
        teacher=args.teacher, images=list(args.images), output=args.output, channel_axis=args.channel_axis,
        student_model=args.student_model, student_checkpoint=args.student, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, augment=not args.no_augment,
        mask_loss_weight=args.mask_loss_weight, val_fraction=args.val_fraction,
        val_prompts=args.val_prompts, max_slices_per_image=args.max_slices, device=args.device,
        precision=args.precision, cache_dir=args.cache_dir, seed=args.seed,
        resume=not args.no_resume, overwrite=args.overwrite, save_every=args.save_every,
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run the ``distill`` subcommand; returns the exit code (0 done, 1 cancelled, 2 bad input).

    Progress goes to stderr (process 0 only under torchrun), the summary to stdout.
    """
    rank = int(os.environ.get("RANK", "0"))
    quiet = args.quiet or rank != 0
    last = {"t": 0.0}

    def show(ev: DistillEvent) -> None:
        if quiet:
            return
        if ev.kind == "info":
            print(ev.message, file=sys.stderr, flush=True)
        elif ev.kind == "cache":
            print(f"teacher embeddings {ev.step}/{ev.total}", file=sys.stderr, flush=True)
        elif ev.kind == "step" and (time.monotonic() - last["t"] > 2 or ev.step == ev.total):
            last["t"] = time.monotonic()
            v = ev.values
            print(f"epoch {ev.epoch + 1} step {ev.step}/{ev.total} loss {v['loss']:.4g} lr {v['lr']:.3g}",
                  file=sys.stderr, flush=True)
        elif ev.kind == "val":
            v = ev.values
            label = "before training" if ev.epoch == 0 else f"after epoch {ev.epoch}"
            print(f"validation {label}: embedding MSE {v['mse']:.4g}, mask mIoU {v['miou']:.3f}",
                  file=sys.stderr, flush=True)
        elif ev.kind == "saved":
            print(f"saved {ev.message}", file=sys.stderr, flush=True)

    try:
        result = distill(_config_from_args(args), callback=show)
    except DistillError as exc:
        print(f"napari-mobilesam distill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the training state was saved: run the same command again to resume",
              file=sys.stderr)
        return 130
    if result.cancelled:
        return 1
    if rank == 0 and result.output is not None:
        b, a = result.before, result.after
        print(f"wrote {result.output} (metadata {result.metadata})")
        print(f"validation mask mIoU teacher-vs-student: {b['miou']:.3f} before, {a['miou']:.3f} after; "
              f"embedding MSE {b['mse']:.4g} -> {a['mse']:.4g}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napari_mobilesam.distillation.run ...`` (the same arguments as ``napari-mobilesam distill``)."""
    parser = argparse.ArgumentParser(prog="python -m napari_mobilesam.distillation.run",
                                     description="Fine-tune MobileSAM by decoupled distillation.")
    configure_parser(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
