"""micro-sam models: parity with micro-sam 1.8.14 on ``shared/reference/microsam`` (its README).

The fixture holds random weights in micro-sam's file layouts and what micro-sam's own code
computed from them: the preprocessed image, the embedding, the AIS decoder's maps, AIS labels,
prompt outputs, both inference semantics (unprefixed arrays: micro-sam as users run it; ``eval/``:
the same weights with standard inference). Limits are the README's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

MAPS = ("foreground", "center_distances", "boundary_distances")


@pytest.fixture(scope="module")
def expected(msdir):
    return dict(np.load(msdir / "microsam_expected.npz"))


@pytest.fixture(scope="module")
def cases(msdir):
    return json.loads((msdir / "microsam_cases.json").read_text())


def same_assignment(result: np.ndarray, expected: np.ndarray) -> float:
    """The README's measure: map each result instance to the expected label (or background) it
    overlaps most; the fraction of pixels whose mapped value equals the expected label."""
    r = result.astype(np.int64).ravel()
    e = expected.astype(np.int64).ravel()
    _, r_inv = np.unique(r, return_inverse=True)
    e_ids, e_inv = np.unique(e, return_inverse=True)
    table = np.zeros((r_inv.max() + 1, e_inv.max() + 1), np.int64)
    np.add.at(table, (r_inv, e_inv), 1)
    best = e_ids[table.argmax(axis=1)]
    mapped = best[r_inv]
    return float((mapped == e).mean())


def n_instances(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.unique(labels)))


def _maps(expected, prefix):
    return [expected[prefix + n] for n in MAPS]


# -- checkpoints --------------------------------------------------------------------------------


def _key_sections(msdir):
    sections, current = {}, None
    for line in (msdir / "microsam_keys.txt").read_text().splitlines():
        if line.startswith("#"):
            current = line
            sections[current] = {}
        elif line.strip():
            name, rest = line.split(" ", 1)
            shape = tuple(int(v) for v in rest.rsplit(")", 1)[0].strip("(").split(",") if v.strip())
            sections[current][name] = shape
    return sections


def test_decoder_state_dict_matches_microsam_key_for_key(msdir):
    from napari_mobilesam.models.ais_decoder import AISDecoder

    sections = _key_sections(msdir)
    transposed = next(v for k, v in sections.items() if "ConvTranspose" in k)
    interp = next(v for k, v in sections.items() if "interpolation" in k)
    for module, want in ((AISDecoder(transposed=True), transposed),
                         (AISDecoder(transposed=False), interp)):
        got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert got == want


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("batchnorm", ["batch", "running"])
def test_eager_fast_paths_compute_the_exported_form(transposed, batchnorm):
    """Run eagerly, the decoder takes torch's fused norms and (CPU) a matrix-product transposed
    convolution; traced for OpenVINO it keeps the mean/variance form. Both give the same maps, and
    the traced graph really has no fused ops (what the IR is built from). Two images of 8×8 (a batch:
    batch statistics span both) → 128² maps; random weights and running statistics."""
    from napari_mobilesam.models.ais_decoder import AISDecoder, _conv_transpose_2x2

    torch.manual_seed(0)
    x = torch.randn(2, 48, 5, 7)
    w, b = torch.randn(48, 16, 2, 2), torch.randn(16)
    assert torch.allclose(_conv_transpose_2x2(x, w, b), F.conv_transpose2d(x, w, b, stride=2), atol=1e-5)

    dec = AISDecoder(transposed=transposed).eval()
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    dec.batchnorm = batchnorm
    z = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        eager = dec(z)
        traced = torch.jit.trace(dec, z, check_trace=False)
        exported = traced(z)
    assert eager.shape == (2, 3, 128, 128)
    assert torch.allclose(eager, exported, atol=1e-5), float((eager - exported).abs().max())
    graph = str(traced.inlined_graph)
    assert "aten::instance_norm" not in graph
    assert "aten::addmm" not in graph  # transposed convolutions stay convolutions in the IR
    if batchnorm == "batch":
        assert "aten::batch_norm" not in graph


def test_checkpoint_layouts_load_strictly(msdir, tmp_path):
    from napari_mobilesam.errors import CheckpointError
    from napari_mobilesam.models.ais_decoder import load_ais_decoder
    from napari_mobilesam.models.checkpoint import read_checkpoint

    plain, no_decoder = read_checkpoint(msdir / "vit_t.pt")
    assert len(plain) == 439 and no_decoder is None
    dec = torch.load(msdir / "vit_t_decoder.pt", weights_only=True)
    combined = {
        "model_state": {f"sam.{k}": v for k, v in plain.items()},
        "decoder_state": dec,
        "iteration": 1000,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]},
    }
    torch.save(combined, tmp_path / "finetuned.pt")
    model, decoder = read_checkpoint(tmp_path / "finetuned.pt")
    assert set(model) == set(plain) and set(decoder) == set(dec)
    assert all(torch.equal(model[k], plain[k]) for k in plain)

    broken = dict(dec)
    del broken["deconv2.block.2.running_var"]
    with pytest.raises(CheckpointError, match="deconv2.block.2.running_var"):
        load_ais_decoder(broken, source="my decoder")
    wrong = dict(dec)
    wrong["out_conv.weight"] = torch.zeros(2, 64, 1, 1)
    with pytest.raises(CheckpointError, match="out_conv.weight"):
        load_ais_decoder(wrong)


def test_build_sam_takes_every_layout_and_semantics(msdir, tmp_path, lm_models):
    from napari_mobilesam.models.registry import ais_decoder, build_sam, model_info

    plain = torch.load(msdir / "vit_t.pt", weights_only=True)
    dec = torch.load(msdir / "vit_t_decoder.pt", weights_only=True)
    torch.save({"model_state": {f"sam.{k}": v for k, v in plain.items()}, "decoder_state": dec},
               tmp_path / "combined.pt")
    # build_sam("vit_t_lm", msdir / "vit_t.pt", decoder=msdir / "vit_t_decoder.pt"): the module's
    # lm_models build it so, semantics left at the model's default
    a = lm_models["microsam"]
    b = build_sam("vit_t_lm", tmp_path / "combined.pt")
    assert model_info(a)["semantics"] == "microsam"  # the micro-sam models' default
    assert ais_decoder(a).batchnorm == "batch" and ais_decoder(b).batchnorm == "batch"
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    biases = [p for n, p in a.image_encoder.named_parameters() if n.endswith("attention_biases")]
    assert biases and all(float(p.abs().max()) == 0 for p in biases)

    std = build_sam("vit_t_lm", msdir / "vit_t.pt", semantics="standard")
    assert ais_decoder(std) is None  # a plain SAM file has no decoder
    biases = [p for n, p in std.image_encoder.named_parameters() if n.endswith("attention_biases")]
    assert any(float(p.abs().max()) > 0 for p in biases)
    # MobileSAM's own model offers the same option (its default: standard)
    assert model_info(build_sam("vit_t", msdir / "vit_t.pt"))["semantics"] == "standard"
    assert model_info(build_sam("vit_t", msdir / "vit_t.pt", semantics="microsam"))[
        "semantics"] == "microsam"


def test_weights_entries_for_microsam_models():
    from napari_mobilesam.models.registry import MODELS
    from napari_mobilesam.models.weights import WEIGHTS, decoder_entry

    for name in ("vit_t_lm", "vit_t_em_organelles", "vit_b_lm", "vit_b_em_organelles"):
        assert name in MODELS and MODELS[name].semantics == "microsam"
        for key in (name, decoder_entry(name)):
            entry = WEIGHTS[key]
            assert entry.known_hash.startswith("xxh128:") and len(entry.digest) == 32
            assert entry.url.startswith("https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/")
    assert WEIGHTS["vit_t_lm"].xxh128 == "72ec5074774761a6e5c05a08942f981e"
    assert WEIGHTS["vit_t_em_organelles_decoder"].xxh128 == "8f897c7bb93174a4d1638827c4dd6f44"
    assert decoder_entry("vit_t") is None


# -- preprocessing and post-processing ----------------------------------------------------------


def test_microsam_input_is_exact(expected):
    from napari_mobilesam.core.preprocess import input_size_for, microsam_rgb

    rgb = microsam_rgb(expected["image"])
    assert rgb.dtype == np.uint8 and np.array_equal(rgb, expected["sam_input"])
    assert input_size_for(expected["image"].shape) == tuple(expected["input_size"])


@pytest.mark.parametrize("case", ["default", "custom", "custom2"])
def test_postprocessing_of_decoder_maps_is_exact(expected, cases, case):
    from napari_mobilesam.volume.instance import AISParams, instances_from_maps

    labels = instances_from_maps(*_maps(expected, "decoder/"), AISParams(**cases["ais_settings"][case]))
    assert labels.dtype == np.uint64
    assert np.array_equal(labels, expected[f"ais/{case}"])


@pytest.mark.parametrize(
    "name, params",
    [
        ("torch_em_labels", {"foreground_smoothing": 0.0}),
        ("microsam_labels", {}),
        ("microsam_labels_custom", {"center_distance_threshold": 0.4, "min_size": 25}),
    ],
)
def test_postprocessing_of_realistic_maps_is_exact(expected, name, params):
    from napari_mobilesam.volume.instance import AISParams, instances_from_maps

    labels = instances_from_maps(*_maps(expected, "pp/"), AISParams(**params))
    assert np.array_equal(labels, expected[f"pp/{name}"])


def test_postprocessing_of_stitched_tiled_maps(expected):
    from napari_mobilesam.volume.instance import instances_from_maps

    maps = [expected[f"tiled/{n}_u16"].astype(np.float32) / 65535 for n in MAPS]
    labels = instances_from_maps(*maps)
    assert n_instances(labels) == n_instances(expected["tiled/ais_global"])
    assert same_assignment(labels, expected["tiled/ais_global"]) >= 0.999
    assert same_assignment(labels, expected["tiled/ais_blockwise"]) >= 0.999


def test_same_assignment_measure_can_fail():
    a = np.zeros((4, 4), np.uint64)
    a[:2] = 1
    b = np.zeros((4, 4), np.uint64)
    b[:, :2] = 1
    assert same_assignment(a, a) == 1.0
    assert same_assignment(a, b) < 0.999


def test_params_are_checked():
    from napari_mobilesam.errors import InputError
    from napari_mobilesam.volume.instance import AISParams

    with pytest.raises(InputError, match="foreground_threshold"):
        AISParams(foreground_threshold=1.5)
    with pytest.raises(InputError, match="min_size"):
        AISParams(min_size=-1)


# -- networks (torch, float32) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_models(msdir):
    """The fixture's weights as micro-sam runs them and with standard semantics (eager float32).
    micro-sam's semantics is the model's default: left unset (test_build_sam_takes_every_layout_and_semantics
    checks that default on this model)."""
    from napari_mobilesam.models.registry import build_sam

    torch.manual_seed(0)
    return {
        sem: build_sam("vit_t_lm", msdir / "vit_t.pt", decoder=msdir / "vit_t_decoder.pt",
                       **({} if sem == "microsam" else {"semantics": sem}))
        for sem in ("microsam", "standard")
    }


@pytest.mark.parametrize("sem, prefix", [("microsam", ""), ("standard", "eval/")])
def test_embedding_matches(lm_models, expected, sem, prefix):
    from napari_mobilesam.core.preprocess import microsam_rgb, preprocess_rgb

    sam = lm_models[sem]
    x, size = preprocess_rgb(microsam_rgb(expected["image"]), 1024, mean=sam.pixel_mean,
                             std=sam.pixel_std)
    assert size == tuple(expected["input_size"])
    with torch.inference_mode():
        emb = sam.image_encoder(x[None]).numpy()
    assert np.abs(emb - expected[prefix + "embedding"]).max() < 1e-4


@pytest.fixture(scope="module")
def stored_embedding_pass(lm_models, expected):
    """One eager float32 pass of the micro-sam-semantics decoder on the stored embedding (the
    decoder costs seconds per call at 1024²), shared by the two tests below: its maps, and a copy
    of the standard-semantics decoder whose running statistics got the one update micro-sam's
    training-mode call on this embedding made (see
    test_standard_semantics_decoder_matches_eval_arrays). Each BatchNorm of the micro-sam decoder
    hands its input, which is the input the training-mode call's BatchNorm sees (batch statistics
    in both), to torch's own ``BatchNorm2d.forward`` of the copy's BatchNorm in training mode."""
    import copy

    from torch import nn

    from napari_mobilesam.models.ais_decoder import BatchNorm, maps_for_image
    from napari_mobilesam.models.registry import ais_decoder

    dec = ais_decoder(lm_models["microsam"])
    std = copy.deepcopy(ais_decoder(lm_models["standard"]))
    ours = [m for m in dec.modules() if isinstance(m, BatchNorm)]
    theirs = [m for m in std.modules() if isinstance(m, BatchNorm)]
    assert len(ours) == len(theirs) > 0

    def update(bn):
        def hook(module, args):  # torch's training-mode BatchNorm updates running stats
            bn.train()
            nn.BatchNorm2d.forward(bn, args[0])
            bn.eval()
        return hook

    handles = [m.register_forward_pre_hook(update(bn)) for m, bn in zip(ours, theirs)]
    try:
        with torch.no_grad():
            out = dec(torch.from_numpy(expected["embedding"]))
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode():
        maps = maps_for_image(out, tuple(expected["input_size"]), tuple(expected["original_size"]))
    return maps[0].numpy(), std


def test_decoder_maps_and_labels_from_stored_embedding(stored_embedding_pass, expected):
    """micro-sam semantics: decoder BatchNorm on the call's statistics (the unprefixed arrays)."""
    from napari_mobilesam.volume.instance import instances_from_maps

    maps, _ = stored_embedding_pass
    for i, name in enumerate(MAPS):
        assert np.abs(maps[i] - expected[f"decoder/{name}"]).max() < 1e-3, name
    labels = instances_from_maps(*maps)
    assert n_instances(labels) == n_instances(expected["ais/default"])
    assert same_assignment(labels, expected["ais/default"]) >= 0.999


