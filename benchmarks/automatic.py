"""Automatic instance segmentation: micro-sam's AIS (decoder + watershed) and APG against our prompt-based mode.

Prints, from one run, seconds per slice (median of ``--runs`` timed runs after one warm-up) for a
512×512 slice and a 1024×1024 image:

* ``AIS <backend>``: micro-sam's AIS as we run it — image encoder (our default backend for the
  CPU: OpenVINO, precision ``auto``, float32 for these models), the AIS decoder (OpenVINO float32;
  torch float32 too with ``--torch-decoder``, with its map difference), and the post-processing
  (SciPy/scikit-image), each part timed too;
* ``AIS precision <p>`` for each of ``--precisions`` (default ``mixed,bf16,fp32+mixed,fp32+bf16``):
  the same with ``load_model(precision=p)`` (encoder and AIS decoder in ``p``), or, written
  ``enc+dec``, ``load_model(precision=enc, ais_precision=dec)``; with its time against the
  float32 row of the same run and its labels against the float32 labels (instances, the fixture
  README's same assignment);
* ``APG``: micro-sam's automatic prompt generation as we run it (:mod:`napari_mobilesam.volume.apg`:
  encoder, AIS decoder, one prompt per AIS instance through SAM's mask decoder, filters, NMS,
  painting), with its defaults and with three masks per prompt; the prompt part is timed alone too;
* ``prompt-based (segment_slice)``: our automatic mode for models without a decoder (candidate
  points → batched mask decoder → filters → NMS), encoder included, same backend.

* ``micro-sam <version> AIS`` (with ``--microsam-python PATH``): micro-sam's own
  ``automatic_instance_segmentation`` (eager torch, float32) on the same images and weights, run by
  ``benchmarks/microsam_side.py`` under the Python of a separate environment that has micro-sam
  (it pins napari and pulls torch-em, bioimageio, trackastra: never install it beside
  napari-mobilesam), with the agreement of its labels with ours (the fixture README's measure);
  and micro-sam's APG (``segmentation_mode="apg"``, its defaults and ``multimasking=True``) against
  our two APG rows: instance counts, same assignment, instances matched with IoU > 0.5.
  One way to make that environment without a second copy of torch::

      python -m venv /opt/msvenv
      echo "$PWD/.venv/lib/python3.11/site-packages" > /opt/msvenv/lib/python3.11/site-packages/zz.pth
      /opt/msvenv/bin/pip install micro_sam==1.8.14 mobilesam-mirror==1.0.0
      python benchmarks/automatic.py --microsam-python /opt/msvenv/bin/python

The weights are the micro-sam parity fixture's random weights in micro-sam's ``vit_t_lm`` layout
(same architecture, same cost as the published model); the images are tiles of the fixture's
synthetic nuclei image. Run ``python benchmarks/automatic.py [--runs 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _machine import describe_machine as machine  # noqa: E402 (benchmarks/ is on sys.path)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


CPU = {}  # name -> median process CPU seconds (all threads), filled by median_s
OUR_APG = {}  # (image shape, APGParams) -> our APG labels, filled by apg_mode
#: our APG settings timed (row name, APGParams settings) and micro-sam's matching ones
#: (microsam_side.APG_SETTINGS)
APG_ROWS = (("defaults", "APG (segment_slice_apg), defaults", None),
            ("multimask", "APG, multimask", {"multimask": True}))


def median_s(fn, runs: int, name: str | None = None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``runs`` calls after one warm-up; the median
    process CPU time (all threads) goes to ``CPU[name]``: on a machine shared with other jobs,
    CPU seconds / cores is the better estimate of the wall time on an idle machine."""
    fn()  # warm-up (first-use compilation, caches)
    times, cpu = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if name is not None:
        CPU[name] = statistics.median(cpu)
    return statistics.median(times)


def images() -> dict[str, np.ndarray]:
    big = np.load(REFERENCE / "microsam" / "microsam_expected.npz")["tiled/image"]
    return {
        "512x512": np.ascontiguousarray(big[:512, :512]),
        "1024x1024": np.pad(big, ((0, 0), (0, 124)), mode="reflect")[:1024, :1024],
    }


def uncached(fn):
    """``fn`` with the process's decoded-maps cache emptied before each call: every timed run
    decodes (the cache answers a repeated slice without the decoder, which is what its
    ``total`` would otherwise time after the warm-up)."""
    from napari_mobilesam.models.ais_decoder import MAPS_CACHE

    def run():
        MAPS_CACHE.clear()
        return fn()

    return run


