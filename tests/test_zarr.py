"""OME-Zarr in and out: lazy multiscale reading, labels written slice by slice, crash safety.

Images are written with ome-zarr-py (the library users write them with); labels are read back
with our reader and with napari's OME-Zarr reader plugin (napari-ome-zarr), through npe2 as napari
does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")

from napari_mobilesam.core.source import SliceSource
from napari_mobilesam.errors import InputError, OutputError
from napari_mobilesam.io.omezarr import is_ome_zarr, list_levels, open_ome_zarr
from napari_mobilesam.io.omezarr_write import (
    PROGRESS_FILE,
    OmeZarrLabelsWriter,
    partial_path,
)
from napari_mobilesam.io.stacks import LabelsTiffWriter, read_stack_metadata

VERSIONS = ("0.4", "0.5")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _axes(names, unit="micrometer"):
    kinds = {"t": "time", "c": "channel"}
    out = []
    for n in names:
        d = {"name": n, "type": kinds.get(n, "space")}
        if d["type"] == "space":
            d["unit"] = unit
        out.append(d)
    return out


def write_image(path, data, *, axes="zyx", version="0.5", scale=None, scale_factors=(2, 4), chunks=None):
    """An OME-Zarr image written by ome-zarr-py, as a user's file would be."""
    from ome_zarr.format import format_from_version
    from ome_zarr.writer import write_image as ome_write

    fmt = format_from_version(version)
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    chunks = chunks or tuple(1 if a in "tcz" else 32 for a in axes)
    ome_write(data, group, axes=_axes(axes), fmt=fmt, scale=scale, scale_factors=list(scale_factors),
              storage_options={"chunks": chunks})
    return Path(path)


def _image(z=5, h=64, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 4000, (z, h, w), dtype=np.uint16)


def _labels(z=5, h=64, w=80):
    lab = np.zeros((z, h, w), np.uint32)
    for i in range(z):
        lab[i, 4 + i : 30 + i, 10:40] = 1 + i
        lab[i, 40:60, 50:75] = 100 + i
    return lab


def _napari_read(path):
    """Layers as napari's OME-Zarr reader plugin gives them: [(data levels, kwargs, layer type)]."""
    pytest.importorskip("napari_ome_zarr")
    import npe2

    pm = npe2.PluginManager.instance()
    if "napari-ome-zarr" not in pm._manifests:
        pm.discover()  # what napari does at start
    return npe2.read([str(path)], stack=False, plugin_name="napari-ome-zarr")


# -- reading -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_levels_axes_and_scale(tmp_path, version):
    img = _image()
    p = write_image(tmp_path / "img.zarr", img, version=version, scale={"z": 2.0, "y": 0.5, "x": 0.5})
    levels = list_levels(p)
    assert [lv.shape for lv in levels] == [(5, 64, 80), (5, 32, 40), (5, 16, 20)]
    assert [lv.scale for lv in levels] == [(2.0, 0.5, 0.5), (2.0, 1.0, 1.0), (2.0, 2.0, 2.0)]
    assert is_ome_zarr(p)

    data, meta = open_ome_zarr(p, level=1)
    assert type(data).__module__.startswith("dask")
    assert data.shape == (5, 32, 40) and data.dtype == np.uint16
    assert meta.axes == ("z", "y", "x") and meta.channel_axis is None
    assert meta.ngff_version == version and meta.level == 1
    assert meta.voxel_size == (2.0, 1.0, 1.0)
    # the same StackMetadata a TIFF gives: (z, row, col) voxel size and an ImageJ unit
    assert meta.scale == pytest.approx((2.0, 1.0, 1.0)) and meta.unit == "micron"
    full, _ = open_ome_zarr(p, level=0, lazy=False)
    assert isinstance(full, np.ndarray) and np.array_equal(full, img)


def test_bioformats2raw_folder_opens_series_0(tmp_path):
    img = _image(2)
    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    write_image(tmp_path / "b2r.zarr" / "0", img, version="0.4")
    data, meta = open_ome_zarr(tmp_path / "b2r.zarr")
    assert meta.store.endswith("0") and np.array_equal(np.asarray(data), img)


