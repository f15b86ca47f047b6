"""Labels and windows (DESIGN §4): the one place that turns a conversation into trained examples.

Labels come from the character spans that the chat template itself renders for each assistant turn
(where the rendering of each prefix ends, found in one rendering), mapped to tokens through the tokenizer's
offsets: no marker-string search, no pad-id matching. Trained positions hold the input id itself (the model shifts), everything else is -100.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from stages.lib.template import Message, TemplateError, render

IGNORE_INDEX = -100


def prefix_spans(tokenizer: Any, messages: Sequence[Message], full_text: str) -> list[tuple[int, int]]:
    """The reference derivation, one render per prefix: a reply starts where the generation prompt after the
    messages before it ends, and ends where the rendering through it ends (trailing whitespace excluded)."""
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
        spans.append((start, _rstrip_end(through, start, len(through))))
    return spans


def _rstrip_end(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


@dataclass(frozen=True)
class TemplateBlocks:
    """What the template writes around one message's content after the first message, per role, and the
    generation prompt: enough to find every prefix boundary in a single rendering."""

    around: dict[str, tuple[str, str]]
    generation: str


_BLOCKS: dict[tuple, TemplateBlocks | None] = {}
_PROBES = ("Zq1 probe one", "Zq2 probe two", "Zq3 probe three", "Zq4 probe four")


def _block(text: str, after: str, content: str) -> tuple[str, str]:
    if not text.startswith(after) or text[len(after):].count(content) != 1:
        raise TemplateError("not a stable prefix")
    head, tail = text[len(after):].split(content)
    return head, tail


def template_blocks(tokenizer: Any) -> TemplateBlocks | None:
    """Measured once per template with probe conversations; None when the template is not built of fixed
    blocks per role (every conversation then takes the prefix-render path)."""
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _BLOCKS:
        roles = ("user", "assistant", "user", "assistant")
        probe = [{"role": role, "content": text} for role, text in zip(roles, _PROBES)]
        try:
            renders = [render(tokenizer, probe[: k + 1]) for k in range(4)]
            around = {"assistant": _block(renders[1], renders[0], _PROBES[1]), "user": _block(renders[2], renders[1], _PROBES[2])}
            generation = render(tokenizer, probe[:3], add_generation_prompt=True)
            consistent = _block(renders[3], renders[2], _PROBES[3]) == around["assistant"] and generation.startswith(renders[2])
            _BLOCKS[key] = TemplateBlocks(around, generation[len(renders[2]):]) if consistent else None
        except Exception:  # a template that refuses the probes: the reference path decides
            _BLOCKS[key] = None
    return _BLOCKS[key]


def block_spans(blocks: TemplateBlocks, messages: Sequence[Message], full_text: str) -> list[tuple[int, int]] | None:
    """Assistant spans from the one rendering: walk back from its end over each message's block to find where
    the rendering of every prefix ends. None when any block is not where the template puts it."""
    ends = [0] * (len(messages) + 1)
    position = ends[-1] = len(full_text)
    for k in range(len(messages) - 1, 0, -1):
        around = blocks.around.get(messages[k]["role"])
        if around is None:
            return None
        block = around[0] + messages[k]["content"] + around[1]
        position -= len(block)
        if position < 0 or not full_text.startswith(block, position):
            return None
        ends[k] = position
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = 0
        if index:
            if not full_text.startswith(blocks.generation, ends[index]):
                return None
            start = ends[index] + len(blocks.generation)
        spans.append((start, _rstrip_end(full_text, start, ends[index + 1])))
    return spans


def assistant_spans(tokenizer: Any, messages: Sequence[Message], full_text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant reply, end-of-turn token included, trailing whitespace excluded.

    Derived from the single rendering `full_text` (equal to the prefix renders, tests/test_labels.py); a
    template or conversation that does not fit the measured blocks falls back to rendering each prefix."""
    blocks = template_blocks(tokenizer)
    spans = block_spans(blocks, messages, full_text) if blocks is not None else None
    return spans if spans is not None else prefix_spans(tokenizer, messages, full_text)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    turns: tuple[int, int] = (0, 0)  # the conversation's messages [first, last] that this window holds, system excluded

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def token_ids(tokenizer: Any, texts: list[str], offsets: bool = False) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Ids (and character offsets) of each text without special tokens added: one call of the fast tokenizer's
    batch encoder, which is what `tokenizer(texts, add_special_tokens=False)` runs, without its per-text
    conversion to Python dicts. A backend set to truncate or pad goes through the tokenizer's own call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not texts:
        return [], []
    if backend is None or backend.truncation is not None or backend.padding is not None:
        encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
        return encoding["input_ids"], encoding["offset_mapping"] if offsets else []
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings], [e.offsets for e in encodings] if offsets else []


def encode(tokenizer: Any, messages: Sequence[Message], loss_on: str = "assistant") -> Example:
    """Render once with the template, tokenize without adding special tokens (one BOS at most), label spans."""
    text = render(tokenizer, messages)
    (ids,), (offsets,) = token_ids(tokenizer, [text], offsets=True)
    if loss_on == "all":
        return Example(ids, list(ids))
    return Example(ids, span_labels(ids, offsets, assistant_spans(tokenizer, messages, text)))


