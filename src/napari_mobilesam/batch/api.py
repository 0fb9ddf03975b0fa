"""Whole stacks from scripts: prompts files, segmentation, propagation, automatic mode, dask.

Everything here works without napari (a viewer is optional: pass ``viewer=`` and the result is
added as a Labels layer). Coordinates are napari's: stacks are (z, row, col), points are
(z, row, col), boxes are (z, row0, col0, row1, col1).

Main entry points
-----------------
- :func:`read_prompts_csv`, :func:`prompts_from_points`, :func:`prompts_from_shapes`,
  :func:`prompts_from_arrays` -> :class:`Prompts`
- :func:`segment_stack` — each object on the slices where it has prompts.
- :func:`propagate_stack` — objects prompted on some slices, followed through z.
- :func:`segment_stack_auto` — automatic instance segmentation, stitched through z.
- :func:`open_stack` / :func:`read_stack_metadata` / :func:`LabelsTiffWriter` — TIFF in and out,
  lazily (one page at a time), keeping the resolution metadata.

Stacks larger than memory: give a dask array (or a lazily opened TIFF from :func:`open_stack`) and
``out="labels.tif"``: slices are read, segmented and written one at a time, so memory is bounded by
the embedding cache budget (``cache_bytes``) rather than by the stack. With ``client=`` (a
``dask.distributed.Client``) slices are spread over the cluster's workers; each worker loads the
model once and keeps it for every later slice.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from typing import Any

import numpy as np

from ..errors import ModelError

# The prompts readers and the stack I/O are part of the batch API (re-exported here).
from ..io.prompts import (
    Prompts,
    PromptsError,
    _as_prompts,
    prompts_from_arrays,
    prompts_from_points,
    prompts_from_shapes,
    read_prompts_csv,
)
from ..io.stacks import (
    BatchError,
    LabelsTiffWriter,
    StackMetadata,
    check_output_path,
    open_stack,
    parse_z_range,
    read_stack_metadata,
)
from ..models.choice import ModelChoice
from ..volume.automatic import AutoParams, Stitcher, segment_slice

__all__ = [
    "Prompts",
    "PromptsError",
    "StackMetadata",
    "BatchError",
    "read_prompts_csv",
    "prompts_from_points",
    "prompts_from_shapes",
    "prompts_from_arrays",
    "segment_stack",
    "propagate_stack",
    "segment_stack_auto",
    "open_stack",
    "read_stack_metadata",
    "LabelsTiffWriter",
    "add_labels_layer",
    "parse_z_range",
    "preload_model_on_workers",
]

LABELS_DTYPE = np.int32
# Batch runs visit each slice once: a small embedding cache is enough (one slice is 2 MiB).
DEFAULT_CACHE_BYTES = 64 * 2**20
MIN_AUTO_CACHE_BYTES = 4 * 2**20  # automatic mode decodes a slice in several calls

# =========================================================================== models


def _resolve_model(model: Any, checkpoint: Any = None, device: Any = None, backend: str = "auto",
                   precision: str = "auto"):
    """The ``Sam`` for the batch API's model arguments: ``model`` is a name or a
    :class:`~napari_mobilesam.models.choice.ModelChoice` (loaded here) or an already built ``Sam``."""
    if hasattr(model, "image_encoder") and hasattr(model, "mask_decoder"):
        return model
    return ModelChoice.of(model, checkpoint, device, backend, precision).load()


def _image_data(image: Any) -> tuple[Any, dict]:
    """Array and SliceSource options from an array or a napari Image layer (duck-typed)."""
    if type(image).__name__ == "Image" and hasattr(image, "data"):
        data = image.data
        if getattr(image, "multiscale", False):
            data = data[0]
        return data, {"rgb": bool(getattr(image, "rgb", False))}
    return image, {}


def _make_source(image: Any, channel_axis: int | None, normalize: str):
    from ..core.source import SliceSource

    if isinstance(image, SliceSource):
        return image
    data, opts = _image_data(image)
    if channel_axis is not None:
        opts["channel_axis"] = channel_axis
    return SliceSource(data, normalize=normalize, **opts)


# =========================================================================== progress


def _progress_callback(progress: Any, total: int, desc: str):
    """Return (update(n=1), close()) for ``progress``: None, True (tqdm bar) or a callable."""
    if progress is None or progress is False:
        return (lambda n=1: None), (lambda: None)
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="slice")
        return bar.update, bar.close
    if callable(progress):
        done = [0]

        def update(n=1):
            done[0] += n
            progress(done[0], total)

        return update, (lambda: None)
    raise TypeError("progress must be None, True (a progress bar) or a callable(done, total)")


# =========================================================================== outputs


class _Output:
    """Collect slices in memory or stream them to a TIFF file."""

    def __init__(self, shape, out, overwrite, metadata, dtype):
        self.shape = tuple(shape)
        self.out = out
        if out is None:
            self.array = np.zeros(self.shape, LABELS_DTYPE)
            self.writer = None
        else:
            self.array = None
            self.writer = LabelsTiffWriter(out, self.shape, dtype=dtype, metadata=metadata,
                                           overwrite=overwrite)
        self._z = 0

    def __enter__(self):
        if self.writer is not None:
            self.writer.__enter__()
        return self

    def put(self, z: int, sl: np.ndarray) -> None:
        """Slices must come in increasing z; skipped ones are zeros."""
        if self.writer is None:
            self.array[z] = sl
            return
        while self._z < z:
            self.writer.write(np.zeros(self.shape[1:], np.int32))
            self._z += 1
        self.writer.write(sl)
        self._z = z + 1

    def __exit__(self, exc_type, exc, tb):
        if self.writer is not None:
            self.writer.__exit__(exc_type, exc, tb)

    def result(self):
        return self.array if self.writer is None else self.writer.path


def _finish(result, viewer, name, image, metadata):
    if viewer is not None:
        add_labels_layer(viewer, result, name=name, image=image, metadata=metadata)
    return result


# =========================================================================== segment from prompts


def _segment_objects_on_slice(predictor, z: int, objects: list[tuple[int, dict]]) -> np.ndarray:
    """(H, W) int32: each object's best mask on slice ``z``, the higher predicted IoU winning
    shared pixels."""
    # One click is ambiguous: take the best of SAM's three masks; more prompts: its single mask.
    prompts = [_prompt_dict(item) for _, item in objects]
    preds = predictor.predict_many(z, prompts)
    h, w = predictor.source.slice_shape
    masks, scores = [], []
    for pred in preds:
        iou = np.asarray(pred.iou, float).reshape(-1)
        k = int(np.argmax(iou))
        masks.append(np.asarray(pred.masks[k], bool))
        scores.append(iou[k])
    out = np.zeros((h, w), np.int32)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        out[masks[i] & (out == 0)] = objects[i][0]
    return out


def segment_stack(
    image: Any,
    prompts: Any,
    *,
    model: Any = "vit_t",
    checkpoint: Any = None,
    device: Any = None,
    backend: str = "auto",
    precision: str = "auto",
    z_range: Any = None,
    channel_axis: int | None = None,
    normalize: str = "stack",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    metadata: StackMetadata | None = None,
    out_dtype: Any = np.uint32,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Any = None,
    client: Any = None,
    viewer: Any = None,
    name: str = "mobilesam labels",
):
    """Segment each prompted object on each slice where it has prompts.

    Parameters
    ----------
    image : (Z, H, W) or (H, W) array (numpy, dask, zarr), napari Image layer, or SliceSource
        Any dtype; multichannel stacks need ``channel_axis``.
    prompts : Prompts, CSV path, napari Points/Shapes layer, or (N, 3) (z, row, col) array
        Points in (z, row, col), boxes in (z, row0, col0, row1, col1). The same object id on
        several slices is the same object (one label id).
    model : str or Sam
        A registry name (``"vit_t"``, ``"vit_t_test"``, ...) loaded with ``checkpoint``,
        ``device``, ``backend`` and ``precision`` (see ``build.load_model``), or a built model.
    z_range : (start, stop) or "start:stop", optional
        Only prompts on these slices are used (half-open, like ``range``).
    out : path, optional
        Stream the labels into this compressed TIFF instead of returning an array.
    overwrite : bool
        Allow replacing an existing ``out``.
    metadata : StackMetadata, optional
        Resolution metadata written to ``out`` (see :func:`open_stack`).
    cache_bytes : int
        Embedding cache budget in bytes (default 64 MiB; bounds the memory of a run; automatic
        mode keeps at least 4 MiB, since it decodes each slice in several calls).
    progress : None, True (a tqdm bar on stderr) or callable(done, total)
    client : dask.distributed.Client, optional
        Spread the prompted slices over the cluster (``model`` must then be a name).
    viewer : napari.Viewer, optional
        Add the result as a Labels layer named ``name``.

    Returns
    -------
    (Z, H, W) int32 labels (0 background, object ids elsewhere), or the output Path when ``out``
    is given. A 2D image gives (1, H, W).
    """
    prm = _as_prompts(prompts)
    source = _make_source(image, channel_axis, normalize)
    shape = (source.n_slices, *source.slice_shape)
    prm.validate(shape)
    zs = [z for z in parse_z_range(z_range, shape[0]) if z in set(prm.slices.tolist())]
    if not zs:
        raise PromptsError(f"no prompts lie in z range {z_range!r}")
    if out is not None:
        check_output_path(out, overwrite)
    by_slice = {z: prm.on_slice(z) for z in zs}
    update, close = _progress_callback(progress, len(zs), "segment")
    try:
        with _Output(shape, out, overwrite, metadata, out_dtype) as output:
            if client is not None:
                spec = _spec_for_client(model, checkpoint, device, backend, precision)
                jobs = ((z, source.rgb(z), by_slice[z]) for z in zs)
                for z, sl in _map_on_cluster(client, _worker_segment_prompts, spec, None, jobs):
                    output.put(z, sl)
                    update()
            else:
                predictor = _make_predictor(model, checkpoint, device, backend, precision, source,
                                            cache_bytes)
                for z in zs:
                    output.put(z, _segment_objects_on_slice(predictor, z, by_slice[z]))
                    update()
    finally:
        close()
    return _finish(output.result(), viewer, name, image, metadata)


def _make_predictor(model, checkpoint, device, backend, precision, source, cache_bytes, disk_dir=None):
    from ..core.embeddings import EmbeddingCache
    from ..core.predictor import SlicePredictor

    sam = _resolve_model(model, checkpoint, device, backend, precision)
    cache = EmbeddingCache(sam, max_bytes=int(cache_bytes), disk_dir=disk_dir, max_disk_bytes=None)
    return SlicePredictor(sam, source, cache)


# =========================================================================== propagation


def propagate_stack(
    image: Any,
    prompts: Any,
    *,
    model: Any = "vit_t",
    checkpoint: Any = None,
    device: Any = None,
    backend: str = "auto",
    precision: str = "auto",
    z_range: Any = None,
    channel_axis: int | None = None,
    normalize: str = "stack",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    metadata: StackMetadata | None = None,
    out_dtype: Any = np.uint32,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Any = None,
    viewer: Any = None,
    name: str = "mobilesam labels",
    client: Any = None,
    **propagate_options: Any,
):
    """Segment prompted objects and follow each one through z (see ``propagate.propagate``).

    Parameters are those of :func:`segment_stack`; ``z_range`` limits how far objects are
    followed, and further keyword arguments go to ``propagate.propagate`` (stop rules).

    Following an object is sequential through z, but most of its cost is the image encoder. With
    ``client`` (a ``dask.distributed.Client``) the embeddings of every slice in ``z_range`` are
    computed on the cluster's workers first (in parallel; each worker loads the model once) and
    kept in a temporary on-disk cache (2 MiB a slice, removed at the end); then this process
    follows the objects, running only the prompt decoder.

    Returns
    -------
    (Z, H, W) int32 labels with the prompts' object ids, or the output Path when ``out`` is given.
    """
    from ..volume.propagation import propagate

    prm = _as_prompts(prompts)
    source = _make_source(image, channel_axis, normalize)
    shape = (source.n_slices, *source.slice_shape)
    prm.validate(shape)
    zr = parse_z_range(z_range, shape[0])
    if out is not None:
        check_output_path(out, overwrite)
    objects = _objects_for_propagate(prm, zr)
    spec = None if client is None else _spec_for_client(model, checkpoint, device, backend, precision)
    if progress not in (None, False, True) and not callable(progress):
        raise TypeError("progress must be None, True (a progress bar) or a callable(done, total)")
    folder = (
        contextlib.nullcontext(None) if client is None
        else tempfile.TemporaryDirectory(prefix="napari-mobilesam-embeddings-")
    )
    with folder as tmp:
        predictor = _make_predictor(
            model, checkpoint, device, backend, precision, source, cache_bytes, disk_dir=tmp
        )
        if client is not None:
            _embed_on_cluster(client, spec, predictor, zr, progress)
        labels = _run_propagation(predictor, objects, zr, progress, propagate_options, propagate)
    if out is None:
        return _finish(labels.astype(LABELS_DTYPE, copy=False), viewer, name, image, metadata)
    with _Output(shape, out, overwrite, metadata, out_dtype) as output:
        for z in range(shape[0]):
            output.put(z, labels[z])
    return _finish(output.result(), viewer, name, image, metadata)


def _worker_embed(z: int, rgb: np.ndarray, _unused, spec: ModelChoice, _params):
    import torch

    from ..core.embeddings import compute_embedding

    emb = compute_embedding(_worker_model(spec), np.asarray(rgb))
    return z, emb.features.detach().to("cpu", torch.float16).numpy()


def _embed_on_cluster(client, spec: ModelChoice, predictor, zr: range, progress) -> None:
    """Fill ``predictor.cache`` with the embeddings of slices ``zr``, computed on the workers."""
    source, cache = predictor.source, predictor.cache
    todo = [z for z in zr if not cache.is_cached(source, z)]
    # a bar when asked for one; a callable hears from the propagation only (one done/total scale)
    update, close = _progress_callback(progress is True, len(todo), "embed (cluster)")
    try:
        jobs = ((z, source.rgb(z), None) for z in todo)
        for z, feats in _map_on_cluster(client, _worker_embed, spec, None, jobs):
            cache.put(source, z, feats)
            update()
    finally:
        close()


def _run_propagation(predictor, objects, zr: range, progress, options: dict, propagate) -> np.ndarray:
    kwargs = dict(options)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(zr) * len(objects), desc="propagate", unit="slice")

        def _bar(done, total):
            bar.total = max(int(total), int(done))
            bar.n = int(done)
            bar.refresh()

        kwargs.setdefault("progress", _bar)
    elif callable(progress):
        kwargs.setdefault("progress", progress)
    try:
        result = propagate(predictor, objects, z_range=(zr.start, zr.stop), **kwargs)
    finally:
        if bar is not None:
            bar.close()
    return np.asarray(result.labels)


def _objects_for_propagate(prm: Prompts, zr: range) -> dict[int, dict[int, dict]]:
    """Prompts grouped per object, ``{object_id: {z: prompt dict}}``, as ``propagate`` takes them."""
    objs: dict[int, dict[int, dict]] = {}
    for oid, z, item in prm.iter_objects():
        if z not in zr:
            continue
        objs.setdefault(oid, {})[z] = _prompt_dict(item)
    if not objs:
        raise PromptsError(f"no prompts lie in z range {zr.start}:{zr.stop}")
    return objs


def _prompt_dict(item: dict, multimask: bool | None = None) -> dict:
    """A predictor prompt from an :meth:`Prompts.iter_objects` item (no empty point arrays)."""
    has_pts = len(item["points"]) > 0
    if multimask is None:
        multimask = item["box"] is None and len(item["points"]) == 1
    return {
        "points": item["points"] if has_pts else None,
        "labels": item["labels"] if has_pts else None,
        "box": item["box"],
        "multimask": multimask,
    }


# =========================================================================== automatic


def segment_stack_auto(
    image: Any,
    *,
    model: Any = "vit_t",
    checkpoint: Any = None,
    device: Any = None,
    backend: str = "auto",
    precision: str = "auto",
    params: AutoParams | None = None,
    z_range: Any = None,
    channel_axis: int | None = None,
    normalize: str = "stack",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    metadata: StackMetadata | None = None,
    out_dtype: Any = np.uint32,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Any = None,
    client: Any = None,
    viewer: Any = None,
    name: str = "mobilesam auto",
    ais_params: Any = None,
):
    """Automatic instance segmentation of a stack, each object keeping one id through z.

    Models with an AIS decoder (micro-sam's ``vit_t_lm``, ...) segment each slice with it
    (:func:`napari_mobilesam.volume.instance.segment_slice_ais`, parameters ``ais_params``, an
    ``AISParams``) when run locally; otherwise, and on a dask cluster, the prompt-based mode below.

    Each slice: candidate prompts from the image, batched decoding, filtering, NMS (see
    :mod:`napari_mobilesam.volume.automatic`); then labels are stitched slice to slice by optimal IoU
    matching. Slices outside ``z_range`` stay 0.

    Parameters are those of :func:`segment_stack` (without prompts), plus ``params``
    (:class:`~napari_mobilesam.volume.automatic.AutoParams`). With ``client`` (a
    ``dask.distributed.Client``) slices are segmented on the cluster's workers (each loads the
    model once; ``model`` must be a name and ``checkpoint`` a path) and stitched here in z order,
    with a bounded number of slices in flight.

    Returns
    -------
    (Z, H, W) int32 labels (ids 1..N in order of first appearance through z), or the output Path
    when ``out`` is given.
    """
    params = params or AutoParams()
    source = _make_source(image, channel_axis, normalize)
    shape = (source.n_slices, *source.slice_shape)
    zs = list(parse_z_range(z_range, shape[0]))
    if out is not None:
        check_output_path(out, overwrite)
    stitcher = Stitcher(params.stitch_iou, params.stitch_overlap, params.stitch_gap)
    update, close = _progress_callback(progress, len(zs), "auto")
    try:
        with _Output(shape, out, overwrite, metadata, out_dtype) as output:
            if client is not None:
                spec = _spec_for_client(model, checkpoint, device, backend, precision)
                jobs = ((z, source.rgb(z), None) for z in zs)
                for z, local in _map_on_cluster(client, _worker_segment_auto, spec, params, jobs):
                    output.put(z, stitcher.add(local))
                    update()
            else:
                predictor = _make_predictor(model, checkpoint, device, backend, precision, source,
                                            max(int(cache_bytes), MIN_AUTO_CACHE_BYTES))
                from ..models.registry import ais_decoder

                use_ais = ais_decoder(predictor.sam) is not None  # micro-sam models: their decoder
                for z in zs:
                    if use_ais:
                        from ..volume.instance import segment_slice_ais

                        local = segment_slice_ais(predictor.sam, source.raw(z), ais_params)
                    else:
                        local = segment_slice(predictor, z, params).labels
                    output.put(z, stitcher.add(local))
                    update()
    finally:
        close()
    return _finish(output.result(), viewer, name, image, metadata)


# =========================================================================== dask.distributed


def _spec_for_client(model, checkpoint, device, backend, precision) -> ModelChoice:
    if not isinstance(model, (str, ModelChoice)):
        raise ModelError(
            "with a dask client, give the model by name (model='vit_t') and the checkpoint as a "
            "file path the workers can read, so each worker can load it once"
        )
    return ModelChoice.of(model, checkpoint, device, backend, precision).portable()


# Per-process state on dask workers: the model and its predictor machinery, loaded once.
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
    spec = _spec_for_client(model, checkpoint, device, backend, precision)
    return client.run(_preload, spec)


def _one_slice_predictor(spec: ModelChoice, rgb: np.ndarray):
    from ..core.predictor import SlicePredictor
    from ..core.source import SliceSource

    sam = _worker_model(spec)
    source = SliceSource(np.asarray(rgb)[None], rgb=True, normalize="none")
    return SlicePredictor(sam, source, None)


def _worker_segment_auto(z: int, rgb: np.ndarray, _unused, spec: ModelChoice, params: AutoParams):
    predictor = _one_slice_predictor(spec, rgb)
    return z, segment_slice(predictor, 0, params).labels


def _worker_segment_prompts(z: int, rgb: np.ndarray, objects, spec: ModelChoice, _params):
    predictor = _one_slice_predictor(spec, rgb)
    return z, _segment_objects_on_slice(predictor, 0, objects)


def _map_on_cluster(client, func, spec, params, jobs, max_in_flight: int | None = None):
    """Run ``func(z, rgb, extra, spec, params)`` for each job on the cluster; yield ``(z, labels)``
    in the jobs' order, keeping at most ``max_in_flight`` slices submitted at once."""
    from distributed import as_completed

    if max_in_flight is None:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        max_in_flight = 2 * n_workers
    order: list[int] = []
    ready: dict[int, np.ndarray] = {}
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
            z, labels = fut.result()
            fut.release()
            in_flight -= 1
            ready[z] = labels
            while pos < len(order) and order[pos] in ready:
                zz = order[pos]
                yield zz, ready.pop(zz)
                pos += 1
            while in_flight + len(ready) < max_in_flight and submit_next():
                pass
    finally:
        for f in list(ac.futures):
            f.cancel()


