"""EmbeddingCache: lazy compute, byte-bounded LRU, atomic disk cache, precompute, prefetch."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from napari_mobilesam.core.embeddings import (
    EmbeddingCache,
    compute_embedding,
    input_size_for,
)
from napari_mobilesam.core.source import SliceSource

SLICE_BYTES_F16 = 256 * 64 * 64 * 2


@pytest.fixture()
def stack():
    rng = np.random.default_rng(0)
    return SliceSource(rng.integers(0, 4000, size=(6, 48, 40), dtype=np.uint16))


def test_get_computes_once_and_matches_encoder(engine_sam_test, stack):
    cache = EmbeddingCache(engine_sam_test, dtype=torch.float32)
    e = cache.get(stack, 2)
    assert e.features.dtype == torch.float32 and tuple(e.features.shape) == (1, 256, 64, 64)
    assert e.original_size == (48, 40) and e.input_size == input_size_for((48, 40)) == (1024, 853)
    direct = compute_embedding(engine_sam_test, stack.rgb(2))
    assert torch.equal(direct.features, e.features)
    again = cache.get(stack, 2)
    assert torch.equal(again.features, e.features)
    s = cache.stats
    assert (s.computed, s.hits, s.entries, s.bytes) == (1, 1, 1, 256 * 64 * 64 * 4)
    assert s.hit_rate == 0.5


def test_get_again_returns_the_same_tensor_unless_changed(engine_sam_test, stack):
    cache = EmbeddingCache(engine_sam_test)  # float16 storage: `get` converts to float32
    a = cache.get(stack, 1).features
    assert cache.get(stack, 1).features is a  # so the decoder knows the image without comparing
    ref = a.clone()
    a.zero_()  # a caller changes its tensor in place: the cache must not hand it out again
    b = cache.get(stack, 1).features
    assert b is not a and torch.equal(b, ref)
    other = cache.get(stack, 2).features
    assert not torch.equal(other, ref) and torch.equal(cache.get(stack, 1).features, ref)


def test_same_content_shares_entry(engine_sam_test):
    data = np.random.default_rng(1).integers(0, 255, size=(3, 32, 32), dtype=np.uint8)
    data[2] = data[0]
    a = SliceSource(data, normalize="none")
    b = SliceSource(data.copy(), normalize="none")
    cache = EmbeddingCache(engine_sam_test)
    cache.get(a, 0)
    cache.get(a, 2)
    cache.get(b, 0)
    assert cache.stats.computed == 1 and cache.stats.hits == 2


def test_lru_is_bounded_by_bytes_and_float16(engine_sam_test, stack):
    cache = EmbeddingCache(engine_sam_test, max_bytes=2 * SLICE_BYTES_F16 + 100)
    for z in (0, 1, 2):
        cache.get(stack, z)
    s = cache.stats
    assert s.entries == 2 and s.bytes == 2 * SLICE_BYTES_F16 and s.evictions == 1
    assert not cache.is_cached(stack, 0) and cache.is_cached(stack, 2)
    cache.get(stack, 1)  # now 1 is the most recently used, so 3 evicts 2
    cache.get(stack, 3)
    assert cache.is_cached(stack, 1) and cache.is_cached(stack, 3) and not cache.is_cached(stack, 2)
    # float16 storage, float32 out, close to the float32 result
    f32 = compute_embedding(engine_sam_test, stack.rgb(3)).features
    got = cache.get(stack, 3).features
    assert got.dtype == torch.float32
    assert torch.allclose(got, f32, atol=1e-3 * float(f32.abs().max()) + 1e-3)
    with pytest.raises(ValueError, match="max_bytes"):
        EmbeddingCache(engine_sam_test, max_bytes=-1)
    with pytest.raises(ValueError, match="dtype"):
        EmbeddingCache(engine_sam_test, dtype=torch.bfloat16)


def test_disk_cache_round_trip_and_corruption(engine_sam_test, stack, tmp_path):
    c1 = EmbeddingCache(engine_sam_test, disk_dir=tmp_path)
    e1 = c1.get(stack, 4).features
    files = list(tmp_path.rglob("*.npy"))
    assert len(files) == 1 and not list(tmp_path.rglob("*.tmp"))
    c2 = EmbeddingCache(engine_sam_test, disk_dir=tmp_path, max_bytes=0)
    assert c2.is_cached(stack, 4)
    e2 = c2.get(stack, 4).features
    assert torch.equal(e1, e2) and c2.stats.disk_hits == 1 and c2.stats.computed == 0
    # a truncated / garbage entry is never loaded: it is recomputed and replaced
    files[0].write_bytes(files[0].read_bytes()[:1000])
    c3 = EmbeddingCache(engine_sam_test, disk_dir=tmp_path)
    assert torch.equal(c3.get(stack, 4).features, e1) and c3.stats.computed == 1
    assert np.load(files[0]).shape == (1, 256, 64, 64)
    # a different normalisation is a different entry
    other = SliceSource(stack.data, normalize="slice")
    c3.get(other, 4)
    assert c3.stats.computed == 2 and len(list(tmp_path.rglob("*.npy"))) == 2


def test_disk_cache_is_bounded_least_recently_used_first(engine_sam_test, stack, tmp_path):
    entry = 256 * 64 * 64 * 2 + 128  # one float16 entry and its .npy header
    cache = EmbeddingCache(engine_sam_test, max_bytes=0, disk_dir=tmp_path, max_disk_bytes=int(3.5 * entry))

    def on_disk():
        return sorted(p.stat().st_mtime_ns for p in tmp_path.glob("*/*/*.npy"))

    for z in range(3):
        cache.get(stack, z)
    assert len(on_disk()) == 3 and cache.stats.disk_evictions == 0
    # slice 0 is read again (from disk: memory keeps nothing) and so becomes the most recent
    old = time.time() - 100
    for i, p in enumerate(sorted(tmp_path.glob("*/*/*.npy"))):
        os.utime(p, (old + i, old + i))
    cache.get(stack, 0)
    assert cache.stats.disk_hits == 1
    cache.get(stack, 3)  # a 4th entry goes over the budget: evict down to 90% of it
    assert cache.stats.disk_evictions >= 1
    left = len(on_disk())
    assert left <= 3 and sum(p.stat().st_size for p in tmp_path.glob("*/*/*.npy")) <= int(3.5 * entry)
    assert cache.is_cached(stack, 0) and cache.is_cached(stack, 3)  # used last: kept
    # a second cache on the same folder (another session) counts what is already there
    other = EmbeddingCache(engine_sam_test, max_bytes=0, disk_dir=tmp_path, max_disk_bytes=int(3.5 * entry))
    other.get(stack, 4)
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*/*.npy")) <= int(3.5 * entry)
    assert other.is_cached(stack, 4)
    with pytest.raises(ValueError, match="max_disk_bytes"):
        EmbeddingCache(engine_sam_test, disk_dir=tmp_path, max_disk_bytes=-1)


def test_crash_mid_write_leaves_no_entry(engine_sam_test, stack, tmp_path, monkeypatch):
    cache = EmbeddingCache(engine_sam_test, disk_dir=tmp_path)
    real_save = np.save

    def crashing_save(f, arr, **kw):
        real_save(f, arr[..., :3], **kw)  # half-written content...
        raise OSError("disk full")  # ...then the write dies

    monkeypatch.setattr(np, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.get(stack, 1)
    monkeypatch.setattr(np, "save", real_save)
    assert not list(tmp_path.rglob("*.npy")) and not list(tmp_path.rglob("*.tmp"))
    fresh = EmbeddingCache(engine_sam_test, disk_dir=tmp_path)
    assert not fresh.is_cached(stack, 1)
    fresh.get(stack, 1)
    assert fresh.stats.computed == 1


def test_model_identity_in_key(engine_sam_test, stack, tmp_path):
    from napari_mobilesam.models.registry import build_sam

    other = build_sam("vit_t_test", seed=1)
    EmbeddingCache(engine_sam_test, disk_dir=tmp_path).get(stack, 0)
    c = EmbeddingCache(other, disk_dir=tmp_path)
    assert not c.is_cached(stack, 0)
    c.get(stack, 0)
    assert c.stats.computed == 1 and len(list(tmp_path.rglob("*.npy"))) == 2
    # weights changed in place (e.g. during training): memory entries are dropped, not served stale
    before = c.get(stack, 0).features
    with torch.no_grad():
        other.image_encoder.neck[0].weight.mul_(2.0)
    after = c.get(stack, 0).features
    assert c.stats.computed == 2 and not torch.equal(before, after)


def test_precompute_progress_and_cancel(engine_sam_test, stack):
    cache = EmbeddingCache(engine_sam_test)
    seen = []
    n = cache.precompute(stack, [0, 1, 2], progress=lambda d, t: seen.append((d, t)))
    assert n == 3 and seen == [(1, 3), (2, 3), (3, 3)] and cache.stats.computed == 3
    calls = []
    n = cache.precompute(stack, None, progress=lambda d, t: calls.append(d), cancel=lambda: len(calls) >= 4)
    assert n == 4 and cache.stats.computed == 4  # 0-2 were cached; 3 computed, then cancelled


def test_prefetch_in_background(engine_sam_test, stack):
    cache = EmbeddingCache(engine_sam_test)
    try:
        futures = cache.prefetch(stack, [3, 4, 99, -1])  # out-of-range slices are skipped
        assert len(futures) == 2
        cache.wait_prefetch(timeout=60)
        assert cache.is_cached(stack, 3) and cache.is_cached(stack, 4)
        computed = cache.stats.computed
        cache.get(stack, 3)
        assert cache.stats.computed == computed == 2
        # replacing cancels what has not started
        cache.prefetch(stack, [0, 1, 2, 5])
        cache.cancel_prefetch()
        cache.wait_prefetch(timeout=60)
        assert cache.stats.computed <= 3
    finally:
        cache.close()


def test_predictor_prefetches_neighbours(engine_sam_test, stack):
    from napari_mobilesam.core.predictor import SlicePredictor

    pred = SlicePredictor(engine_sam_test, stack)
    try:
        pred.prefetch_around(0, radius=2)  # z = 1 and 2 (no negative slices)
        pred.cache.wait_prefetch(timeout=60)
        assert [pred.cache.is_cached(stack, z) for z in range(6)] == [False, True, True, False, False, False]
    finally:
        pred.cache.close()


def test_put_stores_an_embedding_computed_elsewhere(engine_sam_test, stack, tmp_path):
    src = EmbeddingCache(engine_sam_test, dtype=torch.float32)
    feats = src.get(stack, 3).features
    cache = EmbeddingCache(engine_sam_test, disk_dir=tmp_path)
    cache.put(stack, 3, feats.numpy()[0])  # (256, 64, 64) is accepted too
    assert cache.is_cached(stack, 3) and cache.stats.computed == 0
    got = cache.get(stack, 3)
    assert got.original_size == (48, 40) and got.input_size == input_size_for((48, 40))
    assert torch.allclose(got.features, feats, atol=1e-2)  # float16 storage
    cache.clear_memory()
    assert torch.equal(cache.get(stack, 3).features, got.features)  # from disk
    assert cache.stats.computed == 0
    with pytest.raises(ValueError, match="shape"):
        cache.put(stack, 3, np.zeros((1, 256, 32, 32), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        cache.put(stack, 3, np.full((1, 256, 64, 64), np.nan, np.float32))


def test_disk_entries_with_wrong_values_are_detected(engine_sam_test, stack, tmp_path):
    c1 = EmbeddingCache(engine_sam_test, disk_dir=tmp_path)
    e0, e1 = c1.get(stack, 0).features, c1.get(stack, 1).features
    f0, f1 = sorted(tmp_path.rglob("*.npy"), key=lambda p: p.stat().st_mtime_ns)
    good0 = f0.read_bytes()
    # a well-formed .npy with other values (e.g. written by hand or by an old version)
    arr = np.load(f0)
    with open(f0, "wb") as f:
        np.save(f, arr * 0.5)
    # another slice's entry, checksum and all, under this slice's name
    f1_bytes = f1.read_bytes()
    f1.write_bytes(good0)
    c2 = EmbeddingCache(engine_sam_test, disk_dir=tmp_path, max_bytes=0)
    assert torch.equal(c2.get(stack, 0).features, e0) and torch.equal(c2.get(stack, 1).features, e1)
    assert c2.stats.damaged == 2 and c2.stats.computed == 2 and c2.stats.disk_hits == 0
    assert f1.read_bytes() == f1_bytes  # replaced by the right entry
    c3 = EmbeddingCache(engine_sam_test, disk_dir=tmp_path, max_bytes=0)
    c3.get(stack, 0), c3.get(stack, 1)
    assert c3.stats.disk_hits == 2 and c3.stats.damaged == 0


def test_disk_dir_that_is_a_file(engine_sam_test, tmp_path):
    from napari_mobilesam.errors import InputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file; give a folder"):
        EmbeddingCache(engine_sam_test, disk_dir=tmp_path / "file")
