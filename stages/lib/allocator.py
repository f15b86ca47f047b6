"""Keep freed memory in the process for the next step, instead of handing it back to the kernel.

glibc serves every allocation over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it when
freed. A training step on a CPU allocates and frees the same large tensors every time (logits, the embedding
gradient, attention scores, optimizer temporaries), so every step paid for page faults and for zeroing those
pages again: ~1.5 GB of first touches per step. With mmap for allocations and trimming off, the default
run's training steps took 20% less time (benchmarks/NOTES.md). The cost: blocks of varying width fragment the
heap and nothing is handed back before the process exits, so peak RSS grew by 0.5-1.4 GB in that run. This
is the documented `mallopt` interface; a C library without it (macOS, musl) is left as it is, and under a
preloaded allocator (jemalloc, tcmalloc) the call changes nothing that matters.

That alone still left the training step faulting in ~30k fresh pages (~0.15 s on a VM) every step, with the
heap growing by ~0.1 GB a step: torch allocates with posix_memalign(64), and glibc carves each aligned block
from a slightly larger chunk, handing the 32-96 byte lead and tail back. Those fragments sit in the per-thread
cache (tcache), which counts as in use, so the freed block can never merge with them again and is a few bytes
too small for the next request of the same size. With the tcache off they merge at once and same-size blocks
are reused (tests/test_train.py). The tcache is set only through GLIBC_TUNABLES, which the loader reads
at process start: `restart_with_allocator_tunables` re-executes the process with it before torch is imported.

Both were measured on CPU training (glibc Linux VMs, benchmarks/NOTES.md §Platform tuning) and apply only there:
on a machine with a GPU (CUDA or ROCm) the large tensors live in the GPU's caching allocator, nothing showed
them to pay, and the process keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Mapping

M_TRIM_THRESHOLD = -1  # malloc.h: -1 disables trimming completely (mallopt(3))
M_MMAP_MAX = -4  # malloc.h: 0 disables mmap for large allocations
TUNABLES = "glibc.malloc.tcache_count=0"  # no per-thread cache of freed chunks: fragments merge back at once
RESTARTED = "STAGES_ALLOCATOR_RESTARTED"


def gpu_host(root: Path = Path("/")) -> bool:
    """Whether this process can train on a GPU (an NVIDIA or AMD driver, not hidden by CUDA_VISIBLE_DEVICES),
    known before torch is imported."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    nvidia = root / "proc" / "driver" / "nvidia" / "gpus"
    return (nvidia.is_dir() and any(nvidia.iterdir())) or (root / "dev" / "kfd").exists()


def keep_freed_memory() -> str:
    """Configure glibc's malloc to reuse freed memory; returns what was done, for the runtime record."""
    if not sys.platform.startswith("linux"):
        return "default (not Linux)"
    if gpu_host():
        return "default (a GPU host: measured on CPU training only)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "default (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    no_mmap = mallopt(M_MMAP_MAX, 0) == 1
    no_trim = mallopt(M_TRIM_THRESHOLD, -1) == 1
    tcache = (
        "off" if TUNABLES in os.environ.get("GLIBC_TUNABLES", "").split(":") else "on (GLIBC_TUNABLES not set at start)"
    )
    if no_mmap and no_trim:
        return f"mallopt accepted: freed memory kept (mmap and trimming off), tcache {tcache}"
    mmap, trimming = ("off" if ok else "unchanged (refused)" for ok in (no_mmap, no_trim))
    return f"mallopt: mmap {mmap}, trimming {trimming}"


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a GNU system
        return False


def with_allocator_tunables(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with TUNABLES added to GLIBC_TUNABLES (kept: any tunables already there)."""
    present = env.get("GLIBC_TUNABLES", "")
    if TUNABLES in present.split(":"):
        return dict(env)
    return {**env, "GLIBC_TUNABLES": f"{present}:{TUNABLES}" if present else TUNABLES}


def restart_with_allocator_tunables() -> None:
    """Re-execute this process (same interpreter, arguments and process id) with TUNABLES in its environment,
    unless it already has them, this is not glibc, or a GPU trains here. Call it first thing, before heavy
    imports: the restart repeats everything done before it."""
    if not sys.executable or not glibc() or gpu_host():
        return
    env = with_allocator_tunables(os.environ)
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES") or RESTARTED in os.environ:
        return  # set already, or lost on the way (a wrapper that cleans the environment): restart once at most
    env[RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # cannot re-execute (a sandbox, an interpreter that moved): run on, with the tcache on
        pass