def test_channels_time_and_singleton_axes(tmp_path):
    rng = np.random.default_rng(1)
    czyx = rng.integers(0, 255, (2, 4, 32, 32), dtype=np.uint8)
    p = write_image(tmp_path / "c.zarr", czyx, axes="czyx", scale_factors=(2,))
    data, meta = open_ome_zarr(p)
    assert meta.axes == ("c", "z", "y", "x") and meta.channel_axis == 0
    src = SliceSource(data, channel_axis=meta.channel_axis)
    assert src.n_slices == 4 and src.rgb(2).shape == (32, 32, 3)

    tczyx = rng.integers(0, 255, (3, 1, 4, 32, 32), dtype=np.uint8)
    p = write_image(tmp_path / "t.zarr", tczyx, axes="tczyx", scale_factors=(2,))
    with pytest.raises(InputError, match="timepoint="):
        open_ome_zarr(p)
    data, meta = open_ome_zarr(p, timepoint=2)
    assert meta.axes == ("z", "y", "x") and np.array_equal(np.asarray(data), tczyx[2, 0])
    with pytest.raises(InputError, match="out of range"):
        open_ome_zarr(p, timepoint=3)

    tyx = rng.integers(0, 255, (6, 32, 32), dtype=np.uint8)
    p = write_image(tmp_path / "tyx.zarr", tyx, axes="tyx", scale_factors=(2,))
    data, meta = open_ome_zarr(p)  # a time-lapse is segmented like a stack
    assert meta.axes == ("t", "y", "x") and data.shape == (6, 32, 32)


def _chunk_files(level_dir: Path, z_index_pos: int):
    """{chunk file: its z chunk index} for the chunks of one zarr array (v2 or v3 layout)."""
    out = {}
    for f in level_dir.rglob("*"):
        if f.is_file() and f.name not in ("zarr.json", ".zarray", ".zattrs"):
            parts = f.relative_to(level_dir).parts
            parts = parts[1:] if parts[0] == "c" else parts
            out[f] = int(parts[z_index_pos])
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_reading_is_lazy_and_chunked(tmp_path, version):
    """Opening reads no chunk and a slice reads only its own chunks: every other chunk of level 0
    is overwritten with garbage, and slice 3 still reads right (the others fail to decode)."""
    img = _image()
    p = write_image(tmp_path / "img.zarr", img, version=version)
    chunks = _chunk_files(p / "s0", 0)
    assert len(set(chunks.values())) == 5
    for f, z in chunks.items():
        if z != 3:
            f.write_bytes(b"not a compressed chunk" * 3)
    data, _ = open_ome_zarr(p)
    assert data.chunksize[0] == 1
    assert np.array_equal(data[3].compute(), img[3])
    src = SliceSource(data, normalize="slice")
    assert src.rgb(3).shape == (64, 80, 3)
    with pytest.raises(RuntimeError):  # the codec cannot decode a garbage chunk
        data[2].compute()


def test_reader_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_ome_zarr(tmp_path / "missing.zarr")
    f = tmp_path / "image.tif"
    f.write_bytes(b"II*\x00")
    with pytest.raises(InputError, match="is a file, not a Zarr store"):
        open_ome_zarr(f)
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match="not a Zarr store"):
        open_ome_zarr(tmp_path / "empty.zarr")
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 16, 16), dtype="u1")
    with pytest.raises(InputError, match="plain Zarr array without OME-NGFF metadata"):
        open_ome_zarr(tmp_path / "plain.zarr")
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w").create_array("0", shape=(16, 16), dtype="u1")
    with pytest.raises(InputError, match="without OME-NGFF 'multiscales' metadata"):
        open_ome_zarr(tmp_path / "group.zarr")
    assert not is_ome_zarr(tmp_path / "group.zarr")
    p = write_image(tmp_path / "img.zarr", _image())
    with pytest.raises(InputError, match=r"has no level 3: it has 3 level\(s\) \(0: \(5, 64, 80\)"):
        open_ome_zarr(p, level=3)
    with pytest.raises(InputError, match="no time axis"):
        open_ome_zarr(p, timepoint=0)


