"""AIS post-processing of large tiled slices: micro-sam's stitched maps against window by window.

No network runs here: each tile's decoder maps are cut from realistic maps (the micro-sam
fixture's ``pp/`` maps: micro-sam's training targets of 30 nuclei with noise, 384 x 448) repeated
over the slice, so what is measured is the post-processing and merging of ``segment_slice_ais``'s
two tiled paths (``AISParams.tiling``), on the same tile grid (1024-pixel tiles, 128-pixel halo,
as a ``Session`` tiles large slices):

- *stitched*: the tiles' cores written into ``(3, H, W)`` float32 maps (as
  ``tiled_decoder_maps`` does), then ``instances_from_maps`` on the whole slice;
- *blocks*: ``instances_by_blocks`` (``volume/ais_blocks.py``).

Peak memory is the peak of traced numpy allocations (tracemalloc) during the call; the int32
labels slice is the output. Agreement: fraction of pixels in the same instance (the micro-sam
fixture README's measure) and instance counts.

    PYTHONPATH=src python benchmarks/ais_blocks.py [--sides 2048 4096] [--blocks-only 8192]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np

from napari_mobilesam.core.tiles import TileGrid
from napari_mobilesam.volume.ais_blocks import instances_by_blocks
from napari_mobilesam.volume.instance import instances_from_maps

try:
    from _machine import describe_machine
except ImportError:  # run from elsewhere
    def describe_machine() -> str:
        return "machine not described"

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "microsam" / "microsam_expected.npz"
MIB = 2**20


def repeated_maps(base: np.ndarray):
    """``tile -> (3, h, w)`` maps of the tile's window of ``base`` repeated over the slice (no
    slice-sized array is made)."""

    def tile_maps(tile):
        r0, r1, c0, c1 = tile.outer
        rows = np.arange(r0, r1) % base.shape[1]
        cols = np.arange(c0, c1) % base.shape[2]
        return base[:, rows[:, None], cols[None, :]]

    return tile_maps


def stitched(shape, grid, tile_maps):
    maps = np.zeros((3, *shape), np.float32)
    for tile in grid.tiles:
        r0, r1, c0, c1 = tile.core
        o0, _, p0, _ = tile.outer
        maps[:, r0:r1, c0:c1] = tile_maps(tile)[:, r0 - o0 : r1 - o0, c0 - p0 : c1 - p0]
    return instances_from_maps(*maps)


def traced(fn):
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def same_assignment(result: np.ndarray, expected: np.ndarray) -> float:
    r, e = result.astype(np.int64).ravel(), expected.astype(np.int64).ravel()
    _, r_inv = np.unique(r, return_inverse=True)
    e_ids, e_inv = np.unique(e, return_inverse=True)
    table = np.zeros((r_inv.max() + 1, e_inv.max() + 1), np.int64)
    np.add.at(table, (r_inv, e_inv), 1)
    return float((e_ids[table.argmax(axis=1)][r_inv] == e).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="*", default=[2048, 4096], help="both paths")
    ap.add_argument("--blocks-only", type=int, nargs="*", default=[], help="block-wise path only")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=128)
    args = ap.parse_args()
    print(describe_machine())
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    e = np.load(FIXTURE)
    base = np.stack([e["pp/" + n] for n in ("foreground", "center_distances", "boundary_distances")])
    tile_maps = repeated_maps(base)
    warm = TileGrid((600, 600), 256, 32)  # imports and first calls out of the timings
    instances_by_blocks((600, 600), warm, tile_maps)
    stitched((600, 600), warm, tile_maps)
    print("| slice | tiles | path | time (s) | traced peak (MiB) | per pixel (B) | output (MiB) | instances | same assignment |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for side in list(args.sides) + list(args.blocks_only):
        shape = (side, side)
        grid = TileGrid(shape, args.tile, args.halo)
        out_mib = side * side * 4 / MIB
        blocks, t_b, p_b = traced(lambda: instances_by_blocks(shape, grid, tile_maps))
        n_b = int(blocks.max())
        if side in args.sides:
            whole, t_s, p_s = traced(lambda: stitched(shape, grid, tile_maps))
            n_s = int(np.count_nonzero(np.unique(whole)))
            agree = same_assignment(blocks, whole)
            print(f"| {side}² | {len(grid)} | stitched | {t_s:.1f} | {p_s / MIB:.0f} | {p_s / side**2:.1f} | {out_mib:.0f} | {n_s} | |")
            del whole
            print(f"| {side}² | {len(grid)} | blocks | {t_b:.1f} | {p_b / MIB:.0f} | {p_b / side**2:.1f} | {out_mib:.0f} | {n_b} | {agree:.5f} |")
        else:
            print(f"| {side}² | {len(grid)} | blocks | {t_b:.1f} | {p_b / MIB:.0f} | {p_b / side**2:.1f} | {out_mib:.0f} | {n_b} | |")
        del blocks


if __name__ == "__main__":
    main()
