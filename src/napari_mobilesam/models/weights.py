"""Per-user weights cache and downloads with pinned hashes (pooch): SHA-256, or xxh128 for micro-sam.

Nothing is downloaded at import: :func:`fetch_weights` runs when a model is built without an
explicit checkpoint. The cache folder is ``$NAPARI_MOBILESAM_CACHE`` when that variable is set,
otherwise the platform's user cache (``~/.cache/napari-mobilesam`` on Linux). Layout::

    <cache>/weights/mobile_sam.pt          downloaded checkpoints (official file names)
    <cache>/weights/mobile_sam.pt.sha256   "<size> <mtime_ns> <sha256>": skip re-hashing big files
    <cache>/weights/vit_t_lm.pt            micro-sam's files, named after the model (theirs are all
    <cache>/weights/vit_t_lm_decoder.pt    "vit_t.pt"); hashes pinned as xxh128, as micro-sam does,
                                           remembered in "<file>.xxh128" (needs the xxhash package)
    <cache>/openvino/<key>/                converted OpenVINO models (see backends.py)

Downloads go to a temporary file in the same folder and are renamed only after the SHA-256
matched, so a failed or forged download leaves nothing behind. Offline, the error names the
missing file, where to put it and where to get it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError, WeightsHashError
from .checkpoint import file_sha256

__all__ = [
    "WEIGHTS",
    "WeightsFile",
    "WeightsError",
    "WeightsHashError",
    "cache_dir",
    "weights_path",
    "fetch_weights",
    "verified_sha256",
    "verified_digest",
    "decoder_entry",
]

log = logging.getLogger(__name__)

CACHE_ENV = "NAPARI_MOBILESAM_CACHE"


@dataclass(frozen=True)
class WeightsFile:
    """A published checkpoint: file name, URL, pinned SHA-256 (hex) and size in bytes (or None).

    micro-sam publishes xxh128 hashes only: those entries have ``sha256=""`` and ``xxh128`` set.
    """

    filename: str
    url: str
    sha256: str
    size: int | None = None
    xxh128: str | None = None

    @property
    def algorithm(self) -> str:
        return "sha256" if self.sha256 else "xxh128"

    @property
    def hash_name(self) -> str:
        """For messages: ``"SHA-256"`` or ``"xxh128"``."""
        return "SHA-256" if self.sha256 else "xxh128"

    @property
    def digest(self) -> str:
        return self.sha256 or (self.xxh128 or "")

    @property
    def known_hash(self) -> str:
        """pooch's ``known_hash``: ``"sha256:<hex>"`` or ``"xxh128:<hex>"``."""
        return f"{self.algorithm}:{self.digest}"


