"""Writing a transformers causal LM as a GGUF file: the format llama.cpp, Ollama and LM Studio run.

Tensor names come from gguf-py's own architecture maps (`gguf.get_tensor_name_map`), the hyperparameters and
tokenizer keys from its writer, and the layout changes follow llama.cpp's convert_hf_to_gguf.py: Llama's
query/key rows are permuted into the interleaved rotary order llama.cpp computes with, GPT-2's Conv1D weights
are transposed to [out, in]. Everything is checked (`plan`) before a byte is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from stages.lib.errors import InputError
from stages.lib.template import end_of_turn_token

PRECISIONS = ("f16", "q8_0", "f32")
Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values; llama.cpp keeps other rows in f16


@dataclass(frozen=True)
class Tensor:
    name: str  # GGUF name (blk.N.attn_q.weight)
    data: np.ndarray  # float32, GGUF layout
    kind: str  # the stored type: f32, f16 or q8_0


def _llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half query/key rows to llama.cpp's interleaved pairs (convert_hf_to_gguf's `permute`)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _llama_hparams(config: Any) -> dict[str, Any]:
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise InputError(
            "models/finetuned/config.json: attention_bias/mlp_bias; transformers' GGUF loader drops Llama biases, "
            "so the round trip could not be verified"
        )
    return _rope_hparams(config)


def _rope_hparams(config: Any) -> dict[str, Any]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise InputError(
            f"models/finetuned/config.json: rope scaling {rope['rope_type']!r}; "
            "the GGUF writer handles unscaled RoPE only"
        )
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": heads,
        "head_count_kv": config.num_key_value_heads,
        "rope_dimension_count": head_dim,
        "rope_freq_base": float(theta),
        "layer_norm_rms_eps": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size,
    }


def _llama_tensor(name: str, weights: np.ndarray, config: Any) -> np.ndarray | None:
    if name.endswith("self_attn.q_proj.weight"):
        return _llama_permute(weights, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return _llama_permute(weights, config.num_key_value_heads)
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None  # no output.weight: readers tie the head to token_embd
    return weights


def _neox_hparams(config: Any) -> dict[str, Any]:
    """Qwen 2/3 and Phi-3: RoPE over halves (no row permutation), q/k/v biases kept (Qwen 2), and the head size
    written as llama.cpp's convert_hf_to_gguf.py writes it (key/value length) where it is not hidden / heads."""
    hparams = _rope_hparams(config)
    head_dim = hparams["rope_dimension_count"]
    if config.model_type == "qwen3" or head_dim * config.num_attention_heads != config.hidden_size:
        hparams.update(key_length=head_dim, value_length=head_dim)
    if config.model_type == "phi3" and getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise InputError(
            "models/finetuned/config.json: phi3 partial_rotary_factor != 1; "
            "the GGUF writer handles full-width RoPE only"
        )
    return hparams


def _mistral_hparams(config: Any) -> dict[str, Any]:
    if getattr(config, "sliding_window", None):
        raise InputError(
            f"models/finetuned/config.json: mistral sliding_window {config.sliding_window}; "
            "llama.cpp's llama graph (which "
            "Mistral exports to) attends to the whole context, so only sliding_window: null is exported"
        )
    return _llama_hparams(config)


def _gemma_hparams(config: Any) -> dict[str, Any]:
    """Gemma 2/3 as convert_hf_to_gguf.py writes them: the head size as key/value length, the sliding window, Gemma 2's
    soft-capping. llama.cpp scales queries by 1/sqrt(head size), and Gemma 3's local RoPE base and its every-sixth
    global layer are fixed in llama.cpp: other values are refused rather than shipped different."""
    head_dim = config.head_dim
    if config.query_pre_attn_scalar != head_dim:
        raise InputError(
            f"models/finetuned/config.json: query_pre_attn_scalar {config.query_pre_attn_scalar} "
            f"!= head_dim {head_dim}; "
            "llama.cpp scales queries by the head size, so only query_pre_attn_scalar == head_dim is exported"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if config.model_type == "gemma3_text":
        layers = list(getattr(config, "layer_types", []))
        pattern = ["sliding_attention"] * 5 + ["full_attention"]
        local, full = rope.get("sliding_attention", {}), rope.get("full_attention", {})
        if (
            layers != [pattern[i % 6] for i in range(len(layers))]
            or local.get("rope_theta") != 10000.0
            or any(r.get("rope_type", "default") != "default" for r in (local, full))
        ):
            raise InputError(
                "models/finetuned/config.json: Gemma 3 layer_types or RoPE that differ from llama.cpp's fixed ones "
                "(five sliding layers then one global, local RoPE base 10000, no scaling); not exported"
            )
        theta = full.get("rope_theta", 1000000.0)
    else:
        if rope.get("rope_type", "default") != "default":
            raise InputError(
                f"models/finetuned/config.json: rope scaling {rope['rope_type']!r}; "
                "the GGUF writer handles unscaled RoPE only"
            )
        theta = rope.get("rope_theta", 10000.0)
    hparams = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": config.num_attention_heads,
        "head_count_kv": config.num_key_value_heads,
        "rope_freq_base": float(theta),
        "layer_norm_rms_eps": float(config.rms_norm_eps),
        "key_length": head_dim,
        "value_length": head_dim,
        "sliding_window": config.sliding_window,
    }
    if config.model_type == "gemma2":
        hparams.update(
            attn_logit_softcapping=float(config.attn_logit_softcapping),
            final_logit_softcapping=float(config.final_logit_softcapping),
        )
    return hparams


