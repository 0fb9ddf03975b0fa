"""Benchmark: large slices, untiled against tiled, and an OME-Zarr stack through automatic mode.

For each slice side (2048, 4096, 10 000 pixels) a synthetic slice of small nuclei (the sample
generator's nuclei, repeated) is written to an OME-Zarr store, then a fresh process opens it
lazily and, untiled (the whole slice resized to the encoder's 1024 pixels, as SAM does) and tiled
(1024-pixel tiles with a 128-pixel halo, each seen at full resolution):

* clicks 20 nuclei spread over the slice: seconds for the first click (embedding included) and
  the median of the others, and how many of the clicked nuclei come back as a mask of roughly their
  size (a resized slice loses small nuclei; with the parity fixture's random weights this column
  only shows that the path runs, see below);
* segments the slice automatically (``--auto-max`` sides only: tiled automatic mode decodes every
  tile);
* reports the process's peak resident memory.

Then an OME-Zarr stack (``--depth`` slices of 2048 x 2048) goes through tiled automatic mode with
labels streamed into an OME-Zarr labels store: seconds per slice and peak memory.

The model is MobileSAM's real architecture with the random weights of the parity fixture (real
weights cannot be downloaded here): times are the real model's; masks are not meaningful. Peak
memory is what matters for the "bounded whatever the slice size" claim: it should grow with the
slice only by the slice-sized outputs (masks, labels), not by the image or the embeddings.

Usage::

    python benchmarks/bigimage.py               # 2048, 4096, 10000; auto up to 4096; depth 10
    python benchmarks/bigimage.py --quick       # 2048, 4096; auto 2048 with 32 prompts; depth 2
    python benchmarks/bigimage.py --sides 10000 --auto-max 0 --depth 0   # the 10 000² rows alone
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

import numpy as np
from _machine import describe_machine as machine  # noqa: E402 (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "reference" / "mobile_sam_random_weights.pt"


def make_slice_store(path: Path, side: int, depth: int = 1) -> Path:
    """An OME-Zarr store of ``depth`` slices ``side x side`` uint16 of small nuclei, and their
    labels as ``path.with_suffix('.npy')`` for the first slice."""
    import zarr
    from ome_zarr.format import format_from_version
    from ome_zarr.writer import write_image

    from napari_mobilesam.data import synthetic_nuclei

    s = synthetic_nuclei(shape=(10, 1024, 1024), n_nuclei=300, radius_range=(5.0, 10.0),
                         z_radius_range=(2.0, 3.0), seed=1)
    reps = int(np.ceil(side / 1024))
    img = np.tile(s.image[5], (reps, reps))[:side, :side]
    lab = s.labels[5].astype(np.int32)
    n = int(lab.max())
    labels = np.block([[np.where(lab > 0, lab + n * (reps * i + j), 0) for j in range(reps)]
                       for i in range(reps)])[:side, :side]
    np.save(path.with_suffix(".npy"), labels)
    stack = np.stack([np.roll(img, 37 * k, axis=1) for k in range(depth)])
    fmt = format_from_version("0.5")
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_image(stack, group, axes=["z", "y", "x"], fmt=fmt, scale_factors=[2, 4],
                storage_options={"chunks": (1, 1024, 1024)})
    return path


def auto_params(max_points: int):
    """Automatic-mode settings of the benchmark: the defaults with at most ``max_points`` prompts
    per slice (untiled) or per tile (tiled)."""
    from napari_mobilesam.volume.automatic import AutoParams

    return AutoParams(max_points=int(max_points))


def run_slice(store: str, tiled: bool, auto: bool, max_points: int = 256, clicks: int = 20) -> dict:
    """In a fresh process: clicks (and automatic mode) on slice 0 of ``store``."""
    import resource

    from scipy import ndimage as ndi

    from napari_mobilesam.core.embeddings import EmbeddingCache
    from napari_mobilesam.core.predictor import SlicePredictor
    from napari_mobilesam.core.source import SliceSource
    from napari_mobilesam.core.tiles import TiledPredictor
    from napari_mobilesam.io.omezarr import open_ome_zarr
    from napari_mobilesam.models.choice import ModelChoice
    from napari_mobilesam.volume.automatic import segment_slice
    from napari_mobilesam.volume.tiled import segment_slice_tiled

    sam = ModelChoice("vit_t", str(WEIGHTS)).load()
    data, _meta = open_ome_zarr(store)
    source = SliceSource(data)
    cache = EmbeddingCache(sam, max_bytes=64 * 2**20)
    pred = TiledPredictor(sam, source, cache) if tiled else SlicePredictor(sam, source, cache)
    labels = np.load(Path(store).with_suffix(".npy"))
    ids = np.unique(labels)[1:]
    pick = ids[np.linspace(0, len(ids) - 1, clicks).round().astype(int)]
    centres = ndi.center_of_mass(np.ones_like(labels), labels, pick)
    times, sized = [], 0
    for (r, c), obj in zip(centres, pick):
        t0 = time.perf_counter()
        out = pred.predict(0, points=[(r, c)], labels=[1])
        times.append(time.perf_counter() - t0)
        area, true = out.masks[out.best].sum(), (labels == obj).sum()
        sized += int(0.5 * true <= area <= 2 * true)
    res = {"first_click_s": times[0], "click_s": statistics.median(times[1:]), "sized": sized,
           "tiles_embedded": cache.stats.computed,
           "clicks_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if auto:
        params = auto_params(max_points)
        t0 = time.perf_counter()
        lab = segment_slice_tiled(pred, 0, params) if tiled else segment_slice(pred, 0, params).labels
        res["auto_s"] = time.perf_counter() - t0
        res["auto_objects"] = int(len(np.unique(lab)) - 1)
    res["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def run_stack(store: str, out: str, max_points: int = 256) -> dict:
    """In a fresh process: tiled automatic mode through an OME-Zarr stack into OME-Zarr labels."""
    import resource

    from napari_mobilesam.core.embeddings import EmbeddingCache
    from napari_mobilesam.core.source import SliceSource
    from napari_mobilesam.core.tiles import TiledPredictor
    from napari_mobilesam.io.omezarr import open_ome_zarr
    from napari_mobilesam.io.omezarr_write import OmeZarrLabelsWriter
    from napari_mobilesam.models.choice import ModelChoice
    from napari_mobilesam.volume.tiled import segment_slice_tiled

    sam = ModelChoice("vit_t", str(WEIGHTS)).load()
    data, meta = open_ome_zarr(store)
    source = SliceSource(data)
    pred = TiledPredictor(sam, source, EmbeddingCache(sam, max_bytes=64 * 2**20))
    t0 = time.perf_counter()
    with OmeZarrLabelsWriter(out, data.shape, metadata=meta) as writer:
        for z in range(data.shape[0]):
            writer.put(z, segment_slice_tiled(pred, z, auto_params(max_points)))
    dt = time.perf_counter() - t0
    return {"s_per_slice": dt / data.shape[0], "slices": int(data.shape[0]),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(func: str, *args) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import bigimage; print('RESULT', json.dumps(bigimage.{func}(*{list(args)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sides", type=int, nargs="*", default=None)
    ap.add_argument("--auto-max", type=int, default=None, help="largest side run in automatic mode")
    ap.add_argument("--depth", type=int, default=None, help="slices of the 2048 x 2048 OME-Zarr stack (0: none)")
    ap.add_argument("--clicks", type=int, default=20, help="nuclei clicked per slice (at least 2)")
    ap.add_argument("--max-points", type=int, default=None,
                    help="automatic mode: prompts per slice (untiled) or per tile (tiled)")
    args = ap.parse_args()
    sides = args.sides or ([2048, 4096] if args.quick else [2048, 4096, 10000])
    auto_max = args.auto_max if args.auto_max is not None else (2048 if args.quick else 4096)
    depth = args.depth if args.depth is not None else (2 if args.quick else 10)
    max_points = args.max_points or (32 if args.quick else 256)
    print(f"machine: {machine()}")
    print("model: MobileSAM architecture, parity-fixture random weights, default backend; "
          f"automatic mode with at most {max_points} prompts per slice or tile\n")
    print("| slice | mode | first click (s) | click median (s) | clicked nuclei sized right | encoder runs "
          f"({max(args.clicks, 2)} clicks) | peak RSS after clicks (MiB) | auto (s) | auto objects | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            store = make_slice_store(Path(tmp) / f"s{side}.zarr", side)
            for tiled in (False, True):
                r = _child("run_slice", str(store), tiled, side <= auto_max, max_points, max(args.clicks, 2))
                auto = f"{r['auto_s']:.1f} | {r['auto_objects']}" if "auto_s" in r else "– | –"
                print(f"| {side}² | {'tiled' if tiled else 'untiled'} | {r['first_click_s']:.2f} | "
                      f"{r['click_s']:.3f} | {r['sized']}/{max(args.clicks, 2)} | {r['tiles_embedded']} | "
                      f"{r['clicks_peak_mib']:.0f} | {auto} | {r['peak_mib']:.0f} |", flush=True)
        if depth:
            stack = make_slice_store(Path(tmp) / "stack.zarr", 2048, depth)
            r = _child("run_stack", str(stack), str(Path(tmp) / "labels.zarr"), max_points)
            print(f"\nOME-Zarr stack {r['slices']} x 2048 x 2048 through tiled automatic mode into OME-Zarr "
                  f"labels: {r['s_per_slice']:.1f} s per slice, peak RSS {r['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
