"""core.heap: freed tensor memory reused (no page faults for a block allocated again), shared by
threads started afterwards, given back to the system on release; switched off by the environment.

Each case runs in its own Python process: the allocator's settings are process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
    reason="the allocator settings are glibc's",
)

PROBE = r"""
import json, resource, sys, threading
import torch
from napari_mobilesam.core import heap

out = {"set": heap.reuse_freed_memory() if sys.argv[1] == "reuse" else False}
torch.set_num_threads(1)  # the faults counted are the computing thread's
torch.manual_seed(0)
layers = [m for _ in range(4) for m in (torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())]
net = torch.nn.Sequential(*layers).eval()
x = torch.rand(1, 8, 1024, 1024)  # 32 MiB activations, as the AIS decoder's 1024² stage has

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def settled_pass():
    # the fewest page faults of passes 3 to 5 (the first ones fill the heap; how soon freed
    # neighbours merge into reusable blocks depends on what else allocates meanwhile)
    for _ in range(2):
        with torch.inference_mode():
            net(x)
    counts = []
    for _ in range(3):
        before = faults()
        with torch.inference_mode():
            net(x)
        counts.append(faults() - before)
    return min(counts)

out["main"] = settled_pass()
seen = {}
t = threading.Thread(target=lambda: seen.update(thread=settled_pass()))
t.start()
t.join()
out["thread"] = seen["thread"]
kept = rss()
heap.release_freed_memory()
out["released"] = kept - rss()
print(json.dumps(out))
"""


def _probe(mode: str, **env) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


PAGES = (8 * 32 << 20) // os.sysconf("SC_PAGE_SIZE")  # one pass's 8 activations


def test_freed_blocks_are_reused_in_every_thread_and_released():
    plain = _probe("plain")
    assert plain["main"] > PAGES // 2 and plain["thread"] > PAGES // 2  # glibc's default: faulted afresh
    reused = _probe("reuse")
    assert reused["set"] is True
    # freed blocks reused (one activation of the eight may still be faulted in: 8192 pages)
    assert reused["main"] < PAGES // 4 and reused["thread"] < PAGES // 4
    assert reused["released"] > 60 << 20  # the kept activations given back on release


def test_switched_off_by_the_environment():
    off = _probe("reuse", NAPARI_MOBILESAM_REUSE_MEMORY="0")
    assert off["set"] is False and off["main"] > PAGES // 2
