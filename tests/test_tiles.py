"""Tiled slices: the grid, tile views, prompts on tile borders, objects crossing tiles, automatic mode."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.core.source import SliceSource
from napari_mobilesam.core.tiles import TiledPredictor, TileGrid, TileView
from napari_mobilesam.errors import InputError
from napari_mobilesam.testing import GroundTruthOracle
from napari_mobilesam.volume.tiled import merge_tile_labels, segment_slice_tiled


@pytest.mark.parametrize("shape", [(300, 300), (1024, 1024), (1025, 3000), (4096, 4096), (2000, 700)])
@pytest.mark.parametrize("tile,halo", [(1024, 128), (512, 64), (256, 0)])
def test_grid_cores_partition_the_slice_and_outers_overlap(shape, tile, halo):
    grid = TileGrid(shape, tile, halo)
    owner = np.zeros(shape, np.int32)
    for t in grid.tiles:
        r0, r1, c0, c1 = t.core
        owner[r0:r1, c0:c1] += 1
        o0, o1, p0, p1 = t.outer
        assert 0 <= o0 <= r0 < r1 <= o1 <= shape[0] and 0 <= p0 <= c0 < c1 <= p1 <= shape[1]
        # a tile is full size unless the slice is smaller, and its core has `halo` around it
        assert t.shape == (min(tile, shape[0]), min(tile, shape[1]))
        assert r0 - o0 >= min(halo, r0) and o1 - r1 >= min(halo, shape[0] - r1)
        assert c0 - p0 >= min(halo, c0) and p1 - c1 >= min(halo, shape[1] - c1)
    assert (owner == 1).all(), "every pixel belongs to exactly one core"
    for row, col in [(0, 0), (shape[0] - 1, shape[1] - 1), (shape[0] // 2, shape[1] // 3)]:
        assert grid.tile_at(row, col).in_core(row, col)


def test_grid_rejects_bad_settings():
    with pytest.raises(InputError, match="halo"):
        TileGrid((2048, 2048), 512, 256)
    with pytest.raises(InputError, match="too small"):
        TileGrid((2048, 2048), 16, 0)


def test_tile_view_reads_only_its_window_with_the_slice_normalisation():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, (3, 700, 900)).astype(np.uint16)

    class Recording:  # an array-like that records what is read (like a lazy zarr/dask array)
        shape, dtype, ndim = data.shape, data.dtype, data.ndim

        def __init__(self):
            self.reads = []

        def __getitem__(self, index):
            out = data[index]
            self.reads.append(out.size)
            return out

    rec = Recording()
    source = SliceSource(rec, normalize="slice")
    grid = TileGrid(source.slice_shape, 256, 32)
    whole = SliceSource(data, normalize="slice").rgb(1)
    source.slice_range(1)  # per-slice normalisation reads the slice once for its range
    for t in grid.tiles[:4]:
        view = TileView(source, t)
        rec.reads.clear()
        img = view.rgb(1)
        assert img.shape == (*t.shape, 3)
        np.testing.assert_array_equal(img, whole[t.region])
        assert max(rec.reads) <= 256 * 256, "a tile reads only its window once the slice range is known"
    keys = {TileView(source, t).slice_key(1) for t in grid.tiles}
    assert len(keys) == len(grid.tiles)


def _oracle_tiled(labels2d: np.ndarray, image2d: np.ndarray, tile=512, halo=64) -> TiledPredictor:
    """A TiledPredictor whose tiles are answered by the ground-truth ORACLE (not a model)."""

    def per_tile(view):
        rows, cols = view.tile.region
        return GroundTruthOracle(labels2d[None, rows, cols], image2d[None, rows, cols])

    return TiledPredictor(None, image2d, tile=tile, halo=halo, tile_predictor=per_tile)


def _disks(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (r, c) in enumerate(centres, start=1):
        labels[(yy - r) ** 2 + (xx - c) ** 2 <= radius**2] = i
    return labels


def test_object_crossing_tiles_is_merged_from_a_click_in_one_tile():
    shape = (1200, 1200)
    # one big object straddling the first tiles' borders, and a small one inside a tile
    labels = _disks(shape, [(460, 460), (900, 150)], 150)
    labels[labels == 2] = 0
    labels += _disks(shape, [(900, 150)], 20) * 2
    image = (labels > 0).astype(np.uint16) * 1000 + 100
    pred = _oracle_tiled(labels, image)
    assert len(pred.grid) > 1
    out = pred.predict(0, points=[(420, 420)], labels=[1])
    assert out.masks.shape == (3, *shape)
    np.testing.assert_array_equal(out.masks[out.best], labels == 1)
    small = pred.predict(0, points=[(900, 150)], labels=[1])
    np.testing.assert_array_equal(small.masks[small.best], labels == 2)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_prompts_on_tile_borders(offset):
    shape = (1100, 1100)
    grid = TileGrid(shape, 512, 64)
    border = grid.tiles[0].core[1]  # first core row boundary
    labels = _disks(shape, [(border, border)], 30)
    image = (labels > 0).astype(np.uint16) * 1000
    pred = _oracle_tiled(labels, image)
    out = pred.predict(0, points=[(border + offset, border + offset)], labels=[1])
    np.testing.assert_array_equal(out.masks[out.best], labels == 1)
    boxed = pred.predict(0, box=(border - 30, border - 30, border + 30, border + 30))
    np.testing.assert_array_equal(boxed.masks[boxed.best], labels == 1)


@pytest.fixture(scope="module")
def big_nuclei():
    """A 4096 × 4096 slice of small nuclei: the sample generator's middle slice, tiled 4 × 4."""
    from napari_mobilesam.data import synthetic_nuclei

    s = synthetic_nuclei(shape=(10, 1024, 1024), n_nuclei=300, radius_range=(5.0, 10.0),
                         z_radius_range=(2.0, 3.0), seed=1)
    lab, img = s.labels[5].astype(np.int32), s.image[5]
    n = int(lab.max())
    labels = np.block([[np.where(lab > 0, lab + n * (4 * i + j), 0) for j in range(4)] for i in range(4)])
    return labels, np.tile(img, (4, 4))


