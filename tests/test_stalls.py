"""What keeps the GUI thread from stalling while workers run (see benchmarks/interaction.py --stalls)."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("openvino")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_MOBILESAM_CACHE", str(folder))
    return folder


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 256, 64, 64, generator=g), torch.randn(1, 256, 64, 64, generator=g),
            torch.randn(1, 3, 256, generator=g), torch.randn(1, 256, 64, 64, generator=g))


def test_mask_decoder_threads_have_their_own_request(fresh_cache, engine_sam_test):
    """A click's decoding on the GUI thread never waits for a worker's decoding (no shared lock):
    each thread has its own infer request and token caches, and results do not mix."""
    from napari_mobilesam.models.backends import OpenVINOMaskDecoder

    dec = OpenVINOMaskDecoder(engine_sam_test.mask_decoder)
    cases = [_inputs(i) for i in range(4)]
    alone = [dec(*c, True) for c in cases]
    out, requests = {}, {}

    def run(i):
        requests[i] = dec._thread_state()[0]
        for _ in range(5):  # alternate images within a thread, others run meanwhile
            for j in (i, (i + 1) % 4):
                out[(i, j)] = dec(*cases[j], True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in requests.values()}) == 4
    assert dec._thread_state()[0] not in requests.values()
    for (_, j), (masks, iou) in out.items():
        torch.testing.assert_close(masks, alone[j][0])
        torch.testing.assert_close(iou, alone[j][1])
