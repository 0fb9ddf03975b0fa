"""The training part of a distillation run: the student and its optimiser, resuming, the epochs.

:func:`napari_mobilesam.distillation.run.iter_distill` makes one :class:`Trainer` after the teacher
cache is full and drives it: :meth:`Trainer.resume`, :meth:`Trainer.validate_before`, then
:meth:`Trainer.run_epoch` per epoch. Images are ``(B, 3, 1024, 1024)`` float32 SAM inputs,
embeddings ``(B, 256, 64, 64)``. No napari or Qt here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from ..errors import DistillError
from .config import DistillEvent, Setup
from .teacher import TeacherCache

__all__ = ["Trainer"]



class Trainer:
    """Steps 2-4: the student and its optimiser, resuming, the epochs.

    Holds what a training state saves (student, optimiser, scheduler, scaler, history, the
    validation before training) and where the run stands: ``resume_point`` = (epoch, steps done in
    it) after the last finished step, ``saved_at`` = the point of the newest saved state.
    """

    def __init__(self, s: Setup, cache: TeacherCache, env: Any, device: Any, precision: tuple,
                 fingerprint: str, run_dir: Path):
        import torch

        from .train import epoch_order, warmup_cosine

        cfg = s.cfg
        self.s, self.cfg, self.cache, self.env, self.device = s, cfg, cache, env, device
        self.autocast_dtype, use_scaler = precision
        self.fingerprint, self.run_dir = fingerprint, run_dir
        sam = s.sam
        # 2. student, optimiser, schedule
        self.encoder = sam.image_encoder.to(device)
        sam.prompt_encoder.to(device)
        sam.mask_decoder.to(device)
        sam.requires_grad_(False)
        self.encoder.requires_grad_(True)
        for name, p in self.encoder.named_parameters():
            if name.startswith(("head.", "norm_head.")):  # TinyViT's unused classifier
                p.requires_grad_(False)
        self.params = [p for p in self.encoder.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_local = len(epoch_order(len(s.train), 0, cfg.seed, env))
        self.steps_per_epoch = math.ceil(n_local / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * self.total_steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(self.total_steps, warmup))
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.start_epoch, self.start_step = 0, 0
        self.history: list[dict] = []
        self.before: dict | None = None
        self.resumed_from: Path | None = None
        self.resume_point = self.saved_at = (0, 0)
        self.model = self.encoder
        self.mask_gen = torch.Generator().manual_seed(cfg.seed)

    # ---- 3. resume

    def resume(self) -> Generator[DistillEvent, None, None]:
        """Load the newest readable training state of this run, if any (damaged newer ones are set aside)."""
        from .states import newest_readable_state

        if not self.cfg.resume:
            return
        found = newest_readable_state(self.run_dir, set_aside=self.env.is_main)
        if self.env.is_main:
            for line in found.messages():
                yield DistillEvent("info", message=line)
        if found.state is None:
            return
        state = found.state
        self.encoder.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_step = int(state["epoch"]), int(state["step_in_epoch"])
        self.history, self.before = list(state["history"]), dict(state["before"])
        self.resumed_from = found.path
        self.resume_point = self.saved_at = (self.start_epoch, self.start_step)
        yield DistillEvent("info", message=(
            f"resuming from {found.path} (epoch {self.start_epoch + 1}, step {self.start_step + 1})"))

    def validate_before(self) -> Generator[DistillEvent, None, None]:
        """Validation before training (kept in the state when resuming), then the history so far."""
        from .train import Validator

        s = self.s
        self.validator = Validator(s.sam, s.sources, s.val, self.cache, self.env, n_prompts=self.cfg.val_prompts,
                                   seed=self.cfg.seed, device=str(self.device))
        if self.before is None:
            self.before = self.validator.run(self.encoder, self.autocast_dtype)
        yield DistillEvent("val", epoch=0, values={**self.before, "train_loss": float("nan")})
        for h in self.history:
            yield DistillEvent("val", epoch=h["epoch"], values=h)

    # ---- states

    def state_now(self, epoch: int, step_in_epoch: int) -> dict:
        return {
            "fingerprint": self.fingerprint, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "student": {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "history": self.history, "before": self.before,
        }

    def save(self) -> Path:
        """Save a training state at ``resume_point``."""
        from .states import save_state

        path = save_state(self.run_dir, self.state_now(*self.resume_point), keep=self.cfg.keep_states)
        self.saved_at = self.resume_point
        return path

    def save_if_behind(self) -> None:
        """On an interrupt (Ctrl-C, closed generator): keep the steps done since the last state."""
        if self.env.is_main and self.env.world == 1 and self.resume_point != self.saved_at:
            self.save()

    # ---- 4. epochs

    def wrap_ddp(self) -> None:
        if self.env.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = self.device
            self.model = DDP(self.encoder, device_ids=[dev.index] if dev.type == "cuda" else None,
                             find_unused_parameters=False)

    def train_step(self, epoch: int, step: int, pos: list[int]) -> dict:
        """One optimiser step on the training slices at positions ``pos``; returns the step's values."""
        import torch

        from .train import aug_op, make_batch, mask_distill_loss

        cfg, s, device = self.cfg, self.s, self.device
        ops = [aug_op(cfg.seed, epoch, step * cfg.batch_size + j, cfg.augment) for j in range(len(pos))]
        batch = make_batch(s.sources, [s.train[i] for i in pos], self.cache, ops, s.teacher.img_size)
        x, target = batch["image"].to(device), batch["target"].to(device)
        dtype = self.autocast_dtype
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = self.model(x)
            mse = torch.mean((pred.float() - target) ** 2)
            loss = mse
            mask_term = torch.zeros(())
            if cfg.mask_loss_weight > 0:
                mask_term = mask_distill_loss(s.sam, pred, target, batch["valid"], cfg.mask_points, self.mask_gen)
                loss = loss + cfg.mask_loss_weight * mask_term
        if not torch.isfinite(loss):
            raise DistillError(
                f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {float(loss)}): "
                "lower the learning rate or use precision='fp32'"
            )
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        return {"loss": float(loss.detach()), "mse": float(mse.detach()), "mask": float(mask_term.detach()),
                "lr": self.sched.get_last_lr()[0]}

    def run_epoch(self, epoch: int, cancel: Callable[[], bool] | None) -> Generator[DistillEvent, None, bool]:
        """Train one epoch (from the resume point if it is the first), validate, save a state.

        Yields ``"step"``, ``"saved"`` and ``"val"`` events; returns True when cancelled (a state
        was saved; only in a single-process run).
        """
        from .train import epoch_order, freeze_batchnorm

        cfg, env = self.cfg, self.env
        order = epoch_order(len(self.s.train), epoch, cfg.seed, env)
        self.model.train()
        freeze_batchnorm(self.encoder)
        loss_sum = [0.0, 0.0]
        first = self.start_step if epoch == self.start_epoch else 0
        for step in range(first, self.steps_per_epoch):
            pos = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            values = self.train_step(epoch, step, pos)
            self.resume_point = (epoch, step + 1)
            loss_sum[0] += values["loss"] * len(pos)
            loss_sum[1] += len(pos)
            yield DistillEvent("step", epoch=epoch, step=epoch * self.steps_per_epoch + step + 1,
                               total=self.total_steps, values=values)
            if (cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < self.steps_per_epoch
                    and env.is_main):
                yield DistillEvent("saved", epoch=epoch, message=str(self.save()))
            if cancel is not None and cancel() and env.world == 1:
                path = self.save()
                yield DistillEvent("saved", epoch=epoch, message=str(path))
                yield DistillEvent("info", message=f"cancelled; run again to resume from {path}")
                return True
        total = env.all_sum(loss_sum)
        metrics = self.validator.run(self.encoder, self.autocast_dtype)
        entry = {"epoch": epoch + 1, "train_loss": total[0] / max(total[1], 1), **metrics}
        self.history.append(entry)
        self.resume_point = (epoch + 1, 0)
        path = self.save() if env.is_main else None
        self.saved_at = self.resume_point
        yield DistillEvent("val", epoch=epoch + 1, values=entry)
        if path is not None:
            yield DistillEvent("saved", epoch=epoch + 1, message=str(path))
        env.barrier()
        return False
