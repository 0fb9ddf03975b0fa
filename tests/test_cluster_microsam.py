"""micro-sam models on a dask cluster: "auto" (AIS on tiles), APG (prompts from whole-slice AIS
maps) and prompts (whole and tiled slices) give the local path's labels.

The model is the micro-sam fixture (random weights in micro-sam's file layout, with its AIS
decoder), loaded as ``vit_t_lm`` by a worker PROCESS of a ``LocalCluster`` and by this process,
with the OpenVINO backend on one thread each: the same compiled kernels on the same input give the
same bits in both processes. The encoder runs in float32 (the default precision of micro-sam's
models), the AIS decoder in bf16 where the CPU has it (``ais_precision="bf16"``; float32 on other
CPUs): what these tests compare, the cluster's labels against this process's, does not depend on
the precision, and a bf16 decoder pass took 3.5 s at one thread here against 9.4 s in float32
(its convolutions are ~770 GFLOP per slice). The IRs are converted once per run into the
session's cache folder, which the worker shares (it inherits ``NAPARI_MOBILESAM_CACHE``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import dask_client
from test_microsam import same_assignment

from napari_mobilesam import batch
from napari_mobilesam.errors import ModelError
from napari_mobilesam.models.choice import ModelChoice
from napari_mobilesam.volume.apg import APGParams

# multimask: the random weights' single-mask output is empty for points; 25 seeds on the fixture
# image instead of 288 (each is a pass through SAM's decoder)
APG = APGParams(multimask=True, center_distance_threshold=0.01)


@pytest.fixture(scope="module")
def client():
    with dask_client(1, processes=True) as c:
        yield c


@pytest.fixture(scope="module")
def model(msdir, lm_openvino):
    # lm_openvino: the IRs of these weights, converted once per run into the session's cache
    return ModelChoice("vit_t_lm", str(msdir / "vit_t.pt"), "cpu", "openvino",
                       decoder=str(msdir / "vit_t_decoder.pt"), ais_precision="bf16")


@pytest.fixture(scope="module")
def image(msdir):
    return np.load(msdir / "microsam_expected.npz")["image"]


@pytest.fixture(scope="module")
def stack(image):
    """Two different slices (the fixture image and its mirror, scaled: other intensities)."""
    return np.stack([image, (image[:, ::-1] // 2 + 7).astype(image.dtype)])


def _positive(labels) -> int:
    return int(np.count_nonzero(labels))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """This process computes with one thread, as the worker (dask starts it with
    ``OMP_NUM_THREADS=1``, which torch and our OpenVINO models follow): torch's batched matrix
    products round differently with other thread counts, which moves a few mask pixels of SAM's
    decoder (APG, prompts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # read when an OpenVINO model is compiled
        yield
    torch.set_num_threads(threads)


# tiles of 384 pixels with a halo of 32 cut the 384 x 448 fixture slice into 2 tiles (each tile
# costs a whole slice's encoder and decoder passes, here and on the worker)
TILE = 384


@pytest.mark.slow
def test_auto_on_the_cluster_is_tiled_ais_equal_to_local(client, model, stack, msdir):
    """Mode "auto" on the cluster is AIS there (the worker says the model has a decoder) and, on a
    slice larger than the tile, runs tile by tile as here: each tile's own micro-sam input and
    embedding, the maps stitched, one watershed. (Whole-slice AIS on a worker runs in the APG test
    below, whose prompts come from it; stitching cluster results through z, in test_distributed.)"""
    from napari_mobilesam.core.tiles import TileGrid

    one = stack[:1]
    assert len(TileGrid(one.shape[1:], TILE, 32).tiles) == 2
    local = batch.segment_stack_auto(one, model=model, mode="ais", tile=TILE, halo=32)
    assert local.max() >= 2
    remote = batch.segment_stack_auto(one, model=model, mode="auto", tile=TILE, halo=32, client=client)
    assert np.array_equal(local, remote)
    # the check can tell whether the tiles were used: AIS of the whole slice gives micro-sam's
    # labels of the fixture (same assignment >= 0.999 in test_microsam), the tiles other ones (0.81)
    whole = np.load(msdir / "microsam_expected.npz")["ais/default"]
    assert same_assignment(local[0], whole) < 0.95


@pytest.mark.slow
def test_apg_on_the_cluster_equals_local(client, model, stack):
    apg = batch.segment_stack_auto(stack[:1], model=model, mode="apg", apg_params=APG)
    assert apg.max() >= 1
    remote = batch.segment_stack_auto(stack[:1], model=model, mode="apg", apg_params=APG, client=client)
    assert np.array_equal(apg, remote)


# (z, row, col): a point on a fixture object and one elsewhere, both in the first (left) tile
PROMPTS = np.array([[0, 141.0, 200.0], [0, 100.0, 120.0]])


@pytest.mark.slow
@pytest.mark.parametrize("tile", [None, TILE])
def test_prompts_on_the_cluster_use_the_local_normalisation(client, model, stack, tile):
    """micro-sam's models see each slice (or tile) normalised min-to-max on the cluster too, as
    locally; the stack's percentiles (what the cluster used before) give other masks."""
    local = batch.segment_stack(stack, PROMPTS, model=model, tile=tile, halo=32)
    assert _positive(local) > 0
    remote = batch.segment_stack(stack, PROMPTS, model=model, tile=tile, halo=32, client=client)
    assert np.array_equal(local, remote)
    if tile is None:  # the check can tell the two normalisations apart
        other = batch.segment_stack(stack, PROMPTS, model=model, normalize="stack")
        assert not np.array_equal(local, other)


def test_ais_without_a_decoder_is_refused_on_the_cluster(client):
    with pytest.raises(ModelError, match="vit_t_lm"):
        batch.segment_stack_auto(np.zeros((1, 64, 64), np.uint16), model="vit_t_test", backend="eager",
                                 mode="ais", client=client)
