"""The first start does not wait for the OpenVINO conversion.

Converting MobileSAM's encoder and mask decoder to OpenVINO IR takes tens of seconds on an idle
CPU and minutes on a loaded one, once per weights (the IR is cached, see
:mod:`~napari_mobilesam.models.backends.openvino`). :func:`start_with_torch` loads the model with
the exact torch backend at once (float32, so masks flow) and, when the IR is not cached yet,
starts a :class:`BackgroundConversion`: a separate Python process at the lowest CPU priority
(``nice 19``) writes the IR into the cache. A process rather than a thread, because tracing the
model holds the GIL for long stretches and would stall a GUI in this process; and because it can
be stopped at once (:meth:`BackgroundConversion.cancel`). At most one conversion of one model runs
at a time on a computer: the process holds an exclusive lock on
``<cache>/openvino/.lock-<weights key>`` (POSIX ``flock``; released by the system when the process
dies), and a second one waits for it and then finds the IR cached.

When the conversion has finished, :meth:`BackgroundConversion.build` compiles the cached IR (a
few seconds; off the GUI thread) and :meth:`BackgroundConversion.switch` puts the OpenVINO
encoder and decoder into the running model, in place. The model's identity changes with the
backend (:func:`~napari_mobilesam.models.registry.model_identity`), so embedding caches keyed by
it recompute each slice lazily, with the fast encoder, the next time it is needed; embeddings
computed with the torch path are kept under the torch identity (on disk too) and never mixed
with OpenVINO ones. micro-sam's AIS decoder stays on torch in the running model (it is converted,
in the foreground, at the next start).

A failed conversion leaves the torch model as it is; :attr:`BackgroundConversion.error` says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = [
    "BackgroundConversion",
    "start_with_torch",
    "openvino_available",
    "lock_path",
    "main",
]

log = logging.getLogger(__name__)


def openvino_available() -> bool:
    """Whether the OpenVINO package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class BackgroundConversion:
    """The OpenVINO conversion of one model's encoder and mask decoder in a low-priority process.

    Parameters
    ----------
    encoder, decoder : torch modules
        The model's image encoder and mask decoder as built (exact float32, before any backend);
        they are kept (not copied) to build the OpenVINO modules at the end.
    arch : str
        The registry name of the architecture (``"vit_t"``, ``"vit_t_test"``, …): the other
        process builds it and loads these weights into it.
    precision : str
        The OpenVINO precision to compile with at the end (``"auto"``, ``"fp32"``, ``"mixed"``,
        ``"bf16"``).
    ais_decoder : torch module or None
        The model's AIS decoder (micro-sam's models), converted by :meth:`build` with the encoder
        (in this process: it has no conversion of its own in the background).
    ais_precision : str
        Its precision (``"auto"``: the encoder's; see ``backends.apply_decoder_backend``).

    Attributes
    ----------
    state : str
        ``"idle"``, ``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``.
    error : str
        Why the conversion failed (the other process's last line), empty otherwise.
    output : str
        The last line the converting process wrote (e.g. ``"converted in 41.2 s"``).
    finished : threading.Event
        Set when the process has ended, whatever the outcome.
    nice : int
        The converting process's niceness (class attribute; default 19, the lowest priority: on
        a machine kept busy by other work the conversion then waits for idle time).
    """

    nice: int = 19

    def __init__(self, encoder, decoder, arch: str, precision: str = "auto", *,
                 ais_decoder=None, ais_precision: str = "auto") -> None:
        self.encoder, self.decoder, self.arch, self.precision = encoder, decoder, arch, precision
        self.ais_decoder, self.ais_precision = ais_decoder, ais_precision
        self.state = "idle"
        self.error = ""
        self.output = ""
        self.finished = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._folder: Path | None = None
        self._lock = threading.Lock()

    # -- running -----------------------------------------------------------------------------
    def start(self) -> BackgroundConversion:
        """Write the weights to a temporary file and start the converting process; returns self."""
        import torch

        from ..weights import cache_dir

        with self._lock:
            if self.state != "idle":
                raise RuntimeError(f"this conversion was already started ({self.state})")
            self.state = "running"
        self._folder = Path(tempfile.mkdtemp(prefix="mobilesam-convert-"))
        state = self._folder / "weights.pt"
        torch.save({"arch": self.arch, "encoder": self.encoder.state_dict(),
                    "decoder": self.decoder.state_dict()}, state)
        env = dict(os.environ)
        env["NAPARI_MOBILESAM_CACHE"] = str(cache_dir())
        package_root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        log_path = self._folder / "log.txt"
        with open(log_path, "wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "napari_mobilesam.models.backends.background", str(state),
                 str(os.getpid()), str(int(self.nice))],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        threading.Thread(target=self._watch, args=(log_path,), daemon=True,
                         name="mobilesam-conversion-watch").start()
        return self

    def _watch(self, log_path: Path) -> None:
        code = self._proc.wait()
        self.output = _tail(log_path)
        with self._lock:
            if self.state == "running":
                if code == 0:
                    self.state = "done"
                else:
                    self.error = f"the conversion process ended with status {code}: {self.output}"
                    self.state = "failed"
                    log.warning("OpenVINO conversion failed; keeping the torch backend (%s)", self.error)
        _remove_leftovers(self._proc.pid)
        shutil.rmtree(self._folder, ignore_errors=True)
        self.finished.set()

    @property
    def running(self) -> bool:
        return self.state == "running"

    def wait(self, timeout: float | None = None, cancelled=None) -> bool:
        """Wait until the process ends (or ``timeout`` s, or ``cancelled()`` turns True: then the
        conversion is cancelled). True when the conversion succeeded."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished.wait(0.1):
            if cancelled is not None and cancelled():
                self.cancel()
                return False
            if end is not None and time.monotonic() > end:
                return False
        return self.state == "done"

    def cancel(self) -> None:
        """Stop the converting process at once (nothing half-written stays in the cache)."""
        with self._lock:
            if self.state in ("idle", "running"):
                self.state = "cancelled"
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        if proc is None:
            self.finished.set()

    # -- switching ---------------------------------------------------------------------------
    def build(self):
        """The OpenVINO ``(encoder, mask decoder, AIS decoder or None)`` from the cached IR
        (compiling, and converting the AIS decoder in its ``ais_precision``: seconds; call it off
        the GUI thread, after the conversion succeeded)."""
        import torch

        from ..devices import choose_device
        from . import ais_decoder_for, resolve_precision
        from .openvino import OpenVINOEncoder, OpenVINOMaskDecoder

        if self.state != "done":
            raise RuntimeError(f"the conversion has not succeeded ({self.state}): {self.error}")
        prec = resolve_precision("openvino", choose_device("cpu"), self.precision, self.encoder)
        encoder = OpenVINOEncoder(self.encoder, prec)
        ais = None
        if self.ais_decoder is not None:
            ais = ais_decoder_for(self.ais_decoder, encoder, torch.device("cpu"), self.ais_precision)
        return encoder, OpenVINOMaskDecoder(self.decoder), ais

    @staticmethod
    def switch(sam, parts) -> None:
        """Put ``parts`` (from :meth:`build`) into ``sam`` in place: its identity changes, so
        embedding caches recompute slices lazily with the new encoder; the AIS decoder (when the
        model has one) runs with the new encoder's backend from then on."""
        from ..registry import DECODER_ATTR
        from .decoder import cache_dense_pe

        sam.image_encoder, sam.mask_decoder = parts[:2]
        if len(parts) > 2 and parts[2] is not None:
            object.__setattr__(sam, DECODER_ATTR, parts[2])
        cache_dense_pe(sam)


