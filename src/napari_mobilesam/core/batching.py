"""Batches of bounded size: `batch_bounds` (no torch here, so the volume code can use it freely)."""

from __future__ import annotations

__all__ = ["batch_bounds"]


def batch_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of batches covering ``n`` items: full batches of ``size``, then the remainder
    split into decreasing powers of two (13 -> 8, 4, 1).

    Compiled decoders (OpenVINO) re-plan for every new batch shape, which costs more than the
    decoding; this way only a few shapes ever occur, whatever the number of prompts.
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    out = []
    start = 0
    while n - start >= size:
        out.append((start, start + size))
        start += size
    rest = n - start
    bit = 1 << max(rest.bit_length() - 1, 0)
    while rest > 0:
        if rest >= bit:
            out.append((start, start + bit))
            start += bit
            rest -= bit
        bit >>= 1
    return out
