"""SlicePredictor: parity with the official MobileSAM outputs, (row, col) handling, batching, bad prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_mobilesam.core.embeddings import EmbeddingCache
from napari_mobilesam.core.predictor import (
    Prediction,
    Prompt,
    PromptError,
    SlicePredictor,
)
from napari_mobilesam.core.source import SliceSource


def _xy_to_rc(points):
    return [[y, x] for x, y in points]


def _box_xy_to_rc(box):
    x0, y0, x1, y1 = box
    return [y0, x0, y1, x1]


@pytest.fixture(scope="module")
def reference(reference_dir):
    exp = np.load(reference_dir / "mobile_sam_expected.npz")
    cases = json.loads((reference_dir / "mobile_sam_cases.json").read_text())
    return exp, cases


@pytest.fixture(scope="module")
def ref_predictor(engine_sam_reference, reference):
    exp, _ = reference
    src = SliceSource(exp["image"], normalize="none")
    return SlicePredictor(engine_sam_reference, src)


def test_real_model_parity_with_official_outputs(ref_predictor, reference):
    """The real MobileSAM (fixture weights) through our whole path matches the official predictor."""
    exp, cases = reference
    emb = ref_predictor.cache.get(ref_predictor.source, 0)
    assert emb.features.dtype == torch.float32 and tuple(emb.features.shape) == (1, 256, 64, 64)
    assert emb.original_size == (437, 300) and emb.input_size == (1024, 703)
    # float16 storage in the cache: compare within float16's resolution of the embedding values
    ref_emb = exp["embedding"]
    assert np.abs(emb.features.numpy() - ref_emb).max() <= 1e-3 + 1e-3 * np.abs(ref_emb).max()

    # exact float32 storage gives the 1e-3 parity tolerance
    exact = SlicePredictor(
        ref_predictor.sam, ref_predictor.source, EmbeddingCache(ref_predictor.sam, dtype=torch.float32)
    )
    key = ref_predictor.source.slice_key(0)
    exact.cache._put_mem(key, emb.features.cpu(), emb.input_size, emb.original_size)  # reuse: no 2nd encoder run
    assert np.abs(exact.cache.get(exact.source, 0).features.numpy() - ref_emb).max() < 2e-2  # fp16 round trip
    # put the exact embedding from the official run to check the decoder path at the strict tolerance
    exact.cache.clear_memory()
    exact.cache._put_mem(key, torch.from_numpy(ref_emb), emb.input_size, emb.original_size)

    for name, case in cases.items():
        kw = {"multimask": case["multimask"], "return_logits": True}
        if "points" in case:
            kw["points"] = _xy_to_rc(case["points"])
            kw["labels"] = case["labels"]
        if "box" in case:
            kw["box"] = _box_xy_to_rc(case["box"])
        if case.get("mask_from"):
            kw["mask_input"] = exp[f"{case['mask_from']}/low_res"]
        pred = exact.predict(0, **kw)
        assert isinstance(pred, Prediction)
        np.testing.assert_allclose(pred.iou, exp[f"{name}/iou"].reshape(-1), atol=1e-3, err_msg=name)
        np.testing.assert_allclose(pred.low_res, exp[f"{name}/low_res"].reshape(pred.low_res.shape), atol=1e-2)
        ref_logits = exp[f"{name}/logits"].reshape(pred.logits.shape)
        np.testing.assert_allclose(pred.logits, ref_logits, atol=1e-2, err_msg=name)
        assert pred.masks.shape == ref_logits.shape and pred.masks.dtype == bool
        # masks agree except where the reference logit sits within the tolerance of the threshold
        disagree = pred.masks != (ref_logits > 0)
        assert np.all(np.abs(ref_logits[disagree]) < 1e-2), name

        # the fp16 cache path (what users get by default) stays close
        fast = ref_predictor.predict(0, **{k: v for k, v in kw.items() if k != "return_logits"})
        assert np.abs(fast.iou - pred.iou).max() < 0.05
        agree = (fast.masks == pred.masks).mean()
        assert agree > 0.99, (name, agree)


def test_upscale_in_region_equals_full(engine_sam_test):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(2, 150, 97), dtype=np.uint8)
    pred = SlicePredictor(engine_sam_test, SliceSource(img, normalize="none"))
    low = torch.from_numpy(rng.normal(-3, 2, size=(3, 256, 256)).astype(np.float32))
    low[:, 100:130, 20:60] += 6.0  # a blob of positive logits
    original, resized = (150, 97), (1024, 662)
    m_region, s_region, _ = pred._upscale(low, original, resized, full=False)
    m_full, s_full, logits = pred._upscale(low, original, resized, full=True)
    assert np.array_equal(m_region, m_full)
    np.testing.assert_allclose(s_region, s_full, atol=1e-6)
    # the matrices reproduce SAM's two-step bilinear up-scaling
    ref = torch.nn.functional.interpolate(low[None], (1024, 1024), mode="bilinear", align_corners=False)
    ref = torch.nn.functional.interpolate(ref[..., :1024, :662], original, mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(logits, ref.numpy(), atol=5e-4)  # float32 rounding of two paths
    # stability as defined by SAM: IoU of the masks at +1 and -1
    from segment_anything.utils.amg import calculate_stability_score

    np.testing.assert_allclose(s_full, calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy(), atol=1e-6)
    np.testing.assert_allclose(s_full, calculate_stability_score(ref, 0.0, 1.0).numpy(), atol=1e-3)


@pytest.mark.parametrize("original", [(512, 512), (2000, 3000), (20, 31), (1024, 300)])
def test_upscale_equals_sam_interpolation_at_any_size(engine_sam_test, original):
    """The banded (tap) resizing equals SAM's up-scale, crop, resize for up- and down-sizing."""
    from napari_mobilesam.core.embeddings import input_size_for

    rng = np.random.default_rng(3)
    pred = SlicePredictor(engine_sam_test, SliceSource(np.zeros((1, 8, 8), np.uint8), normalize="none"))
    low = torch.from_numpy(rng.normal(0, 3, size=(2, 256, 256)).astype(np.float32))
    resized = input_size_for(original)
    masks, _, logits = pred._upscale(low, original, resized, full=True)
    ref = torch.nn.functional.interpolate(low[None], (1024, 1024), mode="bilinear", align_corners=False)
    ref = ref[..., : resized[0], : resized[1]]
    ref = torch.nn.functional.interpolate(ref, original, mode="bilinear", align_corners=False)[0]
    assert logits.shape == masks.shape == (2, *original)
    np.testing.assert_allclose(logits, ref.numpy(), atol=5e-4)
    assert np.array_equal(masks, logits > 0)


