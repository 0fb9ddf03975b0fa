"""Block-wise AIS of tiled slices (``volume/ais_blocks.py``) against micro-sam's stitched way.

The per-tile maps here come from ``WindowFakeDecoder`` (NOT a decoder): the window of stored
whole-slice maps, with everything outside the tile's core replaced by noise, as a tile's own
decoding of its halo is not what the neighbouring tile's core holds. The stitched path
(:func:`instances_from_maps` of the whole maps) is the reference. The real decoder's case is
``test_microsam.py::test_block_wise_tiled_ais_agrees_with_stitched``; memory is measured in
``test_bigimage_memory.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_microsam import MAPS, n_instances, same_assignment

from napari_mobilesam.core.tiles import TileGrid
from napari_mobilesam.errors import InputError
from napari_mobilesam.volume.ais_blocks import instances_by_blocks, stitched_windows
from napari_mobilesam.volume.instance import AISParams, instances_from_maps


class WindowFakeDecoder:
    """NOT a decoder: ``tile -> (3, h, w)`` maps of the tile's window cut from ``maps``, noise
    outside the tile's core. Records the tiles it was asked for."""

    def __init__(self, maps: np.ndarray, seed: int = 0):
        self.maps = np.asarray(maps, np.float32)
        self.rng = np.random.default_rng(seed)
        self.calls: list[int] = []

    def __call__(self, tile) -> np.ndarray:
        self.calls.append(tile.index)
        win = self.rng.random((3, *tile.shape), dtype=np.float32)
        r0, r1, c0, c1 = tile.core
        o0, _, p0, _ = tile.outer
        win[:, r0 - o0 : r1 - o0, c0 - p0 : c1 - p0] = self.maps[:, r0:r1, c0:c1]
        return win


def maps_of_disks(shape, disks) -> np.ndarray:
    """(3, H, W) decoder-like maps of disks ``(row, col, radius)``: foreground 1 inside, centre
    and boundary distances 0 at a disk's centre and 1 at its edge (1 outside), as micro-sam's
    training targets (normalised per object)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    fg = np.zeros(shape, np.float32)
    dist = np.ones(shape, np.float32)
    for r, c, rad in disks:
        d = np.sqrt((yy - r) ** 2 + (xx - c) ** 2) / rad
        inside = d <= 1
        fg[inside] = 1
        dist[inside] = np.minimum(dist[inside], d[inside])
    return np.stack([fg, dist, dist])


@pytest.fixture(scope="module")
def expected(msdir):
    return dict(np.load(msdir / "microsam_expected.npz"))


def test_windows_are_the_stitched_maps_and_each_tile_is_decoded_once():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 300, 700), dtype=np.float32)
    for grid in (TileGrid.from_cores((300, 700), 128, 32), TileGrid((300, 700), 160, 40)):
        fake = WindowFakeDecoder(maps)
        seen = []
        for tile, win in stitched_windows(grid, fake):
            np.testing.assert_allclose(win, maps[(slice(None), *tile.region)], atol=1 / 65535)
            seen.append(tile.index)
        assert sorted(seen) == sorted(fake.calls) == list(range(len(grid)))


def test_an_object_across_four_cores_is_one_instance():
    """A disk centred on the corner of four cores, and disks along the core borders: the same
    objects as the stitched post-processing, each once and whole."""
    shape = (320, 320)
    disks = [(128, 128, 40), (60, 128, 14), (128, 250, 20), (250, 250, 12), (40, 40, 10)]
    maps = maps_of_disks(shape, disks)
    grid = TileGrid.from_cores(shape, 128, 48)
    corner = [grid.tile_at(r, c).index for r, c in ((100, 100), (100, 150), (150, 100), (150, 150))]
    assert len(set(corner)) == 4
    labels = instances_by_blocks(shape, grid, WindowFakeDecoder(maps))
    stitched = instances_from_maps(*maps)
    assert labels.dtype == np.int32
    assert n_instances(labels) == n_instances(stitched) == len(disks)
    assert same_assignment(labels, stitched) == 1.0
    big = labels[128, 128]
    assert big > 0 and np.array_equal(labels == big, stitched == stitched[128, 128])


def test_blocks_agree_with_stitched_on_realistic_maps(expected):
    """The fixture's post-processing maps (targets micro-sam trains on, with noise; 30 nuclei)
    in 12 and 20 tiles: label for label the stitched result."""
    maps = np.stack([expected["pp/" + n] for n in MAPS])
    stitched = instances_from_maps(*maps)
    for core, halo in ((128, 32), (96, 16)):
        grid = TileGrid.from_cores(maps.shape[1:], core, halo)
        labels = instances_by_blocks(maps.shape[1:], grid, WindowFakeDecoder(maps))
        assert n_instances(labels) == n_instances(stitched) == 30
        assert same_assignment(labels, stitched) >= 0.9999


def test_blocks_agree_with_stitched_on_the_fixtures_tiled_maps(expected):
    """micro-sam's stitched maps of the fixture's 1100 x 900 tiled image (random weights: blobs
    of up to 26 000 pixels, larger than the halo) in micro-sam's tiles (512, halo 64): 99.96 %
    same assignment and one instance more were measured (a 15 000-pixel blob reaches 83 pixels
    past a core, beyond the halo); micro-sam's own block-wise post-processing gives 99.98 %."""
    maps = np.stack([expected[f"tiled/{n}_u16"].astype(np.float32) / 65535 for n in MAPS])
    grid = TileGrid.from_cores(maps.shape[1:], 512, 64)
    labels = instances_by_blocks(maps.shape[1:], grid, WindowFakeDecoder(maps))
    want = expected["tiled/ais_global"]
    assert abs(n_instances(labels) - n_instances(want)) <= max(1, round(0.005 * n_instances(want)))
    assert same_assignment(labels, want) >= 0.999
    assert same_assignment(want, labels) >= 0.999


