"""Automatic prompt generation (APG): prompts from the AIS decoder's maps, decoded by SAM.

Exactness is checked with :class:`~napari_mobilesam.testing.GroundTruthOracle` (a FAKE predictor
answering each prompt with the ground-truth object under it, not a model) on the micro-sam
fixture's realistic post-processing maps (``pp/``, built from ``gt_labels``); the real path runs
micro-sam's file layout (the fixture's random ``vit_t_lm`` weights and decoder) through a
``Session`` once, on the fixture image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_mobilesam.errors import InputError, ModelError
from napari_mobilesam.testing import GroundTruthOracle
from napari_mobilesam.volume.apg import (
    APGParams,
    MaskCrop,
    apg_prompts,
    apg_seeds,
    decode_prompts,
    extended_box,
    seed_centres,
    segment_slice_apg,
    segment_stack_apg,
    select_masks,
)
from napari_mobilesam.volume.instance import instances_from_maps

MAPS = ("foreground", "center_distances", "boundary_distances")


@pytest.fixture(scope="module")
def expected(msdir):
    return dict(np.load(msdir / "microsam_expected.npz"))


@pytest.fixture(scope="module")
def pp_maps(expected):
    return np.stack([expected["pp/" + n] for n in MAPS])


def matched(result: np.ndarray, gt: np.ndarray) -> dict[int, int]:
    """result id -> the gt id it lies on, asserting each result object IS that gt object."""
    out = {}
    for i in np.unique(result[result != 0]):
        ids, counts = np.unique(gt[result == i], return_counts=True)
        g = int(ids[np.argmax(counts)])
        assert g != 0 and np.array_equal(result == i, gt == g), f"object {i} is not gt object {g}"
        out[int(i)] = g
    return out


class CountingOracle(GroundTruthOracle):
    """The FAKE ground-truth predictor, recording how many prompts each call carried."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def predict_many(self, z, prompts):
        self.batches.append(len(prompts))
        return super().predict_many(z, prompts)


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    ({"nms_threshold": 1.5}, "nms_threshold"),
    ({"min_iou": -0.1}, "min_iou"),
    ({"center_distance_threshold": "0.5"}, "center_distance_threshold"),
    ({"prompts": "circle"}, "point, box, point\\+box"),
    ({"min_size": -1}, "min_size"),
    ({"min_size": 2.5}, "min_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"distance_smoothing": -1.0}, "distance_smoothing"),
    ({"multimask": "yes"}, "multimask"),
    ({"refine_with_boxes": 1}, "refine_with_boxes"),
])
def test_bad_params_are_refused_by_name(bad, match):
    with pytest.raises(InputError, match=match):
        APGParams(**bad)


def test_params_from_dict_and_unknown_settings():
    assert APGParams.of({"nms_threshold": 0.5}).nms_threshold == 0.5
    assert APGParams.of(None) == APGParams()
    with pytest.raises(InputError, match="unknown APG setting.*nms_thresh.*nms_threshold"):
        APGParams.of({"nms_thresh": 0.5})
    with pytest.raises(InputError, match="APGParams"):
        APGParams.of(0.5)
    assert APGParams().ais_params().min_size == 0  # every seed is prompted


# -- prompts from the maps ----------------------------------------------------------------------


def test_seeds_are_micro_sams(pp_maps):
    """4-connected regions of the unsmoothed maps: both distances below, foreground at least its
    threshold (a pixel exactly at the foreground threshold is in)."""
    from skimage.measure import label

    seeds = apg_seeds(pp_maps)
    fg, center, boundary = pp_maps
    want = label((center < 0.5) & (boundary < 0.5) & (fg >= 0.5), connectivity=1)
    assert np.array_equal(seeds, want) and seeds.max() >= 30
    maps = np.ones((3, 5, 5), np.float32)
    maps[0], maps[1:, 1:4, 1:4] = 0.5, 0.0
    maps[1:, 2, 2] = 1.0  # a ring: its pixels touch diagonally at no place, so one 4-connected seed
    maps[1:, 1, 1] = 1.0  # the corner cut off: still one seed through the ring's sides
    assert apg_seeds(maps).max() == 1
    maps[1:, 1:4, 2] = maps[1:, 2, 1:4] = 1.0  # three corners left, diagonal neighbours: 3 seeds
    assert apg_seeds(maps).max() == 3


