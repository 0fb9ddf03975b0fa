"""Automatic segmentation: candidate prompts, mask filtering, NMS, painting, stitching through z.

Most tests use ground truth from the synthetic nuclei stack and masks with known scores; an
``OraclePredictor`` (a fake that answers prompts from the ground truth) checks the per-slice
pipeline end to end without the model, and one test runs the real (test-sized) model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from napari_mobilesam.data import synthetic_nuclei
from napari_mobilesam.volume.automatic import (
    AutoParams,
    Stitcher,
    candidate_points,
    filter_masks,
    mask_nms,
    overlap_iou,
    paint_masks,
    relabel_sequential,
    remove_small_fragments,
    segment_slice,
    stitch_labels,
)


def disk(shape, center, radius):
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2


def best_match_iou(pred: np.ndarray, gt: np.ndarray) -> dict[int, float]:
    """For every ground-truth id, the best IoU of any predicted label."""
    ids_gt, ids_pred, iou = overlap_iou(gt, pred)
    return {int(g): float(iou[i].max()) if iou.shape[1] else 0.0 for i, g in enumerate(ids_gt)}


@pytest.fixture(scope="module")
def stack():
    return synthetic_nuclei((24, 192, 192), n_nuclei=16, seed=3)


# --------------------------------------------------------------------------- candidate prompts


def test_candidate_points_hit_every_nucleus(stack):
    for z in (8, 12, 16):
        gt = stack.labels[z]
        pts = candidate_points(stack.image[z], AutoParams(grid=0))
        assert pts.ndim == 2 and pts.shape[1] == 2 and pts.dtype == np.float64
        hit = set(np.unique(gt[pts[:, 0].astype(int), pts[:, 1].astype(int)])) - {0}
        # Every nucleus big enough to matter in this slice gets at least one prompt.
        ids, areas = np.unique(gt[gt > 0], return_counts=True)
        big = {int(i) for i, a in zip(ids, areas) if a >= 150}
        assert big <= hit, f"slice {z}: nuclei without a prompt: {sorted(big - hit)}"
        # Blob prompts land on nuclei, not on the background.
        on_bg = np.mean(gt[pts[:, 0].astype(int), pts[:, 1].astype(int)] == 0)
        assert on_bg < 0.2


def test_candidate_points_dark_objects_and_rgb(stack):
    z = 12
    img = stack.image[z].astype(np.float32)
    dark = img.max() - img  # dark nuclei on a bright background
    rgb = np.repeat(((dark - dark.min()) / np.ptp(dark) * 255).astype(np.uint8)[..., None], 3, -1)
    p = AutoParams(grid=0)
    pts_bright = candidate_points(img, p)
    pts_dark = candidate_points(rgb, p)  # "auto" polarity picks the minority side
    gt = stack.labels[z]
    hit_b = set(np.unique(gt[tuple(pts_bright.astype(int).T)])) - {0}
    hit_d = set(np.unique(gt[tuple(pts_dark.astype(int).T)])) - {0}
    assert hit_d == hit_b and len(hit_d) > 3
    forced = candidate_points(rgb, p.replace(polarity="bright"))
    hit_f = set(np.unique(gt[tuple(forced.astype(int).T)]))
    assert hit_f != hit_d


def test_candidate_points_grid_and_limits():
    flat = np.zeros((100, 80), np.uint16)
    pts = candidate_points(flat, AutoParams(grid=4))
    assert pts.shape == (16, 2)  # no blobs: the whole grid
    assert pts[:, 0].min() > 0 and pts[:, 0].max() < 100 and pts[:, 1].max() < 80
    img = np.zeros((100, 100), np.float32)
    img[disk(img.shape, (25, 25), 10)] = 1
    pts = candidate_points(img, AutoParams(grid=4, min_distance=20, blob_sigma=1))
    assert np.allclose(pts[0], (25, 25), atol=2)  # the blob first
    # The four grid points within 20 px of the blob (17.7 px away) are left out, and so are the
    # others: plain background, more than 20 px from the foreground.
    assert len(pts) == 1
    img[disk(img.shape, (60, 60), 2)] = 1  # foreground, but too small to be a blob
    pts = candidate_points(img, AutoParams(grid=4, min_distance=20, blob_sigma=1))
    assert len(pts) == 2 and np.allclose(pts[1], (62.5, 62.5))  # the grid point near it stays
    pts = candidate_points(img, AutoParams(grid=4, min_distance=20, blobs=False))
    assert len(pts) == 16  # grid-only mode ("everything" mode) keeps the whole grid
    noise = np.random.default_rng(0).normal(100, 5, (100, 100))
    assert len(candidate_points(noise, AutoParams(grid=4))) == 16  # no blobs in pure noise
    assert len(candidate_points(img, AutoParams(grid=8, max_points=5))) == 5
    with pytest.raises(ValueError, match="one slice"):
        candidate_points(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="polarity"):
        AutoParams(polarity="up")
    with pytest.raises(ValueError, match="min_iou"):
        AutoParams(min_iou=1.5)


# --------------------------------------------------------------------------- filtering and NMS


def test_filter_masks_known_scores():
    shape = (64, 64)
    m = np.stack(
        [
            disk(shape, (20, 20), 8),  # good
            disk(shape, (20, 20), 8),  # low predicted IoU
            disk(shape, (20, 20), 8),  # unstable
            disk(shape, (40, 40), 2),  # too small (13 px)
            np.ones(shape, bool),  # background: too large
            disk(shape, (40, 40), 6),  # good, exactly at the thresholds
        ]
    )
    iou = np.array([0.95, 0.5, 0.95, 0.95, 0.99, 0.80])
    stab = np.array([0.97, 0.97, 0.4, 0.97, 0.99, 0.85])
    keep = filter_masks(m, iou, stab, AutoParams(min_area=30, max_area_fraction=0.5))
    assert keep.tolist() == [True, False, False, False, False, True]
    with pytest.raises(ValueError, match="masks"):
        filter_masks(m, iou[:3], stab)


def test_mask_nms_duplicates_and_parts():
    shape = (64, 64)
    a = disk(shape, (20, 20), 10)
    a_shift = disk(shape, (21, 20), 10)  # near-duplicate of a
    a_half = a & (np.arange(64)[None, :] < 20)  # a sub-part of a
    b = disk(shape, (45, 45), 8)  # separate object
    masks = np.stack([a_shift, a, a_half, b])
    scores = np.array([0.8, 0.9, 0.95, 0.7])
    kept = mask_nms(masks, scores, iou_threshold=0.6, containment=0.85)
    # a_half scores best and is kept; a and a_shift contain it, so they go; b stays.
    assert kept.tolist() == [2, 3]
    kept = mask_nms(masks, scores, iou_threshold=0.6, containment=None)
    # Without containment, only the near-duplicate of a goes.
    assert kept.tolist() == [2, 1, 3]
    assert mask_nms(np.zeros((0, 4, 4), bool), np.zeros(0)).tolist() == []


def test_paint_masks_best_score_wins_and_fragments_drop():
    shape = (50, 50)
    a = disk(shape, (20, 20), 10)
    b = disk(shape, (20, 32), 10)  # overlaps a
    c = np.zeros(shape, bool)
    c[45:47, 45:47] = True  # 4 px
    lab = paint_masks(np.stack([a, b, c]), np.array([0.5, 0.9, 0.8]), min_area=10)
    assert lab.dtype == np.int32 and lab.shape == shape
    assert lab[20, 26] == 1  # shared pixel goes to b (best score, id 1)
    assert lab[20, 12] == 2
    assert set(np.unique(lab)) == {0, 1, 2}  # c dropped, ids without gaps


def test_remove_small_fragments_keeps_largest_piece():
    lab = np.zeros((30, 30), np.int32)
    lab[2:12, 2:12] = 5
    lab[20:22, 20:22] = 5  # stray piece of 5
    lab[25:27, 2:4] = 7  # small label
    out = remove_small_fragments(lab, 10)
    assert (out[2:12, 2:12] == 5).all() and out[20:22, 20:22].max() == 0 and 7 not in out
    assert lab[20, 20] == 5  # input untouched
    assert relabel_sequential(out).max() == 1


# --------------------------------------------------------------------------- stitching


def test_stitching_ground_truth_slices_one_id_per_nucleus(stack):
    """Each slice labelled independently (shuffled local ids) stitches back to one id per nucleus."""
    rng = np.random.default_rng(0)
    gt = stack.labels.astype(np.int32)
    per_slice = []
    for sl in gt:
        ids = np.unique(sl[sl > 0])
        perm = rng.permutation(len(ids)) + 1
        lut = np.zeros(int(gt.max()) + 1, np.int32)
        lut[ids] = perm
        per_slice.append(lut[sl])
    stitched = np.stack(list(stitch_labels(iter(per_slice), min_iou=0.3)))
    assert stitched.shape == gt.shape and stitched.dtype == np.int32
    # A bijection between ground-truth ids and stitched ids over the whole volume.
    pairs = set(zip(gt[gt > 0].tolist(), stitched[gt > 0].tolist()))
    gt_ids = {g for g, _ in pairs}
    assert len(pairs) == len(gt_ids) == len({s for _, s in pairs})
    assert (stitched[gt == 0] == 0).all()
    # ids count up in order of first appearance
    first_z = {}
    for z, sl in enumerate(stitched):
        for i in np.unique(sl[sl > 0]):
            first_z.setdefault(int(i), z)
    assert sorted(first_z) == list(range(1, len(first_z) + 1))
    assert list(first_z.values()) == sorted(first_z.values())


def test_stitcher_rules():
    shape = (40, 40)
    s0 = np.zeros(shape, np.int32)
    s0[disk(shape, (10, 10), 6)] = 1
    s0[disk(shape, (30, 30), 6)] = 2
    s1 = np.zeros(shape, np.int32)
    s1[disk(shape, (11, 10), 6)] = 9  # the first object, moved a pixel
    s1[disk(shape, (10, 30), 6)] = 4  # a new object
    s2 = np.zeros(shape, np.int32)
    s2[disk(shape, (10, 10), 6) & (np.arange(40)[None, :] < 6)] = 3  # sliver: IoU too low
    s3 = np.zeros(shape, np.int32)
    s3[disk(shape, (10, 30), 6) & (np.arange(40)[None, :] > 34)] = 1  # sliver of object 3 only
    # Containment off: the sliver of object 1 is a new object.
    st = Stitcher(min_iou=0.4, min_overlap=1.0, max_gap=0)
    o0, o1, o2 = st.add(s0), st.add(s1), st.add(s2)
    assert set(np.unique(o0)) == {0, 1, 2}
    assert o1[11, 10] == 1 and o1[10, 30] == 3
    assert o2[10, 4] == 4 and st.n_objects == 4
    # Containment on (the tip of a nucleus): the sliver inside object 1 keeps id 1.
    st = Stitcher(min_iou=0.4, min_overlap=0.6, max_gap=0)
    o0, o1, o2 = st.add(s0), st.add(s1), st.add(s2)
    assert o2[10, 4] == 1 and st.n_objects == 3
    o3 = st.add(s3)  # object 3 is absent from slice 2; with max_gap=0 only slice 2 counts
    assert o3[10, 35] == 4 and st.n_objects == 4
    # With max_gap=1 the object missed on slice 2 keeps its id on slice 3...
    st = Stitcher(min_iou=0.4, min_overlap=0.6, max_gap=1)
    o3 = [st.add(x) for x in (s0, s1, s2, s3)][-1]
    assert o3[10, 35] == 3 and st.n_objects == 3
    # ...but not after a gap of two slices, and an id present on the slice before is not reused.
    st = Stitcher(min_iou=0.4, min_overlap=0.6, max_gap=1)
    o = [st.add(x) for x in (s0, s1, s2, np.zeros_like(s2), s3)][-1]
    assert o[10, 35] == 4
    s4 = s1.copy()
    s4[s4 == 9] = 0  # object 1 missing; object 3 present
    s5 = np.zeros(shape, np.int32)
    s5[disk(shape, (10, 30), 6)] = 1  # overlaps object 3 (in s4) only
    st = Stitcher(min_iou=0.4, min_overlap=0.6, max_gap=2)
    out = [st.add(x) for x in (s0, s1, s4, s5)]
    assert out[3][10, 30] == out[2][10, 30] == 3
    with pytest.raises(ValueError, match="shape"):
        st.add(np.zeros((5, 5), np.int32))
    # Optimal, not greedy: one big label overlapping two must go to the better total.
    a = np.zeros((10, 20), np.int32)
    a[:, :10], a[:, 10:] = 1, 2
    b = np.zeros((10, 20), np.int32)
    b[:, 2:12] = 1
    b[:, 12:] = 2
    st2 = Stitcher(0.3)
    st2.add(a)
    out = st2.add(b)
    assert out[0, 5] == 1 and out[0, 15] == 2


# --------------------------------------------------------------------------- end to end, one slice


@dataclass
class _Pred:
    masks: np.ndarray
    iou: np.ndarray
    stability: np.ndarray


class OraclePredictor:
    """A fake predictor (not a model) answering each point from ground truth.

    Mask 0 is the object under the point, scored best; mask 1 its left half (a sub-part, scored a
    little lower); mask 2 the object plus a neighbouring square (unstable). A point on the
    background returns the background region.
    """

    def __init__(self, labels, image):
        self.labels = labels
        self.image = image
        self.calls = 0
        self.sizes = []

        class _Source:
            def rgb(_, z):
                g = self.image[z].astype(np.float32)
                g = (g - g.min()) / max(np.ptp(g), 1) * 255
                return np.repeat(g.astype(np.uint8)[..., None], 3, -1)

        self.source = _Source()

    def predict_many(self, z, prompts):
        self.calls += 1
        self.sizes.append(len(prompts))
        gt = self.labels[z]
        out = []
        for p in prompts:
            (r, c), = np.asarray(p["points"]).astype(int)
            whole = gt == gt[r, c]
            cols = np.flatnonzero(whole.any(axis=0))
            half = whole & (np.arange(gt.shape[1])[None, :] < (cols[0] + cols[-1]) // 2 + 1)
            bigger = whole.copy()
            bigger[max(r - 30, 0) : r + 30, max(c - 30, 0) : c + 30] = True
            out.append(
                _Pred(np.stack([whole, half, bigger]), np.array([0.95, 0.9, 0.85]),
                      np.array([0.97, 0.96, 0.5]))
            )
        return out


def test_segment_slice_with_oracle_recovers_ground_truth(stack):
    z = 12
    oracle = OraclePredictor(stack.labels, stack.image)
    params = AutoParams(points_per_batch=8, max_area_fraction=0.2, min_area=30)
    res = segment_slice(oracle, z, params)
    gt = stack.labels[z]
    assert res.labels.shape == gt.shape and res.labels.dtype == np.int32
    assert max(oracle.sizes) == 8 and sum(oracle.sizes) == res.n_prompts  # decoded in batches
    assert set(oracle.sizes) <= {1, 2, 4, 8}  # few distinct batch shapes
    ious = best_match_iou(res.labels, gt)
    ids, areas = np.unique(gt[gt > 0], return_counts=True)
    for i, a in zip(ids, areas):
        if a >= 150:
            assert ious[int(i)] > 0.97, f"nucleus {i}: IoU {ious[int(i)]:.2f}"
    assert res.labels.max() <= len(ids)  # no duplicates or halves left


def test_real_model_automatic_slice(stack):
    """The real predictor path (test-sized random model): runs, shapes and dtypes hold."""
    build = pytest.importorskip("napari_mobilesam.models.registry")
    image_mod = pytest.importorskip("napari_mobilesam.core.source")
    predictor_mod = pytest.importorskip("napari_mobilesam.core.predictor")
    sam = build.build_sam("vit_t_test")
    source = image_mod.SliceSource(stack.image[10:12])
    pred = predictor_mod.SlicePredictor(sam, source)
    # Random weights: scores mean nothing, so accept everything and check the plumbing.
    params = AutoParams(min_iou=0.0, min_stability=0.0, max_area_fraction=1.0, grid=2,
                        max_points=12, points_per_batch=5)
    res = segment_slice(pred, 1, params)
    assert res.labels.shape == stack.image.shape[1:] and res.labels.dtype == np.int32
    assert res.n_prompts == 12 and res.n_masks == 36
    ids = np.unique(res.labels)
    assert ids[0] == 0 or len(ids) == res.labels.max()
    assert res.labels.max() == len(ids[ids > 0])  # ids 1..N without gaps


def test_grid_points_on_found_objects_are_skipped():
    """A grid point lying on an object the blob prompts already found is not decoded again."""
    from napari_mobilesam.volume.automatic import _split_candidates

    img = np.zeros((1, 100, 100), np.float32)
    gt = np.zeros((1, 100, 100), np.int32)
    # One large round object: one blob prompt at its centre; several grid points lie on it too.
    img[0][disk((100, 100), (40, 40), 32)] = 1
    gt[0][disk((100, 100), (40, 40), 32)] = 1
    oracle = OraclePredictor(gt, img)
    p = AutoParams(grid=4, min_distance=10, blob_sigma=1, max_area_fraction=0.5, points_per_batch=4)
    blobs, grid = _split_candidates(oracle.source.rgb(0), p)
    assert len(blobs) >= 1 and (gt[0][tuple(blobs.astype(int).T)] == 1).all()
    on_object = int((gt[0][tuple(grid.astype(int).T)] == 1).sum())
    assert on_object >= 1
    res = segment_slice(oracle, 0, p)
    assert res.n_prompts == len(blobs) + len(grid) - on_object == sum(oracle.sizes)
    assert np.array_equal(res.labels == 1, gt[0] == 1)


def test_batch_bounds_use_few_shapes():
    from napari_mobilesam.volume.automatic import batch_bounds

    assert batch_bounds(0, 16) == []
    assert batch_bounds(13, 16) == [(0, 8), (8, 12), (12, 13)]
    b = batch_bounds(45, 16)
    assert b == [(0, 16), (16, 32), (32, 40), (40, 44), (44, 45)]
    for n in range(0, 100):
        bb = batch_bounds(n, 16)
        assert sum(e - s for s, e in bb) == n and all(b2[0] == b1[1] for b1, b2 in zip(bb, bb[1:]))
        assert {e - s for s, e in bb} <= {1, 2, 4, 8, 16}
    with pytest.raises(ValueError):
        batch_bounds(3, 0)
