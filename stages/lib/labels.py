"""Labels and windows (DESIGN §4): the one place that turns a conversation into trained examples.

Labels come from the character spans that the chat template itself renders for each assistant turn
(where the rendering of each prefix ends, found in one rendering), mapped to tokens through the tokenizer's
offsets: no marker-string search, no pad-id matching. Trained positions hold the input id itself (the model
shifts), everything else is -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from stages.lib.template import (
    Message,
    TemplateError,
    accepted,
    encode_rendering,
    has_special_text,
    plain_specials,
    render,
)

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
        if not full_text.startswith(through) or (
            index and not through.startswith(render(tokenizer, messages[:index], add_generation_prompt=True))
        ):
            raise TemplateError(
                "the chat template does not render conversations as stable prefixes, "
                "so assistant spans cannot be derived; "
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
    if not text.startswith(after) or text[len(after) :].count(content) != 1:
        raise TemplateError("not a stable prefix")
    head, tail = text[len(after) :].split(content)
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
            around = {
                "assistant": _block(renders[1], renders[0], _PROBES[1]),
                "user": _block(renders[2], renders[1], _PROBES[2]),
            }
            generation = render(tokenizer, probe[:3], add_generation_prompt=True)
            consistent = _block(renders[3], renders[2], _PROBES[3]) == around["assistant"] and generation.startswith(
                renders[2]
            )
            _BLOCKS[key] = TemplateBlocks(around, generation[len(renders[2]) :]) if consistent else None
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


def token_ids(
    tokenizer: Any, texts: list[str], offsets: bool = False, plain: bool = False
) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Ids (and character offsets) of each text without special tokens added: one call of the fast tokenizer's
    batch encoder, which is what `tokenizer(texts, add_special_tokens=False)` runs, without its per-text
    conversion to Python dicts. A backend set to truncate or pad goes through the tokenizer's own call.
    `plain`: special-token strings are encoded as the text they are (message content, DESIGN §4.13)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not texts:
        return [], []
    if backend is None or backend.truncation is not None or backend.padding is not None:
        encoding = tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=offsets, split_special_tokens=plain
        )
        return encoding["input_ids"], encoding["offset_mapping"] if offsets else []
    if plain:
        with plain_specials(tokenizer):
            return token_ids(tokenizer, texts, offsets)
    if not offsets and hasattr(backend, "encode_batch_fast"):  # tokenizers >= 0.21: no offsets kept, ~10% faster
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)], []
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings], [e.offsets for e in encodings] if offsets else []


def encode(
    tokenizer: Any,
    messages: Sequence[Message],
    loss_on: str = "assistant",
    content_ids: Sequence[list[int]] | None = None,
) -> Example:
    """Render once with the template, tokenize without adding special tokens (one BOS at most), label spans.

    Given each message's content ids (encoded alone), the window is composed from them where `composer`
    proves that equal to encoding it (tests/test_labels.py checks both against each other)."""
    shaped = accepted(tokenizer, messages)
    if shaped != list(messages) or has_special_text(tokenizer, [m["content"] for m in shaped]):
        content_ids = None  # folded content has no ids of its own; special-token text is encoded by encode_rendering
    text = render(tokenizer, shaped)
    made = composer(tokenizer) if content_ids is not None else None
    composed = made.compose(text, shaped, content_ids, loss_on) if made is not None else None
    if composed is not None:
        return composed
    ids, offsets = encode_rendering(tokenizer, shaped, text)
    return labelled(tokenizer, shaped, text, ids, offsets, loss_on)


def labelled(
    tokenizer: Any,
    messages: Sequence[Message],
    text: str,
    ids: list[int],
    offsets: Sequence[tuple[int, int]],
    loss_on: str,
) -> Example:
    """The encoded rendering `text` of `messages` with its labels: every token, or the assistant spans."""
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


@dataclass(frozen=True)
class Composer:
    """Builds a window's ids and labels from its messages' own content ids, with no second encoding of the
    window. `composer` returns one only for tokenizers and templates where this is exactly what encoding the
    rendered window gives; `compose` then checks each window's rendering and returns None where it is not
    built of the measured blocks (that window is encoded instead)."""

    around: dict[str, tuple[str, str]]
    ids: dict[str, tuple[list[int], list[int]]]  # per role: the ids of the text before and after the content
    labels: dict[
        str, tuple[list[int], list[int]]
    ]  # the same tokens' labels in an assistant turn (the end-of-turn is trained)
    prefix_ids: Callable[[str], list[int] | None]

    def compose(
        self, text: str, messages: Sequence[Message], content_ids: Sequence[list[int]], loss_on: str
    ) -> Example | None:
        """`text`: the window's rendering; `content_ids`: each message's content encoded alone."""
        first = 1 if messages and messages[0]["role"] == "system" else 0
        body = messages[first:]
        if not body or (loss_on != "all" and not first and body[0]["role"] == "assistant"):
            return None  # a leading reply is trained from the start of the text: the reference path decides
        pieces = []
        for message in body:
            around, content = self.around.get(message["role"]), message["content"]
            if around is None or content[:1].isspace():
                return None  # a leading space would join the newline before it into one pre-token
            pieces += (around[0], content, around[1])
        blocks = "".join(pieces)
        prefix = self.prefix_ids(text[: len(text) - len(blocks)]) if text.endswith(blocks) else None
        if prefix is None:
            return None
        ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
        for message, content in zip(body, content_ids[first:]):
            (head, tail), role = self.ids[message["role"]], message["role"]
            ids += head
            ids += content
            ids += tail
            if role == "assistant":
                head_labels, tail_labels = self.labels[role]
                labels += head_labels
                labels += content
                labels += tail_labels
            else:
                labels += [IGNORE_INDEX] * (len(head) + len(content) + len(tail))
        return Example(ids, list(ids) if loss_on == "all" else labels)


_COMPOSERS: dict[tuple, tuple[Any, Composer | None]] = {}


def _splits_at_template_text(tokenizer: Any) -> bool:
    """True when encoding text is encoding its pieces between special tokens one by one, and each piece is cut
    into GPT-2 pre-tokens: no normalizer, byte-level BPE with its regex and no prefix space, no dropout, and
    special tokens matched as they are (no lstrip/rstrip/single-word rules)."""
    from tokenizers import models, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is None
        or backend.normalizer is not None
        or backend.truncation is not None
        or backend.padding is not None
    ):
        return False
    pre, model = backend.pre_tokenizer, backend.model
    if not isinstance(pre, pre_tokenizers.ByteLevel) or pre.add_prefix_space or not pre.use_regex:
        return False
    if not isinstance(model, models.BPE) or model.dropout:
        return False
    return not any(t.lstrip or t.rstrip or t.single_word for t in backend.get_added_tokens_decoder().values())


def _crosses(added: Sequence[str], text: str, at_end: bool) -> bool:
    """Whether a special token could start inside `text`'s end (at_end) or end inside its start and run into
    the text beside it: the pieces would then not be cut where the template text starts and ends."""
    for token in added:
        for cut in range(1, len(token)):
            if text.endswith(token[:cut]) if at_end else text.startswith(token[cut:]):
                return True
    return False


def composer(tokenizer: Any) -> Composer | None:
    """The window composer for this tokenizer and chat template, or None where composing would not be exact.

    Composing is exact when (1) the tokenizer encodes the text between special tokens piece by piece
    (`_splits_at_template_text`), (2) every role's block is `head + content + tail` with the head starting
    with a special token and ending in one newline after a non-space character, the tail starting with a
    special token, and no special token able to run across those edges; (3) per message, the content does
    not start with whitespace. Then the GPT-2 regex cuts a pre-token right before the content (a pre-token
    holding a newline holds only whitespace) and right after it (the special token), so the content's
    tokens are those it has alone, and the head's and tail's are those they have alone."""
    key = (
        id(tokenizer),
        len(tokenizer),
        tokenizer.chat_template,
        tokenizer.bos_token,
        tokenizer.eos_token,
    )  # len: tokens added later
    if key in _COMPOSERS:
        return _COMPOSERS[key][1]
    found = None
    blocks = template_blocks(tokenizer)
    if (
        blocks is not None
        and _splits_at_template_text(tokenizer)
        and blocks.generation == blocks.around["assistant"][0]
    ):
        added = [
            t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if len(t.content) > 1
        ]

        def starts_special(text: str) -> bool:
            return any(text.startswith(token) for token in added)

        def clean(head: str, tail: str) -> bool:
            edges = head.endswith("\n") and len(head) > 1 and not head[-2].isspace() and bool(tail.rstrip())
            return (
                edges
                and starts_special(head)
                and starts_special(tail)
                and not any(_crosses(added, text, at_end) for text in (head, tail) for at_end in (True, False))
            )

        if all(clean(*around) for around in blocks.around.values()):
            found = _measured_composer(tokenizer, blocks.around, added)
    _COMPOSERS[key] = (tokenizer, found)
    return found


def _measured_composer(tokenizer: Any, around: dict[str, tuple[str, str]], added: list[str]) -> Composer | None:
    """The heads' and tails' ids, and their labels in an assistant turn read off the reference labelling of a
    probe exchange (so the end-of-turn token is trained exactly as `encode` trains it)."""
    from functools import lru_cache

    def ids_of(text: str) -> list[int]:
        return token_ids(tokenizer, [text])[0][0]

    @lru_cache(maxsize=1024)
    def prefix_ids(prefix: str) -> list[int] | None:
        return None if _crosses(added, prefix, at_end=True) else ids_of(prefix)

    ids = {role: (ids_of(head), ids_of(tail)) for role, (head, tail) in around.items()}
    probe = [{"role": "user", "content": _PROBES[0]}, {"role": "assistant", "content": _PROBES[1]}]
    reference = encode(tokenizer, probe)
    head, tail = ids["assistant"]
    content = ids_of(_PROBES[1])
    reply = len(head) + len(content) + len(tail)
    labels = reference.labels[len(reference.labels) - reply :]
    if labels[len(head) : len(head) + len(content)] != content:
        return None
    made = Composer(
        dict(around), ids, {"assistant": (labels[: len(head)], labels[len(head) + len(content) :])}, prefix_ids
    )
    composed = made.compose(render(tokenizer, probe), probe, [ids_of(m["content"]) for m in probe], "assistant")
    if composed is None or (composed.input_ids, composed.labels) != (reference.input_ids, reference.labels):
        return None
    return made


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
    special_token_text: int = 0  # conversations whose content holds special-token strings (encoded as text)


@dataclass
class _Plan:
    """One conversation cut into its system message and body, with the per-turn token estimates."""

    system: list[Message]
    body: list[Message]
    lengths: list[int]
    budget: int
    content_ids: list[list[int]]  # every message's content encoded alone, system message first

    def window(self, start: int, end: int) -> tuple[list[Message], list[list[int]]]:
        """The messages of body turns start..end with the system message, and their content ids."""
        first = len(self.system)
        return self.system + self.body[start : end + 1], self.content_ids[:first] + self.content_ids[
            first + start : first + end + 1
        ]


def _plan(messages: Sequence[Message], content_ids: list[list[int]], max_length: int, cost: TemplateCost) -> _Plan:
    """`content_ids`: each message's content tokenized alone, the estimate windows are sized with."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    lengths = [len(ids) + cost.per_message for ids in content_ids]
    return _Plan(
        system,
        list(messages[len(system) :]),
        lengths[len(system) :],
        max_length - cost.preamble - sum(lengths[: len(system)]),
        list(content_ids),
    )


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
    tokenizer: Any,
    messages: Sequence[Message],
    max_length: int,
    loss_on: str,
    cost: TemplateCost,
    stats: WindowStats,
    content_ids: list[list[int]] | None = None,
) -> list[Example]:
    """Split one conversation into examples of whole turns that fit `max_length` (DESIGN §4.5); see `_walk`.
    `content_ids`: each message's content encoded alone, when the caller has them already."""
    if content_ids is None:
        content_ids = token_ids(tokenizer, [m["content"] for m in messages], plain=True)[0]
    plan = _plan(messages, content_ids, max_length, cost)

    def fit(start: int, end: int) -> Example | None:
        window, window_ids = plan.window(start, end)
        candidate = encode(tokenizer, window, loss_on, window_ids)
        return candidate if len(candidate.input_ids) <= max_length else None

    return _collect(plan, _walk(plan, loss_on, fit, stats), stats)


