"""Benchmark: batch labelling throughput and memory against stack depth, and automatic mode speed.

Prints three tables:

0. Memory for many prompts on one slice: ``segment_stack`` on one 512 x 512 slice with 10, 100 and
   250 one-point prompts (``--prompt-counts``), each in a fresh process: peak resident memory above
   the level after a warm-up run with one prompt (flat: the masks are painted into the
   output slice as they are decoded, one bounded decoder chunk at a time).
1. Batch labelling from prompts (``segment_stack``): a lazily read TIFF stack of 512 x 512 slices
   (synthetic nuclei), a few point prompts on every slice, labels streamed to a compressed TIFF.
   Slices per second and peak memory (resident set of the whole process tree: client and dask
   workers) for stack depths 50, 100, 200, in one process and on a local dask cluster of two worker
   processes. Each configuration runs in a fresh process so peak memory is its own. The baseline
   for the ratios is one process at the same depth.
2. Automatic segmentation (``segment_stack_auto``): seconds per 512 x 512 slice with our candidate
   prompts (blobs + coarse grid), against a dense 32 x 32 point grid through the same decoder
   (SAM's "everything" mode, which micro-sam's automatic mode follows), measured in the same run.
   The model is MobileSAM's real architecture with the random weights of the parity fixture (the
   real weights cannot be downloaded here): speed is the real model's, but the masks are not, so
   the timing is taken twice: with the default quality filters (random scores reject most masks)
   and with every filter off (every mask goes through NMS and painting: the worst case).

Usage::

    python benchmarks/batch.py            # depths 50, 100, 200; auto on 10 slices
    python benchmarks/batch.py --quick    # depths 8, 16; auto on 3 slices; 16 x 16 dense grid
    python benchmarks/batch.py --skip-depth --skip-auto   # only the many-prompts memory table

Medians over ``--repeats`` runs where a configuration is repeated (the auto timing); the depth sweep
runs each configuration once (each is already a mean over many slices).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _machine import describe_machine as machine  # noqa: E402 (benchmarks/ is on sys.path)
from _machine import peak_rss_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "reference" / "mobile_sam_random_weights.pt"



# --------------------------------------------------------------------------- data


def make_stack(path: Path, depth: int, seed: int = 0) -> Path:
    """Synthetic nuclei, depth x 512 x 512 uint16, written uncompressed (read lazily later)."""
    import tifffile

    from napari_mobilesam.data import synthetic_nuclei

    def slices():
        # Built in blocks of 25 slices so memory stays small; about the sample stack's density.
        for b in range(0, depth, 25):
            n = min(25, depth - b)
            st = synthetic_nuclei((max(n, 12), 512, 512), n_nuclei=80, seed=seed + b)
            yield from st.image[:n]

    with tifffile.TiffWriter(path) as tw:
        tw.write(slices(), shape=(depth, 512, 512), dtype=np.uint16, photometric="minisblack")
    return path


def make_prompts(path: Path, stack_path: Path, per_slice: int) -> Path:
    """One positive point on each of the ``per_slice`` brightest blobs of every slice."""
    import tifffile

    from napari_mobilesam.volume.automatic import AutoParams, candidate_points

    data = tifffile.memmap(stack_path) if _is_memmappable(stack_path) else tifffile.imread(stack_path)
    rows = ["z,row,col,label,object_id"]
    oid = 0
    for z in range(data.shape[0]):
        pts = candidate_points(np.asarray(data[z]), AutoParams(grid=0, max_points=per_slice))
        for r, c in pts:
            oid += 1
            rows.append(f"{z},{r:g},{c:g},1,{oid}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _is_memmappable(path: Path) -> bool:
    import tifffile

    try:
        tifffile.memmap(path, mode="r")
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- child runs


def child(cfg: dict) -> dict:
    """Run one configuration in this process; return timings."""
    from napari_mobilesam import batch
    from napari_mobilesam.volume.automatic import AutoParams

    model = dict(model="vit_t", checkpoint=str(WEIGHTS), backend=cfg.get("backend", "auto"))
    if cfg["kind"] == "prompts":
        return prompts_child(cfg, model)
    data, meta = batch.open_stack(cfg["stack"], lazy=True)
    if cfg["kind"] == "segment":
        client = cluster = None
        if cfg["workers"]:
            from distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=cfg["workers"], threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None, silence_logs=40)
            client = Client(cluster)
            # Every worker loads the model before the clock starts.
            batch.preload_model_on_workers(client, **model)
        else:
            from napari_mobilesam.models.registry import load_model

            # Loaded before the clock starts, like the workers' models.
            model = {"model": load_model(model["model"], model["checkpoint"], backend=model["backend"])}
        prompts = batch.read_prompts_csv(cfg["prompts"])
        t0 = time.perf_counter()
        batch.segment_stack(data, prompts, client=client, out=cfg["out"], overwrite=True,
                            metadata=meta, cache_bytes=cfg["cache_mb"] * 2**20, **model)
        dt = time.perf_counter() - t0
        if client is not None:
            client.close()
            cluster.close()
        return {"seconds": dt, "slices": int(data.shape[0])}
    # automatic
    from napari_mobilesam.core.embeddings import EmbeddingCache
    from napari_mobilesam.core.predictor import SlicePredictor
    from napari_mobilesam.core.source import SliceSource
    from napari_mobilesam.models.choice import ModelChoice
    from napari_mobilesam.volume.automatic import segment_slice

    sam = ModelChoice.of(model["model"], model["checkpoint"], None, model["backend"]).load()
    source = SliceSource(data)
    # Slices from the middle of a block of the synthetic stack, where the nuclei are (its first
    # and last slices hold only background).
    zs = list(range(8, 8 + cfg["n_slices"]))
    out = {}
    pred = SlicePredictor(sam, source, EmbeddingCache(sam, max_bytes=0))
    # encoder alone
    enc = []
    for z in zs:
        t = time.perf_counter()
        pred.cache.get(source, z)
        enc.append(time.perf_counter() - t)
    out["encoder"] = statistics.median(enc)
    pred = SlicePredictor(sam, source, EmbeddingCache(sam, max_bytes=2**30))
    for z in zs:
        pred.cache.get(source, z)
    settings = {
        "ours (default filters)": AutoParams(),
        "ours (filters off)": AutoParams(min_iou=0, min_stability=0, max_area_fraction=1.0),
    }
    g = cfg["dense_grid"]
    dense = AutoParams(grid=g, max_points=g * g, blobs=False, skip_covered=False)
    for name, params in settings.items():
        times, prompts = [], []
        for z in zs:
            t = time.perf_counter()
            res = segment_slice(pred, z, params)
            times.append(time.perf_counter() - t)
            prompts.append(res.n_prompts)
        out[name] = {"decode+post": statistics.median(times), "prompts": statistics.median(prompts)}
    # Dense grid baseline on the first slice only (slow): decoder + filtering with default filters.
    t = time.perf_counter()
    res = segment_slice(pred, zs[0], dense)
    out[f"dense {g}x{g} grid"] = {"decode+post": time.perf_counter() - t, "prompts": res.n_prompts}
    return out


def prompts_child(cfg: dict, model: dict) -> dict:
    """``segment_stack`` on one 512 x 512 slice with ``cfg["n"]`` one-point prompts; peak resident
    memory above the level after a warm-up run (model and runtime loaded; the measured run embeds
    the slice again, the same for every ``n``)."""

    from napari_mobilesam import batch
    from napari_mobilesam.data import synthetic_nuclei
    from napari_mobilesam.models.registry import load_model

    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    img = synthetic_nuclei((12, 512, 512), n_nuclei=80, seed=0).image[6:7]
    sam = load_model(model["model"], model["checkpoint"], backend=model["backend"])
    n = int(cfg["n"])
    batch.segment_stack(img, np.array([[0, 256.0, 256.0]]), model=sam, cache_bytes=0)  # warm-up
    base = rss()
    pts = np.random.default_rng(1).uniform(10, 500, (n, 2))
    t = time.perf_counter()  # (N, 3) (z, row, col) points: one object each
    batch.segment_stack(img, np.column_stack([np.zeros(n), pts]), model=sam, cache_bytes=0)
    dt = time.perf_counter() - t
    peak = peak_rss_bytes()
    return {"peak_above_mb": (peak - base) / 2**20, "seconds": dt}


def run_child(cfg: dict) -> tuple[dict, float]:
    """Run ``child(cfg)`` in a fresh process; return (its result, peak RSS of its process tree)."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    peak = [0]
    stop = threading.Event()

    def sample():
        try:
            p = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [p, *p.children(recursive=True)]
                rss = 0
                for q in procs:
                    try:
                        rss += q.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                peak[0] = max(peak[0], rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak[0] / 2**20


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small depths and few slices (a few minutes)")
    ap.add_argument("--depths", type=int, nargs="+", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prompts-per-slice", type=int, default=4)
    ap.add_argument("--auto-slices", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the automatic timing")
    ap.add_argument("--cache-mb", type=int, default=64, help="embedding cache budget (MiB)")
    ap.add_argument("--skip-depth", action="store_true", help="no depth table")
    ap.add_argument("--skip-auto", action="store_true", help="no automatic-mode table")
    ap.add_argument("--prompt-counts", type=int, nargs="*", default=[10, 100, 250],
                    help="prompts on one slice for the memory table (none: skip it)")
    ap.add_argument("--prompt-backend", default="auto", help="backend of the memory table's runs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not WEIGHTS.exists():
        print(f"needs the parity fixture's weights at {WEIGHTS}", file=sys.stderr)
        return 2
    depths = args.depths or ([8, 16] if args.quick else [50, 100, 200])
    n_auto = args.auto_slices or (3 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 3)
    grid = 16 if args.quick else 32
    print(f"# napari-mobilesam batch benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print(f"# machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="mobilesam-bench-") as tmp:
        tmp = Path(tmp)
        if args.prompt_counts:
            print("\n## many prompts on one 512 x 512 slice (segment_stack), peak memory above the level "
                  f"after a one-prompt warm-up run, backend {args.prompt_backend}\n")
            print("| prompts | peak above MiB | s |")
            print("| ---: | ---: | ---: |")
            for n in args.prompt_counts:
                res, _ = run_child({"kind": "prompts", "n": n, "backend": args.prompt_backend})
                print(f"| {n} | {res['peak_above_mb']:.0f} | {res['seconds']:.1f} |", flush=True)
        if args.skip_depth and args.skip_auto:
            return 0
        t = time.perf_counter()
        stack = make_stack(tmp / "stack.tif", max(max(depths), n_auto + 8))
        print(f"# synthetic stack {max(max(depths), n_auto + 8)} x 512 x 512 written in "
              f"{time.perf_counter() - t:.0f} s")
        if not args.skip_depth:
            print("\n## batch labelling from prompts (segment_stack), "
                  f"{args.prompts_per_slice} point prompts per slice, lazy TIFF in, TIFF out\n")
            print("| depth | run | s total | slices/s | ratio vs 1 process | peak RSS MiB |")
            print("| ---: | --- | ---: | ---: | ---: | ---: |")
            for depth in depths:
                sub = tmp / f"stack{depth}.tif"
                _sub_stack(stack, sub, depth)
                prompts = make_prompts(tmp / f"p{depth}.csv", sub, args.prompts_per_slice)
                base = None
                for workers in (0, args.workers):
                    cfg = {"kind": "segment", "stack": str(sub), "prompts": str(prompts),
                           "out": str(tmp / f"out{depth}-{workers}.tif"), "workers": workers,
                           "cache_mb": args.cache_mb}
                    res, peak = run_child(cfg)
                    rate = res["slices"] / res["seconds"]
                    base = base or rate
                    run = "1 process" if not workers else f"{workers} dask workers"
                    print(f"| {depth} | {run} | {res['seconds']:.1f} | {rate:.2f} | "
                          f"{rate / base:.2f} | {peak:.0f} |", flush=True)
        if args.skip_auto:
            return 0
        print(f"\n## automatic segmentation, 512 x 512 slices with 50-75 nuclei (median of {n_auto} slices"
              f"{'' if repeats == 1 else f' x {repeats} runs'})\n")
        runs = []
        for _ in range(repeats):
            cfg = {"kind": "auto", "stack": str(stack), "n_slices": n_auto, "dense_grid": grid}
            runs.append(run_child(cfg)[0])
        enc = statistics.median(r["encoder"] for r in runs)
        dense_key = f"dense {grid}x{grid} grid"
        dense = statistics.median(r[dense_key]["decode+post"] for r in runs) + enc
        print(f"encoder (embedding) per slice: {enc:.2f} s\n")
        print("| prompts from | prompts/slice | s/slice (encoder + decoder + post) | ratio vs dense grid |")
        print("| --- | ---: | ---: | ---: |")
        for key in ("ours (default filters)", "ours (filters off)", dense_key):
            s = statistics.median(r[key]["decode+post"] for r in runs) + enc
            n = statistics.median(r[key]["prompts"] for r in runs)
            print(f"| {key} | {n:.0f} | {s:.2f} | {dense / s:.1f}x faster |" if key != dense_key
                  else f"| {key} (1 slice) | {n:.0f} | {s:.2f} | 1.0 |")
    return 0


def _sub_stack(src: Path, dst: Path, depth: int) -> None:
    import tifffile

    data = tifffile.memmap(src, mode="r")
    with tifffile.TiffWriter(dst) as tw:
        tw.write((np.asarray(data[z]) for z in range(depth)), shape=(depth, *data.shape[1:]),
                 dtype=data.dtype, photometric="minisblack")


if __name__ == "__main__":
    sys.exit(main())
