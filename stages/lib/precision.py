"""Which precision is fastest here, and whether torch.compile works here: measured, never inferred from a CPU flag.

The same CPU feature (AVX512-BF16) runs bf16 matrix products at half the fp32 rate on one machine (a Xeon
without AMX) and at four times it on another (an AMD EPYC). So `auto` times the model's own GEMM shapes in
float32 and bfloat16 for a fraction of a second and keeps bf16 only when it is clearly faster. A GPU uses
bf16 where it supports it. `torch_compile: auto` compiles a two-line function for real: inductor needs a
working C++ compiler on a CPU (Triton on a GPU), and a machine without one trains eagerly, with the reason recorded.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stages.lib.errors import InputError

BF16_MARGIN = 1.2  # bf16 must beat fp32 by this factor: a near tie stays fp32, so the choice is stable run to run
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrecisionChoice:
    precision: str  # fp32 | bf16 | fp16
    reason: str
    fp32_gflops: float | None = None  # measured here, at the model's shapes
    bf16_gflops: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def _seconds(dtype: torch.dtype, m: int, k: int, n: int, device: torch.device, budget: float) -> float:
    """Seconds per [m × k] @ [k × n] product, after a warm-up."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=generator).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    count, started = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - started < budget:
        a @ b
        count += 1
    sync()
    return (time.perf_counter() - started) / count


def matmul_gflops(dtype: torch.dtype, rows: int, inner: int, cols: int, seconds: float = 0.25) -> float:
    """Sustained GFLOP/s of [rows × inner] @ [inner × cols] in `dtype` on the CPU, after a warm-up."""
    return 2.0 * rows * inner * cols / _seconds(dtype, rows, inner, cols, torch.device("cpu"), seconds) / 1e9


def model_shapes(config: Any) -> tuple[int, int]:
    """(hidden size, MLP width) of a transformers config (Llama- and GPT-2-style names)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 768)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return int(hidden), int(inner)


MEASURE_ROUNDS = 3


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
    fp32 = bf16 = 0.0
    for _ in range(MEASURE_ROUNDS):  # interleaved, best of each: a slow spell of a busy machine costs one round
        fp32 = max(fp32, matmul_gflops(torch.float32, tokens, hidden, inner))
        bf16 = max(bf16, matmul_gflops(torch.bfloat16, tokens, hidden, inner))
    shape = f"{tokens}×{hidden}×{inner} GEMM"
    if bf16 >= BF16_MARGIN * fp32:
        return PrecisionChoice(
            "bf16",
            f"measured {shape}: bf16 {bf16:.0f} GFLOP/s, {bf16 / fp32:.1f}× fp32",
            round(fp32, 1),
            round(bf16, 1),
        )
    return PrecisionChoice(
        "fp32",
        f"measured {shape}: bf16 {bf16:.0f} GFLOP/s is not {BF16_MARGIN}× fp32's {fp32:.0f}",
        round(fp32, 1),
        round(bf16, 1),
    )


@dataclass
class CompileChoice:
    enabled: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def keep_compile_cache() -> None:
    """inductor's cache defaults to /tmp, which a reboot empties: kept under ~/.cache instead, so that only a
    machine's first run pays for compiling (TORCHINDUCTOR_CACHE_DIR, when set, wins)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "torchinductor"))


def compile_problem(device: torch.device) -> str | None:
    """Why inductor cannot compile on `device` here (no C++ compiler, no Triton, ...), or None when it can."""
    keep_compile_cache()
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * x.sum(), fullgraph=True, dynamic=False)
        probe(torch.ones(16, device=device))
    except Exception as exc:  # noqa: BLE001 (any failure means "not here"; its first line is the reason)
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()
    finally:
        torch._dynamo.reset()
    return None


def choose_compile(requested: bool | str, device: torch.device) -> CompileChoice:
    """Resolve `train.torch_compile` (auto | true | false) for this machine."""
    if requested is False:
        return CompileChoice(False, "set in params.yaml")
    problem = compile_problem(device)
    if problem is None:
        return CompileChoice(
            True, "set in params.yaml" if requested is True else f"inductor compiles on {device.type} here"
        )
    if requested is True:
        raise InputError(
            f"train.torch_compile: true, but torch.compile fails on this machine ({problem}); "
            f"install a C++ compiler (g++) or set torch_compile: auto or false"
        )
    return CompileChoice(False, f"torch.compile fails here, trained eagerly: {problem}")