@pytest.mark.parametrize("case", ["point", "box", "points_pos_neg"])
def test_prompts_match(msdir, expected, cases, case):
    """micro-sam's segment_from_points / segment_from_box on the stored embedding, through our
    torch backend's fast mask decoder. Prompts are micro-sam's [row, col]."""
    from segment_anything import SamPredictor

    from napari_mobilesam.models.registry import load_model

    sam = load_model("vit_t_lm", msdir / "vit_t.pt", "cpu", backend="torch", precision="fp32")
    pred = SamPredictor(sam)
    pred.features = torch.from_numpy(expected["embedding"])
    pred.original_size = tuple(int(v) for v in expected["original_size"])
    pred.input_size = tuple(int(v) for v in expected["input_size"])
    pred.is_image_set = True
    c = cases["prompts"][case]
    if "box" in c:
        r0, c0, r1, c1 = c["box"]
        masks, scores, logits = pred.predict(box=np.array([c0, r0, c1, r1]), multimask_output=False)
    else:
        pts = np.asarray(c["points"], dtype=np.float64)[:, ::-1]
        multi = len(pts) == 1  # micro-sam picks the best of three masks for a single point
        masks, scores, logits = pred.predict(point_coords=pts, point_labels=np.asarray(c["labels"]),
                                             multimask_output=multi)
        if multi:
            masks = masks[[int(np.argmax(scores))]]
    want = f"prompt/{case}/"
    assert np.abs(logits - expected[want + "low_res_logits"]).max() < 1e-2
    assert np.abs(scores - expected[want + "scores"]).max() < 1e-3
    assert (masks != expected[want + "mask"]).mean() <= 0.001