def test_seed_centres_are_farthest_from_the_outline():
    seeds = np.zeros((12, 14), np.int32)
    seeds[2:9, 2:7] = 1  # 7 x 5: the middle column, rows 4..6 are 3 pixels from the outline
    seeds[3:6, 9:14] = 2  # touches the right border: the border counts as outline
    seeds[0, 0] = 3  # on the border: every distance is 0, micro-sam takes its box's first pixel
    pts = seed_centres(seeds, 3)
    assert pts.tolist() == [[4.0, 4.0], [4.0, 10.0], [0.0, 0.0]]  # the first maximum in row-major order


@pytest.mark.parametrize("kind", ["point", "box", "point+box"])
def test_one_prompt_per_seed(pp_maps, kind):
    p = APGParams(prompts=kind, box_extension=0.1 if kind == "box" else 0.01)
    prompts, seeds = apg_prompts(pp_maps, p)
    assert np.array_equal(seeds, apg_seeds(pp_maps, p))
    assert len(prompts) == int(seeds.max())
    h, w = seeds.shape
    for i, pr in enumerate(prompts, start=1):
        rows, cols = np.nonzero(seeds == i)
        assert pr.multimask is False
        if kind == "box":
            assert pr.points is None
        else:
            r, c = pr.points[0]
            assert seeds[int(r), int(c)] == i and r == int(r) and c == int(c)  # a pixel of its seed
            assert list(pr.labels) == [1]
        if kind == "point":
            assert pr.box is None
        else:  # the box of the watershed region grown from the seed holds the seed
            r0, c0, r1, c1 = pr.box
            assert r0 <= rows.min() and c0 <= cols.min() and r1 >= rows.max() and c1 >= cols.max()
            assert r0 >= -0.5 and c0 >= -0.5 and r1 <= h - 0.5 and c1 <= w - 0.5


def test_extended_box_is_micro_sams():
    assert extended_box(10, 20, 30, 60, 0.01, (100, 100)) == pytest.approx((9.8, 19.6, 30.2, 60.4))
    assert extended_box(0, 0, 99, 5, 0.5, (100, 50)) == (-0.5, -0.5, 99.5, 7.5)  # clipped to the slice
    assert extended_box(4, 4, 4, 9, 0.0, (10, 10)) == (3.5, 4, 4.5, 9)  # one row: half a pixel each way


def test_no_foreground_gives_no_prompts():
    maps = np.ones((3, 40, 50), np.float32)
    maps[0] = 0.0
    prompts, instances = apg_prompts(maps)
    assert prompts == [] and instances.shape == (40, 50) and instances.max() == 0
    with pytest.raises(InputError, match=r"\(3, H, W\)"):
        apg_prompts(maps[:2])
    assert (segment_slice_apg(GroundTruthOracle(np.zeros((40, 50), int), np.zeros((40, 50))), 0, maps=maps)
            == 0).all()


# -- decoding, NMS and painting with the fake oracle ---------------------------------------------


def test_each_object_found_once_exactly(expected, pp_maps):
    """FAKE oracle: every prompt is answered with the gt object under it, so APG must return
    the 30 gt objects exactly, each once."""
    gt = expected["gt_labels"]
    oracle = CountingOracle(gt, expected["image"])
    labels = segment_slice_apg(oracle, 0, maps=pp_maps)
    assert labels.dtype == np.uint32 and labels.shape == gt.shape
    found = matched(labels, gt)
    assert sorted(found.values()) == sorted(int(v) for v in np.unique(gt)[1:])
    assert sorted(found) == list(range(1, 31))  # ids 1..N


