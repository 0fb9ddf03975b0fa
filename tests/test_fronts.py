"""Candidate choice on small masks (an object's tips): the second opinion and its consensus.

The model is replaced by `GroundTruthOracle` (a FAKE that answers every prompt with the true object
under it, here with ±1 px errors drawn per prompt; NOT a model); the real model runs through the
same code in test_propagate.py.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from test_neighbours import balls, click, extent

from napari_mobilesam.testing import GroundTruthOracle
from napari_mobilesam.volume import fronts
from napari_mobilesam.volume.fronts import (
    SECOND_CLICKS,
    Choice,
    Front,
    Rules,
    consensus,
)
from napari_mobilesam.volume.propagation import ObjectPrompts, propagate


def disc(r, shape=(30, 30), center=(15, 15)):
    yy, xx = np.indices(shape)
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= r * r


def choices(*masks):
    return [Choice(k, m, int(m.sum()), 0.9, 0.9, 0.0, 0.0) for k, m in enumerate(masks)]


def test_consensus_takes_the_mask_the_predictions_agree_on():
    """Three ±1 px answers on a small disc (shrunk, exact, grown; each with its grown and shrunk
    versions): the exact disc is the one every prediction holds."""
    t = disc(3)
    e, d = ndi.binary_erosion(t), ndi.binary_dilation(t)
    opts = [choices(e, ndi.binary_dilation(e), ndi.binary_erosion(e)), choices(t, d, e),
            choices(d, ndi.binary_dilation(d), ndi.binary_erosion(d))]
    j, c = consensus(opts, lambda c: True)
    assert np.array_equal(c.mask, t)
    # the first prediction alone keeps its own first candidate (its shrunk answer)
    assert np.array_equal(consensus(opts[:1], lambda c: True)[1].mask, e)
    # candidates that may not be taken neither win nor vote; nothing allowed: None
    j, c = consensus(opts, lambda c: c.area != int(t.sum()))
    assert not np.array_equal(c.mask, t)
    assert consensus(opts, lambda c: False) is None


def test_consensus_tie_goes_to_the_smaller_mask():
    """Answers exact and grown on a 5-pixel tip (the shrunk one is empty): both masks are held by
    both predictions; the smaller one, which every answer contains, wins."""
    t = np.zeros((20, 20), bool)
    t[9:11, 9:11] = True
    t[8, 9] = True
    d = ndi.binary_dilation(t)
    opts = [choices(d, ndi.binary_dilation(d), ndi.binary_erosion(d)), choices(t, d, ndi.binary_erosion(t))]
    assert np.array_equal(consensus(opts, lambda c: True)[1].mask, t)


def test_second_prompts_click_the_core_first():
    t = disc(3)
    front = Front(1, 0, 1, 0, 5, "stack_end", disc(5), None, int(disc(5).sum()))
    prompts = front.second_prompts(Rules(), [ndi.binary_dilation(t), t], None)
    pts = np.array([p.points[0] for p in prompts]).astype(int)
    assert len(prompts) == SECOND_CLICKS
    assert len({tuple(p) for p in pts}) == len(pts)  # distinct pixels
    assert t[tuple(pts[0])] and t[tuple(pts[:int(t.sum())].T)].all()  # the shared core first
    taken = np.ones_like(t)
    assert front.second_prompts(Rules(), [t], taken) == []


def test_tips_of_a_few_pixels_are_found_with_a_noisy_oracle(monkeypatch):
    """Two ellipsoids whose end slices are 5 pixels: with ±1 px answers drawn per prompt (the
    shrunk answer there is empty, the grown one three times the tip), the second opinion gets the
    tips right far more often than the first answer alone."""
    gt = balls((17, 48, 72), [(8, 24, 20), (8, 24, 50)], [(7.03, 14, 14), (7.03, 14, 13)])  # tips of 5 px
    objs = [ObjectPrompts(i, prompts={(extent(gt, i)[0] + extent(gt, i)[1]) // 2:
                                      click(gt, i, (extent(gt, i)[0] + extent(gt, i)[1]) // 2)}) for i in (1, 2)]
    tips = [(i, z) for i in (1, 2) for z in extent(gt, i) if (gt[z] == i).sum() < fronts.SMALL_AREA]
    assert len(tips) == 4 and all((gt[z] == i).sum() == 5 for i, z in tips)

    def right_tips(seeds):
        n = 0
        for s in seeds:
            res = propagate(GroundTruthOracle(gt, gt, error="jitter", candidates="spread", seed=s), objs)
            for i, z in tips:
                g, r = gt[z] == i, res.labels[z] == i
                n += (g & r).sum() / (g | r).sum() >= 0.5
        return n

    seeds = range(1, 9)
    with_opinion = right_tips(seeds)
    monkeypatch.setattr(fronts, "SMALL_AREA", 0)  # no second opinion: the first answer is kept
    without = right_tips(seeds)
    assert with_opinion >= 0.85 * 4 * len(seeds) and with_opinion > without + 4, (with_opinion, without)


def test_second_opinion_keeps_predictions_bit_packed():
    """The first predictions of small masks wait bit-packed (1/8 of the bytes), masks unchanged."""
    from types import SimpleNamespace

    from napari_mobilesam.volume.second_tries import _Kept

    masks = np.stack([disc(3, (61, 67)), disc(4, (61, 67)), disc(2, (61, 67))])
    pred = SimpleNamespace(masks=masks, iou=np.array([0.9, 0.8, 0.7]), stability=np.ones(3),
                           low_res=np.zeros((3, 256, 256), np.float32))
    kept = _Kept(pred, 1)
    assert np.array_equal(kept.masks, masks) and kept.first == 1 and kept.low_res is pred.low_res
    assert kept.bits.nbytes * 7 < masks.nbytes
