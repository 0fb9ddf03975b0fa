"""Same input, same embedding: one slice's embedding does not depend on what the process ran before.

A FRESH process (a subprocess) embeds a slice with the default CPU model (OpenVINO, mixed precision
where the CPU has bf16); this process embeds the same slice, then does what ``segment``,
``propagate`` and ``auto`` do and more (other slice shapes, tiles, batched prompts, models compiled
at other precisions, torch's thread count and flush-to-zero changed, a thread pinned to one core
compiling a model, concurrent encoders, a prefetch thread embedding while prompts are decoded),
and embeds the slice again with the first model and with a model loaded after all that. Every
embedding must equal the fresh process's bit for bit (tolerance 0: the property is that nothing
in the process changes the arithmetic, so any difference is a failure, however small).

``benchmarks/determinism.py`` runs the same check on the real MobileSAM architecture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_mobilesam.core.embeddings import EmbeddingCache, compute_embedding
from napari_mobilesam.core.predictor import Prompt, SlicePredictor
from napari_mobilesam.core.source import SliceSource
from napari_mobilesam.data import cell_image, synthetic_nuclei
from napari_mobilesam.models.choice import ModelChoice

SRC = Path(__file__).resolve().parents[1] / "src"

CHILD = """
import sys
import numpy as np
from napari_mobilesam.core.embeddings import compute_embedding
from napari_mobilesam.models.choice import ModelChoice
sam = ModelChoice("vit_t_test", "", "cpu", "openvino", sys.argv[1]).load()
for path in sys.argv[2:]:
    rgb = np.load(path)
    np.save(path[:-4] + ".emb.npy", compute_embedding(sam, rgb).features.numpy())
"""


def _load(precision: str = "auto"):
    return ModelChoice("vit_t_test", "", "cpu", "openvino", precision).load()


def _probes() -> list[np.ndarray]:
    nuclei = SliceSource(synthetic_nuclei(shape=(10, 256, 256), n_nuclei=8, seed=5).image)
    return [nuclei.rgb(5), SliceSource(cell_image()).rgb(0)]


def _embed(sam, rgbs) -> list[np.ndarray]:
    return [compute_embedding(sam, rgb).features.numpy().copy() for rgb in rgbs]


def _fresh(tmp_path: Path, rgbs, precision: str = "auto") -> list[np.ndarray]:
    paths = []
    for i, rgb in enumerate(rgbs):
        paths.append(str(tmp_path / f"probe{i}.npy"))
        np.save(paths[-1], rgb)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    subprocess.run([sys.executable, "-c", CHILD, precision, *paths], check=True, env=env, timeout=600)
    return [np.load(p[:-4] + ".emb.npy") for p in paths]


def _pinned_thread_embeds(rgb) -> np.ndarray:
    """Load (compile) a model and embed from a thread allowed on one core only."""
    out = {}

    def work():
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # this thread only
        out["e"] = _embed(_load(), [rgb])[0]

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return out["e"]


def _disturb(sam, rgbs) -> None:
    """What segment + propagate + auto do in one process, and more, on other data and shapes."""
    from napari_mobilesam.batch.api import (
        propagate_stack,
        segment_stack,
        segment_stack_auto,
    )

    st = synthetic_nuclei(shape=(10, 200, 330), n_nuclei=6, z_radius_range=(2.0, 3.0), seed=1)
    pts = np.array([[5, 60, 80], [5, 120, 200], [5, 150, 40]], float)
    segment_stack(st.image, pts, model=sam)
    propagate_stack(st.image, pts, model=sam, z_range=(4, 7))
    segment_stack_auto(st.image, model=sam, z_range=(4, 6))
    big = synthetic_nuclei(shape=(1, 640, 400), n_nuclei=10, seed=2).image  # 2 x 2 tiles
    segment_stack(big, np.array([[0, 100, 100], [0, 560, 340]], float), model=sam, tile=384, halo=64)
    for precision in ("fp32", "bf16"):  # the same IR compiled at other precisions
        _embed(_load(precision), rgbs[:1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        _embed(sam, [rgbs[0][::2, ::3].copy()])
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    _pinned_thread_embeds(rgbs[1])
    other = _load()  # two encoders running at once
    t = threading.Thread(target=_embed, args=(other, rgbs[:1]))
    t.start()
    _embed(sam, [np.ascontiguousarray(rgbs[1][::-1])])
    t.join()
    src = SliceSource(st.image)  # a prefetch thread embedding while prompts are decoded
    cache = EmbeddingCache(sam)
    pred = SlicePredictor(sam, src, cache)
    pred.predict(0, points=pts[:1, 1:], labels=np.ones(1))
    futures = cache.prefetch(src, range(1, 4))
    prompts = [Prompt(points=pts[: k + 1, 1:], labels=np.ones(k + 1)) for k in range(3)]
    while not all(f.done() for f in futures):
        pred.predict_many(0, prompts)
    cache.close()


@pytest.mark.slow
def test_embedding_does_not_depend_on_what_the_process_ran_before(tmp_path):
    rgbs = _probes()
    sam = _load()
    assert sam.image_encoder.backend_name == "openvino"
    first = _embed(sam, rgbs)  # also converts the IR the fresh process then reads
    fresh = _fresh(tmp_path, rgbs)
    _disturb(sam, rgbs)
    again = _embed(sam, rgbs)
    later = _embed(_load(), rgbs)
    for i, f in enumerate(fresh):
        for name, got in (("before", first[i]), ("after", again[i]), ("model loaded after", later[i])):
            diff = float(np.abs(got - f).max())
            assert np.array_equal(got, f), f"probe {i}, {name}: differs from a fresh process by {diff:.3g}"


def test_compiled_encoder_runs_one_shape_only():
    """Each compiled encoder part has the one static input shape it runs (kernels chosen once,
    at compile time, never from the shapes a dynamic model saw before) and the arithmetic settings
    are explicit (precision, execution mode, denormals)."""
    sam = _load()
    enc = sam.image_encoder
    shapes = [tuple(r.get_compiled_model().inputs[0].get_shape()) for r in enc._requests]
    assert shapes[0] == (1, 3, enc.img_size, enc.img_size)
    assert all(len(s) == 4 and s[0] == 1 for s in shapes)
    for r in enc._requests:
        cm = r.get_compiled_model()
        assert str(cm.get_property("EXECUTION_MODE_HINT")).endswith("PERFORMANCE")
        assert cm.get_property("CPU_DENORMALS_OPTIMIZATION") is False
    with pytest.raises(ValueError, match="expected a"):
        enc(torch.zeros(1, 3, 512, 512))
