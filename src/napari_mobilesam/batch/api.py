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
from typing import Any

import numpy as np

from ..core.heap import release_freed_memory
from ..errors import InputError
from ..io.images import open_image

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
    open_stack,
    parse_z_range,
    read_stack_metadata,
)
from ..models.choice import ModelChoice
from ..volume.automatic import AutoParams, Stitcher
from .cluster import (
    SliceSteps,
    embed_on_cluster,
    map_on_cluster,
    model_plan,
    preload_model_on_workers,
    prompt_tiles,
    slice_jobs,
    spec_for_client,
    worker_segment_auto,
    worker_segment_prompts,
)
from .slices import (
    LabelsOutput,
    auto_params,
    check_auto_mode,
    check_ids_fit,
    labels_dtype,
    make_source,
    objects_for_propagate,
    progress_callback,
    run_propagation,
    segment_objects_on_slice,
    slice_segmenter,
)

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
    "open_image",
    "read_stack_metadata",
    "LabelsTiffWriter",
    "add_labels_layer",
    "parse_z_range",
    "preload_model_on_workers",
]

LABELS_DTYPE = np.int32  # in memory (napari's); int64 when an object id is 2**31 or more
# Batch runs visit each slice once: a small embedding cache is enough (one slice is 2 MiB).
DEFAULT_CACHE_BYTES = 64 * 2**20
MIN_AUTO_CACHE_BYTES = 4 * 2**20  # automatic mode decodes a slice in several calls

# =========================================================================== models and inputs


def _resolve_model(model: Any, checkpoint: Any = None, device: Any = None, backend: str = "auto",
                   precision: str = "auto"):
    """The ``Sam`` for the batch API's model arguments: ``model`` is a name or a
    :class:`~napari_mobilesam.models.choice.ModelChoice` (loaded here) or an already built ``Sam``."""
    if hasattr(model, "image_encoder") and hasattr(model, "mask_decoder"):
        return model
    if not isinstance(model, (str, ModelChoice)):
        raise TypeError(
            f"model must be a model name such as 'vit_t', a ModelChoice or a Sam model, "
            f"not {type(model).__name__}"
        )
    return ModelChoice.of(model, checkpoint, device, backend, precision).load()


def _make_predictor(model, checkpoint, device, backend, precision, source, cache_bytes, disk_dir=None,
                    tile: Any = "auto", halo: int | None = None):
    """The predictor of a :class:`~napari_mobilesam.core.session.Session` (the one wiring place)
    over ``source``, with an embedding cache of ``cache_bytes`` (and ``disk_dir``, unbounded);
    a ``TiledPredictor`` when the slices are larger than ``tile``."""
    from ..core.session import Session

    sam = _resolve_model(model, checkpoint, device, backend, precision)
    session = Session(sam, source, cache_dir=disk_dir, cache_bytes=int(cache_bytes), max_disk_bytes=None,
                      tile=tile, halo=halo)
    return session.predictor


def _input_paths(image: Any, metadata: StackMetadata | None) -> list:
    """Files the image was read from (an output may never replace them)."""
    paths = [getattr(metadata, "path", None), getattr(image, "filename", None)]
    return [p for p in paths if isinstance(p, (str, os.PathLike))]


# =========================================================================== outputs


def _finish(result, viewer, name, image, metadata):
    release_freed_memory()  # the run's freed tensors back to the system (core.heap)
    if viewer is not None:
        add_labels_layer(viewer, result, name=name, image=image, metadata=metadata)
    return result


def _checked_prompts(prompts: Any, source, out_dtype, out) -> Prompts:
    """The prompts as Prompts, checked against the stack and the output's id range."""
    prm = _as_prompts(prompts)
    prm.validate((source.n_slices, *source.slice_shape))
    ids = prm.object_ids
    check_ids_fit(int(ids.max()) if ids.size else 0, out_dtype if out is not None else np.uint32)
    return prm