@pytest.mark.parametrize("case", ["point", "box"])
def test_session_clicks_give_microsams_masks(lm_models, expected, cases, case):
    """The user's path (a Session on the raw image, as the widget and the batch API make it): a
    micro-sam model gets micro-sam's per-image min/max input, so the same click gives the same mask
    as in micro-sam (the stack-percentile input of MobileSAM's default path would not)."""
    from napari_mobilesam.core.preprocess import microsam_rgb
    from napari_mobilesam.core.session import Session

    session = Session(lm_models["microsam"], expected["image"], cache_dir=None)
    assert session.source.normalize == "microsam"
    assert np.array_equal(session.source.rgb(0), microsam_rgb(expected["image"]))
    c = cases["prompts"][case]
    if "box" in c:
        pred = session.predict(0, np.zeros((0, 2)), np.zeros(0, int), box=c["box"])
    else:
        pred = session.predict(0, np.asarray(c["points"], float), np.asarray(c["labels"]))
    assert (pred.mask != expected[f"prompt/{case}/mask"][0]).mean() <= 0.001
    # MobileSAM's own model keeps its default input
    assert Session(lm_models["standard"], expected["image"], cache_dir=None).source.normalize == "stack"


def test_batch_sources_take_the_models_normalisation(lm_models, expected, engine_sam_test):
    """The batch API's default normalize='auto' becomes micro-sam's input for micro-sam models
    (stack percentiles otherwise), and what was computed before is forgotten."""
    from napari_mobilesam.batch.slices import make_source
    from napari_mobilesam.core.preprocess import microsam_rgb
    from napari_mobilesam.core.session import Session

    image = np.stack([expected["image"], expected["image"][::-1]])
    source = make_source(image, None, "auto")
    stack_rgb = source.rgb(1).copy()  # "auto" reads as "stack" before a model decides
    Session(lm_models["microsam"], source, cache_dir=None)
    assert source.normalize == "microsam"
    assert np.array_equal(source.rgb(1), microsam_rgb(image[1])) and not np.array_equal(source.rgb(1), stack_rgb)
    plain = make_source(image, None, "auto")
    Session(engine_sam_test, plain, cache_dir=None)
    assert plain.normalize == "stack" and np.array_equal(plain.rgb(1), stack_rgb)
    fixed = make_source(image, None, "slice")  # an explicit choice is kept
    Session(lm_models["microsam"], fixed, cache_dir=None)
    assert fixed.normalize == "slice"


