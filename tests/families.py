"""The model families people fine-tune, each as a tiny model of its architecture built from a config and a tiny
byte-level BPE tokenizer carrying the family's special tokens and its real chat template
(tests/fixtures/templates/<family>.jinja, the source named on the file's first line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tiny import TINY_DECODER, corpus, save_model_directory

# tokenizer.json's Split regexes: Meta-Llama-3's and Qwen2.5's/Qwen3's (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "templates"


@dataclass(frozen=True)
class Family:
    name: str
    arch: str  # transformers model_type of the tiny model
    specials: tuple[str, ...]  # added special tokens, in id order
    bos: str | None
    eos: str
    end_of_turn: str  # what closes a reply in the template (trained)
    unk: str | None = None
    pad: str | None = None
    adds_bos: bool = False  # the tokenizer's post-processor adds a BOS (the template writes one too)
    extra: tuple[str, ...] = ()  # added tokens that are not special (Qwen 3's <think>)
    split: str | None = None  # the family's splitting regex before byte-level BPE (Llama 3's, Qwen's; else GPT-2's)


FAMILIES = {
    "llama3": Family(
        "llama3",
        "llama",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        adds_bos=True,
        split=LLAMA3_SPLIT,
    ),
    "qwen2_5": Family(
        "qwen2_5",
        "qwen2",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|im_end|>",
        pad="<|endoftext|>",
        split=QWEN_SPLIT,
    ),
    "qwen3": Family(
        "qwen3",
        "qwen3",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|im_end|>",
        pad="<|endoftext|>",
        extra=("<think>", "</think>"),
        split=QWEN_SPLIT,
    ),
    "mistral": Family(
        "mistral", "mistral", ("<unk>", "<s>", "</s>"), "<s>", "</s>", "</s>", unk="<unk>", adds_bos=True
    ),
    "gemma2": Family(
        "gemma2",
        "gemma2",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        unk="<unk>",
        pad="<pad>",
        adds_bos=True,
    ),
    "gemma3": Family(
        "gemma3",
        "gemma3_text",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        unk="<unk>",
        pad="<pad>",
        adds_bos=True,
    ),
    "phi3": Family(
        "phi3",
        "phi3",
        ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"),
        "<s>",
        "<|endoftext|>",
        "<|end|>",
        unk="<unk>",
        pad="<|endoftext|>",
    ),
}


def template_text(name: str) -> str:
    """The fixture's template text: the file without its first line (the source comment)."""
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8").split("\n", 1)[1]


def family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    family = FAMILIES[name]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if family.split:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(family.split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if family.split == QWEN_SPLIT:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=list(family.specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus(), trainer)
    if family.adds_bos:
        bos = backend.token_to_id(family.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", special_tokens=[(family.bos, bos)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos, unk_token=family.unk, pad_token=family.pad
    )
    if family.extra:
        tokenizer.add_tokens(list(family.extra))
    tokenizer.chat_template = template_text(name)
    return tokenizer


def family_model(name: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A tiny model of the family's architecture (2 layers, hidden 32, grouped-query attention)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    shape = dict(
        vocab_size=vocab_size,
        **TINY_DECODER,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    arch = FAMILIES[name].arch
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=8, tie_word_embeddings=True))
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**shape, sliding_window=None, tie_word_embeddings=False))
    if arch == "gemma2":
        return Gemma2ForCausalLM(
            Gemma2Config(**shape, head_dim=8, sliding_window=256, query_pre_attn_scalar=8, final_logit_softcapping=30.0)
        )
    if arch == "gemma3_text":
        return Gemma3ForCausalLM(Gemma3TextConfig(**shape, head_dim=8, sliding_window=256, query_pre_attn_scalar=8))
    if arch == "phi3":
        return Phi3ForCausalLM(Phi3Config(**shape, tie_word_embeddings=False, original_max_position_embeddings=512))
    raise ValueError(arch)


def save_family(directory: Path, name: str) -> Path:
    tokenizer = family_tokenizer(name)
    return save_model_directory(directory, family_model(name, len(tokenizer)), tokenizer)
