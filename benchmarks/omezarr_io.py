"""OME-Zarr labels out and image in: time per slice and peak memory against the stack's depth.

Writes Z x 2048 x 2048 uint32 labels (a 4-level pyramid) with ``OmeZarrLabelsWriter`` for several
Z, then reads slices back with ``open_ome_zarr``. Peak memory is the peak of Python/numpy
allocations (tracemalloc) while writing: it should stay near a few slices whatever Z is (the
writer holds one slice and its pyramid), while the whole stack grows with Z.

    PYTHONPATH=src python benchmarks/omezarr_io.py [--side 2048] [--depths 4 16 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from napari_mobilesam.io.omezarr import open_ome_zarr
from napari_mobilesam.io.omezarr_write import OmeZarrLabelsWriter

try:
    from _machine import describe_machine
except ImportError:  # run from elsewhere
    def describe_machine() -> str:
        return "machine not described"


def _labels(side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((side, side), np.uint32)
    for i in range(side * side // 15_000):
        r, c = rng.integers(0, side - 40, 2)
        lab[r : r + 30, c : c + 30] = i + 1
    return lab


def run(side: int, depth: int, version: str, workdir: Path) -> dict[str, float]:
    lab = _labels(side)
    out = workdir / f"labels-{depth}-{version}.zarr"
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    puts = []
    with OmeZarrLabelsWriter(out, (depth, side, side), n_levels=4, ngff_version=version) as w:
        for z in range(depth):
            t = time.perf_counter()
            w.put(z, lab)
            puts.append(time.perf_counter() - t)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    data, _ = open_ome_zarr(out)
    reads = []
    for z in range(min(depth, 8)):
        t = time.perf_counter()
        data[z].compute()
        reads.append(time.perf_counter() - t)
    shutil.rmtree(out)
    return {"put": statistics.median(puts), "read": statistics.median(reads), "peak": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 16, 48])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(describe_machine())
    slice_mb = args.side * args.side * 4 / 2**20
    print(f"{args.side} x {args.side} uint32 slices ({slice_mb:.0f} MiB each), 4-level pyramid; "
          f"median of {args.repeats} runs\n")
    print("| NGFF | Z | stack MiB | put ms/slice | read ms/slice | peak MiB (writing) | peak / first Z |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="omezarr-bench-") as tmp:
        for version in ("0.4", "0.5"):
            first = None
            for depth in args.depths:
                runs = [run(args.side, depth, version, Path(tmp)) for _ in range(args.repeats)]
                put = statistics.median(r["put"] for r in runs) * 1000
                read = statistics.median(r["read"] for r in runs) * 1000
                peak = statistics.median(r["peak"] for r in runs)
                first = first or peak
                print(f"| {version} | {depth} | {depth * slice_mb:.0f} | {put:.0f} | {read:.0f} | "
                      f"{peak:.0f} | {peak / first:.2f} |")


if __name__ == "__main__":
    main()
