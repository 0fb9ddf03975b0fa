"""Inference backends: folded torch, OpenVINO encoder/decoder, IR cache, fallback, identities."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from fixture_cases import run_fixture_cases

TOL = {"embedding": 1e-3, "logits": 1e-2, "low_res": 1e-2, "iou": 1e-3}


def _randomize(sam, seed=0):
    """Give every parameter and BatchNorm statistic of ``sam`` random values (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sam.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return sam


@pytest.fixture
def test_sam():
    from napari_mobilesam.models.registry import build_sam

    return _randomize(build_sam("vit_t_test", seed=5))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_MOBILESAM_CACHE", str(folder))
    return folder


def _x(seed=0):
    return torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def eager_ref():
    """The eager encoder's output for ``_x()`` with ``test_sam``'s weights, computed once: every
    ``test_sam`` has the same (seeded) weights."""
    from napari_mobilesam.models.registry import build_sam

    sam = _randomize(build_sam("vit_t_test", seed=5))
    with torch.no_grad():
        return sam.image_encoder(_x())


@pytest.fixture(scope="module")
def _converted_once(tmp_path_factory):
    """A cache folder holding ``test_sam``'s encoder and decoder IRs, converted once for the module's
    tests that are about running the IRs, not about converting them."""
    from napari_mobilesam.models.backends import OpenVINOEncoder, OpenVINOMaskDecoder
    from napari_mobilesam.models.registry import build_sam

    folder = tmp_path_factory.mktemp("warm") / "cache"
    sam = _randomize(build_sam("vit_t_test", seed=5))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_MOBILESAM_CACHE", str(folder))
        assert OpenVINOEncoder(sam.image_encoder, "fp32").converted
        OpenVINOMaskDecoder(sam.mask_decoder)
    return folder


@pytest.fixture
def warm_cache(_converted_once, monkeypatch):
    """The module's cache folder with ``test_sam``'s IRs already converted."""
    monkeypatch.setenv("NAPARI_MOBILESAM_CACHE", str(_converted_once))
    return _converted_once


def test_choose_device():
    from napari_mobilesam.models.backends import choose_device

    assert choose_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert choose_device(None).type in ("cpu", "mps")
    with pytest.raises(ValueError, match="invalid device"):
        choose_device("graphics-card")


def test_fold_batchnorm_is_exact_and_removes_bn(test_sam, eager_ref):
    import copy

    from napari_mobilesam.models.backends import fold_batchnorm

    enc = test_sam.image_encoder
    folded = fold_batchnorm(copy.deepcopy(enc))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = _x()
    with torch.no_grad():
        ref, out = eager_ref, folded(x)
    assert float((ref - out).abs().max()) < 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("precision", ["fp32", "mixed", "bf16"])
def test_torch_encoder(test_sam, eager_ref, precision):
    from napari_mobilesam.models.backends import TorchEncoder

    enc = TorchEncoder(test_sam.image_encoder, torch.device("cpu"), precision)
    x = _x()
    with torch.no_grad():
        ref, out = eager_ref, enc(x)
    assert out.dtype == torch.float32 and out.shape == (1, 256, 64, 64)
    err = float((ref - out).abs().max())
    if precision == "fp32":
        assert err < 1e-4
    else:
        assert 0 < err < 0.5  # bf16 really ran, and still computes the same function


def test_openvino_encoder_ir_cached_and_keyed_by_weights(test_sam, eager_ref, fresh_cache):
    from napari_mobilesam.models.backends import OpenVINOEncoder
    from napari_mobilesam.models.registry import build_sam

    x = _x()
    first = OpenVINOEncoder(test_sam.image_encoder, "fp32")
    assert first.converted
    assert all(p.is_relative_to(fresh_cache / "openvino") for p in first.ir_paths)
    ref = eager_ref
    out = first(x)
    assert out.dtype == torch.float32 and out.shape == (1, 256, 64, 64)
    assert float((ref - out).abs().max()) < 1e-4
    second = OpenVINOEncoder(test_sam.image_encoder, "mixed")  # same weights: IR reused
    assert not second.converted and second.ir_paths == first.ir_paths
    assert 0 < float((ref - second(x)).abs().max()) < 0.5
    other = OpenVINOEncoder(_randomize(build_sam("vit_t_test"), seed=9).image_encoder, "fp32")
    assert other.converted and other.ir_paths != first.ir_paths
    # batches run image by image
    xb = torch.cat([x, _x(1)])
    assert torch.allclose(first(xb)[1:], first(xb[1:]), atol=1e-6)
    with pytest.raises(ValueError, match="1024"):
        first(torch.zeros(1, 3, 512, 512))
    assert not list((fresh_cache / "openvino").glob(".*"))  # no temporary folders left


def test_conversion_runs_the_module_once(fresh_cache):
    """A conversion traces the module with ONE forward pass (torch's trace check would run it
    twice more: for the AIS decoder at 1024², most of a first start's wait), and the IR computes
    the module's function, for one input and for a tuple of inputs."""
    import openvino as ov

    from napari_mobilesam.models.backends.openvino import openvino_ir

    calls = []  # outside the module: OpenVINO may trace a copy of it

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, a, b=None):
            calls.append(1)
            y = torch.relu(self.conv(a))
            return y if b is None else y * b

    torch.manual_seed(0)
    x, w = torch.rand(1, 3, 16, 16), torch.rand(1, 4, 16, 16)
    for kind, example in (("one", x), ("pair", (x, w))):
        module = Two().eval()
        calls.clear()
        xml, converted = openvino_ir(module, kind, example, img_size=16)
        assert converted and len(calls) == 1, kind
        compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        inputs = example if isinstance(example, tuple) else (example,)
        out = compiled([t.numpy() for t in inputs])[0]
        with torch.no_grad():
            want = module(*inputs).numpy()
        assert np.abs(out - want).max() < 1e-5, kind


