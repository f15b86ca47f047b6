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

    pad = DataCollatorForSeq2Seq(
        tokenizer, padding=True, pad_to_multiple_of=PAD_MULTIPLE, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        kept = [
            {key: feature[key] for key in ("input_ids", "attention_mask", "labels") if key in feature}
            for feature in features
        ]
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

    logits: torch.Tensor  # [n, vocab], float32 (or the model's dtype: trained_logits' upcast=False)
    targets: torch.Tensor  # [n]
    keep: torch.Tensor  # [batch, seq] bool: position t is kept when labels[t + 1] is trained


def trained_logits(model: Any, inputs: dict[str, torch.Tensor], upcast: bool = True) -> TrainedLogits:
    """Logits at trained positions only, computed by the model's own forward (`logits_to_keep` as a boolean mask).

    The head runs inside the forward, so whatever the model does there (Gemma-2's final logit softcapping,
    Cohere's logit scale, FSDP/ZeRO-3 gathering the head's weight) is part of the result. Position t predicts
    labels[t + 1]: the one and only shift. A model whose forward ignores `logits_to_keep` returns all positions,
    and they are selected here instead. `upcast=False` leaves the logits in the model's dtype, for a loss that
    upcasts them itself (train's compiled one, without a float32 copy of the logits).
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    outputs = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep, use_cache=False
    )
    logits = outputs.logits
    if logits.dim() == 3:  # the forward ignored logits_to_keep
        logits = logits[keep]
    return TrainedLogits(logits.float() if upcast else logits, labels[:, 1:][keep[:, :-1]], keep)


def cast_weights(model: Any, dtype: torch.dtype) -> Any:
    """The model's parameters in `dtype`, its buffers as they are. `model.to(dtype)` would also round float32
    buffers such as Llama's RoPE inverse frequencies to bf16 (angle errors of a few percent at position 256);
    `from_pretrained(dtype=...)` keeps them float32, and so does this."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype)
    return model


def pick_device() -> torch.device:
    """A GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it; float32 elsewhere (what evaluate and chat run in)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone describes one but cannot build it).
VOCABULARY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def read_config(directory: Path) -> dict:
    """config.json as a dict with a model_type, or a one-line error naming the file and the place."""
    file = directory / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: unreadable ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f'{file}: expected a transformers config (a JSON object with a "model_type" string)')
    return config


def load_weights(source: Path | str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """A causal LM from safetensors whose weights cover exactly what its config.json describes.

    transformers would initialise missing tensors randomly with a warning (a silent wrong model) and print a
    multi-screen report on shape mismatches: both become one line naming the first tensor concerned.
    """
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if Path(source).is_dir():
        read_config(Path(source))
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the load report: summarised below in one line
    transformers.logging.disable_progress_bar()  # a second's bar that would precede an error line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, use_safetensors=True, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except SafetensorError as exc:
        raise InputError(f"{source}: the safetensors weights are corrupted or truncated ({exc})") from None
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{source}: cannot load the model: {first_line(exc)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    if info["mismatched_keys"]:
        key, stored, expected = next(iter(sorted(info["mismatched_keys"], key=str)))
        raise InputError(
            f"{source}: config.json does not match the weights: {key} is {list(stored)} in the safetensors "
            f"but {list(expected)} by config.json ({len(info['mismatched_keys'])} tensors differ)"
        )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise InputError(
            f"{source}: the weights lack {len(missing)} tensors that config.json describes (first: {missing[0]}); "
            f"config.json does not belong to these weights"
        )
    return model


def load_tokenizer(source: Path | str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{source}: cannot load the tokenizer: {first_line(exc)}") from None


def check_vocabulary(model: Any, tokenizer: Any, source: Path | str) -> None:
    """Refuse a tokenizer that does not belong to the weights: ids past the embeddings crash training, and a
    tokenizer far smaller than them (an empty one built when its files are missing) makes every example padding."""
    rows = model.get_input_embeddings().weight.shape[0]
    tokens = len(tokenizer)
    if tokens > rows or tokens < rows // 2:
        raise InputError(
            f"{source}: the tokenizer has {tokens} tokens but the model's embeddings have {rows} rows; "
            f"the tokenizer does not belong to these weights (or its files {', '.join(VOCABULARY_FILES)} are missing)"
        )


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_causal_lm(
    path: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> tuple[Any, Any]:
    """A saved model directory (full weights, or a LoRA adapter with its base recorded) and its tokenizer."""
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise InputError(f"{path}: no model; run the pipeline first (dvc repro)")
    tokenizer = load_tokenizer(path)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        if not (path / "adapter_model.safetensors").is_file():  # peft would fall back to a pickle (adapter_model.bin)
            found = sorted(p.name for p in path.glob("adapter_model.*")) or ["no adapter_model file"]
            raise InputError(
                f"{path}: the LoRA adapter must be saved as safetensors (adapter_model.safetensors), found "
                f"{', '.join(found)}; resave it with save_pretrained(..., safe_serialization=True): "
                f"pickled weights are never loaded"
            )

        try:
            base = Path(json.loads((path / "base_model.json").read_text())["base_model"])
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(
                f"{path}: a LoRA adapter without a readable base_model.json naming its base model"
            ) from None
        model = PeftModel.from_pretrained(load_weights(base, dtype), path)
    else:
        model = load_weights(path, dtype)
    check_vocabulary(model, tokenizer, path)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
