"""Tiled slices on a dask cluster: the workers cut slices larger than the tile into tiles, like
the local batch path, and give the same labels.

Workers run in threads of this process (``LocalCluster(processes=False)``), so the per-tile
predictors can be replaced by the ground-truth ORACLE (``GroundTruthOracle``, not a model) for the
exact checks; propagation uses the real engine with the tiny random ``vit_t_test`` model.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dask_client
from test_tiles import _disks

from napari_mobilesam.batch import propagate_stack, segment_stack, segment_stack_auto
from napari_mobilesam.core import tiles
from napari_mobilesam.io.prompts import prompts_from_arrays
from napari_mobilesam.testing import GroundTruthOracle
from napari_mobilesam.volume.automatic import AutoParams

MODEL = dict(model="vit_t_test", backend="eager")
TILING = dict(tile=512, halo=64)  # a 1200 x 1200 slice is 3 x 3 tiles


@pytest.fixture(scope="module")
def client():
    with dask_client(2, processes=False) as c:
        yield c


@pytest.fixture(scope="module")
def scene():
    """1200 x 1200: a large object straddling four tiles, one on a core border, one inside a tile."""
    shape = (1200, 1200)
    labels = _disks(shape, [(450, 450)], 160)
    labels[_disks(shape, [(448, 1000)], 40) > 0] = 2  # on the border of tile rows 0 and 1
    labels[_disks(shape, [(1000, 200)], 30) > 0] = 3
    image = (labels > 0).astype(np.uint16) * 1000 + 100
    return labels, image


@pytest.fixture
def oracle_tiles(monkeypatch, scene):
    """Every tile predictor (here and on the thread workers) is the ORACLE on that tile's window;
    returns the list of tiles it was asked for."""
    labels, image = scene
    real = tiles.SlicePredictor
    asked = []

    def per_tile(sam, view, cache=None):
        if not isinstance(view, tiles.TileView):
            return real(sam, view, cache)  # the whole-slice predictor TiledPredictor checks first
        asked.append(view.tile.index)
        rows, cols = view.tile.region
        return GroundTruthOracle(labels[None, rows, cols], image[None, rows, cols])

    monkeypatch.setattr(tiles, "SlicePredictor", per_tile)
    return asked


def test_prompts_on_a_cluster_are_answered_tile_by_tile(client, scene, oracle_tiles):
    labels, image = scene
    grid = tiles.TileGrid(image.shape, **TILING)
    assert grid.tile_at(448, 1000).core[0] == 448  # object 2's click lies on a core border
    prm = prompts_from_arrays(points=[(0, 400, 400), (0, 448, 1000), (0, 1000, 200)], labels=[1, 1, 1],
                              object_ids=[1, 2, 3])
    spread = segment_stack(image, prm, client=client, **TILING, **MODEL)
    np.testing.assert_array_equal(spread[0], labels)  # whole objects, merged across tiles
    assert len(set(oracle_tiles)) == len(grid)  # each worker session made its 3 x 3 tiles
    local = segment_stack(image, prm, **TILING, **MODEL)
    np.testing.assert_array_equal(spread, local)


def test_automatic_mode_on_a_cluster_equals_the_local_tiled_run(client, scene, oracle_tiles):
    labels, image = scene
    params = AutoParams(grid=8, min_area=20, max_area_fraction=0.5)
    local = segment_stack_auto(image, params=params, **TILING, **MODEL)
    spread = segment_stack_auto(image, params=params, client=client, **TILING, **MODEL)
    np.testing.assert_array_equal(spread, local)
    # objects within the halo of a core are found once and whole, across tile borders (object 2);
    # object 1 reaches 160 pixels past its core, more than the 64-pixel halo: it comes in pieces
    for obj in (2, 3):
        ids = np.unique(spread[0][labels == obj])
        assert len(ids) == 1 and ids[0] > 0, (obj, ids)
        np.testing.assert_array_equal(spread[0] == ids[0], labels == obj)
    assert len(np.unique(spread[0][labels == 1])) > 1


def test_propagation_with_a_cluster_embeds_the_prompted_tiles_on_the_workers(client, monkeypatch):
    """The real engine (tiny random model): the workers embed the tile holding the prompt on
    every slice; the labels equal the local tiled run's."""
    from napari_mobilesam.core import embeddings

    monkeypatch.setattr(tiles, "_MAX_TILES_PER_OBJECT", 2)
    rng = np.random.default_rng(4)
    image = rng.integers(0, 4000, (3, 600, 600)).astype(np.uint16)
    prm = prompts_from_arrays(points=[(1, 100, 100)], labels=[1], object_ids=[1])
    options = dict(tile=256, halo=32, min_score=0.0, min_overlap=0.0, area_ratio=(0.0, 1e9), **MODEL)
    here = []
    real = embeddings.compute_embedding

    def recording(sam, rgb):
        import threading

        here.append((threading.current_thread().name, rgb.shape[:2]))
        return real(sam, rgb)

    monkeypatch.setattr(embeddings, "compute_embedding", recording)
    spread = propagate_stack(image, prm, client=client, **options)
    on_workers = [shape for name, shape in here if "Dask" in name or "worker" in name.lower()]
    assert len(on_workers) >= 3 and set(on_workers) == {(256, 256)}, here  # tile 0 of each slice
    here.clear()
    local = propagate_stack(image, prm, **options)
    assert set(shape for _, shape in here) == {(256, 256)}  # tiled here too
    np.testing.assert_array_equal(spread, local)
