"""Model-side helpers shared by train, evaluate and chat: batching, loading, scoring trained positions."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from stages.chat_format import IGNORE_INDEX
from stages.conversations import InputError


def pad_batch(features: list[dict], pad_token_id: int, multiple_of: int = 8, side: str = "right") -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest row (rounded up): pad positions are masked and never trained."""
    longest = max(len(f["input_ids"]) for f in features)
    width = int(math.ceil(longest / multiple_of) * multiple_of)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": []}
    with_labels = "labels" in features[0]
    if with_labels:
        batch["labels"] = []
    for feature in features:
        gap = width - len(feature["input_ids"])

        def pad(values: list[int], fill: int) -> list[int]:
            return [fill] * gap + list(values) if side == "left" else list(values) + [fill] * gap

        batch["input_ids"].append(pad(feature["input_ids"], pad_token_id))
        batch["attention_mask"].append(pad(feature.get("attention_mask", [1] * len(feature["input_ids"])), 0))
        if with_labels:
            batch["labels"].append(pad(feature["labels"], IGNORE_INDEX))
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def unwrap(model: Any) -> Any:
    """The transformers model under DDP/FSDP and PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trained_logits(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Logits only where a label is trained: (logits [n, vocab], targets [n], mask [batch, seq-1], outputs).

    The vocabulary head (49k wide for SmolLM2) is applied to the final hidden states at trained positions
    only. Position t predicts labels[t + 1]: the one and only shift.
    """
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    logits_to_keep=1, output_hidden_states=True, use_cache=False)
    hidden = outputs.hidden_states[-1][:, :-1]  # the final (normed) layer output
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = unwrap(model).get_output_embeddings()(hidden[keep]).float()
    return logits, targets[keep], keep, outputs


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A saved model directory (full weights, or a LoRA adapter with its base recorded) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise InputError(f"{path}: no model; run the pipeline first (dvc repro)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base = Path(json.loads((path / "base_model.json").read_text())["base_model"])
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, dtype=dtype), path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype)
    return model.eval(), tokenizer
