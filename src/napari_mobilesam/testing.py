"""A ground-truth oracle with the predictor's interface, for tests, screenshots and demos.

:class:`GroundTruthOracle` is **not a model**: it answers every prompt with the ground-truth object
under it, taken from a labels volume that is known in advance (e.g. the synthetic nuclei stack's
``labels``). It lets tests check *where* the widget writes labels, and lets the documentation show
the interface on machines where the real MobileSAM weights cannot be downloaded. It has the
``SlicePredictor`` calls the widget and the engine use: ``source``, ``predict`` and ``predict_many``.
Coordinates: (z, row, col).

Perturbed oracles stand in for a model that is slightly wrong: ``error="eroded"`` / ``"dilated"``
answer with the object shrunk / grown by one pixel, ``error="jitter"`` with one of the three at
random (±1 px). Like a real model, the jittered oracle answers the same prompt the same way every
time: the random choice is a function of the oracle's ``seed``, the slice and the prompt (its points
and labels, rounded to whole pixels, its box, rounded, and ``multimask``; not ``mask_input``, which
the oracle ignores), so asking the same prompt again cannot draw another answer; a different prompt
(another click, another box) draws anew. ``candidates="spread"`` returns three different candidates
(the answer, it grown by one pixel, it shrunk by one pixel), the answer scored best, to check that
a candidate choice does not drift to the largest mask.
"""

from __future__ import annotations

import hashlib
import time
from types import SimpleNamespace

import numpy as np
from scipy import ndimage as ndi

__all__ = ["GroundTruthOracle"]


class GroundTruthOracle:
    """Answer prompts with ground-truth objects (a stand-in for ``SlicePredictor``; NOT a model).

    Parameters
    ----------
    labels : (Z, H, W) or (H, W) int array
        The ground truth.
    image : array
        The image the labels belong to (any layout ``SliceSource`` accepts), for ``source``.
    rgb : bool, optional
        Whether ``image`` has a trailing colour axis.
    delay : float
        Seconds slept in every ``predict`` call (to make long runs cancellable in tests).
    error : {"exact", "eroded", "dilated", "jitter"}
        The answer's error (see the module docstring); default exact.
    candidates : {"same", "spread"}
        Three copies of the answer (default), or the answer, it dilated and it eroded by one pixel
        with predicted IoUs 0.95, 0.88, 0.88 and stabilities 0.95, 0.9, 0.9.
    seed : int
        Seed of the random errors of ``"jitter"`` (each answer's error is drawn from this seed and
        the prompt, see the module docstring).

    Rules: the object is the ground-truth label under the first positive point; without one, the
    label covering most of the box. A negative point on that object cancels it (empty mask).
    """

    ERRORS = ("exact", "eroded", "dilated", "jitter")

    def __init__(self, labels: np.ndarray, image, *, rgb: bool | None = None, delay: float = 0.0,
                 error: str = "exact", candidates: str = "same", seed: int = 0):
        from .core.source import SliceSource

        if error not in self.ERRORS:
            raise ValueError(f"error must be one of {self.ERRORS}, got {error!r}")
        if candidates not in ("same", "spread"):
            raise ValueError(f"candidates must be 'same' or 'spread', got {candidates!r}")
        self.error, self.candidates = error, candidates
        self.seed = int(seed)

        labels = np.asarray(labels)
        self.gt = labels if labels.ndim == 3 else labels[None]
        self.source = SliceSource(image, rgb=rgb)
        self.delay = float(delay)
        self.calls = 0

    def _object(self, z: int, points, labels, box) -> int:
        lab = self.gt[z]
        h, w = lab.shape
        obj = 0
        if points is not None and len(points):
            pts = np.clip(np.round(np.asarray(points, float)).astype(int), 0, [h - 1, w - 1])
            signs = np.ones(len(pts), int) if labels is None else np.asarray(labels, int)
            positive = [int(lab[r, c]) for (r, c), s in zip(pts, signs) if s == 1 and lab[r, c]]
            obj = positive[0] if positive else 0
            if obj and any(s == 0 and lab[r, c] == obj for (r, c), s in zip(pts, signs)):
                return 0
        if not obj and box is not None:
            r0, c0, r1, c1 = (int(round(v)) for v in box)
            ids, counts = np.unique(lab[max(r0, 0) : r1 + 1, max(c0, 0) : c1 + 1], return_counts=True)
            counts[ids == 0] = 0
            obj = int(ids[np.argmax(counts)]) if counts.size and counts.max() > 0 else 0
        return obj

    def predict(self, z, points=None, labels=None, box=None, mask_input=None, multimask=True, **_):
        """Like ``SlicePredictor.predict``: masks (K, H, W) bool, iou, stability, low_res."""
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        obj = self._object(int(z), points, labels, box)
        mask = (self.gt[z] == obj) if obj else np.zeros(self.gt.shape[1:], bool)
        mask = self._perturb(mask, self._draw(int(z), points, labels, box, multimask))
        score = 0.95 if mask.any() else 0.0
        if self.candidates == "spread" and multimask:
            masks = np.stack([mask, ndi.binary_dilation(mask), ndi.binary_erosion(mask)])
            iou = np.array([score, 0.88 * (score > 0), 0.88 * (score > 0)], np.float32)
            stability = np.array([score, 0.9 * (score > 0), 0.9 * (score > 0)], np.float32)
        else:
            k = 3 if multimask else 1
            masks, iou, stability = np.repeat(mask[None], k, 0), np.full(k, score, np.float32), np.full(k, score, np.float32)
        return SimpleNamespace(
            masks=masks, iou=iou, stability=stability,
            low_res=np.zeros((len(masks), 256, 256), np.float32), best=int(np.argmax(iou)),
        )

    def _draw(self, z: int, points, labels, box, multimask) -> int:
        """0, 1 or 2 (eroded, exact, dilated): a deterministic function of the seed, the slice and
        the prompt (points, labels and box rounded to whole pixels; ``multimask``)."""
        parts = [self.seed, z, bool(multimask)]
        for a in (points, labels, box):
            parts.append(None if a is None else np.round(np.asarray(a, float)).astype(np.int64).ravel().tolist())
        digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
        return int(np.random.default_rng(int.from_bytes(digest, "little")).integers(3))

    def _perturb(self, mask: np.ndarray, draw: int) -> np.ndarray:
        mode = self.error
        if mode == "jitter":
            mode = ("eroded", "exact", "dilated")[draw]
        if mode == "eroded":
            return ndi.binary_erosion(mask)
        if mode == "dilated":
            return ndi.binary_dilation(mask)
        return mask

    def predict_many(self, z, prompts):
        """Like ``SlicePredictor.predict_many``: one prediction per prompt (a dict or a Prompt)."""
        out = []
        for p in prompts:
            p = p if isinstance(p, dict) else vars(p)
            out.append(self.predict(z, p.get("points"), p.get("labels"), p.get("box"), None, p.get("multimask", True)))
        return out
