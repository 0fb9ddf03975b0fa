"""Propagation through z: time per propagated slice, peak memory, embedding-cache hit rate.

For each stack size (default 50, 100 and 200 slices of 512 x 512) a fresh process:

1. measures the baseline: the image encoder alone on a few slices (median seconds per slice);
2. propagates one object seeded on the middle slice through the whole stack (stop rules loosened so
   that random fixture weights do not stop it early: this measures the cost per slice, not masks);
3. propagates the same object a second time with the same cache and reports the hit rate.

The embedding cache has a memory budget (``--budget-mb``) and an on-disk cache in a temporary folder,
so the second run shows memory hits and disk hits separately. Peak memory is the child process's
maximum resident set size; "peak - model - data" subtracts the resident size after loading the model
and the data volumes held at the end (the stack and the two runs' labels volumes): what propagation
itself needs on top, which should not grow with the stack. Printed: tables and the machine description.

    python benchmarks/propagation.py            # 50/100/200 slices, real MobileSAM architecture
    python benchmarks/propagation.py --quick    # 6/12/24 slices: about a minute on an idle 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import describe_machine as machine  # noqa: E402 (benchmarks/ is on sys.path)
from _machine import peak_rss_bytes  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mobile_sam_random_weights.pt"


def tube_stack(n: int, size: int, seed: int = 0):
    """(n, size, size) uint16: a bright tube drifting slowly through z over a noisy background,
    plus the tube's (row, col) centre on every slice."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    zs = np.arange(n)
    cr = size / 2 + size / 8 * np.sin(zs / max(n, 1) * 2 * np.pi)
    cc = size / 2 + size / 10 * np.cos(zs / max(n, 1) * 3 * np.pi)
    radius = size / 10
    out = np.empty((n, size, size), np.uint16)
    for z in range(n):
        d2 = (yy - cr[z]) ** 2 + (xx - cc[z]) ** 2
        img = 200 + 800 * np.exp(-d2 / (2 * radius**2)) + rng.normal(0, 30, (size, size))
        out[z] = np.clip(img, 0, 65535).astype(np.uint16)
    return out, np.stack([cr, cc], 1)


