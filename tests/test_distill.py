"""Decoupled distillation: teacher cache, augmentations, training, resume, output, CLI functions.

Small configurations for speed: the student is ``vit_t_test``; the teacher is a tiny SAM ViT
(segment-anything's ``ImageEncoderViT``, 32 dims, 2 blocks) saved as a checkpoint file, so the real
loading path runs. One test uses the real MobileSAM (``vit_t``) student with the parity fixture's
weights to check the official output layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_mobilesam.distillation.command import configure_parser, run_cli
from napari_mobilesam.distillation.data import (
    DistillError,
    TeacherCache,
    dihedral,
    fill_teacher_cache,
    load_teacher,
    open_images,
    preprocess_rgb,
    save_teacher_checkpoint,
    split_slices,
    teacher_from_module,
    vit_teacher_encoder,
)
from napari_mobilesam.distillation.run import DistillConfig, distill, iter_distill


@pytest.fixture(scope="module")
def small_stack():
    """(8, 96, 96) uint16 synthetic nuclei: 6 training + 2 validation slices."""
    from napari_mobilesam.data import synthetic_nuclei

    return synthetic_nuclei(shape=(8, 96, 96), n_nuclei=6, seed=3).image


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A tiny SAM ViT teacher written as a segment-anything checkpoint (``image_encoder.*``)."""
    path = tmp_path_factory.mktemp("teacher") / "tiny_sam_vit.pth"
    return save_teacher_checkpoint(vit_teacher_encoder("tiny", seed=1), path)


def _config(tmp_path, teacher_path, image_list, **kw):
    base = dict(
        teacher=teacher_path, images=image_list, output=tmp_path / "student.pt", student_model="vit_t_test",
        epochs=2, batch_size=2, lr=2e-3, val_fraction=0.25, val_prompts=4, augment=True,
        cache_dir=tmp_path / "cache", device="cpu",
    )
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One teacher-embedding cache for the training tests (as a user's runs share one)."""
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, teacher_ckpt, small_stack, shared_cache):
    """A complete 2-epoch run with a fresh cache: (events, result)."""
    d = tmp_path_factory.mktemp("straight")
    events = []
    result = distill(_config(d, teacher_ckpt, [small_stack], cache_dir=shared_cache), callback=events.append)
    return events, result


# ---------------------------------------------------------------------------------------------
# data side


def test_preprocess_matches_inference_exactly():
    """Training inputs are made exactly like inference's (embeddings.compute_embedding)."""
    from napari_mobilesam.core.embeddings import compute_embedding
    from napari_mobilesam.models.registry import build_sam

    sam = build_sam("vit_t_test", seed=0)
    rgb = (np.random.default_rng(0).random((70, 130, 3)) * 255).astype(np.uint8)
    x, input_size = preprocess_rgb(rgb)
    assert x.shape == (3, 1024, 1024) and x.dtype == torch.float32
    ref = compute_embedding(sam, rgb)
    assert input_size == ref.input_size == (551, 1024)
    with torch.inference_mode():
        emb = sam.image_encoder(x[None])
    assert torch.equal(emb, ref.features)


def test_dihedral_keeps_image_and_embedding_aligned():
    """A flip/rotation of the input maps to the same flip/rotation of any patch-aligned feature map."""
    x = torch.randn(3, 64, 64)
    feats = torch.nn.functional.avg_pool2d(x, 16)  # a stand-in encoder that commutes with D4
    seen = set()
    for op in range(8):
        tx, tf = dihedral(op, x, feats)
        torch.testing.assert_close(torch.nn.functional.avg_pool2d(tx, 16), tf)
        seen.add(tuple(tx.flatten()[:8].tolist()))
    assert len(seen) == 8  # eight different transforms
    assert torch.equal(dihedral(0, x)[0], x)
    with pytest.raises(ValueError, match="square"):
        dihedral(1, torch.zeros(1, 4, 5))


