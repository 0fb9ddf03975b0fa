"""micro-sam's own automatic instance segmentation, timed: the other side of ``automatic.py``.

Runs **in a separate environment that has micro-sam** (it pins napari and pulls torch-em,
bioimageio, trackastra; it is never a dependency of napari-mobilesam). ``automatic.py
--microsam-python PATH`` starts this script with that interpreter; run alone it prints the same
JSON::

    python benchmarks/microsam_side.py WEIGHTS_DIR IMAGES.npz OUT.npz --runs 3

``WEIGHTS_DIR`` holds micro-sam's ``vit_t.pt`` and ``vit_t_decoder.pt`` (the parity fixture's);
``IMAGES.npz`` maps an image name to a 2D uint16 array. For each image: the median seconds of
``automatic_instance_segmentation(predictor, segmenter, image, ndim=2)`` (embedding, decoder,
post-processing: micro-sam's whole AIS call) over ``--runs`` runs after one warm-up, with micro-sam's
defaults (eager torch, float32, CPU). The labels go to ``OUT.npz`` so the caller can compare them
with its own. With ``--stack N`` also the time micro-sam needs before the first mask of an
``N``-slice stack can be shown: ``precompute_image_embeddings`` of the whole volume (what its 3D
annotator does when an image is opened), and then one point prompt.

With ``--apg`` also micro-sam's automatic prompt generation, timed the same way:
``get_predictor_and_segmenter(..., segmentation_mode="apg")`` and
``automatic_instance_segmentation`` (embedding, decoder, point prompts from the maps, SAM's mask
decoder, NMS), once with micro-sam's defaults and once with ``multimasking=True``; its labels go
to ``OUT.npz`` as ``apg/<setting>/<image>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import wall_times  # noqa: E402 (benchmarks/ is on sys.path)

#: micro-sam APG settings timed with ``--apg``: name -> ``generate`` keyword arguments.
APG_SETTINGS = {"defaults": {}, "multimask": {"multimasking": True}}


def median_s(fn, runs: int) -> float:
    return statistics.median(wall_times(fn, runs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stack", type=int, default=0, help="also time a stack of this many slices")
    ap.add_argument("--apg", action="store_true", help="also time micro-sam's APG")
    args = ap.parse_args(argv)

    import micro_sam
    import torch
    from micro_sam import util
    from micro_sam.automatic_segmentation import (
        automatic_instance_segmentation,
        get_predictor_and_segmenter,
    )

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        combined = Path(tmp) / "vit_t_lm_combined.pt"
        torch.save({"model_state": torch.load(args.weights / "vit_t.pt", weights_only=True),
                    "decoder_state": torch.load(args.weights / "vit_t_decoder.pt", weights_only=True)},
                   combined)
        t0 = time.perf_counter()
        predictor, segmenter = get_predictor_and_segmenter(
            "vit_t_lm", checkpoint=str(combined), device="cpu", segmentation_mode="ais", is_tiled=False)
        load_s = time.perf_counter() - t0
        if args.apg:
            apg_predictor, apg_segmenter = get_predictor_and_segmenter(
                "vit_t_lm", checkpoint=str(combined), device="cpu", segmentation_mode="apg", is_tiled=False)

    result = {"micro_sam": micro_sam.__version__, "torch_threads": torch.get_num_threads(),
              "load_s": load_s, "images": {}}
    labels = {}
    for name, image in np.load(args.images).items():
        def run():
            labels[name] = automatic_instance_segmentation(predictor, segmenter, image, ndim=2,
                                                           verbose=False)
        result["images"][name] = median_s(run, args.runs)
        labels[name] = np.asarray(labels[name])
    if args.apg:
        result["apg"] = {}
        for setting, kwargs in APG_SETTINGS.items():
            result["apg"][setting] = {}
            for name, image in np.load(args.images).items():
                key = f"apg/{setting}/{name}"

                def run_apg():
                    labels[key] = automatic_instance_segmentation(apg_predictor, apg_segmenter, image, ndim=2,
                                                                  verbose=False, **kwargs)
                result["apg"][setting][name] = median_s(run_apg, args.runs)
                labels[key] = np.asarray(labels[key])
    if args.stack:
        image = next(iter(np.load(args.images).values()))
        volume = np.stack([np.roll(image, 7 * k, axis=1) for k in range(args.stack)])
        t0 = time.perf_counter()
        emb = util.precompute_image_embeddings(predictor, volume, ndim=3, verbose=False)
        from micro_sam.prompt_based_segmentation import segment_from_points

        point = np.array([[image.shape[0] // 2, image.shape[1] // 2]])
        segment_from_points(predictor, point, np.array([1]), image_embeddings=emb, i=args.stack // 2)
        result["stack_first_mask_s"] = time.perf_counter() - t0
        result["stack_slices"] = args.stack
    np.savez_compressed(args.out, **labels)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
