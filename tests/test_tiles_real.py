"""A 4096 × 4096 slice of small nuclei through the REAL MobileSAM architecture, tiled.

The model is ``vit_t`` with the parity fixture's random weights (the real weights cannot be
downloaded here), so masks are not meaningful: its decoder's logits have nearly one sign and the
best mask covers its whole tile. What is checked is the path: tiles seen at full resolution,
prompts on a tile border answered from either side with aligned logits, masks merged across
tiles in whole-slice coordinates, and memory bounded by the cache budget (counted in tiles
embedded). Only four tiles of the 25 are embedded (about 1 s each alone).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_tiles import big_nuclei  # noqa: F401  (the fixture: the sample generator's nuclei, 4 × 4)

from napari_mobilesam.core.tiles import TiledPredictor, TileGrid

TILE_BYTES = 256 * 64 * 64 * 2  # one tile's embedding in the cache (float16)


@pytest.fixture
def encoder_inputs(monkeypatch):
    """The (h, w) of every image the encoder sees."""
    from napari_mobilesam.core import embeddings

    seen: list[tuple[int, int]] = []
    real = embeddings.compute_embedding

    def recording(sam, rgb):
        seen.append(tuple(rgb.shape[:2]))
        return real(sam, rgb)

    monkeypatch.setattr(embeddings, "compute_embedding", recording)
    return seen


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_4096_nuclei_slice_tiled_through_the_real_encoder(big_nuclei, engine_sam_reference,  # noqa: F811
                                                          encoder_inputs, monkeypatch):
    from napari_mobilesam.core import tiles
    from napari_mobilesam.core.embeddings import EmbeddingCache

    monkeypatch.setattr(tiles, "_MAX_TILES_PER_OBJECT", 2)  # an object is followed into one more tile
    labels, image = big_nuclei
    assert image.shape == (4096, 4096)
    cache = EmbeddingCache(engine_sam_reference, max_bytes=2 * TILE_BYTES)  # room for two tiles
    pred = TiledPredictor(engine_sam_reference, image, cache)  # 1024-pixel tiles, 128-pixel halo
    grid = pred.grid
    assert len(grid) == len(TileGrid((4096, 4096))) == 25
    t0, t1 = grid.tiles[0], grid.tiles[1]
    border = t0.core[3]  # the column where tile 1's core starts (896)
    assert t1.core[2] == border and t1.outer[2] < border < t0.outer[3]
    # a small nucleus crossing that border, prompted from each side of it
    obj = next(o for o in np.unique(labels[100:800, border - 1])[1:] if (labels[100:800, border] == o).any())
    rows = np.flatnonzero((labels[:, border - 1] == obj) & (labels[:, border] == obj))
    r = float(rows[len(rows) // 2])
    left = pred.predict(0, points=[(r, border - 1.0)], labels=[1])  # answered in tile 0
    right = pred.predict(0, points=[(r, float(border))], labels=[1])  # answered in tile 1
    for out in (left, right):
        assert out.masks.shape == (3, 4096, 4096) and out.low_res.shape == (3, 256, 256)
    # the encoder saw tiles 0 and 1 at full resolution, once each (never the 4096² slice)
    assert encoder_inputs == [(1024, 1024), (1024, 1024)]
    assert cache.stats.computed == 2
    # left: tile 0's own answer, placed at the slice's top-left, then merged with tile 1's piece
    direct = pred.tile_predictor(t0).predict(0, points=[(r, border - 1.0)], labels=[1])
    win = t0.region
    for k in range(3):
        if k == left.best:
            assert left.masks[k][win][direct.masks[k]].all()  # tile 0's mask is kept whole
        else:
            np.testing.assert_array_equal(left.masks[k][win], direct.masks[k])
        assert not left.masks[k][t0.outer[1]:].any()  # nothing below tile 0's window...
    merged = left.masks[left.best]
    assert merged[:, t0.outer[3]:t1.outer[3]].any(), "the mask was not merged into tile 1"
    assert not merged[:, t1.outer[3]:].any()  # ...and nothing beyond the two tiles (max 2)
    np.testing.assert_array_equal(left.low_res, direct.low_res)  # logits stay in the tile's frame
    # the same pixels seen from both tiles give the same logits within tolerance: in the overlap
    # of the two windows (columns 768-1024: tile 0's low-res columns 192-256 = tile 1's 0-64)
    # they correlate (0.92-0.97 measured), and not when one window is off by 4 pixels (one
    # low-res pixel: the random model's logits have a 16-pixel pattern, so this is what tells)
    lo = (t1.outer[2] - t0.outer[2]) // 4
    for k in range(3):
        a, b = left.low_res[k][:, lo:], right.low_res[k][:, : 256 - lo]
        aligned, shifted = _corr(a, b), _corr(a[:, 1:], b[:, :-1])
        assert aligned > 0.85 and shifted < aligned - 0.3, (k, aligned, shifted)
    # memory: the cache never holds more than its budget; a click far away embeds its tile (and
    # the one the mask may run into) and evicts the oldest
    assert cache.stats.bytes <= 2 * TILE_BYTES
    far = pred.predict(0, points=[(3900.0, 3900.0)], labels=[1])
    assert far.masks[far.best][3900, 3900]
    assert not far.masks[far.best][: grid.tiles[-1].outer[0] - 1024].any()  # two tiles at most
    stats = cache.stats
    assert stats.computed in (3, 4) and len(encoder_inputs) == stats.computed
    assert set(encoder_inputs) == {(1024, 1024)}
    assert stats.entries == 2 and stats.bytes <= 2 * TILE_BYTES and stats.evictions == stats.computed - 2