def test_row_col_order_matches_sam_predictor(engine_sam_test):
    """Our (row, col) prompts on a non-square slice equal segment-anything's own (x, y) predictor."""
    from segment_anything import SamPredictor

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, size=(120, 200, 3), dtype=np.uint8)
    ours = SlicePredictor(engine_sam_test, SliceSource(img, normalize="none"))
    theirs = SamPredictor(engine_sam_test)
    theirs.set_image(img)
    pts_rc = np.array([[30.0, 150.0], [90.0, 20.0]])
    box_rc = np.array([10.0, 100.0, 70.0, 190.0])
    a = ours.predict(0, points=pts_rc, labels=[1, 0], box=box_rc, multimask=True, return_logits=True)
    m, iou, low = theirs.predict(
        point_coords=pts_rc[:, ::-1].copy(), point_labels=np.array([1, 0]),
        box=box_rc[[1, 0, 3, 2]], multimask_output=True, return_logits=True,
    )
    np.testing.assert_allclose(a.iou, iou, atol=1e-4)
    np.testing.assert_allclose(a.low_res, low, atol=1e-3)
    np.testing.assert_allclose(a.logits, m, atol=1e-3)
    # swapping row and col must change the answer (the conversion is not symmetric by accident)
    b = ours.predict(0, points=[[150.0 * 120 / 200, 30.0]], multimask=False)
    c = ours.predict(0, points=[[30.0, 150.0]], multimask=False)
    assert not np.allclose(b.low_res, c.low_res)


