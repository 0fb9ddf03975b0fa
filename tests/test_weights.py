"""Weights download and cache, against a real HTTP server on 127.0.0.1 serving generated files."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server API
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(tmp_path):
    """Serve ``tmp_path/served`` on 127.0.0.1; yields (base_url, folder, request log)."""
    root = tmp_path / "served"
    root.mkdir()
    log: list[str] = []
    handler = type("H", (_Handler,), {"requests": log})

    def factory(*args, **kwargs):
        return handler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, log
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_MOBILESAM_CACHE", str(folder))
    return folder


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mobile_sam.pt"  # nothing listens there any more


def test_cache_dir_follows_environment(cache):
    from napari_mobilesam.models.weights import cache_dir, weights_path

    assert cache_dir() == cache
    assert weights_path("vit_t") == cache / "weights" / "mobile_sam.pt"


def test_good_file_downloaded_once_then_reused(server, cache):
    from napari_mobilesam.models.weights import fetch_weights

    base, root, log = server
    data = os.urandom(300_000)
    (root / "mobile_sam.pt").write_bytes(data)
    url = f"{base}/mobile_sam.pt"
    path = fetch_weights("vit_t", url=url, sha256=_sha(data))
    assert path == cache / "weights" / "mobile_sam.pt"
    assert path.read_bytes() == data
    assert log == ["/mobile_sam.pt"]
    again = fetch_weights("vit_t", url=url, sha256=_sha(data))
    assert again == path
    assert log == ["/mobile_sam.pt"]  # no second request


def test_wrong_hash_rejected_and_nothing_left(server, cache):
    from napari_mobilesam.models.weights import WeightsHashError, fetch_weights

    base, root, log = server
    (root / "mobile_sam.pt").write_bytes(b"forged" * 1000)
    with pytest.raises(WeightsHashError, match="SHA-256"):
        fetch_weights("vit_t", url=f"{base}/mobile_sam.pt", sha256=_sha(b"the real file"))
    assert log  # it really was requested
    leftovers = list((cache / "weights").iterdir()) if (cache / "weights").exists() else []
    assert leftovers == []


def test_offline_error_names_file_place_and_source(cache):
    from napari_mobilesam.models.weights import WEIGHTS, WeightsError, fetch_weights

    with pytest.raises(WeightsError) as err:
        fetch_weights("vit_t", url=_free_port_url(), timeout=5)
    msg = str(err.value)
    assert "mobile_sam.pt" in msg
    assert str(cache / "weights" / "mobile_sam.pt") in msg  # where to put it
    assert WEIGHTS["vit_t"].sha256 in msg
    assert "checkpoint=" in msg
    assert not (cache / "weights" / "mobile_sam.pt").exists()


def test_manually_placed_file_is_used_offline(cache):
    from napari_mobilesam.models.weights import fetch_weights

    data = b"pretend checkpoint bytes"
    target = cache / "weights" / "mobile_sam.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    # no server at all: the verified cached copy is returned without any network access
    assert fetch_weights("vit_t", url=_free_port_url(), sha256=_sha(data)) == target


def test_corrupt_cached_file_is_replaced_by_good_download(server, cache):
    from napari_mobilesam.models.weights import fetch_weights

    base, root, log = server
    data = os.urandom(1000)
    (root / "mobile_sam.pt").write_bytes(data)
    target = cache / "weights" / "mobile_sam.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(data[:500])  # a truncated earlier download
    assert fetch_weights("vit_t", url=f"{base}/mobile_sam.pt", sha256=_sha(data)) == target
    assert target.read_bytes() == data


def test_unknown_model_weights():
    from napari_mobilesam.models.weights import fetch_weights

    with pytest.raises(ValueError, match="vit_t"):
        fetch_weights("vit_x")


def test_build_sam_downloads_default_weights_on_first_use(server, cache, reference_dir, monkeypatch):
    """``build_sam("vit_t")`` with no checkpoint fetches the default file, then reuses it."""
    from napari_mobilesam import build_sam, model_identity
    from napari_mobilesam.models import weights

    base, root, log = server
    data = (reference_dir / "mobile_sam_random_weights.pt").read_bytes()
    (root / "mobile_sam.pt").write_bytes(data)
    entry = weights.WEIGHTS["vit_t"]
    monkeypatch.setitem(
        weights.WEIGHTS,
        "vit_t",
        weights.WeightsFile(entry.filename, f"{base}/mobile_sam.pt", _sha(data), len(data)),
    )
    sam = build_sam("vit_t")
    assert Path(sam.napari_mobilesam_info["source"]) == cache / "weights" / "mobile_sam.pt"
    sam2 = build_sam("vit_t")
    assert log == ["/mobile_sam.pt"]
    assert model_identity(sam) == model_identity(sam2)


def test_microsam_model_and_decoder_fetched_with_xxh128(server, cache, monkeypatch, reference_dir):
    """``build_sam("vit_t_lm")`` downloads the model and its AIS decoder, checks their xxh128
    hashes (as micro-sam publishes them), then reuses both; a forged file is refused."""
    import pooch

    from napari_mobilesam.models import weights
    from napari_mobilesam.models.registry import ais_decoder, build_sam

    base, root, log = server
    ms = reference_dir / "microsam"
    for name, src in (("vit_t_lm", "vit_t.pt"), ("vit_t_lm_decoder", "vit_t_decoder.pt")):
        (root / f"{name}.pt").write_bytes((ms / src).read_bytes())
        digest = pooch.file_hash(str(root / f"{name}.pt"), alg="xxh128")
        monkeypatch.setitem(weights.WEIGHTS, name, weights.WeightsFile(
            f"{name}.pt", f"{base}/{name}.pt", "", None, digest))
    sam = build_sam("vit_t_lm")
    assert ais_decoder(sam) is not None
    assert sorted(log) == ["/vit_t_lm.pt", "/vit_t_lm_decoder.pt"]
    assert (cache / "weights" / "vit_t_lm_decoder.pt.xxh128").exists()
    build_sam("vit_t_lm")
    assert len(log) == 2  # reused, no new request

    entry = weights.WEIGHTS["vit_t_lm_decoder"]
    monkeypatch.setitem(weights.WEIGHTS, "vit_t_lm_decoder", weights.WeightsFile(
        entry.filename, entry.url, "", None, "0" * 32))
    (cache / "weights" / "vit_t_lm_decoder.pt").unlink()
    with pytest.raises(weights.WeightsHashError, match="xxh128"):
        weights.fetch_weights("vit_t_lm_decoder")
