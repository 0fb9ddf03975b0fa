"""Safe, strict checkpoint loading with clear errors; saving with metadata."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def test_state():
    """State dict of the tiny test model (same tree as vit_t, random weights)."""
    from napari_mobilesam.models.registry import build_sam

    return build_sam("vit_t_test", seed=3).state_dict()


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_roundtrip_through_file(tmp_path, test_state):
    from napari_mobilesam.models.registry import build_sam

    path = _save(tmp_path / "ok.pt", test_state)
    sam = build_sam("vit_t_test", path)
    for k, v in sam.state_dict().items():
        assert torch.equal(v, test_state[k]), k
    assert sam.napari_mobilesam_info["source"] == str(path)
    assert not sam.training


def test_float16_checkpoint_is_cast_to_float32(tmp_path, test_state):
    from napari_mobilesam.models.registry import build_sam

    half = {k: v.half() if v.is_floating_point() else v for k, v in test_state.items()}
    sam = build_sam("vit_t_test", _save(tmp_path / "half.pt", half))
    assert all(p.dtype == torch.float32 for p in sam.parameters())


def test_not_a_checkpoint(tmp_path):
    from napari_mobilesam.models.checkpoint import CheckpointError, read_state_dict

    p = tmp_path / "notes.pt"
    p.write_text("these are my notes, not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_state_dict(p)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(tmp_path / "empty.pt")


def test_truncated_file(tmp_path, test_state):
    from napari_mobilesam.models.checkpoint import CheckpointError, read_state_dict

    data = _save(tmp_path / "full.pt", test_state).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(cut)


def test_pickled_code_is_refused(tmp_path):
    from napari_mobilesam.models.checkpoint import CheckpointError, read_state_dict

    p = _save(tmp_path / "evil.pt", {"weights": torch.zeros(2), "payload": _Payload()})
    with pytest.raises(CheckpointError, match="safe load"):
        read_state_dict(p)


class _Payload:
    """An arbitrary object: unpickling it would need weights_only=False."""


def test_not_a_state_dict(tmp_path):
    from napari_mobilesam.models.checkpoint import CheckpointError, read_state_dict

    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(_save(tmp_path / "list.pt", [torch.zeros(3)]))


def test_wrapped_state_dict_is_unwrapped(tmp_path, test_state):
    from napari_mobilesam.models.checkpoint import read_state_dict

    sd = read_state_dict(_save(tmp_path / "wrapped.pt", {"state_dict": test_state}))
    assert set(sd) == set(test_state)


def test_missing_extra_and_misshaped_keys_are_named(test_state):
    from napari_mobilesam.models.checkpoint import CheckpointError
    from napari_mobilesam.models.registry import build_sam

    sd = dict(test_state)
    del sd["mask_decoder.iou_token.weight"]
    sd["image_encoder.extra.weight"] = torch.zeros(3)
    sd["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 255)
    with pytest.raises(CheckpointError) as err:
        build_sam("vit_t_test", sd)
    msg = str(err.value)
    assert "1 missing keys: mask_decoder.iou_token.weight" in msg
    assert "1 unexpected keys: image_encoder.extra.weight" in msg
    assert "prompt_encoder.no_mask_embed.weight (1, 255) (expected (1, 256))" in msg


def test_non_finite_values_are_refused(test_state):
    from napari_mobilesam.models.checkpoint import CheckpointError
    from napari_mobilesam.models.registry import build_sam

    sd = dict(test_state)
    sd["image_encoder.neck.1.weight"] = torch.full_like(sd["image_encoder.neck.1.weight"], float("nan"))
    with pytest.raises(CheckpointError, match="image_encoder.neck.1.weight"):
        build_sam("vit_t_test", sd)


def _sam_vit_like(test_state, width=768):
    """Keys shaped like a SAM ViT checkpoint: ViT encoder, same prompt encoder and decoder."""
    sd = {k: v for k, v in test_state.items() if not k.startswith("image_encoder.")}
    sd["image_encoder.pos_embed"] = torch.zeros(1, 64, 64, width)
    sd["image_encoder.patch_embed.proj.weight"] = torch.zeros(width, 3, 16, 16)
    sd["image_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3 * width, width)
    return sd


def test_sam_vit_checkpoint_where_mobilesam_expected(tmp_path, test_state):
    from napari_mobilesam.models.checkpoint import CheckpointError
    from napari_mobilesam.models.registry import build_sam

    p = _save(tmp_path / "sam_vit_b_01ec64.pth", _sam_vit_like(test_state, 768))
    with pytest.raises(CheckpointError, match=r"SAM ViT-B checkpoint.*MobileSAM.*model='vit_b'"):
        build_sam("vit_t_test", p)
    with pytest.raises(CheckpointError, match=r"SAM ViT-H checkpoint"):
        build_sam("vit_t_test", _sam_vit_like(test_state, 1280))


def test_mobilesam_checkpoint_where_sam_vit_expected(test_state):
    from napari_mobilesam.models.checkpoint import CheckpointError, validate_state_dict

    expected = _sam_vit_like(test_state, 1024)
    with pytest.raises(CheckpointError, match=r"MobileSAM \(TinyViT\).*model='vit_t'"):
        validate_state_dict(test_state, expected, model="vit_l")


def test_ddp_prefix_explained(test_state):
    from napari_mobilesam.models.checkpoint import CheckpointError, validate_state_dict

    sd = {f"module.{k}": v for k, v in test_state.items()}
    with pytest.raises(CheckpointError, match="module.state_dict"):
        validate_state_dict(sd, test_state, model="vit_t_test")


def test_save_with_metadata_and_load_the_same_way(tmp_path, test_state):
    from napari_mobilesam.models.checkpoint import (
        metadata_path,
        read_checkpoint_metadata,
        read_state_dict,
        save_checkpoint,
    )
    from napari_mobilesam.models.registry import build_sam

    path = save_checkpoint(test_state, tmp_path / "student.pt", {"teacher": "vit_b", "epochs": 2})
    assert metadata_path(path).name == "student.pt.json"
    meta = read_checkpoint_metadata(path)
    assert meta["teacher"] == "vit_b" and meta["epochs"] == 2
    assert meta["format"] == "napari-mobilesam-checkpoint/1"
    # the .pt file is a plain official-layout state dict, readable with plain torch.load
    plain = torch.load(path, weights_only=True)
    assert set(plain) == set(test_state)
    assert set(read_state_dict(path)) == set(test_state)
    build_sam("vit_t_test", path)
    assert not list(tmp_path.glob("*.part"))


def test_metadata_absent_or_stale(tmp_path, test_state):
    from napari_mobilesam.models.checkpoint import (
        CheckpointError,
        read_checkpoint_metadata,
        save_checkpoint,
    )

    plain = _save(tmp_path / "plain.pt", test_state)
    assert read_checkpoint_metadata(plain) is None
    path = save_checkpoint(test_state, tmp_path / "a.pt", {"note": "first"})
    other = dict(test_state)
    other["image_encoder.neck.1.bias"] = other["image_encoder.neck.1.bias"] + 1
    torch.save(other, path)  # replaced behind our back, metadata not updated
    with pytest.raises(CheckpointError, match="different file"):
        read_checkpoint_metadata(path)


def test_metadata_must_be_json(tmp_path, test_state):
    from napari_mobilesam.models.checkpoint import save_checkpoint

    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(test_state, tmp_path / "b.pt", {"bad": object()})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(test_state, tmp_path / "b.pt", {"sha256": "x"})
    assert not (tmp_path / "b.pt").exists()


def test_failed_save_keeps_previous_file(tmp_path, test_state, monkeypatch):
    from napari_mobilesam.models import checkpoint

    path = checkpoint.save_checkpoint(test_state, tmp_path / "keep.pt")
    before = path.read_bytes()

    def boom(obj, f):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(test_state, path)
    assert path.read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} == {"keep.pt", "keep.pt.json"}  # no temp files
    json.loads((tmp_path / "keep.pt.json").read_text())


def test_registry_lists_sam_teachers():
    from napari_mobilesam.models.registry import MODELS, build_sam

    assert {"vit_t", "vit_b", "vit_l", "vit_h", "vit_t_test"} <= set(MODELS)
    with pytest.raises(ValueError, match="vit_t, vit_b"):
        build_sam("vit_x")


@pytest.mark.slow
def test_vit_b_rejects_mobilesam_checkpoint(test_state):
    """The real SAM ViT-B tree (built by segment-anything) recognises a MobileSAM state dict."""
    from napari_mobilesam.models.checkpoint import CheckpointError
    from napari_mobilesam.models.registry import build_sam

    with pytest.raises(CheckpointError, match=r"MobileSAM \(TinyViT\) checkpoint.*model='vit_t'"):
        build_sam("vit_b", test_state)