def test_min_size_is_applied_to_what_is_written():
    shape = (256, 256)
    maps = maps_of_disks(shape, [(128, 128, 30), (40, 200, 4), (200, 40, 5)])
    grid = TileGrid.from_cores(shape, 128, 40)
    params = AISParams(min_size=120)
    labels = instances_by_blocks(shape, grid, WindowFakeDecoder(maps), params)
    want = instances_from_maps(*maps, params)
    assert n_instances(labels) == n_instances(want) == 1
    assert same_assignment(labels, want) == 1.0


def test_halo_must_cover_the_smoothing():
    maps = maps_of_disks((256, 256), [(64, 64, 20)])  # inside one core
    grid = TileGrid.from_cores((256, 256), 128, 4)
    with pytest.raises(InputError, match="halo of at least 5"):
        instances_by_blocks((256, 256), grid, WindowFakeDecoder(maps))
    # smoothing off: no halo is needed for it
    labels = instances_by_blocks((256, 256), grid, WindowFakeDecoder(maps),
                                 AISParams(foreground_smoothing=0, distance_smoothing=0))
    assert n_instances(labels) == 1
    with pytest.raises(InputError, match="grid is for"):
        instances_by_blocks((200, 256), grid, WindowFakeDecoder(maps))


def test_tiling_is_chosen_by_size_or_forced():
    p = AISParams()
    assert p.tiling_for((2048, 2048)) == "stitched" and p.tiling_for((2048, 2049)) == "blocks"
    assert AISParams(stitch_max_pixels=100).tiling_for((10, 11)) == "blocks"
    assert AISParams(tiling="stitched").tiling_for((10**5, 10**5)) == "stitched"
    assert AISParams(tiling="blocks").tiling_for((8, 8)) == "blocks"
    with pytest.raises(InputError, match="tiling"):
        AISParams(tiling="tiles")
    with pytest.raises(InputError, match="stitch_max_pixels"):
        AISParams(stitch_max_pixels=-1)


def test_segment_slice_ais_takes_the_chosen_path():
    """Through the fake network of ``fake_ais.py`` (NOT a model): stitched labels are uint64
    (micro-sam's), block-wise int32; both find the same bright blobs."""
    from fake_ais import fake_ais_model

    from napari_mobilesam.volume.ais import segment_slice_ais

    sam = fake_ais_model()
    yy, xx = np.mgrid[:300, :300]
    image = np.full((300, 300), 100, np.uint16)
    for r, c in ((70, 70), (150, 150), (230, 80), (80, 230)):
        image[(yy - r) ** 2 + (xx - c) ** 2 <= 30**2] = 2000
    grid = TileGrid.from_cores(image.shape, 160, 48)
    stitched = segment_slice_ais(sam, image, AISParams(tiling="stitched"), grid=grid)
    blocks = segment_slice_ais(sam, image, AISParams(tiling="blocks"), grid=grid)
    auto = segment_slice_ais(sam, image, AISParams(stitch_max_pixels=300 * 299), grid=grid)
    assert stitched.dtype == np.uint64 and blocks.dtype == np.int32
    np.testing.assert_array_equal(auto, blocks)
    assert n_instances(stitched) >= 4
    assert n_instances(blocks) == n_instances(stitched)
    assert same_assignment(blocks, stitched) >= 0.999


