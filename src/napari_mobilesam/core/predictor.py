"""Prompts in napari's (row, col) order to masks on one slice: `SlicePredictor`.

This is the only module that speaks SAM's (x, y) pixel order: points (row, col) become (x, y) =
(col, row) and boxes (row0, col0, row1, col1) become (x0, y0, x1, y1), scaled into the resized
encoder frame. Everything returned is in (row, col) order at the slice's own resolution.

Speed for interactive use: the embedding comes from an `EmbeddingCache`; the dense positional
encoding is computed once; several objects on a slice share one decoder call; the two bilinear
up-scalings SAM applies to the 256x256 logits (to 1024, crop, to the original size) are composed into
one separable resize whose every output pixel reads a few neighbouring low-res pixels (applied as
weighted gathers, rows then columns), and only over the rows/columns where a mask can be positive
(found exactly from the low-res logits), so full-resolution work scales with the object, not the image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import PromptError
from .batching import batch_bounds
from .embeddings import EmbeddingCache
from .preprocess import encoder_size, input_size_for
from .source import SliceSource

__all__ = ["Prompt", "Prediction", "SlicePredictor", "PromptError", "as_prompt", "iter_predictions", "best_only"]

LOW_RES = 256


@dataclass
class Prompt:
    """Prompts for one object on one slice, in napari's order.

    Attributes
    ----------
    points : (N, 2) float, optional
        Points as (row, col) pixel coordinates of the slice.
    labels : (N,) int, optional
        1 for a positive (object) point, 0 for a negative (background) point. Default: all 1.
    box : (4,) float, optional
        (row0, col0, row1, col1), corners in any order.
    mask_input : (256, 256) float32, optional
        Low-res logits of an earlier prediction (`Prediction.low_res[k]`), to refine it.
    multimask : bool
        Return SAM's 3 candidate masks (True) or its single mask (False).
    """

    points: Any = None
    labels: Any = None
    box: Any = None
    mask_input: Any = None
    multimask: bool = True

    @classmethod
    def from_clicks(cls, points: Any = None, labels: Any = None, box: Any = None) -> Prompt:
        """A user's prompt: one lone point is ambiguous, so it asks for SAM's three candidates
        (keep `Prediction.best`); a box, or several points, ask for the single mask (SAM's own
        advice, and what micro-sam does: the same clicks give micro-sam's masks).
        Empty point arrays become None; ``labels`` default to all positive."""
        pts = None if points is None or len(points) == 0 else np.asarray(points, float).reshape(-1, 2)
        lab = None if pts is None else (np.ones(len(pts), int) if labels is None else np.asarray(labels, int))
        return cls(points=pts, labels=lab, box=box, multimask=box is None and pts is not None and len(pts) == 1)


@dataclass
class Prediction:
    """Masks for one object on one slice.

    Attributes
    ----------
    masks : (K, H, W) bool
        K = 3 with multimask, else 1; (row, col) at the slice's resolution.
    iou : (K,) float32
        The model's predicted IoU of each mask.
    stability : (K,) float32
        IoU between the mask thresholded at +1 and at -1 (logit units); 0 for an empty mask.
    low_res : (K, 256, 256) float32
        The decoder's low-res logits; feed one back as ``mask_input``.
    logits : (K, H, W) float32 or None
        Full-resolution logits, only when asked for (``return_logits=True``).
    """

    masks: np.ndarray
    iou: np.ndarray
    stability: np.ndarray
    low_res: np.ndarray
    logits: np.ndarray | None = None

    @property
    def best(self) -> int:
        """Index of the mask with the highest predicted IoU."""
        return int(np.argmax(self.iou))

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the mask with the highest predicted IoU."""
        return self.masks[self.best]


def _interp_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) float64 matrix equal to 1-D bilinear resizing (align_corners=False)."""
    eye = torch.eye(n_in, dtype=torch.float64)[None, None]
    m = torch.nn.functional.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)
    return m[0, 0]


def _taps(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A banded ``(n_out, n_in)`` matrix as ``(index, weight)`` ``(n_out, T)``: row ``i`` is
    ``Σ_t weight[i, t] · e[index[i, t]]``, ``T`` the widest band (padding taps have weight 0)."""
    nz = m != 0
    width = max(1, int(nz.sum(1).max()))
    first = nz.to(torch.int8).argmax(1)
    index = first[:, None] + torch.arange(width)
    inside = index < m.shape[1]
    index = index.clamp(max=m.shape[1] - 1)
    weight = m.gather(1, index) * inside
    rebuilt = torch.zeros_like(m).scatter_add_(1, index, weight)
    if not torch.allclose(rebuilt, m, rtol=0, atol=1e-12):  # bilinear bands are contiguous
        raise AssertionError("resize matrix is not banded")
    return index, weight.float()