def span_labels(ids: list[int], offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """A token is trained when its first character lies inside a span (spans are sorted and disjoint)."""
    labels = [IGNORE_INDEX] * len(ids)
    span = 0
    for position, (start, _end) in enumerate(offsets):
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        if span == len(spans):
            break
        if spans[span][0] <= start:
            labels[position] = ids[position]
    return labels


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


@dataclass
class _Plan:
    """One conversation cut into its system message and body, with the per-turn token estimates."""

    system: list[Message]
    body: list[Message]
    lengths: list[int]
    budget: int


def _plan(messages: Sequence[Message], content_ids: list[list[int]], max_length: int, cost: TemplateCost) -> _Plan:
    """`content_ids`: each message's content tokenized alone, the estimate windows are sized with."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    lengths = [len(ids) + cost.per_message for ids in content_ids]
    return _Plan(system, list(messages[len(system):]), lengths[len(system):], max_length - cost.preamble - sum(lengths[: len(system)]))


def _walk(plan: _Plan, loss_on: str, fit: Callable[[int, int], Any], stats: WindowStats) -> list[tuple[int, int, Any]]:
    """Windows as (first, last, fit's result) in chronological order; `fit(first, last)` is None when they do not fit.

    Windows are built from the end, so each keeps the most recent context before its replies; every
    trained turn lands in exactly one window. A window never starts with an assistant turn (it would
    have no context); a turn that cannot fit even with only its own prompt is dropped and counted.
    """
    body, lengths = plan.body, plan.lengths
    trainable = (lambda i: body[i]["role"] == "assistant") if loss_on == "assistant" else (lambda i: True)

    def last_trainable(before: int) -> int:
        return next((i for i in range(before - 1, -1, -1) if trainable(i)), -1)

    def next_start(start: int) -> int:
        """In assistant mode a window starts on a prompt turn: an assistant turn there would have no context."""
        while loss_on == "assistant" and start < len(body) and body[start]["role"] == "assistant":
            start += 1
        return start

    accepted: list[tuple[int, int, Any]] = []
    end = last_trainable(len(body))
    while end >= 0:
        start, total = end, lengths[end]
        while start > 0 and total + lengths[start - 1] <= plan.budget:
            start -= 1
            total += lengths[start]
        start = next_start(start)
        if start > end and end > 0 and body[end - 1]["role"] != "assistant":
            start = end - 1  # the estimate says even the reply's own prompt does not fit: let the exact check decide
        if start > end:
            stats.turns_without_context += 1
            end = last_trainable(end)
            continue
        result = None
        while start <= end:  # the estimate can be off at turn boundaries: check the exact length
            result = fit(start, end)
            if result is not None:
                break
            start = next_start(start + 1)
        if result is None:
            stats.turns_too_long += 1
            end = last_trainable(end)
            continue
        accepted.append((start, end, result))
        end = last_trainable(start)
    accepted.reverse()
    return accepted


def _collect(plan: _Plan, accepted: list[tuple[int, int, Example]], stats: WindowStats) -> list[Example]:
    examples = []
    for start, end, example in accepted:
        example.turns = (start + len(plan.system), end + len(plan.system))
        if example.trained_tokens == 0:
            stats.rows_without_trained_tokens += 1
        else:
            examples.append(example)
    stats.windows += len(examples)
    stats.conversations_split += len(examples) > 1
    return examples


def windows(
    tokenizer: Any, messages: Sequence[Message], max_length: int, loss_on: str, cost: TemplateCost, stats: WindowStats
) -> list[Example]:
    """Split one conversation into examples of whole turns that fit `max_length` (DESIGN §4.5); see `_walk`."""
    plan = _plan(messages, token_ids(tokenizer, [m["content"] for m in messages])[0], max_length, cost)

    def fit(start: int, end: int) -> Example | None:
        candidate = encode(tokenizer, plan.system + plan.body[start : end + 1], loss_on)
        return candidate if len(candidate.input_ids) <= max_length else None

    return _collect(plan, _walk(plan, loss_on, fit, stats), stats)


def windows_batch(
    tokenizer: Any, conversations: Sequence[Sequence[Message]], max_length: int, loss_on: str, cost: TemplateCost,
    stats: Sequence[WindowStats],
) -> list[list[Example]]:
    """`windows` for many conversations with batched encoding, same result; `stats` has one per conversation.

    Each conversation's windows are first planned on the assumption that every estimated window fits; all
    of them are rendered and encoded in one batch. A conversation where one does not fit (rare: the
    estimate is off at a boundary) is redone by `windows`, whose exact check then decides.
    """
    flat_ids, _ = token_ids(tokenizer, [m["content"] for messages in conversations for m in messages])
    plans, walks, walk_stats, texts, offset = [], [], [], [], 0
    for messages in conversations:
        plan = _plan(messages, flat_ids[offset : offset + len(messages)], max_length, cost)
        offset += len(messages)
        own = WindowStats()
        walk = []
        for start, end, _ in _walk(plan, loss_on, lambda start, end: True, own):
            walk.append((start, end, len(texts)))  # the window's index in `texts`
            texts.append(render(tokenizer, plan.system + plan.body[start : end + 1]))
        plans.append(plan)
        walks.append(walk)
        walk_stats.append(own)
    all_ids, all_offsets = token_ids(tokenizer, texts, offsets=True)
    out = []
    for messages, plan, walk, own, counts in zip(conversations, plans, walks, walk_stats, stats):
        if any(len(all_ids[index]) > max_length for _, _, index in walk):
            out.append(windows(tokenizer, messages, max_length, loss_on, cost, counts))
            continue
        accepted = []
        for start, end, index in walk:
            ids = all_ids[index]
            if loss_on == "all":
                accepted.append((start, end, Example(ids, list(ids))))
                continue
            window = plan.system + plan.body[start : end + 1]
            spans = assistant_spans(tokenizer, window, texts[index])
            accepted.append((start, end, Example(ids, span_labels(ids, all_offsets[index], spans))))
        counts.turns_without_context += own.turns_without_context
        out.append(_collect(plan, accepted, counts))
    return out