def test_openvino_encoder_is_thread_safe(test_sam, warm_cache):
    from concurrent.futures import ThreadPoolExecutor

    from napari_mobilesam.models.backends import OpenVINOEncoder

    enc = OpenVINOEncoder(test_sam.image_encoder, "fp32")
    assert not enc.converted  # the module's IR
    xs = [_x(i) for i in range(4)]
    alone = [enc(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(enc, xs))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_interrupted_conversion_leaves_nothing(test_sam, fresh_cache, monkeypatch):
    import openvino as ov

    from napari_mobilesam.models.backends import OpenVINOEncoder

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ov, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        OpenVINOEncoder(test_sam.image_encoder, "fp32")
    assert list((fresh_cache / "openvino").iterdir()) == []


def test_openvino_decoder_matches_torch(test_sam, warm_cache):
    from napari_mobilesam.models.backends import OpenVINOMaskDecoder

    torch_dec = test_sam.mask_decoder
    ov_dec = OpenVINOMaskDecoder(torch_dec)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    pe = test_sam.prompt_encoder.get_dense_pe()
    for n_prompts, n_tokens in [(1, 2), (3, 5)]:
        sparse = torch.randn(n_prompts, n_tokens, 256, generator=g)
        dense = torch.randn(n_prompts, 256, 64, 64, generator=g)
        for multimask in (True, False):
            with torch.no_grad():
                m_ref, i_ref = torch_dec(emb, pe, sparse, dense, multimask)
                m_ov, i_ov = ov_dec(emb, pe, sparse, dense, multimask)
            assert m_ov.shape == m_ref.shape == (n_prompts, 3 if multimask else 1, 256, 256)
            assert i_ov.shape == i_ref.shape
            assert float((m_ov - m_ref).abs().max()) < 1e-3
            assert float((i_ov - i_ref).abs().max()) < 1e-4


def test_fast_decoder_is_the_same_function(test_sam):
    from napari_mobilesam.models.backends import (
        FastMaskDecoder,
        apply_backend,
        fast_predict_masks,
    )

    dec = test_sam.mask_decoder
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    pe = test_sam.prompt_encoder.get_dense_pe()
    sparse = torch.randn(2, 4, 256, generator=g)
    dense = torch.randn(2, 256, 64, 64, generator=g)
    # one vector broadcast over the pixels, as the prompt encoder gives without a mask prompt
    dense_flat = torch.randn(2, 256, 1, 1, generator=g).expand(-1, -1, 64, 64)
    with torch.no_grad():
        for d in (dense, dense_flat):
            m_ref, i_ref = dec.predict_masks(emb, pe, sparse, d)
            m, i = fast_predict_masks(dec, emb, pe, sparse, d)
            assert m.shape == m_ref.shape == (2, 4, 256, 256)
            assert float((m - m_ref).abs().max()) < 1e-4 * max(1.0, float(m_ref.abs().max()))
            assert float((i - i_ref).abs().max()) < 1e-5
        sam = apply_backend(test_sam, "cpu", "torch", "fp32")
        assert isinstance(sam.mask_decoder, FastMaskDecoder)
        m1, i1 = sam.mask_decoder(emb, pe, sparse, d, False)
    assert m1.shape == (2, 1, 256, 256) and torch.allclose(m1, m[:, :1]) and torch.allclose(i1, i[:, :1])


def test_openvino_decoder_reuses_the_image_only_while_unchanged(test_sam, warm_cache):
    from napari_mobilesam.models.backends import OpenVINOMaskDecoder

    torch_dec = test_sam.mask_decoder
    ov_dec = OpenVINOMaskDecoder(torch_dec)
    pe = test_sam.prompt_encoder.get_dense_pe()
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    with torch.no_grad():
        pts = (torch.tensor([[[300.0, 200.0]]]), torch.tensor([[1]]))
        sparse, dense = test_sam.prompt_encoder(points=pts, boxes=None, masks=None)
        assert dense.stride(-1) == 0  # the no-mask embedding, passed to OpenVINO as one vector

        def same_as_torch(e):
            m_ref, i_ref = torch_dec(e, pe, sparse, dense, True)
            m, i = ov_dec(e, pe, sparse, dense, True)
            assert float((m - m_ref).abs().max()) < 1e-3 and float((i - i_ref).abs().max()) < 1e-4
            return ov_dec._image_tokens._tokens

        first = same_as_torch(emb)
        assert same_as_torch(emb) is first  # the same tensor again: its token layout is reused
        emb.mul_(-1)  # changed in place: must be laid out again
        changed = same_as_torch(emb)
        assert changed is not first
        assert same_as_torch(emb.clone()) is changed  # equal values in another tensor: reused
        assert same_as_torch(torch.randn(1, 256, 64, 64, generator=g)) is not changed


def test_cached_dense_pe_follows_the_prompt_encoder(test_sam):
    import copy

    from napari_mobilesam.models.backends import apply_backend

    sam = apply_backend(test_sam, "cpu", "torch", "fp32")
    enc = sam.prompt_encoder

    def computed():
        return type(enc).get_dense_pe(enc)

    with torch.no_grad():
        a = enc.get_dense_pe()
        assert enc.get_dense_pe() is a and torch.equal(a, computed())
        enc.pe_layer.positional_encoding_gaussian_matrix.mul_(2)  # the weights changed
        b = enc.get_dense_pe()
        assert b is not a and torch.equal(b, computed())
        b.zero_()  # a caller changed the returned tensor in place
        c = enc.get_dense_pe()
        assert torch.equal(c, computed()) and float(c.abs().sum()) > 0
    with torch.inference_mode():
        assert torch.equal(enc.get_dense_pe(), computed())
    twin = copy.deepcopy(sam)
    assert twin.prompt_encoder.get_dense_pe.prompt_encoder is twin.prompt_encoder


def test_apply_backend_choices_and_identities(test_sam, warm_cache):
    from segment_anything import SamPredictor

    from napari_mobilesam.models.backends import (
        OpenVINOEncoder,
        OpenVINOMaskDecoder,
        TorchEncoder,
        apply_backend,
    )
    from napari_mobilesam.models.registry import build_sam, model_identity, model_info

    def fresh():
        return _randomize(build_sam("vit_t_test", seed=5))

    eager = apply_backend(fresh(), "cpu", "eager")
    torch32 = apply_backend(fresh(), "cpu", "torch", "fp32")
    ov32 = apply_backend(fresh(), "cpu", "openvino", "fp32")
    assert not ov32.image_encoder.converted  # the module's IR (conversion is tested above)
    ovmix = apply_backend(fresh(), "cpu", "openvino", "mixed")
    auto = apply_backend(fresh(), "cpu")
    assert isinstance(torch32.image_encoder, TorchEncoder)
    assert isinstance(ov32.image_encoder, OpenVINOEncoder)
    assert isinstance(ov32.mask_decoder, OpenVINOMaskDecoder)
    assert model_info(auto)["backend"] == "openvino"
    ids = {model_identity(s) for s in (eager, torch32, ov32, ovmix)}
    assert len(ids) == 4
    assert model_identity(ov32).endswith(":openvino:fp32")
    assert model_identity(eager).endswith(":eager:fp32")
    # weights are the same: the weights part of the identity agrees
    assert len({i.split(":")[1] for i in ids}) == 1
    # every backend drives SamPredictor; fp32 ones agree with eager
    img = (np.random.default_rng(0).random((300, 200, 3)) * 255).astype(np.uint8)
    outs = []
    for sam in (eager, torch32, ov32):
        pred = SamPredictor(sam)
        pred.set_image(img)
        outs.append(pred.predict(np.array([[100.0, 150.0]]), np.array([1]), return_logits=True))
    for logits, iou, _ in outs[1:]:
        assert np.abs(logits - outs[0][0]).max() < 1e-2
        assert np.abs(iou - outs[0][1]).max() < 1e-3


def test_identity_changes_with_weights(test_sam):
    from napari_mobilesam.models.registry import model_identity

    before = model_identity(test_sam)
    assert model_identity(test_sam) == before  # stable
    with torch.no_grad():
        test_sam.mask_decoder.iou_token.weight.add_(1.0)  # in place
    assert model_identity(test_sam) != before


def test_backend_errors(test_sam):
    from napari_mobilesam.models.backends import apply_backend

    with pytest.raises(ValueError, match="backend must be one of"):
        apply_backend(test_sam, "cpu", "tensorrt")
    with pytest.raises(ValueError, match="precision must be one of"):
        apply_backend(test_sam, "cpu", "torch", "int4")
    with pytest.raises(ValueError, match="OpenVINO backend runs on the CPU"):
        apply_backend(test_sam, "cuda", "openvino")
    with pytest.raises(ValueError, match="float32 only"):
        apply_backend(test_sam, "cpu", "eager", "bf16")
    apply_backend(test_sam, "cpu", "torch", "fp32")
    with pytest.raises(ValueError, match="already applied"):
        apply_backend(test_sam, "cpu", "torch")

def test_bad_precision_is_refused_before_openvino(test_sam, caplog):
    """A bad precision is named at once, not hidden behind an "OpenVINO unavailable" fallback."""
    from napari_mobilesam.models.backends import apply_backend

    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="precision must be one of"):
        apply_backend(test_sam, "cpu", "openvino", "int4")
    assert "unavailable" not in caplog.text
    assert not hasattr(test_sam.image_encoder, "backend_name")  # nothing applied