# -- napari's reader and SliceSource -----------------------------------------------------------
def test_slicesource_accepts_napari_ome_zarr_layers(tmp_path):
    """napari's OME-Zarr reader gives lists of dask arrays (one per level): SliceSource takes the
    list (full resolution), any single level, and a napari multiscale Image layer's data."""
    img = _image()
    p = write_image(tmp_path / "img.zarr", img)
    (levels, kwargs, kind), = _napari_read(p)
    assert kind == "image" and len(levels) == 3
    assert all(type(lv).__module__.startswith("dask") for lv in levels)
    ref = SliceSource(img)
    src = SliceSource(levels)
    assert src.shape == (5, 64, 80) and np.array_equal(src.rgb(2), ref.rgb(2))
    low = SliceSource(levels[1])
    assert low.slice_shape == (32, 40)
    assert np.array_equal(low.raw(4), np.asarray(levels[1][4]))

    from napari.layers import Image

    layer = Image(levels, multiscale=True, **{k: v for k, v in kwargs.items() if k in ("scale", "name")})
    assert layer.multiscale
    src = SliceSource(layer.data)
    assert src.shape == (5, 64, 80) and np.array_equal(src.rgb(1), ref.rgb(1))


def test_list_of_equal_slices_is_still_a_stack():
    parts = [np.full((16, 16), i, np.uint8) for i in range(3)]
    assert SliceSource(parts).n_slices == 3


# -- writing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_standalone_round_trip(tmp_path, version):
    lab = _labels()
    out = tmp_path / "out" / "labels.zarr"
    meta = read_stack_metadata(_tiff_with_resolution(tmp_path))  # TIFF metadata carries over
    with OmeZarrLabelsWriter(out, lab.shape, metadata=meta, n_levels=3, ngff_version=version) as w:
        for z in (4, 0, 2, 1, 3):  # any order
            w.put(z, lab[z])
        assert not out.exists() and partial_path(out).exists()
    assert out.exists() and not partial_path(out).exists()
    assert not (out / PROGRESS_FILE).exists()
    assert "napari_mobilesam" not in zarr.open_group(str(out), mode="r").attrs

    data, m = open_ome_zarr(out)
    assert np.array_equal(np.asarray(data), lab) and m.ngff_version == version
    assert m.voxel_size == pytest.approx((3.0, 0.25, 0.25)) and m.unit == "micron"
    assert [lv.shape for lv in m.levels] == [(5, 64, 80), (5, 32, 40), (5, 16, 20)]
    lvl2, _ = open_ome_zarr(out, level=2)
    assert set(np.unique(np.asarray(lvl2))) <= set(np.unique(lab))  # nearest: no new ids
    assert np.array_equal(np.asarray(lvl2), lab[:, ::4, ::4])

    layers = _napari_read(out)
    kinds = [k for _, _, k in layers]
    assert kinds == ["labels"]
    levels, kwargs, _ = layers[0]
    assert len(levels) == 3 and np.array_equal(np.asarray(levels[0]), lab)
    assert list(kwargs["scale"]) == pytest.approx([3.0, 0.25, 0.25])


def _tiff_with_resolution(tmp_path):
    import tifffile

    p = tmp_path / "in.tif"
    tifffile.imwrite(p, np.zeros((5, 64, 80), np.uint8), imagej=True, resolution=(4.0, 4.0),
                     metadata={"spacing": 3.0, "unit": "micron", "axes": "ZYX"})
    return p


