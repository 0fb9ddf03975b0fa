"""Re-propagating a corrected object from the corrected slice (`volume.repropagate`), and the
tip-slice retry of propagation, on small crafted volumes with the ground-truth oracle (a stand-in
for the model, NOT a model)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.errors import InputError
from napari_mobilesam.testing import GroundTruthOracle
from napari_mobilesam.volume.propagation import ObjectPrompts, propagate
from napari_mobilesam.volume.repropagate import repropagate, repropagation_span


def _ball(shape, center, radii):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cz, cy, cx = center
    rz, ry, rx = radii
    return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _two_objects():
    """Object 1: a ball through z 1..11; object 2: a ball beside it (never to be touched)."""
    shape = (13, 48, 64)
    gt = np.zeros(shape, np.int32)
    gt[_ball(shape, (6, 24, 18), (5.5, 9, 9))] = 1
    gt[_ball(shape, (6, 24, 46), (5.5, 9, 9))] = 2
    img = (gt > 0).astype(np.float32) * 200 + 20
    return gt, img


def test_span_stops_at_the_nearest_protected_slices():
    assert repropagation_span(5, 13, {9, 2, 11}) == (3, 9)
    assert repropagation_span(5, 13, {5}) == (0, 13)  # the edited slice itself does not limit
    assert repropagation_span(0, 4, ()) == (0, 4)


def test_repropagate_rewrites_only_the_span_of_the_corrected_object():
    gt, img = _two_objects()
    oracle = GroundTruthOracle(gt, img)
    # what the user has: object 1 wrong everywhere (shifted by 6 columns), object 2 right;
    # slice 9 was corrected by hand to something that differs from the truth (kept as it is)
    labels = np.where(gt == 2, 2, 0).astype(np.int32)
    wrong = np.roll(gt == 1, 6, axis=2) & (labels == 0)
    labels[wrong] = 1
    labels[5][labels[5] == 1] = 0
    labels[5][gt[5] == 1] = 1  # the correction on slice 5
    hand = np.zeros(gt.shape[1:], bool)
    hand[20:26, 14:20] = True
    labels[9][labels[9] == 1] = 0
    labels[9][hand] = 1
    before = labels.copy()

    res = repropagate(oracle, labels, 1, 5, protected={9, 5})

    out = res.labels
    np.testing.assert_array_equal(labels, before)  # not in place: the input is untouched
    np.testing.assert_array_equal(out == 2, gt == 2)  # the other object is untouched
    for z in range(0, 9):  # rewritten from slice 5 down to the stack's start and up to slice 8
        np.testing.assert_array_equal(out[z] == 1, gt[z] == 1, err_msg=f"slice {z}")
    np.testing.assert_array_equal(out[9], before[9])  # the protected slice is kept
    for z in range(10, 13):  # past the protected slice nothing changes
        np.testing.assert_array_equal(out[z], before[z])
    up = [s for s in res.stops if s.direction == 1]
    assert [(s.last_z, s.at_z, s.reason) for s in up] == [(8, 9, "protected")]
    assert {s.reason for s in res.stops if s.direction == -1} <= {"empty", "stack_end"}


def test_repropagate_in_place_and_errors():
    gt, img = _two_objects()
    oracle = GroundTruthOracle(gt, img)
    labels = np.where(gt == 2, 2, 0).astype(np.int32)
    labels[6][gt[6] == 1] = 1
    res = repropagate(oracle, labels, 1, 6, inplace=True)
    assert res.labels is labels
    np.testing.assert_array_equal(labels == 1, gt == 1)
    with pytest.raises(InputError, match="not on slice 3"):
        repropagate(oracle, np.zeros_like(labels), 1, 3)
    with pytest.raises(InputError, match="outside the stack"):
        repropagate(oracle, labels, 1, 6, protected={40})
    with pytest.raises(InputError, match="z_range"):
        repropagate(oracle, labels, 1, 6, z_range=(0, 4))


def test_a_tip_beside_a_neighbour_is_found():
    """Object 1's last slice (z = 2) is a small patch beside object 2, which covers the centre of
    object 1's footprint there: the click derived from slice 3 lands on object 2, and the retry
    clicks on the free part of slice 3's mask find the tip; nothing walks into object 2."""
    shape = (8, 48, 48)
    gt = np.zeros(shape, np.int32)
    gt[3:7][_ball((4, 48, 48), (1.5, 24, 24), (3, 8, 8))] = 1
    gt[2, 20:29, 20:29] = 2  # the neighbour on the tip slice, under the object's centre
    gt[1, 20:29, 20:29] = 2
    gt[2, 21:24, 17:20] = 1  # the tip: 9 px against the neighbour, inside slice 3's mask
    img = (gt > 0).astype(np.float32) * 200 + 20
    oracle = GroundTruthOracle(gt, img, candidates="spread")
    objs = [ObjectPrompts(1, masks={5: gt[5] == 1}), ObjectPrompts(2, masks={1: gt[1] == 2})]
    res = propagate(oracle, objs, prefetch=False)
    np.testing.assert_array_equal(res.labels == 1, gt == 1)
    np.testing.assert_array_equal(res.labels == 2, gt == 2)


