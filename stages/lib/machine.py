"""What ran a stage: processor, accelerator, the GEMM instruction set, threads and library versions.

Two runs of the same code and params on different machines train different models (other kernels, other
rounding), so the review compares these records and warns when they differ (docs/DESIGN.md §5.2).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any


def _cpuinfo(field: str) -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return ""


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def gemm_instructions() -> str:
    """The matrix instruction sets this processor offers (for the record, never for a decision: the fastest
    precision is measured, stages/lib/precision.py) and the vector level torch's own kernels dispatch to."""
    import torch

    flags = set(_cpuinfo("flags").split())
    offered = [
        name
        for flag, name in (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))
        if flag in flags
    ]
    return f"{'+'.join(offered) or platform.machine()} (torch kernels: {torch.backends.cpu.get_cpu_capability()})"


def describe() -> dict[str, Any]:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "gpu": gpu,
        "gemm_instructions": gemm_instructions(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
