"""The ground-truth oracle (a stand-in for the model in tests and benchmarks; NOT a model)."""

import numpy as np
from scipy import ndimage as ndi

from napari_mobilesam.testing import GroundTruthOracle


def _disc_stack():
    yy, xx = np.mgrid[:40, :40]
    gt = np.zeros((3, 40, 40), np.uint16)
    gt[:, (yy - 20) ** 2 + (xx - 20) ** 2 <= 64] = 1
    return gt


def test_jitter_answers_the_same_prompt_the_same_way():
    """Like a real model, the ±1 px oracle gives one answer per prompt: asking again (also with
    another ``mask_input``, which it ignores) cannot draw another error; other clicks draw anew."""
    gt = _disc_stack()
    truth = gt[1] == 1
    kinds = {"eroded": ndi.binary_erosion(truth), "exact": truth, "dilated": ndi.binary_dilation(truth)}
    oracle = GroundTruthOracle(gt, gt, error="jitter", seed=5)
    seen = set()
    for r in range(14, 27):
        for c in (17, 20, 23):
            first = oracle.predict(1, points=[[r, c]], labels=[1]).masks[0]
            again = oracle.predict(1, points=[[r + 0.2, c - 0.3]], labels=[1],
                                   mask_input=np.ones((1, 256, 256), np.float32)).masks[0]
            assert np.array_equal(first, again)
            seen |= {k for k, m in kinds.items() if np.array_equal(first, m)}
    assert seen == set(kinds)  # every error shows up over the 39 prompts
    other = GroundTruthOracle(gt, gt, error="jitter", seed=6)
    answers = [[oracle.predict(1, points=[[r, 20]]).masks[0].sum() for r in range(14, 27)],
               [other.predict(1, points=[[r, 20]]).masks[0].sum() for r in range(14, 27)]]
    assert answers[0] != answers[1]  # the seed matters
    box = oracle.predict(1, box=[12, 12, 28, 28]).masks[0]
    assert np.array_equal(box, oracle.predict(1, box=[12.1, 11.9, 28, 28]).masks[0])


def test_exact_and_spread_candidates():
    gt = _disc_stack()
    pred = GroundTruthOracle(gt, gt, candidates="spread").predict(0, points=[[20, 20]])
    truth = gt[0] == 1
    assert np.array_equal(pred.masks[0], truth) and pred.best == 0
    assert np.array_equal(pred.masks[1], ndi.binary_dilation(truth))
    assert np.array_equal(pred.masks[2], ndi.binary_erosion(truth))
