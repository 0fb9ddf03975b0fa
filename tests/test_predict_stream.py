"""Predictions kept small: `SlicePredictor.iter_predict`, ``keep="best"``, `iter_predictions` for any
predictor, and the batch slice painter that keeps only the output slice."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_mobilesam.batch.slices import segment_objects_on_slice
from napari_mobilesam.core.predictor import Prompt, SlicePredictor, iter_predictions


def _prompts(n: int, seed: int = 0) -> list[Prompt]:
    pts = np.random.default_rng(seed).uniform(4, 60, (n, 2))
    out = [Prompt(points=[p], labels=[1]) for p in pts]
    out[1] = Prompt(points=[pts[1]], labels=[1], box=[2, 2, 40, 50])  # a second prompt structure
    return out


def test_iter_predict_equals_predict_many_and_keep_best(engine_sam_test):
    img = np.random.default_rng(3).integers(0, 255, (64, 80), np.uint8)
    pred = SlicePredictor(engine_sam_test, img, max_batch=4)
    prompts = _prompts(11)
    ref = pred.predict_many(0, prompts)
    seen = []
    for i, p in pred.iter_predict(0, prompts):
        seen.append(i)
        np.testing.assert_array_equal(p.masks, ref[i].masks)
        np.testing.assert_array_equal(p.low_res, ref[i].low_res)
    assert sorted(seen) == list(range(11))
    best = pred.predict_many(0, prompts, keep="best")
    for b, r in zip(best, ref):
        k = r.best
        assert b.masks.shape == (1, 64, 80) and b.best == 0
        np.testing.assert_array_equal(b.mask, r.masks[k])
        np.testing.assert_array_equal(b.low_res[0], r.low_res[k])
        assert b.iou[0] == r.iou[k] and b.stability[0] == r.stability[k]
    with pytest.raises(ValueError, match="keep"):
        list(pred.iter_predict(0, prompts, keep="some"))


class _Fixed:
    """A fake predictor (NOT a model): prompt ``i``'s answer is ``masks[i]`` with score ``scores[i]``;
    records the size of every ``predict_many`` call."""

    max_batch = 3

    def __init__(self, masks, scores):
        self.masks, self.scores, self.calls = masks, scores, []
        self.source = SimpleNamespace(slice_shape=masks[0].shape, n_slices=1)

    def predict_many(self, z, prompts):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            i = int(p.points[0][0])
            m = self.masks[i]
            out.append(SimpleNamespace(masks=np.stack([m, np.zeros_like(m)]), iou=np.array([self.scores[i], 0.1]),
                                       stability=np.array([0.9, 0.9]), low_res=np.zeros((2, 256, 256), np.float32)))
        return out


def test_iter_predictions_chunks_any_predictor_and_the_painter_keeps_the_rule():
    h, w = 8, 8
    masks = [np.zeros((h, w), bool) for _ in range(7)]
    masks[0][0:4, 0:4] = True  # score 0.5
    masks[1][2:6, 2:6] = True  # score 0.9: wins the overlap with 0
    masks[2][6:8, 0:8] = True  # score 0.7
    masks[3][6:8, 4:8] = True  # score 0.7: a tie with 2, the earlier object keeps it
    for i, (r, c) in zip(range(4, 7), [(5, 6), (5, 7), (4, 7)]):
        masks[i][r, c] = True  # apart from the others
    scores = [0.5, 0.9, 0.7, 0.7, 0.6, 0.6, 0.6]
    fake = _Fixed(masks, scores)
    items = [(10 + i, {"points": [[i, 0]], "labels": [1], "box": None}) for i in range(7)]
    out = segment_objects_on_slice(fake, 0, items)
    assert fake.calls == [3, 3, 1]
    assert (out[2:6, 2:6] == 11).all()
    assert (out[0:2, 0:4] == 10).all() and (out[2:4, 0:2] == 10).all()
    assert (out[6:8, :] == 12).all()
    assert out[5, 6] == 14 and out[5, 7] == 15 and out[4, 7] == 16
    got = dict(iter_predictions(fake, 0, [Prompt(points=[[i, 0]]) for i in range(7)], keep="best"))
    assert sorted(got) == list(range(7))
    assert all(p.masks.shape == (1, h, w) for p in got.values())