def test_openvino_failure_falls_back_to_torch(test_sam, monkeypatch, caplog):
    import sys

    from napari_mobilesam.models.backends import TorchEncoder, apply_backend

    monkeypatch.setitem(sys.modules, "openvino", None)  # "import openvino" now fails
    with caplog.at_level(logging.WARNING, logger="napari_mobilesam.models.backends"):
        sam = apply_backend(test_sam, "cpu", "openvino", "fp32")
    assert isinstance(sam.image_encoder, TorchEncoder)
    assert "falling back to the torch backend" in caplog.text


def test_load_model_with_test_config(fresh_cache):
    from napari_mobilesam import load_model, model_identity

    sam = load_model("vit_t_test", device="cpu", backend="torch", precision="fp32")
    assert not sam.training
    assert model_identity(sam).startswith("vit_t_test:")
    assert model_identity(sam).endswith(":torch:fp32")
    from segment_anything.modeling import MaskDecoder

    from napari_mobilesam.models.backends import FastMaskDecoder

    assert isinstance(sam.mask_decoder, FastMaskDecoder)
    plain = load_model("vit_t_test", device="cpu", backend="torch", fast_decoder=False)
    assert type(plain.mask_decoder) is MaskDecoder


# --- the real model on the parity fixture (a few encoder runs) ---


