"""Model-side helpers shared by train, evaluate and chat: loading, devices, batching, scoring trained positions."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.lib.conversations import InputError
from stages.lib.labels import IGNORE_INDEX

PAD_MULTIPLE = 8  # dynamic padding to the longest row, rounded up (tensor-core and SIMD friendly widths)


def collator(tokenizer: Any, side: str = "right") -> Any:
    """transformers' padding collator: pads input_ids with the pad id, labels with -100, masks the padding.
    Columns other than the model inputs (`length`) are dropped before padding."""
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=PAD_MULTIPLE, label_pad_token_id=IGNORE_INDEX,
                                 return_tensors="pt")

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        kept = [{key: feature[key] for key in ("input_ids", "attention_mask", "labels") if key in feature} for feature in features]
        previous, tokenizer.padding_side = tokenizer.padding_side, side
        try:
            return {key: value for key, value in pad(kept).items() if value is not None}
        finally:
            tokenizer.padding_side = previous

    return collate


def unwrap(model: Any) -> Any:
    """The transformers model under DDP/FSDP and PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class TrainedLogits:
    """The model's logits where a label is trained, and what they predict."""

    logits: torch.Tensor   # [n, vocab], float32
    targets: torch.Tensor  # [n]
    keep: torch.Tensor     # [batch, seq] bool: position t is kept when labels[t + 1] is trained


def trained_logits(model: Any, inputs: dict[str, torch.Tensor]) -> TrainedLogits:
    """Logits at trained positions only, computed by the model's own forward (`logits_to_keep` as a boolean mask).

    The head runs inside the forward, so whatever the model does there (Gemma-2's final logit softcapping,
    Cohere's logit scale, FSDP/ZeRO-3 gathering the head's weight) is part of the result. Position t predicts
    labels[t + 1]: the one and only shift. A model whose forward ignores `logits_to_keep` returns all positions,
    and they are selected here instead.
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep, use_cache=False)
    logits = outputs.logits
    if logits.dim() == 3:  # the forward ignored logits_to_keep
        logits = logits[keep]
    return TrainedLogits(logits.float(), labels[:, 1:][keep[:, :-1]], keep)


def pick_device() -> torch.device:
    """A GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it; float32 elsewhere (what evaluate and chat run in)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> tuple[Any, Any]:
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
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