def test_4096_slice_every_nucleus_found_by_clicks_and_automatic_merge(big_nuclei):
    labels, image = big_nuclei
    pred = _oracle_tiled(labels, image, tile=1024, halo=128)
    ids = np.unique(labels)[1:]
    rng = np.random.default_rng(0)
    from scipy import ndimage as ndi

    centres = ndi.center_of_mass(np.ones_like(labels), labels, ids)
    for obj in rng.choice(ids, 40, replace=False):
        r, c = centres[int(np.searchsorted(ids, obj))]
        if labels[int(round(r)), int(round(c))] != obj:
            continue
        out = pred.predict(0, points=[(r, c)], labels=[1])
        np.testing.assert_array_equal(out.masks[out.best], labels == obj)

    # automatic mode on tiles: each tile segmented by the oracle (all objects of the tile window),
    # merged by centre: every object exactly once, whole
    def all_objects(tile_pred, z, _params):
        return tile_pred.gt[z]

    merged = segment_slice_tiled(pred, 0, None, segment=all_objects)
    assert merged.shape == labels.shape
    assert len(np.unique(merged)) - 1 == len(ids)
    # one-to-one: each merged id covers exactly one true object, completely
    pairs = np.unique(np.stack([merged[labels > 0], labels[labels > 0]]), axis=1)
    assert pairs.shape[1] == len(ids) and (pairs[0] > 0).all()


def test_merge_tile_labels_keeps_an_object_once():
    grid = TileGrid((600, 600), 400, 100)
    truth = _disks((600, 600), [(300, 300), (50, 550)], 40)
    pieces = [(t, truth[t.region]) for t in grid.tiles]
    merged = merge_tile_labels((600, 600), pieces)
    assert len(np.unique(merged)) == 3
    np.testing.assert_array_equal(merged > 0, truth > 0)