def test_microsam_models_default_to_float32(msdir, engine_sam_test):
    """precision='auto' keeps micro-sam's AIS labels: float32 for a model with an AIS decoder
    (bf16 'mixed' moved them to 86 % agreement); a model without one keeps the backend's choice."""
    from napari_mobilesam.models.registry import load_model, model_info, precision_for

    sam = load_model("vit_t_lm", msdir / "vit_t.pt", "cpu", backend="torch", precision="auto",
                     decoder=msdir / "vit_t_decoder.pt")
    assert model_info(sam)["precision"] == "fp32"
    assert precision_for(sam, "mixed") == "mixed"  # an explicit choice is kept
    assert precision_for(engine_sam_test, "auto") == "auto"


def test_standard_semantics_decoder_matches_eval_arrays(lm_models, expected, stored_embedding_pass):
    """Standard semantics: BatchNorm on running statistics (the ``eval/`` arrays).

    The fixture's ``eval/`` maps were computed after micro-sam's training-mode decoder had run
    once on the image, which moved its running statistics (torch's momentum 0.1 update, unbiased
    variance); we reproduce that one update with torch's own BatchNorm2d before comparing (during
    the micro-sam decoder's pass on the same embedding: ``stored_embedding_pass``).
    """
    from napari_mobilesam.models.ais_decoder import BatchNorm, maps_for_image
    from napari_mobilesam.models.registry import ais_decoder
    from napari_mobilesam.volume.instance import instances_from_maps

    _, dec = stored_embedding_pass
    assert dec.batchnorm == "running"
    bns = [m for m in dec.modules() if isinstance(m, BatchNorm)]
    model_bns = [m for m in ais_decoder(lm_models["standard"]).modules() if isinstance(m, BatchNorm)]
    assert all(not bn.training for bn in bns)
    # the update happened (to the copy only): one step of torch's momentum update each
    assert all(int(bn.num_batches_tracked) == int(m.num_batches_tracked) + 1 for bn, m in zip(bns, model_bns))
    assert any(not torch.equal(bn.running_mean, m.running_mean) for bn, m in zip(bns, model_bns))
    with torch.inference_mode():
        maps = maps_for_image(dec(torch.from_numpy(expected["eval/embedding"])),
                              tuple(expected["input_size"]), tuple(expected["original_size"]))
    maps = maps[0].numpy()
    for i, name in enumerate(MAPS):
        assert np.abs(maps[i] - expected[f"eval/decoder/{name}"]).max() < 1e-3, name
    labels = instances_from_maps(*maps)
    assert n_instances(labels) == n_instances(expected["eval/ais/default"])
    assert same_assignment(labels, expected["eval/ais/default"]) >= 0.999


