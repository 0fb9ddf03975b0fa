"""Write ``tests/data/microsam_apg.npz``: micro-sam's own APG steps on the parity fixture.

Runs **in a separate environment that has micro-sam 1.8.14** (see ``automatic.py`` for one way
to make it); no model runs, so it takes seconds::

    /opt/msvenv/bin/python benchmarks/microsam_apg_reference.py tests/data/microsam_apg.npz

micro-sam's APG (``AutomaticPromptGenerator.generate``) is two steps around SAM's mask decoder,
and each is stored for ``tests/test_apg.py``:

* ``points``: the ``(n, 2)`` (row, col) point prompts micro-sam derives
  (``instance_segmentation._derive_point_prompts``, defaults) from the fixture's decoder maps
  (``decoder/*``, micro-sam's own maps of the fixture image), in its order;
* the selection (``util.apply_nms``: size filter, NMS, painting, connected pieces): a set of
  masks made here from the fixture's ``gt_labels`` (each object as it is, grown, shrunk, shifted,
  joined with the next one, some objects joined, small and border masks; scores drawn with
  ``numpy.random.default_rng(16)``), stored as ``mask_boxes`` ``(n, 4)`` (row0, col0, row1, col1),
  ends exclusive, ``mask_bits`` (every crop's pixels, row-major, one after the other, packed
  with ``numpy.packbits``), ``iou`` and ``stability`` (float32); and micro-sam's labels for them,
  ``nms/iou`` (``apply_nms(masks, min_size=25, nms_thresh=0.9)``, APG's defaults) and ``nms/iomin``
  (``intersection_over_min=True``).

The random weights of the fixture make SAM's masks for these prompts empty (single mask) or
most of the slice (three masks), so micro-sam's end-to-end APG labels on the fixture are empty
either way; the selection is checked on these masks instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "microsam"
MAPS = ("foreground", "center_distances", "boundary_distances")


def make_masks(gt: np.ndarray) -> list[np.ndarray]:
    """Full-size bool masks derived from the ground-truth labels ``gt``."""
    from scipy import ndimage as ndi

    ids = [int(i) for i in np.unique(gt) if i]
    masks = []
    for n, i in enumerate(ids):
        obj = gt == i
        masks.append(obj)
        masks.append(ndi.binary_dilation(obj, iterations=2))
        masks.append(ndi.binary_erosion(obj))
        masks.append(np.roll(obj, (3, -2), axis=(0, 1)))
        masks.append(obj | (gt == ids[(n + 1) % len(ids)]))
    for k in range(0, len(ids), 6):  # a few large masks of several objects
        masks.append(np.isin(gt, ids[k : k + 6]))
    h, w = gt.shape
    for r, c in ((5, 5), (100, 200), (300, 40)):  # small masks: 20 and 30 pixels
        m = np.zeros((h, w), bool)
        m[r : r + 4, c : c + 5] = True
        masks.append(m)
        m = np.zeros((h, w), bool)
        m[r + 10 : r + 15, c : c + 6] = True
        masks.append(m)
    m = np.zeros((h, w), bool)
    m[0:12, 150:260] = True  # on the border
    masks.append(m)
    return [m for m in masks if m.any()]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    import micro_sam
    import torch
    from micro_sam import instance_segmentation, util
    from micro_sam._vendored import batched_mask_to_box
    from segment_anything.utils.amg import box_xyxy_to_xywh

    expected = np.load(FIXTURE / "microsam_expected.npz")
    out = {}
    prompts = instance_segmentation._derive_point_prompts(
        **{name: expected[f"decoder/{name}"] for name in MAPS})
    out["points"] = np.asarray(prompts["points"][:, 0, ::-1], np.int64)  # (x, y) -> (row, col)

    masks = make_masks(expected["gt_labels"])
    rng = np.random.default_rng(16)
    iou = rng.uniform(0.5, 1.0, len(masks)).astype(np.float32)
    stability = rng.uniform(0.5, 1.0, len(masks)).astype(np.float32)
    tensors = torch.as_tensor(np.stack(masks))
    boxes = box_xyxy_to_xywh(batched_mask_to_box(tensors))  # as micro-sam's batched_inference
    predictions = [{"segmentation": tensors[k], "predicted_iou": float(iou[k]),
                    "stability_score": float(stability[k]), "bbox": boxes[k].tolist()}
                   for k in range(len(masks))]
    out["nms/iou"] = np.asarray(util.apply_nms(predictions, min_size=25, nms_thresh=0.9), np.uint32)
    out["nms/iomin"] = np.asarray(util.apply_nms(predictions, min_size=25, nms_thresh=0.9,
                                                 intersection_over_min=True), np.uint32)
    crops, mask_boxes = [], []
    for m in masks:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        mask_boxes.append((r0, c0, r1, c1))
        crops.append(m[r0:r1, c0:c1].ravel())
    out["mask_boxes"] = np.asarray(mask_boxes, np.int32)
    out["mask_bits"] = np.packbits(np.concatenate(crops))
    out["iou"], out["stability"] = iou, stability
    out["versions"] = np.array(f"micro_sam {micro_sam.__version__}, torch {torch.__version__}, "
                               f"numpy {np.__version__}")
    np.savez_compressed(argv[0], **out)
    print(f"{len(out['points'])} points, {len(masks)} masks; labels: "
          + ", ".join(f"{k} {int(v.max())}" for k, v in out.items() if k.startswith("nms/")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
