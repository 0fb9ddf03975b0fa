"""Memory on large slices: what grows with the slice size is the output, not temporaries.

Peaks are numpy's allocations traced by ``tracemalloc`` (numpy reports them to it), measured on a
smaller and a larger slice; the growth between the two is compared with the growth of the
output labels slice (int32). Per-tile work (masks, candidates, embeddings) is the same size on both
slices, so it cancels out. The tile predictors are the ground-truth ORACLE (not a model); the
merging, automatic mode, stitching and writing are the real code.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from napari_mobilesam.core.source import SliceSource
from napari_mobilesam.core.tiles import TiledPredictor
from napari_mobilesam.testing import GroundTruthOracle
from napari_mobilesam.volume import stitch
from napari_mobilesam.volume.params import AutoParams
from napari_mobilesam.volume.stitch import Stitcher
from napari_mobilesam.volume.tiled import segment_slice_tiled

MIB = 2**20


def traced_peak(fn):
    """(peak traced bytes above what was allocated before, fn's result)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return tracemalloc.get_traced_memory()[1] - base, out
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def nuclei_tile():
    """A 512 x 512 slice of small nuclei (the sample generator's) and its labels, to repeat."""
    from napari_mobilesam.data import synthetic_nuclei

    s = synthetic_nuclei(shape=(10, 512, 512), n_nuclei=80, radius_range=(5.0, 10.0),
                         z_radius_range=(2.0, 3.0), seed=1)
    return s.labels[5].astype(np.int32), s.image[5]


def repeated(nuclei_tile, side):
    """(labels, image) of ``side`` x ``side``: the nuclei tile repeated, each copy with its own ids."""
    lab, img = nuclei_tile
    reps, n = side // lab.shape[0], int(lab.max())
    labels = np.block([[np.where(lab > 0, lab + n * (reps * i + j), 0) for j in range(reps)] for i in range(reps)])
    return np.ascontiguousarray(labels), np.ascontiguousarray(np.tile(img, (reps, reps)))


def oracle_tiled(labels, image, tile=512, halo=64) -> TiledPredictor:
    """Tiles answered by the ground-truth ORACLE, reading their pixels through the one shared
    source like the real tile predictors (``TileView``)."""

    def per_tile(view):
        rows, cols = view.tile.region
        oracle = GroundTruthOracle(labels[None, rows, cols], image[None, rows, cols])
        oracle.source = view
        return oracle

    return TiledPredictor(None, SliceSource(image), tile=tile, halo=halo, tile_predictor=per_tile)


def test_tiled_automatic_mode_grows_only_by_its_output(nuclei_tile):
    peaks, outs = [], []
    for side in (1024, 2048):
        labels, image = repeated(nuclei_tile, side)
        pred = oracle_tiled(labels, image)
        peak, out = traced_peak(lambda: segment_slice_tiled(pred, 0, AutoParams(max_points=16)))
        assert out.shape == labels.shape and out.dtype == np.int32
        assert out.max() > 20  # the oracle's objects are found
        peaks.append(peak)
        outs.append(out.nbytes)
    growth, out_growth = peaks[1] - peaks[0], outs[1] - outs[0]
    assert growth < 1.5 * out_growth, (
        f"peak grew by {growth / MIB:.1f} MiB for {out_growth / MIB:.1f} MiB more output")


def test_stitching_and_writing_hold_the_slice_and_the_stitcher_history_only(nuclei_tile, tmp_path):
    """Stitched in place and written to OME-Zarr: the growth is the slice being stitched plus the
    ``max_gap + 1`` stitched slices the stitcher keeps (3 here), not int64 unique/inverse arrays,
    a relabelled copy or the writer's dtype copy (which, before banding, made it about 10)."""
    from napari_mobilesam.io.omezarr_write import OmeZarrLabelsWriter

    peaks, outs = [], []
    for side in (1024, 2048):
        labels, _ = repeated(nuclei_tile, side)

        def run():
            st = Stitcher(max_gap=1)
            with OmeZarrLabelsWriter(tmp_path / f"{side}.zarr", (3, side, side)) as writer:
                for z in range(3):
                    writer.put(z, st.add(np.roll(labels, 3 * z, axis=1), inplace=True))
            return st.n_objects

        peak, n = traced_peak(run)
        assert n == int(labels.max())  # shifted by 3 pixels: every object keeps its id
        peaks.append(peak)
        outs.append(labels.nbytes)
    growth, out_growth = peaks[1] - peaks[0], outs[1] - outs[0]
    # 3 slices (the one being stitched and the 2 kept) plus the writer's chunk-row and compression
    # buffers, which do not grow in proportion (3.0-3.7 slices measured); before banding about 10
    assert growth < 4.5 * out_growth, (
        f"peak grew by {growth / MIB:.1f} MiB for {out_growth / MIB:.1f} MiB more per slice")


def _moving_disks(n_slices=6, shape=(160, 200), seed=0):
    """Labels of disks drifting through z, some touching, some vanishing and coming back."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres = rng.uniform(10, min(shape) - 10, (30, 2))
    out = np.zeros((n_slices, *shape), np.int32)
    for z in range(n_slices):
        ids = rng.permutation(200)[:30] + 1  # slice-local ids: arbitrary
        for k, (r, c) in enumerate(centres + rng.normal(0, 2, centres.shape) + z):
            if rng.random() < 0.15:
                continue  # missed on this slice
            out[z][(yy - r) ** 2 + (xx - c) ** 2 <= rng.uniform(5, 12) ** 2] = ids[k]
    return out


def test_banded_and_grouped_stitching_give_the_same_ids(monkeypatch):
    stack = _moving_disks()
    first = Stitcher(max_gap=2)
    reference = [first.add(sl) for sl in stack]
    # small bands (several per slice) and the per-group assignment (no dense matrix)
    monkeypatch.setattr(stitch, "_BAND_PIXELS", 1000)
    monkeypatch.setattr(stitch, "_DENSE_PAIRS", 0)
    st = Stitcher(max_gap=2)
    copies = [sl.copy() for sl in stack]
    for ref, sl in zip(reference, copies):
        out = st.add(sl, inplace=True)
        assert out is sl  # relabelled in place
        np.testing.assert_array_equal(out, ref)
    assert int(max(r.max() for r in reference)) == st.n_objects
    # arrays that are not writable int32 are never modified
    ro = stack[1].astype(np.uint16)
    out = Stitcher().add(ro, inplace=True)
    assert out is not ro and out.dtype == np.int32
    np.testing.assert_array_equal(ro, stack[1])


def test_tiled_click_grows_only_by_its_masks():
    """An object crossing four tiles, clicked in one, on a 1024² and a 2048² slice: the peak grows
    by the three returned (H, W) masks, not by a slice-sized mask per neighbouring tile."""
    peaks, sizes = [], []
    for side in (1024, 2048):
        labels = np.zeros((side, side), np.int32)
        yy, xx = np.ogrid[:side, :side]
        labels[(yy - 448) ** 2 + (xx - 448) ** 2 <= 150**2] = 1  # around a corner of 4 cores (512, 64)
        image = (labels > 0).astype(np.uint16) * 1000 + 100
        pred = oracle_tiled(labels, image)
        corners = [(300, 300), (300, 590), (590, 300), (590, 590)]
        assert len({pred.grid.tile_at(r, c).index for r, c in corners}) == 4
        peak, out = traced_peak(lambda: pred.predict(0, points=[(420, 420)], labels=[1]))
        np.testing.assert_array_equal(out.masks[out.best], labels == 1)
        peaks.append(peak)
        sizes.append(out.masks.nbytes)
    growth, masks_growth = peaks[1] - peaks[0], sizes[1] - sizes[0]
    assert growth < 1.15 * masks_growth, (
        f"peak grew by {growth / MIB:.1f} MiB for {masks_growth / MIB:.1f} MiB more masks")


def test_block_wise_ais_grows_only_by_its_output(nuclei_tile, monkeypatch):
    """AIS of a tiled slice, 1024² and 2048² in 512-pixel tiles (halo 64), through the fake
    network of ``fake_ais.py`` (NOT a model: the real input conversion, encoder/decoder calls, maps
    cropping, post-processing and merging around a pooling "encoder" and brightness "decoder").
    Block-wise, the peak grows by the int32 output slice plus the line of tile cores held
    (6 bytes per pixel of a row of tiles); micro-sam's stitched post-processing (the contrast
    that shows what is measured) by whole-slice maps and watershed temporaries, 10 times the output.
    The process's maps cache has its own fixed budget; it is off here so that what grows is the
    segmentation itself."""
    from fake_ais import fake_ais_model

    from napari_mobilesam.core.tiles import TileGrid
    from napari_mobilesam.models.ais_decoder import MAPS_CACHE
    from napari_mobilesam.volume.ais import segment_slice_ais
    from napari_mobilesam.volume.instance import AISParams

    monkeypatch.setattr(MAPS_CACHE, "max_bytes", 0)
    sam = fake_ais_model()
    peaks = {"blocks": [], "stitched": []}
    outs, found = [], {}
    for side in (1024, 2048):
        _, image = repeated(nuclei_tile, side)
        grid = TileGrid(image.shape, 512, 64)  # every tile 512² (micro-sam's are larger inside)
        for how in peaks:
            peak, out = traced_peak(lambda: segment_slice_ais(sam, image, AISParams(tiling=how), grid=grid))
            assert out.shape == image.shape
            peaks[how].append(peak)
            found[how, side] = int(np.count_nonzero(np.unique(out)))
        outs.append(side * side * 4)  # the int32 labels slice
    assert found["blocks", 1024] > 20 and found["blocks", 2048] > 3 * found["blocks", 1024]
    assert abs(found["blocks", 2048] - found["stitched", 2048]) <= 0.05 * found["stitched", 2048]
    out_growth = outs[1] - outs[0]
    growth = peaks["blocks"][1] - peaks["blocks"][0]
    assert growth < 1.5 * out_growth, (
        f"block-wise AIS peak grew by {growth / MIB:.1f} MiB for {out_growth / MIB:.1f} MiB more output")
    stitched_growth = peaks["stitched"][1] - peaks["stitched"][0]
    assert stitched_growth > 5 * out_growth  # the stitched path's maps and watershed do grow