# -- end to end through our default CPU backend ---------------------------------------------------


# lm_openvino: the fixture model on OpenVINO, a session fixture of conftest.py


@pytest.fixture(scope="module")
def session_ais(lm_openvino, expected):
    """A session (the widget's engine) on the fixture image: a click, then AIS on that slice, with
    the process's maps cache emptied first so that the decoder's runs are counted. The decoded
    maps stay in that cache: the other tests of this image through ``lm_openvino`` (stand-alone
    path, stack) take them from there instead of decoding the same embedding again."""
    from types import SimpleNamespace

    from napari_mobilesam.core.session import Session
    from napari_mobilesam.models.ais_decoder import MAPS_CACHE

    MAPS_CACHE.clear()
    session = Session(lm_openvino, expected["image"][None], cache_dir=None)
    session.predict(0, points=[(141.0, 200.0)], labels=[1])
    clicked = session.cache.stats.computed
    misses = MAPS_CACHE.misses
    labels = session.segment_automatically(0, mode="ais")
    return SimpleNamespace(session=session, clicked=clicked, computed=session.cache.stats.computed,
                           decoded=MAPS_CACHE.misses - misses, labels=labels)


def test_ais_end_to_end_with_openvino(lm_openvino, expected, session_ais):
    """The stand-alone path (decoder_maps): its maps are micro-sam's (from the maps cache when the
    session's embedding of the slice has the same bits: exactly what decoding would return)."""
    from napari_mobilesam.models.registry import ais_decoder
    from napari_mobilesam.volume.instance import decoder_maps, instances_from_maps

    assert ais_decoder(lm_openvino).backend_name == "openvino"
    maps = decoder_maps(lm_openvino, expected["image"])
    for i, name in enumerate(MAPS):
        assert np.abs(maps[i] - expected[f"decoder/{name}"]).max() < 5e-3, name
    labels = instances_from_maps(*maps)
    want = n_instances(expected["ais/default"])
    assert abs(n_instances(labels) - want) <= max(1, round(0.02 * want))
    assert same_assignment(labels, expected["ais/default"]) >= 0.999


