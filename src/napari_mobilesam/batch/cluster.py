"""The batch API on a ``dask.distributed`` cluster: each worker process loads the model once.

- :func:`map_on_cluster` spreads one job per slice over the workers and yields the results in z
  order, with a bounded number of slices in flight.
- :func:`embed_on_cluster` fills an embedding cache with slices encoded on the workers (for
  propagation, which then runs here on the decoder only).
- :func:`preload_model_on_workers` loads the model on every worker ahead of time.

Workers build their engine objects through :class:`~napari_mobilesam.core.session.Session`, like
the widget and the batch API, and run the same per-slice steps as the local batch path: a slice
larger than the tile (:class:`SliceSteps`: ``tile``/``halo`` as ``Session`` takes them) is cut into
overlapping tiles seen at full resolution. Slices travel as (H, W, 3) uint8 RGB (tiles, for
:func:`embed_on_cluster` on tiled slices), or raw (:attr:`SliceSteps.normalize`) when the worker
must normalise them itself: micro-sam's models (per slice, or per tile, minimum to maximum, as
locally) and the AIS/APG automatic modes (which read the raw slice); labels come back (H, W).
:func:`model_plan` asks a worker what the model needs before the jobs are made.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelError
from ..models.choice import ModelChoice
from ..volume.automatic import AutoParams
from .slices import (
    check_auto_mode,
    progress_callback,
    segment_objects_on_slice,
    slice_segmenter,
)

__all__ = ["preload_model_on_workers", "spec_for_client", "map_on_cluster", "embed_on_cluster",
           "worker_segment_prompts", "worker_segment_auto", "WORKER_LOAD_COUNT", "SliceSteps",
           "prompt_tiles", "model_plan", "slice_jobs"]


@dataclass(frozen=True)
class SliceSteps:
    """How a worker treats one slice, besides the model (sent along with every job).

    Attributes
    ----------
    tile, halo
        Tiling, as :class:`~napari_mobilesam.core.session.Session` takes it (``"auto"``: tiles of
        1024 pixels for slices whose longest side exceeds 1536; None: never).
    params : AutoParams or None
        Automatic-mode parameters of the grid mode (``worker_segment_auto``).
    mode : str
        Automatic mode (``worker_segment_auto``): ``"grid"``, ``"ais"`` or ``"apg"`` (resolved
        by :func:`model_plan`, never ``"auto"``).
    ais_params, apg_params
        Parameters of the AIS and APG modes (as ``segment_stack_auto`` takes them).
    normalize : str
        ``"none"``: jobs carry SAM's (H, W, 3) uint8 RGB. Otherwise jobs carry the raw slice
        (``SliceSource.raw``: (H, W) or (H, W, C), C <= 3) and the worker normalises it this way
        (``"microsam"``; ``"slice"`` where only the raw slice is read, in AIS/APG).
    """

    tile: Any = "auto"
    halo: int | None = None
    params: AutoParams | None = None
    mode: str = "grid"
    ais_params: Any = None
    apg_params: Any = None
    normalize: str = "none"


def _steps(options: Any) -> SliceSteps:
    """A ``SliceSteps`` from what a job carries (an ``AutoParams`` or None: untiled defaults)."""
    return options if isinstance(options, SliceSteps) else SliceSteps(params=options)


def spec_for_client(model, checkpoint, device, backend, precision) -> ModelChoice:
    """The model choice the workers load: a name (or choice) and a checkpoint path they can read."""
    if not isinstance(model, (str, ModelChoice)):
        raise ModelError(
            "with a dask client, give the model by name (model='vit_t') and the checkpoint as a "
            "file path the workers can read, so each worker can load it once"
        )
    return ModelChoice.of(model, checkpoint, device, backend, precision).portable()


# Per-process state on dask workers: the model, loaded once.
_WORKER_MODELS: dict[ModelChoice, Any] = {}
_WORKER_LOCK = threading.Lock()
WORKER_LOAD_COUNT = {"n": 0}


def _worker_model(spec: ModelChoice):
    with _WORKER_LOCK:
        sam = _WORKER_MODELS.get(spec)
        if sam is None:
            sam = spec.load()
            _WORKER_MODELS[spec] = sam
            WORKER_LOAD_COUNT["n"] += 1
        return sam


def _preload(spec: ModelChoice) -> str:
    _worker_model(spec)
    return str(os.getpid())


def preload_model_on_workers(
    client: Any,
    model: str = "vit_t",
    checkpoint: str | os.PathLike | None = None,
    device: Any = None,
    backend: str = "auto",
    precision: str = "auto",
) -> dict[str, str]:
    """Load the model on every worker of a ``dask.distributed`` client now (it stays loaded for
    later :func:`segment_stack` / :func:`segment_stack_auto` calls with the same model arguments).

    Returns ``{worker address: worker process id}``.
    """
    spec = spec_for_client(model, checkpoint, device, backend, precision)
    return client.run(_preload, spec)


def _worker_plan(spec: ModelChoice, mode: str) -> tuple[str, str]:
    """On a worker: (the model's normalisation, ``mode`` resolved for the model), as
    :func:`model_plan` returns them."""
    from ..core.session import normalization_for

    sam = _worker_model(spec)
    return normalization_for(sam), check_auto_mode(mode, sam)


def model_plan(client: Any, spec: ModelChoice, mode: str = "grid") -> tuple[str, str]:
    """What the model ``spec`` needs, asked of one worker (which loads it, as it would for the
    first job): ``(normalization, mode)``, the :class:`~napari_mobilesam.core.source.SliceSource`
    ``normalize`` a Session of the model uses (:func:`~napari_mobilesam.core.session.normalization_for`:
    ``"microsam"`` for micro-sam's models, else ``"stack"``) and the automatic ``mode`` resolved as
    locally (``"auto"``: ``"ais"`` when the model has a decoder, else ``"grid"``; ``"ais"``/``"apg"``
    without a decoder raise the local path's ModelError). The client has no model of its own."""
    return client.submit(_worker_plan, spec, mode, pure=False).result()


def slice_jobs(source: Any, zs, extras: Any = None, *, raw: bool = False):
    """``(SliceSteps.normalize, jobs)`` for :func:`map_on_cluster` over slices ``zs`` of ``source``
    (its ``normalize`` already resolved for the model): jobs carry the raw slice when the worker
    must normalise it (micro-sam's per-slice, per-tile minimum to maximum) or ``raw`` is asked
    (AIS/APG read the raw slice), else SAM's RGB as made here. ``extras``: ``{z: extra}``."""
    microsam = source.normalize == "microsam" and source.contrast_limits is None
    norm = "microsam" if microsam else ("slice" if raw else "none")
    extra = (lambda z: None) if extras is None else extras.__getitem__
    if norm == "none":
        return norm, ((z, source.rgb(z), extra(z)) for z in zs)
    return norm, ((z, source.raw(z), extra(z)) for z in zs)


def _one_slice_session(spec: ModelChoice, data: np.ndarray, steps: SliceSteps | None = None):
    """A Session over one slice with the worker's model (memory cache only), tiled as ``steps``
    says: ``data`` is (H, W, 3) uint8 RGB, or the raw slice normalised as ``steps.normalize``."""
    from ..core.session import Session
    from ..core.source import SliceSource

    steps = steps or SliceSteps()
    a = np.asarray(data)
    if steps.normalize == "none":
        source = SliceSource(a[None], rgb=True, normalize="none")
    else:
        source = SliceSource(a[None], channel_axis=-1 if a.ndim == 3 else None, normalize=steps.normalize)
    return Session(_worker_model(spec), source, cache_dir=None, tile=steps.tile, halo=steps.halo)


def worker_embed(z: int, rgb: np.ndarray, _unused, spec: ModelChoice, _params):
    """On a worker: ``(z, (1, 256, 64, 64) float16 features)`` of one RGB slice."""
    import torch

    from ..core.embeddings import compute_embedding

    emb = compute_embedding(_worker_model(spec), np.asarray(rgb))
    return z, emb.features.detach().to("cpu", torch.float16).numpy()


def worker_segment_auto(z: int, data: np.ndarray, _unused, spec: ModelChoice, steps: Any):
    """On a worker: ``(z, (H, W) labels)`` of automatic segmentation of one slice in
    ``steps.mode`` (grid, AIS or APG), by the local batch path's own per-slice step
    (:func:`~napari_mobilesam.batch.slices.slice_segmenter`: tile by tile when the slice is larger
    than ``steps.tile``). ``data`` as :func:`_one_slice_session` takes it; ``steps`` may be a bare
    ``AutoParams`` (grid mode)."""
    steps = _steps(steps)
    session = _one_slice_session(spec, data, steps)
    segment = slice_segmenter(session.predictor, session.source, steps.params, steps.ais_params,
                              steps.mode, steps.apg_params)
    return z, segment(0)


def worker_segment_prompts(z: int, data: np.ndarray, objects, spec: ModelChoice, steps: Any):
    """On a worker: ``(z, (H, W) labels)`` of the prompted ``objects`` on one slice (each prompt
    answered in its tile when the slice is larger than ``steps.tile``); ``data`` as
    :func:`_one_slice_session` takes it."""
    return z, segment_objects_on_slice(_one_slice_session(spec, data, _steps(steps)).predictor, 0, objects)


def prompt_tiles(predictor, objects: dict) -> list[int]:
    """Indices of the tiles holding the prompts of ``objects`` (``{object_id: {z: prompt}}``, as
    ``propagate`` takes them) on a ``TiledPredictor``: where the objects are followed through z."""
    from ..core.predictor import as_prompt
    from ..core.tiles import _prompt_center

    found: set[int] = set()
    for per_z in objects.values():
        for prompt in per_z.values():
            try:
                found.add(predictor.grid.tile_at(*_prompt_center(as_prompt(prompt))).index)
            except ValueError:  # no point and no box (InputError): nothing to place
                continue
    return sorted(found)


def embed_on_cluster(client, spec: ModelChoice, session, zr: range, progress, tiles=None) -> None:
    """Fill ``session.cache`` with the embeddings of slices ``zr``, computed on the workers.

    ``session`` is anything with ``source`` and ``cache`` (a ``Session`` or a predictor). For a
    ``TiledPredictor`` the tiles ``tiles`` (indices, e.g. :func:`prompt_tiles`; default: every
    tile) of each slice are embedded, each sent as its own (tile, tile, 3) RGB window.
    """
    cache = session.cache
    if hasattr(session, "grid"):  # tiled: one job per (slice, tile)
        indices = range(len(session.grid)) if tiles is None else tiles
        views = [session.tile_predictor(i).source for i in indices]
    else:
        views = [session.source]
    todo = [(z, k) for z in zr for k, view in enumerate(views) if not cache.is_cached(view, z)]
    # a bar when asked for one; a callable hears from the propagation only (one done/total scale)
    update, close = progress_callback(progress is True, len(todo), "embed (cluster)")
    try:
        jobs = ((n, views[k].rgb(z), None) for n, (z, k) in enumerate(todo))
        for n, feats in map_on_cluster(client, worker_embed, spec, None, jobs):
            z, k = todo[n]
            cache.put(views[k], z, feats)
            update()
    finally:
        close()


def map_on_cluster(client, func, spec, params, jobs, max_in_flight: int | None = None):
    """Run ``func(z, rgb, extra, spec, params)`` for each job ``(z, rgb, extra)`` on the cluster;
    yield ``(z, result)`` in the jobs' order, keeping at most ``max_in_flight`` slices submitted
    (default: two per worker)."""
    from distributed import as_completed

    if max_in_flight is None:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        max_in_flight = 2 * n_workers
    order: list[int] = []
    ready: dict[int, Any] = {}
    jobs = iter(jobs)
    ac = as_completed()
    in_flight = 0

    def submit_next() -> bool:
        nonlocal in_flight
        try:
            z, rgb, extra = next(jobs)
        except StopIteration:
            return False
        fut = client.submit(func, z, rgb, extra, spec, params, pure=False,
                            key=f"napari-mobilesam-{func.__name__}-{z}-{os.getpid()}-{id(ac)}")
        order.append(z)
        ac.add(fut)
        in_flight += 1
        return True

    for _ in range(max_in_flight):
        if not submit_next():
            break
    pos = 0
    try:
        for fut in ac:
            z, result = fut.result()
            fut.release()
            in_flight -= 1
            ready[z] = result
            while pos < len(order) and order[pos] in ready:
                zz = order[pos]
                yield zz, ready.pop(zz)
                pos += 1
            while in_flight + len(ready) < max_in_flight and submit_next():
                pass
    finally:
        for f in list(ac.futures):
            f.cancel()