def _rss() -> int:
    """Current resident set size of this process in bytes (Linux), 0 if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child(args) -> dict:
    import numpy as np
    import torch

    from napari_mobilesam.core.embeddings import EmbeddingCache, compute_embedding
    from napari_mobilesam.core.predictor import SlicePredictor
    from napari_mobilesam.core.source import SliceSource
    from napari_mobilesam.models.registry import load_model
    from napari_mobilesam.volume.propagation import propagate

    ckpt = str(REFERENCE) if args.model == "vit_t" else None
    sam = load_model(args.model, ckpt, "cpu", backend=args.backend, precision=args.precision)
    # warm-up on an image that is not in the stack (separate cache): first-call costs stay out
    # (oneDNN settles after a few calls on a new input size)
    warm = np.random.default_rng(1).integers(0, 255, (args.size, args.size), np.uint8)
    for _ in range(3):
        compute_embedding(sam, SliceSource(warm).rgb(0))
    SlicePredictor(sam, SliceSource(warm)).predict(0, points=[[args.size // 2, args.size // 2]])
    rss_model = _rss()
    stack, centres = tube_stack(args.n, args.size)
    src = SliceSource(stack)
    # baseline: the encoder alone, same process, same slices' content
    times = []
    for z in range(min(5, args.n)):
        t = time.perf_counter()
        compute_embedding(sam, src.rgb(z))
        times.append(time.perf_counter() - t)
    enc = statistics.median(times)

    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(sam, max_bytes=int(args.budget_mb * 2**20), disk_dir=tmp)
        pred = SlicePredictor(sam, src, cache)
        zc = args.n // 2
        objs = {1: {zc: {"points": [centres[zc]]}}}
        loose = {"min_score": 0.0, "min_overlap": 0.0, "area_ratio": (0.0, 1e9), "min_area": 0, "regrow": 0.0}
        slice_times: list[float] = []
        last = [time.perf_counter()]

        def progress(done, total):
            now = time.perf_counter()
            slice_times.append(now - last[0])
            last[0] = now

        t0 = time.perf_counter()
        res = propagate(pred, objs, progress=progress, **loose)
        first = time.perf_counter() - t0
        decoded = sum(1 for r in res.records if r.direction != 0)
        s1 = cache.stats
        cache.reset_stats()
        t0 = time.perf_counter()
        res2 = propagate(pred, objs, **loose)
        second = time.perf_counter() - t0
        s2 = cache.stats
        # interactive use: one click -> mask on a cached slice, and 5 objects in one batched call
        click, many = [], []
        for k in range(args.clicks):
            t = time.perf_counter()
            pred.predict(zc, points=[centres[zc] + k % 3])
            click.append(time.perf_counter() - t)
            t = time.perf_counter()
            pred.predict_many(zc, [{"points": [centres[zc] + j]} for j in range(5)])
            many.append(time.perf_counter() - t)
        cache.close()
    peak = peak_rss_bytes()
    return {
        "n": args.n,
        "encoder_s": enc,
        "decoded": decoded,
        "first_s": first,
        "per_slice_s": first / max(decoded, 1),
        "per_slice_median_s": statistics.median(slice_times) if slice_times else float("nan"),
        "second_s": second,
        "second_hit_rate": s2.hit_rate,
        "second_mem_hits": s2.hits,
        "second_disk_hits": s2.disk_hits,
        "second_computed": s2.computed,
        "first_computed": s1.computed,
        "cache_bytes": s1.bytes,
        "click_ms": 1000 * statistics.median(click),
        "five_ms": 1000 * statistics.median(many),
        "peak_rss": peak,
        "rss_model": rss_model,
        "stack_bytes": stack.nbytes,
        "labels_bytes": res.labels.nbytes,
        "same_labels": bool(np.array_equal(res.labels, res2.labels)),
        "threads": torch.get_num_threads(),
    }



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6/12/24 slices instead of 50/100/200")
    ap.add_argument("--sizes", type=int, nargs="*", help="stack sizes (slices)")
    ap.add_argument("--size", type=int, default=512, help="slice side in pixels (default 512)")
    ap.add_argument("--model", default="vit_t", help="vit_t (fixture weights) or vit_t_test")
    ap.add_argument("--backend", default="auto", help="load_model backend: auto (the default path: OpenVINO on a CPU), eager, torch, openvino")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--budget-mb", type=float, default=64.0, help="embedding cache memory budget (MiB)")
    ap.add_argument("--clicks", type=int, default=10, help="repeats of the click-to-mask timing")
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sizes = args.sizes or ([6, 12, 24] if args.quick else [50, 100, 200])
    print(f"# propagation benchmark  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print(f"# machine: {machine()}")
    print(f"# model {args.model}, backend {args.backend}, slices {args.size}x{args.size}, "
          f"cache budget {args.budget_mb:g} MiB (float16: {args.budget_mb * 2**20 / (256 * 64 * 64 * 2):.0f} slices) + disk cache")
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--child", "--n", str(n), "--size", str(args.size),
               "--model", args.model, "--backend", args.backend, "--precision", args.precision,
               "--budget-mb", str(args.budget_mb), "--clicks", str(args.clicks)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base_n = rows[0]["n"]
    base_t = rows[0]["first_s"]
    hdr = ("| slices | encoder alone s/slice (baseline) | propagation s/slice (median) | ratio to encoder "
           "| total s | linearity vs n=%d (1.00 = linear) | 2nd run s | 2nd run hit rate (mem + disk) "
           "| peak RSS MiB (after model load) | stack + labels MiB | peak - model - data MiB | cache in memory MiB |" % base_n)
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    mib = 2**20
    for r in rows:
        lin = (r["first_s"] / base_t) / (r["n"] / base_n)
        print(f"| {r['n']} | {r['encoder_s']:.3f} | {r['per_slice_s']:.3f} ({r['per_slice_median_s']:.3f}) "
              f"| {r['per_slice_s'] / r['encoder_s']:.2f} | {r['first_s']:.1f} | {lin:.2f} | {r['second_s']:.1f} "
              f"| {r['second_hit_rate']:.2f} ({r['second_mem_hits']} + {r['second_disk_hits']}) "
              f"| {r['peak_rss'] / mib:.0f} ({r['rss_model'] / mib:.0f}) | {(r['stack_bytes'] + r['labels_bytes']) / mib:.0f} "
              f"| {(r['peak_rss'] - r['rss_model'] - r['stack_bytes'] - 2 * r['labels_bytes']) / mib:.0f} "
              f"| {r['cache_bytes'] / mib:.0f} |")
    print("| slices | click -> mask on a cached slice, ms (median) | 5 objects, one batched call, ms |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['click_ms']:.0f} | {r['five_ms']:.0f} |")
    print(f"# decoded slices per run: {[r['decoded'] for r in rows]}; torch threads {rows[0]['threads']}; "
          f"second run gives identical labels: {all(r['same_labels'] for r in rows)}")


if __name__ == "__main__":
    main()
