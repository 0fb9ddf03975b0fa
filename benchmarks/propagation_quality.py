"""Propagation and stitching quality against ground truth (no model: ground-truth ORACLES).

The 3D logic is judged with `napari_mobilesam.testing.GroundTruthOracle`, a stand-in for the model
that answers every prompt with the true object under it (NOT a model), exactly or with errors:
``exact``, ``eroded`` / ``dilated`` (the answer shrunk / grown by one pixel) and ``jitter`` (one of
the three drawn at random per prompt, ±1 px; the same prompt always gets the same answer, as from a
real model). Every oracle offers three candidates (the answer,
it dilated and it eroded by one pixel; the answer scored best), so a candidate choice that drifts
to the largest mask shows. Stacks: the sample (``synthetic_nuclei()``) and its crowded variant
(``synthetic_nuclei(crowded=True, n_nuclei=50)``: nuclei touching in x, y and z, low contrast).

One seed per object, a click on its middle slice; all objects propagated together. Printed per
stack and oracle:

- full extent: objects whose every true slice is segmented with IoU >= 0.5 (and no slice beyond);
  also counted over the slices of at least 30 pixels only (a ±1 px error on a tip of a few
  pixels is an IoU under 0.5 by itself);
- mean 3D IoU of the objects;
- over-runs: directions that wrote an object on slices past its true end;
- jumps: objects written on some slice where most of the written pixels belong to another object;
- consistency: objects whose records, extent and stops disagree with the labels written (must be 0).

Then the stitcher on slice-by-slice true labels (ids shuffled per slice): objects kept (each true
object has its own stitched id on most of its voxels, no id shared), and the time to find
candidate points on a large slice (``--large N``: an N x N tiling of the crowded sample).

    python benchmarks/propagation_quality.py            # about two minutes on 2 cores
    python benchmarks/propagation_quality.py --stacks crowded --seeds 4 5 6 --no-stitch   # unseen seeds
    python benchmarks/propagation_quality.py --large 5000
    python benchmarks/propagation_quality.py --baseline f3277ff   # also the propagate() of a git revision

``--baseline REV`` loads ``volume/propagation.py`` of git revision REV (``git show``) and runs the
same oracles through it in the same run, as the "before" rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _machine import describe_machine as machine  # noqa: E402 (benchmarks/ is on sys.path)

from napari_mobilesam.core.predictor import Prompt  # noqa: E402
from napari_mobilesam.data import synthetic_nuclei  # noqa: E402
from napari_mobilesam.testing import GroundTruthOracle  # noqa: E402
from napari_mobilesam.volume.propagation import ObjectPrompts, propagate  # noqa: E402
from napari_mobilesam.volume.stitch import Stitcher  # noqa: E402

ORACLES = (("exact", 1), ("eroded", 1), ("dilated", 1))
#: Seeds of the ±1 px oracle: 1-3 were used to tune the propagation, 4-6 (``--seeds 4 5 6``) were not.
JITTER_SEEDS = (1, 2, 3)


def seeds(gt: np.ndarray) -> list[ObjectPrompts]:
    """One click per object: the deepest pixel of its middle slice."""
    from scipy import ndimage as ndi

    objs = []
    for i in np.unique(gt[gt > 0]):
        zs = np.flatnonzero((gt == i).any(axis=(1, 2)))
        zc = int((zs[0] + zs[-1]) // 2)
        dt = ndi.distance_transform_edt(gt[zc] == i)
        pt = np.unravel_index(int(np.argmax(dt)), dt.shape)
        objs.append(ObjectPrompts(int(i), prompts={zc: Prompt.from_clicks([pt])}))
    return objs


def consistent(res, i: int) -> bool:
    """Records, extent and stops of object ``i`` equal what is written into ``res.labels``."""
    written = {int(z) for z in np.flatnonzero((res.labels == i).any(axis=(1, 2)))}
    acc = {r.z for r in res.records if r.label == i and r.accepted}
    areas_ok = all(r.area == int((res.labels[r.z] == i).sum()) for r in res.records if r.label == i and r.accepted)
    ext = res.extent(i)
    stops_ok = all(s.last_z in written for s in res.stops_for(i) if s.direction != 0)
    return written == acc and areas_ok and ext == ((min(written), max(written)) if written else None) and stops_ok


def score(gt: np.ndarray, res, min_px: int = 30) -> dict:
    full = full_big = overruns = jumps = bad = 0
    ious = []
    for i in np.unique(gt[gt > 0]):
        g, r = gt == i, res.labels == i
        zs = np.flatnonzero(g.any(axis=(1, 2)))
        z0, z1 = int(zs[0]), int(zs[-1])
        rz = np.flatnonzero(r.any(axis=(1, 2)))
        slice_iou = [(g[z] & r[z]).sum() / max((g[z] | r[z]).sum(), 1) for z in range(z0, z1 + 1)]
        outside = [z for z in rz if z < z0 or z > z1]
        full += bool(min(slice_iou) >= 0.5 and not outside)
        big = [v for v, z in zip(slice_iou, range(z0, z1 + 1)) if g[z].sum() >= min_px]
        full_big += bool((not big or min(big) >= 0.5) and not outside)
        overruns += bool([z for z in outside if z < z0]) + bool([z for z in outside if z > z1])
        jumped = False
        for z in rz:
            w = r[z]
            on_other = np.count_nonzero(w & (gt[z] > 0) & (gt[z] != i))
            jumped |= on_other > 0.5 * np.count_nonzero(w)
        jumps += jumped
        ious.append((g & r).sum() / max((g | r).sum(), 1))
        bad += not consistent(res, int(i))
    n = len(ious)
    return {"n": n, "full": full / n, "full_big": full_big / n, "iou": float(np.mean(ious)), "over": overruns, "jumps": jumps, "bad": bad}


def stitch_truth(gt: np.ndarray, regrow: float, seed: int = 0) -> tuple[int, int, int]:
    """(true objects, objects kept, stitched ids) for slice-by-slice true labels through Stitcher."""
    from napari_mobilesam.volume.params import AutoParams

    p = AutoParams()
    st = Stitcher(p.stitch_iou, p.stitch_overlap, p.stitch_gap, regrow)
    rng = np.random.default_rng(seed)
    out = np.zeros(gt.shape, np.int32)
    for z, sl in enumerate(gt):
        ids = np.unique(sl[sl > 0])
        lut = np.zeros(int(gt.max()) + 1, np.int32)
        lut[ids] = rng.permutation(len(ids)) + 1
        out[z] = st.add(lut[sl])
    majority = {}
    for i in np.unique(gt[gt > 0]):
        vals, counts = np.unique(out[gt == i], return_counts=True)
        majority[int(i)] = (int(vals[np.argmax(counts)]), counts.max() / counts.sum())
    owners: dict[int, list[int]] = {}
    for i, (m, _) in majority.items():
        owners.setdefault(m, []).append(i)
    kept = sum(1 for i, (m, frac) in majority.items() if len(owners[m]) == 1 and frac > 0.5)
    return len(majority), kept, int(len(np.unique(out[out > 0])))


def large_candidates(size: int, reps: int = 3) -> None:
    """Median seconds of `candidate_points` on a ``size`` x ``size`` slice, at the working scale
    (default) and, as the baseline measured in the same run, at full resolution."""
    from napari_mobilesam.volume import candidates as cand

    st = synthetic_nuclei(crowded=True, n_nuclei=50)
    tile = st.image[st.image.shape[0] // 2]
    big = np.tile(tile, (size // tile.shape[0] + 1, size // tile.shape[1] + 1))[:size, :size]
    lab = np.tile(st.labels[st.image.shape[0] // 2], (size // tile.shape[0] + 1, size // tile.shape[1] + 1))
    rows = []
    default = cand.WORK_SIZE
    for name, work in (("working scale (default)", default), ("full resolution (baseline)", 10**9)):
        cand.WORK_SIZE = work
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            pts = cand.candidate_points(big, cand.AutoParams(max_points=100_000, grid=0))
            times.append(time.perf_counter() - t)
        on = lab[np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)]
        rows.append((name, statistics.median(times), len(pts), float(np.mean(on > 0)) if len(pts) else 0.0))
    cand.WORK_SIZE = default
    print(f"\n| candidate points, {size} x {size} slice | median s ({reps} runs) | ratio to baseline | points "
          "| points on a nucleus |")
    print("|---|---|---|---|---|")
    for name, t, n, frac in rows:
        print(f"| {name} | {t:.2f} | {t / rows[1][1]:.2f} | {n} | {100 * frac:.0f}% |")


def baseline_propagate(rev: str):
    """``propagate`` and ``ObjectPrompts`` of ``volume/propagation.py`` at git revision ``rev``."""
    import importlib.util
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    code = subprocess.run(["git", "-C", str(root), "show", f"{rev}:src/napari_mobilesam/volume/propagation.py"],
                          capture_output=True, text=True, check=True).stdout
    code = code.replace("from ..core.predictor import", "from napari_mobilesam.core.predictor import")
    path = Path(tempfile.mkdtemp()) / "baseline_propagation.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("baseline_propagation", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", type=int, default=0, help="also time candidate points on an N x N slice")
    ap.add_argument("--score-weight", type=float, default=None, help="override propagate's score_weight")
    ap.add_argument("--baseline", default=None, help="git revision whose propagate() is run as the baseline")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(JITTER_SEEDS), help="seeds of the ±1 px oracle")
    ap.add_argument("--stacks", nargs="+", default=["sample", "crowded"], choices=["sample", "crowded"])
    ap.add_argument("--no-stitch", action="store_true", help="skip the stitcher table")
    args = ap.parse_args()
    kw = {} if args.score_weight is None else {"score_weight": args.score_weight}
    make = {"sample": synthetic_nuclei, "crowded": lambda: synthetic_nuclei(crowded=True, n_nuclei=50)}
    stacks = {name: make[name]() for name in args.stacks}
    oracles = [*ORACLES, *(("jitter", s) for s in args.seeds)]
    print("| stack | objects | oracle | full extent | full extent (slices >= 30 px) | mean 3D IoU | over-runs "
          "| jumps | inconsistent | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs = [("", propagate, ObjectPrompts)]
    if args.baseline:
        base = baseline_propagate(args.baseline)
        runs.append((f" [{args.baseline}]", base.propagate, base.ObjectPrompts))
    for name, st in stacks.items():
        for tag, prop, obj_type in runs:
            for err, seed in oracles:
                oracle = GroundTruthOracle(st.labels, st.image, error=err, candidates="spread", seed=seed)
                objs = [obj_type(o.label, prompts=dict(o.prompts)) for o in seeds(st.labels)]
                t = time.perf_counter()
                res = prop(oracle, objs, prefetch=False, **kw)
                dt = time.perf_counter() - t
                s = score(st.labels, res)
                label = (err if err != "jitter" else f"±1 px (seed {seed})") + tag
                print(f"| {name} | {s['n']} | {label} | {100 * s['full']:.0f}% | {100 * s['full_big']:.0f}% | "
                      f"{s['iou']:.3f} | {s['over']} | {s['jumps']} | {s['bad']} | {dt:.1f} |")
    if not args.no_stitch:
        print("\n| stack | true objects | stitcher | kept | stitched ids |")
        print("|---|---|---|---|---|")
    for name, st in stacks.items() if not args.no_stitch else ():
        for regrow, what in ((1.3, "size-change rule on (default)"), (0.0, "size-change rule off")):
            n, kept, ids = stitch_truth(st.labels, regrow)
            print(f"| {name} | {n} | {what} | {kept} | {ids} |")
    if args.large:
        large_candidates(args.large)
    print("\n" + machine())


if __name__ == "__main__":
    main()
