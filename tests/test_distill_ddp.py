"""Distillation in separate processes: DDP under torchrun (gloo, 2 CPU processes on 127.0.0.1) and
kill -9 at five points of one ``distill`` run in turn, each run resuming from the last training state (#12
fault tests).

The DDP run uses ``torchrun -m napari_mobilesam.distillation`` (the package's ``__main__``), the
killed runs the real ``napari-mobilesam distill`` command (``python -m napari_mobilesam.cli``); all
with the tiny teacher and the ``vit_t_test`` student.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny SAM ViT teacher checkpoint and a 6-slice TIFF stack."""
    import tifffile

    from napari_mobilesam.data import synthetic_nuclei
    from napari_mobilesam.distillation.data import (
        save_teacher_checkpoint,
        vit_teacher_encoder,
    )

    d = tmp_path_factory.mktemp("ddp_inputs")
    teacher = save_teacher_checkpoint(vit_teacher_encoder("tiny", seed=1), d / "teacher.pth")
    stack = d / "stack.tif"
    tifffile.imwrite(stack, synthetic_nuclei(shape=(6, 96, 96), n_nuclei=6, seed=4).image)
    return teacher, stack


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(
        NAPARI_MOBILESAM_CACHE=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MASTER_ADDR="127.0.0.1",
    )
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's traffic on the loopback interface
    return env


def _args(teacher, stack, out, *extra):
    return ["--teacher", str(teacher), "--images", str(stack), "-o", str(out), "--student-model",
            "vit_t_test", "--batch-size", "1", "--lr", "2e-3", "--val-fraction", "0.34",
            "--val-prompts", "2", "--device", "cpu", *extra]


def test_ddp_two_gloo_processes_end_with_a_strict_checkpoint(tmp_path, inputs):
    from napari_mobilesam.models.checkpoint import read_checkpoint_metadata
    from napari_mobilesam.models.registry import build_sam

    teacher, stack = inputs
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "napari_mobilesam.distillation", *_args(teacher, stack, out, "--epochs", "2")]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "process 1 of 2" in proc.stderr
    assert proc.stdout.count("wrote ") == 1  # only process 0 writes
    meta = read_checkpoint_metadata(out)
    assert meta["processes"] == 2
    assert meta["data"]["n_train"] == 4 and meta["data"]["n_val"] == 2
    after = meta["metrics"]["after"]
    assert after["n_slices"] == 2  # the two processes' validation shares were combined
    assert after["mse"] < meta["metrics"]["before"]["mse"]
    trained = build_sam("vit_t_test", out)  # strict load
    init = build_sam("vit_t_test", seed=0)
    assert not torch.equal(trained.image_encoder.neck[0].weight, init.image_encoder.neck[0].weight)
    states = sorted(p.name for p in out.with_name("ddp.pt.distill").glob("*/state-*.pt"))
    assert states == ["state-e0001-s0000000.pt", "state-e0002-s0000000.pt"]


def _run_until(cmd, env, pattern: str, timeout: float = 240) -> str:
    """Start ``cmd``, kill it with SIGKILL as soon as a stderr line matches ``pattern``; its stderr."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stderr:
            seen.append(line)
            if re.search(pattern, line):
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(seen)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed:\n" + "".join(seen)
    return "".join(seen)


#: Where the run is killed: a stderr line it printed (the kill lands just after it).
KILL_POINTS = {
    "teacher-cache": r"teacher embeddings 1/",
    "epoch1-step1": r"saved .*state-e0000-s0000001\.pt",
    "epoch1-step3": r"saved .*state-e0000-s0000003\.pt",
    "epoch1-end": r"saved .*state-e0001-s0000000\.pt",
    "epoch2-step2": r"saved .*state-e0001-s0000002\.pt",
}


@pytest.mark.slow
def test_kill_9_at_five_points_then_rerun_finishes_with_the_uninterrupted_result(tmp_path, inputs):
    """One ``distill`` command killed with SIGKILL at five points in turn: each run after a kill
    resumes from what the killed one left (the next kill lands further on), the last one finishes;
    the files that were there before are byte-identical, and the weights equal an uninterrupted
    run's. The chain starts with an empty cache (the first kill lands in the teacher cache)."""
    from napari_mobilesam.models.checkpoint import read_state_dict

    teacher, stack = inputs
    env = _env(tmp_path)
    extra = ("--epochs", "2", "--save-every", "1")
    cli = [sys.executable, "-m", "napari_mobilesam.cli", "distill"]
    reference = tmp_path / "reference.pt"
    done = subprocess.run([*cli, *_args(teacher, stack, reference, *extra)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = read_state_dict(reference)
    before = {p: p.read_bytes() for p in (teacher, stack, reference)}

    out = tmp_path / "chain" / "student.pt"
    out.parent.mkdir()
    keep = out.with_name("keep.pt")
    keep.write_bytes(b"a file the user had there")
    run_env = dict(env, NAPARI_MOBILESAM_CACHE=str(tmp_path / "chain" / "cache"))
    cmd = [*cli, *_args(teacher, stack, out, *extra)]
    previous = None
    for name, pattern in KILL_POINTS.items():
        err = _run_until(cmd, run_env, pattern)
        assert not out.exists(), name
        assert not list(out.parent.glob("student.pt.distill/*/.*.tmp")), name  # no partial file under a state name
        if previous not in (None, "teacher-cache"):  # a training state was saved before this run
            assert "resuming from" in err, (name, err)
            assert "teacher embeddings" not in err, (name, err)  # the cache survived the kill
        previous = name
    again = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr and "teacher embeddings" not in again.stderr
    assert "step 1/" not in again.stderr  # killed in epoch 2: epoch 1 was not trained again
    got = read_state_dict(out)
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert keep.read_bytes() == b"a file the user had there"
    assert not list(out.parent.glob("student.pt.distill/*/*.damaged"))
    assert {p: p.read_bytes() for p in before} == before