@pytest.mark.parametrize("version", VERSIONS)
def test_labels_beside_image_read_by_napari(tmp_path, version):
    img = _image()
    p = write_image(tmp_path / "img.zarr", img, version=version, scale={"z": 2.0, "y": 0.5, "x": 0.5})
    lab = _labels(5, 32, 40)
    with OmeZarrLabelsWriter.beside(p, "cells", level=1) as w:  # segmented at level 1
        assert w.shape == (5, 32, 40) and w.n_levels == 2 and w.fmt.version == version
        for z in w.pending():
            w.put(z, lab[z])
    data, meta = open_ome_zarr(p / "labels" / "cells")
    assert np.array_equal(np.asarray(data), lab)
    assert meta.voxel_size == (2.0, 1.0, 1.0)  # the image's level-1 pixel size
    layers = _napari_read(p)
    assert [k for _, _, k in layers] == ["image", "labels"]
    lab_levels, lab_kwargs, _ = layers[1]
    assert np.array_equal(np.asarray(lab_levels[0]), lab)
    assert list(lab_kwargs["scale"]) == pytest.approx([2.0, 1.0, 1.0])

    # a second label image is listed too; rewriting one needs overwrite and keeps one entry
    with OmeZarrLabelsWriter.beside(p, "nuclei", level=1) as w:
        w.put(0, lab[0])
    with pytest.raises(OutputError, match="already exists"):
        OmeZarrLabelsWriter.beside(p, "cells", level=1)
    with OmeZarrLabelsWriter.beside(p, "cells", level=1, overwrite=True) as w:
        w.put(0, lab[0] * 0)
    from ome_zarr.writer import get_metadata

    other = "0.4" if version == "0.5" else "0.5"
    with pytest.raises(InputError, match=f"written as {version}, not {other}"):
        OmeZarrLabelsWriter.beside(p, "more", ngff_version=other)
    names = get_metadata(zarr.open_group(str(p / "labels"), mode="r"))["labels"]
    assert sorted(names) == ["cells", "nuclei"]
    assert not np.asarray(open_ome_zarr(p / "labels" / "cells")[0][0]).any()


def test_2d_output_and_checks(tmp_path):
    lab2 = _labels(1)[0]
    with OmeZarrLabelsWriter(tmp_path / "two.zarr", lab2.shape, dtype=np.uint16) as w:
        w.write(lab2)
    data, meta = open_ome_zarr(tmp_path / "two.zarr")
    assert meta.axes == ("y", "x") and np.array_equal(np.asarray(data), lab2)
    with OmeZarrLabelsWriter(tmp_path / "x.zarr", (2, 16, 16), dtype=np.uint8) as w:
        with pytest.raises(InputError, match="does not match"):
            w.put(0, np.zeros((8, 8), np.uint8))
        with pytest.raises(InputError, match="0..255"):
            w.put(0, np.full((16, 16), 300))
        with pytest.raises(InputError, match="out of range"):
            w.put(2, np.zeros((16, 16), np.uint8))
    with pytest.raises(InputError, match="unsigned"):
        OmeZarrLabelsWriter(tmp_path / "f.zarr", (2, 16, 16), dtype=np.float32)
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        OmeZarrLabelsWriter(tmp_path / "file.zarr", (2, 16, 16), overwrite=True)


def test_parallel_puts(tmp_path):
    """Slices written from several threads at once (as dask workers would) all land and count."""
    from concurrent.futures import ThreadPoolExecutor

    lab = _labels(12)
    out = tmp_path / "par.zarr"
    with OmeZarrLabelsWriter(out, lab.shape, n_levels=2, chunks=(32, 32)) as w:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda z: w.put(z, lab[z]), range(12)))
        assert w.done == set(range(12))
        assert json.loads((partial_path(out) / PROGRESS_FILE).read_text())["done"] == [[0, 12]]
    assert np.array_equal(np.asarray(open_ome_zarr(out)[0]), lab)