def _fixture_run(sam, reference_dir):
    from segment_anything import SamPredictor

    expected = dict(np.load(reference_dir / "mobile_sam_expected.npz"))
    cases = json.loads((reference_dir / "mobile_sam_cases.json").read_text())
    pred = SamPredictor(sam)
    pred.set_image(expected["image"])
    emb = pred.get_image_embedding().numpy()
    outs = dict(run_fixture_cases(pred, cases, expected))
    return expected, emb, outs


def _assert_fp32_parity(expected, emb, outs):
    assert np.abs(emb - expected["embedding"]).max() < TOL["embedding"]
    for name, out in outs.items():
        for key, value in out.items():
            err = np.abs(value - expected[f"{name}/{key}"]).max()
            assert err < TOL[key], f"{name}/{key}: {err}"


def _min_median_iou(expected, outs):
    worst = 1.0
    for name, out in outs.items():
        ref = expected[f"{name}/logits"]
        for k in range(ref.shape[0]):
            thr = np.median(ref[k])
            a, b = out["logits"][k] > thr, ref[k] > thr
            worst = min(worst, np.logical_and(a, b).sum() / np.logical_or(a, b).sum())
    return worst


@pytest.mark.slow
def test_real_model_openvino_fp32_parity_and_mixed_masks(reference_dir):
    from napari_mobilesam import load_model
    from napari_mobilesam.models.backends import OpenVINOEncoder

    ckpt = reference_dir / "mobile_sam_random_weights.pt"
    sam = load_model("vit_t", ckpt, device="cpu", backend="openvino", precision="fp32")
    _assert_fp32_parity(*_fixture_run(sam, reference_dir))
    mixed = load_model("vit_t", ckpt, device="cpu")  # the default CPU path
    assert isinstance(mixed.image_encoder, OpenVINOEncoder)
    assert not mixed.image_encoder.converted  # IR reused from the fp32 model above
    expected, emb, outs = _fixture_run(mixed, reference_dir)
    if mixed.image_encoder.precision == "mixed":
        assert np.abs(emb - expected["embedding"]).max() > 0  # bf16 really ran
    assert _min_median_iou(expected, outs) >= 0.98