# =========================================================================== segment from prompts


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
    normalize: str = "auto",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    metadata: StackMetadata | None = None,
    out_dtype: Any = np.uint32,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Any = None,
    client: Any = None,
    viewer: Any = None,
    name: str = "mobilesam labels",
    tile: Any = "auto",
    halo: int | None = None,
    resume: bool = False,
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
    tile, halo : int, "auto" or None; int
        Slices larger than ``tile`` pixels are cut into overlapping tiles seen at full resolution
        (see :class:`~napari_mobilesam.core.session.Session`; default "auto": tiles of 1024 for
        slices over 1536 pixels), here and on the workers of a dask ``client`` alike.
    resume : bool
        Continue an OME-Zarr ``out`` (``*.zarr``) left unfinished by an interrupted run: slices it
        finished are kept, the others are done now. (A TIFF output is always rewritten whole.)

    Returns
    -------
    (Z, H, W) int32 labels (0 background, object ids elsewhere), or the output Path when ``out``
    is given. A 2D image gives (1, H, W).
    """
    source = make_source(image, channel_axis, normalize)
    shape = (source.n_slices, *source.slice_shape)
    prm = _checked_prompts(prompts, source, out_dtype, out)
    zs = [z for z in parse_z_range(z_range, shape[0]) if z in set(prm.slices.tolist())]
    if not zs:
        raise PromptsError(f"no prompts lie in z range {z_range!r}")
    by_slice = {z: prm.on_slice(z) for z in zs}
    dtype = labels_dtype(int(prm.object_ids.max()))
    with LabelsOutput(shape, out, overwrite, metadata, out_dtype, dtype=dtype, resume=resume,
                      inputs=_input_paths(image, metadata)) as output:
        zs = output.pending(zs)
        update, close = progress_callback(progress, len(zs), "segment")
        try:
            if client is not None:
                spec = spec_for_client(model, checkpoint, device, backend, precision)
                source.resolve_normalize(model_plan(client, spec)[0])  # as a local Session does
                norm, jobs = slice_jobs(source, zs, by_slice)
                steps = SliceSteps(tile=tile, halo=halo, normalize=norm)
                for z, sl in map_on_cluster(client, worker_segment_prompts, spec, steps, jobs):
                    output.put(z, sl)
                    update()
            else:
                predictor = _make_predictor(model, checkpoint, device, backend, precision, source,
                                            cache_bytes, tile=tile, halo=halo)
                for z in zs:
                    output.put(z, segment_objects_on_slice(predictor, z, by_slice[z]))
                    update()
        finally:
            close()
    return _finish(output.result(), viewer, name, image, metadata)


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
    normalize: str = "auto",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    metadata: StackMetadata | None = None,
    out_dtype: Any = np.uint32,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Any = None,
    viewer: Any = None,
    name: str = "mobilesam labels",
    client: Any = None,
    tile: Any = "auto",
    halo: int | None = None,
    **propagate_options: Any,
):
    """Segment prompted objects and follow each one through z (see ``propagate.propagate``).

    Parameters are those of :func:`segment_stack` (without ``resume``); ``z_range`` limits how far
    objects are followed, and further keyword arguments go to ``propagate.propagate`` (stop rules).
    With ``client`` on tiled slices, the workers embed the tiles holding the prompts on every
    slice; tiles an object runs into beyond them are embedded here when needed.

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

    source = make_source(image, channel_axis, normalize)
    shape = (source.n_slices, *source.slice_shape)
    prm = _checked_prompts(prompts, source, out_dtype, out)
    zr = parse_z_range(z_range, shape[0])
    objects = objects_for_propagate(prm, zr)
    spec = None if client is None else spec_for_client(model, checkpoint, device, backend, precision)
    if progress not in (None, False, True) and not callable(progress):
        raise TypeError("progress must be None, True (a progress bar) or a callable(done, total)")
    folder = (
        contextlib.nullcontext(None) if client is None
        else tempfile.TemporaryDirectory(prefix="napari-mobilesam-embeddings-")
    )
    dtype = labels_dtype(max(objects))
    # the output (and its lock) first: a second run on the same file stops before any work
    with LabelsOutput(shape, out, overwrite, metadata, out_dtype, dtype=dtype,
                 inputs=_input_paths(image, metadata)) as output, folder as tmp:
        predictor = _make_predictor(
            model, checkpoint, device, backend, precision, source, cache_bytes, disk_dir=tmp,
            tile=tile, halo=halo,
        )
        if client is not None:  # tiled: the tiles holding the prompts, on every slice
            tiles = prompt_tiles(predictor, objects) if hasattr(predictor, "grid") else None
            embed_on_cluster(client, spec, predictor, zr, progress, tiles=tiles)
        labels = run_propagation(predictor, objects, zr, progress, propagate_options, propagate)
        for z in range(shape[0]):
            output.put(z, labels[z].astype(dtype, copy=False))
    return _finish(output.result(), viewer, name, image, metadata)


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
    normalize: str = "auto",
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
    tile: Any = "auto",
    halo: int | None = None,
    resume: bool = False,
    mode: str = "auto",
    apg_params: Any = None,
):
    """Automatic instance segmentation of a stack, each object keeping one id through z.

    ``mode`` chooses how a slice is segmented:

    - ``"ais"``: the model's AIS decoder (micro-sam's ``vit_t_lm``, ...; parameters ``ais_params``,
      an ``AISParams``; :func:`napari_mobilesam.volume.ais.segment_slice_ais`);
    - ``"apg"``: prompts generated from that decoder's maps, decoded by SAM (parameters
      ``apg_params``, an ``APGParams`` or dict; :func:`napari_mobilesam.volume.apg.segment_slice_apg`);
    - ``"grid"``: the prompt-based mode of any model: candidate prompts from the image, batched
      decoding, filtering, NMS (:mod:`napari_mobilesam.volume.automatic`; parameters ``params``);
    - ``"auto"`` (default): ``"ais"`` when the model has a decoder, else ``"grid"``.

    "ais" and "apg" need a model with a decoder (a ``ModelError`` says how to get one). Every
    mode runs on a dask cluster too, giving the local labels: each worker loads the model with
    its decoder and segments whole slices; the slices are stitched here. Labels are stitched
    slice to slice by optimal IoU matching. Slices outside ``z_range`` stay 0.

    Parameters are those of :func:`segment_stack` (without prompts), plus ``params``
    (:class:`~napari_mobilesam.volume.automatic.AutoParams`). With ``client`` (a
    ``dask.distributed.Client``) slices are segmented on the cluster's workers (each loads the
    model once, with its decoder; ``model`` must be a name or a ``ModelChoice``, with
    ``checkpoint`` and decoder as paths) and stitched here in z order,
    with a bounded number of slices in flight.

    ``tile``/``halo``/``resume`` as in :func:`segment_stack`: large slices are segmented tile by
    tile (each object kept by the tile holding its centre); a resumed OME-Zarr output keeps the
    slices it has and stitches the new ones to them.

    Returns
    -------
    (Z, H, W) int32 labels (ids 1..N in order of first appearance through z), or the output Path
    when ``out`` is given.
    """
    from ..volume.apg import APGParams

    params, apg_params = auto_params(params), APGParams.of(apg_params)
    check_auto_mode(mode)
    source = make_source(image, channel_axis, normalize)
    shape = (source.n_slices, *source.slice_shape)
    zs = list(parse_z_range(z_range, shape[0]))
    stitcher = Stitcher(params.stitch_iou, params.stitch_overlap, params.stitch_gap, params.stitch_regrow)
    with LabelsOutput(shape, out, overwrite, metadata, out_dtype, resume=resume,
                      inputs=_input_paths(image, metadata)) as output:
        todo = output.pending(zs)
        update, close = progress_callback(progress, len(todo), "auto")
        try:
            if client is not None:
                if len(todo) < len(zs):
                    raise InputError("resuming an automatic run works without a dask client; rerun "
                                     "without --dask-workers/--scheduler")
                spec = spec_for_client(model, checkpoint, device, backend, precision)
                norm, mode = model_plan(client, spec, mode)
                source.resolve_normalize(norm)  # as a local Session does
                norm, jobs = slice_jobs(source, zs, raw=mode in ("ais", "apg"))
                steps = SliceSteps(tile=tile, halo=halo, params=params, mode=mode, normalize=norm,
                                   ais_params=ais_params, apg_params=apg_params)
                for z, local in map_on_cluster(client, worker_segment_auto, spec, steps, jobs):
                    output.put(z, stitcher.add(local))
                    update()
            else:
                predictor = _make_predictor(model, checkpoint, device, backend, precision, source,
                                            max(int(cache_bytes), MIN_AUTO_CACHE_BYTES), tile=tile,
                                            halo=halo)
                segment_one = slice_segmenter(predictor, source, params, ais_params, mode, apg_params)
                for z in zs:  # in z order: the stitcher matches each slice to the one before
                    done = output.finished(z)
                    if done is not None:
                        stitcher.add_stitched(done)
                        continue
                    output.put(z, stitcher.add(segment_one(z), inplace=True))
                    update()
        finally:
            close()
    return _finish(output.result(), viewer, name, image, metadata)


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
    if image is not None and hasattr(image, "rgb") and hasattr(image, "scale"):  # an image layer
        if labels.ndim == 3 and labels.shape[0] == 1 and (image.ndim - int(image.rgb)) == 2:
            labels = labels[0]
        kwargs["scale"] = tuple(image.scale)[-labels.ndim:]
        kwargs["translate"] = tuple(image.translate)[-labels.ndim:]
    elif metadata is not None and metadata.scale is not None and labels.ndim == 3:
        kwargs["scale"] = metadata.scale
    if labels.dtype.kind == "u" and labels.dtype.itemsize >= 4:
        labels = labels.astype(np.int64 if labels.max(initial=0) > np.iinfo(np.int32).max else np.int32)
    return viewer.add_labels(labels, **kwargs)
