"""Memory of decoding many prompts on one slice: chunked (``SlicePredictor.max_batch``) vs all at once.

For 10, 100 and 250 one-point prompts on one 512 x 512 slice, a fresh process loads MobileSAM (the
real architecture with the fixture's random weights: memory does not depend on the weights), embeds
the slice, then runs ``predict_many`` once and reports the peak resident memory above the level after
the embedding (the decoder's working memory plus the returned masks). Baseline, measured in the same
run: the same call with chunking off (``max_batch`` = number of prompts, i.e. one decoder call).
Printed: a table (median of ``--runs`` processes per setting) and the machine.

    python benchmarks/decoder_memory.py              # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from _machine import describe_machine as machine  # noqa: E402 (benchmarks/ is on sys.path)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mobile_sam_random_weights.pt"


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(n: int, max_batch: int) -> dict:
    import numpy as np

    from napari_mobilesam.core.predictor import Prompt, SlicePredictor
    from napari_mobilesam.core.source import SliceSource
    from napari_mobilesam.models.registry import load_model

    sam = load_model("vit_t", str(REFERENCE), "cpu", backend="torch")
    img = np.random.default_rng(0).integers(0, 255, (512, 512), np.uint8)
    pred = SlicePredictor(sam, SliceSource(img), max_batch=max_batch)
    pred.predict(0, points=[[256, 256]])  # embeds the slice and warms the decoder
    base = _rss()
    pts = np.random.default_rng(1).uniform(10, 500, (n, 2))
    out = pred.predict_many(0, [Prompt(points=[p], labels=[1]) for p in pts])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    masks_mb = sum(o.masks.nbytes + o.low_res.nbytes for o in out) / 2**20
    return {"peak_above_mb": (peak - base) / 2**20, "results_mb": masks_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompts", type=int, nargs="+", default=[10, 100, 250])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    src = str(Path(__file__).resolve().parents[1] / "src")
    print("| prompts | chunked (max_batch 16): peak above embedding MiB | one call (baseline) MiB | "
          "ratio | returned masks MiB |")
    print("|---|---|---|---|---|")
    for n in args.prompts:
        res = {}
        for mb in (16, n):
            vals = []
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, __file__, "--child", str(n), str(mb)], capture_output=True,
                                     text=True, check=True, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
                vals.append(json.loads(out.stdout.strip().splitlines()[-1]))
            res[mb] = (statistics.median(v["peak_above_mb"] for v in vals), vals[0]["results_mb"])
        chunked, whole = res[16][0], res[n][0]
        print(f"| {n} | {chunked:.0f} | {whole:.0f} | {whole / max(chunked, 1):.1f}x | {res[16][1]:.0f} |")
    print("\n" + machine())


if __name__ == "__main__":
    main()