def test_open_images_and_split(tmp_path, small_stack):
    import tifffile

    folder = tmp_path / "tiffs"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", small_stack[:3])
    tifffile.imwrite(folder / "b.tif", small_stack[3])
    (folder / "notes.txt").write_text("not an image")
    sources = open_images([folder, small_stack])
    assert [src.n_slices for _, src in sources] == [3, 1, 8]
    train, val = split_slices(sources, max_slices_per_image=4, val_fraction=0.2, seed=0)
    # the 4 evenly spaced slices of the 8-slice stack include slices already in a.tif/b.tif?
    # no: a.tif is normalised over its own 3 slices, so keys differ; all slices are distinct.
    assert len(train) + len(val) == 3 + 1 + 4
    assert len(val) == 2
    assert not {r.key for r in train} & {r.key for r in val}
    again = split_slices(sources, max_slices_per_image=4, val_fraction=0.2, seed=0)
    assert again == (train, val)  # deterministic for a seed

    with pytest.raises(DistillError, match="does not exist"):
        open_images([tmp_path / "missing.tif"])
    with pytest.raises(DistillError, match="no images"):
        open_images([])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DistillError, match="holds no image files"):
        open_images(empty)
    with pytest.raises(DistillError, match="cannot be used as an image"):
        open_images([np.zeros((2, 3, 4, 5, 6), dtype=np.uint8)])
    two_channel = open_images(np.stack([small_stack[:2], small_stack[2:4]], axis=1), channel_axis=1)
    assert two_channel[0][1].n_slices == 2  # (z, c, row, col) read as 2 slices of 2 channels
    with pytest.raises(DistillError, match="set val_fraction=0"):
        split_slices(open_images(small_stack[0]), val_fraction=0.5)


def test_load_teacher_reads_sam_vit_and_mobilesam_checkpoints(tmp_path, teacher_ckpt):
    from napari_mobilesam.models.registry import build_sam

    t = load_teacher(teacher_ckpt, cache_root=tmp_path)
    assert t.encoder is None  # checked, not kept: a fully cached run never needs it
    assert "SAM ViT" in t.description and t.identity.startswith("file-sha256:")
    enc = t.load()
    ref = vit_teacher_encoder("tiny", seed=1)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), ref(x))
    # the same file has the same identity (memoised hash), another file another identity
    assert load_teacher(teacher_ckpt, cache_root=tmp_path).identity == t.identity
    other = save_teacher_checkpoint(vit_teacher_encoder("tiny", seed=2), tmp_path / "other.pth")
    assert load_teacher(other, cache_root=tmp_path).identity != t.identity

    # a MobileSAM-format checkpoint (full Sam state dict) as teacher
    sam = build_sam("vit_t_test", seed=5)
    mpath = tmp_path / "mobilesam_like.pt"
    torch.save(sam.state_dict(), mpath)
    mt = load_teacher(mpath, cache_root=tmp_path)
    assert "MobileSAM" in mt.description
    with torch.inference_mode():
        torch.testing.assert_close(mt.load()(x), sam.image_encoder(x))


