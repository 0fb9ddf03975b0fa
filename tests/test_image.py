"""SliceSource: layouts, dtypes, normalisation modes and bad input."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_mobilesam.core.source import SliceSource, normalize_to_uint8


def _ramp(shape, dtype=np.float32):
    return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape).astype(dtype)


def test_2d_gray_uint16():
    img = _ramp((32, 40), np.uint16)
    src = SliceSource(img)
    assert src.n_slices == 1 and src.slice_shape == (32, 40) and src.is_2d
    rgb = src.rgb(0)
    assert rgb.shape == (32, 40, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb.min() == 0 and rgb.max() == 255
    # monotone mapping of a ramp
    assert np.all(np.diff(rgb[..., 0].ravel().astype(int)) >= 0)
    with pytest.raises(IndexError, match="out of range"):
        src.rgb(1)


def test_stack_vs_slice_normalisation():
    stack = np.stack([np.full((16, 16), 10.0), np.full((16, 16), 10.0)]).astype(np.float32)
    stack[0, :8] = 0.0  # slice 0: half dark, half at 10
    stack[1, :8] = 100.0  # slice 1: half at 100
    per_stack = SliceSource(stack, normalize="stack", percentiles=(0, 100))
    per_slice = SliceSource(stack, normalize="slice", percentiles=(0, 100))
    # one range for the stack: value 10 maps to the same grey on both slices
    assert per_stack.rgb(0)[12, 0, 0] == per_stack.rgb(1)[12, 0, 0] == round(10 / 100 * 255)
    # per slice: each slice stretched to its own range
    assert per_slice.rgb(0)[12, 0, 0] == 255 and per_slice.rgb(1)[12, 0, 0] == 0
    assert np.array_equal(per_stack.stack_range(), [[0.0, 100.0]])


def test_percentiles_clip_outliers():
    rng = np.random.default_rng(0)
    img = rng.normal(1000, 10, size=(64, 64)).astype(np.float32)
    img[0, 0] = 1e9
    rgb = SliceSource(img).rgb(0)[..., 0]
    assert rgb[0, 0] == 255
    # the outlier does not squash everything else to black
    assert 100 < np.median(rgb) < 160


def test_float_nan_inf_and_constant_slices():
    stack = np.ones((3, 16, 16), np.float32)
    stack[1] = np.nan
    stack[2, 0, 0] = np.inf
    stack[2, 0, 1] = -np.inf
    stack[2, 1, 1] = np.nan
    for mode in ("stack", "slice"):
        src = SliceSource(stack, normalize=mode)
        for z in range(3):
            out = src.rgb(z)
            assert out.dtype == np.uint8
        assert np.all(src.rgb(0) == 0)  # constant slice: no division by zero, no garbage
        assert np.all(src.rgb(1) == 0)  # all NaN
        assert src.rgb(2)[0, 0, 0] == 255 and src.rgb(2)[0, 1, 0] == 0 and src.rgb(2)[1, 1, 0] == 0


def test_normalize_to_uint8_constant_and_bool():
    assert np.array_equal(normalize_to_uint8(np.array([1.0, 2.0]), 1.0, 1.0), [0, 255])
    assert np.array_equal(normalize_to_uint8(np.array([True, False]), 0, 1), [255, 0])
    assert np.array_equal(normalize_to_uint8(np.array([-5, 0, 5, 10], np.int32), 0, 10), [0, 0, 128, 255])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64,
                                   np.float16, np.float32, np.float64, bool])
def test_dtypes(dtype):
    rng = np.random.default_rng(1)
    raw = rng.integers(-100, 100, size=(2, 20, 24))
    data = (raw > 0) if dtype is bool else raw.astype(dtype) if np.dtype(dtype).kind != "u" else np.abs(raw).astype(dtype)
    src = SliceSource(data)
    out = src.rgb(1)
    assert out.shape == (20, 24, 3) and out.dtype == np.uint8
    assert out.max() > out.min()


def test_bool_and_uint8_without_normalisation():
    m = np.zeros((10, 10), bool)
    m[2:5, 2:5] = True
    assert np.array_equal(SliceSource(m, normalize="none").rgb(0)[..., 1], m * 255)
    u = np.arange(100, dtype=np.uint8).reshape(10, 10)
    assert np.array_equal(SliceSource(u, normalize="none").rgb(0)[..., 2], u)
    with pytest.raises(ValueError, match="normalize='none' needs uint8"):
        SliceSource(u.astype(np.uint16), normalize="none")


def test_rgb_and_rgba():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(12, 14, 3), dtype=np.uint8)
    src = SliceSource(rgb, normalize="none")
    assert src.n_slices == 1 and np.array_equal(src.rgb(0), rgb)
    rgba = np.concatenate([rgb, np.full((12, 14, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(SliceSource(rgba, normalize="none").rgb(0), rgb)
    stack = np.stack([rgb, rgb[::-1]])
    s = SliceSource(stack, normalize="none")
    assert s.n_slices == 2 and np.array_equal(s.rgb(1), rgb[::-1])
    # joint range: the colour balance is kept (all channels share one lo/hi)
    r = SliceSource(rgb.astype(np.uint16) * 10).stack_range()
    assert np.all(r == r[0])
    # a (Z, Y, 3|4) array is RGB by default; rgb=False reads it as a gray stack
    with pytest.raises(ValueError, match="too small"):
        SliceSource(rng.random((9, 10, 3)), rgb=False)
    assert SliceSource(rng.random((9, 10, 3))).slice_shape == (9, 10)


def test_channel_axis():
    rng = np.random.default_rng(3)
    data = rng.random((2, 5, 16, 18)).astype(np.float32)  # (C, Z, Y, X)
    src = SliceSource(data, channel_axis=0)
    assert src.n_slices == 5 and src.slice_shape == (16, 18)
    out = src.rgb(3)
    assert np.all(out[..., 2] == 0)  # two channels -> R, G and an empty B
    assert np.array_equal(out[..., 0], normalize_to_uint8(data[0, 3], *src.stack_range()[0]))
    assert np.array_equal(out[..., 1], normalize_to_uint8(data[1, 3], *src.stack_range()[1]))
    # channel in the middle: (Z, C, Y, X)
    zc = np.moveaxis(data, 0, 1)
    assert np.array_equal(SliceSource(zc, channel_axis=1).rgb(3), out)
    # 2D multichannel (Y, X, C) with 5 channels: need to pick
    five = rng.random((16, 18, 5))
    with pytest.raises(ValueError, match="up to 3"):
        SliceSource(five, channel_axis=-1)
    picked = SliceSource(five, channel_axis=-1, channels=(4, 0, 2), normalize="slice")
    assert picked.n_slices == 1
    assert np.array_equal(picked.rgb(0)[..., 0], SliceSource(five[..., 4], normalize="slice").rgb(0)[..., 0])
    one = SliceSource(rng.random((1, 16, 18)), channel_axis=0)
    assert one.n_slices == 1 and np.array_equal(one.rgb(0)[..., 0], one.rgb(0)[..., 2])


def test_dask_input_matches_numpy():
    rng = np.random.default_rng(4)
    data = rng.integers(0, 4000, size=(6, 32, 32), dtype=np.uint16)
    a = SliceSource(data)
    b = SliceSource(da.from_array(data, chunks=(1, 32, 32)))
    for z in (0, 5):
        assert np.array_equal(a.rgb(z), b.rgb(z))
        assert a.slice_key(z) == b.slice_key(z)


def test_slice_key_follows_content_and_normalisation():
    rng = np.random.default_rng(5)
    data = rng.integers(0, 4000, size=(3, 32, 32), dtype=np.uint16)
    data[2] = data[0]
    src = SliceSource(data)
    assert src.slice_key(0) == src.slice_key(2) != src.slice_key(1)
    assert SliceSource(data, normalize="slice").slice_key(1) != src.slice_key(1)
    assert SliceSource(data, percentiles=(1, 99)).slice_key(1) != src.slice_key(1)


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((10,), {}, "1 dimensions"),
        ((2, 3, 16, 16), {}, "channel_axis"),
        ((2, 2, 3, 16, 16), {}, "5 dimensions"),
        ((0, 16, 16), {}, "0 slices"),
        ((1, 1), {}, "too small"),
        ((5, 1, 16), {}, "too small"),
        ((16, 16), {"channel_axis": 0}, "other axes"),
        ((16, 16), {"channel_axis": 5}, "out of range"),
        ((16, 16), {"normalize": "minmax"}, "normalize must be"),
        ((16, 16), {"percentiles": (99, 1)}, "percentiles"),
        ((16, 16, 5), {"rgb": True}, "rgb=True"),
        ((16, 16), {"contrast_limits": (5, 1)}, "contrast_limits"),
    ],
)
def test_bad_layouts(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SliceSource(np.zeros(shape, np.float32), **kwargs)


def test_error_lists_accepted_layouts():
    with pytest.raises(ValueError, match=r"Accepted layouts: \(Y, X\)"):
        SliceSource(np.zeros((2, 2, 2, 2, 2)))
    with pytest.raises(ValueError, match="dtype"):
        SliceSource(np.zeros((16, 16), complex))


def test_contrast_limits_fixed_range():
    img = np.linspace(0, 1000, 256).reshape(16, 16)
    src = SliceSource(img, contrast_limits=(0, 500))
    assert src.rgb(0)[..., 0].max() == 255 and (src.rgb(0)[..., 0] == 255).sum() > 100
