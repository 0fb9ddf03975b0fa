"""Distillation throughput: teacher-cache filling and student training steps per second.

Real MobileSAM student (``vit_t``, random weights: the speed does not depend on them) and a SAM
ViT-B-shaped teacher (segment-anything's ``ImageEncoderViT`` with ViT-B's settings, random weights).

Measured in one run, with the library's own code paths:

- teacher cache: seconds per slice to compute and store a teacher embedding
  (``fill_teacher_cache``), and to read one back (``TeacherCache.load``);
- training: seconds per step of the real loop (``distill``, timed between its step events, the
  first step excluded as warm-up), on the CPU in float32 and with bf16 autocast, and, where one is
  available, on a CUDA GPU (bf16/fp16 autocast);
- the baseline is coupled distillation, where the teacher runs inside every step:
  ``step + batch × teacher time``; the ratio says how much decoupling saves per step.

Usage: ``python benchmarks/distill.py [--quick] [--device auto|cpu|cuda] [--batch-size 2]``.
Prints a table (medians) and the machine description.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import describe_machine as machine  # noqa: E402 (benchmarks/ is on sys.path)


def bench_device(device: str, args, tmp: Path, images, teacher, student_ckpt) -> list[dict]:
    import numpy as np

    from napari_mobilesam.distillation.data import (
        TeacherCache,
        fill_teacher_cache,
        open_images,
        split_slices,
    )
    from napari_mobilesam.distillation.run import DistillConfig, distill

    cache_root = tmp / f"cache-{device}"
    # 1. teacher cache: compute + store, then read back
    sources = open_images(images)
    refs, _ = split_slices(sources, max_slices_per_image=None, val_fraction=0)
    cache = TeacherCache(teacher, cache_root)
    fill_times = []
    last = [time.perf_counter()]

    def tick(done, total):
        now = time.perf_counter()
        if done > 0:
            fill_times.append(now - last[0])
        last[0] = now

    fill_teacher_cache(cache, sources, refs, device=device, progress=tick)
    read_times = []
    for _ in range(3):
        for r in refs:
            t0 = time.perf_counter()
            cache.load(r.key)
            read_times.append(time.perf_counter() - t0)

    # 2. the real training loop on the cached embeddings, per precision
    teacher_s = statistics.median(fill_times) if fill_times else float("nan")
    rows = []
    for precision in (["fp32", "bf16"] if device == "cpu" else ["auto"]):
        stamps = []
        cfg = DistillConfig(
            teacher=teacher, images=images, output=tmp / f"student-{device}-{precision}.pt",
            student_model="vit_t", student_checkpoint=student_ckpt, epochs=args.epochs,
            batch_size=args.batch_size, lr=1e-4, val_fraction=0, device=device, precision=precision,
            cache_dir=cache_root, overwrite=True, resume=False,
        )
        distill(cfg, callback=lambda ev: ev.kind == "step" and stamps.append(time.perf_counter()))
        steps = np.diff(stamps).tolist()  # the first step (before the first stamp) is the warm-up
        step_s = statistics.median(steps) if steps else float("nan")
        rows.append({
            "device": device,
            "precision": precision,
            "teacher_s": teacher_s,
            "read_s": statistics.median(read_times),
            "step_s": step_s,
            "coupled_s": step_s + args.batch_size * teacher_s,
            "n_teacher": len(fill_times),
            "n_steps": len(steps),
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few slices and steps (about 2-3 minutes on an idle 2-core machine)")
    parser.add_argument("--device", default="auto", help="auto (CPU, plus CUDA when available), cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from napari_mobilesam.data import synthetic_nuclei
    from napari_mobilesam.distillation.data import (
        teacher_from_module,
        vit_teacher_encoder,
    )
    from napari_mobilesam.models.registry import MODELS

    # quick: 3 full steps (2 timed) in one epoch; full: 8 slices, 2 epochs
    n_slices = 3 * args.batch_size if args.quick else 8
    args.epochs = 1 if args.quick else 2
    stack = synthetic_nuclei(shape=(n_slices, 256, 256), n_nuclei=12, seed=0).image
    devices = ["cpu"] if args.device in ("auto", "cpu") else [args.device]
    if args.device == "auto" and torch.cuda.is_available():
        devices.append("cuda")

    print(f"machine: {machine()}")
    print(f"teacher: SAM ViT-B-shaped ImageEncoderViT (random weights); student: MobileSAM vit_t; "
          f"{n_slices} slices of 256×256 (inputs padded to 1024×1024), batch {args.batch_size}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        student_ckpt = tmp / "vit_t_random.pt"
        torch.manual_seed(0)
        torch.save(MODELS["vit_t"].builder().state_dict(), student_ckpt)
        for device in devices:
            teacher = teacher_from_module(vit_teacher_encoder("vit_b", seed=0), description="ViT-B-shaped")
            rows.extend(bench_device(device, args, tmp, [stack], teacher, student_ckpt))

    print()
    print("| device | student precision | teacher s/slice (cache fill, fp32) | cached read s/slice "
          "| student step s (decoupled) | coupled step s (baseline) | decoupled speed-up | steps/s "
          "| slices/s into the cache |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['device']} | {r['precision']} | {r['teacher_s']:.2f} (n={r['n_teacher']}) "
              f"| {r['read_s'] * 1000:.1f} ms "
              f"| {r['step_s']:.2f} (n={r['n_steps']}) | {r['coupled_s']:.2f} "
              f"| {r['coupled_s'] / r['step_s']:.1f}× | {1 / r['step_s']:.3f} | {1 / r['teacher_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