def test_load_teacher_refuses_what_is_not_a_sam_encoder(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_teacher(tmp_path / "nope.pth")
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, bad)
    with pytest.raises(DistillError, match="not a SAM image encoder"):
        load_teacher(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(DistillError, match="teacher"):
        load_teacher(junk)


def test_teacher_cache_written_once_reused_and_repaired(tmp_path, teacher_ckpt, small_stack):
    teacher = load_teacher(teacher_ckpt, cache_root=tmp_path)
    loads = []
    original_loader = teacher.loader
    teacher.loader = lambda: loads.append(1) or original_loader()
    sources = open_images(small_stack[:3])
    train, val = split_slices(sources, val_fraction=0)
    cache = TeacherCache(teacher, tmp_path)
    assert fill_teacher_cache(cache, sources, train) == 3
    assert loads == [1]
    files = sorted(cache.dir.glob("*.npy"))
    assert len(files) == 3 and not list(cache.dir.glob("*.tmp")) and not list(cache.dir.glob(".*"))
    emb = cache.load(train[0].key)
    assert emb.shape == (256, 64, 64) and emb.dtype == np.float16
    # float16 entries match the teacher run directly
    x, _ = preprocess_rgb(sources[0][1].rgb(train[0].z))
    with torch.inference_mode():
        direct = teacher.load()(x[None])[0].numpy()
    np.testing.assert_allclose(emb.astype(np.float32), direct, rtol=2e-3, atol=2e-3)

    # a new Teacher object for the same file (a new run): nothing recomputed, teacher never loaded
    again = load_teacher(teacher_ckpt, cache_root=tmp_path)
    again.loader = lambda: pytest.fail("teacher loaded although every embedding is cached")
    cache2 = TeacherCache(again, tmp_path)
    assert cache2.dir == cache.dir
    assert fill_teacher_cache(cache2, sources, train) == 0
    mtimes = [f.stat().st_mtime_ns for f in files]

    # a damaged entry (e.g. disk full) is recomputed, the others are left alone
    files[0].write_bytes(files[0].read_bytes()[:1000])
    cache3 = TeacherCache(load_teacher(teacher_ckpt, cache_root=tmp_path), tmp_path)
    assert fill_teacher_cache(cache3, sources, train) == 1
    assert [f.stat().st_mtime_ns for f in files][1:] == mtimes[1:]
    assert all(cache3.load(r.key) is not None for r in train)

    # a different teacher has its own entries
    other = TeacherCache(teacher_from_module(vit_teacher_encoder("tiny", seed=9)), tmp_path)
    assert other.dir != cache.dir and other.missing(r.key for r in train) == [r.key for r in train]


def test_teacher_cache_fill_is_resumable(tmp_path, teacher_ckpt, small_stack):
    """Cancelled after two entries: those are kept, the next fill computes only the rest."""
    teacher = load_teacher(teacher_ckpt, cache_root=tmp_path)
    sources = open_images(small_stack[:4])
    refs, _ = split_slices(sources, val_fraction=0)
    cache = TeacherCache(teacher, tmp_path)
    seen = []
    n = fill_teacher_cache(cache, sources, refs, progress=lambda d, t: seen.append(d), cancel=lambda: len(seen) > 2)
    assert n == 2 and len(cache.missing(r.key for r in refs)) == 2
    assert fill_teacher_cache(cache, sources, refs) == 2
    assert cache.missing(r.key for r in refs) == []


# ---------------------------------------------------------------------------------------------
# training


def test_invalid_settings_are_refused_before_anything_runs(tmp_path, teacher_ckpt, small_stack):
    cases = [
        (dict(teacher=tmp_path / "missing.pth"), "does not exist"),
        (dict(images=[tmp_path / "nothing.tif"]), "does not exist"),
        (dict(images=[]), "no images"),
        (dict(epochs=0), "epochs"),
        (dict(lr=-1.0), "learning rate"),
        (dict(output=tmp_path / "student.txt"), r"\.pt"),
        (dict(student_model="vit_b"), "student_model"),
        (dict(teacher=42), "teacher must be a checkpoint path"),
        (dict(device="gpu"), "is not a device"),
        (dict(precision="int4"), "precision"),
    ]
    for kw, match in cases:
        cfg = _config(tmp_path, teacher_ckpt, [small_stack], **kw)
        with pytest.raises(DistillError, match=match):
            next(iter_distill(cfg))
    assert not (tmp_path / "cache" / "distill").exists()  # no teacher embedding was computed
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"user data")
    with pytest.raises(DistillError, match="already exists"):
        next(iter_distill(_config(tmp_path, teacher_ckpt, [small_stack], output=existing)))
    assert existing.read_bytes() == b"user data"


