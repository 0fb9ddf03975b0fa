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
* reports the process's peak resident memory before automatic mode and at the end.

Peak RSS is the process's own ``VmHWM`` (``_machine.peak_rss_mib``): a child's ``ru_maxrss`` and
``os.wait4`` include the parent's RSS at the fork (the parent here holds the slice it generated),
which inflated the figures recorded before 2026-12-03 11:00 UTC at 10 000².

Then an OME-Zarr stack (``--depth`` slices of 2048 x 2048; the issue's stack is ``--depth 100``)
goes through the real command line, ``napari-mobilesam auto STACK.zarr -o LABELS.zarr
--max-points N`` in a child process (tiled, stitched through z, labels streamed into an OME-Zarr
label store): seconds per slice done in this run and the child's peak RSS. With
``--workdir DIR`` the stack and its labels are kept in DIR, so a run interrupted with Ctrl-C (the
command line keeps its finished slices) continues with ``--resume``; the time per slice is then
that of the slices done in the resumed run.

The model is MobileSAM's real architecture with the random weights of the parity fixture (real
weights cannot be downloaded here): times are the real model's; masks are not meaningful. Peak
memory is what matters for the "bounded whatever the slice size" claim: it should grow with the
slice only by the slice-sized outputs (masks, labels), not by the image or the embeddings.

Usage::

    python benchmarks/bigimage.py               # 2048, 4096, 10000; auto up to 4096; depth 10
    python benchmarks/bigimage.py --quick       # 2048, 4096; auto 2048 with 32 prompts; depth 2
    python benchmarks/bigimage.py --sides 10000 --auto-max 0 --depth 0   # the 10 000² rows alone
    python benchmarks/bigimage.py --sides 4096 10000 --modes tiled --auto-max 10000 --clicks 0 --depth 0
    python benchmarks/bigimage.py --stack-only --depth 100 --max-points 32 --workdir big100
    python benchmarks/bigimage.py --stack-only --depth 100 --max-points 32 --workdir big100 --resume
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import RUN_WITH_PEAK, peak_rss_mib  # noqa: E402 (benchmarks/ is on sys.path)
from _machine import describe_machine as machine  # noqa: E402

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
    import dask.array as da

    # shifted copies of the slice, made lazily: a 100-slice stack is written chunk by chunk
    base = da.from_array(np.ascontiguousarray(img), chunks=(1024, 1024))
    stack = da.stack([da.roll(base, 37 * k, axis=1) for k in range(depth)]).rechunk((1, 1024, 1024))
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


def _clicks(pred, store: str, clicks: int) -> dict:
    """Click ``clicks`` nuclei spread over slice 0: times and how many masks are sized right."""
    from scipy import ndimage as ndi

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
    return {"first_click_s": times[0], "click_s": statistics.median(times[1:]), "sized": sized}


def run_slice(store: str, tiled: bool, auto: bool, max_points: int = 256, clicks: int = 20) -> dict:
    """In a fresh process: clicks (``clicks`` >= 2; 0: none) and automatic mode on slice 0 of
    ``store``."""
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
    res = {"first_click_s": None, "click_s": None, "sized": 0, "tiles_embedded": 0, "clicks_peak_mib": None}
    if clicks >= 2:
        res.update(_clicks(pred, store, clicks))
        res["tiles_embedded"] = cache.stats.computed
        res["clicks_peak_mib"] = peak_rss_mib()
    if auto:
        params = auto_params(max_points)
        res["before_auto_mib"] = peak_rss_mib()
        t0 = time.perf_counter()
        lab = segment_slice_tiled(pred, 0, params) if tiled else segment_slice(pred, 0, params).labels
        res["auto_s"] = time.perf_counter() - t0
        res["peak_mib"] = peak_rss_mib()
        res["output_mib"] = lab.nbytes / 2**20
        res["auto_objects"] = int(lab.max())  # ids 1..N (no slice-sized unique before the peak is read)
    res["peak_mib"] = peak_rss_mib()
    return res