def _skip_without_bf16():
    import openvino as ov

    from napari_mobilesam.models.backends.openvino import _openvino_has_bf16

    if not _openvino_has_bf16(ov.Core()):
        pytest.skip("this CPU has no bf16 support in OpenVINO: reduced precision falls back to fp32")


def test_default_ais_decoder_is_exact_float32(msdir, lm_openvino):
    """precision 'auto' (and 'fp32') keeps encoder and AIS decoder float32: micro-sam's labels
    exactly (test_ais_end_to_end_with_openvino, test_tiled_ais_matches run the 'fp32' model)."""
    from napari_mobilesam.models.choice import ModelChoice
    from napari_mobilesam.models.registry import ais_decoder

    assert ais_decoder(lm_openvino).precision == "fp32"
    # the IR is cached by lm_openvino: this only compiles
    auto = ModelChoice("vit_t_lm", str(msdir / "vit_t.pt"), "cpu", backend="openvino",
                       decoder=str(msdir / "vit_t_decoder.pt")).load()
    assert auto.image_encoder.precision == "fp32" and ais_decoder(auto).precision == "fp32"


# Measured on this fixture (AMD Zen 5, AVX512-BF16, OpenVINO 2026.4), maps from the stored
# embedding, default / custom / custom2 parameters: "mixed" 99.72 / 99.76 / 99.80 % same
# assignment, instances 70/69, 51/49, 120/120; "bf16" 98.22 / 98.52 / 98.54 %, instances 68/69,
# 53/49, 126/120. The bounds leave room for other CPUs' bf16 kernels.
REDUCED = {"mixed": (0.995, 0.05), "bf16": (0.975, 0.10)}


@pytest.mark.parametrize("precision", sorted(REDUCED))
def test_reduced_precision_ais_decoder_keeps_labels_close(lm_openvino, expected, cases, precision):
    """The opt-in bf16 decoders on the stored embedding: their maps really differ from float32's
    (bf16 ran) and their labels agree with micro-sam's (= our float32 labels) within the bound
    stated in REDUCED, for every parameter set of the fixture."""
    _skip_without_bf16()
    from napari_mobilesam.models.ais_decoder import maps_for_image
    from napari_mobilesam.models.backends.openvino import OpenVINOAISDecoder
    from napari_mobilesam.models.registry import ais_decoder
    from napari_mobilesam.volume.instance import AISParams, instances_from_maps

    dec = OpenVINOAISDecoder(ais_decoder(lm_openvino).torch_decoder, precision=precision)
    assert dec.precision == precision
    with torch.inference_mode():
        maps = maps_for_image(dec(torch.from_numpy(expected["embedding"])),
                              tuple(expected["input_size"]), tuple(expected["original_size"]))
    maps = maps[0].numpy()
    err = max(np.abs(maps[i] - expected[f"decoder/{n}"]).max() for i, n in enumerate(MAPS))
    assert 1e-3 < err < 0.3, err  # bf16 ran, and it is still the same network
    agree, counts = REDUCED[precision]
    for name, setting in cases["ais_settings"].items():
        labels = instances_from_maps(*maps, AISParams(**setting))
        want = expected[f"ais/{name}"]
        assert same_assignment(labels, want) >= agree, name
        assert abs(n_instances(labels) - n_instances(want)) <= max(2, round(counts * n_instances(want)))


def test_precision_reaches_the_ais_decoder_through_model_choice(msdir, expected):
    """ModelChoice's ``precision`` reaches encoder and AIS decoder; ``ais_precision`` the decoder
    alone. Session's automatic mode (segment_slice_ais) runs that decoder: with the float32
    encoder and the "mixed" decoder the labels stay within the bound of
    test_reduced_precision_ais_decoder_keeps_labels_close (measured end to end: 99.77 %)."""
    _skip_without_bf16()
    from napari_mobilesam.core.session import Session
    from napari_mobilesam.models.choice import ModelChoice
    from napari_mobilesam.models.registry import ais_decoder

    files = {"checkpoint": str(msdir / "vit_t.pt"), "decoder": str(msdir / "vit_t_decoder.pt")}
    sam = ModelChoice("vit_t_lm", device="cpu", backend="openvino", precision="bf16", **files).load()
    assert sam.image_encoder.precision == "bf16" and ais_decoder(sam).precision == "bf16"
    del sam
    sam = ModelChoice("vit_t_lm", device="cpu", backend="openvino", ais_precision="mixed",
                      **files).load()
    assert sam.image_encoder.precision == "fp32" and ais_decoder(sam).precision == "mixed"
    session = Session(sam, expected["image"][None], cache_dir=None)
    labels = session.segment_automatically(0, mode="ais")
    want = expected["ais/default"]
    assert same_assignment(labels, want) >= REDUCED["mixed"][0]
    assert abs(n_instances(labels) - n_instances(want)) <= 2


