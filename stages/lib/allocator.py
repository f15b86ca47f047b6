"""Keep freed memory in the process for the next step, instead of handing it back to the kernel.

glibc serves every allocation over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it when
freed. A training step on a CPU allocates and frees the same large tensors every time (logits, the embedding
gradient, attention scores, optimizer temporaries), so every step paid for page faults and for zeroing those
pages again: ~1.5 GB of first touches per step. With mmap for allocations and trimming off, the default
run's training steps took 20% less time (benchmarks/NOTES.md). The cost: blocks of varying width fragment the
heap and nothing is handed back before the process exits, so peak RSS grew by 0.5-1.4 GB in that run. This
is the documented `mallopt` interface; a C library without it (macOS, musl) is left as it is, and under a
preloaded allocator (jemalloc, tcmalloc) the call changes nothing that matters.
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
    no_mmap = mallopt(M_MMAP_MAX, 0) == 1
    no_trim = mallopt(M_TRIM_THRESHOLD, -1) == 1
    if no_mmap and no_trim:
        return "mallopt accepted: freed memory kept (mmap and trimming off)"
    return f"mallopt: mmap {'off' if no_mmap else 'unchanged (refused)'}, trimming {'off' if no_trim else 'unchanged (refused)'}"