def test_distillation_reduces_loss_and_writes_a_strict_checkpoint(
    tmp_path, teacher_ckpt, small_stack, straight_run, shared_cache
):
    from napari_mobilesam.models.checkpoint import read_checkpoint_metadata
    from napari_mobilesam.models.registry import build_sam

    events, result = straight_run
    steps = [e.values["loss"] for e in events if e.kind == "step"]
    vals = [e for e in events if e.kind == "val"]
    assert len(steps) == 2 * 3  # 6 training slices, batch 2, 2 epochs
    assert [v.epoch for v in vals] == [0, 1, 2]
    assert np.mean(steps[-2:]) < 0.8 * np.mean(steps[:2])
    assert result.after["mse"] < 0.8 * result.before["mse"]
    assert 0.0 <= result.before["miou"] <= 1.0 and 0.0 <= result.after["miou"] <= 1.0
    assert [e.kind for e in events].count("cache") == 8  # every slice's teacher embedding, once

    # the output loads strictly as the student model; only the image encoder changed
    out = result.output
    trained = build_sam("vit_t_test", out)
    init = build_sam("vit_t_test", seed=0)
    assert trained.state_dict().keys() == init.state_dict().keys()
    for name, value in trained.state_dict().items():
        same = torch.equal(value, init.state_dict()[name])
        if name.startswith(("prompt_encoder.", "mask_decoder.")) or "running_" in name:
            assert same, f"{name} changed although it is frozen"
    assert not torch.equal(trained.image_encoder.neck[0].weight, init.image_encoder.neck[0].weight)
    meta = read_checkpoint_metadata(out)
    assert meta["model"] == "vit_t_test" and meta["kind"] == "distilled"
    assert meta["teacher"]["identity"].startswith("file-sha256:")
    assert meta["metrics"]["after"]["mse"] == pytest.approx(result.after["mse"])
    assert meta["data"] == {"images": ["array[0]"], "n_train": 6, "n_val": 2}
    assert len(meta["metrics"]["history"]) == 2



def test_crashed_run_resumes_from_its_last_checkpoint(
    tmp_path, teacher_ckpt, small_stack, straight_run, shared_cache
):
    """A crash in epoch 2 resumes at epoch 2 and ends with exactly the uninterrupted result.

    Also: these runs reuse the teacher cache the first run filled (no teacher embedding computed).
    """
    from napari_mobilesam.models.checkpoint import read_state_dict

    cfg = _config(tmp_path, teacher_ckpt, [small_stack], output=tmp_path / "crash.pt", cache_dir=shared_cache)

    class Crash(Exception):
        pass

    steps = []

    def crash_in_epoch_2():  # raised inside the training loop, like an out-of-memory error
        if len(steps) == 4:
            raise Crash
        return False

    first = []

    def record(ev):
        first.append(ev)
        if ev.kind == "step":
            steps.append(ev)

    with pytest.raises(Crash):
        distill(cfg, callback=record, cancel=crash_in_epoch_2)
    assert not [e for e in first if e.kind == "cache"]
    assert not cfg.output.exists()
    states = sorted(cfg.output.with_name("crash.pt.distill").glob("*/state-*.pt"))
    assert [s.name for s in states] == ["state-e0001-s0000000.pt"]

    events = []
    resumed = distill(cfg, callback=events.append)
    assert resumed.resumed_from == states[0]
    assert [e.epoch for e in events if e.kind == "step"] == [1, 1, 1]  # only epoch 2 ran
    assert len(resumed.history) == 2

    assert not [e for e in events if e.kind == "cache"]
    a, b = read_state_dict(resumed.output), read_state_dict(straight_run[1].output)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cancel_saves_a_state_and_the_next_run_continues(tmp_path, teacher_ckpt, small_stack, shared_cache):
    cfg = _config(tmp_path, teacher_ckpt, [small_stack], output=tmp_path / "cancel.pt", epochs=1,
                  cache_dir=shared_cache)
    n = {"steps": 0}

    def count(ev):
        n["steps"] += ev.kind == "step"

    result = distill(cfg, callback=count, cancel=lambda: n["steps"] >= 1)
    assert result.cancelled and result.output is None and not cfg.output.exists()
    assert sorted(p.name for p in result.run_dir.glob("state-*.pt")) == ["state-e0000-s0000001.pt"]
    events = []
    done = distill(cfg, callback=events.append)
    assert [e.step for e in events if e.kind == "step"] == [2, 3]
    assert done.output.exists() and not done.cancelled

    # save_every: states inside the epoch too (the two newest are kept)
    cfg3 = _config(tmp_path, teacher_ckpt, [small_stack], output=tmp_path / "often.pt", epochs=1,
                   cache_dir=shared_cache, save_every=1)
    saved = []
    distill(cfg3, callback=lambda ev: ev.kind == "saved" and saved.append(Path(ev.message).name))
    assert saved == ["state-e0000-s0000001.pt", "state-e0000-s0000002.pt", "state-e0001-s0000000.pt",
                     "often.pt"]

    # closing the generator (what a GUI does on quit) also keeps the progress
    cfg2 = _config(tmp_path, teacher_ckpt, [small_stack], output=tmp_path / "closed.pt", epochs=1,
                   cache_dir=shared_cache)
    gen = iter_distill(cfg2)
    for ev in gen:
        if ev.kind == "step":
            break
    gen.close()
    run_dirs = list(cfg2.output.with_name("closed.pt.distill").iterdir())
    assert [p.name for p in run_dirs[0].glob("state-*.pt")] == ["state-e0000-s0000001.pt"]


