"""bf16 training with float32 master weights (stages/lib/master_weights.py), and the GEMM ceiling the train
stage and benchmarks/train_throughput.py report speed against (stages/lib/precision.py)."""
import io

import pytest
import torch
from safetensors.torch import load_file

from pipeline_repo import read_json
from stages.lib.master_weights import MasterWeightAdamW
from stages.lib.modeling import cast_weights
from stages.lib.precision import gemm_ceiling, linear_shapes
from test_train import prepared, run_train, workspace  # noqa: F401  (the module fixture)
from tiny import tiny_model

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def bf16_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(torch.bfloat16)) for shape in ((7, 5), (5,))]


def gradients(step: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator).to(torch.bfloat16) for p in params]


def test_a_step_is_float32_adamw_on_the_masters_and_the_model_gets_them_rounded():
    params = bf16_params()
    optimizer = MasterWeightAdamW(params, **HYPER)
    reference = [p.detach().float().clone().requires_grad_() for p in params]
    plain = torch.optim.AdamW(reference, **HYPER)
    for step in range(3):
        for p, r, g in zip(params, reference, gradients(step, params)):
            p.grad, r.grad = g, g.float()
        optimizer.step()
        plain.step()
        optimizer.zero_grad()
        assert all(p.grad is None for p in params)
    for p, master, r in zip(params, optimizer.masters, reference):
        assert master.dtype == torch.float32 and torch.equal(master, r.detach())
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), r.detach().to(torch.bfloat16))


def test_updates_below_bf16_resolution_accumulate_in_the_masters():
    """An update of 1e-4 on a weight of 1.0 is below bf16's spacing (2^-7 there): AdamW on bf16 weights
    drops every one of them; the masters add them up, and the bf16 weight moves once they are large enough."""
    start = [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))]
    pure = [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))]
    optimizer = MasterWeightAdamW(start, lr=1e-4, weight_decay=0.0)
    naive = torch.optim.AdamW(pure, lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        start[0].grad = torch.ones(4, dtype=torch.bfloat16)
        pure[0].grad = torch.ones(4, dtype=torch.bfloat16)
        optimizer.step()
        naive.step()
    assert torch.equal(pure[0].detach(), torch.ones(4, dtype=torch.bfloat16))  # every update lost
    assert torch.allclose(optimizer.masters[0], torch.full((4,), 1 - 100 * 1e-4), atol=1e-5)
    assert float(start[0].detach()[0]) < 1.0


def test_a_checkpoint_carries_the_masters_so_a_resumed_run_continues_exactly():
    params = bf16_params()
    optimizer = MasterWeightAdamW(params, **HYPER)
    for step in range(2):
        for p, g in zip(params, gradients(step, params)):
            p.grad = g
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    for step in range(2, 4):
        for p, g in zip(params, gradients(step, params)):
            p.grad = g
        optimizer.step()

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as the Trainer loads optimizer.pt
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["model"]]
    again = MasterWeightAdamW(resumed, **HYPER)
    again.load_state_dict(saved["optimizer"])
    for step in range(2, 4):
        for p, g in zip(resumed, gradients(step, resumed)):
            p.grad = g
        again.step()
    for a, b in zip(optimizer.masters, again.masters):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed):
        assert torch.equal(a.detach(), b.detach())


def test_casting_to_bf16_keeps_rope_frequencies_float32():
    """`model.to(torch.bfloat16)` rounds the rotary inverse frequencies too; `cast_weights` casts parameters only."""
    model = tiny_model("llama", 64)
    frequencies = model.model.rotary_emb.inv_freq.clone()
    cast_weights(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, frequencies)
    assert not torch.equal(frequencies.to(torch.bfloat16).float(), frequencies)  # what `.to` would have done


def test_bf16_training_saves_the_float32_masters(prepared, tmp_path):  # noqa: F811
    work = workspace(prepared, tmp_path, {"precision": "bf16", "max_steps": 20, "eval_steps": 20, "save_steps": 15, "logging_steps": 5})
    result = run_train(work)
    assert result.returncode == 0, result.stderr[-3000:]
    runtime = read_json(work / "metrics" / "runtime" / "train.json")
    if torch.cuda.is_available():
        pytest.skip("a GPU trains bf16 with autocast")
    assert runtime["compute"] == "bf16 weights and activations, float32 master weights and AdamW state"
    metrics = read_json(work / "metrics" / "train.json")
    assert metrics["precision"] == "bf16" and metrics["val_loss_after"] < metrics["val_loss_before"]
    weights = load_file(work / "models" / "finetuned" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    # The masters, not the bf16 copies the model computed with: most trained values are not bf16 numbers.
    projection = next(t for name, t in weights.items() if name.endswith("q_proj.weight"))
    assert (projection != projection.to(torch.bfloat16).float()).float().mean() > 0.5
    assert 0 < runtime["fraction_of_ceiling"] and runtime["ceiling_tokens_per_s"] > 0


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
