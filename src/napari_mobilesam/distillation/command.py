"""The ``distill`` command: ``napari-mobilesam distill ...``, ``python -m napari_mobilesam.distillation ...``
and the same under ``torchrun`` (process 0 prints and writes; the others train their share).

:func:`configure_parser` adds the arguments to a parser, :func:`run_cli` runs a parsed command and
returns its exit code, :func:`main` is the stand-alone entry point.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from ..errors import DistillError
from .config import STUDENT_MODELS, DistillConfig, DistillEvent
from .run import distill

__all__ = ["configure_parser", "run_cli", "main"]


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
    """``python -m napari_mobilesam.distillation ...`` (the same arguments as ``napari-mobilesam distill``)."""
    parser = argparse.ArgumentParser(prog="python -m napari_mobilesam.distillation",
                                     description="Fine-tune MobileSAM by decoupled distillation.")
    configure_parser(parser)
    return run_cli(parser.parse_args(argv))