def test_real_model_on_a_tiled_slice_embeds_only_the_tiles_it_needs(engine_sam_test):
    """The real path (random tiny test model): tiles are embedded lazily and cached per tile, and a
    tile's low-res logits are used as a mask prompt only in that tile."""
    from napari_mobilesam.core.embeddings import EmbeddingCache
    from napari_mobilesam.core.predictor import SlicePredictor

    seen = []  # (tile index, whether a mask prompt reached it)

    class Recording(SlicePredictor):
        def predict_many(self, z, prompts, **kw):
            seen.extend((self.source.tile.index, p.mask_input is not None) for p in prompts)
            return super().predict_many(z, prompts, **kw)

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (2, 1500, 1500)).astype(np.uint8)
    cache = EmbeddingCache(engine_sam_test)
    pred = TiledPredictor(engine_sam_test, image, cache, tile=1024, halo=128,
                          tile_predictor=lambda view: Recording(engine_sam_test, view, cache))
    assert len(pred.grid) == 4
    out = pred.predict(1, points=[(100, 100)], labels=[1])
    assert out.masks.shape == (3, 1500, 1500) and out.low_res.shape == (3, 256, 256)
    computed = cache.stats.computed
    assert computed >= 1 and seen[0] == (0, False)
    seen.clear()
    again = pred.predict(1, points=[(120, 90)], labels=[1], mask_input=out.low_res[out.best])
    assert again.masks.shape == (3, 1500, 1500)
    assert seen[0] == (0, True), "the logits of tile 0 prompt tile 0"
    assert cache.stats.computed == computed, "the same tile is not embedded twice"
    seen.clear()
    pred.predict(1, points=[(1400, 1400)], labels=[1], mask_input=out.low_res[out.best])
    assert seen[0] == (3, False), "tile 0's logits are not a mask prompt for tile 3"
    with pytest.raises(InputError, match="logits"):
        pred.predict(1, points=[(5, 5)], labels=[1], return_logits=True)


def test_propagation_runs_on_a_tiled_predictor():
    """Propagation needs nothing but the predictor interface: tiled slices work unchanged."""
    from napari_mobilesam.volume.propagation import propagate

    shape = (5, 900, 900)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    labels = (((yy - 450) ** 2 + (xx - 450) ** 2) <= (120 - 10 * abs(zz - 2)) ** 2).astype(np.int32)
    image = labels.astype(np.uint16) * 1000

    def per_tile(view):
        rows, cols = view.tile.region
        return GroundTruthOracle(labels[:, rows, cols], image[:, rows, cols])

    pred = TiledPredictor(None, image, tile=512, halo=64, tile_predictor=per_tile)
    res = propagate(pred, {1: {2: {"points": [(450, 450)], "labels": [1]}}})
    np.testing.assert_array_equal(res.labels, labels)


def test_microsam_tile_layout_matches_the_fixture(reference_dir):
    import json

    cases = json.loads((reference_dir / "microsam" / "microsam_cases.json").read_text())["tiled"]
    grid = TileGrid.from_cores(tuple(cases["shape"]), cases["tile_shape"][0], cases["halo"][0])
    assert len(grid) == len(cases["tiles"])
    for ours, theirs in zip(grid.tiles, cases["tiles"]):
        (a, b), (c, d) = theirs["outer"]
        (e, f), (g, h) = theirs["inner"]
        assert ours.outer == (a, b, c, d) and ours.core == (e, f, g, h)



def test_predict_embedded_never_runs_the_encoder_and_converges_to_predict(engine_sam_test, monkeypatch):
    """What the widget does on the GUI thread: decode with the tiles embedded so far, embed the
    missing ones elsewhere, ask again; once none is missing the mask is ``predict``'s."""
    from napari_mobilesam.core import embeddings, tiles
    from napari_mobilesam.core.embeddings import EmbeddingCache

    monkeypatch.setattr(tiles, "_MAX_TILES_PER_OBJECT", 4)  # a few encoder runs (the random model's masks are large)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (1, 700, 700)).astype(np.uint8)
    encoded = []
    real = embeddings.compute_embedding
    monkeypatch.setattr(embeddings, "compute_embedding", lambda sam, rgb: encoded.append(rgb.shape) or real(sam, rgb))
    pred = TiledPredictor(engine_sam_test, image, EmbeddingCache(engine_sam_test), tile=256, halo=32)
    assert len(pred.grid) == 16
    first, missing = pred.predict_embedded(0, {"points": [(300, 300)], "labels": [1]})
    assert first is None and [t.index for t in missing] == [pred.grid.tile_at(300, 300).index]
    assert encoded == []
    rounds = 0
    while missing:
        pred.embed_tiles(0, missing)  # (the widget's worker)
        n = len(encoded)
        out, missing = pred.predict_embedded(0, {"points": [(300, 300)], "labels": [1]})
        assert len(encoded) == n, "predict_embedded ran the encoder"
        assert out.masks.shape == (3, 700, 700)
        rounds += 1
    assert rounds >= 2, "the random model's mask should run into neighbouring tiles"
    assert all(s[:2] == (256, 256) for s in encoded)  # tiles only, never the whole slice
    n = len(encoded)
    eager = pred.predict(0, points=[(300, 300)], labels=[1])
    assert len(encoded) == n, "every tile the object needs was embedded already"
    np.testing.assert_array_equal(out.masks, eager.masks)
    np.testing.assert_array_equal(out.iou, eager.iou)
