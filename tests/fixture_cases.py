"""Runs the parity fixture's prompt cases through a ``segment_anything.SamPredictor``.

Shared by the tests that compare our model with the official outputs (``test_model_parity.py``,
``test_backends.py``). Cases use the official predictor's convention: points ``[x, y]``.
"""

from __future__ import annotations

import numpy as np


def run_fixture_cases(predictor, cases, expected):
    """Yield ``(name, {"logits", "iou", "low_res"})`` for every case (image already set)."""
    for name, case in cases.items():
        kwargs = {"multimask_output": case["multimask"], "return_logits": True}
        if "points" in case:
            kwargs["point_coords"] = np.asarray(case["points"], dtype=np.float32)
            kwargs["point_labels"] = np.asarray(case["labels"], dtype=np.int64)
        if "box" in case:
            kwargs["box"] = np.asarray(case["box"], dtype=np.float32)
        if "mask_from" in case:
            kwargs["mask_input"] = expected[f"{case['mask_from']}/low_res"]
        logits, iou, low_res = predictor.predict(**kwargs)
        yield name, {"logits": logits, "iou": iou, "low_res": low_res}
