"""Training side of decoupled distillation: devices, DDP, batches, losses, validation, schedule.

The orchestration (:func:`napari_mobilesam.distillation.run.iter_distill`) strings these together. Every
tensor shape is documented; images are ``(B, 3, 1024, 1024)`` float32 SAM inputs, embeddings
``(B, 256, 64, 64)``, valid-pixel grids ``(B, 64, 64)`` bool (True where the embedding cell covers
the image rather than the zero padding). Prompts are generated on that grid in napari's
``(row, col)`` order and handed to SAM's prompt encoder as ``(x, y)`` in one marked place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models.devices import choose_device
from .data import DistillError, SliceRef, TeacherCache, dihedral, preprocess_rgb
from .states import STATE_FORMAT, latest_state, load_state, save_state

__all__ = [
    "DistEnv",
    "choose_device",
    "choose_precision",
    "init_distributed",
    "epoch_order",
    "make_batch",
    "freeze_batchnorm",
    "mask_distill_loss",
    "Validator",
    "warmup_cosine",
    "save_state",
    "load_state",
    "latest_state",
    "STATE_FORMAT",
]


# --------------------------------------------------------------------------------------------
# devices, precision, processes



def choose_precision(precision: str, device: Any) -> tuple[Any, bool]:
    """Autocast dtype (None: plain float32) and whether a gradient scaler is needed.

    ``"auto"``: bf16 on a CUDA GPU that supports it, else fp16 on CUDA, float32 elsewhere.
    ``"fp32"``, ``"bf16"``, ``"fp16"`` force a choice (fp16 only on CUDA).
    """
    import torch

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise DistillError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "fp16":
        if device.type != "cuda":
            raise DistillError("fp16 training needs a CUDA GPU: use precision='bf16' or 'fp32'")
        return torch.float16, True
    return torch.bfloat16, False


@dataclass
class DistEnv:
    """This process's place in a (possibly) distributed run. ``world == 1``: a plain run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Sum ``values`` over every process (float64); identity in a plain run."""
        if self.world == 1:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device_type: str | None = None) -> DistEnv:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment).

    Backend: NCCL when CUDA is available (and ``device_type`` is not ``"cpu"``), gloo otherwise.
    A group that is already initialised is used as is.
    """
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    owns = False
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device_type != "cpu"
        if use_nccl:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
        owns = True
    return DistEnv(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, owns_group=owns)


def epoch_order(n: int, epoch: int, seed: int, env: DistEnv) -> list[int]:
    """This process's share of the ``n`` training slices for ``epoch``, in training order.

    The same permutation (from ``seed`` and ``epoch``) is drawn in every process; process ``r``
    takes positions ``r, r + world, ...``. The list is padded by wrapping around so every process
    gets ``ceil(n / world)`` items (DDP needs equal step counts).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per = math.ceil(n / env.world)
    padded = np.concatenate([perm, perm[: per * env.world - n]]) if per * env.world > n else perm
    return [int(i) for i in padded[env.rank :: env.world]]


def aug_op(seed: int, epoch: int, position: int, augment: bool) -> int:
    """The dihedral op (0..7) of the sample at ``position`` in ``epoch``'s order (0 = none)."""
    if not augment:
        return 0
    return int(np.random.default_rng([seed, epoch, position, 7]).integers(8))


# --------------------------------------------------------------------------------------------
# batches


def make_batch(
    sources: Sequence[tuple[str, Any]],
    refs: Sequence[SliceRef],
    cache: TeacherCache,
    ops: Sequence[int],
    img_size: int = 1024,
) -> dict[str, Any]:
    """Inputs and cached teacher targets for ``refs``, each transformed by its dihedral ``op``.

    Returns
    -------
    dict with
        ``image`` (B, 3, S, S) float32; ``target`` (B, 256, g, g) float32; ``valid`` (B, g, g) bool;
        ``input_size`` list of (h, w) before augmentation; ``original_size`` list of (H, W).

    Raises DistillError when a teacher embedding is missing (the cache must be filled first).
    """
    import torch

    images, targets, valids, in_sizes, orig = [], [], [], [], []
    g = img_size // 16
    for ref, op in zip(refs, ops):
        rgb = sources[ref.source][1].rgb(ref.z)
        x, (h, w) = preprocess_rgb(rgb, img_size)
        emb = cache.load(ref.key)
        if emb is None:
            raise DistillError(
                f"teacher embedding of slice {ref.z} of {sources[ref.source][0]} is missing from the "
                f"cache {cache.dir}: fill the cache first (it may have been deleted during the run)"
            )
        t = torch.from_numpy(emb.astype(np.float32))
        valid = torch.zeros(g, g, dtype=torch.bool)
        valid[: math.ceil(h / 16), : math.ceil(w / 16)] = True
        x, t, valid = dihedral(op, x, t, valid)
        images.append(x)
        targets.append(t)
        valids.append(valid)
        in_sizes.append((h, w))
        orig.append(tuple(rgb.shape[:2]))
    return {
        "image": torch.stack(images),
        "target": torch.stack(targets),
        "valid": torch.stack(valids),
        "input_size": in_sizes,
        "original_size": orig,
    }


def freeze_batchnorm(module: Any) -> int:
    """Put every BatchNorm of ``module`` in eval mode (running statistics stay as loaded).

    Fine-tuning with a few images per step would otherwise overwrite the statistics learnt on a
    large data set. Call after ``module.train()``. Returns how many layers were frozen.
    """
    import torch

    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# prompts and masks through the frozen decoder


