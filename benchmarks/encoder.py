"""Benchmark MobileSAM inference paths on this machine, with their error against the parity fixture.

Prints, from one run:

1. image encoder, ms per 1024×1024 image (median after warm-up) for the plain eager float32 model
   (what the official code runs) and each of our paths (torch optimised fp32/bf16, OpenVINO
   fp32/mixed/bf16; mixed = bf16 except TinyViT's last stage and neck, the default on CPUs with
   bf16), the speed-up over eager measured in the same run, the embedding's max abs error
   against the fixture and, for every fixture case, the IoU between our mask and the fixture's
   when both logit maps are thresholded at the median of the fixture's map (the fixture's random
   decoder gives logits of nearly one sign, so 0 is no useful threshold);
2. prompt-to-mask (one point, one box) on a 512×512 slice through ``SamPredictor``: prompt
   encoder, mask decoder, upscaling and resizing to 512×512, thresholding — for segment-anything's
   torch decoder, our decoder (reassociated attention, up-scaling in token layout, cached dense
   positional encoding) in torch and in OpenVINO (fp32, and bf16 to show why it is not used),
   with their error on the fixture cases;
3. the OpenVINO first-use conversion and the cached start (read IR + compile), in a fresh cache.

Run ``python benchmarks/encoder.py`` (``--quick`` for 5 timed runs per path). The weights are the
fixture's random weights laid out like ``mobile_sam.pt`` (same architecture, same cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import describe_machine as machine  # noqa: E402 (benchmarks/ is on sys.path)
from _machine import wall_times  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"



def timed_ms(fn, runs: int, warmup: int = 2) -> tuple[float, float]:
    """(median, minimum) wall-clock milliseconds of ``fn()`` over ``runs`` calls after warm-up.

    The minimum is printed beside the median: on a shared, loaded machine it is the better
    estimate of what the code costs when it has the cores to itself.
    """
    times = wall_times(fn, runs, warmup)
    return 1000 * statistics.median(times), 1000 * min(times)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def run_cases(predictor, cases, expected):
    """{case: (logits, iou, low_res)} for every fixture case (image already set)."""
    out = {}
    for name, case in cases.items():
        kw = {"multimask_output": case["multimask"], "return_logits": True}
        if "points" in case:
            kw["point_coords"] = np.asarray(case["points"], np.float32)
            kw["point_labels"] = np.asarray(case["labels"], np.int64)
        if "box" in case:
            kw["box"] = np.asarray(case["box"], np.float32)
        if "mask_from" in case:
            kw["mask_input"] = expected[f"{case['mask_from']}/low_res"]
        out[name] = predictor.predict(**kw)
    return out


def case_errors(outputs, expected):
    """(min IoU over cases and masks at the fixture-median threshold, max logit error, per case)."""
    per_case = {}
    for name, (logits, _, _) in outputs.items():
        ref = expected[f"{name}/logits"]
        ious = []
        for k in range(ref.shape[0]):
            thr = np.median(ref[k])
            ious.append(mask_iou(logits[k] > thr, ref[k] > thr))
        per_case[name] = min(ious)
    err = max(float(np.abs(o[0] - expected[f"{n}/logits"]).max()) for n, o in outputs.items())
    return min(per_case.values()), err, per_case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 timed runs per path (default 10)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per encoder path")
    ap.add_argument("--checkpoint", default=str(REFERENCE / "mobile_sam_random_weights.pt"))
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    runs = args.runs or (5 if args.quick else 10)

    from segment_anything import SamPredictor

    from napari_mobilesam.models.backends import (
        FastMaskDecoder,
        OpenVINOEncoder,
        OpenVINOMaskDecoder,
        TorchEncoder,
        cache_dense_pe,
        cpu_has_amx,
        cpu_has_bf16,
        resolve_precision,
    )
    from napari_mobilesam.models.registry import build_sam

    # a fresh cache, so that the first-use conversion is really timed; removed at exit
    tmp_cache = tempfile.TemporaryDirectory(prefix="nms-bench-")
    os.environ["NAPARI_MOBILESAM_CACHE"] = tmp_cache.name
    expected = dict(np.load(REFERENCE / "mobile_sam_expected.npz"))
    cases = json.loads((REFERENCE / "mobile_sam_cases.json").read_text())
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {runs} timed runs per path\n")

    sam = build_sam("vit_t", args.checkpoint)
    eager = sam.image_encoder
    predictor = SamPredictor(sam)
    predictor.set_image(expected["image"])
    x = predictor.model.preprocess(
        torch.as_tensor(predictor.transform.apply_image(expected["image"]))
        .permute(2, 0, 1)[None]
        .float()
    )

    # --- first use / cached start (fresh cache) ---
    t0 = time.perf_counter()
    ov32 = OpenVINOEncoder(eager, "fp32")
    t_conv_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    ovdec32 = OpenVINOMaskDecoder(sam.mask_decoder, "fp32")
    t_conv_dec = time.perf_counter() - t0
    assert ov32.converted and ovdec32.converted
    t0 = time.perf_counter()
    ov32b = OpenVINOEncoder(eager, "fp32")
    OpenVINOMaskDecoder(sam.mask_decoder, "fp32")
    t_cached = time.perf_counter() - t0
    assert not ov32b.converted
    del ov32b

    paths = {
        "eager fp32 (official)": eager,
        "torch optimised fp32": TorchEncoder(eager, torch.device("cpu"), "fp32"),
        "torch bf16 autocast": TorchEncoder(eager, torch.device("cpu"), "bf16"),
        "OpenVINO fp32": ov32,
        "OpenVINO mixed": OpenVINOEncoder(eager, "mixed"),
        "OpenVINO bf16": OpenVINOEncoder(eager, "bf16"),
    }
    results = {}
    base = base_min = None
    with torch.no_grad():
        for name, enc in paths.items():
            ms, ms_min = timed_ms(lambda enc=enc: enc(x), runs)
            base = base or ms
            base_min = base_min or ms_min
            emb = enc(x)
            sam.image_encoder = enc
            predictor.features = emb
            emb_err = float((emb - torch.from_numpy(expected["embedding"])).abs().max())
            min_iou, logit_err, per_case = case_errors(run_cases(predictor, cases, expected), expected)
            results[name] = dict(
                ms=ms, ms_min=ms_min, speedup=base / ms, speedup_min=base_min / ms_min,
                emb_err=emb_err, min_iou=min_iou, logit_err=logit_err,
                per_case=per_case,
            )
    sam.image_encoder = eager

    print("Image encoder, 1×3×1024×1024 (decoder: torch fp32; IoU at the fixture-median threshold)")
    head = (
        f"{'path':<24}{'median ms':>10}{'speed-up':>9}{'(min ms':>9}{'speed-up)':>10}"
        f"{'emb max err':>13}{'min IoU':>9}{'logit err':>11}"
    )
    print(head + "   IoU per case")
    for name, r in results.items():
        cases_txt = " ".join(f"{k}={v:.4f}" for k, v in r["per_case"].items())
        print(
            f"{name:<24}{r['ms']:>10.0f}{r['speedup']:>8.2f}×{r['ms_min']:>9.0f}{r['speedup_min']:>9.2f}×"
            f"{r['emb_err']:>13.2e}"
            f"{r['min_iou']:>9.4f}{r['logit_err']:>11.2e}   {cases_txt}"
        )
    default = resolve_precision("openvino", torch.device("cpu"), "auto", eager)
    print(
        f"(CPU native bf16: {cpu_has_bf16()}, AMX: {cpu_has_amx()}; load_model's default on this CPU: "
        f"OpenVINO {default}; mixed = bf16 except TinyViT's last stage and neck)\n"
    )

    # --- prompt to mask on a 512×512 slice ---
    decoders = {
        "torch fp32 (segment-anything)": sam.mask_decoder,
        "torch fp32 (ours)": FastMaskDecoder(sam.mask_decoder),
        "OpenVINO fp32 (ours)": ovdec32,
        "OpenVINO bf16 (ours)": OpenVINOMaskDecoder(sam.mask_decoder, "bf16"),
    }
    point = dict(point_coords=np.array([[256.0, 200.0]]), point_labels=np.array([1]))
    box = dict(box=np.array([150.0, 120.0, 380.0, 330.0]))
    dec_results = {}
    torch_decoder = sam.mask_decoder
    with torch.no_grad():
        for name, dec in decoders.items():
            sam.mask_decoder = dec
            if dec is torch_decoder:  # segment-anything as it is: the dense PE computed every call
                sam.prompt_encoder.__dict__.pop("get_dense_pe", None)
            else:  # as load_model sets it up
                cache_dense_pe(sam)
            predictor.set_image(expected["image"])  # exact fp32 embedding for the error columns
            min_iou, logit_err, _ = case_errors(run_cases(predictor, cases, expected), expected)
            predictor.features = ov32(x)  # stand-in embedding for a 512×512 slice
            predictor.original_size, predictor.input_size = (512, 512), (1024, 1024)
            r = dict(
                point3=timed_ms(lambda: predictor.predict(**point, multimask_output=True), runs * 2),
                point1=timed_ms(lambda: predictor.predict(**point, multimask_output=False), runs * 2),
                box=timed_ms(lambda: predictor.predict(**box, multimask_output=False), runs * 2),
                min_iou=min_iou,
                logit_err=logit_err,
            )
            dec_results[name] = r
    sam.mask_decoder = torch_decoder
    print("Prompt to mask on a 512×512 slice (SamPredictor.predict: prompt encoder, decoder,")
    print("upscaling, resize to 512×512, threshold); errors on the fixture cases with the exact embedding")
    print("ms: median (min)")
    print(f"{'decoder':<30}{'point, 3 masks':>16}{'point, 1 mask':>16}{'box':>16}{'min IoU':>9}{'logit err':>11}")
    for name, r in dec_results.items():
        cols = "".join(f"{r[k][0]:>9.1f} ({r[k][1]:>4.0f})" for k in ("point3", "point1", "box"))
        print(f"{name:<30}{cols}{r['min_iou']:>9.4f}{r['logit_err']:>11.2e}")
    print()
    print("OpenVINO start-up (fresh cache)")
    print(f"  first use: convert encoder {t_conv_enc:.1f} s, decoder {t_conv_dec:.1f} s")
    print(f"  cached start (read IR + compile, encoder and decoder): {t_cached:.2f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(machine=machine(), encoder=results, decoder=dec_results,
                     convert_encoder_s=t_conv_enc, convert_decoder_s=t_conv_dec,
                     cached_start_s=t_cached),
                indent=2,
            )
        )
    tmp_cache.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
