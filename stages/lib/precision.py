"""Which precision is fastest here: measured, never inferred from a CPU flag.

The same CPU feature (AVX512-BF16) runs bf16 matrix products at half the fp32 rate on one machine (a Xeon
without AMX) and at four times it on another (an AMD EPYC). So `auto` times the model's own GEMM shapes in
float32 and bfloat16 for a fraction of a second and keeps bf16 only when it is clearly faster. A GPU uses
bf16 where it supports it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

BF16_MARGIN = 1.2  # bf16 must beat fp32 by this factor: a near tie stays fp32, so the choice is stable run to run
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrecisionChoice:
    precision: str                      # fp32 | bf16 | fp16
    reason: str
    fp32_gflops: float | None = None    # measured here, at the model's shapes
    bf16_gflops: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def matmul_gflops(dtype: torch.dtype, rows: int, inner: int, cols: int, seconds: float = 0.25) -> float:
    """Sustained GFLOP/s of [rows × inner] @ [inner × cols] in `dtype` on the CPU, after a warm-up."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator).to(dtype)
    b = torch.randn(inner, cols, generator=generator).to(dtype)
    for _ in range(2):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2.0 * rows * inner * cols * count / (time.perf_counter() - started) / 1e9


def model_shapes(config: Any) -> tuple[int, int]:
    """(hidden size, MLP width) of a transformers config (Llama- and GPT-2-style names)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 768)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return int(hidden), int(inner)


def choose(requested: str, config: Any, tokens: int = 2048) -> PrecisionChoice:
    """Resolve a `precision` param (auto | bf16 | fp16 | fp32) for this machine."""
    cuda = torch.cuda.is_available()
    if requested != "auto":
        if requested == "fp16" and not cuda:
            return PrecisionChoice("fp32", "fp16 needs a GPU; float32 ran instead")
        return PrecisionChoice(requested, "set in params.yaml")
    if cuda:
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", f"GPU {torch.cuda.get_device_name(0)} supports bf16")
        return PrecisionChoice("fp16", f"GPU {torch.cuda.get_device_name(0)} has no bf16")
    hidden, inner = model_shapes(config)
    fp32 = matmul_gflops(torch.float32, tokens, hidden, inner)
    bf16 = matmul_gflops(torch.bfloat16, tokens, hidden, inner)
    shape = f"{tokens}×{hidden}×{inner} GEMM"
    if bf16 >= BF16_MARGIN * fp32:
        return PrecisionChoice("bf16", f"measured {shape}: bf16 {bf16:.0f} GFLOP/s, {bf16 / fp32:.1f}× fp32", round(fp32, 1), round(bf16, 1))
    return PrecisionChoice("fp32", f"measured {shape}: bf16 {bf16:.0f} GFLOP/s is not {BF16_MARGIN}× fp32's {fp32:.0f}",
                           round(fp32, 1), round(bf16, 1))
