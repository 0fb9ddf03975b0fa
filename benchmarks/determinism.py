"""Does one slice's embedding depend on what the process ran before? A reproduction script.

In ONE process it loads the default model (OpenVINO, mixed precision on CPUs with bf16; the
parity fixture's random weights), embeds probe slices, then runs the work the command line's
``segment``, ``propagate`` and ``auto`` do (prompts batched, propagation, automatic mode, a slice
larger than the tile so it runs tile by tile, other slice shapes, a second model load, torch's
thread count changed, flush-to-zero, a prefetch thread embedding while the main thread decodes),
and embeds the probes again, with the first model and with a model loaded after that work. A
FRESH process (``--child``) embeds the same probes. Every embedding is compared bitwise.

Prints a table: probe, when, max |difference| against the fresh process, bitwise equal.
Exit status 1 when any embedding differs.

Run ``python benchmarks/determinism.py`` (``--quick``: fewer disturbing slices).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
WEIGHTS = REFERENCE / "mobile_sam_random_weights.pt"


def probes() -> dict[str, np.ndarray]:
    """The probe slices as (H, W, 3) uint8 RGB: a nuclei slice (256²), the 660×550 cell image."""
    from napari_mobilesam.core.source import SliceSource
    from napari_mobilesam.data import cell_image, synthetic_nuclei

    nuclei = SliceSource(synthetic_nuclei(shape=(8, 256, 256), n_nuclei=10, seed=3).image)
    cell = SliceSource(cell_image())
    return {"nuclei z=4": nuclei.rgb(4), "cell 660x550": cell.rgb(0)}


def load(precision: str = "auto"):
    from napari_mobilesam.models.choice import ModelChoice

    return ModelChoice("vit_t", str(WEIGHTS), "cpu", "auto", precision).load()


def embed_all(sam) -> dict[str, np.ndarray]:
    from napari_mobilesam.core.embeddings import compute_embedding

    return {name: compute_embedding(sam, rgb).features.numpy().copy() for name, rgb in probes().items()}


def disturb(sam, quick: bool) -> None:
    """What segment + propagate + auto do in one process, and more, on other data and shapes."""
    import torch
    from skimage.measure import regionprops

    from napari_mobilesam.batch.api import (
        propagate_stack,
        segment_stack,
        segment_stack_auto,
    )
    from napari_mobilesam.core.embeddings import EmbeddingCache
    from napari_mobilesam.core.predictor import SlicePredictor
    from napari_mobilesam.core.source import SliceSource
    from napari_mobilesam.data import synthetic_nuclei

    n = 10
    st = synthetic_nuclei(shape=(n, 300, 420), n_nuclei=8, z_radius_range=(2.0, 3.0), seed=1)
    zc = n // 2
    pts = np.array([[zc, *r.centroid] for r in regionprops(st.labels[zc])][:5], float)
    kw = dict(model="vit_t", checkpoint=str(WEIGHTS), device="cpu")
    segment_stack(st.image, pts, **kw)                       # a second model load, batched prompts
    propagate_stack(st.image, pts, model=sam, z_range=(zc - 2, zc + (2 if quick else 4)))
    segment_stack_auto(st.image, model=sam, z_range=(0, 2))   # automatic mode (grid)
    big = synthetic_nuclei(shape=(1, 1300, 1100), n_nuclei=20, seed=2).image
    segment_stack_auto(big, model=sam, tile=768)              # tiles of another size
    for precision in ("fp32", "bf16"):                        # the same IR at other precisions
        embed_all(load(precision))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        segment_stack(st.image[:1], pts[:2] * [0, 1, 1], model=sam)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    # a prefetch thread embedding while this thread decodes prompts on another slice
    src = SliceSource(st.image)
    cache = EmbeddingCache(sam)
    pred = SlicePredictor(sam, src, cache)
    pred.predict(0, points=pts[:1, 1:], labels=np.ones(1))
    futs = cache.prefetch(src, range(1, 3 if quick else 6))
    while not all(f.done() for f in futs):
        pred.predict(0, points=pts[:3, 1:], labels=np.ones(3))
    cache.close()


def child(out: str) -> None:
    sam = load()
    np.savez(out, **{k.replace(" ", "_"): v for k, v in embed_all(sam).items()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fresh.npz")
        subprocess.run([sys.executable, __file__, "--child", out], check=True)
        fresh = dict(np.load(out))
    sam = load()
    rows = [("first model, before", embed_all(sam))]
    disturb(sam, args.quick)
    rows.append(("first model, after", embed_all(sam)))
    rows.append(("model loaded after", embed_all(load())))
    from napari_mobilesam.models.registry import model_identity

    print(f"model: {model_identity(sam)}")
    print(f"{'probe':<14} {'when':<22} {'max |diff| vs fresh':>20} {'bitwise':>8}")
    same = True
    for when, embs in rows:
        for name, e in embs.items():
            f = fresh[name.replace(" ", "_")]
            diff = float(np.abs(e - f).max())
            eq = bool(np.array_equal(e, f))
            same &= eq
            print(f"{name:<14} {when:<22} {diff:>20.3g} {str(eq):>8}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