def ais_parts(sam, image, runs, key):
    import torch

    from napari_mobilesam.core.preprocess import microsam_rgb, preprocess_rgb
    from napari_mobilesam.models.ais_decoder import maps_for_image
    from napari_mobilesam.models.registry import ais_decoder
    from napari_mobilesam.volume.ais import segment_slice_ais
    from napari_mobilesam.volume.instance import instances_from_maps

    dec = ais_decoder(sam)
    rgb = microsam_rgb(image)
    x, size = preprocess_rgb(rgb, 1024, mean=sam.pixel_mean, std=sam.pixel_std)
    with torch.inference_mode():
        emb = sam.image_encoder(x[None])
        maps = maps_for_image(dec(emb), size, rgb.shape[:2])[0].numpy()

    def enc():
        with torch.inference_mode():
            sam.image_encoder(x[None])

    def decode():
        with torch.inference_mode():
            dec(emb)

    return {
        "total": median_s(uncached(lambda: segment_slice_ais(sam, image)), runs, key),
        "encoder": median_s(enc, runs, (*key, "encoder")),
        "decoder": median_s(decode, runs, (*key, "decoder")),
        "post-processing": median_s(lambda: instances_from_maps(*maps), runs),
    }, maps


def parts_note(parts, key) -> str:
    """``encoder 0.59 (CPU 1.1)  decoder ...``: wall seconds of each part, CPU seconds beside."""
    out = []
    for k, v in parts.items():
        if k == "total":
            continue
        cpu = CPU.get((*key, k))
        out.append(f"{k} {v:.2f}" + (f" (CPU {cpu:.2f})" if cpu is not None else ""))
    return "  ".join(out)


def prompt_mode(sam, image, runs, key) -> float:
    from napari_mobilesam.core.embeddings import EmbeddingCache
    from napari_mobilesam.core.predictor import SlicePredictor
    from napari_mobilesam.core.source import SliceSource
    from napari_mobilesam.volume.automatic import segment_slice

    source = SliceSource(image[None])

    def run():
        pred = SlicePredictor(sam, source, EmbeddingCache(sam, max_bytes=0))
        segment_slice(pred, 0)

    return median_s(run, runs, key)


def apg_mode(sam, image, runs, key, params=None):
    """APG on one slice: a fresh session each run (encoder, AIS decoder, prompts, selection), and
    the prompt part alone (decoding + filters + NMS + painting, embedding and maps ready)."""
    from napari_mobilesam.core.session import Session
    from napari_mobilesam.models.registry import ais_decoder
    from napari_mobilesam.volume import apg

    p = apg.APGParams.of(params)
    total = median_s(uncached(lambda: apg.segment_slice_apg(Session(sam, image, cache_dir=None).predictor, 0, p)),
                     runs, key)
    pred = apg._input_predictor(Session(sam, image, cache_dir=None).predictor)
    maps = apg._slice_maps(pred, 0, ais_decoder(sam))
    prompts, _ = apg.apg_prompts(maps, p)

    def decode():
        return apg.select_masks(apg.decode_prompts(pred, 0, prompts, p.batch_size), image.shape, p)

    part = median_s(decode, runs)
    labels = decode()
    OUR_APG[(image.shape, p)] = labels
    return total, f"prompts {len(prompts)}: decode+select {part:.2f}; {int(labels.max())} objects"


