"""Session.segment_automatically's modes and segment_stack_automatically (engine only, no Qt).

The AIS cases use the stand-in network of ``tests/fake_ais.py`` (``fake_ais_model``: NOT a model;
the real AIS code path around a pooling "encoder" and a brightness "decoder"); the point-grid cases
use GroundTruthOracle (a stand-in predictor, NOT a model).
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.core.session import Session
from napari_mobilesam.errors import InputError
from napari_mobilesam.testing import GroundTruthOracle


@pytest.fixture(scope="module")
def fake_sam():
    from fake_ais import fake_ais_model

    return fake_ais_model()


def test_modes_resolve_and_refuse_ais_without_a_decoder(stack, fake_sam, engine_sam_test):
    with_decoder = Session(fake_sam, stack.image, rgb=False, cache_dir=None)
    assert with_decoder.has_ais and with_decoder.automatic_mode("auto") == "ais"
    assert with_decoder.automatic_mode("grid") == "grid"
    plain = Session(engine_sam_test, stack.image, rgb=False, cache_dir=None)
    assert not plain.has_ais and plain.automatic_mode() == "grid"
    with pytest.raises(InputError, match="no instance-segmentation"):
        plain.segment_automatically(0, mode="ais")
    with pytest.raises(InputError, match="unknown automatic mode"):
        plain.automatic_mode("apg?")
    oracle = Session(None, stack.image, rgb=False, predictor=GroundTruthOracle(stack.labels, stack.image))
    assert not oracle.has_ais and oracle.automatic_mode() == "grid"


def test_ais_slice_is_segment_slice_ais_untiled_and_tiled(stack, fake_sam):
    from napari_mobilesam.volume.ais import segment_slice_ais
    from napari_mobilesam.volume.instance import AISParams

    z = int(round(stack.centers[0][0]))
    params = AISParams(min_size=5)
    session = Session(fake_sam, stack.image, rgb=False, cache_dir=None)
    labels = session.segment_automatically(z, ais_params=params)
    assert labels.dtype == np.int32 and labels.max() >= 2
    np.testing.assert_array_equal(labels, segment_slice_ais(fake_sam, stack.image[z], params))
    tiled = Session(fake_sam, stack.image, rgb=False, cache_dir=None, tile=64, halo=16)
    assert tiled.tiled
    got = tiled.segment_automatically(z, ais_params=params)
    want = segment_slice_ais(fake_sam, stack.image[z], params, grid=tiled.predictor.grid)
    np.testing.assert_array_equal(got, want)
    assert got.max() >= 2


def test_apg_mode_is_segment_slice_apg_and_needs_a_decoder(stack, fake_sam, engine_sam_test):
    from napari_mobilesam.volume.apg import APGParams, segment_slice_apg

    z = int(round(stack.centers[0][0]))
    params = APGParams(min_size=5, multimask=True)
    session = Session(fake_sam, stack.image, rgb=False, cache_dir=None)
    got = session.segment_automatically(z, mode="apg", apg_params=params)
    assert got.dtype == np.int32 and got.shape == stack.image.shape[1:] and got.max() >= 1
    np.testing.assert_array_equal(got, segment_slice_apg(session.predictor, z, params))
    volume, done = session.segment_stack_automatically([z, z + 1], mode="apg", apg_params=params)
    assert done == [z, z + 1]
    np.testing.assert_array_equal(volume[z] > 0, got > 0)
    plain = Session(engine_sam_test, stack.image, rgb=False, cache_dir=None)
    with pytest.raises(InputError, match="no instance-segmentation .*APG mode needs"):
        plain.segment_automatically(z, mode="apg")


def test_stack_is_stitched_and_stops_when_asked(stack):
    oracle = GroundTruthOracle(stack.labels, stack.image)
    session = Session(None, stack.image, rgb=False, predictor=oracle)
    seen = []
    volume, done = session.segment_stack_automatically(range(2, 8), progress=lambda d, n: seen.append((d, n)))
    assert done == list(range(2, 8)) and seen[-1] == (6, 6)
    assert not volume[:2].any() and not volume[8:].any()
    for gt in np.unique(stack.labels[2:8]):  # one id per nucleus through z
        if gt:
            ids = np.unique(volume[2:8][stack.labels[2:8] == gt])
            assert len(ids[ids > 0]) == 1, (gt, ids)
    live = np.zeros(stack.labels.shape, np.int32)
    calls = []
    volume, done = session.segment_stack_automatically(
        cancel=lambda: len(calls) >= 3, progress=lambda d, n: calls.append(d), live=live)
    assert volume is live and done == [0, 1, 2] and not live[3:].any()