_META = "https://dl.fbaipublicfiles.com/segment_anything/"
WEIGHTS: dict[str, WeightsFile] = {
    "vit_t": WeightsFile(
        "mobile_sam.pt",
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        40_728_226,
    ),
    "vit_b": WeightsFile(
        "sam_vit_b_01ec64.pth",
        _META + "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": WeightsFile(
        "sam_vit_l_0b3195.pth",
        _META + "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": WeightsFile(
        "sam_vit_h_4b8939.pth",
        _META + "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
}

# micro-sam's generalist models (BioImage.IO model zoo; URLs and xxh128 hashes as published in
# micro_sam.util.models(), micro-sam 1.8). "<model>_decoder" is each model's AIS decoder.
_ZOO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/"
_MICROSAM = {
    "vit_t_lm": ("faithful-chicken/1.1/files/vit_t", "72ec5074774761a6e5c05a08942f981e",
                 "3e914a5f397b0312cdd36813031f8823"),
    "vit_t_em_organelles": ("greedy-whale/1/files/vit_t", "253474720c497cce605e57c9b1d18fd9",
                            "8f897c7bb93174a4d1638827c4dd6f44"),
    "vit_b_lm": ("diplomatic-bug/1.2/files/vit_b", "fe9252a29f3f4ea53c15a06de471e186",
                 "708b15ac620e235f90bb38612c4929ba"),
    "vit_b_em_organelles": ("noisy-ox/1.2/files/vit_b", "f3bf2ed83d691456bae2c3f9a05fb438",
                            "bb6398956a6b0132c26b631c14f95ce2"),
}
for _name, (_stem, _model_hash, _decoder_hash) in _MICROSAM.items():
    WEIGHTS[_name] = WeightsFile(f"{_name}.pt", f"{_ZOO}{_stem}.pt", "", None, _model_hash)
    WEIGHTS[f"{_name}_decoder"] = WeightsFile(
        f"{_name}_decoder.pt", f"{_ZOO}{_stem}_decoder.pt", "", None, _decoder_hash
    )


def decoder_entry(model: str) -> str | None:
    """The WEIGHTS key of ``model``'s AIS decoder (``"vit_t_lm_decoder"``), or None if it has none."""
    key = f"{model}_decoder"
    return key if key in WEIGHTS else None




def cache_dir() -> Path:
    """Root of the per-user cache: ``$NAPARI_MOBILESAM_CACHE`` or the platform's user cache."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-mobilesam"))


def _entry(model: str) -> WeightsFile:
    if model not in WEIGHTS:
        raise ValueError(
            f"no published weights for model {model!r}; known: {', '.join(WEIGHTS)} "
            "(pass checkpoint=<path> for your own)"
        )
    return WEIGHTS[model]


def weights_path(model: str = "vit_t") -> Path:
    """Where the weights of ``model`` live in the cache (whether or not they are there yet)."""
    return cache_dir() / "weights" / _entry(model).filename


def verified_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of ``path``, remembered beside it (keyed by size and mtime) to avoid re-hashing."""
    return verified_digest(path, "sha256")


def _file_digest(p: Path, algorithm: str) -> str:
    if algorithm == "sha256":
        return file_sha256(p)
    import pooch

    return pooch.file_hash(str(p), alg=algorithm)


def verified_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest (``"sha256"`` or ``"xxh128"``) of ``path``, remembered beside it in
    ``<file>.<algorithm>`` (keyed by size and mtime) to avoid re-hashing."""
    p = Path(path)
    st = p.stat()
    stamp = p.with_name(f"{p.name}.{algorithm}")
    key = f"{st.st_size} {st.st_mtime_ns}"
    try:
        size, mtime, digest = stamp.read_text().split()
        if f"{size} {mtime}" == key and len(digest) in (32, 64):
            return digest
    except (OSError, ValueError):
        pass
    digest = _file_digest(p, algorithm)
    try:
        stamp.write_text(f"{key} {digest}\n")
    except OSError:  # read-only location: just don't remember
        pass
    return digest


def _advice(entry: WeightsFile, target: Path) -> str:
    size = f", {entry.size:,} bytes" if entry.size else ""
    return (
        f"Download {entry.filename} ({entry.url}{size}, {entry.hash_name} {entry.digest}) on a machine "
        f"with internet access and put it at {target}, or pass checkpoint='/path/to/"
        f"{entry.filename}' when loading the model. Set {CACHE_ENV} to move the cache folder."
    )


def fetch_weights(
    model: str = "vit_t",
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Path of the verified weights of ``model`` in the cache, downloading them on first use.

    ``url``/``sha256`` override the published ones (a mirror). A cached file with the right hash
    is reused without any network access. Raises :class:`WeightsHashError` when the download's
    SHA-256 is wrong (no file is left in the cache) and :class:`WeightsError` when the file cannot
    be downloaded (the message says where to put a manually downloaded copy).
    """
    entry = _entry(model)
    if url is not None or sha256 is not None:
        xxh = None if sha256 else entry.xxh128
        entry = WeightsFile(entry.filename, url or entry.url, sha256 or entry.sha256, None, xxh)
    target = weights_path(model)
    if target.exists():
        if verified_digest(target, entry.algorithm) == entry.digest:
            return target
        log.warning("cached %s has the wrong %s; downloading it again", target, entry.hash_name)
    import pooch
    import requests

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s weights from %s to %s", model, entry.url, target)
    try:
        path = pooch.retrieve(
            entry.url,
            known_hash=entry.known_hash,
            fname=target.name,
            path=target.parent,
            progressbar=progress,
            downloader=pooch.HTTPDownloader(timeout=timeout, progressbar=progress),
        )
    except ValueError as exc:
        if "hash" not in str(exc).lower():
            raise
        raise WeightsHashError(
            f"the file downloaded from {entry.url} does not have the pinned {entry.hash_name} "
            f"{entry.digest}; it was discarded (nothing was written to {target.parent}). "
            + _advice(entry, target)
        ) from exc
    except (requests.exceptions.RequestException, OSError) as exc:
        state = f"has the wrong {entry.hash_name}" if target.exists() else "is missing"
        raise WeightsError(
            f"{model} weights {target} {state} and could not be downloaded from {entry.url} "
            f"({type(exc).__name__}: {exc}). " + _advice(entry, target)
        ) from exc
    path = Path(path)
    verified_digest(path, entry.algorithm)  # remember the hash pooch just checked
    return path