def _gemma_tensor(name: str, weights: np.ndarray, config: Any) -> np.ndarray | None:
    """Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight: norms are stored + 1
    (convert_hf_to_gguf.py)."""
    if name.endswith("norm.weight"):
        return weights + 1.0
    return _untied(name, weights, config)


def _untied(name: str, weights: np.ndarray, config: Any) -> np.ndarray | None:
    """Tensors as transformers stores them, but a head tied to the embeddings (readers tie it again)."""
    return None if name == "lm_head.weight" and config.tie_word_embeddings else weights


def _gpt2_hparams(config: Any) -> dict[str, Any]:
    return {
        "context_length": config.n_positions,
        "embedding_length": config.n_embd,
        "block_count": config.n_layer,
        "feed_forward_length": config.n_inner or 4 * config.n_embd,
        "head_count": config.n_head,
        "layer_norm_eps": float(config.layer_norm_epsilon),
    }


def _gpt2_tensor(name: str, weights: np.ndarray, config: Any) -> np.ndarray | None:
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # causal-mask buffers, not weights
    if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return weights.T  # Conv1D stores [in, out]
    return weights  # lm_head is always written: llama.cpp's GPT-2 graph reads output.weight


@dataclass(frozen=True)
class Architecture:
    gguf_name: str
    hparams: Callable[[Any], dict[str, Any]]
    tensor: Callable[[str, np.ndarray, Any], np.ndarray | None]


ARCHITECTURES = {
    "llama": Architecture("llama", _llama_hparams, _llama_tensor),
    "mistral": Architecture("llama", _mistral_hparams, _llama_tensor),  # convert_hf_to_gguf.py writes Mistral as llama
    "qwen2": Architecture("qwen2", _neox_hparams, _untied),
    "qwen3": Architecture("qwen3", _neox_hparams, _untied),  # its q/k norms: gguf's attn_q_norm/attn_k_norm
    "phi3": Architecture("phi3", _neox_hparams, _untied),  # fused qkv_proj/gate_up_proj: attn_qkv/ffn_up
    "gemma2": Architecture("gemma2", _gemma_hparams, _gemma_tensor),  # four norms per block, all stored + 1
    "gemma3_text": Architecture("gemma3", _gemma_hparams, _gemma_tensor),  # and its q/k norms
    "gpt2": Architecture("gpt2", _gpt2_hparams, _gpt2_tensor),
}