def stack_store(workdir: Path, depth: int) -> Path:
    """The ``depth`` x 2048 x 2048 OME-Zarr stack in ``workdir``, written once (kept for later
    runs: a store is only used once its writing finished, marked by a ``.done`` file)."""
    path = workdir / f"stack{depth}.zarr"
    done = workdir / f"stack{depth}.done"
    if not done.exists():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        make_slice_store(path, 2048, depth)
        done.write_text("complete\n")
    return path


def _done_slices(labels: Path) -> int:
    """Slices of the labels output finished so far: all of a complete store, those recorded in
    the progress file of an interrupted one (``<labels>.partial``), else 0."""
    from napari_mobilesam.io.omezarr_write import PROGRESS_FILE, partial_path

    record = partial_path(labels) / PROGRESS_FILE
    if record.exists():
        return sum(b - a for a, b in json.loads(record.read_text())["done"])
    if labels.exists():
        import zarr

        return int(zarr.open_group(str(labels), mode="r")["s0"].shape[0])
    return 0


EXIT_INTERRUPTED = 130  # the command line's exit status after Ctrl-C (napari_mobilesam.cli)


#: automatic-mode filters that keep every mask (``--keep-all-masks``): the parity fixture's random
#: weights give masks that fail the default quality filters, so a stack run writes no object
KEEP_ALL = ("--min-iou", "0", "--min-stability", "0", "--min-area", "1", "--max-area-fraction", "1")


def run_stack_cli(store: Path, labels: Path, depth: int, max_points: int, resume: bool,
                  keep_all: bool = False) -> dict:
    """``napari-mobilesam auto STORE -o LABELS`` in a child process (tiled automatic mode, labels
    streamed into an OME-Zarr label store, stitched through z): seconds per slice done in this run
    (model loading included) and the child's own peak RSS. ``resume`` continues an
    interrupted run's output; otherwise an existing output is replaced."""
    before = _done_slices(labels) if resume else 0
    if resume and before == depth and labels.exists():
        return {"slices": depth, "done_before": before, "done_now": 0, "interrupted": False,
                "s_per_slice": None, "peak_mib": None}
    cmd = [sys.executable, "-c", RUN_WITH_PEAK, "napari_mobilesam.cli",  # the CLI, reporting its peak
           "auto", str(store), "-o", str(labels),
           "--model", "vit_t", "--checkpoint", str(WEIGHTS), "--max-points", str(max_points),
           "--cache-mb", "64", "--no-progress", "--resume" if resume else "--overwrite",
           *(KEEP_ALL if keep_all else ())]
    log = labels.with_suffix(".log")
    peak_file = labels.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, PEAK_RSS_FILE=str(peak_file)))
        try:
            _, status, _usage = os.wait4(child.pid, 0)
        except KeyboardInterrupt:  # the child got the Ctrl-C too and keeps its finished slices
            child.wait()
            raise
        child.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t0
    # Ctrl-C (the command line's own exit status) or killed by a signal: finished slices are kept
    interrupted = child.returncode == EXIT_INTERRUPTED or child.returncode < 0
    if child.returncode != 0 and not interrupted:
        raise RuntimeError(f"{' '.join(cmd)} failed ({child.returncode}):\n{log.read_text()[-3000:]}")
    done_now = (_done_slices(labels) if interrupted else depth) - before
    return {"slices": depth, "done_before": before, "done_now": done_now, "interrupted": interrupted,
            "s_per_slice": dt / max(done_now, 1),
            "peak_mib": float(peak_file.read_text()) if peak_file.exists() else None,  # None: killed
            "objects": _objects(labels) if not interrupted else None}