def start_with_torch(sam, device=None, precision: str = "auto", ais_precision: str = "auto"):
    """Apply a backend to ``sam`` (from ``build_sam``) without waiting for OpenVINO.

    When the OpenVINO IR of ``sam``'s weights is cached (or OpenVINO is not installed, or
    ``device`` is not the CPU) this is :func:`~napari_mobilesam.models.registry.apply_backend`'s
    ``"auto"`` choice (AIS decoder included) and the conversion is None. Otherwise ``sam`` gets the
    exact torch backend (float32) at once and a :class:`BackgroundConversion` is started. Returns
    ``(sam, conversion or None)``. ``ais_precision``: the AIS decoder's precision with OpenVINO
    (see :func:`~napari_mobilesam.models.backends.apply_decoder_backend`); with a conversion the
    AIS decoder runs in torch float32 until the switch, which brings its OpenVINO version.
    """
    from ..devices import choose_device
    from ..registry import DECODER_ATTR, INFO_ATTR
    from . import apply_backend, apply_decoder_backend

    dev = choose_device(device)
    conversion = None
    backend = "auto"
    if dev.type == "cpu" and openvino_available():
        from .openvino import ir_ready

        if not ir_ready(sam.image_encoder, sam.mask_decoder):
            arch = getattr(sam, INFO_ATTR, {}).get("model", "vit_t")
            conversion = BackgroundConversion(sam.image_encoder, sam.mask_decoder, arch, precision,
                                              ais_decoder=sam.__dict__.get(DECODER_ATTR),
                                              ais_precision=ais_precision)
            backend, precision = "torch", "fp32"
    sam = apply_backend(sam, device=dev, backend=backend, precision=precision)
    decoder_module = sam.__dict__.get(DECODER_ATTR)
    if decoder_module is not None:
        object.__setattr__(sam, DECODER_ATTR, apply_decoder_backend(
            decoder_module, sam, None if conversion is not None else ais_precision))
    if conversion is not None:
        conversion.start()
    return sam, conversion