def test_labels_beside_2d_and_multichannel_images(tmp_path):
    rng = np.random.default_rng(2)
    yx = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    p = write_image(tmp_path / "yx.zarr", yx, axes="yx", scale_factors=(2,))
    lab = _labels(1, 64, 64)[0]
    with OmeZarrLabelsWriter.beside(p, "seg") as w:
        assert w.shape == (64, 64) and w.axes == ("y", "x")
        w.put(0, lab)
    assert [k for _, _, k in _napari_read(p)] == ["image", "labels"]

    czyx = rng.integers(0, 255, (2, 3, 64, 64), dtype=np.uint8)
    p = write_image(tmp_path / "czyx.zarr", czyx, axes="czyx", scale_factors=(2,))
    lab3 = _labels(3, 64, 64)
    with OmeZarrLabelsWriter.beside(p, "seg") as w:  # labels have the spatial axes only
        assert w.shape == (3, 64, 64) and w.axes == ("z", "y", "x")
        for z in range(3):
            w.put(z, lab3[z])
    layers = _napari_read(p)
    assert [k for _, _, k in layers] == ["image", "labels"]
    assert np.array_equal(np.asarray(layers[1][0][0]), lab3)


def test_metadata_feeds_the_tiff_writer(tmp_path):
    """open_ome_zarr's metadata has open_stack's shape: a labels TIFF keeps the pixel size."""
    p = write_image(tmp_path / "img.zarr", _image(), scale={"z": 2.0, "y": 0.5, "x": 0.25})
    data, meta = open_ome_zarr(p)
    with LabelsTiffWriter(tmp_path / "l.tif", data.shape, metadata=meta) as w:
        for z in range(data.shape[0]):
            w.write(np.zeros(data.shape[1:], np.uint32))
    back = read_stack_metadata(tmp_path / "l.tif")
    assert back.scale == pytest.approx(meta.scale) and back.unit == "micron"


# -- crash safety ------------------------------------------------------------------------------
_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from napari_mobilesam.io.omezarr_write import OmeZarrLabelsWriter
    out, n_done = sys.argv[1], int(sys.argv[2])
    lab = np.load(sys.argv[3])
    w = OmeZarrLabelsWriter(out, lab.shape, n_levels=2, overwrite=True, resume=True)
    for z in w.pending():
        if len(w.done) == n_done:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-run: no close, no cleanup
        w.put(z, lab[z])
    w.close()
