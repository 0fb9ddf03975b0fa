"""dask.distributed: slices spread over two worker processes on 127.0.0.1 give the same labels as
one process, and each worker loads the model once."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import dask_client

from napari_mobilesam import batch
from napari_mobilesam.batch.api import (
    prompts_from_arrays,
    segment_stack,
    segment_stack_auto,
)
from napari_mobilesam.data import synthetic_nuclei
from napari_mobilesam.volume.automatic import AutoParams

# Tiny random model, exact eager float32: workers and this process compute the same numbers.
MODEL = dict(model="vit_t_test", backend="eager")
PARAMS = AutoParams(min_iou=0.0, min_stability=0.0, max_area_fraction=0.6, grid=2, max_points=3,
                    points_per_batch=3)


@pytest.fixture(scope="module")
def client():
    with dask_client(2, processes=True) as c:
        yield c


@pytest.fixture(scope="module")
def stack():
    return synthetic_nuclei((8, 96, 96), n_nuclei=6, seed=1, z_radius_range=(2.5, 3.5),
                            radius_range=(9, 14)).image


def _loads(client) -> dict[str, int]:
    return client.run(lambda: __import__("napari_mobilesam.batch.api").batch.WORKER_LOAD_COUNT["n"])


def test_auto_on_two_workers_equals_one_process(client, stack, tmp_path):
    assert len(client.scheduler_info()["workers"]) == 2
    assert all(addr.startswith("tcp://127.0.0.1:") for addr in client.scheduler_info()["workers"])
    single = segment_stack_auto(stack, params=PARAMS, z_range=(1, 5), **MODEL)
    assert single[1:5].any()
    spread = segment_stack_auto(stack, params=PARAMS, z_range=(1, 5), client=client, **MODEL)
    assert spread.dtype == single.dtype and np.array_equal(spread, single)
    loads = _loads(client)
    assert sorted(loads.values()) == [1, 1], loads  # both workers worked, each loaded once
    # Streaming to a file through the cluster: same labels; the workers reuse their model.
    out = tmp_path / "auto.tif"
    segment_stack_auto(stack, params=PARAMS, z_range=(1, 5), client=client, out=out, **MODEL)
    assert np.array_equal(tifffile.imread(out), single)
    assert _loads(client) == loads


def test_prompts_on_two_workers_equal_one_process(client, stack):
    prompts = prompts_from_arrays([[2, 40, 40], [3, 60, 30], [5, 30, 60], [5, 70, 70]],
                                  object_ids=[1, 2, 1, 3])
    single = segment_stack(stack, prompts, **MODEL)
    spread = segment_stack(stack, prompts, client=client, **MODEL)
    assert np.array_equal(spread, single)
    assert set(np.unique(spread)) <= {0, 1, 2, 3}


def test_propagation_with_embeddings_from_two_workers_equals_one_process(client, stack, monkeypatch):
    from napari_mobilesam.batch.api import propagate_stack
    from napari_mobilesam.core import embeddings

    prompts = prompts_from_arrays([[4, 40, 40], [4, 70, 70]], object_ids=[1, 2])
    options = dict(min_score=0.0, min_overlap=0.0, area_ratio=(0.0, 100.0))
    single = propagate_stack(stack, prompts, z_range=(2, 7), **options, **MODEL)
    assert (single[2:7] > 0).any(axis=(1, 2)).sum() > 1, "followed over several slices"

    def no_local_encoder(*args, **kwargs):
        raise AssertionError("with a client, this process must not run the encoder")

    monkeypatch.setattr(embeddings, "compute_embedding", no_local_encoder)
    spread = propagate_stack(stack, prompts, z_range=(2, 7), client=client, **options, **MODEL)
    assert np.array_equal(spread, single)
    assert all(n == 1 for n in _loads(client).values())  # each worker loaded the model once


def test_cluster_needs_a_loadable_model_spec(client, stack, engine_sam_test):
    with pytest.raises(batch.BatchError, match="by name"):
        segment_stack_auto(stack, model=engine_sam_test, client=client)
    with pytest.raises(batch.BatchError, match="file path"):
        segment_stack_auto(stack, model="vit_t_test", checkpoint={"a": 1}, client=client)


def test_cli_dask_workers_flag(tmp_path, stack):
    """`--dask-workers 2` starts a local cluster and gives the single-process labels (2 slices:
    one for each worker)."""
    from napari_mobilesam import cli

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack[2:4])
    opts = ["--model", "vit_t_test", "--backend", "eager", "--min-iou", "0", "--min-stability", "0",
            "--grid", "2", "--max-points", "3", "--max-area-fraction", "0.6", "--no-progress"]
    assert cli.main(["auto", str(path), "-o", str(tmp_path / "one.tif"), *opts]) == 0
    assert cli.main(["auto", str(path), "-o", str(tmp_path / "two.tif"), "--dask-workers", "2", *opts]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "two.tif"), tifffile.imread(tmp_path / "one.tif"))


def test_cli_propagate_with_dask_workers(tmp_path, stack):
    """`segment --propagate --dask-workers 2`: the workers embed, the labels are the same (3
    slices, the prompt on the middle one)."""
    from napari_mobilesam import cli

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack[3:6])
    csv = tmp_path / "prompts.csv"
    csv.write_text("z,row,col,label,object_id\n1,40,40,1,1\n")
    opts = ["--prompts", str(csv), "--propagate", "--model", "vit_t_test", "--backend", "eager",
            "--no-progress"]
    assert cli.main(["segment", str(path), "-o", str(tmp_path / "one.tif"), *opts]) == 0
    assert cli.main(["segment", str(path), "-o", str(tmp_path / "two.tif"), "--dask-workers", "2", *opts]) == 0
    one = tifffile.imread(tmp_path / "one.tif")
    assert one[1].any() and np.array_equal(tifffile.imread(tmp_path / "two.tif"), one)
