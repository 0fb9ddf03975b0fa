"""Bad input, as a new user would give it, through the command line and the Python API.

Every case must: fail (non-zero exit code / a typed exception), say what is wrong with which input
and how to fix it (the message names both), print no traceback on the command line, and leave every
file that existed before byte-identical (input, output, prompts, checkpoint, cache) with nothing new
beside them (no partial outputs, no locks).
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_mobilesam import batch, cli
from napari_mobilesam.errors import InputError, ModelError, OutputError, PromptError

MODEL = ["--model", "vit_t_test", "--backend", "eager", "--no-progress"]
API_MODEL = dict(model="vit_t_test", backend="eager")
MARKER = "pickle_ran.txt"


class _Evil:
    """Unpickling this writes a marker file: a checkpoint carrying code."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return (Path.write_text, (Path(self.folder) / MARKER, "ran"))


def _write_world(d: Path) -> None:
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 1000, (6, 64, 64)).astype(np.uint16)
    tifffile.imwrite(d / "stack.tif", stack, compression="zlib")
    (d / "existing.tif").write_bytes(b"precious labels")
    (d / "prompts.csv").write_text("z,row,col,label,object_id\n2,30,30,1,1\n")
    (d / "empty.tif").write_bytes(b"")
    (d / "text.tif").write_text("this is not a TIFF\n")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    full = (d / "stack.tif").read_bytes()
    (d / "cut.tif").write_bytes(full[: len(full) // 2])  # a copy cut short: pages missing
    tifffile.imwrite(d / "ij.tif", stack, imagej=True, compression="zlib", metadata={"axes": "ZYX"})
    ij = (d / "ij.tif").read_bytes()
    (d / "ij_cut.tif").write_bytes(ij[: int(len(ij) * 0.97)])  # the last page cut short
    tifffile.imwrite(d / "one_d.tif", np.arange(100, dtype=np.uint16))
    tifffile.imwrite(d / "four_d.tif", rng.integers(0, 9, (2, 5, 32, 32)).astype(np.uint16))
    tifffile.imwrite(d / "five_d.tif", np.zeros((2, 2, 2, 16, 16), np.uint8))
    tifffile.imwrite(d / "tiny.tif", np.zeros((3, 4, 5), np.uint16))
    tifffile.imwrite(d / "complex.tif", np.zeros((2, 16, 16), np.complex64))
    tifffile.imwrite(d / "five_ch.tif", np.zeros((5, 32, 32), np.uint8))
    (d / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (d / "empty.pt").write_bytes(b"")
    (d / "evil.pt").write_bytes(pickle.dumps(_Evil(d)))
    (d / "a_folder").mkdir()
    (d / "dir.tif").mkdir()
    (d / "a_folder" / "notes.txt").write_text("no stacks here")
    (d / "one").mkdir()
    tifffile.imwrite(d / "one" / "a.tif", stack[:2])
    clash = d / "clash"
    clash.mkdir()
    for name in ("x.tif", "x.tiff"):
        tifffile.imwrite(clash / name, stack[:2])
    csvs = {
        "p_empty.csv": "",
        "p_header.csv": "z,row,col,label,object_id\n",
        "p_nocols.csv": "a,b,c\n1,2,3\n",
        "p_text.csv": "z,row,col\nabc,1,2\n",
        "p_nan.csv": "z,row,col,label,object_id\n2,nan,30,1,1\n",
        "p_inf.csv": "z,row,col,label,object_id\n2,30,inf,1,1\n",
        "p_minus1.csv": "z,row,col,label,object_id\n2,30,30,1,1\n2,10,10,-1,1\n",
        "p_label2.csv": "z,row,col,label,object_id\n2,30,30,2,1\n",
        "p_id0.csv": "z,row,col,label,object_id\n2,30,30,1,0\n",
        "p_idfrac.csv": "z,row,col,label,object_id\n2,30,30,1,1.5\n",
        "p_negonly.csv": "z,row,col,label,object_id\n2,30,30,0,1\n",
        "p_zout.csv": "z,row,col,label,object_id\n99,30,30,1,1\n",
        "p_rowout.csv": "z,row,col,label,object_id\n2,500,30,1,1\n",
        "p_zfrac.csv": "z,row,col,label,object_id\n2.5,30,30,1,1\n",
        "p_bigid.csv": "z,row,col,label,object_id\n2,30,30,1,5000000000\n",
        "p_missing_value.csv": "z,row,col,label,object_id\n2,,30,1,1\n",
        "p_idinf.csv": "z,row,col,label,object_id\n2,30,30,1,1\n2,31,31,1,inf\n",
    }
    for name, text in csvs.items():
        (d / name).write_text(text)
    (d / "p_binary.csv").write_bytes(b"\xff\xfe\x00\x81garbage\x00")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    _write_world(d)
    return d


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- command line
# (argv with {d} for the folder, expected exit code, words the message must contain)
S, P, O = "{d}/stack.tif", "{d}/prompts.csv", "{d}/out.tif"
CLI_CASES = {
    "missing input": (["auto", "{d}/nope.tif", "-o", O], 3, ["nope.tif", "not found"]),
    "empty file": (["auto", "{d}/empty.tif", "-o", O], 3, ["empty.tif", "TIFF"]),
    "text file": (["auto", "{d}/text.tif", "-o", O], 3, ["text.tif", "TIFF"]),
    "png file": (["auto", "{d}/image.png", "-o", O], 3, ["image.png", "TIFF"]),
    "csv as image": (["auto", "{d}/prompts.csv", "-o", O], 3, ["prompts.csv", "TIFF"]),
    "folder without stacks": (["auto", "{d}/a_folder", "-o", "{d}/outs"], 3, ["a_folder", ".tif"]),
    "truncated stack": (["auto", "{d}/cut.tif", "-o", O], 3, ["cut.tif", "truncated", "slice", "again"]),
    "truncated imagej": (["auto", "{d}/ij_cut.tif", "-o", O], 3, ["ij_cut.tif", "truncated", "slice 5"]),
    "1D image": (["auto", "{d}/one_d.tif", "-o", O], 3, ["(100,)", "layouts"]),
    "4D without channel axis": (["auto", "{d}/four_d.tif", "-o", O], 3, ["4 dimensions", "channel_axis"]),
    "5D image": (["auto", "{d}/five_d.tif", "-o", O], 3, ["5 dimensions", "layouts"]),
    "slices too small": (["auto", "{d}/tiny.tif", "-o", O], 3, ["4 x 5", "axis order"]),
    "complex image": (["auto", "{d}/complex.tif", "-o", O], 3, ["complex64", "integer, float"]),
    "channel axis out of range": (["auto", S, "-o", O, "--channel-axis", "5"], 3,
                                  ["channel_axis=5", "out of range"]),
    "five channels": (["auto", "{d}/five_ch.tif", "-o", O, "--channel-axis", "0"], 3, ["5 channels", "pick"]),
    "normalize none on uint16": (["auto", S, "-o", O, "--normalize", "none"], 3, ["uint16", "normalize='stack'"]),
    "z range syntax": (["auto", S, "-o", O, "--z-range", "a:b"], 3, ["'a:b'", "START:STOP"]),
    "z range three parts": (["auto", S, "-o", O, "--z-range", "1:2:3"], 3, ["'1:2:3'", "START:STOP"]),
    "z range empty": (["auto", S, "-o", O, "--z-range", "9:12"], 3, ["9", "6 slices"]),
    "output exists": (["auto", S, "-o", "{d}/existing.tif"], 4, ["existing.tif", "--overwrite"]),
    "output is the input": (["auto", S, "-o", S, "--overwrite"], 4, ["stack.tif", "input", "another output"]),
    "output is the input via ./": (["auto", S, "-o", "{d}/./stack.tif", "--overwrite"], 4, ["input", "another output"]),
    "output is a folder": (["auto", S, "-o", "{d}/dir.tif"], 4, ["folder"]),
    "output not tiff": (["auto", S, "-o", "{d}/labels.png"], 3, ["labels.png", ".tif"]),
    "output under a file": (["auto", S, "-o", "{d}/existing.tif/labels.tif"], 4, ["existing.tif", "not a folder"]),
    "output where nothing can be written": (["auto", S, "-o", "/sys/labels.tif"], 4, ["/sys/labels.tif", "folder you can write"]),
    "unknown model": (["auto", S, "-o", O, "--model", "vit_x"], 5, ["vit_x", "choose one of"]),
    "checkpoint missing": (["auto", S, "-o", O, "--model", "distilled", "--checkpoint", "{d}/nope.pt"], 5,
                           ["nope.pt", "not found"]),
    "checkpoint garbage": (["auto", S, "-o", O, "--checkpoint", "{d}/garbage.pt"], 5, ["garbage.pt"]),
    "checkpoint empty": (["auto", S, "-o", O, "--checkpoint", "{d}/empty.pt"], 5, ["empty.pt"]),
    "checkpoint carrying code": (["auto", S, "-o", O, "--checkpoint", "{d}/evil.pt"], 5, ["evil.pt"]),
    "checkpoint is a folder": (["auto", S, "-o", O, "--model", "distilled", "--checkpoint", "{d}/a_folder"], 5,
                               ["a_folder"]),
    "device that is not there": (["auto", S, "-o", O, "--device", "cuda:7"], 5, ["cuda:7", "cpu"]),
    "device that is no device": (["auto", S, "-o", O, "--device", "tpu"], 5, ["tpu", "'cpu'"]),
    "negative cache": (["auto", S, "-o", O, "--cache-mb", "-1"], 3, ["--cache-mb", "at least"]),
    "zero dask workers": (["auto", S, "-o", O, "--dask-workers", "0"], 3, ["--dask-workers", "at least 1"]),
    "precision int4": (["auto", S, "-o", O, "--precision", "int4"], 2, ["int4", "choose from"]),
    "unknown backend": (["auto", S, "-o", O, "--backend", "fast"], 2, ["fast", "choose from"]),
    "unknown flag": (["auto", S, "-o", O, "--frobnicate"], 2, ["--frobnicate"]),
    "prompts missing": (["segment", S, "--prompts", "{d}/nope.csv", "-o", O], 3, ["nope.csv", "not found"]),
    "prompts empty": (["segment", S, "--prompts", "{d}/p_empty.csv", "-o", O], 3, ["p_empty.csv", "header row"]),
    "prompts header only": (["segment", S, "--prompts", "{d}/p_header.csv", "-o", O], 3, ["p_header.csv", "no points"]),
    "prompts without columns": (["segment", S, "--prompts", "{d}/p_nocols.csv", "-o", O], 3,
                                ["p_nocols.csv", "z,row,col"]),
    "prompts text in numbers": (["segment", S, "--prompts", "{d}/p_text.csv", "-o", O], 3,
                                ["p_text.csv", "line 2", "numbers"]),
    "prompts NaN": (["segment", S, "--prompts", "{d}/p_nan.csv", "-o", O], 3, ["p_nan.csv", "line 2", "finite"]),
    "prompts inf": (["segment", S, "--prompts", "{d}/p_inf.csv", "-o", O], 3, ["p_inf.csv", "line 2", "finite"]),
    "prompts label -1": (["segment", S, "--prompts", "{d}/p_minus1.csv", "-o", O], 3,
                         ["p_minus1.csv", "line 3", "0 for a negative"]),
    "prompts label 2": (["segment", S, "--prompts", "{d}/p_label2.csv", "-o", O], 3, ["p_label2.csv", "1 (positive)"]),
    "prompts id 0": (["segment", S, "--prompts", "{d}/p_id0.csv", "-o", O], 3, ["p_id0.csv", ">= 1"]),
    "prompts fractional id": (["segment", S, "--prompts", "{d}/p_idfrac.csv", "-o", O], 3, ["p_idfrac.csv", "whole number"]),
    "prompts negative only": (["segment", S, "--prompts", "{d}/p_negonly.csv", "-o", O], 3, ["positive point"]),
    "prompts outside the stack": (["segment", S, "--prompts", "{d}/p_zout.csv", "-o", O], 3, ["p_zout.csv", "z=99", "Z=6"]),
    "prompts outside the slice": (["segment", S, "--prompts", "{d}/p_rowout.csv", "-o", O], 3, ["p_rowout.csv", "row=500", "H=64"]),
    "prompts fractional z": (["segment", S, "--prompts", "{d}/p_zfrac.csv", "-o", O], 3, ["fractional z"]),
    "prompts id too large": (["segment", S, "--prompts", "{d}/p_bigid.csv", "-o", O], 3, ["5000000000", "renumber"]),
    "prompts missing value": (["segment", S, "--prompts", "{d}/p_missing_value.csv", "-o", O], 3,
                              ["p_missing_value.csv", "line 2", "'row'"]),
    "prompts id inf": (["segment", S, "--prompts", "{d}/p_idinf.csv", "-o", O], 3,
                       ["p_idinf.csv", "line 3", "whole number"]),
    "prompts binary": (["segment", S, "--prompts", "{d}/p_binary.csv", "-o", O], 3, ["p_binary.csv"]),
    "prompts is a folder": (["segment", S, "--prompts", "{d}/a_folder", "-o", O], 3, ["a_folder"]),
    "folder clash x.tif x.tiff": (["auto", "{d}/clash", "-o", "{d}/outs"], 3, ["x.tif", "x.tiff", "rename"]),
    "folder run into a file": (["auto", "{d}/clash", "-o", "{d}/existing.tif"], 4, ["existing.tif", "folder"]),
    "folder run, prompts not a folder": (["segment", "{d}/one", "--prompts", P, "-o", "{d}/outs"], 3,
                                         ["prompts.csv", "NAME.csv"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(case, world, capsys):
    argv, code, words = CLI_CASES[case]
    argv = [a.format(d=world) for a in argv]
    if "--no-progress" not in argv and argv[0] in ("auto", "segment") and "--model" not in argv:
        argv += MODEL
    elif argv[0] in ("auto", "segment") and "--no-progress" not in argv:
        argv += ["--no-progress"]
    before = _snapshot(world)
    got = cli.main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert _snapshot(world) == before  # nothing changed, nothing left behind
    assert not (world / MARKER).exists()  # no pickled code ran


# --------------------------------------------------------------------------- Python API


def _stack():
    return np.random.default_rng(1).integers(0, 1000, (6, 64, 64)).astype(np.uint16)


def _prompts(oid=1, z=2):
    return batch.prompts_from_arrays([(z, 30, 30)], object_ids=[oid])


def _api_cases(d: Path) -> dict:
    st = _stack()
    seg = batch.segment_stack
    auto = batch.segment_stack_auto
    return {
        "1D array": (lambda: seg(np.zeros(100), _prompts(), **API_MODEL), ValueError, ["(100,)", "layouts"]),
        "5D array": (lambda: auto(np.zeros((2, 2, 2, 16, 16)), **API_MODEL), ValueError, ["5 dimensions"]),
        "complex array": (lambda: auto(np.zeros((2, 16, 16), complex), **API_MODEL), ValueError,
                          ["complex128", "integer, float"]),
        "strings as image": (lambda: auto(np.array([["a"] * 16] * 16), **API_MODEL), ValueError, ["<U1"]),
        "empty stack": (lambda: auto(np.zeros((0, 32, 32)), **API_MODEL), ValueError, ["0 slices"]),
        "prompts of wrong type": (lambda: seg(st, 42, **API_MODEL), PromptError, ["int"]),
        "prompt array wrong shape": (lambda: seg(st, np.zeros((2, 4)), **API_MODEL), PromptError, ["(N, 3)"]),
        "prompts NaN array": (lambda: seg(st, np.array([[2, np.nan, 3]]), **API_MODEL), PromptError, ["finite"]),
        "params dict with unknown key": (lambda: auto(st, params={"stitch_iu": 0.2}, **API_MODEL), InputError,
                                         ["stitch_iu", "stitch_iou"]),
        "params of wrong type": (lambda: auto(st, params=5, **API_MODEL), InputError, ["AutoParams", "int"]),
        "z_range one number": (lambda: auto(st, z_range=(5,), **API_MODEL), InputError, ["(start, stop)"]),
        "z_range text": (lambda: auto(st, z_range="x", **API_MODEL), InputError, ["START:STOP"]),
        "id too large for uint16 output": (
            lambda: seg(st, _prompts(70000), out=d / "o.tif", out_dtype=np.uint16, **API_MODEL),
            PromptError, ["70000", "uint32"]),
        "id too large for any output": (lambda: batch.propagate_stack(st, _prompts(2**33), **API_MODEL),
                                        PromptError, [str(2**33), "renumber"]),
        "model of wrong type": (lambda: auto(st, model=42), TypeError, ["model name", "int"]),
        "unknown model": (lambda: auto(st, model="vit_x"), ModelError, ["vit_x", "choose one of"]),
        "garbage checkpoint": (lambda: auto(st, model="vit_t_test", checkpoint=d / "garbage.pt"), ModelError,
                               ["garbage.pt"]),
        "pickle carrying code": (lambda: auto(st, model="vit_t_test", checkpoint=d / "evil.pt"), ModelError,
                                 ["evil.pt"]),
        "no such device": (lambda: auto(st, device="tpu", **{"model": "vit_t_test"}), ModelError, ["tpu"]),
        "precision int4": (lambda: auto(st, precision="int4", model="vit_t_test"), ModelError,
                           ["int4", "fp32"]),
        "progress of wrong type": (lambda: auto(st, progress="yes", **API_MODEL), TypeError, ["progress"]),
        "channel axis out of range": (lambda: auto(st, channel_axis=7, **API_MODEL), ValueError, ["channel_axis=7"]),
        "normalize unknown": (lambda: auto(st, normalize="bogus", **API_MODEL), ValueError, ["'bogus'"]),
        "output is the input": (lambda: auto(*batch.open_stack(d / "stack.tif")[:1], out=d / "stack.tif",
                                             overwrite=True, metadata=batch.open_stack(d / "stack.tif")[1],
                                             **API_MODEL), OutputError, ["stack.tif", "input"]),
        "output exists": (lambda: auto(st, out=d / "existing.tif", **API_MODEL), OutputError,
                          ["existing.tif", "overwrite=True"]),
        "output under a file": (lambda: auto(st, out=d / "existing.tif" / "x.tif", **API_MODEL), OutputError,
                                ["not a folder"]),
        "cache folder is a file": (lambda: _cache_on_file(d), InputError, ["existing.tif", "folder"]),
        "writer shape 2D": (lambda: batch.LabelsTiffWriter(d / "w.tif", (8, 8)), ValueError, ["(Z, H, W)"]),
        "writer float dtype": (lambda: batch.LabelsTiffWriter(d / "w.tif", (1, 8, 8), dtype=float), ValueError,
                               ["uint16 or uint32"]),
        "open_stack on a folder": (lambda: batch.open_stack(d / "a_folder"), InputError, ["a_folder", "TIFF file"]),
        "open_stack truncated": (lambda: batch.open_stack(d / "cut.tif"), InputError, ["cut.tif", "truncated"]),
        "prompts csv binary": (lambda: batch.read_prompts_csv(d / "p_binary.csv"), PromptError, ["p_binary.csv"]),
        "shapes not rectangles": (lambda: batch.prompts_from_shapes([np.zeros((4, 3))], shape_types=["ellipse"]),
                                  PromptError, ["ellipse", "rectangles"]),
    }


def _cache_on_file(d: Path):
    from napari_mobilesam.core.embeddings import EmbeddingCache
    from napari_mobilesam.models.registry import build_sam

    return EmbeddingCache(build_sam("vit_t_test"), disk_dir=d / "existing.tif")


API_CASE_NAMES = list(_api_cases(Path(".")))


@pytest.mark.parametrize("case", API_CASE_NAMES)
def test_api_bad_input(case, world):
    func, exc_type, words = _api_cases(world)[case]
    before = _snapshot(world)
    with pytest.raises(exc_type) as info:
        func()
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert _snapshot(world) == before
    assert not (world / MARKER).exists()


def test_case_count():
    """The issue asks for at least 60 bad inputs through the CLI and the API together."""
    assert len(CLI_CASES) + len(API_CASE_NAMES) >= 60
