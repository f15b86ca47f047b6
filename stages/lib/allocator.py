"""Keep freed memory in the process for the next step, instead of handing it back to the kernel.

glibc serves every allocation over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it when
freed. A training step on a CPU allocates and frees the same large tensors every time (logits, the embedding
gradient, attention scores, optimizer temporaries), so every step paid for page faults and for zeroing those
pages again: ~1.5 GB of first touches per step. Turning mmap off for allocations and trimming off made the
default run's training steps 19% faster (benchmarks/NOTES.md). The cost is that the process keeps its peak
heap until it exits, which a training or scoring process reaches anyway. This is the documented `mallopt`
interface; other C libraries (macOS, musl) are left as they are.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # malloc.h: -1 disables trimming completely (mallopt(3))
M_MMAP_MAX = -4        # malloc.h: 0 disables mmap for large allocations


def keep_freed_memory() -> str:
    """Configure glibc's malloc to reuse freed memory; returns what was done, for the runtime record."""
    if not sys.platform.startswith("linux"):
        return "default (not Linux)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "default (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1:
        return "glibc malloc keeps freed memory (mmap and trimming off)"
    return "default (mallopt refused)"
