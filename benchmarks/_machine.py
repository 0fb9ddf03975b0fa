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
