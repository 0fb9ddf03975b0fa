"""Settings, progress events and results of a distillation run, and the settings check.

:class:`DistillConfig` is what every entry point fills in (the Python API, the ``distill`` command,
the napari panel); :func:`check_config` refuses bad settings with a message naming the fix before
anything is read or computed. No napari or Qt here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DistillError

__all__ = ["DistillConfig", "DistillEvent", "DistillResult", "STUDENT_MODELS", "check_config", "Setup"]

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


def check_config(cfg: DistillConfig) -> Path:
    """Check every setting that can be checked without reading files; returns the output path.

    Raises
    ------
    DistillError
        Naming the setting and the fix (an existing output without ``overwrite``, a missing folder,
        numbers out of range, an unknown device or precision).
    """
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


@dataclass
class Setup:
    """What a run works on once every setting is checked (step 0 of ``iter_distill``).

    ``sources``: ``(name, SliceSource)`` pairs; ``train``/``val``: ``SliceRef`` lists; ``sam``: the
    student ``Sam`` (only its image encoder trains); ``student_source``: names its initial weights.
    """

    cfg: DistillConfig
    out: Path
    cache_root: Path
    teacher: Any
    sources: list
    train: list
    val: list
    sam: Any
    student_source: str
