"""Big images through the batch API and the CLI: OME-Zarr in and out, tiled slices, resumed runs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from napari_mobilesam import cli
from napari_mobilesam.batch import segment_stack, segment_stack_auto
from napari_mobilesam.io.images import open_image
from napari_mobilesam.io.omezarr import open_ome_zarr
from napari_mobilesam.io.prompts import prompts_from_arrays

# The tiny random model, exact eager torch: fast, and needs no downloaded weights.
MODEL = ["--model", "vit_t_test", "--backend", "eager"]
LOOSE = ["--min-iou", "0", "--min-stability", "0", "--grid", "2", "--max-area-fraction", "0.6",
         "--max-points", "3"]


def write_ome_zarr(path, data):
    from ome_zarr.format import format_from_version
    from ome_zarr.writer import write_image

    fmt = format_from_version("0.5")
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_image(data, group, axes=["z", "y", "x"], fmt=fmt, scale_factors=[2],
                storage_options={"chunks": (1, 128, 128)})
    return path


@pytest.fixture(scope="module")
def image_zarr(tmp_path_factory):
    """3 slices of 300 x 256: 2 tiles of 256 (halo 32) a slice (the random test model only needs
    texture, not nuclei; each tile is one encoder pass, so the image is no bigger than that)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(2)
    image = (ndi.gaussian_filter(rng.random((3, 300, 256)), (0, 6, 6)) * 60000).astype(np.uint16)
    st = SimpleNamespace(image=image)
    return write_ome_zarr(tmp_path_factory.mktemp("big") / "image.zarr", image), st


AUTO = dict(model="vit_t_test", backend="eager", tile=256, halo=32,
            params=dict(min_iou=0, min_stability=0, grid=2, max_area_fraction=0.6, max_points=3))


@pytest.fixture(scope="module")
def tiled_auto(image_zarr):
    """The batch API's labels of the whole (tiled) input, in memory: the reference of the CLI run
    and of the resumed run, computed once."""
    from napari_mobilesam.core.tiles import TileGrid

    src, st = image_zarr
    assert len(TileGrid(st.image.shape[1:], 256, 32)) == 2
    data, _ = open_image(src)
    return segment_stack_auto(data, **AUTO)


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_cli_auto_ome_zarr_in_and_out_tiled(tmp_path, image_zarr, tiled_auto):
    src, st = image_zarr
    out = tmp_path / "labels.zarr"
    assert run("auto", src, "-o", out, *MODEL, *LOOSE, "--tile", "256", "--halo", "32", "--no-progress") == 0
    labels, meta = open_ome_zarr(out)
    assert labels.shape == st.image.shape and meta.levels[0].shape == st.image.shape
    # the same as the batch API on the same (tiled) input, in memory
    np.testing.assert_array_equal(np.asarray(labels), tiled_auto)
    # an existing output is never replaced without --overwrite; the input is never the output
    assert run("auto", src, "-o", out, *MODEL, "--no-progress") == cli.EXIT_OUTPUT
    assert run("auto", src, "-o", src, *MODEL, "--overwrite", "--no-progress") == cli.EXIT_OUTPUT
    assert open_ome_zarr(src)[0].shape == st.image.shape


def test_cli_level_and_bad_tile_settings(tmp_path, image_zarr, capsys):
    src, st = image_zarr
    out = tmp_path / "half.tif"
    assert run("auto", src, "-o", out, *MODEL, *LOOSE, "--level", "1", "--no-progress") == 0
    import tifffile

    assert tifffile.imread(out).shape == (st.image.shape[0], st.image.shape[1] // 2, st.image.shape[2] // 2)
    assert run("auto", src, "-o", tmp_path / "x.tif", *MODEL, "--level", "7") == cli.EXIT_INPUT
    assert "level" in capsys.readouterr().err
    assert run("auto", src, "-o", tmp_path / "y.tif", *MODEL, "--tile", "abc") == cli.EXIT_INPUT
    assert "--tile" in capsys.readouterr().err
    assert run("auto", src, "-o", tmp_path / "y.tif", *MODEL, "--tile", "32") == cli.EXIT_INPUT
    assert run("auto", src, "-o", tmp_path / "y.tif", *MODEL, "--tile", "256", "--halo", "200") == cli.EXIT_INPUT
    assert "halo" in capsys.readouterr().err


class Interrupted(Exception):
    pass


def test_interrupted_auto_run_resumes_to_the_same_labels(tmp_path, image_zarr, tiled_auto):
    """Stopped after 2 of the 3 slices, resumed: the labels of an uninterrupted run."""
    src, _ = image_zarr
    data, meta = open_image(src)
    opts = dict(AUTO, metadata=meta)
    whole = tiled_auto
    assert whole[2].any()  # the slice the resumed run computes has objects

    def stop_after_two(done, total):
        if done >= 2:
            raise Interrupted

    out = tmp_path / "labels.zarr"
    with pytest.raises(Interrupted):
        segment_stack_auto(data, out=out, progress=stop_after_two, **opts)
    assert not out.exists(), "an unfinished output is never in the final place"
    with pytest.raises(Exception, match="partial|resume|exists"):
        segment_stack_auto(data, out=out, **opts)  # a fresh run does not silently drop the partial
    segment_stack_auto(data, out=out, resume=True, **opts)
    np.testing.assert_array_equal(np.asarray(open_ome_zarr(out)[0]), whole)


def test_segment_stack_prompts_on_a_tiled_2d_image_and_resume(tmp_path):
    """2 slices of 300 x 420, tiles of 256 (2 x 2 a slice: each an encoder pass); objects in
    opposite corner tiles of slice 0 and in the middle of slice 1."""
    from napari_mobilesam.core.tiles import TileGrid

    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, (2, 300, 420)).astype(np.uint16)
    grid = TileGrid(image.shape[1:], 256, 32)
    pts = [(0, 40, 40), (0, 270, 390), (1, 150, 210)]
    assert grid.grid_shape == (2, 2) and {grid.tile_at(*p[1:]).index for p in pts[:2]} == {0, 3}
    prm = prompts_from_arrays(pts, object_ids=[1, 2, 3])
    lab = segment_stack(image, prm, model="vit_t_test", backend="eager", tile=256, halo=32)
    assert lab.shape == image.shape
    assert {1, 2} <= set(np.unique(lab[0])) and 3 in np.unique(lab[1])
    out = tmp_path / "p.zarr"
    segment_stack(image, prm, model="vit_t_test", backend="eager", tile=256, halo=32, out=out)
    np.testing.assert_array_equal(np.asarray(open_ome_zarr(out)[0]), lab)
    with pytest.raises(Exception, match="OME-Zarr"):
        segment_stack(image, prm, model="vit_t_test", backend="eager", out=tmp_path / "p.tif", resume=True)