def test_ais_precision_is_checked(engine_sam_test):
    from napari_mobilesam.errors import ModelError
    from napari_mobilesam.models.backends import apply_decoder_backend
    from napari_mobilesam.models.choice import ModelChoice

    with pytest.raises(ModelError, match="AIS decoder precision 'int8'"):
        ModelChoice("vit_t_lm", ais_precision="int8").load()
    with pytest.raises(ValueError, match="AIS decoder precision must be one of"):
        apply_decoder_backend(object(), engine_sam_test, "fp16")


def test_ais_stack_is_stitched_through_z(lm_openvino, expected, session_ais):
    # session_ais: this slice's maps are in the process's maps cache (only the encoder runs here)
    from napari_mobilesam.volume.ais import segment_stack_ais

    image = expected["image"]
    stack = np.stack([image, image])
    seen = []
    out = list(segment_stack_ais(lm_openvino, stack, progress=seen.append))
    assert seen == [0, 1] and len(out) == 2
    assert out[0].shape == image.shape and out[0].max() > 0
    assert np.array_equal(out[0], out[1])  # identical slices keep their ids through z
    assert same_assignment(out[0], expected["ais/default"]) >= 0.999


def test_session_ais_reuses_the_clicked_embedding_and_the_decoded_maps(lm_openvino, expected, cases,
                                                                       session_ais):
    """In a session (the widget's engine) AIS uses the slice's embedding already computed for a
    click, gives the labels of the stand-alone path, and AIS again with other thresholds or APG
    afterwards only post-process: the decoder does not run again."""
    from napari_mobilesam.models.ais_decoder import MAPS_CACHE
    from napari_mobilesam.volume.apg import APGParams
    from napari_mobilesam.volume.instance import (
        AISParams,
        decoder_maps,
        instances_from_maps,
    )

    image = expected["image"]
    session, labels = session_ais.session, session_ais.labels
    assert session_ais.clicked == 1
    assert session_ais.computed == 1  # the click's embedding, not a second one
    assert session_ais.decoded == 1  # decoded once
    assert same_assignment(labels, expected["ais/default"]) >= 0.999

    misses, hits = MAPS_CACHE.misses, MAPS_CACHE.hits
    custom = AISParams(**cases["ais_settings"]["custom"])
    again = session.segment_automatically(0, mode="ais", ais_params=custom)
    # a low centre-distance threshold: a few seeds (each one a prompt through SAM's decoder);
    # what matters here is where APG's maps come from
    session.segment_automatically(0, mode="apg",
                                  apg_params=APGParams(multimask=True, center_distance_threshold=0.01))
    assert MAPS_CACHE.misses == misses and MAPS_CACHE.hits >= hits + 2  # no decoding since
    assert session.cache.stats.computed == 1
    assert n_instances(again) != n_instances(labels)  # the thresholds did apply
    assert np.array_equal(again, instances_from_maps(*decoder_maps(lm_openvino, image), custom))


def test_maps_cache_keys_and_bounds():
    from napari_mobilesam.models.ais_decoder import AISDecoder, MapsCache

    dec = AISDecoder()
    f = torch.zeros(1, 256, 64, 64)
    key = MapsCache.key(dec, f, (10, 12), (20, 24))
    assert key == MapsCache.key(dec, f.clone(), (10, 12), (20, 24))
    assert key != MapsCache.key(dec, f + 1e-7, (10, 12), (20, 24))  # any bit of the embedding
    assert key != MapsCache.key(dec, f, (10, 12), (20, 25))  # the output geometry
    dec.batchnorm = "running"
    assert key != MapsCache.key(dec, f, (10, 12), (20, 24))  # the BatchNorm mode
    assert MapsCache.key(lambda e: e, f, (10, 12), (20, 24)) is None  # an unknown callable: never cached
    cache = MapsCache(max_bytes=3 * 400)
    for i in range(3):
        cache.put(("k", i), np.zeros((1, 10, 10), np.float32))  # 400 bytes each
    assert cache.get(("k", 0)) is not None  # now the most recently used
    cache.put(("k", 3), np.zeros((1, 10, 10), np.float32))
    assert cache.get(("k", 1)) is None and cache.get(("k", 0)) is not None  # least recent out
    with pytest.raises(ValueError):
        cache.get(("k", 0))[0, 0, 0] = 1  # shared maps are read-only