def test_truncated_newest_state_is_set_aside_and_the_run_resumes_from_the_one_before(
    tmp_path, teacher_ckpt, small_stack, straight_run, shared_cache
):
    """#12 item 6: a killed run whose newest state file is truncated resumes by itself from the newest
    readable state, keeps the damaged file aside as NAME.damaged, says so, and ends with exactly the
    uninterrupted result."""
    from napari_mobilesam.models.checkpoint import read_state_dict

    cfg = _config(tmp_path, teacher_ckpt, [small_stack], output=tmp_path / "trunc.pt", cache_dir=shared_cache)
    n = {"steps": 0}

    def count(ev):
        n["steps"] += ev.kind == "step"

    first = distill(cfg, callback=count, cancel=lambda: n["steps"] >= 4)  # stops at step 1 of epoch 2
    assert first.cancelled
    names = sorted(p.name for p in first.run_dir.glob("state-*.pt"))
    assert names == ["state-e0001-s0000000.pt", "state-e0001-s0000001.pt"]
    newest = first.run_dir / "state-e0001-s0000001.pt"
    cut = newest.read_bytes()[: newest.stat().st_size // 2]
    newest.write_bytes(cut)  # what a full disk or a copy cut short leaves

    events = []
    resumed = distill(cfg, callback=events.append)
    said = [e.message for e in events if e.kind == "info" and "damaged" in e.message]
    assert len(said) == 1 and "state-e0001-s0000001.pt" in said[0]
    assert "moved it aside to state-e0001-s0000001.pt.damaged" in said[0]
    assert "resuming from state-e0001-s0000000.pt" in said[0]
    assert resumed.resumed_from.name == "state-e0001-s0000000.pt"
    assert (first.run_dir / "state-e0001-s0000001.pt.damaged").read_bytes() == cut  # kept, untouched
    assert [e.step for e in events if e.kind == "step"] == [4, 5, 6]
    assert resumed.output.exists() and len(resumed.history) == 2
    a, b = read_state_dict(resumed.output), read_state_dict(straight_run[1].output)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_only_damaged_states_mean_a_fresh_start_and_nothing_is_deleted(tmp_path):
    from napari_mobilesam.distillation.states import load_state, newest_readable_state

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state-e0001-s0000000.pt").write_bytes(b"PK\x03\x04 cut short")
    torch.save({"something": "else"}, run_dir / "state-e0002-s0000000.pt")
    (run_dir / "state-e0002-s0000000.pt.damaged").write_bytes(b"an older damaged file")
    with pytest.raises(DistillError, match="damaged"):
        load_state(run_dir / "state-e0001-s0000000.pt")
    found = newest_readable_state(run_dir)
    assert found.path is None and found.state is None
    assert [(a.name, b.name) for a, b, _ in found.set_aside] == [
        ("state-e0002-s0000000.pt", "state-e0002-s0000000.pt.damaged-2"),
        ("state-e0001-s0000000.pt", "state-e0001-s0000000.pt.damaged"),
    ]
    assert all("starting afresh" in line for line in found.messages())
    assert "not a distillation training state" in found.set_aside[0][2]
    assert (run_dir / "state-e0002-s0000000.pt.damaged").read_bytes() == b"an older damaged file"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "state-e0001-s0000000.pt.damaged", "state-e0002-s0000000.pt.damaged",
        "state-e0002-s0000000.pt.damaged-2"]


