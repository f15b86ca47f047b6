"""The GEMM ceiling the train stage and benchmarks/train_throughput.py report speed against
(stages/lib/precision.py), bf16 casting, and what a bf16 training run records."""

import pytest
import torch
from safetensors.torch import load_file

from pipeline_repo import read_json
from stages.lib.modeling import cast_weights
from stages.lib.precision import gemm_ceiling, inference_fraction, linear_shapes
from test_train import prepared, run_train, workspace  # noqa: F401  (the module fixture)
from tiny import tiny_model


def test_casting_to_bf16_keeps_rope_frequencies_float32():
    """`model.to(torch.bfloat16)` rounds the rotary inverse frequencies too; `cast_weights` casts parameters only."""
    model = tiny_model("llama", 64)
    frequencies = model.model.rotary_emb.inv_freq.clone()
    cast_weights(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, frequencies)
    assert not torch.equal(frequencies.to(torch.bfloat16).float(), frequencies)  # what `.to` would have done


@pytest.mark.slow
def test_bf16_training_records_its_attention_and_its_fraction_of_the_measured_ceiling(prepared, tmp_path):  # noqa: F811
    work = workspace(
        prepared,
        tmp_path,
        {
            "precision": "bf16",
            "attention": "auto",
            "max_steps": 6,
            "eval_steps": 6,
            "save_steps": 6,
            "logging_steps": 3,
        },
    )
    result = run_train(work)
    assert result.returncode == 0, result.stderr[-3000:]
    runtime = read_json(work / "metrics" / "runtime" / "train.json")
    assert runtime["attention"] == ("sdpa" if torch.cuda.is_available() else "eager")
    assert runtime["ceiling_tokens_per_s"] > 0 and runtime["ceiling_gflops"] > 0
    assert runtime["fraction_of_ceiling"] == pytest.approx(
        runtime["tokens_per_s"] / runtime["ceiling_tokens_per_s"], abs=1e-3
    )
    assert "tokens/s GEMM ceiling measured here" in result.stdout
    metrics = read_json(work / "metrics" / "train.json")
    assert metrics["precision"] == "bf16" and metrics["val_loss_after"] < metrics["val_loss_before"]
    weights = load_file(work / "models" / "finetuned" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # autocast trains float32 weights


def test_ceiling_counts_every_linear_layer_of_any_architecture():
    for arch in ("llama", "gpt2"):
        model = tiny_model(arch, 64)
        shapes, (hidden, vocab) = linear_shapes(model)
        head = model.get_output_embeddings().weight
        assert (vocab, hidden) == tuple(head.shape)
        weights = sum(
            p.numel()
            for name, p in model.named_parameters()
            if p.dim() == 2 and "wte" not in name and "wpe" not in name and "embed" not in name and p is not head
        )
        assert sum(k * n for k, n in shapes) == weights, arch
        ceiling = gemm_ceiling(model, "fp32", 64, 0.5, budget=0.001)
        assert ceiling.flops_per_token == pytest.approx(6 * weights + 6 * hidden * vocab * 0.5)
        assert ceiling.gflops > 0 and ceiling.tokens_per_s > 0 and ceiling.fraction(ceiling.tokens_per_s) == 1.0
        forward = gemm_ceiling(model, "fp32", 64, 1.0, backward=False, budget=0.001)
        assert forward.flops_per_token == pytest.approx(2 * weights + 2 * hidden * vocab)


def test_inference_fraction_counts_the_forward_gemms_of_each_group_of_passes():
    """score's ratio: `ceiling_s` is the GEMM-only time of the passes; their FLOPs are 2 per weight per position,
    the head's only at the positions it ran at (one per prompt in generate's prefill)."""
    model = tiny_model("llama", 64)
    shapes, (hidden, vocab) = linear_shapes(model)
    weights = sum(k * n for k, n in shapes)
    passes = [(3, 64, 8), (5, 4, 4), (0, 16, 16)]  # scoring batches, decoding steps, and an empty group
    result = inference_fraction(model, "fp32", passes, seconds=2.0)
    flops = 3 * (64 * 2 * weights + 8 * 2 * hidden * vocab) + 5 * (4 * 2 * weights + 4 * 2 * hidden * vocab)
    assert result["ceiling_s"] > 0 and result["fraction_of_ceiling"] == pytest.approx(
        result["ceiling_s"] / 2.0, rel=1e-2
    )
    assert result["ceiling_gflops"] * 1e9 * result["ceiling_s"] == pytest.approx(flops, rel=1e-2)


def _padding(lengths: list[int], batch_size: int) -> float:
    """Padded share of the positions when consecutive rows form batches padded to their longest row."""
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(max(b) * len(b) - sum(b) for b in batches) / sum(max(b) * len(b) for b in batches)


def test_the_benchmark_times_the_stage_on_the_batches_a_pipeline_run_trains_on():
    """The benchmark used to draw a random subset of steps × batch windows and let the stage's sampler group it
    again: sorting within 24 windows instead of 400 left 13% of the positions padding (2% in a pipeline run),
    so every stage row was timed on batches no run trains on."""
    import importlib.util
    import random
    from pathlib import Path

    import datasets

    from stages.train import seeded_length_sampler

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = random.Random(0)
    lengths = [min(256, max(8, int(rng.gauss(196, 60)))) for _ in range(4000)]
    data = datasets.Dataset.from_dict({"length": lengths})
    steps, batch = 12, 8
    chosen = bench.stage_batches(data, steps, batch, seed=42)
    first = list(iter(seeded_length_sampler(data, batch, 42)))[: steps * batch]
    assert chosen["length"] == [lengths[i] for i in first]  # the stage's own batches, in its order
    regrouped = bench.subset(data, steps * batch, 42)
    order = list(iter(seeded_length_sampler(regrouped, batch, 42)))
    old = _padding([regrouped["length"][i] for i in order], batch)
    new = _padding(chosen["length"], batch)
    assert new < 0.03 and old > 3 * new, (new, old)


def test_the_precision_choice_survives_a_slow_spell_of_a_busy_machine(monkeypatch):
    """Each precision is the best of interleaved rounds: one slow round on a busy machine does not decide."""
    from types import SimpleNamespace

    from stages.lib import precision

    measured = iter([200.0, 1.2, 210.0, 850.0, 205.0, 860.0])  # fp32, bf16 per round: the first bf16 round was slow
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, *shape: next(measured))
    choice = precision.choose("auto", SimpleNamespace(hidden_size=576, intermediate_size=1536))
    assert choice.precision == "bf16" and (choice.fp32_gflops, choice.bf16_gflops) == (210.0, 860.0)