def test_ais_needs_a_decoder(engine_sam_test):
    from napari_mobilesam.errors import ModelError
    from napari_mobilesam.volume.ais import segment_slice_ais

    with pytest.raises(ModelError, match="vit_t_lm"):
        segment_slice_ais(engine_sam_test, np.zeros((64, 64), np.uint16))


@pytest.fixture(scope="module")
def tiled_maps(lm_openvino, expected):
    """micro-sam's tiled maps of the fixture's tiled image (six tiles: six encoder and decoder
    runs); the tiles' decoded maps stay in the process's maps cache for the block-wise path."""
    from napari_mobilesam.volume.instance import tiled_decoder_maps

    return tiled_decoder_maps(lm_openvino, expected["tiled/image"])


def test_tiled_ais_matches(tiled_maps, expected):
    """micro-sam's tiled AIS (tile 512, halo 64): stitched maps within 5e-3, whole-image labels
    against ``tiled/ais_global``, and micro-sam's own block-wise result within its limit. Through
    the float32 OpenVINO path (what a CPU user runs; about 2.6x faster than eager torch on these
    six tiles)."""
    from napari_mobilesam.volume.instance import instances_from_maps

    maps = tiled_maps
    for i, name in enumerate(MAPS):
        want = expected[f"tiled/{name}_u16"].astype(np.float32) / 65535
        assert np.abs(maps[i] - want).max() < 5e-3, name
    labels = instances_from_maps(*maps)
    want = n_instances(expected["tiled/ais_global"])
    assert abs(n_instances(labels) - want) <= max(1, round(0.02 * want))
    assert same_assignment(labels, expected["tiled/ais_global"]) >= 0.999
    assert same_assignment(labels, expected["tiled/ais_blockwise"]) >= 0.999


def test_block_wise_tiled_ais_agrees_with_stitched(lm_openvino, expected, tiled_maps):
    """The fixture's tiled image in micro-sam's tiles, post-processed window by window (the path
    of slices above ``AISParams.stitch_max_pixels``): against the whole-image post-processing of
    the stitched maps (``tiled/ais_global``; the stitched path matches it, test_tiled_ais_matches)
    99.96 % same assignment and 440 instances for 439 were measured, about micro-sam's own
    block-wise result (99.98 %). After tiled_maps (test_tiled_ais_matches) the decoder's maps come
    from the process's maps cache: only the six encoder runs are repeated."""
    from napari_mobilesam.volume.ais import segment_slice_ais
    from napari_mobilesam.volume.instance import AISParams

    labels = segment_slice_ais(lm_openvino, expected["tiled/image"], AISParams(tiling="blocks"),
                               tile_shape=512, halo=64)
    assert labels.dtype == np.int32
    want = n_instances(expected["tiled/ais_global"])
    assert abs(n_instances(labels) - want) <= max(1, round(0.005 * want))
    assert same_assignment(labels, expected["tiled/ais_global"]) >= 0.999
    assert same_assignment(expected["tiled/ais_global"], labels) >= 0.999
    assert same_assignment(labels, expected["tiled/ais_blockwise"]) >= 0.999


def test_a_finetuned_microsam_file_loads_as_checkpoint_with_microsam_semantics(msdir, tmp_path):
    """A user's micro-sam fine-tuned file (combined layout) chosen as a plain checkpoint file."""
    from napari_mobilesam.models.choice import ModelChoice
    from napari_mobilesam.models.registry import ais_decoder, model_info

    plain = torch.load(msdir / "vit_t.pt", weights_only=True)
    dec = torch.load(msdir / "vit_t_decoder.pt", weights_only=True)
    torch.save({"model_state": {f"sam.{k}": v for k, v in plain.items()}, "decoder_state": dec,
                "optimizer_state": {"state": {}}}, tmp_path / "mine.pt")
    sam = ModelChoice("checkpoint", str(tmp_path / "mine.pt"), "cpu", backend="eager").load()
    assert model_info(sam)["model"] == "vit_t" and model_info(sam)["semantics"] == "microsam"
    assert ais_decoder(sam).batchnorm == "batch"