@dataclass
class Ceiling:
    """What a step would cost if it did nothing but the model's matrix products, measured here.

    `tokens_per_s` is the throughput at that limit: every variant's speed is reported as a fraction of it,
    so the figure means the same on a 2-core laptop and on an H100."""

    precision: str
    gflops: float  # sustained rate over the model's own GEMM shapes
    flops_per_token: float  # 2 per weight forward, 6 with both gradients; the head's only where it is applied
    tokens_per_s: float

    def fraction(self, tokens_per_s: float) -> float:
        return round(tokens_per_s / self.tokens_per_s, 3)


def linear_shapes(model: Any) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(in, out) of every linear layer but the output head, and the head's: read off the modules themselves
    (works on a meta-device model), so any architecture's shapes are right. GPT-2's Conv1D included."""
    head = model.get_output_embeddings()
    shapes = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if module is head or weight is None or weight.dim() != 2 or isinstance(module, torch.nn.Embedding):
            continue
        if isinstance(module, torch.nn.Linear):
            shapes.append((module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is [in, out]
            shapes.append((int(weight.shape[0]), int(weight.shape[1])))
    return shapes, (int(head.weight.shape[1]), int(head.weight.shape[0]))


def gemm_ceiling(
    model: Any,
    precision: str,
    rows: int,
    head_fraction: float,
    backward: bool = True,
    device: torch.device | None = None,
    budget: float = 0.02,
    rounds: int = 3,
) -> Ceiling:
    """Time each distinct GEMM of one pass over `rows` positions (forward; with `backward`, also the input and
    weight gradients) of every linear layer, the head's at `head_fraction` of the rows only, in `precision`.

    A ceiling is the best the machine does, so each GEMM's time is the fastest of `rounds` rounds over all of
    them: one pass's mean swung by ±10% between back-to-back measurements on a shared 2-core VM, the fastest
    round by ±4%."""
    device = device or torch.device("cpu")
    shapes, (hidden, vocab) = linear_shapes(model)
    counts: dict[tuple[int, int, int], int] = {}
    for m, (k, n) in [(rows, s) for s in shapes] + [(max(1, round(rows * head_fraction)), (hidden, vocab))]:
        for gemm in ((m, k, n), (m, n, k), (n, m, k)) if backward else ((m, k, n),):  # forward, input grad, weight grad
            counts[gemm] = counts.get(gemm, 0) + 1
    fastest = dict.fromkeys(counts, math.inf)
    for _ in range(rounds):  # interleaved, so that a slow spell of the machine costs one round, not one GEMM
        for gemm in counts:
            fastest[gemm] = min(fastest[gemm], _seconds(DTYPES[precision], *gemm, device, budget))
    seconds = sum(count * fastest[gemm] for gemm, count in counts.items())
    flops = sum(2.0 * m * k * n * count for (m, k, n), count in counts.items())
    return Ceiling(precision, round(flops / seconds / 1e9, 1), flops / rows, round(rows / seconds, 1))


def inference_fraction(
    model: Any, precision: str, passes: list[tuple[int, int, int]], seconds: float, device: torch.device | None = None
) -> dict:
    """How close inference ran to the GEMM ceiling: `passes` are (calls, positions per call, head positions per
    call) groups of forward passes, e.g. the scoring batches, or generation's prefills and its one-token steps.
    The ceiling is the time their matrix products alone take here, each group timed at its mean shape."""
    ceiling_s, flops = 0.0, 0.0
    for calls, positions, head in passes:
        if calls and positions:
            ceiling = gemm_ceiling(model, precision, positions, head / positions, backward=False, device=device)
            ceiling_s += calls * positions / ceiling.tokens_per_s
            flops += calls * positions * ceiling.flops_per_token
    return {
        "ceiling_s": float(f"{ceiling_s:.4g}"),
        "ceiling_gflops": round(flops / ceiling_s / 1e9, 1) if ceiling_s else 0.0,
        "fraction_of_ceiling": float(f"{ceiling_s / seconds:.3g}") if seconds > 0 else 0.0,
    }