class ReadRecorder:
    """A lazy 2D image (like a zarr array) that records the shape of every read."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.dtype, self.ndim = a, a.shape, a.dtype, a.ndim
        self.reads: list[tuple[int, ...]] = []

    def __getitem__(self, key):
        out = self.a[key]
        self.reads.append(np.shape(out))
        return out


def test_a_tiled_session_reads_one_window_at_a_time():
    """``Session.segment_automatically`` on a tiled slice above ``stitch_max_pixels``: block-wise
    AIS reads tile windows only (never the whole slice) and gives ``segment_slice_ais``'s labels.
    Through the fake network of ``fake_ais.py`` (NOT a model)."""
    from fake_ais import fake_ais_model

    from napari_mobilesam.core.session import Session
    from napari_mobilesam.volume.ais import segment_slice_ais

    sam = fake_ais_model()
    yy, xx = np.mgrid[:320, :320]
    image = np.full((320, 320), 100, np.uint16)
    for r, c in ((60, 60), (160, 160), (250, 90), (90, 250), (128, 128)):
        image[(yy - r) ** 2 + (xx - c) ** 2 <= 22**2] = 2000
    lazy = ReadRecorder(image)
    session = Session(sam, lazy, cache_dir=None, tile=128, halo=32)
    assert session.tiled
    params = AISParams(stitch_max_pixels=256 * 256)
    lazy.reads.clear()
    labels = session.segment_automatically(0, ais_params=params)
    assert lazy.reads and max(h * w for h, w in lazy.reads) <= 128 * 128
    assert labels.dtype == np.int32 and n_instances(labels) >= 4
    want = segment_slice_ais(sam, image, params, grid=session.predictor.grid)
    np.testing.assert_array_equal(labels, want)
    lazy.reads.clear()
    session.segment_automatically(0, ais_params=AISParams())  # 320² is below the default: whole
    assert max(h * w for h, w in lazy.reads) == 320 * 320


def test_batch_auto_passes_the_tiling_on():
    """``segment_stack_auto(..., ais_params=AISParams(tiling="blocks"))`` on tiled slices: windows
    only, the block-wise labels (stitched through z). Fake network (NOT a model)."""
    from fake_ais import fake_ais_model

    from napari_mobilesam import batch
    from napari_mobilesam.core.tiles import TileGrid
    from napari_mobilesam.volume.ais import segment_slice_ais

    sam = fake_ais_model()
    yy, xx = np.mgrid[:320, :320]
    image = np.full((1, 320, 320), 100, np.uint16)
    for r, c in ((60, 60), (160, 160), (250, 90), (90, 250)):
        image[0][(yy - r) ** 2 + (xx - c) ** 2 <= 22**2] = 2000
    lazy = ReadRecorder(image)
    params = AISParams(tiling="blocks")
    out = batch.segment_stack_auto(lazy, model=sam, mode="ais", tile=128, halo=32, ais_params=params,
                                   progress=False)
    ais_reads = [s for s in lazy.reads if len(s) == 2]  # (rows, cols) windows of slice 0
    assert ais_reads and max(h * w for h, w in ais_reads) <= 128 * 128
    want = segment_slice_ais(sam, image[0], params, grid=TileGrid((320, 320), 128, 32))
    assert n_instances(out[0]) == n_instances(want) >= 4
    assert same_assignment(out[0], want) == 1.0


def test_merge_keeps_an_object_seen_differently_by_two_tiles_once():
    """Two tiles (cores: columns 0-50 and 50-100, windows 0-70 and 30-100) that see an object
    across their border a little differently: with ``min_new``/``extend``/``rescue`` it is one
    object, its part in the second core included; with the plain rule it is doubled or lost."""
    from napari_mobilesam.core.tiles import Tile
    from napari_mobilesam.volume.tiled import merge_tile_labels

    a = Tile(0, (0, 0), (0, 20, 0, 70), (0, 20, 0, 50))
    b = Tile(1, (0, 1), (0, 20, 30, 100), (0, 20, 50, 100))

    def pieces(cols_a, cols_b):
        la = np.zeros(a.shape, np.uint64)
        la[5:15, cols_a[0] : cols_a[1]] = 1
        lb = np.zeros(b.shape, np.uint64)
        lb[5:15, cols_b[0] - 30 : cols_b[1] - 30] = 7
        return [(a, la), (b, lb)]

    opts = dict(min_new=0.5, rescue=True, extend=True)
    # both copies have their centre in their own core: one object, columns 38-62
    two = pieces((38, 60), (42, 62))
    assert merge_tile_labels((20, 100), two).max() == 2  # plain rule: a second object
    out = merge_tile_labels((20, 100), two, **opts)
    assert out.max() == 1 and np.array_equal(np.flatnonzero(out[10]), np.arange(38, 62))
    # each copy has its centre in the other's core: kept by the later tile
    none = pieces((42, 60), (38, 60))
    assert merge_tile_labels((20, 100), none).max() == 0  # plain rule: lost
    out = merge_tile_labels((20, 100), none, **opts)
    assert out.max() == 1 and np.array_equal(np.flatnonzero(out[10]), np.arange(38, 60))
