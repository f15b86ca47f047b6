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


def test_bf16_training_records_its_attention_and_its_fraction_of_the_measured_ceiling(prepared, tmp_path):  # noqa: F811
    work = workspace(prepared, tmp_path, {"precision": "bf16", "attention": "auto", "max_steps": 6, "eval_steps": 6,
                                          "save_steps": 6, "logging_steps": 3})
    result = run_train(work)
    assert result.returncode == 0, result.stderr[-3000:]
    runtime = read_json(work / "metrics" / "runtime" / "train.json")
    assert runtime["attention"] == ("sdpa" if torch.cuda.is_available() else "eager")
    assert runtime["ceiling_tokens_per_s"] > 0 and runtime["ceiling_gflops"] > 0
    assert runtime["fraction_of_ceiling"] == pytest.approx(runtime["tokens_per_s"] / runtime["ceiling_tokens_per_s"], abs=1e-3)
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
        weights = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "wte" not in name and "wpe" not in name
                      and "embed" not in name and p is not head)
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
    assert result["ceiling_s"] > 0 and result["fraction_of_ceiling"] == pytest.approx(result["ceiling_s"] / 2.0, rel=1e-2)
    assert result["ceiling_gflops"] * 1e9 * result["ceiling_s"] == pytest.approx(flops, rel=1e-2)