# =========================================================================== napari helper


def add_labels_layer(
    viewer: Any,
    labels: Any,
    *,
    name: str = "mobilesam labels",
    image: Any = None,
    metadata: StackMetadata | None = None,
):
    """Add ``labels`` ((Z, H, W) or (H, W) integer array, or a TIFF path) to ``viewer`` as a Labels
    layer aligned with ``image`` (a napari Image layer: its scale and translate are copied; for a
    2D image a (1, H, W) result is squeezed) or with ``metadata``'s voxel size. Returns the layer."""
    if isinstance(labels, (str, os.PathLike)):
        import tifffile

        labels = tifffile.imread(labels)
    labels = np.asarray(labels)
    kwargs: dict[str, Any] = {"name": name}
    if image is not None and type(image).__name__ == "Image":
        if labels.ndim == 3 and labels.shape[0] == 1 and (image.ndim - int(image.rgb)) == 2:
            labels = labels[0]
        kwargs["scale"] = tuple(image.scale)[-labels.ndim:]
        kwargs["translate"] = tuple(image.translate)[-labels.ndim:]
    elif metadata is not None and metadata.scale is not None and labels.ndim == 3:
        kwargs["scale"] = metadata.scale
    if labels.dtype.kind == "u" and labels.dtype.itemsize >= 4:
        labels = labels.astype(np.int64 if labels.max(initial=0) > np.iinfo(np.int32).max else np.int32)
    return viewer.add_labels(labels, **kwargs)