def precision_model(spec: str):
    """The fixture model in precision ``spec``: ``"p"`` (``load_model(precision=p)``: encoder and
    AIS decoder) or ``"enc+dec"`` (``load_model(precision=enc, ais_precision=dec)``)."""
    from napari_mobilesam.models.registry import load_model

    ms = REFERENCE / "microsam"
    enc_p, _, dec_p = spec.partition("+")
    return load_model("vit_t_lm", ms / "vit_t.pt", "cpu", precision=enc_p,
                      ais_precision=dec_p or "auto", decoder=ms / "vit_t_decoder.pt")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--torch-decoder", action="store_true", help="also time the torch decoder")
    ap.add_argument("--sizes", default="512x512,1024x1024")
    ap.add_argument("--precisions", default="mixed,bf16,fp32+mixed,fp32+bf16",
                    help="reduced-precision AIS rows: P (encoder and decoder) or ENC+DEC; '' for none")
    ap.add_argument("--ais-only", action="store_true", help="skip the APG and prompt-based rows")
    ap.add_argument("--microsam-python", default=None,
                    help="Python of a separate environment with micro-sam: time its AIS too")
    ap.add_argument("--stack", type=int, default=0,
                    help="with --microsam-python: also time micro-sam's first mask on a stack this deep")
    args = ap.parse_args(argv)

    from napari_mobilesam.models.registry import ais_decoder, load_model
    from napari_mobilesam.volume.ais import segment_slice_ais

    ms = REFERENCE / "microsam"
    print(machine())
    print(f"median of {args.runs} runs after one warm-up, seconds per slice\n")
    sam = load_model("vit_t_lm", ms / "vit_t.pt", "cpu", decoder=ms / "vit_t_decoder.pt")
    enc = sam.image_encoder

    def label_of(model):
        e, d = model.image_encoder, ais_decoder(model)
        return (f"AIS {e.backend_name} {e.precision}, decoder {d.backend_name} "
                f"{getattr(d, 'precision', 'fp32')}")

    variants = [(label_of(sam), sam)]
    if args.torch_decoder:
        from napari_mobilesam.models.registry import DECODER_ATTR

        sam_t = load_model("vit_t_lm", ms / "vit_t.pt", "cpu", decoder=ms / "vit_t_decoder.pt")
        object.__setattr__(sam_t, DECODER_ATTR, ais_decoder(sam_t).torch_decoder)
        variants.append((f"AIS {enc.backend_name} {enc.precision}, decoder torch fp32", sam_t))
    rows = []
    wanted = args.sizes.split(",")
    sized = {size: image for size, image in images().items() if size in wanted}
    base_labels = {}
    for size, image in sized.items():
        ref_maps = None
        for name, model in variants:
            parts, maps = ais_parts(model, image, args.runs, (size, name))
            err = "" if ref_maps is None else f"  max map diff vs first row {np.abs(maps - ref_maps).max():.1e}"
            ref_maps = maps if ref_maps is None else ref_maps
            rows.append((size, name, parts["total"], parts_note(parts, (size, name)) + err))
        base_labels[size] = segment_slice_ais(sam, image)
        if args.ais_only:
            continue
        for _, aname, aparams in APG_ROWS:
            total, note = apg_mode(sam, image, args.runs, (size, aname), aparams)
            rows.append((size, aname, total, note))
        pname = "prompt-based (segment_slice)"
        rows.append((size, pname, prompt_mode(sam, image, args.runs, (size, pname)),
                     "encoder + candidates + mask decoder + filters"))
    for spec in [p for p in args.precisions.split(",") if p]:
        model = precision_model(spec)  # one at a time: each compiled decoder holds its buffers
        name = f"AIS precision {spec}: " + label_of(model)[4:]
        for size, image in sized.items():
            parts, _ = ais_parts(model, image, args.runs, (size, name))
            labels = segment_slice_ais(model, image)
            n, n0 = len(np.unique(labels)) - 1, len(np.unique(base_labels[size])) - 1
            agree = same_assignment(labels, base_labels[size])
            rows.append((size, name, parts["total"], parts_note(parts, (size, name))
                         + f"; instances {n} (fp32 {n0}), same assignment vs fp32 {agree:.4f}"))
        del model
    extra = microsam_rows(args, sam, rows) if args.microsam_python else []
    base = {}
    import os

    order = {size: i for i, size in enumerate(sized)}
    rows.sort(key=lambda r: order[r[0]])  # stable: each size's rows in the order they ran
    print(f"{'image':<10} {'path':<62} {'s/slice':>8} {'vs AIS':>7} {'CPU s':>7}  parts (wall s)")
    for size, name, total, note in rows:
        base.setdefault(size, total)
        cpu = CPU.get((size, name), float("nan"))
        print(f"{size:<10} {name:<62} {total:8.2f} {total / base[size]:6.2f}x {cpu:7.2f}  {note}")
    print(f"\nCPU s: process CPU time per slice, all threads; on an idle machine the wall time is "
          f"at least CPU s / {os.cpu_count()} cores. Load average now: {os.getloadavg()[0]:.1f}.")
    for line in extra:
        print(line)
    return 0


