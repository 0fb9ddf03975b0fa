"""Any microscopy stack in, per-slice uint8 RGB out: the image side of the engine.

`SliceSource` wraps a 2D image, a 3D stack (Z, Y, X) -- a time-lapse (T, Y, X) is handled the same
way along its first axis --, RGB/RGBA images and stacks (..., 3|4), and multichannel images or stacks
whose channel axis the caller names. Each slice is mapped to the (H, W, 3) uint8 RGB image SAM expects,
with percentile normalisation computed either once for the whole stack (the default, so slices stay
comparable during propagation) or per slice.

Nothing here imports torch, Qt or napari. Coordinates are napari's: (z, row, col).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["SliceSource", "normalize_to_uint8", "minmax_to_uint8", "ACCEPTED_LAYOUTS", "MIN_SLICE_SIDE"]

#: Smallest slice side (pixels) we accept: SAM cannot say anything useful about smaller images.
MIN_SLICE_SIDE = 8

ACCEPTED_LAYOUTS = (
    "(Y, X) a 2D image; (Z, Y, X) a stack or time-lapse; (Y, X, 3|4) or (Z, Y, X, 3|4) RGB/RGBA "
    "(rgb=True, guessed when the last axis has 3 or 4 entries); or a 2D/3D image with one extra "
    "channel axis named by channel_axis=..."
)

_NORMALIZE_MODES = ("stack", "slice", "none", "microsam", "auto")
# Pixels sampled to estimate the stack-wide percentiles (spread evenly over slices and rows/cols).
_STACK_SAMPLE_SLICES = 32
_STACK_SAMPLE_PIXELS = 2_000_000


def _is_multiscale(data: Any) -> bool:
    """A napari multiscale layer's data (``MultiScaleData``, with ``.shapes``) or a list/tuple of
    at least two arrays of one ndim whose last two sides shrink level by level (an OME-Zarr pyramid)."""
    if hasattr(data, "shapes") and hasattr(data, "__len__") and not isinstance(data, np.ndarray):
        return True
    if not isinstance(data, (list, tuple)) or len(data) < 2:
        return False
    if not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in data):
        return False
    shapes = [tuple(a.shape) for a in data]
    return len({len(s) for s in shapes}) == 1 and all(
        a[-2:] != b[-2:] and b[-2] <= a[-2] and b[-1] <= a[-1] for a, b in zip(shapes, shapes[1:])
    )


def _as_array(data: Any) -> Any:
    """numpy and dask arrays pass through; a multiscale pyramid gives its full-resolution level
    (pass ``levels[k]`` for another); anything else array-like becomes a numpy array."""
    if isinstance(data, np.ndarray):
        return data
    if _is_multiscale(data):
        return data[0]
    if hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "__getitem__"):
        return data  # dask, zarr, h5py, memmap-like: index lazily, one slice at a time
    return np.asarray(data)


def _to_numpy(a: Any) -> np.ndarray:
    """Materialise a (small) piece of a lazy array."""
    if hasattr(a, "compute"):
        a = a.compute()
    return np.asarray(a)


def _region_key(region: tuple[slice, slice]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in region)


def _finite_percentiles(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) percentiles of the finite values of ``values``; (0, 0) when there are none."""
    v = np.asarray(values).ravel()
    if v.dtype == bool:
        v = v.astype(np.uint8)
    if v.dtype.kind == "f":
        v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(v, percentiles)
    return float(lo), float(hi)