def _apply_taps(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(K, n_in, m)`` → ``(K, n_out, m)``: the rows of ``x`` resized by ``_taps`` output."""
    out = weight[:, 0, None] * x[:, index[:, 0]]
    for t in range(1, index.shape[1]):
        out += weight[:, t, None] * x[:, index[:, t]]
    return out


def as_prompt(p: Prompt | dict) -> Prompt:
    """A `Prompt` from a Prompt or a dict of its fields (unknown keys raise `PromptError`)."""
    if isinstance(p, Prompt):
        return p
    if isinstance(p, dict):
        unknown = set(p) - {"points", "labels", "box", "mask_input", "multimask"}
        if unknown:
            raise PromptError(f"unknown prompt keys {sorted(unknown)}: use points, labels, box, mask_input, multimask")
        return Prompt(**p)
    raise PromptError(f"a prompt must be a Prompt or a dict, got {type(p).__name__}")


class SlicePredictor:
    """Decode prompts into masks on the slices of one `SliceSource`.

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
        The model (exact torch or a faster backend behind ``sam.image_encoder``).
    source : SliceSource or array
        The stack; an array is wrapped in ``SliceSource(array)``.
    cache : EmbeddingCache, optional
        Shared embedding cache; default: a new in-memory one for ``sam``.
    max_batch : int
        Most prompts decoded in one decoder call (default 8: the decoder's working memory is about
        24 MiB per prompt of a call, so 8 keep it near 190 MiB however many prompts a slice has).
    """

    max_batch = 8

    def __init__(self, sam: Any, source: SliceSource | Any, cache: EmbeddingCache | None = None,
                 *, max_batch: int | None = None) -> None:
        if max_batch is not None:
            if int(max_batch) < 1:
                raise ValueError(f"max_batch must be at least 1, got {max_batch}")
            self.max_batch = int(max_batch)
        self.sam = sam
        # anything with SliceSource's slice interface (e.g. a tile view) is used as it is
        is_source = all(hasattr(source, a) for a in ("rgb", "slice_key", "slice_shape", "n_slices"))
        self.source = source if is_source else SliceSource(source)
        if cache is not None and cache.sam is not sam:
            raise ValueError("the EmbeddingCache belongs to another model: pass a cache built for this sam")
        self.cache = cache if cache is not None else EmbeddingCache(sam)
        self.device = sam.pixel_mean.device
        # no_grad, not inference_mode: a normal tensor has a version counter, so the OpenVINO
        # decoder can tell it is passed the same, unchanged positional encoding every time
        with torch.no_grad():
            self._dense_pe = sam.prompt_encoder.get_dense_pe()
        self._mats: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def n_slices(self) -> int:
        return self.source.n_slices

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.source.slice_shape

    def prefetch(self, zs: Sequence[int]) -> None:
        """Compute the embeddings of slices ``zs`` in the background (see `EmbeddingCache.prefetch`)."""
        self.cache.prefetch(self.source, zs)

    def prefetch_around(self, z: int, radius: int = 2) -> None:
        """Prefetch the neighbours of slice ``z`` (z+1, z-1, z+2, z-2, ... up to ``radius``), nearest
        first, cancelling earlier pending prefetches; for an annotator moving through the stack."""
        order = [z + s * d for d in range(1, radius + 1) for s in (1, -1)]
        self.cache.prefetch(self.source, [q for q in order if 0 <= q < self.n_slices])

    # -- validation and (row, col) -> (x, y) ------------------------------------------------------
    def _check(self, p: Prompt, original: tuple[int, int], resized: tuple[int, int]):
        H, W = original
        h, w = resized
        sy, sx = h / H, w / W
        coords = labels = box = mask = None
        if p.points is not None:
            pts = np.asarray(p.points, dtype=np.float64)
            if pts.size == 0:
                pts = pts.reshape(0, 2)
            if pts.ndim == 1 and pts.shape == (2,):
                pts = pts[None]
            if pts.ndim != 2 or pts.shape[1] != 2:
                raise PromptError(f"points must be (N, 2) (row, col) coordinates, got shape {pts.shape}")
            if not np.isfinite(pts).all():
                raise PromptError("points contain NaN or inf: every point needs finite (row, col)")
            bad = (pts[:, 0] < -0.5) | (pts[:, 0] > H - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > W - 0.5)
            if bad.any():
                raise PromptError(
                    f"point(s) {pts[bad].tolist()} lie outside the slice of {H} x {W} pixels "
                    f"(rows 0..{H - 1}, cols 0..{W - 1})"
                )
            if p.labels is None:
                lab = np.ones(len(pts), np.int64)
            else:
                lab_raw = np.asarray(p.labels).reshape(-1)
                if lab_raw.shape != (len(pts),):
                    raise PromptError(f"labels must have one entry per point ({len(pts)}), got {lab_raw.shape}")
                if lab_raw.dtype.kind == "f" and not np.isfinite(lab_raw).all():
                    raise PromptError("labels contain NaN: use 1 (positive) or 0 (negative)")
                lab = lab_raw.astype(np.int64)
                if not np.isin(lab, (0, 1)).all() or (lab_raw.dtype.kind == "f" and (lab != lab_raw).any()):
                    raise PromptError(f"labels must be 1 (positive) or 0 (negative), got {lab_raw.tolist()}")
            if len(pts):
                xy = np.stack([pts[:, 1] * sx, pts[:, 0] * sy], axis=1)  # (row, col) -> (x, y)
                coords, labels = xy, lab
        elif p.labels is not None and len(np.asarray(p.labels).reshape(-1)):
            raise PromptError("labels were given without points")
        if p.box is not None:
            b = np.asarray(p.box, dtype=np.float64).reshape(-1)
            if b.shape != (4,):
                raise PromptError(f"box must be (row0, col0, row1, col1), got {np.asarray(p.box).shape}")
            if not np.isfinite(b).all():
                raise PromptError("box contains NaN or inf")
            r0, r1 = sorted((b[0], b[2]))
            c0, c1 = sorted((b[1], b[3]))
            if r0 < -0.5 or c0 < -0.5 or r1 > H - 0.5 or c1 > W - 0.5:
                raise PromptError(
                    f"box (row0, col0, row1, col1) = {b.tolist()} reaches outside the slice of {H} x {W} pixels"
                )
            if r1 <= r0 or c1 <= c0:
                raise PromptError(f"box {b.tolist()} has no area: give two opposite corners")
            box = np.array([c0 * sx, r0 * sy, c1 * sx, r1 * sy])  # (x0, y0, x1, y1)
        if p.mask_input is not None:
            m = np.asarray(p.mask_input, dtype=np.float32)
            if m.shape == (1, LOW_RES, LOW_RES):
                m = m[0]
            if m.shape != (LOW_RES, LOW_RES):
                raise PromptError(f"mask_input must be (256, 256) low-res logits, got {m.shape}")
            if not np.isfinite(m).all():
                raise PromptError("mask_input contains NaN or inf")
            mask = m
        if coords is None and box is None and mask is None:
            raise PromptError("empty prompt: give at least one point, a box or a mask_input")
        return coords, labels, box, mask, bool(p.multimask)

    # -- up-scaling -------------------------------------------------------------------------------
    def _matrices(self, original: tuple[int, int], resized: tuple[int, int]):
        """Row and column resizing ``(H, 256)``, ``(W, 256)`` as taps, with their supports.

        Returns ``(rows, cols, row_support, col_support)``: ``rows``/``cols`` are ``(index, weight)``
        pairs ``(n, T)`` (long, float32) with ``resize[i] = Σ_t weight[i, t] · low[index[i, t]]``
        (a bilinear up-scaling followed by a bilinear resize touches at most a few neighbouring
        low-res pixels), and the supports are the ``(n, 256)`` bool patterns of the dense matrices.
        """
        key = (original, resized)
        m = self._mats.get(key)
        if m is None:
            full = 4 * LOW_RES  # 1024: the decoder's logits are up-scaled to the encoder size first
            mats = []
            for n_orig, n_res in zip(original, resized):
                r1 = _interp_matrix(full, LOW_RES)[:n_res]  # 256 -> 1024, crop padding
                r2 = _interp_matrix(n_orig, n_res)  # crop -> original size
                mats.append(r2 @ r1)
            mr, mc = mats
            m = (_taps(mr), _taps(mc), mr > 0, mc > 0)
            self._mats[key] = m
        return m

    def _upscale(self, low: torch.Tensor, original, resized, full: bool):
        """low (K, 256, 256) logits -> masks (K, H, W) bool, stability (K,), logits or None."""
        H, W = original
        (ir, wr), (ic, wc), sr, sc = self._matrices(original, resized)
        K = low.shape[0]
        if full:
            r0, r1, c0, c1 = 0, H, 0, W
        else:
            cand = low > -1.0  # outside the support of these cells the logits are <= -1
            rows_any = cand.any(dim=2).any(dim=0)
            cols_any = cand.any(dim=1).any(dim=0)
            rr = torch.nonzero(sr[:, rows_any].any(dim=1)).flatten()
            cc = torch.nonzero(sc[:, cols_any].any(dim=1)).flatten()
            if len(rr) == 0 or len(cc) == 0:  # nothing, or only in the padding (cropped away)
                z = np.zeros(K, np.float32)
                return np.zeros((K, H, W), bool), z, None
            r0, r1 = int(rr[0]), int(rr[-1]) + 1
            c0, c1 = int(cc[0]), int(cc[-1]) + 1
        # resize the columns (as rows of the transpose), then the rows: (K, rh, rw), contiguous
        cols = _apply_taps(low.transpose(1, 2), ic[c0:c1], wc[c0:c1])  # (K, rw, 256)
        logits = _apply_taps(cols.transpose(1, 2), ir[r0:r1], wr[r0:r1])
        masks = np.zeros((K, H, W), bool)
        masks[:, r0:r1, c0:c1] = (logits > 0).numpy()
        hi = (logits > 1.0).flatten(1).sum(1).float()
        lo = (logits > -1.0).flatten(1).sum(1).float()
        stab = torch.where(lo > 0, hi / lo.clamp(min=1), torch.zeros_like(lo)).numpy().astype(np.float32)
        return masks, stab, (logits.numpy() if full else None)

    def _decode_chunk(self, emb, checked, idx, sig, original, resized, return_logits, keep) -> list[Prediction]:
        """Decode prompts ``idx`` (one structure ``sig``) in one decoder call: one `Prediction` each
        (only the best candidate, up-scaled alone, for ``keep="best"``)."""
        n_pts, has_box, has_mask, multi = sig
        dev = self.device
        pts_arg = boxes_arg = masks_arg = None
        if n_pts:
            c = torch.as_tensor(np.stack([checked[i][0] for i in idx]), dtype=torch.float32, device=dev)
            lab = torch.as_tensor(np.stack([checked[i][1] for i in idx]), dtype=torch.int64, device=dev)
            pts_arg = (c, lab)
        if has_box:
            boxes_arg = torch.as_tensor(np.stack([checked[i][2] for i in idx]), dtype=torch.float32, device=dev)
        if has_mask:
            masks_arg = torch.as_tensor(np.stack([checked[i][3] for i in idx]), device=dev)[:, None]
        sparse, dense = self.sam.prompt_encoder(points=pts_arg, boxes=boxes_arg, masks=masks_arg)
        low, iou = self.sam.mask_decoder(
            image_embeddings=emb.features,
            image_pe=self._dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multi,
        )
        low = low.float().cpu()
        iou = iou.float().cpu()
        del sparse, dense
        out = []
        for j in range(len(idx)):
            lo, sc = low[j], iou[j]
            if keep == "best":
                k = int(torch.argmax(sc))
                lo, sc = lo[k : k + 1], sc[k : k + 1]
            masks, stab, logits = self._upscale(lo, original, resized, return_logits)
            out.append(Prediction(masks=masks, iou=sc.numpy().copy(), stability=stab,
                                  low_res=lo.numpy().copy(), logits=logits))
        return out

    # -- prediction -------------------------------------------------------------------------------
    def predict(
        self,
        z: int,
        points: Any = None,
        labels: Any = None,
        box: Any = None,
        mask_input: Any = None,
        multimask: bool = True,
        *,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for one object on slice ``z``; see `Prompt` for the arguments (all (row, col))."""
        return self.predict_many(
            z, [Prompt(points, labels, box, mask_input, multimask)], return_logits=return_logits
        )[0]

    def predict_many(
        self, z: int, prompts: Sequence[Prompt | dict], *, return_logits: bool = False, keep: str = "all"
    ) -> list[Prediction]:
        """Masks for several objects on slice ``z``, one `Prediction` per prompt, in order.

        Prompts with the same structure (number of points, box or not, mask or not, multimask) share
        batched decoder calls of at most ``max_batch`` prompts each (full batches, then decreasing
        powers of two: few shapes for compiled decoders), so the decoder's memory stays flat
        whatever the number of prompts; results equal one-by-one calls. The returned list holds
        every prediction at once (1.5 MiB per prompt on a 512 x 512 slice with three candidates):
        for many prompts use ``keep="best"`` (each `Prediction` holds only its best candidate,
        ``K = 1``: a third of that) or `iter_predict`, which lets each chunk go once used.
        """
        out: list[Prediction | None] = [None] * len(prompts)
        for i, pred in self.iter_predict(z, prompts, return_logits=return_logits, keep=keep):
            out[i] = pred
        return out  # type: ignore[return-value]

    def iter_predict(
        self, z: int, prompts: Sequence[Prompt | dict], *, return_logits: bool = False, keep: str = "all"
    ) -> Iterator[tuple[int, Prediction]]:
        """``(index into prompts, Prediction)`` for every prompt, one decoder chunk at a time.

        Same predictions as `predict_many` (same batching), yielded as each chunk of at most
        ``max_batch`` prompts is decoded, grouped by prompt structure (so not always in the order
        of ``prompts``): a caller that keeps only what it needs of each (the chosen mask, or pixels
        written into an output slice) holds at most one chunk's predictions, whatever the number
        of prompts. Every prompt is checked before the first decoder call. ``keep="best"``: only
        the candidate with the highest predicted IoU (masks ``(1, H, W)``).
        """
        if keep not in ("all", "best"):
            raise ValueError(f"keep must be 'all' or 'best', got {keep!r}")
        prompts = [as_prompt(p) for p in prompts]
        if not prompts:
            return
        original = self.source.slice_shape
        resized = input_size_for(original, encoder_size(self.sam))
        checked = [self._check(p, original, resized) for p in prompts]  # before any heavy work
        emb = self.cache.get(self.source, z)
        groups: dict[tuple, list[int]] = {}
        for i, (coords, _lab, box, mask, multi) in enumerate(checked):
            sig = (0 if coords is None else len(coords), box is not None, mask is not None, multi)
            groups.setdefault(sig, []).append(i)
        for sig, idx in groups.items():
            for start, stop in batch_bounds(len(idx), self.max_batch):
                chunk = idx[start:stop]
                with torch.inference_mode():
                    preds = self._decode_chunk(emb, checked, chunk, sig, original, resized, return_logits, keep)
                for i, pred in zip(chunk, preds):
                    yield i, pred
                del preds


def iter_predictions(predictor: Any, z: int, prompts: Sequence[Prompt | dict], *,
                     keep: str = "all") -> Iterator[tuple[int, Prediction]]:
    """``(index, prediction)`` for every prompt on slice ``z`` from any predictor: its
    ``iter_predict`` when it has one (`SlicePredictor`), else ``predict_many`` on chunks of
    ``max_batch`` (default 16) prompts, so at most one chunk's predictions are alive at a time
    when the caller keeps only what it needs. ``keep="best"``: each prediction reduced to its best
    candidate (masks ``(1, H, W)``, ``iou``, ``stability``, ``low_res`` of that candidate)."""
    it = getattr(predictor, "iter_predict", None)
    if it is not None:
        yield from it(z, prompts, keep=keep)
        return
    size = int(getattr(predictor, "max_batch", 16))
    for start in range(0, len(prompts), size):
        preds = predictor.predict_many(z, list(prompts[start : start + size]))
        for j, pred in enumerate(preds):
            yield start + j, (best_only(pred) if keep == "best" else pred)
        del preds


def best_only(pred: Any) -> Prediction:
    """``pred`` reduced to its best candidate (``K = 1``; copies, so the rest can be freed)."""
    k = int(np.argmax(np.asarray(pred.iou)))
    low = getattr(pred, "low_res", None)
    return Prediction(masks=np.array(pred.masks[k : k + 1], bool), iou=np.array(pred.iou[k : k + 1], np.float32),
                      stability=np.array(pred.stability[k : k + 1], np.float32),
                      low_res=None if low is None else np.array(low[k : k + 1], np.float32))