def architecture(config: Any) -> Architecture:
    if config.model_type not in ARCHITECTURES:
        raise InputError(
            f"models/finetuned: architecture {config.model_type!r} ({', '.join(config.architectures or [])}) "
            f"cannot be exported; the GGUF writer supports {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[config.model_type]


def stored_kind(weights: np.ndarray, precision: str) -> str:
    """1-D tensors (norms, biases) stay f32 as llama.cpp keeps them; q8_0 needs rows divisible into blocks."""
    if weights.ndim < 2 or precision == "f32":
        return "f32"
    if precision == "q8_0" and weights.shape[-1] % Q8_BLOCK == 0:
        return "q8_0"
    return "f16"


def tensors(model: Any, precision: str) -> Iterator[Tensor]:
    import gguf

    arch = architecture(model.config)
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name), model.config.num_hidden_layers
    )
    for name, value in model.state_dict().items():
        weights = arch.tensor(name, value.detach().float().cpu().numpy(), model.config)
        if weights is None:
            continue
        stem, suffix = name.rsplit(".", 1)
        mapped = names.get_name(stem)
        if mapped is None:
            raise InputError(
                f"models/finetuned: tensor {name!r} has no name in gguf's {arch.gguf_name} map; "
                "the GGUF writer cannot place it"
            )
        weights = np.ascontiguousarray(weights)
        yield Tensor(f"{mapped}.{suffix}", weights, stored_kind(weights, precision))


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as GGUF metadata (llama.cpp's 'gpt2' byte-level BPE)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos, eos, unk, pad, eot
    chat_template: str


# The splitting regexes of tokenizer.json files llama.cpp names (its convert_hf_to_gguf.py get_vocab_base_pre).
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEXES = {
    _WORDS + r"|\p{N}{1,3}" + _REST: "llama-bpe",  # digits in groups of up to three
    _WORDS + r"|\p{N}" + _REST: "qwen2",  # digits one by one
}


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for the splitting this tokenizer does."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    if spec and spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers", [])
        if (
            [p.get("type") for p in parts] == ["Digits", "ByteLevel"]
            and parts[0].get("individual_digits")
            and parts[1].get("use_regex", True)
        ):
            return "smollm"  # GPT-2 splitting with every digit on its own (SmolLM2's tokenizer.json)
        regex = (parts[0].get("pattern") or {}).get("Regex") if parts and parts[0].get("type") == "Split" else None
        if (
            len(parts) == 2
            and regex in SPLIT_REGEXES
            and parts[0].get("behavior") == "Isolated"
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            return SPLIT_REGEXES[regex]
    raise InputError(
        f"models/finetuned/tokenizer.json: pre-tokenizer {json.dumps(spec)[:160]}; the GGUF writer represents "
        "byte-level BPE with GPT-2 splitting (optionally with single digits), Llama 3's or Qwen 2's only"
    )


def vocabulary(tokenizer: Any, vocab_size: int) -> Vocabulary:
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise InputError("models/finetuned: a slow (Python) tokenizer; the GGUF writer needs tokenizer.json")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise InputError(
            f"models/finetuned/tokenizer.json: a {model.get('type')} model with a "
            f"{(spec.get('decoder') or {}).get('type')} "
            "decoder; the GGUF writer represents byte-level BPE (GPT-2, SmolLM2, Llama 3 style) only"
        )
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size or max(by_id) >= vocab_size:
        raise InputError(
            f"models/finetuned: the tokenizer has {len(by_id)} tokens, more than the model's {vocab_size} embeddings"
        )
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embeddings padded past the vocabulary (llama.cpp's [PAD] convention)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if any(isinstance(m, list) and (len(m) != 2 or any(" " in part for part in m)) for m in model.get("merges", [])):
        raise InputError(
            "models/finetuned/tokenizer.json: a merge with a space in a part; GGUF stores merges space-separated"
        )
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "eot": tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)),
    }
    if not tokenizer.chat_template:
        raise InputError("models/finetuned: the tokenizer has no chat template (train saves one); re-run train")
    return Vocabulary(
        tokens,
        [int(t) for t in types],
        merges,
        pre,
        {k: v for k, v in ids.items() if v is not None},
        tokenizer.chat_template,
    )


def write(path: Path, model: Any, vocab: Vocabulary, precision: str, metadata: dict[str, str]) -> dict[str, int]:
    """Write the GGUF; returns the count of tensors stored per type."""
    import gguf
    from tqdm import tqdm

    arch = architecture(model.config)
    if arch.gguf_name == "llama" and "mistral" in metadata.get("name", ""):
        raise InputError(
            f"export.name {metadata['name']!r}: transformers' GGUF reader takes a llama-layout file whose name holds "
            "'mistral' for a type gguf-py cannot map, so the round trip could not verify it; choose a name without "
            "'mistral' (llama.cpp and Ollama read either)"
        )
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[precision]
    writer = gguf.GGUFWriter(path, arch.gguf_name)
    writer.add_type(gguf.GGUFType.MODEL)
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    for key, value in arch.hparams(model.config).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for name, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    # Training and evaluation render the template and tokenize without special tokens: the template writes any BOS.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(vocab.chat_template)
    counts: dict[str, int] = {}
    for tensor in tqdm(list(tensors(model, precision)), desc=f"gguf {precision}", unit="tensor", leave=False):
        if tensor.kind == "q8_0":
            writer.add_tensor(
                tensor.name,
                gguf.quantize(tensor.data, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(tensor.name, tensor.data.astype(np.float16 if tensor.kind == "f16" else np.float32))
        counts[tensor.kind] = counts.get(tensor.kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def load(path: Path, dtype: Any = None) -> tuple[Any, Any]:
    """A GGUF file read back by transformers' own loader (independent of the writer above): model and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise InputError(f"{path}: no exported model; run the pipeline first (dvc repro export)")
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type == "gpt2" and getattr(config, "n_ctx", None):
        config.n_positions = (
            config.n_ctx
        )  # the loader maps gpt2.context_length to n_ctx, which GPT2Config no longer reads
    if config.model_type in ("qwen3", "phi3"):  # the loader does not read the head size these configs need
        import gguf

        field = gguf.GGUFReader(path).fields.get(f"{config.model_type}.attention.key_length")
        config.head_dim = (
            int(field.contents()) if field is not None else config.hidden_size // config.num_attention_heads
        )
    if config.model_type in (
        "gemma2",
        "gemma3_text",
    ):  # what llama.cpp computes, which the loader leaves at its defaults
        import gguf

        fields = gguf.GGUFReader(path).fields
        arch = "gemma2" if config.model_type == "gemma2" else "gemma3"
        config.query_pre_attn_scalar = config.head_dim
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            setattr(config, key, float(fields[f"{arch}.{key}"].contents()) if f"{arch}.{key}" in fields else None)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=dtype or torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer
