"""Benchmark the first-use OpenVINO conversion: OpenVINO's own tracing against ours, same IR.

For each exported module (MobileSAM's encoder, in the two parts we export, its mask decoder core,
and micro-sam's AIS decoder from the micro-sam fixture), in fresh cache folders:

* ``baseline``: ``ov.convert_model(module, example_input=...)``, which traces with torch's
  ``check_trace`` (the module runs three times);
* ``ours``: :func:`napari_mobilesam.models.backends.openvino.openvino_ir` (traced once).

Prints the median of ``--runs`` conversions of each, the ratio, and whether both IRs are the same
bytes. ``python benchmarks/conversion.py [--runs 3]``. Weights: the parity fixture's random
MobileSAM weights and the micro-sam fixture's ``vit_t`` with its decoder (same architecture and
cost as the published files).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED = ROOT.parent / "shared" / "reference"


def _digest(folder: Path) -> str:
    """The IR's bytes less its names (OpenVINO numbers the models and nodes each process converts:
    two conversions in one process differ there only; in separate processes the files are the same)."""
    import re

    xml = re.sub(rb' names?="[^"]*"', b"", (folder / "model.xml").read_bytes())
    return hashlib.sha256(xml + (folder / "model.bin").read_bytes()).hexdigest()


def _modules():
    """(name, module, example, input shapes) of every module a first start converts."""
    from napari_mobilesam.models.backends.openvino import (
        _decoder_core,
        _decoder_io,
        _encoder_parts,
    )
    from napari_mobilesam.models.registry import ais_decoder, build_sam

    sam = build_sam("vit_t", SHARED / "mobile_sam_random_weights.pt")
    out = []
    import torch

    x = torch.zeros(1, 3, 1024, 1024)
    with torch.no_grad():
        for kind, part in _encoder_parts(sam.image_encoder):
            out.append((kind, part, x, None))
            x = part(x)
    example, shapes = _decoder_io((256, 64, 64))
    out.append(("decoder", _decoder_core(sam.mask_decoder, (256, 64, 64)), example, shapes))
    ms = SHARED / "microsam"
    lm = build_sam("vit_t_lm", ms / "vit_t.pt", decoder=ms / "vit_t_decoder.pt")
    out.append(("ais-decoder", ais_decoder(lm).eval(), torch.zeros(1, 256, 64, 64), None))
    return out


def _baseline(module, example, shapes, folder: Path) -> None:
    import openvino as ov
    import torch

    kwargs = {"example_input": example}
    if shapes is not None:
        kwargs["input"] = shapes
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(module, **kwargs)
    folder.mkdir(parents=True)
    ov.save_model(model, folder / "model.xml", compress_to_fp16=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="conversions of each module per path")
    ap.add_argument("--only", default=None, help="convert only this module (e.g. decoder)")
    args = ap.parse_args(argv)
    from _machine import describe_machine

    from napari_mobilesam.models.backends.openvino import openvino_ir

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NAPARI_MOBILESAM_CACHE"] = tmp
        rows = []
        for name, module, example, shapes in _modules():
            if args.only and name != args.only:
                continue
            times = {"baseline": [], "ours": []}
            same = True
            for r in range(args.runs):
                folder = Path(tmp) / f"base-{name}-{r}"
                t0 = time.perf_counter()
                _baseline(module, example, shapes, folder)
                times["baseline"].append(time.perf_counter() - t0)
                os.environ["NAPARI_MOBILESAM_CACHE"] = str(Path(tmp) / f"ours-{r}")
                t0 = time.perf_counter()
                xml, converted = openvino_ir(module, f"bench-{name}", example, img_size=64, input_shapes=shapes)
                times["ours"].append(time.perf_counter() - t0)
                assert converted
                same &= _digest(folder) == _digest(xml.parent)
            b, o = statistics.median(times["baseline"]), statistics.median(times["ours"])
            rows.append((name, b, o, same))
            print(f"  {name}: baseline {b:.1f} s, ours {o:.1f} s", flush=True)
    print(f"\n{describe_machine()}; median of {args.runs} conversions, fresh cache each\n")
    print("| module | OpenVINO's tracing (s) | ours, traced once (s) | speed-up | same IR (names aside) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, b, o, same in rows:
        print(f"| {name} | {b:.1f} | {o:.1f} | {b / o:.2f}× | {'yes' if same else 'NO'} |")
    tb, to = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"| all | {tb:.1f} | {to:.1f} | {tb / to:.2f}× | |")
    if args.only in (None, "ais-decoder"):
        print(f"\nthe engine's AIS decoder conversion (traced on a small embedding): "
              f"{_engine_ais_decoder(args.runs):.1f} s (median of {args.runs}, fresh cache each)")
    return 0


def _engine_ais_decoder(runs: int) -> float:
    """Seconds of ``OpenVINOAISDecoder``'s first-start conversion (what a user's first start pays
    for the AIS decoder; its example is smaller than the rows above, which trace at 64 x 64)."""
    from napari_mobilesam.models.ais_decoder import load_ais_decoder
    from napari_mobilesam.models.backends.openvino import OpenVINOAISDecoder
    from napari_mobilesam.models.checkpoint import read_state_dict

    decoder = load_ais_decoder(read_state_dict(SHARED / "microsam" / "vit_t_decoder.pt"))
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["NAPARI_MOBILESAM_CACHE"] = tmp
            t0 = time.perf_counter()
            assert OpenVINOAISDecoder(decoder, precision="fp32").converted
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
