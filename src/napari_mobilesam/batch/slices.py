"""The steps the batch API and its dask workers are built from: one slice from prompts, label
dtypes, the labels output (memory or TIFF), propagation glue, progress.

Coordinates are napari's: prompts are (row, col) on a slice, labels (H, W) or (Z, H, W).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.predictor import Prompt, iter_predictions
from ..errors import InputError, PromptError
from ..io.prompts import Prompts
from ..io.stacks import LabelsTiffWriter, check_output_path, is_zarr_path
from ..volume.params import AutoParams

__all__ = ["segment_objects_on_slice", "prompt_dict", "labels_dtype", "check_ids_fit", "progress_callback",
           "LabelsOutput", "run_propagation", "objects_for_propagate", "AUTO_MODES", "check_auto_mode",
           "slice_segmenter", "image_data", "make_source", "auto_params"]

#: The largest object id a labels volume or TIFF holds (uint32 on disk).
MAX_LABEL_ID = int(np.iinfo(np.uint32).max)


def labels_dtype(max_id: int) -> np.dtype:
    """In-memory labels dtype: int32 (napari's) unless an id is 2**31 or more, then int64."""
    return np.dtype(np.int32 if int(max_id) <= np.iinfo(np.int32).max else np.int64)


def check_ids_fit(max_id: int, out_dtype: Any = np.uint32) -> None:
    """Raise PromptError when object id ``max_id`` cannot be stored (uint32, or ``out_dtype``)."""
    top = min(MAX_LABEL_ID, int(np.iinfo(np.dtype(out_dtype)).max))
    if int(max_id) > top:
        raise PromptError(
            f"object id {int(max_id)} is larger than {top}, the largest id a "
            f"{np.dtype(out_dtype) if top < MAX_LABEL_ID else 'uint32'} labels stack holds; renumber "
            "the objects (the object_id column of the prompts) with smaller ids"
            + (" or write uint32 labels (out_dtype=np.uint32)" if top < MAX_LABEL_ID else "")
        )


def prompt_dict(item: dict) -> Prompt:
    """A predictor prompt from a :meth:`~napari_mobilesam.io.prompts.Prompts.iter_objects` item
    (see :meth:`Prompt.from_clicks`: one lone point asks for SAM's three candidate masks)."""
    return Prompt.from_clicks(item["points"], item["labels"], item["box"])


def _box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box ``(rows, cols)`` of a 2D bool mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def segment_objects_on_slice(predictor, z: int, objects: list[tuple[int, dict]]) -> np.ndarray:
    """(H, W) labels (int32, int64 for ids of 2**31 and more): each object's best mask on slice
    ``z``, the higher predicted IoU winning shared pixels (the earlier object on a tie).
    ``objects``: ``[(object_id, item)]``.

    Each prediction is painted into the slice as it comes and dropped (`iter_predictions` with
    ``keep="best"``), so memory does not grow with the number of objects: one decoder chunk plus a
    float32 score and an int32 owner map of the slice; each mask is painted within its bounding
    box."""
    h, w = predictor.source.slice_shape
    out = np.zeros((h, w), labels_dtype(max((oid for oid, _ in objects), default=0)))
    score = np.full((h, w), -np.inf, np.float32)
    owner = np.full((h, w), len(objects), np.int32)
    prompts = [prompt_dict(item) for _, item in objects]
    for i, pred in iter_predictions(predictor, z, prompts, keep="best"):
        s = np.float32(pred.iou[0])  # the best of SAM's candidates (its only mask with several prompts)
        m = np.asarray(pred.masks[0], bool)
        box = _box(m)
        if box is None:
            continue
        sc, ow = score[box], owner[box]
        win = m[box] & ((s > sc) | ((s == sc) & (i < ow)))
        out[box][win], sc[win], ow[win] = objects[i][0], s, i
    return out


def progress_callback(progress: Any, total: int, desc: str):
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


class LabelsOutput:
    """Collect slices in memory ((Z, H, W) ``dtype`` array) or stream them to a compressed TIFF
    or, for an ``out`` ending in ``.zarr``, an OME-Zarr label image (which ``resume`` can continue
    after an interrupted run: :meth:`pending` says which slices are left)."""

    def __init__(self, shape, out, overwrite, metadata, out_dtype, *, inputs=(), dtype=np.int32,
                 resume=False):
        self.shape = tuple(shape)
        self.out = out
        self.zarr = out is not None and is_zarr_path(out)
        if resume and not self.zarr:
            raise InputError("resume works for OME-Zarr outputs (*.zarr), which record their finished "
                             "slices; a TIFF output is rewritten from the start")
        if out is None:
            self.array = np.zeros(self.shape, dtype)
            self.writer = None
        elif self.zarr:
            from ..io.omezarr_write import OmeZarrLabelsWriter

            self.array = None
            check_output_path(out, overwrite or resume, inputs=inputs)
            self.writer = OmeZarrLabelsWriter(out, self.shape, dtype=out_dtype, metadata=metadata,
                                              overwrite=overwrite, resume=resume)
        else:
            self.array = None
            check_output_path(out, overwrite, inputs=inputs)
            self.writer = LabelsTiffWriter(out, self.shape, dtype=out_dtype, metadata=metadata,
                                           overwrite=overwrite)
        self._z = 0

    def pending(self, zs):
        """The slices of ``zs`` still to do (all of them, except on a resumed OME-Zarr output)."""
        return list(zs) if not self.zarr else self.writer.pending(zs)

    def finished(self, z: int) -> np.ndarray | None:
        """Labels already written for slice ``z`` by an interrupted run (resumed OME-Zarr), or None."""
        if not self.zarr or z not in self.writer.done:
            return None
        return self.writer.read(z)

    def __enter__(self):
        if self.writer is not None:
            self.writer.__enter__()
        return self

    def put(self, z: int, sl: np.ndarray) -> None:
        """Slices must come in increasing z; skipped ones are zeros."""
        if self.writer is None:
            self.array[z] = sl
            return
        if self.zarr:
            self.writer.put(z, sl)
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


def run_propagation(predictor, objects, zr: range, progress, options: dict, propagate) -> np.ndarray:
    """``propagate(predictor, objects, ...)`` over ``zr`` with ``progress`` (None, True: a bar, or
    a callable(done, total)); returns the (Z, H, W) labels."""
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


def objects_for_propagate(prm: Prompts, zr: range) -> dict[int, dict[int, dict]]:
    """Prompts grouped per object, ``{object_id: {z: prompt dict}}``, as ``propagate`` takes them."""
    objs: dict[int, dict[int, dict]] = {}
    for oid, z, item in prm.iter_objects():
        if z not in zr:
            continue
        objs.setdefault(oid, {})[z] = prompt_dict(item)
    if not objs:
        raise PromptError(f"no prompts lie in z range {zr.start}:{zr.stop}")
    return objs


#: Automatic modes: "auto" is AIS for a model with an instance-segmentation decoder, else "grid".
AUTO_MODES = ("auto", "ais", "apg", "grid")


def check_auto_mode(mode: str, sam: Any = None) -> str:
    """``mode`` checked (InputError naming the choices); with ``sam``, "auto" resolved to "ais"
    or "grid", and "ais"/"apg" refused (ModelError naming the fix) when the model has no decoder."""
    if mode not in AUTO_MODES:
        raise InputError(f"automatic mode must be one of {', '.join(AUTO_MODES)}, got {mode!r}")
    if sam is None:
        return mode
    from ..models.registry import ais_decoder

    has_decoder = ais_decoder(sam) is not None
    if mode == "auto":
        return "ais" if has_decoder else "grid"
    if mode in ("ais", "apg") and not has_decoder:
        raise no_decoder_error(mode)
    return mode


def no_decoder_error(mode: str):
    """The ModelError for automatic ``mode`` ("ais" or "apg") asked of a model without a decoder."""
    from ..errors import ModelError

    return ModelError(
        f"automatic mode {mode!r} needs a model with an instance-segmentation decoder: choose a "
        "micro-sam model (model='vit_t_lm' or 'vit_t_em_organelles'; CLI --model vit_t_lm), or "
        "pass its decoder file (decoder=PATH; CLI --decoder PATH)"
    )


def slice_segmenter(predictor, source, params: Any, ais_params: Any, mode: str = "auto",
                    apg_params: Any = None):
    """``z -> (H, W)`` slice-local labels in automatic ``mode`` (see :data:`AUTO_MODES`): the
    model's AIS decoder ("ais"), prompts generated from its maps ("apg",
    :func:`~napari_mobilesam.volume.apg.segment_slice_apg`) or the prompt-based grid mode
    ("grid"); "auto" is AIS when the model has a decoder (micro-sam's models), else grid. Tile by
    tile on tiled slices."""
    from ..volume.automatic import segment_slice
    from ..volume.tiled import segment_slice_tiled

    tiled = hasattr(predictor, "grid")
    mode = check_auto_mode(mode, predictor.sam)
    if mode == "apg":
        from ..volume.apg import APGParams, segment_slice_apg

        apg = APGParams.of(apg_params)
        return lambda z: segment_slice_apg(predictor, z, apg)
    if mode == "ais":
        from ..volume.ais import segment_slice_ais
        from ..volume.instance import SliceWindows

        if not tiled:
            return lambda z: segment_slice_ais(predictor.sam, source.raw(z), ais_params)
        # read window by window: the block-wise post-processing (AISParams.tiling) never holds the slice
        return lambda z: segment_slice_ais(predictor.sam, SliceWindows(source, z), ais_params,
                                           grid=predictor.grid)
    if tiled:
        return lambda z: segment_slice_tiled(predictor, z, params)
    return lambda z: segment_slice(predictor, z, params).labels


# --------------------------------------------------------------------------- inputs and parameters


def image_data(image: Any) -> tuple[Any, dict]:
    """Array and SliceSource options from an array or an image layer (duck-typed: anything with
    ``data`` and ``rgb`` attributes that is not an array itself, e.g. a napari Image layer)."""
    if hasattr(image, "rgb") and hasattr(image, "data") and not hasattr(image, "__array__"):
        data = image.data
        if getattr(image, "multiscale", False):
            data = data[0]
        return data, {"rgb": bool(image.rgb)}
    return image, {}


def make_source(image: Any, channel_axis: int | None, normalize: str):
    from ..core.source import SliceSource

    if isinstance(image, SliceSource):
        return image
    data, opts = image_data(image)
    if channel_axis is not None:
        opts["channel_axis"] = channel_axis
    return SliceSource(data, normalize=normalize, **opts)


def auto_params(params: Any) -> AutoParams:
    """``params`` as AutoParams: None (defaults), an AutoParams, or a dict of its fields."""
    if params is None:
        return AutoParams()
    if isinstance(params, AutoParams):
        return params
    if isinstance(params, dict):
        try:
            return AutoParams(**params)
        except TypeError:
            known = sorted(AutoParams.__dataclass_fields__)
            unknown = sorted(set(params) - set(known))
            raise InputError(
                f"params has unknown setting(s) {unknown}; AutoParams settings are: {', '.join(known)}"
            ) from None
    raise InputError(
        f"params must be an AutoParams (or a dict of its settings), not {type(params).__name__}"
    )
