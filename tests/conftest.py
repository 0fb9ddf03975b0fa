"""Shared test fixtures.

GUI tests use napari's ``make_napari_viewer`` (pytest-qt) and run under Xvfb through pytest-xvfb.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The parity fixture computed by the official MobileSAM code sits beside the checkout.
REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of the official MobileSAM parity fixture (weights, image, prompts, expected outputs)."""
    if not (REFERENCE / "mobile_sam_random_weights.pt").exists():
        pytest.fail(f"parity fixture missing: expected it at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def msdir(reference_dir) -> Path:
    """Folder of the micro-sam fixtures (random weights in micro-sam's layouts, expected outputs)."""
    d = reference_dir / "microsam"
    if not (d / "vit_t.pt").exists():
        pytest.fail(f"micro-sam fixture missing: expected it at {d}")
    return d


@pytest.fixture(scope="session")
def nuclei_stack():
    """The default synthetic nuclei stack (40×256×256 uint16) with its ground truth."""
    from napari_mobilesam.data import synthetic_nuclei

    return synthetic_nuclei()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the weights/IR/embedding caches out of the user's home directory: one cache folder for
    the session (per xdist worker), set before any fixture runs, so module-scoped models (and the
    dask workers they start) convert into the same folder the tests read, once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_MOBILESAM_CACHE", str(_session_cache(tmp_path_factory)))
        yield


def _session_cache(tmp_path_factory) -> Path:
    """The session's cache folder (one per xdist worker). Under pytest-xdist its ``openvino``
    folder is a link to one folder that every worker of the run shares: an IR converted by one
    worker is found by the others (the engine writes IRs to a temporary folder and renames it, so
    concurrent conversions are safe; :func:`shared_conversion` makes the second one wait instead).
    Embeddings and weights stay per worker."""
    cache = tmp_path_factory.getbasetemp() / "napari-mobilesam-cache"
    if os.environ.get("PYTEST_XDIST_WORKER") and not (cache / "openvino").exists():
        shared = tmp_path_factory.getbasetemp().parent / "napari-mobilesam-openvino"
        shared.mkdir(exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "openvino").symlink_to(shared, target_is_directory=True)
    return cache


@contextmanager
def shared_conversion(tmp_path_factory, name: str):
    """Hold a lock named ``name`` shared by the run's xdist workers while converting: a worker that
    needs the same IR waits for the first one's and then finds it in the shared folder (the
    engine's own cross-process lock, the one background conversions take)."""
    from napari_mobilesam.models.backends.background import _exclusive

    with _exclusive(tmp_path_factory.getbasetemp().parent / f".napari-mobilesam-{name}.lock"):
        yield


@pytest.fixture(scope="session")
def engine_sam_test():
    """The tiny random ``vit_t_test`` model (fast; same shapes as MobileSAM), shared by engine tests."""
    from napari_mobilesam.models.registry import build_sam

    return build_sam("vit_t_test", seed=0)


@pytest.fixture(scope="session")
def engine_sam_reference(reference_dir):
    """The real MobileSAM architecture with the parity fixture's random weights (slow encoder: ~1 s)."""
    from napari_mobilesam.models.registry import build_sam

    return build_sam("vit_t", reference_dir / "mobile_sam_random_weights.pt")


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    """Each test reads and writes its own widget settings file and autosave folder."""
    monkeypatch.setenv("NAPARI_MOBILESAM_CONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("NAPARI_MOBILESAM_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    monkeypatch.delenv("NAPARI_MOBILESAM_DEV", raising=False)


@pytest.fixture(scope="module")
def stack():
    """A small synthetic nuclei stack (12 x 128 x 128) for widget tests (modules may override it)."""
    from napari_mobilesam.data import synthetic_nuclei

    return synthetic_nuclei(shape=(12, 128, 128), n_nuclei=8, radius_range=(9, 14), z_radius_range=(3, 5))


@contextmanager
def dask_client(n_workers: int, *, processes: bool):
    """A ``dask.distributed`` client on a local cluster of ``n_workers`` one-thread workers
    (worker processes, or threads of this process), closed afterwards; skips without distributed."""
    distributed = pytest.importorskip("distributed")
    where = {"host": "127.0.0.1"} if processes else {}  # in-process workers talk in memory
    cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=processes,
                                       dashboard_address=None, silence_logs=40, **where)
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


_FROZEN = {"module": None, "modules": 0}


@pytest.fixture(autouse=True)
def _long_lived_objects_frozen(request):
    """Full garbage collections in the test processes scan only what was made since the last
    module with viewers began.

    A test process holds torch, napari, OpenVINO and the session's models: several hundred
    thousand objects the cyclic collector tracks, and every full collection (napari runs one at
    the end of each batched layer-list change: an image picked, a viewer closed) scanned them all,
    0.3-0.4 s each, about a third of the GUI tests' time. At the first test of each module that
    makes viewers (and whenever a test imported many modules: napari, at the first viewer) the
    previous freeze is undone, garbage collected and what lives then frozen (``gc.freeze``), so
    what a module leaves is freed at the next such module. Tests of the widgets' own freeze
    (``gc_freeze``) run unfrozen: with the marker ``gc_unfrozen``; the widgets leave gc alone while
    objects are frozen.
    """
    import gc
    import sys

    if request.node.get_closest_marker("gc_unfrozen") is not None:
        if _FROZEN["module"] is not None:
            gc.unfreeze()
            _FROZEN["module"] = None
    elif (
        _FROZEN["module"] is None
        or len(sys.modules) > _FROZEN["modules"] + 300
        or ("make_napari_viewer" in request.fixturenames and _FROZEN["module"] != request.module.__name__)
    ):
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        _FROZEN.update(module=request.module.__name__, modules=len(sys.modules))
    yield


@pytest.fixture(autouse=True)
def _gc_freeze_undone():
    """A widget left open by a test must not keep the process's objects frozen for the next tests
    (closing it undoes the freeze: ``tests/test_gc_freeze.py``); this is only the safety net."""
    yield
    import sys

    freezer = sys.modules.get("napari_mobilesam._napari.gc_freeze")
    if freezer is not None and freezer.held():
        freezer._holders.clear()
        import gc

        gc.unfreeze()


@pytest.fixture(scope="session")
def microsam_ais_decoder_ir(msdir, tmp_path_factory) -> Path:
    """Folder of the OpenVINO IR of the micro-sam fixture's AIS decoder (``vit_t_decoder.pt``,
    micro-sam's BatchNorm on each call's statistics), converted once per run (the xdist workers
    share the IR folder) into the session's cache, where the micro-sam models loaded with the
    OpenVINO backend (``tests/test_microsam.py``) find it. Tests about another conversion (the encoder's first
    start) that give the model this decoder copy the folder into their own cache
    (:func:`seed_ir`): the decoder's conversion is not what they check."""
    from napari_mobilesam.models.ais_decoder import load_ais_decoder
    from napari_mobilesam.models.backends.openvino import OpenVINOAISDecoder
    from napari_mobilesam.models.checkpoint import read_state_dict

    decoder = load_ais_decoder(read_state_dict(msdir / "vit_t_decoder.pt"))
    with pytest.MonkeyPatch.context() as mp, shared_conversion(tmp_path_factory, "ais-decoder"):
        mp.setenv("NAPARI_MOBILESAM_CACHE", str(_session_cache(tmp_path_factory)))  # whatever a test set
        ir = OpenVINOAISDecoder(decoder, precision="fp32").ir_path.parent
    return ir


@pytest.fixture(scope="session")
def lm_openvino(msdir, microsam_ais_decoder_ir, tmp_path_factory):
    """The micro-sam fixture as ``vit_t_lm`` on the OpenVINO backend in float32, loaded once per
    session (per xdist worker): its encoder and mask decoder are converted once per run (the
    workers share the IR folder) into the session's cache here (the AIS decoder by
    ``microsam_ais_decoder_ir``), where every later load of these weights with the OpenVINO
    backend finds them (``tests/test_microsam.py``, and the dask worker processes of
    ``tests/test_cluster_microsam.py``, which inherit ``NAPARI_MOBILESAM_CACHE``)."""
    from napari_mobilesam.models.registry import load_model

    with pytest.MonkeyPatch.context() as mp, shared_conversion(tmp_path_factory, "lm"):
        mp.setenv("NAPARI_MOBILESAM_CACHE", str(_session_cache(tmp_path_factory)))  # whatever a test set
        return load_model("vit_t_lm", msdir / "vit_t.pt", "cpu", backend="openvino", precision="fp32",
                          decoder=msdir / "vit_t_decoder.pt")


def seed_ir(ir_folder: Path, cache: Path) -> Path:
    """Copy a converted IR folder (see :func:`microsam_ais_decoder_ir`) into the cache folder
    ``cache`` (what ``NAPARI_MOBILESAM_CACHE`` names), under the name the engine looks for."""
    import shutil

    target = Path(cache) / "openvino" / ir_folder.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ir_folder, target)
    return target
