"""One line describing the machine a benchmark ran on (shared by every script in this folder)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine() -> str:
    """CPU model, cores, relevant instruction sets, memory, torch/OpenVINO versions, GPU, load."""
    cpu, isa = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in info]
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical cores" + (f" ({', '.join(isa)})" if isa else "")]
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        parts.append(f"{pages * page / 2**30:.0f} GiB RAM")
    except (ValueError, OSError, AttributeError):
        pass
    parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}")
    except ImportError:
        pass
    try:
        import openvino

        parts.append(f"OpenVINO {openvino.__version__.split('-')[0]}")
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.2f} at start")
    return "; ".join(parts)


def wall_times(fn, runs: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``runs`` calls of ``fn()``, after ``warmup`` untimed calls."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes: ``VmHWM`` of ``/proc/self/status`` on Linux.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux folds the pre-``exec`` high-water mark into
    it, and a child forked from a parent starts with the parent's resident pages, so a child's
    ``ru_maxrss`` (and ``os.wait4``'s) is at least its parent's RSS at the fork (measured: a child
    of a 2 GiB parent reported 2073 MiB for ``python -c pass``). ``VmHWM`` belongs to the process's
    own memory map, made fresh at ``exec``. Elsewhere: ``ru_maxrss`` (bytes on macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_mib() -> float:
    """:func:`peak_rss_bytes` in MiB."""
    return peak_rss_bytes() / 2**20


#: Run a Python module with the arguments that follow and write its peak RSS (MiB, from
#: :func:`peak_rss_mib`) to the file named by ``PEAK_RSS_FILE`` when it exits: the peak of a command
#: line run in a child process, which ``os.wait4`` overstates (see :func:`peak_rss_bytes`).
RUN_WITH_PEAK = (
    "import atexit, os, runpy, sys; sys.path.insert(0, {here!r}); from _machine import peak_rss_mib; "
    "atexit.register(lambda: open(os.environ['PEAK_RSS_FILE'], 'w').write(str(peak_rss_mib()))); "
    "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
).format(here=str(Path(__file__).resolve().parent))