def test_python_dash_m_entry_point(tmp_path):
    """``python -m napari_mobilesam.distillation`` (what ``torchrun -m`` runs) is the distill command."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "napari_mobilesam.distillation", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--teacher" in proc.stdout and "python -m napari_mobilesam.distillation" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "napari_mobilesam.distillation", "--teacher",
                           str(tmp_path / "missing.pth"), "--images", str(tmp_path), "-o", str(tmp_path / "s.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_mask_loss_trains_the_encoder_through_the_frozen_decoder(tmp_path, teacher_ckpt, small_stack):
    from napari_mobilesam.models.registry import build_sam

    events = []
    result = distill(
        _config(tmp_path, teacher_ckpt, [small_stack[:3]], epochs=1, batch_size=2, val_fraction=0.34,
                mask_loss_weight=1.0, mask_points=2, augment=False),
        callback=events.append,
    )
    step = next(e for e in events if e.kind == "step")
    assert step.values["mask"] > 0
    assert step.values["loss"] == pytest.approx(step.values["mse"] + step.values["mask"], rel=1e-5)
    trained, init = build_sam("vit_t_test", result.output), build_sam("vit_t_test", seed=0)
    for name, value in trained.mask_decoder.state_dict().items():
        assert torch.equal(value, init.mask_decoder.state_dict()[name])


@pytest.mark.slow
def test_real_mobilesam_student_output_has_the_official_layout(tmp_path, teacher_ckpt, reference_dir, small_stack):
    """One step with the real TinyViT student: the file has exactly mobile_sam.pt's keys and shapes."""
    from napari_mobilesam.models.checkpoint import read_state_dict
    from napari_mobilesam.models.registry import build_sam

    cfg = _config(tmp_path, teacher_ckpt, [small_stack[0]], student_model="vit_t",
                  student_checkpoint=reference_dir / "mobile_sam_random_weights.pt", epochs=1,
                  batch_size=1, val_fraction=0, lr=1e-4)
    result = distill(cfg)
    state = read_state_dict(result.output)
    expected = {}
    for line in (reference_dir / "mobile_sam_keys.txt").read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ", 1)
            expected[key] = tuple(int(s) for s in shape.strip("()").replace(" ", "").split(",") if s)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    build_sam("vit_t", result.output)  # strict load
    # and through the path the segmentation widget uses (architecture detected from the file)
    from napari_mobilesam.models.checkpoint import detect_architecture
    from napari_mobilesam.models.registry import load_model

    assert detect_architecture(state) == "vit_t"
    load_model("vit_t", result.output, "cpu", backend="eager")
    assert json.loads(result.metadata.read_text())["model"] == "vit_t"


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_functions(tmp_path, teacher_ckpt, small_stack, capsys):
    import tifffile

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, small_stack[:4])
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    out = tmp_path / "cli.pt"
    common = ["--teacher", str(teacher_ckpt), "--student-model", "vit_t_test", "--epochs", "1",
              "--batch-size", "3", "--val-fraction", "0.25", "--val-prompts", "2",
              "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    args = parser.parse_args([*common, "--images", str(stack), "-o", str(out)])
    assert args.mask_loss_weight == 0.0 and not args.no_resume
    assert run_cli(args) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "mIoU" in captured.out
    assert "validation before training" in captured.err
    assert out.exists() and out.with_name("cli.pt.json").exists()

    # the same output again: refused, file untouched
    before = out.read_bytes()
    assert run_cli(parser.parse_args([*common, "--images", str(stack), "-o", str(out)])) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    # not a SAM teacher
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    args = parser.parse_args([*common, "--teacher", str(bad), "--images", str(stack), "-o", str(tmp_path / "x.pt")])
    assert run_cli(args) == 2
    assert "not a SAM image encoder" in capsys.readouterr().err

    # the same refusal through the napari-mobilesam command's entry point
    from napari_mobilesam.cli import main

    code = main(["distill", *common, "--teacher", str(bad), "--images", str(stack), "-o", str(tmp_path / "y.pt")])
    assert code == 2 and "not a SAM image encoder" in capsys.readouterr().err
