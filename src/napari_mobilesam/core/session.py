"""The engine objects behind the widget for one (model, image) pair, and model loading.

:class:`Session` bundles a :class:`~napari_mobilesam.core.source.SliceSource`, an
:class:`~napari_mobilesam.core.embeddings.EmbeddingCache` and a
:class:`~napari_mobilesam.core.predictor.SlicePredictor`, and offers the few calls the widget makes:
is a slice embedded, embed it, prefetch neighbours, predict one object, segment a slice
automatically, propagate. All arrays are napari-ordered: points ``(row, col)``, boxes
``(row0, col0, row1, col1)``, masks ``(H, W)`` and stacks ``(Z, H, W)``.

Nothing here imports Qt or napari; torch is only reached through the engine modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..volume.propagation import STOP_REASONS, describe_stops  # noqa: F401  (re-exported)
from .predictor import Prompt

__all__ = [
    "AUTO_MODES",
    "Session",
    "normalization_for",
    "ObjectPrediction",
    "describe_stops",
]

#: Automatic segmentation modes of :meth:`Session.segment_automatically`: ``"auto"`` (AIS when the
#: model has a decoder, else the point grid), ``"ais"`` (micro-sam's decoder), ``"grid"`` (SAM
#: point grid).
AUTO_MODES = ("auto", "ais", "apg", "grid")


@dataclass(frozen=True)
class ObjectPrediction:
    """One object predicted from the prompts of one slice.

    Attributes
    ----------
    z : int
    mask : (H, W) bool
    score : float
        The decoder's predicted IoU of the chosen mask.
    low_res : (256, 256) float32 or None
        The chosen mask's low-resolution logits (can seed the next prediction).
    missing_tiles : tuple of Tile
        With ``predict(..., embedded_only=True)`` on tiled slices: tiles the object runs into
        that are not embedded yet (not used; embed them and predict again). Empty otherwise.
    """

    z: int
    mask: np.ndarray
    score: float
    low_res: np.ndarray | None = None
    missing_tiles: tuple = ()


def normalization_for(sam) -> str:
    """How raw intensities become SAM's uint8 input for ``sam`` (a ``SliceSource`` ``normalize``).

    ``"microsam"`` (micro-sam's per-slice minimum-to-maximum) for a model loaded with micro-sam
    semantics (micro-sam's models, or ``semantics="microsam"``): the same clicks then give the
    same masks as in micro-sam. ``"stack"`` (one percentile range for the stack) otherwise.
    """
    from ..models.registry import INFO_ATTR

    info = getattr(sam, INFO_ATTR, None) or {}  # stand-ins (an oracle) have none
    return "microsam" if info.get("semantics") == "microsam" else "stack"


class Session:
    """Engine objects for one model and one image: the ONE place that wires a
    :class:`~napari_mobilesam.core.source.SliceSource`, an
    :class:`~napari_mobilesam.core.embeddings.EmbeddingCache` and a
    :class:`~napari_mobilesam.core.predictor.SlicePredictor` together (used by the widget, the
    batch API and dask workers).

    Parameters
    ----------
    sam : Sam or None
        The model. None only together with ``predictor`` (a test oracle that needs no model).
    data : array-like or SliceSource
        The image: ``(H, W)``, ``(H, W, 3|4)``, ``(Z, H, W)`` or ``(Z, H, W, 3|4)``, or a ready
        :class:`~napari_mobilesam.core.source.SliceSource` (then ``rgb`` is ignored).
    rgb : bool or None
        Whether the last axis of ``data`` is colour (None: guessed, see ``SliceSource``).
    predictor : SlicePredictor-like, optional
        Replaces the engine's predictor (``predict``/``predict_many`` with the same signatures).
    cache_dir : path, None or "env"
        On-disk embedding cache. ``"env"`` (default): ``$NAPARI_MOBILESAM_CACHE/embeddings`` when
        that variable is set, else memory only. None: memory only.
    cache_bytes : int, optional
        Memory budget of the embedding cache (default: the cache's own, 512 MiB).
    max_disk_bytes : int or None
        Budget of ``cache_dir`` (default: the cache's own, 4 GiB; None: unbounded).
    tile : int, "auto" or None
        Slices larger than this are cut into overlapping tiles seen at full resolution (see
        :mod:`napari_mobilesam.core.tiles`). ``"auto"`` (default): tiles of 1024 pixels for slices
        whose longest side exceeds 1.5 x 1024 (below that SAM's resizing loses little); None or 0:
        never.
    halo : int
        Overlap of the tiles on each inner side (default 128).
    """

    def __init__(self, sam, data, *, rgb: bool | None = None, predictor=None, cache_dir: Any = "env",
                 cache_bytes: int | None = None, max_disk_bytes: Any = "default", tile: Any = "auto",
                 halo: int | None = None):
        self.sam = sam
        self.source = self._source(data, rgb, sam)
        self.cache = None
        if predictor is None:
            self.cache = self._cache(sam, cache_dir, cache_bytes, max_disk_bytes)
            predictor = self._predictor(sam, tile, halo)
        self.predictor = predictor
        self.focus: tuple[float, float] | None = None  # (row, col) worked at last (tiled slices)

    @property
    def tiled(self) -> bool:
        """Whether slices are cut into tiles (then ``predictor`` is a ``TiledPredictor``)."""
        return hasattr(self.predictor, "grid")

    def _predictor(self, sam, tile, halo):
        from .predictor import SlicePredictor
        from .tiles import DEFAULT_HALO, DEFAULT_TILE, TiledPredictor

        if isinstance(tile, str):
            if tile != "auto":
                raise InputError(f"tile must be a size in pixels, 'auto' or None, not {tile!r}")
            tile = DEFAULT_TILE if max(self.source.slice_shape) > 1.5 * DEFAULT_TILE else None
        if tile and max(self.source.slice_shape) > int(tile):
            return TiledPredictor(sam, self.source, self.cache, tile=int(tile),
                                  halo=DEFAULT_HALO if halo is None else int(halo))
        return SlicePredictor(sam, self.source, self.cache)

    @classmethod
    def from_choice(cls, choice, data, **options) -> Session:
        """A session for a :class:`~napari_mobilesam.models.choice.ModelChoice` (loaded here: slow)
        or an already loaded ``Sam``; ``options`` as in the constructor."""
        sam = choice if hasattr(choice, "image_encoder") else choice.load()
        return cls(sam, data, **options)

    @staticmethod
    def _source(data, rgb, sam=None):
        from .source import SliceSource

        if isinstance(data, SliceSource):
            data.resolve_normalize(normalization_for(sam))  # only when it says "auto"
            return data
        return SliceSource(data, rgb=rgb, normalize=normalization_for(sam))

    @staticmethod
    def _cache(sam, cache_dir, cache_bytes, max_disk_bytes):
        from .embeddings import EmbeddingCache

        if isinstance(cache_dir, str) and cache_dir == "env":
            env = os.environ.get("NAPARI_MOBILESAM_CACHE")
            cache_dir = Path(env) / "embeddings" if env else None
        options: dict[str, Any] = {"disk_dir": cache_dir}
        if cache_bytes is not None:
            options["max_bytes"] = int(cache_bytes)
        if not (isinstance(max_disk_bytes, str) and max_disk_bytes == "default"):
            options["max_disk_bytes"] = max_disk_bytes
        from ..models.registry import ais_decoder

        if sam is not None and ais_decoder(sam) is not None:
            import torch  # float32: AIS/APG reuse the embedding (float16 moves the maps ~7e-3)

            options["dtype"] = torch.float32
        return EmbeddingCache(sam, **options)

    @property
    def n_slices(self) -> int:
        return self.source.n_slices

    # -- embeddings ------------------------------------------------------------------------------
    # On a tiled slice "the slice's embedding" is the embedding of the tile being worked in: the
    # tile holding ``focus`` (set by :meth:`set_focus` and :meth:`predict`). Before any prompt there
    # is no such tile and nothing to embed: the whole slice is never embedded (it would be resized,
    # the very thing tiling avoids) and the other tiles only when a prompt reaches them.
    def set_focus(self, points=None, labels=None, box=None) -> None:
        """Remember where the user works: the centre of these prompts (as :meth:`predict` takes
        them, napari ``(row, col)``); on tiled slices, its tile is the one embedded next."""
        from .tiles import _prompt_center

        try:
            self.focus = tuple(float(v) for v in _prompt_center(Prompt.from_clicks(points, labels, box)))
        except InputError:
            pass  # no point and no box: keep the last place

    def _embedding_sources(self):
        """(source, predictor) pairs to embed for "the slice": the whole slice, or on a tiled
        slice the focused tile's view (none before any prompt)."""
        if not self.tiled:
            return [(self.source, self.predictor)]
        if self.focus is None:
            return []
        tile_pred = self.predictor.tile_predictor(self.predictor.grid.tile_at(*self.focus))
        return [(tile_pred.source, tile_pred)]

    def is_embedded(self, z: int) -> bool:
        """True when slice ``z``'s embedding (on tiled slices: the focused tile's) is cached, so a
        prediction there is fast."""
        if self.cache is None:
            return True
        return all(self.cache.is_cached(src, z) for src, _ in self._embedding_sources())

    def embed(self, z: int) -> None:
        """Compute (or load) slice ``z``'s embedding (tiled: the focused tile's). Slow: call it in a worker."""
        if self.cache is not None:
            for src, _ in self._embedding_sources():
                self.cache.get(src, z)

    def prefetch(self, zs) -> None:
        """Embed slices ``zs`` (tiled: the focused tile on them) in the cache's background thread
        (earlier prefetches dropped)."""
        if self.cache is not None:
            zs = [z for z in zs if 0 <= z < self.n_slices]
            for src, _ in self._embedding_sources() if zs else []:
                self.cache.prefetch(src, zs)

    def close(self, wait: bool = True) -> None:
        """Stop background prefetching (``wait=False``: without waiting for a running one,
        see :meth:`EmbeddingCache.close`)."""
        if self.cache is not None:
            self.cache.close(wait=wait)

    # -- prompts ---------------------------------------------------------------------------------
    def predict(self, z: int, points, labels, box=None, mask_input=None, *,
                embedded_only: bool = False) -> ObjectPrediction:
        """The best mask for the prompts of slice ``z``.

        ``points`` (N, 2) ``(row, col)``, ``labels`` (N,) 1/0, ``box`` ``(row0, col0, row1, col1)``
        or None. One lone point is ambiguous, so SAM's three candidates are asked for and the one
        with the highest predicted IoU is kept; with more prompts, the single-mask output is used.
        ``embedded_only`` (tiled slices): never run the encoder; tiles not embedded yet are left
        out and listed in ``missing_tiles`` (the mask is then empty if the prompt's own tile is).
        """
        p = Prompt.from_clicks(points, labels, box)
        self.set_focus(points, labels, box)
        missing: list = []
        if embedded_only and self.tiled:
            pred, missing = self.predictor.predict_embedded(
                z, Prompt(p.points, p.labels, p.box, mask_input, p.multimask))
            if pred is None:
                return ObjectPrediction(z=z, mask=np.zeros(self.source.slice_shape, bool), score=0.0,
                                        missing_tiles=tuple(missing))
        else:
            pred = self.predictor.predict(
                z, points=p.points, labels=p.labels, box=p.box, mask_input=mask_input, multimask=p.multimask
            )
        iou = np.asarray(pred.iou, dtype=float).reshape(-1)
        best = int(np.argmax(iou))
        low_res = getattr(pred, "low_res", None)
        return ObjectPrediction(
            z=z,
            mask=np.asarray(pred.masks[best], dtype=bool),
            score=float(iou[best]),
            low_res=None if low_res is None else np.asarray(low_res[best], dtype=np.float32),
            missing_tiles=tuple(missing),
        )

    # -- automatic segmentation -------------------------------------------------------------------
    @property
    def has_ais(self) -> bool:
        """Whether the model has micro-sam's AIS decoder (the ``"ais"`` automatic mode)."""
        if self.sam is None:
            return False
        from ..models.registry import ais_decoder

        return ais_decoder(self.sam) is not None

    def automatic_mode(self, mode: str = "auto") -> str:
        """The mode :meth:`segment_automatically` runs for ``mode``: ``"auto"`` is ``"ais"`` when the
        model has an AIS decoder, else ``"grid"``. InputError for an unknown mode or ``"ais"``
        without a decoder."""
        if mode not in AUTO_MODES:
            raise InputError(f"unknown automatic mode {mode!r}: choose one of {', '.join(AUTO_MODES)}")
        if mode == "auto":
            return "ais" if self.has_ais else "grid"
        if mode in ("ais", "apg") and not self.has_ais:
            raise InputError(
                f"this model has no instance-segmentation (AIS) decoder, which the {mode.upper()} "
                "mode needs: choose a micro-sam model (e.g. vit_t_lm, vit_t_em_organelles) or the "
                "SAM point-grid mode"
            )
        return mode

    def segment_automatically(self, z: int, params: Any = None, *, mode: str = "auto",
                              ais_params: Any = None, apg_params: Any = None) -> np.ndarray:
        """All objects of slice ``z`` as an ``(H, W)`` int32 label image (ids 1..N). Slow: worker.

        ``mode`` (see :meth:`automatic_mode`): ``"ais"``, micro-sam's decoder maps and seeded
        watershed on the raw slice (:func:`~napari_mobilesam.volume.ais.segment_slice_ais`,
        parameters ``ais_params``, an ``AISParams``); ``"grid"``, the prompt-based point grid
        (:mod:`napari_mobilesam.volume.automatic`, parameters ``params``, an ``AutoParams``);
        ``"apg"``, micro-sam's automatic prompt generation: prompts from the decoder's maps
        answered by SAM on the same embedding (:func:`~napari_mobilesam.volume.apg.segment_slice_apg`,
        parameters ``apg_params``, an ``APGParams``). All run tile by tile on tiled slices (AIS:
        decoder maps of the session's tile grid, post-processed as one image up to
        ``ais_params.stitch_max_pixels``, tile by tile beyond: ``AISParams.tiling``). A further
        mode plugs in here and in ``AUTO_MODES``.

        On untiled slices AIS and APG use the session's embedding of the slice (a slice clicked on
        is not embedded again) and the process's decoded maps (:data:`~napari_mobilesam.models.ais_decoder.MAPS_CACHE`):
        AIS again with other ``ais_params``, or APG after AIS, only post-processes.
        """
        mode = self.automatic_mode(mode)
        if mode == "apg":
            from ..volume.apg import segment_slice_apg

            return segment_slice_apg(self.predictor, z, apg_params).astype(np.int32)
        if mode == "ais":
            from ..volume.ais import segment_slice_ais

            if not self.tiled:  # the maps of the session's own (float32) embedding of micro-sam's input
                from ..volume.apg import microsam_maps
                from ..volume.instance import instances_from_maps

                return instances_from_maps(*microsam_maps(self.predictor, z), ais_params).astype(np.int32)
            from ..volume.instance import SliceWindows

            labels = segment_slice_ais(self.sam, SliceWindows(self.source, z), ais_params,
                                       grid=self.predictor.grid)
            return labels.astype(np.int32, copy=False)
        if self.tiled:
            from ..volume.tiled import segment_slice_tiled

            return segment_slice_tiled(self.predictor, z, params)
        from ..volume.automatic import segment_slice

        return segment_slice(self.predictor, z, params).labels

    def segment_stack_automatically(self, zs=None, params: Any = None, *, mode: str = "auto",
                                    ais_params: Any = None, apg_params: Any = None, progress=None,
                                    cancel=None, live=None):
        """Every slice of ``zs`` (default: all) segmented as :meth:`segment_automatically` does,
        stitched through z so that each object keeps one id (``Stitcher`` with ``params``'
        ``stitch_*`` settings). Slow: call it in a worker.

        ``progress(done, total)`` after each slice; ``cancel()`` is checked before each slice (True:
        stop, keeping the slices done); ``live``: a zero ``(Z, H, W)`` integer volume written into as
        slices finish (it becomes the result). Returns ``(volume, done)``: the ``(Z, H, W)`` int32
        labels (ids 1..N in order of first appearance; slices not done are 0) and the list of slices
        done.
        """
        from ..volume.params import AutoParams
        from ..volume.stitch import Stitcher

        mode = self.automatic_mode(mode)
        p = params if params is not None else AutoParams()
        zs = list(range(self.n_slices)) if zs is None else [int(z) for z in zs]
        volume = live if live is not None else np.zeros((self.n_slices, *self.source.slice_shape), np.int32)
        stitcher = Stitcher(p.stitch_iou, p.stitch_overlap, p.stitch_gap, p.stitch_regrow)
        done: list[int] = []
        for i, z in enumerate(zs):
            if cancel is not None and cancel():
                break
            volume[z] = stitcher.add(self.segment_automatically(z, p, mode=mode, ais_params=ais_params,
                                                                apg_params=apg_params))
            done.append(z)
            if progress is not None:
                progress(i + 1, len(zs))
        return volume, done

    # -- propagation ----------------------------------------------------------------------------
    def propagate_prompts(
        self,
        z: int,
        points,
        labels,
        box=None,
        *,
        more_seeds=None,
        stop_points=None,
        z_range=None,
        progress=None,
        cancel=None,
        live=None,
    ):
        """Follow the object prompted on slice ``z`` through the stack (slow: call it in a worker).

        ``points``/``labels``/``box`` as in :meth:`predict`; ``more_seeds``: ``{z: (points, labels,
        box)}``, prompts of the same object on other slices (each one a seed too: the gaps between
        seeds are filled from both ends); ``stop_points``: ``{z: (N, 2) points}``, negative-only
        points marking slices the object must not reach; ``z_range``: (start, stop) like ``range``;
        ``live``: a zero ``(Z, H, W)`` integer volume the object is written into as it goes (so
        the GUI can show progress; it becomes the result's ``labels``). Returns the engine's
        ``PropagationResult``; its ``labels`` volume ``(Z, H, W)`` holds the object as label 1.
        """
        from ..volume.propagation import ObjectPrompts, propagate

        prompts = {int(zs): Prompt.from_clicks(*more) for zs, more in (more_seeds or {}).items()}
        prompts[int(z)] = Prompt.from_clicks(points, labels, box)
        for zs, pts in (stop_points or {}).items():
            if int(zs) != int(z) and len(pts):
                pts = np.asarray(pts, float).reshape(-1, 2)
                prompts[int(zs)] = Prompt(points=pts, labels=np.zeros(len(pts), int))
        obj = ObjectPrompts(1, prompts=prompts)
        return propagate(
            self.predictor, [obj], z_range=z_range, progress=progress, cancel=cancel,
            target=live, inplace=live is not None,
        )

    def propagate_label(self, volume, label: int, *, z_range=None, progress=None, cancel=None, live=None):
        """Extend label ``label`` of ``volume`` ((Z, H, W) int, e.g. a Labels layer's data) through z.

        Every slice where the label appears (inside ``z_range``) seeds the propagation; the
        existing voxels are kept. ``live`` as in :meth:`propagate_prompts`. Returns the engine's
        ``PropagationResult`` whose ``labels`` volume holds only the label (other ids of
        ``volume`` are not copied).
        """
        from ..volume.propagation import objects_from_labels, propagate

        volume = np.asarray(volume)
        lo, hi = (0, volume.shape[0]) if z_range is None else z_range
        present = np.flatnonzero((volume[lo:hi] == label).reshape(hi - lo, -1).any(axis=1)) + lo
        if present.size == 0:
            where = "" if z_range is None else f" between z={lo} and z={hi - 1}"
            raise ValueError(
                f"label {label} does not appear in the labels layer{where}: pick an existing label "
                "(the layer's picker tool, key L) before propagating it"
            )
        objects = objects_from_labels(volume, [label], zs=present)
        return propagate(
            self.predictor, objects, z_range=z_range, progress=progress, cancel=cancel,
            target=live, inplace=live is not None,
        )