def windows_batch(
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    max_length: int,
    loss_on: str,
    cost: TemplateCost,
    stats: Sequence[WindowStats],
) -> list[list[Example]]:
    """`windows` for many conversations with batched encoding, same result; `stats` has one per conversation.

    Each message's content is encoded once (one batch), which sizes the windows; each conversation's windows
    are then planned on the assumption that every estimated window fits, and composed from those ids where
    `composer` allows, the others rendered and encoded in one batch. A conversation where one does not fit
    (rare: the estimate is off at a boundary) is redone by `windows`, whose exact check then decides.
    """
    made = composer(tokenizer)
    flat_ids, _ = token_ids(tokenizer, [m["content"] for messages in conversations for m in messages], plain=True)
    plans, walks, walk_stats, offset = [], [], [], 0
    examples: list[Example | None] = []
    pending: list[tuple[int, list[Message], str]] = []  # windows to encode: index in `examples`, messages, text
    for messages in conversations:
        plan = _plan(messages, flat_ids[offset : offset + len(messages)], max_length, cost)
        offset += len(messages)
        own = WindowStats()
        walk = []
        for start, end, _ in _walk(plan, loss_on, lambda start, end: True, own):
            window, window_ids = plan.window(start, end)
            shaped = accepted(tokenizer, window)
            walk.append((start, end, len(examples)))
            if shaped != window or has_special_text(tokenizer, [m["content"] for m in shaped]):
                examples.append(encode(tokenizer, shaped, loss_on))  # DESIGN §4.12, §4.13: rare, one at a time
                continue
            text = render(tokenizer, window)
            examples.append(made.compose(text, window, window_ids, loss_on) if made is not None else None)
            if examples[-1] is None:
                pending.append((len(examples) - 1, window, text))
        plans.append(plan)
        walks.append(walk)
        walk_stats.append(own)
    all_ids, all_offsets = token_ids(tokenizer, [text for _, _, text in pending], offsets=True)
    for (index, window, text), ids, offsets in zip(pending, all_ids, all_offsets):
        examples[index] = labelled(tokenizer, window, text, ids, offsets, loss_on)
    out = []
    for messages, plan, walk, own, counts in zip(conversations, plans, walks, walk_stats, stats):
        if any(len(examples[index].input_ids) > max_length for _, _, index in walk):
            out.append(windows(tokenizer, messages, max_length, loss_on, cost, counts, plan.content_ids))
            continue
        counts.turns_without_context += own.turns_without_context
        out.append(_collect(plan, [(start, end, examples[index]) for start, end, index in walk], counts))
    return out