def test_a_tip_taken_before_its_neighbour_arrived_is_decided_again():
    """Object 1 reaches its tip slice (z = 2) before object 2's front does: its click there lands on
    object 2, which is not written yet, so it first takes object 2's pixels. When object 2's front
    arrives with the better claim it takes them back, and object 1 decides slice 2 again, now
    finding its tip beside object 2."""
    shape = (8, 48, 48)
    gt = np.zeros(shape, np.int32)
    gt[3:7][_ball((4, 48, 48), (1.5, 24, 24), (3, 8, 8))] = 1
    gt[0:3, 20:29, 20:29] = 2
    gt[2, 21:24, 17:20] = 1  # the tip, against object 2
    img = (gt > 0).astype(np.float32) * 200 + 20
    oracle = GroundTruthOracle(gt, img, candidates="spread")
    objs = [ObjectPrompts(1, masks={3: gt[3] == 1}), ObjectPrompts(2, masks={0: gt[0] == 2})]
    res = propagate(oracle, objs, prefetch=False)
    np.testing.assert_array_equal(res.labels == 1, gt == 1)
    np.testing.assert_array_equal(res.labels == 2, gt == 2)
    taken_back = [r for r in res.records if r.label == 1 and r.z == 2 and not r.accepted]
    assert [r.reason for r in taken_back] == ["neighbour"]  # the first decision, taken back
    assert res.extent(1) == (2, 6) and res.extent(2) == (0, 2)


def test_a_stopped_repropagation_keeps_the_object_where_it_did_not_reach():
    gt, img = _two_objects()
    oracle = GroundTruthOracle(gt, img)
    labels = gt.copy()
    labels[labels == 1] = 0
    labels[np.roll(gt == 1, 3, axis=2) & (gt == 0)] = 1  # object 1 shifted on every slice
    labels[6][labels[6] == 1] = 0
    labels[6][gt[6] == 1] = 1  # corrected on slice 6
    before = labels.copy()
    calls = []

    def stop_after_one():  # the Stop button pressed once a slice is done
        calls.append(1)
        return len(calls) > 1

    res = repropagate(oracle, labels, 1, 6, cancel=stop_after_one)
    assert res.cancelled
    decided = {r.z for r in res.records if r.label == 1}
    out = res.labels
    np.testing.assert_array_equal(out == 2, gt == 2)
    for z in range(gt.shape[0]):
        if z not in decided:  # never reached: exactly as before, not erased
            np.testing.assert_array_equal(out[z], before[z], err_msg=f"slice {z}")
    assert len(decided) < gt.shape[0]
