"""Labels and windows (DESIGN §4): the one place that turns a conversation into trained examples.

Labels come from the character spans that the chat template itself renders for each assistant turn
(prefix renders), mapped to tokens through the tokenizer's offsets: no marker-string search, no pad-id
matching. Trained positions hold the input id itself (the model shifts), everything else is -100.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from stages.lib.template import Message, TemplateError, render

IGNORE_INDEX = -100


def assistant_spans(tokenizer: Any, messages: Sequence[Message], full_text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant reply, end-of-turn token included, trailing whitespace excluded."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:index], add_generation_prompt=True)) if index else 0
        through = render(tokenizer, messages[: index + 1])
        if not full_text.startswith(through) or (index and not through.startswith(render(tokenizer, messages[:index], add_generation_prompt=True))):
            raise TemplateError(
                "the chat template does not render conversations as stable prefixes, so assistant spans cannot be derived; "
                "use a template where rendering messages[:i] is a prefix of rendering messages[:i+1]"
            )
        end = len(through)
        while end > start and through[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return spans


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    turns: tuple[int, int] = (0, 0)  # the conversation's messages [first, last] that this window holds, system excluded

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode(tokenizer: Any, messages: Sequence[Message], loss_on: str = "assistant") -> Example:
    """Render once with the template, tokenize without adding special tokens (one BOS at most), label spans."""
    text = render(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoding["input_ids"]
    if loss_on == "all":
        return Example(ids, list(ids))
    spans = assistant_spans(tokenizer, messages, text)
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, _end) in enumerate(encoding["offset_mapping"]):
        if any(span_start <= start < span_end for span_start, span_end in spans):
            labels[position] = ids[position]
    return Example(ids, labels)


@dataclass
class TemplateCost:
    """Token overheads of the template, to size windows before the exact check."""

    preamble: int
    per_message: int

    @classmethod
    def measure(cls, tokenizer: Any) -> "TemplateCost":
        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        one = [{"role": "user", "content": "a"}]
        two = one + [{"role": "assistant", "content": "b"}]
        per_message = max(0, count(render(tokenizer, two)) - count(render(tokenizer, one)) - count("b"))
        preamble = max(0, count(render(tokenizer, one)) - per_message - count("a"))
        return cls(preamble, per_message)


@dataclass
class WindowStats:
    windows: int = 0
    conversations_split: int = 0
    turns_too_long: int = 0
    turns_without_context: int = 0
    rows_without_trained_tokens: int = 0


def windows(
    tokenizer: Any, messages: Sequence[Message], max_length: int, loss_on: str, cost: TemplateCost, stats: WindowStats
) -> list[Example]:
    """Split one conversation into examples of whole turns that fit `max_length` (DESIGN §4.5).

    Windows are built from the end, so each keeps the most recent context before its replies; every
    trained turn lands in exactly one window. A window never starts with an assistant turn (it would
    have no context); a turn that cannot fit even with only its own prompt is dropped and counted.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    body = list(messages[len(system):])
    lengths = [len(ids) + cost.per_message for ids in tokenizer([m["content"] for m in body], add_special_tokens=False)["input_ids"]] if body else []
    budget = max_length - cost.preamble - sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + cost.per_message for m in system)
    trainable = (lambda i: body[i]["role"] == "assistant") if loss_on == "assistant" else (lambda i: True)

    def last_trainable(before: int) -> int:
        return next((i for i in range(before - 1, -1, -1) if trainable(i)), -1)

    def next_start(start: int) -> int:
        """In assistant mode a window starts on a prompt turn: an assistant turn there would have no context."""
        while loss_on == "assistant" and start < len(body) and body[start]["role"] == "assistant":
            start += 1
        return start

    examples: list[Example] = []
    end = last_trainable(len(body))
    while end >= 0:
        start, total = end, lengths[end]
        while start > 0 and total + lengths[start - 1] <= budget:
            start -= 1
            total += lengths[start]
        start = next_start(start)
        if start > end and end > 0 and body[end - 1]["role"] != "assistant":
            start = end - 1  # the estimate says even the reply's own prompt does not fit: let the exact check decide
        if start > end:
            stats.turns_without_context += 1
            end = last_trainable(end)
            continue
        example = None
        while start <= end:  # the estimate can be off at turn boundaries: check the exact length
            candidate = encode(tokenizer, system + body[start : end + 1], loss_on)
            if len(candidate.input_ids) <= max_length:
                example = candidate
                example.turns = (start + len(system), end + len(system))
                break
            start = next_start(start + 1)
        if example is None:
            stats.turns_too_long += 1
            end = last_trainable(end)
            continue
        if example.trained_tokens == 0:
            stats.rows_without_trained_tokens += 1
        else:
            examples.append(example)
        end = last_trainable(start)
    examples.reverse()  # chronological order
    stats.windows += len(examples)
    stats.conversations_split += len(examples) > 1
    return examples