@pytest.mark.slow
def test_real_model_torch_fp32_parity(reference_dir):
    from napari_mobilesam import load_model

    ckpt = reference_dir / "mobile_sam_random_weights.pt"
    sam = load_model("vit_t", ckpt, device="cpu", backend="torch", precision="fp32")
    _assert_fp32_parity(*_fixture_run(sam, reference_dir))


def test_damaged_cached_ir_is_rebuilt_and_reported(test_sam, fresh_cache, _converted_once, caplog):
    """#12 item 8: a truncated model.bin in the IR cache is detected, named and rebuilt."""
    import logging
    import shutil

    from napari_mobilesam.models.backends import OpenVINOEncoder

    shutil.copytree(_converted_once / "openvino", fresh_cache / "openvino")  # an intact cached IR
    first = OpenVINOEncoder(test_sam.image_encoder, "fp32")
    x = _x(3)
    want = first(x)
    assert not first.converted and first.ir_paths[-1].is_relative_to(fresh_cache)
    folder = first.ir_paths[-1].parent
    data = (folder / "model.bin").read_bytes()
    (folder / "model.bin").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="napari_mobilesam.models.backends"):
        again = OpenVINOEncoder(test_sam.image_encoder, "fp32")
    assert again.converted
    assert str(folder) in caplog.text and "model.bin" in caplog.text and "damaged" in caplog.text
    assert (folder / "model.bin").stat().st_size == len(data)
    assert torch.equal(again(x), want)
    caplog.clear()
    third = OpenVINOEncoder(test_sam.image_encoder, "fp32")  # intact now: reused silently
    assert not third.converted and "damaged" not in caplog.text


def test_openvino_follows_omp_num_threads(tmp_path, monkeypatch):
    """OMP_NUM_THREADS caps OpenVINO's threads as it caps torch's (the CPU plugin ignores the
    variable itself); unset or not a positive integer, the plugin's default stays."""
    import openvino as ov
    import openvino.opset13 as ops

    from napari_mobilesam.models.backends.openvino import _compile, omp_threads

    x = ops.parameter([1, 8], ov.Type.f32)
    xml = tmp_path / "relu.xml"
    ov.save_model(ov.Model([ops.relu(x)], [x]), xml)
    for value, expected in (("1", 1), ("3", 3), ("", None), ("0", None), ("two", None)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert omp_threads() == expected, value
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert int(_compile(xml, "fp32").get_property("INFERENCE_NUM_THREADS")) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    # unset: what the plugin chooses itself for the same latency hint (machines differ: compare)
    plugin_default = ov.Core().compile_model(str(xml), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    assert (int(_compile(xml, "fp32").get_property("INFERENCE_NUM_THREADS"))
            == int(plugin_default.get_property("INFERENCE_NUM_THREADS")))
