"""Tiny real models for tests: a byte-level BPE tokenizer trained on the fixture text, Llama and GPT-2 from configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2's template: a conversation without a system message gets a persona injected.
PERSONA = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PERSONA_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + PERSONA + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Llama-3-like template that writes the BOS itself: tokenizing its output with special tokens would double it.
BOS_TEMPLATE = "{{ bos_token }}" + CHATML_TEMPLATE


def corpus() -> list[str]:
    rows = [json.loads(line) for line in (FIXTURES / "conversations.jsonl").read_text().splitlines()]
    texts = [m["content"] for row in rows for m in row["messages"]]
    return texts + ["User: Assistant: System: you are a helpful assistant. " * 3]


def train_tokenizer(style: str = "chatml") -> PreTrainedTokenizerFast:
    """style: 'chatml' (ChatML template, <|im_end|> ends turns), 'gpt2' (no template, no pad) or 'bos' (template
    adds BOS)."""
    specials = {
        "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "gpt2": ["<|endoftext|>"],
        "bos": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"],
    }[style]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus(), trainer)
    if style == "bos":
        bos = backend.token_to_id("<|begin_of_text|>")
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    if style == "gpt2":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>" if style == "bos" else "<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = BOS_TEMPLATE if style == "bos" else CHATML_TEMPLATE
    return tokenizer


# Every tiny decoder of the tests: 2 layers, hidden 32, grouped-query attention (4 heads, 2 key/value heads).
TINY_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_model(arch: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            **TINY_DECODER,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
        return LlamaForCausalLM(config)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def save_model_directory(directory: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A model directory as a user would point model.base at: safetensors weights plus tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny(directory: Path, arch: str) -> Path:
    tokenizer = train_tokenizer("chatml" if arch == "llama" else "gpt2")
    return save_model_directory(directory, tiny_model(arch, len(tokenizer)), tokenizer)


def save_tiny_encoder(directory: Path) -> Path:
    """A sentence encoder as encoder.model accepts it: a tiny BERT in safetensors with the tiny tokenizer."""
    tokenizer = train_tokenizer("chatml")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    directory.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
