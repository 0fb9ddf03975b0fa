"""Batch API: prompts tables, napari layer data, TIFF in/out, segment / auto on whole stacks."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile

from napari_mobilesam import batch
from napari_mobilesam.batch import api as batch_api
from napari_mobilesam.batch.api import (
    BatchError,
    LabelsTiffWriter,
    Prompts,
    PromptsError,
    StackMetadata,
    open_stack,
    parse_z_range,
    prompts_from_arrays,
    prompts_from_points,
    prompts_from_shapes,
    read_prompts_csv,
    read_stack_metadata,
    segment_stack,
    segment_stack_auto,
)
from napari_mobilesam.data import synthetic_nuclei
from napari_mobilesam.volume.automatic import AutoParams


@pytest.fixture(scope="module")
def small():
    st = synthetic_nuclei((10, 96, 96), n_nuclei=6, seed=1, z_radius_range=(2.5, 3.5),
                          radius_range=(9, 14))
    assert st.labels[3:8].max() > 0
    return st


# --------------------------------------------------------------------------- prompts CSV


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_read_prompts_csv(tmp_path):
    p = write(tmp_path, "p.csv", "z,row,col,label,object_id\n3,10.5,20,1,7\n3,12,25,0,7\n5,40,41,1,2\n")
    pr = read_prompts_csv(p)
    assert pr.points.tolist() == [[3, 10.5, 20], [3, 12, 25], [5, 40, 41]]
    assert pr.point_labels.tolist() == [1, 0, 1] and pr.point_ids.tolist() == [7, 7, 2]
    assert pr.object_ids.tolist() == [2, 7] and pr.slices.tolist() == [3, 5]
    objs = list(pr.iter_objects())
    assert [(o, z) for o, z, _ in objs] == [(2, 5), (7, 3)]
    assert objs[1][2]["points"].tolist() == [[10.5, 20], [12, 25]]
    assert objs[1][2]["labels"].tolist() == [1, 0] and objs[1][2]["box"] is None


def test_read_prompts_csv_variants(tmp_path):
    # napari's Points export: index,axis-0,axis-1,axis-2 plus feature columns; any column order.
    p = write(tmp_path, "napari.csv",
              "index,axis-0,axis-1,axis-2,object_id,label\n0,1,5,6,3,True\n1,1,7,8,3,False\n")
    pr = read_prompts_csv(p)
    assert pr.points.tolist() == [[1, 5, 6], [1, 7, 8]] and pr.point_labels.tolist() == [1, 0]
    # semicolons, no label/object columns: every point positive and its own object
    pr = read_prompts_csv(write(tmp_path, "s.csv", "Z;Row;Col\n0;1;2\n0;3;4\n"))
    assert pr.point_ids.tolist() == [1, 2] and pr.point_labels.tolist() == [1, 1]
    # 2D table: slice 0
    pr = read_prompts_csv(write(tmp_path, "2d.csv", "row,col\n5,6\n"))
    assert pr.points.tolist() == [[0, 5, 6]]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("z,row,label\n1,2,1\n", r"lacks column\(s\) \['col'\]"),
        ("z,row,col,label,object_id\n1,2,x,1,1\n", "line 2: z, row and col must be numbers"),
        ("z,row,col,label,object_id\n1,2,3,1,1\n1,2,3,maybe,1\n", "line 3: label must be 1"),
        ("z,row,col,label,object_id\n1,2,3,1,0\n", "object_id must be a whole number >= 1"),
        ("z,row,col,label,object_id\n1,2,3,1,2.5\n", "object_id must be a whole number"),
        ("z,row,col,label\n1,2,3,0\n", "negative point needs an object_id"),
        ("z,row,col,label,object_id\n1,2,,1,1\n", "missing value for column 'col'"),
        ("z,row,col\n", "no points"),
    ],
)
def test_read_prompts_csv_errors(tmp_path, text, message):
    with pytest.raises(PromptsError, match=message):
        read_prompts_csv(write(tmp_path, "bad.csv", text))


def test_prompts_csv_unreadable(tmp_path):
    with pytest.raises(PromptsError, match="not found"):
        read_prompts_csv(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81\x90")
    with pytest.raises(PromptsError, match="cannot read"):
        read_prompts_csv(tmp_path / "bin.csv")


def test_prompts_validate_against_stack():
    shape = (4, 50, 60)
    prompts_from_arrays([[3, 49, 59]]).validate(shape)  # last pixel: fine
    with pytest.raises(PromptsError, match=r"outside the stack of shape \(Z=4, H=50, W=60\)"):
        prompts_from_arrays([[4, 10, 10]]).validate(shape)
    with pytest.raises(PromptsError, match="outside"):
        prompts_from_arrays([[0, 10, 70]]).validate(shape)
    with pytest.raises(PromptsError, match="outside"):
        Prompts(boxes=[[0, 1, 1, 10, 99]], box_ids=[1]).validate(shape)
    with pytest.raises(PromptsError, match="fractional z"):
        prompts_from_arrays([[1.5, 10, 10]]).validate(shape)
    with pytest.raises(PromptsError, match="only negative points"):
        prompts_from_arrays([[1, 10, 10]], labels=[0], object_ids=[1]).validate(shape)
    with pytest.raises(PromptsError, match="no prompts"):
        Prompts().validate(shape)
    with pytest.raises(PromptsError, match="finite"):
        prompts_from_arrays([[1, np.nan, 10]])
    with pytest.raises(PromptsError, match="row0 <= row1"):
        Prompts(boxes=[[0, 10, 1, 5, 9]], box_ids=[1])
    with pytest.raises(PromptsError, match=">= 1"):
        prompts_from_arrays([[1, 10, 10]], object_ids=[0])


# --------------------------------------------------------------------------- napari layer data


def test_prompts_from_points_and_shapes():
    import pandas as pd

    data = np.array([[2, 10, 11], [2, 12, 13], [4, 30, 31]], float)
    feats = pd.DataFrame({"label": [True, False, True], "object_id": [5, 5, 6]})
    pr = prompts_from_points(data, features=feats)
    assert pr.point_labels.tolist() == [1, 0, 1] and pr.point_ids.tolist() == [5, 5, 6]
    pr2 = prompts_from_points(data[:, 1:])  # 2D points: slice 0, one object each
    assert pr2.points[:, 0].tolist() == [0, 0, 0] and pr2.point_ids.tolist() == [1, 2, 3]
    with pytest.raises(PromptsError, match="negative points need object_ids"):
        prompts_from_points(data, labels=[1, 0, 1])
    with pytest.raises(PromptsError, match=r"\(N, 2\) or \(N, 3\)"):
        prompts_from_points(np.zeros((3, 4)))

    rect = np.array([[3, 10, 20], [3, 10, 40], [3, 30, 40], [3, 30, 20]], float)
    sh = prompts_from_shapes([rect, rect[:, 1:] + 1], object_ids=[5, 9])
    assert sh.boxes.tolist() == [[3, 10, 20, 30, 40], [0, 11, 21, 31, 41]]
    both = pr + sh
    items = {(o, z): it for o, z, it in both.iter_objects()}
    assert items[(5, 2)]["points"].shape == (2, 2) and items[(5, 3)]["box"].tolist() == [10, 20, 30, 40]
    skew = rect.copy()
    skew[0, 0] = 4
    with pytest.raises(PromptsError, match="not on one slice"):
        prompts_from_shapes([skew])
    with pytest.raises(PromptsError, match="only rectangles"):
        prompts_from_shapes([rect], shape_types=["ellipse"])


def test_union_box_for_two_boxes_of_one_object():
    pr = Prompts(boxes=[[1, 5, 5, 10, 10], [1, 8, 2, 20, 9]], box_ids=[3, 3])
    ((oid, z, item),) = list(pr.iter_objects())
    assert (oid, z) == (3, 1) and item["box"].tolist() == [5, 2, 20, 10]


def test_parse_z_range():
    assert list(parse_z_range(None, 5)) == [0, 1, 2, 3, 4]
    assert list(parse_z_range("1:3", 5)) == [1, 2]
    assert list(parse_z_range("2:", 5)) == [2, 3, 4]
    assert list(parse_z_range((-2, None), 5)) == [3, 4]
    for bad in ("1-3", "a:b", "4:2", (7, 9)):
        with pytest.raises(BatchError):
            parse_z_range(bad, 5)


# --------------------------------------------------------------------------- TIFF in and out


def test_labels_writer_streams_compressed_with_metadata(tmp_path):
    out = tmp_path / "labels.tif"
    meta = StackMetadata(resolution=(2.5, 4.0), resolution_unit=3, spacing=0.7, unit="micron")
    with LabelsTiffWriter(out, (3, 20, 30), metadata=meta) as w:
        for z in range(2):  # the third slice is left out: written as zeros
            w.write(np.full((20, 30), z + 1, np.int32))
        assert not out.exists()  # only moved into place when complete
    back = tifffile.imread(out)
    assert back.shape == (3, 20, 30) and back.dtype == np.uint32
    assert back[0].max() == 1 and back[1].min() == 2 and back[2].max() == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression != 1  # compressed
    m = read_stack_metadata(out)
    assert m.resolution == pytest.approx((2.5, 4.0)) and m.resolution_unit == 3
    assert m.spacing == pytest.approx(0.7) and m.unit == "micron"
    assert m.scale == pytest.approx((0.7, 0.25, 0.4))


def test_labels_writer_never_overwrites_and_cleans_up(tmp_path):
    out = tmp_path / "labels.tif"
    out.write_bytes(b"precious")
    with pytest.raises(BatchError, match="already exists"):
        LabelsTiffWriter(out, (1, 8, 8))
    assert out.read_bytes() == b"precious"
    with pytest.raises(RuntimeError):  # a failing run keeps the old file, leaves no partial
        with LabelsTiffWriter(out, (2, 8, 8), overwrite=True) as w:
            w.write(np.ones((8, 8), np.int32))
            raise RuntimeError("interrupted")
    assert out.read_bytes() == b"precious"
    assert not list(tmp_path.glob("*.partial"))
    with LabelsTiffWriter(out, (1, 8, 8), overwrite=True) as w:
        w.write(np.ones((8, 8), np.int32))
    assert tifffile.imread(out).sum() == 64
    with pytest.raises(BatchError, match="0..65535"):
        with LabelsTiffWriter(tmp_path / "u16.tif", (1, 2, 2), dtype=np.uint16) as w:
            w.write(np.full((2, 2), 70000))


def test_open_stack_lazy_and_metadata(tmp_path, small):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, small.image, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"spacing": 0.5, "unit": "um", "axes": "ZYX"}, compression="zlib")
    arr, meta = open_stack(path)
    import dask.array as da

    assert isinstance(arr, da.Array) and arr.shape == small.image.shape
    assert np.array_equal(arr[2].compute(), small.image[2])
    assert np.array_equal(arr.compute(), small.image)
    assert meta.spacing == 0.5 and meta.unit == "um" and meta.resolution == pytest.approx((5, 5))
    eager, _ = open_stack(path, lazy=False)
    assert isinstance(eager, np.ndarray) and np.array_equal(eager, small.image)
    with pytest.raises(BatchError, match="not found"):
        open_stack(tmp_path / "missing.tif")
    (tmp_path / "junk.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(BatchError, match="cannot read"):
        open_stack(tmp_path / "junk.tif")


# --------------------------------------------------------------------------- whole stacks


class OraclePredictor:
    """A fake predictor (not a model): each prompt gets the ground-truth object under its first
    positive point (or under the box centre), with the predicted IoU given per object."""

    def __init__(self, labels, iou_of=None):
        self.labels = labels
        self.iou_of = iou_of or {}
        self.calls = []

        class _Src:
            slice_shape = labels.shape[1:]
            n_slices = labels.shape[0]

        self.source = _Src()

    def predict_many(self, z, prompts):
        from napari_mobilesam.core.predictor import Prediction

        self.calls.append((z, len(prompts)))
        out = []
        for p in prompts:
            get = p.get if isinstance(p, dict) else lambda key: getattr(p, key)
            if get("points") is not None:
                lab = np.ones(len(get("points"))) if get("labels") is None else np.asarray(get("labels"))
                r, c = np.asarray(get("points"))[lab == 1][0].astype(int)
            else:
                b = np.asarray(get("box"))
                r, c = int((b[0] + b[2]) / 2), int((b[1] + b[3]) / 2)
            gt_id = int(self.labels[z, r, c])
            m = (self.labels[z] == gt_id) if gt_id else np.zeros(self.labels.shape[1:], bool)
            k = 3 if get("multimask") else 1
            iou = np.full(k, self.iou_of.get(gt_id, 0.9), np.float32)
            iou[0] -= 0.5  # the first candidate is worse: the best one must be picked
            masks = np.stack([np.zeros_like(m)] + [m] * (k - 1)) if k > 1 else m[None]
            out.append(Prediction(masks, iou, np.ones(k, np.float32), np.zeros((k, 4, 4), np.float32)))
        return out


def test_segment_stack_with_oracle(monkeypatch, small):
    gt = small.labels.astype(np.int32)
    z = 4
    ids = [int(i) for i in np.unique(gt[z]) if i]
    assert len(ids) >= 3
    pts, obj = [], []
    for k, i in enumerate(ids):
        r, c = np.argwhere(gt[z] == i).mean(0).round()
        if gt[z, int(r), int(c)] != i:
            r, c = np.argwhere(gt[z] == i)[0]
        pts.append((z, r, c))
        obj.append(10 + k)
    oracle = OraclePredictor(gt)
    monkeypatch.setattr(batch_api, "_make_predictor", lambda *a, **k: oracle)
    lab = segment_stack(small.image, prompts_from_arrays(pts, object_ids=obj), model="unused")
    assert lab.shape == gt.shape and lab.dtype == np.int32
    assert oracle.calls == [(z, len(ids))]  # one batched call for the slice
    for k, i in enumerate(ids):
        assert np.array_equal(lab[z] == 10 + k, gt[z] == i)
    assert not lab[np.arange(10) != z].any()
    # Two objects claiming the same pixels: the higher predicted IoU wins.
    same = prompts_from_arrays([pts[0], pts[0]], object_ids=[1, 2])
    oracle2 = OraclePredictor(gt, iou_of={ids[0]: 0.9})
    monkeypatch.setattr(batch_api, "_make_predictor", lambda *a, **k: oracle2)
    lab = segment_stack(small.image, same, model="unused")
    assert set(np.unique(lab)) == {0, 1}
    with pytest.raises(PromptsError, match="no prompts lie in z range"):
        segment_stack(small.image, same, model="unused", z_range=(5, 10))


def test_propagate_stack_with_oracle_follows_objects_through_z(monkeypatch, small):
    gt = small.labels.astype(np.int32)
    z = 5
    ids = [int(i) for i in np.unique(gt[z]) if i][:2]
    pts = []
    for i in ids:
        rr, cc = np.nonzero(ndi_erode(gt[z] == i))
        pts.append((z, rr[len(rr) // 2], cc[len(cc) // 2]))
    oracle = OraclePredictor(gt)
    monkeypatch.setattr(batch_api, "_make_predictor", lambda *a, **k: oracle)
    seen = []
    lab = batch.propagate_stack(small.image, prompts_from_arrays(pts, object_ids=[21, 22]),
                                model="unused", progress=lambda d, t: seen.append(d))
    assert lab.dtype == np.int32 and lab.shape == gt.shape and seen
    for new_id, i in zip((21, 22), ids):
        # Every slice of the nucleus, not just the prompted one, carries the prompt's object id.
        assert np.array_equal(lab == new_id, gt == i), new_id
    lab = batch.propagate_stack(small.image, prompts_from_arrays(pts, object_ids=[21, 22]),
                                model="unused", z_range=(4, 7))
    assert not lab[:4].any() and not lab[7:].any() and (lab[4:7] == 21).any()


def ndi_erode(mask):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=2)


def test_propagate_stack_real_model(small, engine_sam_test, tmp_path):
    prompts = prompts_from_arrays([[5, 40, 40]], object_ids=[4])
    out = tmp_path / "prop.tif"
    got = batch.propagate_stack(small.image, prompts, model=engine_sam_test, z_range=(3, 8), out=out,
                                min_score=0.0)
    lab = tifffile.imread(got)
    assert lab.shape == small.image.shape and set(np.unique(lab)) <= {0, 4}
    assert not lab[:3].any() and not lab[8:].any()


def test_segment_stack_real_model_and_streamed_output(tmp_path, small, engine_sam_test):
    prompts = prompts_from_arrays([[3, 40, 40], [3, 70, 20], [6, 30, 60]], object_ids=[3, 4, 3])
    lab = segment_stack(small.image, prompts, model=engine_sam_test)
    assert lab.shape == small.image.shape and lab.dtype == np.int32
    assert set(np.unique(lab[[0, 1, 2, 4, 5, 7, 8, 9]])) == {0}  # nothing on unprompted slices
    assert set(np.unique(lab)) <= {0, 3, 4}
    out = tmp_path / "seg.tif"
    got = segment_stack(small.image, prompts, model=engine_sam_test, out=out)
    assert got == out and np.array_equal(tifffile.imread(out), lab)
    with pytest.raises(BatchError, match="already exists"):
        segment_stack(small.image, prompts, model=engine_sam_test, out=out)


# Random test weights: accept every mask so the plumbing, not the scores, is tested.
LOOSE = AutoParams(min_iou=0.0, min_stability=0.0, max_area_fraction=0.6, grid=2, max_points=6,
                   points_per_batch=6)


def test_auto_stack_dask_streamed_equals_in_memory(tmp_path, small, engine_sam_test):
    import dask.array as da

    calls = []
    mem = segment_stack_auto(small.image, model=engine_sam_test, params=LOOSE, z_range=(1, 5),
                             progress=lambda done, total: calls.append((done, total)))
    assert mem.shape == small.image.shape and mem.dtype == np.int32
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert not mem[0].any() and not mem[5].any() and mem[1:5].any()
    lazy = da.from_array(small.image, chunks=(1, 96, 96))
    out = tmp_path / "auto.tif"
    meta = StackMetadata(resolution=(10.0, 10.0), resolution_unit=3, spacing=2.0, unit="micron")
    got = segment_stack_auto(lazy, model=engine_sam_test, params=LOOSE, z_range="1:5", out=out,
                             metadata=meta)
    assert got == out
    assert np.array_equal(tifffile.imread(out), mem)
    assert read_stack_metadata(out).spacing == 2.0


def test_auto_memory_does_not_grow_with_depth(tmp_path, engine_sam_test):
    """Streaming a lazy stack to a file: numpy peak memory is the same for 4 and 12 slices."""
    import dask.array as da

    big = synthetic_nuclei((12, 128, 128), n_nuclei=6, seed=2).image
    params = LOOSE.replace(max_points=2, grid=1)
    peaks = []
    for depth in (4, 12):
        lazy = da.from_array(big[:depth], chunks=(1, 128, 128))
        tracemalloc.start()
        segment_stack_auto(lazy, model=engine_sam_test, params=params, out=tmp_path / f"d{depth}.tif",
                           cache_bytes=4 * 2**20)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # An in-memory (Z, 128, 128) int32 result alone would add 128 KiB (4 slices) vs 768 KiB (12).
    assert peaks[1] < peaks[0] + 256 * 1024, peaks


def test_model_argument_errors(small):
    with pytest.raises(TypeError, match="model name"):
        segment_stack_auto(small.image, model=42)
    with pytest.raises(BatchError, match="by name"):
        segment_stack_auto(small.image, model=object(), client=object())


@pytest.mark.gui
def test_add_labels_layer_matches_image_layer(make_napari_viewer, small):
    viewer = make_napari_viewer()
    img = viewer.add_image(small.image, scale=(2.0, 0.5, 0.5))
    lab = np.zeros(small.image.shape, np.uint32)
    lab[2, 10:20, 10:20] = 3
    layer = batch.add_labels_layer(viewer, lab, image=img, name="auto")
    assert layer.name == "auto" and tuple(layer.scale) == (2.0, 0.5, 0.5)
    assert layer.data.dtype == np.int32 and layer.data[2, 15, 15] == 3
    img2d = viewer.add_image(small.image[0])
    layer2 = batch.add_labels_layer(viewer, lab[2:3], image=img2d)
    assert layer2.data.shape == small.image.shape[1:]


def test_open_stack_uncompressed_imagej_is_lazy(tmp_path):
    a = np.random.default_rng(0).integers(0, 1000, (5, 64, 64)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0})
    data, meta = open_stack(tmp_path / "ij.tif")
    assert not isinstance(data, np.ndarray) or isinstance(data, np.memmap)  # never read at once
    assert np.array_equal(np.asarray(data[3]), a[3]) and np.array_equal(np.asarray(data), a)
    assert meta.spacing == 2.0


# --------------------------------------------------------------------------- reliability (#12)


def test_labels_writer_lock_and_stale_partials(tmp_path):
    out = tmp_path / "labels.tif"
    stale = [tmp_path / "labels.tif.partial", tmp_path / ".labels.tif.k1ll3d.partial"]
    for p in stale:
        p.write_bytes(b"left by a killed run")
    with pytest.warns(UserWarning, match="unfinished output left by an interrupted run"):
        first = LabelsTiffWriter(out, (2, 8, 8)).__enter__()
    assert not any(p.exists() for p in stale)
    second = LabelsTiffWriter(out, (2, 8, 8))
    with pytest.raises(BatchError, match="another run .* is writing"):
        second.__enter__()
    first.write(np.ones((8, 8), np.int32))
    first.close()
    assert tifffile.imread(out)[0].sum() == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]  # no lock, no partial
    with pytest.raises(BatchError, match="already exists"):  # the lock released, the check still holds
        LabelsTiffWriter(out, (2, 8, 8)).__enter__()


def test_labels_of_imagej_inputs_carry_imagej_metadata(tmp_path, small):
    src = tmp_path / "ij.tif"
    tifffile.imwrite(src, small.image, imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "ZYX", "spacing": 1.5, "unit": "um"})
    meta = read_stack_metadata(src)
    assert meta.imagej and meta.path == src
    out = tmp_path / "labels.tif"
    with LabelsTiffWriter(out, small.image.shape, metadata=meta) as w:
        w.write(np.full(small.image.shape[1:], 7, np.int32))
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej  # Fiji reads z spacing and unit from the ImageJ description
        assert tif.imagej_metadata["spacing"] == 1.5 and tif.imagej_metadata["unit"] == "um"
        assert tif.series[0].shape == small.image.shape and tif.series[0].dtype == np.uint32
    back, meta2 = open_stack(out, lazy=False)
    assert back[0].max() == 7 and meta2.spacing == 1.5 and meta2.resolution == pytest.approx((4, 4))
    with pytest.raises(BatchError, match="is the input"):
        LabelsTiffWriter(src, small.image.shape, metadata=meta, overwrite=True)


def test_truncated_stacks_are_refused(tmp_path, small):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, small.image, compression="zlib")
    data = full.read_bytes()
    for frac in (0.3, 0.6, 0.98):
        cut = tmp_path / f"cut{frac}.tif"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(BatchError, match=r"truncated: .*slice \d+"):
            open_stack(cut)
    assert open_stack(full, lazy=False)[0].shape == small.image.shape


def test_object_ids_beyond_int32(monkeypatch, small):
    gt = small.labels.astype(np.int32)
    z = 5
    i = [int(v) for v in np.unique(gt[z]) if v][0]
    rr, cc = np.nonzero(ndi_erode(gt[z] == i))
    big = 3_000_000_000
    prm = prompts_from_arrays([(z, rr[len(rr) // 2], cc[len(cc) // 2])], object_ids=[big])
    monkeypatch.setattr(batch_api, "_make_predictor", lambda *a, **k: OraclePredictor(gt))
    lab = batch.propagate_stack(small.image, prm, model="unused")
    assert lab.dtype == np.int64 and np.array_equal(lab == big, gt == i)
    lab = segment_stack(small.image, prm, model="unused")
    assert lab.dtype == np.int64 and np.array_equal(lab[z] == big, gt[z] == i)
    with pytest.raises(PromptsError, match="renumber"):
        segment_stack(small.image, prompts_from_arrays([(z, 1, 1)], object_ids=[2**32]), model="unused")