def lock_path(encoder) -> Path:
    """The lock file a conversion of ``encoder``'s weights holds while it runs."""
    from ..checkpoint import state_dict_digest
    from ..weights import cache_dir

    return cache_dir() / "openvino" / f".lock-{state_dict_digest(encoder)[:24]}"


def _tail(path: Path, n: int = 400) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "no output"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[-n:]


def _remove_leftovers(pid: int) -> None:
    """Remove the temporary IR folders a stopped conversion process ``pid`` left in the cache."""
    from ..weights import cache_dir

    folder = cache_dir() / "openvino"
    if folder.is_dir():
        for tmp in folder.glob(f".*.{pid}.*"):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on ``path`` (waits for another holder); no lock without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows: conversions write to temporary folders and rename, still safe
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _exit_with_parent(parent: int) -> None:
    """End this process when ``parent`` has gone (the GUI crashed or was killed)."""
    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    """``python -m napari_mobilesam.models.backends.background WEIGHTS.pt [PARENT_PID [NICE]]``:
    convert the weights' encoder and mask decoder into the IR cache."""
    argv = sys.argv[1:] if argv is None else argv
    with contextlib.suppress(AttributeError, OSError):
        os.nice(int(argv[2]) if len(argv) > 2 else 19)  # the GUI and the torch path come first
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if len(argv) > 1:
        _exit_with_parent(int(argv[1]))
    import torch

    from ..registry import _spec
    from .openvino import convert_irs

    state = torch.load(argv[0], map_location="cpu", weights_only=True)
    sam = _spec(state["arch"]).builder()
    sam.image_encoder.load_state_dict(state["encoder"])
    sam.mask_decoder.load_state_dict(state["decoder"])
    sam.eval()
    t0 = time.perf_counter()
    with _exclusive(lock_path(sam.image_encoder)):
        converted = convert_irs(sam.image_encoder, sam.mask_decoder)
    print(f"{'converted' if converted else 'already cached'} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