def random_points(valid: Any, n: int, generator: Any) -> Any:
    """``n`` random single-point prompts inside the valid cells of a ``(g, g)`` bool grid.

    Returns ``(n, 2)`` float32 positions in (row, col) pixels of the encoder's input frame (cell
    centres, 16 pixels per cell).
    """
    import torch

    cells = torch.nonzero(valid, as_tuple=False)
    if len(cells) == 0:
        raise DistillError("a training slice has no valid pixels")
    pick = torch.randint(len(cells), (n,), generator=generator)
    return cells[pick].float() * 16 + 8


def decode_points(sam: Any, embedding: Any, points_rc: Any) -> tuple[Any, Any]:
    """Run the frozen prompt encoder + mask decoder for single positive points on one embedding.

    Parameters
    ----------
    embedding : (1, 256, g, g) float tensor
    points_rc : (n, 2) float tensor, (row, col) in the input frame

    Returns
    -------
    low_res : (n, 3, 256, 256) mask logits; iou : (n, 3) predicted IoU.
    """
    import torch

    coords = points_rc.flip(-1)[:, None, :].to(embedding.device)  # SAM wants (x, y)
    labels = torch.ones(len(points_rc), 1, dtype=torch.int, device=embedding.device)
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    low, iou = sam.mask_decoder(
        image_embeddings=embedding.to(sparse.dtype),
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    return low, iou


def mask_distill_loss(
    sam: Any, student: Any, teacher: Any, valid: Any, n_points: int, generator: Any
) -> Any:
    """Mask-level term: BCE between student mask logits and the teacher's mask probabilities.

    ``student``/``teacher``: (B, 256, g, g) embeddings (gradients flow into ``student`` only);
    ``valid``: (B, g, g). ``n_points`` random single-point prompts per image, all 3 multimask
    outputs compared at 256×256. Returns a scalar tensor.
    """
    import torch
    import torch.nn.functional as F

    losses = []
    for b in range(student.shape[0]):
        pts = random_points(valid[b].cpu(), n_points, generator)
        with torch.no_grad():
            t_low, _ = decode_points(sam, teacher[b : b + 1], pts)
        s_low, _ = decode_points(sam, student[b : b + 1], pts)
        losses.append(F.binary_cross_entropy_with_logits(s_low.float(), torch.sigmoid(t_low.float())))
    return torch.stack(losses).mean()


class Validator:
    """Validation on held-out slices: embedding MSE and teacher-vs-student mask mIoU.

    The prompts are fixed per slice (drawn from ``seed`` and the slice key), so the figures of
    different epochs compare the same masks. The teacher's masks are computed once and kept. Each
    process validates its share of the slices; the sums are combined over processes.
    """

    def __init__(self, sam, sources, refs, cache, env: DistEnv, *, n_prompts=8, seed=0, device="cpu"):
        self.sam, self.sources, self.cache, self.env = sam, sources, cache, env
        self.refs = list(refs)[env.rank :: env.world]
        self.n_total = len(refs)
        self.n_prompts, self.seed, self.device = n_prompts, seed, device
        self._teacher_masks: dict[str, tuple[Any, Any]] = {}

    def _masks(self, emb, pts, input_size, original_size, pick=None):
        import torch

        low, iou = decode_points(self.sam, emb, pts)
        if pick is None:
            pick = iou.argmax(dim=1)
        best = low[torch.arange(len(pick)), pick][:, None].float()
        masks = self.sam.postprocess_masks(best, input_size, original_size)[:, 0] > 0
        return masks.cpu(), pick

    def run(self, encoder: Any, autocast_dtype: Any = None) -> dict[str, float]:
        """``{"mse", "miou", "n_slices"}`` for ``encoder`` (any module mapping images to embeddings).

        Returns NaNs when there are no validation slices.
        """
        import torch

        if self.n_total == 0:
            return {"mse": float("nan"), "miou": float("nan"), "n_slices": 0}
        was_training = encoder.training
        encoder.eval()
        sums = [0.0, 0.0, 0.0, 0.0]  # mse sum, slices, iou sum, prompts
        dev = torch.device(self.device)
        with torch.inference_mode():
            for ref in self.refs:
                batch = make_batch(self.sources, [ref], self.cache, [0], self.cache.teacher.img_size)
                x = batch["image"].to(dev)
                target = batch["target"].to(dev)
                with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    emb = encoder(x)
                emb = emb.float()
                sums[0] += float(torch.mean((emb - target) ** 2))
                sums[1] += 1
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(ref.key[:8], 16) % 1_000_000)
                pts = random_points(batch["valid"][0], self.n_prompts, gen)
                in_size, orig = batch["input_size"][0], batch["original_size"][0]
                if ref.key not in self._teacher_masks:
                    self._teacher_masks[ref.key] = self._masks(target, pts, in_size, orig)
                t_masks, pick = self._teacher_masks[ref.key]
                s_masks, _ = self._masks(emb, pts, in_size, orig, pick=pick)
                inter = (t_masks & s_masks).flatten(1).sum(1).double()
                union = (t_masks | s_masks).flatten(1).sum(1).double()
                iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
                sums[2] += float(iou.sum())
                sums[3] += len(iou)
        encoder.train(was_training)
        s = self.env.all_sum(sums)
        return {"mse": s[0] / max(s[1], 1), "miou": s[2] / max(s[3], 1), "n_slices": int(s[1])}


# --------------------------------------------------------------------------------------------
# schedule (training states: see .states)


def warmup_cosine(total_steps: int, warmup_steps: int, min_factor: float = 0.05):
    """LambdaLR factor: linear warm-up from ~0 to 1, then cosine decay to ``min_factor``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor
