"""Objects stay themselves through z (issue #13): crafted volumes for each rule.

The model is replaced by `GroundTruthOracle` (a FAKE that answers every prompt with the true object
under it, optionally with ±1 px errors; NOT a model) so that the rules of propagation and stitching
are checked against known truth. The real model runs through the same code in test_propagate.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_mobilesam.core.predictor import Prompt
from napari_mobilesam.data import synthetic_nuclei
from napari_mobilesam.testing import GroundTruthOracle
from napari_mobilesam.volume.candidates import candidate_points, slice_contrast
from napari_mobilesam.volume.propagation import (
    STOP_REASONS,
    ObjectPrompts,
    describe_stops,
    propagate,
)
from napari_mobilesam.volume.stitch import Stitcher


def balls(shape, centers, radii):
    """Labels 1..N of ellipsoids (z, row, col) that touch where they meet: each voxel goes to the
    ellipsoid it lies deepest in (like the sample generator)."""
    zz, yy, xx = np.indices(shape, dtype=float)
    best = np.full(shape, np.inf)
    lab = np.zeros(shape, np.uint16)
    for i, (c, r) in enumerate(zip(centers, radii), start=1):
        d = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        inside = (d <= 1) & (d < best)
        lab[inside], best[inside] = i, d[inside]
    return lab


def extent(lab, i):
    zs = np.flatnonzero((lab == i).any(axis=(1, 2)))
    return int(zs[0]), int(zs[-1])


def click(lab, i, z):
    dt = ndi.distance_transform_edt(lab[z] == i)
    return Prompt.from_clicks([np.unravel_index(int(np.argmax(dt)), dt.shape)])


def written_equals_records(res, label):
    """Records, extent and stops of ``label`` equal what is in ``res.labels``."""
    zs = set(np.flatnonzero((res.labels == label).any(axis=(1, 2))).tolist())
    acc = [r for r in res.records if r.label == label and r.accepted]
    assert {r.z for r in acc} == zs
    assert all(r.area == int((res.labels[r.z] == label).sum()) for r in acc)
    assert res.extent(label) == (min(zs), max(zs))
    for s in res.stops_for(label):
        assert s.last_z in zs and s.reason in STOP_REASONS


# two nuclei stacked in z, B a little off-axis: A (z 2..15) right under B (z 14..32); on z=15 A
# has 159 pixels (its tip) and B 134, on z=16 B has 373
STACK = balls((36, 64, 64), [(9, 30, 30), (23, 33, 32)], [(7.5, 14, 14), (9.5, 16, 16)])


def test_two_nuclei_touching_in_z_each_keeps_its_own_slices():
    gt = STACK
    (_a0, a1), (b0, _b1) = extent(gt, 1), extent(gt, 2)
    assert a1 >= b0 - 1  # they touch across slices
    objs = [ObjectPrompts(i, prompts={z: click(gt, i, z)}) for i, z in ((1, 9), (2, 24))]
    res = propagate(GroundTruthOracle(gt, gt, candidates="spread"), objs)
    assert not np.any((res.labels > 0) & (res.labels != gt))  # nothing written onto the other
    for i in (1, 2):  # each one complete (but slivers no click reaches: B's 3 pixels on z=14)
        assert np.count_nonzero((gt == i) & (res.labels != i)) <= 5
    for i in (1, 2):
        written_equals_records(res, i)
    assert {s.direction: s.reason for s in res.stops_for(1)}[1] in ("neighbour", "area_change")


def test_alone_an_object_does_not_run_into_its_neighbour_in_z():
    """Only A is propagated (B is nobody's): the regrowth rule stops A at its own end."""
    gt = STACK
    res = propagate(GroundTruthOracle(gt, gt, candidates="spread"), [ObjectPrompts(1, prompts={9: click(gt, 1, 9)})])
    a0, a1 = extent(gt, 1)
    assert res.extent(1) == (a0, a1)
    up = [s for s in res.stops_for(1) if s.direction == 1][0]
    assert up.reason == "area_change" and up.at_z == a1 + 1
    assert "area changed" in describe_stops(res)


def test_a_front_meeting_a_committed_object_stops_there():
    """B is already in the labels (``target``, e.g. committed earlier in the Labels layer) and A is
    answered one pixel too large: A's front must not walk onto B, and B is never touched."""
    gt = STACK
    target = np.where(gt == 2, 7, 0).astype(np.uint16)
    res = propagate(GroundTruthOracle(gt, gt, candidates="spread", error="dilated"),
                    [ObjectPrompts(1, prompts={9: click(gt, 1, 9)})], target=target)
    assert np.array_equal(res.labels == 7, gt == 2)
    a0, a1 = extent(gt, 1)
    up = [s for s in res.stops_for(1) if s.direction == 1][0]
    assert up.reason in ("neighbour", "area_change") and up.last_z == a1
    assert "another object" in describe_stops(res) or up.reason == "area_change"
    written_equals_records(res, 1)


def test_a_slice_taken_first_by_the_wrong_object_is_taken_back():
    """A is seeded next to its top, B far from its bottom: A reaches B's bottom slice first and
    takes it; B, arriving later with the better claim (its previous slices hold the candidate and
    foretell its size), takes it back; records and stops follow."""
    gt = balls((40, 64, 64), [(8, 30, 30), (26, 31, 36)], [(6.5, 14, 14), (11.5, 18, 18)])
    (_a0, a1), (_b0, b1) = extent(gt, 1), extent(gt, 2)
    objs = [ObjectPrompts(1, prompts={a1 - 1: click(gt, 1, a1 - 1)}),
            ObjectPrompts(2, prompts={b1 - 2: click(gt, 2, b1 - 2)})]
    res = propagate(GroundTruthOracle(gt, gt, candidates="spread"), objs)
    assert np.array_equal(res.labels, gt)
    for i in (1, 2):
        written_equals_records(res, i)
    up = [s for s in res.stops_for(1) if s.direction == 1][0]
    assert up.last_z == a1 and up.at_z == a1 + 1


def test_overlapping_fronts_share_a_slice_by_claim():
    """Two columns side by side, answered 1 px too large (dilated oracle): their masks overlap on
    every slice. The shared band goes to one of them, nothing is written twice, nothing is lost."""
    lab = np.zeros((12, 40, 60), np.uint16)
    lab[:, 10:30, 8:30] = 1
    lab[:, 10:30, 30:52] = 2
    objs = [ObjectPrompts(i, prompts={6: click(lab, i, 6)}) for i in (1, 2)]
    res = propagate(GroundTruthOracle(lab, lab, error="dilated", candidates="spread"), objs)
    for i in (1, 2):
        assert res.extent(i) == (0, 11)
        written_equals_records(res, i)
        inter = ((res.labels == i) & (lab == i)).sum() / (lab == i).sum()
        assert inter > 0.9
    assert set(np.unique(res.labels)) == {0, 1, 2}


def test_candidate_choice_takes_the_exact_mask_not_the_largest():
    """The oracle offers (exact, dilated, eroded) with the exact one scored best: every step must
    choose it, so the result is the truth (the old IoU-first choice drifted to the dilated one)."""
    st = synthetic_nuclei((20, 96, 96), n_nuclei=5, seed=2)
    gt = st.labels
    objs = []
    for i in range(1, st.n_objects + 1):
        z0, z1 = extent(gt, i)
        objs.append(ObjectPrompts(i, prompts={(z0 + z1) // 2: click(gt, i, (z0 + z1) // 2)}))
    res = propagate(GroundTruthOracle(gt, st.image, candidates="spread"), objs)
    steps = [r for r in res.records if r.direction != 0 and r.accepted]
    assert steps and all(r.candidate == 0 for r in steps)
    assert np.array_equal(res.labels, gt)


def test_crowded_stack_records_equal_labels_with_noisy_oracle():
    """Crowded nuclei (touching in x, y and z) with a ±1 px oracle: no object is written onto
    another's true slice for most of its pixels, and records always equal what is written."""
    st = synthetic_nuclei((24, 112, 112), n_nuclei=14, seed=3, crowded=True)
    gt = st.labels
    objs = []
    for i in range(1, st.n_objects + 1):
        z0, z1 = extent(gt, i)
        objs.append(ObjectPrompts(i, prompts={(z0 + z1) // 2: click(gt, i, (z0 + z1) // 2)}))
    res = propagate(GroundTruthOracle(gt, st.image, error="jitter", candidates="spread", seed=4), objs)
    for i in range(1, st.n_objects + 1):
        written_equals_records(res, i)
        r = res.labels == i
        for z in np.flatnonzero(r.any(axis=(1, 2))):
            on_other = np.count_nonzero(r[z] & (gt[z] > 0) & (gt[z] != i))
            assert on_other <= 0.5 * np.count_nonzero(r[z]), (i, z)


def test_crowded_generator():
    plain = synthetic_nuclei((20, 96, 96), n_nuclei=8, seed=1)
    again = synthetic_nuclei((20, 96, 96), n_nuclei=8, seed=1, crowded=False)
    assert np.array_equal(plain.image, again.image) and np.array_equal(plain.labels, again.labels)
    st = synthetic_nuclei((30, 128, 128), n_nuclei=20, seed=0, crowded=True)
    gt = st.labels
    z_touch = np.count_nonzero((gt[1:] > 0) & (gt[:-1] > 0) & (gt[1:] != gt[:-1]))
    xy_touch = np.count_nonzero((gt[:, 1:] > 0) & (gt[:, :-1] > 0) & (gt[:, 1:] != gt[:, :-1]))
    assert z_touch > 0 and xy_touch > 0
    mid = st.image.shape[0] // 2
    assert slice_contrast(st.image[mid]) < 0.5 * slice_contrast(plain.image[10])  # low contrast


# --------------------------------------------------------------------------- stitching


def test_stitcher_splits_nuclei_touching_in_z():
    """Slice-by-slice true labels of two stacked nuclei: two ids with the size-change rule."""
    gt = STACK
    st = Stitcher(min_iou=0.3, min_overlap=0.6, max_gap=1, regrow=1.3)
    on = np.stack([st.add(sl) for sl in gt])
    pairs = set(zip(gt[gt > 0].tolist(), on[gt > 0].tolist()))
    assert len({s for _, s in pairs}) == 2 and len(pairs) <= 3
    for i in (1, 2):  # each true object has its own id on (nearly) all its voxels
        vals, counts = np.unique(on[gt == i], return_counts=True)
        assert counts.max() / counts.sum() > 0.9
    with pytest.raises(ValueError, match="regrow"):
        Stitcher(regrow=0.5)


def test_stitcher_keeps_every_object_of_the_crowded_stack():
    st = synthetic_nuclei((30, 128, 128), n_nuclei=20, seed=0, crowded=True)
    gt = st.labels.astype(np.int32)
    stitcher = Stitcher()
    out = np.stack([stitcher.add(sl) for sl in gt])
    majority = {}
    for i in np.unique(gt[gt > 0]):
        vals, counts = np.unique(out[gt == i], return_counts=True)
        majority[int(i)] = int(vals[np.argmax(counts)])
    assert len(set(majority.values())) == len(majority)


# --------------------------------------------------------------------------- candidate points


def test_candidate_points_follow_each_slices_contrast():
    st = synthetic_nuclei((30, 128, 128), n_nuclei=20, seed=0, crowded=True)
    z = 15
    pts = candidate_points(st.image[z])
    ids = {int(st.labels[z][int(r), int(c)]) for r, c in pts} - {0}
    present = set(np.unique(st.labels[z])) - {0}
    big = {i for i in present if (st.labels[z] == i).sum() >= 150}
    assert len(big & ids) >= 0.8 * len(big)  # low contrast (about 5x the noise): blobs still found
    noise = np.random.default_rng(0).normal(100, 10, (128, 128))
    from napari_mobilesam.volume.params import AutoParams

    assert len(candidate_points(noise, AutoParams(grid=0))) == 0  # pure noise: no blob points


def test_candidate_points_on_a_large_slice_use_a_working_scale():
    from napari_mobilesam.volume import candidates as cand
    from napari_mobilesam.volume.params import AutoParams

    st = synthetic_nuclei((16, 256, 256), n_nuclei=10, seed=1)
    tile = st.image[8]
    big = np.tile(tile, (9, 9))  # 2304 x 2304 > WORK_SIZE
    p = AutoParams(grid=0, max_points=10_000)
    assert cand._working_scale(big.astype(np.float32), p) == 2
    pts = candidate_points(big, p)
    lab = np.tile(st.labels[8], (9, 9))
    on = lab[np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)]
    assert len(pts) and np.mean(on > 0) > 0.9  # the points still land on nuclei
