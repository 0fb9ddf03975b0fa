"""Memory of decoding many prompts on one slice: streamed and kept small vs all kept at once.

For 10, 100 and 250 one-point prompts on one 512 x 512 slice, a fresh process loads MobileSAM (the
real architecture with the fixture's random weights: memory does not depend on the weights), embeds
the slice, then decodes every prompt once and reports the peak resident memory above the level after
the embedding. Three ways, each in its own processes:

- ``stream``: ``SlicePredictor.iter_predict(..., keep="best")`` with the default ``max_batch``, every
  best mask painted into one labels slice and dropped (what ``batch.segment_objects_on_slice`` does);
- ``list``: ``predict_many`` returning every prediction (three candidates and their logits each),
  default ``max_batch``;
- ``one call`` (baseline): ``predict_many`` with chunking off (``max_batch`` = number of prompts).

Printed: a table (median of ``--runs`` processes per setting) and the machine.

    python benchmarks/decoder_memory.py --runs 1     # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _machine import describe_machine as machine  # noqa: E402 (benchmarks/ is on sys.path)
from _machine import peak_rss_bytes  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mobile_sam_random_weights.pt"


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(n: int, mode: str) -> dict:
    import numpy as np

    from napari_mobilesam.core.predictor import Prompt, SlicePredictor
    from napari_mobilesam.core.source import SliceSource
    from napari_mobilesam.models.registry import load_model

    sam = load_model("vit_t", str(REFERENCE), "cpu", backend="torch")
    img = np.random.default_rng(0).integers(0, 255, (512, 512), np.uint8)
    pred = SlicePredictor(sam, SliceSource(img), max_batch=n if mode == "one call" else None)
    pred.predict(0, points=[[256, 256]])  # embeds the slice and warms the decoder
    base = _rss()
    pts = np.random.default_rng(1).uniform(10, 500, (n, 2))
    prompts = [Prompt(points=[p], labels=[1]) for p in pts]
    kept = 0
    if mode == "stream":
        labels, score = np.zeros((512, 512), np.int32), np.full((512, 512), -np.inf)
        for i, p in pred.iter_predict(0, prompts, keep="best"):
            win = p.masks[0] & (p.iou[0] > score)
            labels[win], score[win] = i + 1, p.iou[0]
        kept = labels.nbytes + score.nbytes
    else:
        out = pred.predict_many(0, prompts)
        kept = sum(o.masks.nbytes + o.low_res.nbytes for o in out)
    peak = peak_rss_bytes()
    return {"peak_above_mb": (peak - base) / 2**20, "results_mb": kept / 2**20, "max_batch": pred.max_batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompts", type=int, nargs="+", default=[10, 100, 250])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1])))
        return
    src = str(Path(__file__).resolve().parents[1] / "src")
    modes = ("stream", "list", "one call")
    print("| prompts | " + " | ".join(f"{m}: peak above embedding MiB (kept MiB)" for m in modes)
          + " | one call / stream |")
    print("|---" * (len(modes) + 2) + "|")
    for n in args.prompts:
        res = {}
        for mode in modes:
            vals = []
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, __file__, "--child", str(n), mode], capture_output=True,
                                     text=True, check=True, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
                vals.append(json.loads(out.stdout.strip().splitlines()[-1]))
            res[mode] = (statistics.median(v["peak_above_mb"] for v in vals), vals[0]["results_mb"])
        cells = " | ".join(f"{res[m][0]:.0f} ({res[m][1]:.0f})" for m in modes)
        print(f"| {n} | {cells} | {res['one call'][0] / max(res['stream'][0], 1):.1f}x |", flush=True)
    print("\n" + machine())


if __name__ == "__main__":
    main()