def _objects(labels: Path) -> int:
    """How many distinct objects the finished label store holds (read slice by slice)."""
    import zarr

    level0 = zarr.open_group(str(labels), mode="r")["s0"]
    ids = set()
    for z in range(level0.shape[0]):
        ids.update(np.unique(np.asarray(level0[z])).tolist())
    return len(ids - {0})


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
    ap.add_argument("--modes", nargs="*", default=["untiled", "tiled"], choices=("untiled", "tiled"),
                    help="slice rows to run (default both)")
    ap.add_argument("--auto-max", type=int, default=None, help="largest side run in automatic mode")
    ap.add_argument("--depth", type=int, default=None,
                    help="slices of the 2048 x 2048 OME-Zarr stack run through the CLI (0: none; "
                    "the issue's stack is 100)")
    ap.add_argument("--clicks", type=int, default=20, help="nuclei clicked per slice (at least 2; 0: no clicks)")
    ap.add_argument("--max-points", type=int, default=None,
                    help="automatic mode: prompts per slice (untiled) or per tile (tiled)")
    ap.add_argument("--stack-only", action="store_true", help="run only the stack row")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the stack and its labels here (default: a temporary folder), so an "
                    "interrupted stack run can continue with --resume")
    ap.add_argument("--keep-all-masks", action="store_true",
                    help="stack row: automatic-mode filters that keep every mask, so that the random "
                    "weights' masks are written (with the default filters they are all rejected)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the stack's labels left unfinished in --workdir by an interrupted run")
    args = ap.parse_args()
    if args.resume and args.workdir is None:
        ap.error("--resume needs --workdir (where the interrupted run kept its stores)")
    sides = args.sides or ([2048, 4096] if args.quick else [2048, 4096, 10000])
    auto_max = args.auto_max if args.auto_max is not None else (2048 if args.quick else 4096)
    depth = args.depth if args.depth is not None else (2 if args.quick else 10)
    max_points = args.max_points or (32 if args.quick else 256)
    clicks = 0 if args.clicks < 2 else args.clicks
    print(f"machine: {machine()}")
    print("model: MobileSAM architecture, parity-fixture random weights, default backend; "
          f"automatic mode with at most {max_points} prompts per slice or tile\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.stack_only:
            _slice_rows(work, sides, args.modes, auto_max, max_points, clicks)
        if depth:
            store = stack_store(work, depth)
            r = run_stack_cli(store, work / f"labels{depth}.zarr", depth, max_points, args.resume,
                              args.keep_all_masks)
            if r["interrupted"]:
                print(f"\nOME-Zarr stack {depth} x 2048 x 2048: interrupted or killed with "
                      f"{r['done_before'] + r['done_now']} "
                      f"of {depth} slices done; continue with --workdir {work} --resume")
            elif not r["done_now"]:
                print(f"\nOME-Zarr stack {depth} x 2048 x 2048: all slices were done by earlier runs")
            else:
                print(f"\nOME-Zarr stack {depth} x 2048 x 2048 through `napari-mobilesam auto` (tiled, "
                      f"stitched, OME-Zarr labels): {r['done_now']} slices in this run "
                      f"({r['done_before']} done before), {r['s_per_slice']:.1f} s per slice "
                      f"(model loading included), peak RSS of the CLI {r['peak_mib']:.0f} MiB"
                      + (f", {r['objects']} objects in the labels" if r.get("objects") is not None else ""))


def _slice_rows(work: Path, sides, modes, auto_max: int, max_points: int, clicks: int) -> None:
    print(f"| slice | mode | first click (s) | click median (s) | clicked nuclei sized right | encoder runs "
          f"({clicks} clicks) | peak RSS after clicks (MiB) | auto (s) | auto objects | peak RSS before "
          "auto (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for side in sides:
        store = make_slice_store(work / f"s{side}.zarr", side)
        for mode in modes:
            r = _child("run_slice", str(store), mode == "tiled", side <= auto_max, max_points, clicks)
            click = ("– | – | – | – | –" if r["first_click_s"] is None else
                     f"{r['first_click_s']:.2f} | {r['click_s']:.3f} | {r['sized']}/{clicks} | "
                     f"{r['tiles_embedded']} | {r['clicks_peak_mib']:.0f}")
            auto = (f"{r['auto_s']:.1f} | {r['auto_objects']} | {r['before_auto_mib']:.0f}"
                    if "auto_s" in r else "– | – | –")
            print(f"| {side}² | {mode} | {click} | {auto} | {r['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
