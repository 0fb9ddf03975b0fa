"""The napari-mobilesam command line: parsing, exit codes, errors, outputs, overwrite protection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_mobilesam import cli
from napari_mobilesam.batch.api import read_stack_metadata
from napari_mobilesam.data import synthetic_nuclei

# The tiny random model, exact eager torch: fast, and needs no downloaded weights.
MODEL = ["--model", "vit_t_test", "--backend", "eager"]
LOOSE = ["--min-iou", "0", "--min-stability", "0", "--grid", "2", "--max-area-fraction", "0.6",
         "--max-points", "3"]


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    st = synthetic_nuclei((8, 96, 96), n_nuclei=6, seed=1, z_radius_range=(2.5, 3.5), radius_range=(9, 14))
    path = tmp_path_factory.mktemp("cli") / "stack.tif"
    tifffile.imwrite(path, st.image, imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"spacing": 1.5, "unit": "um", "axes": "ZYX"}, compression="zlib")
    return path


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_help_and_usage_errors(capsys):
    assert run("--help") == 0
    out = capsys.readouterr().out
    assert "segment" in out and "auto" in out and "distill" in out and "exit codes" in out
    assert run() == cli.EXIT_USAGE
    assert run("auto", "x.tif") == cli.EXIT_USAGE  # -o is required
    assert "--output" in capsys.readouterr().err
    assert run("segment", "x.tif", "-o", "y.tif") == cli.EXIT_USAGE  # --prompts is required
    assert run("distill", "--help") == 0
    assert "--teacher" in capsys.readouterr().out


def test_auto_writes_compressed_labels_with_metadata(tmp_path, stack_file, capsys):
    out = tmp_path / "labels.tif"
    code = run("auto", stack_file, "-o", out, *MODEL, *LOOSE, "--z-range", "2:6")
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "auto" in err and "4/4" in err  # the progress bar went to stderr
    lab = tifffile.imread(out)
    assert lab.shape == (8, 96, 96) and lab.dtype == np.uint32
    assert lab[2:6].any() and not lab[:2].any() and not lab[6:].any()
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression != 1
    m = read_stack_metadata(out)
    assert m.resolution == pytest.approx((4.0, 4.0)) and m.spacing == 1.5 and m.unit == "um"


def test_never_overwrites_without_flag(tmp_path, stack_file, capsys):
    out = tmp_path / "labels.tif"
    out.write_bytes(b"keep me")
    assert run("auto", stack_file, "-o", out, *MODEL, "--no-progress") == cli.EXIT_OUTPUT
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    code = run("auto", stack_file, "-o", out, *MODEL, *LOOSE, "--no-progress", "--overwrite",
               "--z-range", "3:4")
    assert code == 0 and tifffile.imread(out).shape == (8, 96, 96)
    assert run("auto", stack_file, "-o", tmp_path / "x.png", *MODEL) == cli.EXIT_INPUT


def test_segment_from_prompts_csv(tmp_path, stack_file):
    st_img = tifffile.imread(stack_file)
    prompts = tmp_path / "p.csv"
    prompts.write_text("z,row,col,label,object_id\n3,40,40,1,7\n3,45,48,0,7\n5,60,30,1,9\n")
    out = tmp_path / "seg.tif"
    code = run("segment", stack_file, "--prompts", prompts, "-o", out, *MODEL, "--no-progress")
    assert code == 0
    lab = tifffile.imread(out)
    assert lab.shape == st_img.shape
    assert set(np.unique(lab)) <= {0, 7, 9}
    assert not lab[[0, 1, 2, 4, 6, 7]].any()


@pytest.mark.parametrize(
    "csv_text, message",
    [
        ("z,row,col,label,object_id\n3,40,x,1,7\n", "line 2"),
        ("z,row,col,label,object_id\n30,40,40,1,7\n", "outside the stack"),
        ("zz,rr,cc\n1,2,3\n", "lacks column"),
    ],
)
def test_bad_prompts_file(tmp_path, stack_file, capsys, csv_text, message):
    prompts = tmp_path / "p.csv"
    prompts.write_text(csv_text)
    out = tmp_path / "seg.tif"
    code = run("segment", stack_file, "--prompts", prompts, "-o", out, *MODEL, "--no-progress")
    assert code == cli.EXIT_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_inputs_exit_codes(tmp_path, stack_file, capsys):
    out = tmp_path / "o.tif"
    assert run("auto", tmp_path / "missing.tif", "-o", out, *MODEL) == cli.EXIT_INPUT
    assert "not found" in capsys.readouterr().err
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    assert run("auto", tmp_path / "junk.tif", "-o", out, *MODEL) == cli.EXIT_INPUT
    assert "cannot read" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "tiny.tif", np.zeros((3, 4, 5), np.uint16))  # slices too small
    assert run("auto", tmp_path / "tiny.tif", "-o", out, *MODEL, "--no-progress") == cli.EXIT_INPUT
    assert "too small" in capsys.readouterr().err
    assert run("auto", stack_file, "-o", out, *MODEL, "--z-range", "9:12") == cli.EXIT_INPUT
    assert "selects no slices" in capsys.readouterr().err
    bad_ck = tmp_path / "bad.pt"
    bad_ck.write_bytes(b"garbage")
    code = run("auto", stack_file, "-o", out, "--model", "vit_t_test", "--checkpoint", bad_ck,
               "--backend", "eager", "--no-progress")
    assert code == cli.EXIT_MODEL
    assert not out.exists()
    assert run("auto", stack_file, "-o", out, "--model", "vit_q", "--backend", "eager") == cli.EXIT_MODEL  # #12: an unknown model is a model error (exit 5, as documented)
    assert "unknown model" in capsys.readouterr().err


def test_console_script_runs_as_a_process(tmp_path, stack_file):
    exe = shutil.which("napari-mobilesam", path=os.path.dirname(sys.executable))
    assert exe is not None, "the napari-mobilesam console script is not installed"
    r = subprocess.run([exe, "auto", str(stack_file), "-o", str(tmp_path / "x.tif"),
                        "--z-range", "bad"], capture_output=True, text=True, timeout=120)
    assert r.returncode == cli.EXIT_INPUT and "START:STOP" in r.stderr
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "napari-mobilesam" in r.stdout


def test_folder_of_stacks(tmp_path, stack_file, capsys):
    src = tmp_path / "stacks"
    src.mkdir()
    small = tifffile.imread(stack_file)[3:5]
    tifffile.imwrite(src / "a.tif", small)
    tifffile.imwrite(src / "b.tiff", small[::-1])
    (src / "broken.tif").write_bytes(b"not a tiff")
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "labels"
    code = run("auto", src, "-o", out, *MODEL, *LOOSE, "--no-progress")
    err = capsys.readouterr().err
    # The broken file is reported and the others are still done; the exit code says input failed.
    assert code == cli.EXIT_INPUT and "broken.tif" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "b_labels.tif"]
    assert tifffile.imread(out / "a_labels.tif").shape == small.shape
    before = (out / "a_labels.tif").read_bytes()
    assert run("auto", src, "-o", out, *MODEL, "--no-progress") == cli.EXIT_OUTPUT  # nothing replaced
    assert (out / "a_labels.tif").read_bytes() == before
    # segment over a folder needs a folder of NAME.csv prompts
    assert run("segment", src, "--prompts", tmp_path / "none.csv", "-o", tmp_path / "o2", *MODEL) \
        == cli.EXIT_INPUT
    assert "folder of" in capsys.readouterr().err


def test_precision_flags_reach_the_model_choice(tmp_path, stack_file, monkeypatch):
    """--precision and --ais-precision are what the model is loaded with (the choice's load is
    replaced by a fake that records the choice and stops)."""
    from napari_mobilesam.errors import ModelError
    from napari_mobilesam.models.choice import ModelChoice

    seen = []

    def fake_load(self):
        seen.append(self)
        raise ModelError("fake load: stop here")

    monkeypatch.setattr(ModelChoice, "load", fake_load)
    for flags, want in ((["--ais-precision", "mixed"], ("auto", "mixed")),
                        (["--precision", "bf16"], ("bf16", "auto")),
                        (["--precision", "mixed", "--ais-precision", "bf16"], ("mixed", "bf16"))):
        code = run("auto", stack_file, "-o", tmp_path / "out.tif", "--model", "vit_t_lm", *flags,
                   "--no-progress")
        assert code == cli.EXIT_MODEL
        assert seen[-1].model == "vit_t_lm" and (seen[-1].precision, seen[-1].ais_precision) == want


def test_ais_tiling_flag_reaches_the_ais_parameters(tmp_path, stack_file, monkeypatch, capsys):
    """--ais-tiling is passed to segment_stack_auto in ``ais_params`` (replaced by a recorder
    that stops the run); default auto; other values refused by the parser."""
    from napari_mobilesam import batch
    from napari_mobilesam.errors import ModelError

    seen = []

    def record(data, **kwargs):
        seen.append(kwargs["ais_params"])
        raise ModelError("recorded: stop here")

    monkeypatch.setattr(batch, "segment_stack_auto", record)
    for flags, want in (([], "auto"), (["--ais-tiling", "blocks"], "blocks"),
                        (["--ais-tiling", "stitched"], "stitched")):
        assert run("auto", stack_file, "-o", tmp_path / "out.tif", *flags, "--no-progress") == cli.EXIT_MODEL
        assert seen[-1].tiling == want
    assert run("auto", stack_file, "-o", tmp_path / "out.tif", "--ais-tiling", "tiles") == cli.EXIT_USAGE
    assert "--ais-tiling" in capsys.readouterr().err