def test_duplicate_prompts_give_each_object_once(expected, pp_maps):
    gt = expected["gt_labels"]
    oracle = CountingOracle(gt, expected["image"])
    prompts, _ = apg_prompts(pp_maps)
    n = 2 * len(prompts)
    crops = decode_prompts(oracle, 0, prompts + prompts[::-1], batch_size=7)  # every object twice
    assert len(crops) == n and sum(oracle.batches) == n and oracle.batches[: n // 7] == [7] * (n // 7)
    labels = select_masks(crops, gt.shape)
    assert sorted(matched(labels, gt).values()) == sorted(int(v) for v in np.unique(gt)[1:])


def test_nms_removes_a_near_duplicate():
    """A lower-scored, slightly larger copy of an object (IoU 100/110 = 0.91): NMS at 0.9 removes
    it; without NMS the larger copy is painted first and the better-scored mask finds no free
    pixel left (micro-sam's painting: largest first, each only where no larger one lies)."""
    better = _crop(0, 0, np.ones((10, 10), bool), iou=0.9)
    copy = _crop(0, 0, np.ones((11, 10), bool), iou=0.8)
    with_nms = select_masks([better, copy], (20, 20), APGParams(min_size=5))
    assert sorted(np.unique(with_nms)) == [0, 1] and (with_nms == 1).sum() == 100
    without = select_masks([better, copy], (20, 20), APGParams(min_size=5, nms_threshold=1.0))
    assert sorted(np.unique(without)) == [0, 1] and (without == 1).sum() == 110


def test_nms_order_is_iou_times_stability():
    """micro-sam ranks masks by predicted IoU x stability: a slightly lower IoU with a much
    better stability wins the pair."""
    a = _crop(0, 0, np.ones((10, 10), bool), iou=0.9, stab=0.5)
    b = _crop(0, 0, np.ones((10, 11), bool), iou=0.8, stab=0.9)
    out = select_masks([a, b], (20, 20), APGParams(min_size=5))
    assert (out == 1).sum() == 110


def test_prompts_are_decoded_in_bounded_batches(expected, pp_maps):
    oracle = CountingOracle(expected["gt_labels"], expected["image"])
    segment_slice_apg(oracle, 0, {"batch_size": 8}, maps=pp_maps)
    n = int(apg_seeds(pp_maps).max())
    assert oracle.calls == n and sum(oracle.batches) == n and max(oracle.batches) == 8
    assert oracle.batches[: n // 8] == [8] * (n // 8)  # full batches first


def test_tiled_slice_each_object_once(expected, pp_maps, monkeypatch):
    """A tiled predictor (6 tiles of 256 px, halo 48) whose tiles are FAKE ground-truth oracles,
    with FAKE decoder maps (the pp/ maps cut to each tile): each object is kept by one tile."""
    from napari_mobilesam.core.tiles import TiledPredictor
    from napari_mobilesam.volume import apg

    gt, image = expected["gt_labels"], expected["image"]

    class TileOracle(GroundTruthOracle):
        def __init__(self, view):
            super().__init__(gt[view.tile.region], image[view.tile.region])
            self.source, self.sam = view, None

    tiled = TiledPredictor(None, image[None], tile=256, halo=48, tile_predictor=TileOracle)
    assert len(tiled.grid.tiles) == 6
    monkeypatch.setattr(apg, "_slice_maps", lambda pred, z, dec: pp_maps[(slice(None), *pred.source.tile.region)])
    labels = segment_slice_apg(tiled, 0, decoder=object(), microsam_input=False)
    assert labels.dtype == np.uint32
    assert sorted(matched(labels, gt).values()) == sorted(int(v) for v in np.unique(gt)[1:])
    with pytest.raises(InputError, match="tiled"):
        segment_slice_apg(tiled, 0, maps=pp_maps)


def _crop(r, c, mask, iou=0.9, stab=0.9):
    return MaskCrop(r, c, np.asarray(mask, bool), iou, stab)


def test_select_masks_filters_nms_and_painting_order():
    big = np.ones((10, 10), bool)
    small = np.ones((4, 4), bool)
    crops = [
        _crop(0, 0, big, iou=0.8),            # large object
        _crop(3, 3, small, iou=0.95),         # inside it: survives IoU-NMS, but the larger is painted first
        _crop(0, 0, big, iou=0.7),            # duplicate of the large one (lower score): removed
        _crop(20, 20, small, iou=0.2),        # low predicted IoU (min_iou, ours)
        _crop(30, 30, small, iou=0.9, stab=0.1),  # unstable (min_stability, ours)
        _crop(40, 0, np.ones((2, 3), bool)),  # 6 pixels: not more than min_size
        _crop(40, 10, np.ones((7, 1), bool)),  # 7 pixels: kept
        None,                                 # empty mask
    ]
    p = APGParams(min_iou=0.5, min_stability=0.5, min_size=6)
    labels = select_masks(crops, (50, 50), p)
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert (labels == 1).sum() == 100 and (labels[40:47, 10] == 2).all()  # ids in row-major order
    # a smaller mask keeps what the larger ones leave of it, each 4-connected piece an object,
    # pieces under min_size removed
    ring = np.ones((9, 9), bool)
    ring[3:6, 3:6] = False
    bar = np.zeros((9, 11), bool)
    bar[4, :] = True  # crosses the ring and its hole, and goes on past the ring's right side
    bar[3:6, 4] = True
    out = select_masks([_crop(0, 0, ring), _crop(0, 0, bar)], (12, 12), APGParams(min_size=2))
    assert sorted(np.unique(out)) == [0, 1, 2, 3]
    assert (out == 2).sum() == 5 and (out == 3).sum() == 2  # the hole's plus, the right end
    assert (out == 1).sum() == 72


def test_boxes_sharing_one_row_are_apart():
    """micro-sam compares masks only when their boxes overlap with an area: two masks sharing a
    single row of pixels are never duplicates, whatever the threshold."""
    a = _crop(0, 0, np.ones((10, 10), bool))
    b = _crop(9, 0, np.ones((10, 10), bool), iou=0.8)
    out = select_masks([a, b], (20, 10), APGParams(min_size=5, nms_threshold=0.0))
    assert sorted(np.unique(out)) == [0, 1, 2]
    c = _crop(8, 0, np.ones((10, 10), bool), iou=0.8)  # two rows: compared, and suppressed at 0
    out = select_masks([a, c], (20, 10), APGParams(min_size=5, nms_threshold=0.0))
    assert sorted(np.unique(out)) == [0, 1]


def test_a_model_without_decoder_is_refused(engine_sam_test):
    from napari_mobilesam.core.session import Session

    session = Session(engine_sam_test, np.zeros((64, 64), np.uint16), cache_dir=None)
    with pytest.raises(ModelError, match="vit_t_lm"):
        segment_slice_apg(session.predictor, 0)
    with pytest.raises(ModelError, match="vit_t_lm"):
        next(segment_stack_apg(session.predictor))
    assert session.cache.stats.computed == 0  # refused before any work


# -- the real path: micro-sam's layout, one embedding for both decoders --------------------------


class DecoderCalls:
    """Counts the real AIS decoder's forward passes (a forward hook) and keeps the last output."""

    def __init__(self, dec):
        self.calls, self.out = 0, None
        dec.register_forward_hook(self._seen)

    def _seen(self, module, args, out):
        self.calls += 1
        self.out = out


class ReplayDecoder:
    """A FAKE decoder: returns maps recorded from the real one (to run more slices cheaply)."""

    def __init__(self, out):
        self.out, self.calls = out, 0

    def __call__(self, emb):
        self.calls += 1
        return self.out


@pytest.fixture(scope="module")
def lm_sam(msdir):
    from napari_mobilesam.models.registry import load_model

    return load_model("vit_t_lm", msdir / "vit_t.pt", "cpu", backend="torch", precision="fp32",
                      decoder=msdir / "vit_t_decoder.pt")


# multimask: the random weights' single-mask output is empty for points; a low centre-distance
# threshold: 25 seeds instead of micro-sam's default 288 on the fixture (every prompt is a pass
# through SAM's decoder; the seed rules themselves are checked above against micro-sam's points)
REAL = APGParams(multimask=True, center_distance_threshold=0.01)


@pytest.fixture(scope="module")
def real_run(lm_sam, expected):
    from napari_mobilesam.core.session import Session
    from napari_mobilesam.models.ais_decoder import MAPS_CACHE
    from napari_mobilesam.models.registry import ais_decoder

    MAPS_CACHE.clear()  # maps of this image decoded by another test would be reused
    session = Session(lm_sam, expected["image"], cache_dir=None)
    dec = ais_decoder(lm_sam)
    calls = DecoderCalls(dec)
    sizes = []
    hook = lm_sam.mask_decoder.register_forward_hook(lambda m, args, kw, out: sizes.append(len(out[0])),
                                                     with_kwargs=True)
    try:
        labels = segment_slice_apg(session.predictor, 0, REAL, decoder=dec)
    finally:
        hook.remove()
    return session, calls, sizes, labels


def test_real_path_one_embedding_for_both_decoders(real_run, expected):
    from napari_mobilesam.models.ais_decoder import maps_for_image
    from napari_mobilesam.volume.apg import _INPUT_CACHES, _input_cache

    session, dec, sizes, labels = real_run
    assert session.cache.dtype == torch.float32  # a model with an AIS decoder: a float32 cache...
    assert _input_cache(session.cache) is session.cache  # ...that APG uses itself
    assert session.cache not in _INPUT_CACHES
    stats = session.cache.stats
    assert stats.computed == 1  # the encoder ran once; SAM's decoder used the same embedding
    assert stats.hits >= 1
    session.predict(0, points=[(141.0, 200.0)], labels=[1])  # a click on the slice APG embedded
    assert session.cache.stats.computed == 1  # not embedded again
    assert dec.calls == 1
    with torch.inference_mode():
        maps = maps_for_image(dec.out, tuple(expected["input_size"]), tuple(expected["original_size"]))[0]
    for i, name in enumerate(MAPS):  # micro-sam's input and float32 embedding: micro-sam's maps
        assert np.abs(maps[i].numpy() - expected[f"decoder/{name}"]).max() < 1e-3, name
    n_ais = int(instances_from_maps(*maps.numpy()).max())
    assert n_ais == 69
    n_seeds = int(apg_seeds(maps.numpy(), REAL).max())
    assert sum(sizes) == n_seeds  # one prompt per seed...
    assert max(sizes) <= session.predictor.max_batch  # ...in bounded decoder calls
    assert labels.dtype == np.uint32 and labels.shape == expected["image"].shape
    ids, counts = np.unique(labels, return_counts=True)
    counts = counts[ids != 0]
    ids = ids[ids != 0]  # (the random weights' masks may cover the whole slice)
    assert list(ids) == list(range(1, len(ids) + 1)) and len(ids) >= 1
    assert counts.min() >= REAL.min_size


# -- against micro-sam's own APG (tests/data/microsam_apg.npz, made with micro-sam 1.8.14) -------


@pytest.fixture(scope="module")
def microsam_apg():
    return dict(np.load(Path(__file__).parent / "data" / "microsam_apg.npz"))


def test_points_are_micro_sams(expected, microsam_apg):
    """From micro-sam's maps of the fixture image, the same point prompts in the same order."""
    maps = np.stack([expected["decoder/" + n] for n in MAPS])
    prompts, seeds = apg_prompts(maps)
    ours = np.array([p.points[0] for p in prompts])
    assert len(ours) == seeds.max() == len(microsam_apg["points"])
    assert np.array_equal(ours, microsam_apg["points"])


def _reference_crops(ref) -> list[MaskCrop]:
    bits = np.unpackbits(ref["mask_bits"]).astype(bool)
    crops, at = [], 0
    for (r0, c0, r1, c1), iou, stab in zip(ref["mask_boxes"], ref["iou"], ref["stability"]):
        n = int((r1 - r0) * (c1 - c0))
        crops.append(MaskCrop(int(r0), int(c0), bits[at : at + n].reshape(r1 - r0, c1 - c0), float(iou), float(stab)))
        at += n
    return crops


@pytest.mark.parametrize("key, params", [
    ("nms/iou", APGParams()),
    ("nms/iomin", APGParams(intersection_over_min=True)),
])
def test_selection_is_micro_sams(expected, microsam_apg, key, params):
    """162 masks made from the fixture's objects (grown, shrunk, shifted, joined, small, on the
    border) with drawn scores: micro-sam's apply_nms labels exactly, ids included."""
    crops = _reference_crops(microsam_apg)
    labels = select_masks(crops, expected["gt_labels"].shape, params)
    assert labels.max() >= 60
    assert np.array_equal(labels, microsam_apg[key])
    assert np.array_equal(select_masks(crops[::-1], labels.shape, params), labels)  # the order given does not matter


@pytest.mark.slow
def test_stack_is_stitched_and_batch_api_runs_apg(real_run, lm_sam, expected):
    """Two identical slices keep their ids through z (decoder maps replayed by a FAKE decoder, so
    only the prompts are decoded again); the batch API's mode="apg" gives the same labels, from the
    maps the first run decoded."""
    from napari_mobilesam import batch
    from napari_mobilesam.core.session import Session

    _, dec, _, first = real_run
    image = expected["image"]
    stack = np.stack([image, image])
    session = Session(lm_sam, stack, cache_dir=None)
    replay = ReplayDecoder(dec.out)
    seen = []
    out = list(segment_stack_apg(session.predictor, REAL, replay, progress=seen.append))
    assert seen == [0, 1] and replay.calls == 2
    assert np.array_equal(out[0], out[1])
    assert len(matched(out[0], first)) == first.max()  # the same objects as one slice alone

    decoded = dec.calls
    res = batch.segment_stack_auto(stack[:1], model=lm_sam, mode="apg", apg_params=REAL.as_dict())
    assert res.shape == (1, *image.shape)
    assert dec.calls == decoded  # the same slice's maps: from the maps cache, not decoded again
    assert len(matched(res[0], first)) == first.max()


# -- batch API and CLI: modes and errors ----------------------------------------------------------


def test_batch_modes_are_checked(engine_sam_test):
    from napari_mobilesam import batch

    stack = np.zeros((1, 64, 64), np.uint16)
    with pytest.raises(InputError, match="auto, ais, apg, grid"):
        batch.segment_stack_auto(stack, model=engine_sam_test, mode="amg")
    for mode in ("apg", "ais"):
        with pytest.raises(ModelError, match="vit_t_lm.*--decoder PATH"):
            batch.segment_stack_auto(stack, model=engine_sam_test, mode=mode)
    with pytest.raises(InputError, match="unknown APG setting"):
        batch.segment_stack_auto(stack, model=engine_sam_test, mode="grid", apg_params={"x": 1})


def test_batch_apg_with_a_dask_client_needs_a_model_by_name(engine_sam_test):
    """APG runs on a dask cluster (tests/test_cluster_microsam.py); the workers load the model
    themselves, so it must be a name or a ModelChoice, not a loaded model."""
    from napari_mobilesam import batch

    with pytest.raises(ModelError, match="by name"):
        batch.segment_stack_auto(np.zeros((1, 64, 64), np.uint16), model=engine_sam_test, mode="apg",
                                 client=object())


def test_cli_auto_mode_apg_flags_reach_the_batch_api(tmp_path, monkeypatch):
    import tifffile

    from napari_mobilesam import batch, cli

    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, np.zeros((2, 32, 32), np.uint16))
    seen = {}
    monkeypatch.setattr(batch, "segment_stack_auto", lambda data, **kw: seen.update(kw))
    code = cli.main(["auto", str(stack), "-o", str(tmp_path / "l.tif"), "--mode", "apg", "--model", "vit_t_lm",
                     "--apg-prompts", "point+box", "--nms-threshold", "0.7", "--apg-min-iou", "0.3",
                     "--apg-min-stability", "0.2", "--apg-multimask", "--apg-refine", "--min-size", "9",
                     "--center-distance-threshold", "0.4", "--no-progress"])
    assert code == 0
    assert seen["mode"] == "apg"
    assert seen["apg_params"] == APGParams(center_distance_threshold=0.4, prompts="point+box",
                                           nms_threshold=0.7, min_iou=0.3, min_stability=0.2,
                                           multimask=True, refine_with_boxes=True, min_size=9)
    assert seen["ais_params"].min_size == 9
    code = cli.main(["auto", str(stack), "-o", str(tmp_path / "m.tif"), "--no-progress"])
    assert code == 0 and seen["mode"] == "auto"
    assert seen["apg_params"].min_size == 25 and seen["ais_params"].min_size == 0  # each mode's default


def test_cli_apg_errors(tmp_path, capsys, monkeypatch):
    import tifffile

    from napari_mobilesam import cli
    from napari_mobilesam.models import choice, registry

    def never(*args, **kwargs):
        raise AssertionError("a model without a decoder is refused before it loads")

    monkeypatch.setattr(registry, "load_model", never)
    monkeypatch.setattr(choice.ModelChoice, "load", never)

    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, np.zeros((1, 64, 64), np.uint16))
    code = cli.main(["auto", str(stack), "-o", str(tmp_path / "l.tif"), "--mode", "apg",
                     "--nms-threshold", "2", "--no-progress"])
    assert code == cli.EXIT_INPUT and "--nms-threshold must lie between 0 and 1" in capsys.readouterr().err
    code = cli.main(["auto", str(stack), "-o", str(tmp_path / "l.tif"), "--mode", "apg",
                     "--model", "vit_t_test", "--no-progress"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_MODEL and "--model vit_t_lm" in err and "--decoder PATH" in err
    assert not (tmp_path / "l.tif").exists()