def test_predict_many_batches_and_equals_one_by_one(engine_sam_test):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 60000, size=(3, 64, 80), dtype=np.uint16)
    pred = SlicePredictor(engine_sam_test, img)  # a bare array is wrapped in a SliceSource
    prompts = [
        Prompt(points=[[10, 10]], labels=[1]),
        {"points": [[40, 60]], "labels": [1]},
        Prompt(box=[5, 5, 30, 40], multimask=False),
        Prompt(points=[[20, 20], [50, 70]], labels=[1, 0], box=[0, 0, 60, 79]),
        Prompt(points=[[33, 44]], mask_input=np.zeros((256, 256), np.float32), multimask=False),
    ]
    calls = []
    orig = engine_sam_test.mask_decoder.forward

    def counting(*a, **k):
        calls.append(k["sparse_prompt_embeddings"].shape[0])
        return orig(*a, **k)

    engine_sam_test.mask_decoder.forward = counting
    try:
        many = pred.predict_many(1, prompts)
    finally:
        del engine_sam_test.mask_decoder.forward
    assert sorted(calls) == [1, 1, 1, 2]  # the two one-point prompts share a call
    assert [p.masks.shape for p in many] == [(3, 64, 80), (3, 64, 80), (1, 64, 80), (3, 64, 80), (1, 64, 80)]
    for p, single in zip(many, prompts):
        s = single if isinstance(single, Prompt) else Prompt(**single)
        one = pred.predict(1, s.points, s.labels, s.box, s.mask_input, s.multimask)
        np.testing.assert_allclose(p.iou, one.iou, atol=1e-5)
        np.testing.assert_allclose(p.low_res, one.low_res, atol=1e-4)
        assert p.iou.dtype == np.float32 and p.low_res.shape[1:] == (256, 256)
        assert p.stability.shape == p.iou.shape and np.all((p.stability >= 0) & (p.stability <= 1))
    assert pred.predict_many(1, []) == []
    # the low-res logits can be fed back
    again = pred.predict(1, points=[[10, 10]], mask_input=many[0].low_res[many[0].best], multimask=False)
    assert again.masks.shape == (1, 64, 80)
    assert many[0].mask.shape == (64, 80)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "empty prompt"),
        ({"points": np.zeros((0, 2))}, "empty prompt"),
        ({"points": [[10, 100]]}, "outside the slice"),
        ({"points": [[-3, 10]]}, "outside the slice"),
        ({"points": [[np.nan, 10]]}, "NaN"),
        ({"points": [[1, 2, 3]]}, r"\(N, 2\)"),
        ({"points": [[5, 5]], "labels": [1, 0]}, "one entry per point"),
        ({"points": [[5, 5]], "labels": [2]}, "1 \\(positive\\) or 0"),
        ({"labels": [1]}, "without points"),
        ({"box": [0, 0, 10]}, "row0, col0, row1, col1"),
        ({"box": [0, 0, 10, 200]}, "outside the slice"),
        ({"box": [5, 5, 5, 20]}, "no area"),
        ({"box": [0, np.inf, 10, 10]}, "NaN or inf"),
        ({"points": [[5, 5]], "mask_input": np.zeros((64, 64))}, "256, 256"),
    ],
)
def test_bad_prompts(engine_sam_test, kwargs, match):
    pred = SlicePredictor(engine_sam_test, np.zeros((2, 40, 50), np.uint8))
    with pytest.raises(PromptError, match=match):
        pred.predict(0, **kwargs)
    assert issubclass(PromptError, ValueError)
    assert pred.cache.stats.requests == 0  # rejected before any encoder work


def test_bad_slice_index_and_cache_model(engine_sam_test):
    pred = SlicePredictor(engine_sam_test, np.zeros((2, 40, 50), np.uint8))
    with pytest.raises(IndexError, match="out of range"):
        pred.predict(2, points=[[3, 3]])
    with pytest.raises(PromptError, match="unknown prompt keys"):
        pred.predict_many(0, [{"point": [[1, 1]]}])

    class Other:
        pass

    other = EmbeddingCache(engine_sam_test)
    other.sam = Other()
    with pytest.raises(ValueError, match="another model"):
        SlicePredictor(engine_sam_test, np.zeros((2, 40, 50), np.uint8), cache=other)


def test_predict_many_decodes_in_bounded_chunks(engine_sam_test):
    """Many prompts go through the decoder in chunks of at most ``max_batch`` (memory flat in the
    number of prompts), in few distinct batch shapes, with the same results as one big call."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 60000, size=(2, 64, 80), dtype=np.uint16)
    pts = rng.uniform([2, 2], [62, 78], size=(13, 2))
    prompts = [Prompt(points=[p], labels=[1]) for p in pts]
    big = SlicePredictor(engine_sam_test, img, max_batch=64)
    small = SlicePredictor(engine_sam_test, img, big.cache, max_batch=4)
    calls = []
    orig = engine_sam_test.mask_decoder.forward

    def counting(*a, **k):
        calls.append(k["sparse_prompt_embeddings"].shape[0])
        return orig(*a, **k)

    ref = big.predict_many(0, prompts)
    engine_sam_test.mask_decoder.forward = counting
    try:
        chunked = small.predict_many(0, prompts)
    finally:
        del engine_sam_test.mask_decoder.forward
    assert calls == [4, 4, 4, 1]  # full chunks, then powers of two
    for a, b in zip(ref, chunked):
        np.testing.assert_allclose(a.iou, b.iou, atol=1e-5)
        assert np.array_equal(a.masks, b.masks)
    with pytest.raises(ValueError, match="max_batch"):
        SlicePredictor(engine_sam_test, img, max_batch=0)


def test_prompt_from_clicks_one_click_means_multimask():
    assert Prompt.from_clicks([[3, 4]]).multimask
    assert not Prompt.from_clicks(None, None, box=[0, 0, 5, 5]).multimask  # a box: SAM's single mask
    two = Prompt.from_clicks([[3, 4], [5, 6]], [1, 0])
    assert not two.multimask and two.labels.tolist() == [1, 0]
    assert not Prompt.from_clicks([[3, 4]], [1], box=[0, 0, 5, 5]).multimask
    empty = Prompt.from_clicks(np.zeros((0, 2)), [], box=[0, 0, 5, 5])
    assert empty.points is None and empty.labels is None and not empty.multimask