def normalize_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``values`` linearly so that ``lo`` -> 0 and ``hi`` -> 255, clipped, as uint8.

    NaN becomes 0, +inf 255 and -inf 0. When ``hi <= lo`` (a constant image) every value above
    ``lo`` becomes 255 and everything else 0, so there is never a division by zero.
    Works for any numeric or bool dtype; the shape is kept.
    """
    x = np.asarray(values)
    if x.dtype == bool:
        return x.astype(np.uint8) * np.uint8(255)
    xf = x.astype(np.float32, copy=False) if x.dtype.itemsize <= 4 else x.astype(np.float64)
    if hi <= lo:
        out = np.where(xf > lo, 255, 0).astype(np.uint8)
        return out
    scale = 255.0 / (hi - lo)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (xf - lo) * scale
        y = np.nan_to_num(y, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(y, 0.0, 255.0, out=y)
    return (y + 0.5).astype(np.uint8)


def minmax_to_uint8(a: np.ndarray) -> np.ndarray:
    """micro-sam's conversion of raw intensities to uint8 (``micro_sam.util._to_image``).

    ``a``: ``(H, W)`` or ``(H, W, C)``, any real or bool dtype. Per channel, in float32: subtract
    the minimum, divide by (the maximum after that + 1e-7), multiply by 255 and truncate. Raises
    :class:`~napari_mobilesam.errors.InputError` on NaN or infinite values (micro-sam gives
    garbage there).
    """
    x = np.asarray(a).astype(np.float32)
    if not np.isfinite(x).all():
        raise InputError("the image has NaN or infinite values; replace them (np.nan_to_num) first")
    axes = (0, 1)
    x = x - x.min(axis=axes, keepdims=True)
    x = x / (x.max(axis=axes, keepdims=True) + np.float32(1e-7))
    return (x * np.float32(255)).astype(np.uint8)


class SliceSource:
    """A stack of 2D slices, each presented to SAM as (H, W, 3) uint8 RGB.

    Parameters
    ----------
    data : array-like (numpy, dask, zarr...)
        One of the layouts in `ACCEPTED_LAYOUTS`. Dtypes: uint8, uint16, signed ints, floats (NaN and
        inf are safe), bool. Lazy arrays are read one slice at a time.
        A multiscale pyramid (a napari multiscale layer's ``data``, or the list of dask arrays
        napari's OME-Zarr reader gives) is read at full resolution: its level 0.
    channel_axis : int, optional
        The axis holding channels of a multichannel image or stack (negative values count from the
        end). Up to 3 channels are shown as R, G, B (1 channel: gray; 2 channels: R, G and an empty
        B); with more, pick three with ``channels``. Each channel is normalised on its own.
    rgb : bool, optional
        Whether the last axis is RGB(A). ``None`` guesses: True when the last axis has 3 or 4 entries,
        the array has 3 or 4 dimensions and no ``channel_axis`` is given (napari's rule). The alpha
        channel of RGBA is dropped. RGB is normalised with one range shared by the three colours.
    normalize : {"stack", "slice", "none", "microsam", "auto"}
        ``"stack"`` (default): one percentile range for the whole stack, estimated from up to
        32 slices spread evenly through it. ``"slice"``: a range per slice. ``"none"``: no
        rescaling -- only for uint8 or bool data (bool becomes 0/255). ``"microsam"``: micro-sam's
        own conversion (:func:`minmax_to_uint8`: each slice's -- or tile's -- minimum to maximum,
        per channel), the input micro-sam's models were trained and evaluated with; sessions of
        those models use it (see :meth:`napari_mobilesam.core.session.Session`). ``"auto"``: what
        the model of the :class:`~napari_mobilesam.core.session.Session` given this source needs
        (:func:`~napari_mobilesam.core.session.normalization_for`); ``"stack"`` until then.
    percentiles : (low, high)
        Percentiles (0..100) of the finite values mapped to 0 and 255. Default (0.5, 99.5).
    contrast_limits : (low, high), optional
        A fixed intensity range (e.g. a napari layer's contrast limits) used instead of percentiles.
    channels : sequence of int, optional
        Which channels (at most 3) to show, in R, G, B order, when ``channel_axis`` is given.

    Attributes
    ----------
    n_slices : int
        Number of slices (1 for a 2D image).
    slice_shape : (H, W)
        Rows and columns of every slice.
    """

    def __init__(
        self,
        data: Any,
        *,
        channel_axis: int | None = None,
        rgb: bool | None = None,
        normalize: str = "stack",
        percentiles: tuple[float, float] = (0.5, 99.5),
        contrast_limits: tuple[float, float] | None = None,
        channels: Sequence[int] | None = None,
    ) -> None:
        arr = _as_array(data)
        shape = tuple(int(s) for s in arr.shape)
        dtype = np.dtype(arr.dtype)
        p_lo, p_hi, limits = _check_options(dtype, normalize, percentiles, contrast_limits)
        if channel_axis is not None:
            self._mode, self._perm, self._chans = _channel_layout(shape, channel_axis, rgb, channels)
        else:
            if channels is not None:
                raise ValueError("channels=... needs channel_axis=... to say which axis holds them")
            self._mode, self._perm, self._chans = _plain_layout(shape, dtype, rgb)
        self._is_2d, n_slices, h, w = _spatial_shape(shape, self._mode, self._perm)

        self.data = arr
        self.shape = shape
        self.dtype = dtype
        self.channel_axis = channel_axis
        self.normalize = normalize
        self.percentiles = (p_lo, p_hi)
        self.contrast_limits = limits
        self.n_slices = int(n_slices)
        self.slice_shape = (int(h), int(w))
        self._stack_range: np.ndarray | None = None  # (n_chans, 2) lo/hi
        self._keys: dict[int, str] = {}
        self._rgb_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._rgb_cache_size = 4
        self._slice_ranges: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    # -- layout -----------------------------------------------------------------------------------
    @property
    def is_2d(self) -> bool:
        """True when the input was a single 2D image (then the only slice is z = 0)."""
        return self._is_2d

    def __len__(self) -> int:
        return self.n_slices

    def resolve_normalize(self, mode: str) -> None:
        """Replace ``normalize="auto"`` by ``mode`` (a model's need); other settings are kept.
        Anything computed with the former setting (RGB slices, keys, ranges) is forgotten."""
        if self.normalize != "auto":
            return
        _check_options(self.dtype, mode, self.percentiles, self.contrast_limits)
        with self._lock:
            self.normalize = mode
            self._rgb_cache.clear()
            self._keys.clear()
            self._slice_ranges.clear()

    def __repr__(self) -> str:
        return (
            f"SliceSource(shape={self.shape}, dtype={self.dtype}, mode={self._mode!r}, "
            f"n_slices={self.n_slices}, slice_shape={self.slice_shape}, normalize={self.normalize!r})"
        )

    def _check_z(self, z: int) -> int:
        if isinstance(z, (bool, np.bool_)) or not isinstance(z, (int, np.integer)):
            raise TypeError(f"slice index must be an int, got {type(z).__name__}")
        z = int(z)
        if not 0 <= z < self.n_slices:
            raise IndexError(f"slice {z} is out of range: the stack has {self.n_slices} slices")
        return z

    def raw(self, z: int, region: tuple[slice, slice] | None = None) -> np.ndarray:
        """Slice ``z`` as stored, channels last: (H, W) for gray, (H, W, C) otherwise (numpy).

        ``region``: ``(rows, cols)`` slices (steps allowed) to read only part of the slice; a lazy
        array (dask, zarr) then reads only that part.
        """
        z = self._check_z(z)
        has_ch = self._mode in ("rgb", "channels")
        perm = self._perm
        index: list[Any] = [slice(None)] * len(self.shape)
        if not self._is_2d:
            index[perm[0]] = z
        if region is not None:
            rows_axis, cols_axis = perm[0:2] if self._is_2d else perm[1:3]
            index[rows_axis], index[cols_axis] = region
        a = _to_numpy(self.data[tuple(index)])
        if has_ch:
            # Remaining axes keep their relative order; move the channel axis last.
            remaining = [ax for ax in range(len(self.shape)) if self._is_2d or ax != perm[0]]
            ch_pos = remaining.index(perm[-1])
            a = np.moveaxis(a, ch_pos, -1)
            a = a[..., self._chans]
        return a

    # -- normalisation ----------------------------------------------------------------------------
    def _per_channel_range(self, a: np.ndarray) -> np.ndarray:
        """(n_chans, 2) percentile ranges of ``a`` ((..., C) or gray) following the mode."""
        if self._mode == "gray":
            return np.array([_finite_percentiles(a, self.percentiles)])
        if self._mode == "rgb":
            r = _finite_percentiles(a[..., :3], self.percentiles)
            return np.array([r, r, r])
        return np.array([_finite_percentiles(a[..., i], self.percentiles) for i in range(a.shape[-1])])

    def stack_range(self) -> np.ndarray:
        """(n_channels, 2) float64 intensity range (low, high) used for every slice in stack mode.

        Estimated from up to 32 evenly spaced slices and at most ~2 M pixels (computed once).
        """
        if self.contrast_limits is not None:
            return np.tile(np.array(self.contrast_limits, float), (len(self._chans), 1))
        with self._lock:
            if self._stack_range is None:
                n = self.n_slices
                zs = np.unique(np.linspace(0, n - 1, min(n, _STACK_SAMPLE_SLICES)).round().astype(int))
                h, w = self.slice_shape
                per_slice = max(1, _STACK_SAMPLE_PIXELS // len(zs))
                step = max(1, int(np.ceil(np.sqrt(h * w / per_slice))))
                sub = (slice(None, None, step), slice(None, None, step))
                parts = [self.raw(int(z), sub) for z in zs]
                self._stack_range = self._per_channel_range(np.stack(parts))
            return self._stack_range.copy()

    def slice_range(self, z: int) -> np.ndarray:
        """(n_channels, 2) intensity range used for slice ``z`` (depends on ``normalize``)."""
        if self.contrast_limits is not None or self.normalize in ("stack", "auto"):
            return self.stack_range()
        if self.normalize == "none":
            return np.tile(np.array([0.0, 255.0]), (len(self._chans), 1))
        z = self._check_z(z)
        with self._lock:
            hit = self._slice_ranges.get(z)
        if hit is None:
            hit = self._per_channel_range(self.raw(z))
            with self._lock:
                self._slice_ranges[z] = hit
                while len(self._slice_ranges) > 64:
                    self._slice_ranges.pop(next(iter(self._slice_ranges)))
        return hit.copy()

    def rgb(self, z: int, region: tuple[slice, slice] | None = None) -> np.ndarray:
        """Slice ``z`` as SAM's input: a C-contiguous (H, W, 3) uint8 RGB array.

        ``region``: ``(rows, cols)`` slices for part of the slice (a tile), normalised with the
        whole slice's (or stack's) range, so tiles of one slice agree. The last few results are
        kept, so asking again is cheap. Do not modify the returned array in place.
        """
        z = self._check_z(z)
        ckey = z if region is None else (z, _region_key(region))
        with self._lock:
            hit = self._rgb_cache.get(ckey)
            if hit is not None:
                self._rgb_cache.move_to_end(ckey)
                return hit
        a = self.raw(z, region)
        if self.normalize == "microsam" and self.contrast_limits is None:
            u8 = minmax_to_uint8(a)
        elif self.normalize == "none" and self.contrast_limits is None:
            u8 = a.astype(np.uint8) * np.uint8(255) if a.dtype == bool else a.astype(np.uint8)
        else:
            rng = self.slice_range(z)
            if self._mode == "gray":
                u8 = normalize_to_uint8(a, *rng[0])
            else:
                u8 = np.stack(
                    [normalize_to_uint8(a[..., i], *rng[i]) for i in range(a.shape[-1])], axis=-1
                )
        if u8.ndim == 2:
            out = np.repeat(u8[:, :, None], 3, axis=2)
        elif u8.shape[-1] == 1:
            out = np.repeat(u8, 3, axis=2)
        elif u8.shape[-1] == 2:
            out = np.concatenate([u8, np.zeros_like(u8[..., :1])], axis=2)
        else:
            out = u8[..., :3]
        out = np.ascontiguousarray(out)
        out.setflags(write=False)
        with self._lock:
            self._rgb_cache[ckey] = out
            while len(self._rgb_cache) > self._rgb_cache_size:
                self._rgb_cache.popitem(last=False)
        return out

    def slice_key(self, z: int, region: tuple[slice, slice] | None = None) -> str:
        """A hex digest naming slice ``z``'s RGB content (so: the raw content + the normalisation).

        Two slices (or tiles: see ``region`` in :meth:`rgb`), from any sources, with the same key
        give SAM the same input. Computed once per slice or tile.
        """
        z = self._check_z(z)
        kkey = z if region is None else (z, _region_key(region))
        key = self._keys.get(kkey)
        if key is None:
            img = self.rgb(z, region)
            h = hashlib.blake2b(digest_size=20)
            h.update(repr(img.shape).encode())
            h.update(img.tobytes())
            key = h.hexdigest()
            self._keys[kkey] = key
        return key


# -- construction steps of SliceSource ---------------------------------------------------------------


def _check_options(dtype: np.dtype, normalize: str, percentiles, contrast_limits):
    """Validate the dtype and the normalisation options; returns (p_lo, p_hi, limits or None)."""
    if dtype.kind not in "buif":
        raise ValueError(
            f"image dtype {dtype} is not supported: give integer, float or bool intensities"
        )
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    p_lo, p_hi = (float(p) for p in percentiles)
    if not (0.0 <= p_lo < p_hi <= 100.0):
        raise ValueError(
            f"percentiles must be (low, high) with 0 <= low < high <= 100, got {percentiles!r}"
        )
    if normalize == "none" and dtype not in (np.dtype(np.uint8), np.dtype(bool)):
        raise ValueError(
            f"normalize='none' needs uint8 or bool data, got {dtype}: use normalize='stack' "
            "or 'slice' (percentile normalisation) or pass contrast_limits=(low, high)"
        )
    limits = None
    if contrast_limits is not None:
        lo, hi = (float(v) for v in contrast_limits)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            raise ValueError(
                f"contrast_limits must be finite (low, high) with low <= high, got {contrast_limits!r}"
            )
        limits = (lo, hi)
    return p_lo, p_hi, limits


def _channel_layout(shape: tuple, channel_axis: int, rgb, channels):
    """(mode, perm, chans) of a multichannel image: spatial axes first, the channel axis last."""
    ndim = len(shape)
    if rgb:
        raise ValueError("give either channel_axis=... or rgb=True, not both")
    if not -ndim <= channel_axis < ndim:
        raise ValueError(
            f"channel_axis={channel_axis} is out of range for an array with {ndim} dimensions "
            f"{shape}"
        )
    ch = channel_axis % ndim
    spatial = [a for a in range(ndim) if a != ch]
    if len(spatial) not in (2, 3):
        raise ValueError(
            f"with channel_axis={channel_axis}, the other axes of shape {shape} must be "
            f"(Y, X) or (Z, Y, X); accepted layouts: {ACCEPTED_LAYOUTS}"
        )
    n_ch = shape[ch]
    if channels is None:
        if n_ch > 3:
            raise ValueError(
                f"the channel axis has {n_ch} channels; SAM takes up to 3: pick them with "
                "channels=(i, j, k)"
            )
        chans = list(range(n_ch))
    else:
        chans = [int(c) for c in channels]
        if not 1 <= len(chans) <= 3 or any(not -n_ch <= c < n_ch for c in chans):
            raise ValueError(
                f"channels must list 1 to 3 channel indices below {n_ch}, got {channels!r}"
            )
        chans = [c % n_ch for c in chans]
    return "channels", tuple(spatial) + (ch,), chans


def _plain_layout(shape: tuple, dtype: np.dtype, rgb):
    """(mode, perm, chans) without a channel axis: RGB(A) (given or guessed) or gray."""
    ndim = len(shape)
    if rgb is None:
        rgb = ndim in (3, 4) and shape[-1] in (3, 4)
        if rgb and dtype != np.dtype(np.uint8):
            warnings.warn(
                f"took the last axis of the {dtype} image of shape {shape} as RGB colour; if it "
                "holds channels, give channel_axis=-1 (--channel-axis -1 on the command line)",
                stacklevel=4,
            )
    if rgb:
        if ndim not in (3, 4) or shape[-1] not in (3, 4):
            raise ValueError(
                f"rgb=True needs (Y, X, 3|4) or (Z, Y, X, 3|4) data, got shape {shape}; "
                f"accepted layouts: {ACCEPTED_LAYOUTS}"
            )
        return "rgb", tuple(range(ndim)), [0, 1, 2]
    if ndim not in (2, 3):
        hint = (
            " A 4D array needs channel_axis=... (multichannel stack) or rgb=True."
            if ndim == 4
            else ""
        )
        raise ValueError(
            f"cannot read an image of shape {shape} ({ndim} dimensions) as slices.{hint} "
            f"Accepted layouts: {ACCEPTED_LAYOUTS}"
        )
    return "gray", tuple(range(ndim)), [0]


def _spatial_shape(shape: tuple, mode: str, perm: tuple):
    """(is_2d, n_slices, H, W), refusing empty stacks and slices too small for SAM."""
    has_ch = mode in ("rgb", "channels")
    spatial_shape = tuple(shape[a] for a in (perm[:-1] if has_ch else perm))
    is_2d = len(spatial_shape) == 2
    if is_2d:
        spatial_shape = (1, *spatial_shape)
    n_slices, h, w = spatial_shape
    if n_slices == 0:
        raise ValueError(f"the stack of shape {shape} has 0 slices: there is nothing to segment")
    if h < MIN_SLICE_SIDE or w < MIN_SLICE_SIDE:
        raise ValueError(
            f"slices of {h} x {w} pixels are too small (shape {shape}): each side needs at least "
            f"{MIN_SLICE_SIDE} pixels. Is the axis order right? Slices are the last two "
            "(non-channel) axes."
        )
    return is_2d, n_slices, h, w