def same_assignment(result: np.ndarray, expected: np.ndarray) -> float:
    """The fixture README's agreement: each result instance mapped to the expected label it
    overlaps most; the fraction of pixels whose mapped value equals the expected label."""
    _, r_inv = np.unique(result.astype(np.int64).ravel(), return_inverse=True)
    e_ids, e_inv = np.unique(expected.astype(np.int64).ravel(), return_inverse=True)
    table = np.zeros((r_inv.max() + 1, e_inv.max() + 1), np.int64)
    np.add.at(table, (r_inv, e_inv), 1)
    return float(np.mean(e_ids[table.argmax(axis=1)][r_inv] == e_ids[e_inv]))


def matched_count(result: np.ndarray, expected: np.ndarray) -> int:
    """How many result instances match an expected one with IoU > 0.5 (each pair at most once:
    IoU > 0.5 makes the match unique)."""
    r, e = result.astype(np.int64).ravel(), expected.astype(np.int64).ravel()
    pairs, inter = np.unique(np.stack([r, e]), axis=1, return_counts=True)
    r_size, e_size = np.bincount(r), np.bincount(e)
    ok = (pairs[0] != 0) & (pairs[1] != 0)
    a, b, n = pairs[0][ok], pairs[1][ok], inter[ok]
    return int(np.count_nonzero(n / (r_size[a] + e_size[b] - n) > 0.5))


def our_first_mask_s(sam, wanted, depth: int) -> float:
    """Seconds from a fresh Session on the stack micro-sam times to the first point mask."""
    from napari_mobilesam.core.session import Session

    image = next(iter(wanted.values()))
    volume = np.stack([np.roll(image, 7 * k, axis=1) for k in range(depth)])
    t0 = time.perf_counter()
    Session(sam, volume, cache_dir=None).predict(depth // 2, points=[(image.shape[0] // 2,
                                                                     image.shape[1] // 2)], labels=[1])
    return time.perf_counter() - t0


def microsam_rows(args, sam, rows) -> list[str]:
    """micro-sam's own AIS on the same images and weights, in its own environment; appends its rows
    to ``rows`` and returns notes (agreement of the labels, first mask on a stack)."""
    import json
    import subprocess
    import tempfile

    from napari_mobilesam.volume.ais import segment_slice_ais

    wanted = {k: v for k, v in images().items() if k in args.sizes.split(",")}
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "images.npz", **wanted)
        cmd = [args.microsam_python, str(Path(__file__).with_name("microsam_side.py")),
               str(REFERENCE / "microsam"), str(Path(tmp) / "images.npz"), str(Path(tmp) / "out.npz"),
               "--runs", str(args.runs), "--stack", str(args.stack), "--apg"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            return [f"micro-sam side failed:\n{out.stderr[-3000:]}"]
        res = json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
        theirs = dict(np.load(Path(tmp) / "out.npz"))
    for size, t in res["images"].items():
        ours = segment_slice_ais(sam, wanted[size])
        agree = same_assignment(ours, theirs[size])
        n_ours, n_theirs = len(np.unique(ours)) - 1, len(np.unique(theirs[size])) - 1
        rows.append((size, f"micro-sam {res['micro_sam']} AIS (eager torch fp32)", t,
                     f"instances {n_theirs} (ours {n_ours}), same assignment {agree:.4f}"))
    from napari_mobilesam.volume.apg import APGParams

    for setting, aname, aparams in APG_ROWS:
        for size, t in res.get("apg", {}).get(setting, {}).items():
            ours = OUR_APG.get((wanted[size].shape, APGParams.of(aparams)))
            ref = theirs[f"apg/{setting}/{size}"]
            n_theirs = len(np.unique(ref)) - 1
            if ours is None:
                note = f"instances {n_theirs}"
            else:
                note = (f"instances {n_theirs} (ours {len(np.unique(ours)) - 1}), same assignment "
                        f"{same_assignment(ours, ref):.4f}, matched IoU>0.5 {matched_count(ours, ref)}")
            rows.append((size, f"micro-sam {res['micro_sam']} APG {setting} (eager torch fp32)", t, note))
    notes.append(f"micro-sam: {res['torch_threads']} torch threads, model load {res['load_s']:.1f} s")
    if "stack_first_mask_s" in res:
        notes.append(f"first mask on a {res['stack_slices']}-slice 512 x 512 stack: micro-sam "
                     f"{res['stack_first_mask_s']:.1f} s (the whole volume embedded first), ours "
                     f"{our_first_mask_s(sam, wanted, args.stack):.1f} s (the clicked slice only)")
    return notes


if __name__ == "__main__":
    sys.exit(main())