""")


def _run_killed(out, n_done, lab, tmp_path):
    np.save(tmp_path / "lab.npy", lab)
    env = dict(os.environ, PYTHONPATH=SRC)
    r = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(out), str(n_done), str(tmp_path / "lab.npy")],
                       env=env, capture_output=True, text=True, timeout=120)
    return r


@pytest.mark.parametrize("existing", [False, True])
def test_killed_write_keeps_old_output_and_resumes(tmp_path, existing):
    lab = _labels()
    out = tmp_path / "labels.zarr"
    old = np.full_like(lab, 9)
    if existing:
        with OmeZarrLabelsWriter(out, lab.shape, n_levels=2) as w:
            for z in range(5):
                w.put(z, old[z])
    r = _run_killed(out, 3, lab, tmp_path)
    assert r.returncode == -signal.SIGKILL, r.stderr
    part = partial_path(out)
    # the final name holds the old output untouched, or nothing; the new one is marked partial
    if existing:
        assert np.array_equal(np.asarray(open_ome_zarr(out)[0]), old)
    else:
        assert not out.exists()
    assert zarr.open_group(str(part), mode="r").attrs["napari_mobilesam"]["partial"] is True
    record = json.loads((part / PROGRESS_FILE).read_text())
    assert record["done"] == [[0, 3]]  # finished slices as [start, stop) runs

    with pytest.raises(OutputError, match="resume=True"):
        OmeZarrLabelsWriter(out, lab.shape, n_levels=2)
    with pytest.raises(OutputError, match="started with shape"):
        OmeZarrLabelsWriter(out, (5, 64, 81), n_levels=2, resume=True, overwrite=True)

    # resume alone continues the killed run (which was allowed to replace an older output)
    w = OmeZarrLabelsWriter(out, lab.shape, n_levels=2, resume=True)
    assert w.done == {0, 1, 2} and w.pending() == [3, 4]
    for z in w.pending():
        w.put(z, lab[z])
    w.close()
    assert not part.exists()
    data, meta = open_ome_zarr(out)
    assert np.array_equal(np.asarray(data), lab)
    assert np.array_equal(np.asarray(open_ome_zarr(out, level=1)[0]), lab[:, ::2, ::2])


def test_failed_run_keeps_partial_for_resume(tmp_path):
    lab = _labels()
    out = tmp_path / "labels.zarr"
    with pytest.raises(RuntimeError), OmeZarrLabelsWriter(out, lab.shape) as w:
        for z in (0, 4, 2):  # e.g. parallel workers finishing out of order
            w.put(z, lab[z])
        raise RuntimeError("model crashed")
    assert not out.exists() and partial_path(out).exists()
    w = OmeZarrLabelsWriter(out, lab.shape, resume=True)
    assert w.done == {0, 2, 4} and w.pending() == [1, 3]
    assert w.pending(range(2, 5)) == [3]
    w.close(ok=False)
    w = OmeZarrLabelsWriter(out, lab.shape, overwrite=True)  # overwrite without resume: start again
    assert w.done == set()
    w.discard()
    assert not partial_path(out).exists()


# -- the widget on a layer opened by napari's OME-Zarr reader -----------------------------------
def test_widget_segments_an_ome_zarr_layer_and_labels_go_back_beside_it(
    make_napari_viewer, qtbot, engine_sam_test, tmp_path
):
    """napari-ome-zarr opens a 3-level image as a multiscale layer; the widget (real engine: the
    tiny random vit_t_test encoder) segments it at full resolution, and the committed labels are
    written back beside the image, where napari's reader finds them again."""
    pytest.importorskip("napari_ome_zarr")
    from napari_mobilesam._napari import segment_widget as sw
    from napari_mobilesam.data import synthetic_nuclei
    from napari_mobilesam.models.choice import ModelChoice

    stack = synthetic_nuclei(shape=(4, 128, 128), n_nuclei=4, radius_range=(10, 14), z_radius_range=(2, 3))
    p = write_image(tmp_path / "img.zarr", stack.image, scale={"z": 2.0, "y": 0.5, "x": 0.5})
    _napari_read(p)  # registers the reader plugin
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(p), plugin="napari-ome-zarr")
    assert image.multiscale and len(image.data) == 3
    widget = sw.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment (MobileSAM)")
    widget._image_combo.value = image
    widget.set_model(engine_sam_test, ModelChoice("vit_t_test", "", "cpu"))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert widget.session is not None and widget.session.source.shape == (4, 128, 128)
    z = 2
    viewer.dims.set_point(0, float(image.data_to_world([z, 0, 0])[0]))
    qtbot.waitUntil(lambda: widget.session.is_embedded(z), timeout=60_000)
    assert widget.current_z() == z
    points = widget.points_layer
    points.add(points.world_to_data(image.data_to_world([z, 64, 64])))
    widget.update_preview()  # decoded in the preview thread (after the embedder has checked the slice)
    qtbot.waitUntil(lambda: not widget.busy and widget._prediction is not None, timeout=60_000)
    pred = widget._prediction
    assert pred.mask.shape == (128, 128)  # full resolution, not a level
    assert pred.mask.any(), "the seeded test model gave an empty mask: pick another point"
    widget.commit()
    target = widget.target_layer(create=False)
    assert target.data.shape == (4, 128, 128)
    assert list(target.scale) == pytest.approx([2.0, 0.5, 0.5])
    np.testing.assert_array_equal(target.data[z] > 0, pred.mask)

    with OmeZarrLabelsWriter.beside(p, "mobilesam") as w:
        for zz in w.pending():
            w.put(zz, np.asarray(target.data[zz]))
    layers = _napari_read(p)
    assert [k for _, _, k in layers] == ["image", "labels"]
    np.testing.assert_array_equal(np.asarray(layers[1][0][0]), np.asarray(target.data))
