"""Chat templates: rendering, the end-of-turn token, the system prompt, and prompts that fit a budget.

The system prompt choice (`tokenize.system_prompt`) is written into the tokenizer's chat template itself
(`with_system_prompt`), so every later consumer (tokenize, train's saved model, evaluate, chat, export)
renders conversations identically without being told about the choice (DESIGN §4.8, §4.10).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from stages.lib.errors import TemplateError

Message = dict[str, str]

# DESIGN §4.9: for models without a chat template (GPT-2). Every turn ends with the EOS token, which is
# therefore the end-of-turn token, and it sits inside the trained span of each assistant turn.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SYSTEM_DEFAULT = "default"  # the template's own behaviour (SmolLM2 and Qwen inject a persona)
SYSTEM_NONE = "none"  # no system message unless the conversation has one
_PROBE_USER, _PROBE_SYSTEM = "Zq9 probe user", "Zq8 probe system"


_CUT = "Zq0 cut here"  # a user turn appended to render a reply in the form it has inside a conversation


def _apply(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The template's own rendering; its refusals (`raise_exception`) become one-line errors."""
    from jinja2 import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except JinjaError as exc:
        raise TemplateError(f"the chat template refuses the conversation: {exc}") from None


@dataclass(frozen=True)
class Traits:
    """What a family's template allows and where its renderings are not prefixes of longer ones (DESIGN §4.12)."""

    system: bool  # it renders a system message (Gemma's and Mistral's [INST] templates raise)
    alternation: bool  # it raises unless the conversation starts with a user turn (Gemma, Mistral)
    trailing: str  # what it appends only at the end of a rendering without generation prompt (Phi-3's EOS)
    user_head: str | None  # set where a final reply renders differently from the same reply followed by more (Qwen 3)


_TRAITS: dict[tuple, Traits] = {}


def _refuses(tokenizer: Any, messages: list[Message]) -> bool:
    try:
        _apply(tokenizer, messages, False)
        return False
    except TemplateError:
        return True


def traits(tokenizer: Any) -> Traits:
    """Measured once per template with probe conversations."""
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    if key in _TRAITS:
        return _TRAITS[key]
    user, reply, later = (
        {"role": role, "content": f"Zq{i} probe {role}"} for i, role in ((1, "user"), (2, "assistant"), (3, "user"))
    )
    alternation = _refuses(tokenizer, [reply, user])
    one, two, three = (_apply(tokenizer, [user, reply, later][:n], False) for n in (1, 2, 3))
    probe_system = {"role": "system", "content": "Zq4 probe system"}
    system = not _refuses(tokenizer, [probe_system, user])
    if (
        system
    ):  # a block of its own: the user's header follows the system text (Gemma 3 writes "system\n\nuser" instead)
        both = _apply(tokenizer, [probe_system, user], False)
        between = both[both.index(probe_system["content"]) + len(probe_system["content"]) : both.index(user["content"])]
        after_reply = three[three.index(reply["content"]) + len(reply["content"]) : three.index(later["content"])]
        system = bool(os.path.commonprefix([between[::-1], after_reply[::-1]]).strip())
    trailing = ""
    eos = tokenizer.eos_token or ""
    if not two.startswith(one) and eos and one.endswith(eos) and two.endswith(eos) and two.startswith(one[: -len(eos)]):
        trailing = eos  # Phi-3: `{% else %}{{ eos_token }}` after the last message

    def strip(text: str) -> str:
        return text[: -len(trailing)] if trailing and text.endswith(trailing) else text

    user_head = None
    if not strip(three).startswith(strip(two)):  # Qwen 3: the empty <think> block only on a final reply
        first = strip(one)
        candidate = os.path.commonprefix(
            [first[: first.index(user["content"])][::-1], three[: three.index(later["content"])][::-1]]
        )[::-1]
        continued = _apply(tokenizer, [user, reply, {"role": "user", "content": _CUT}], False)
        cut = continued.rfind(candidate + _CUT) if candidate else -1
        if cut > 0 and three.startswith(continued[:cut]):
            user_head = candidate
    _TRAITS[key] = Traits(system, alternation, trailing, user_head)
    return _TRAITS[key]


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The template's rendering, in the form a conversation has when it goes on: a reply is rendered as the
    template renders it before a next turn (Qwen 3 adds an empty `<think>` block to a final reply only) and
    nothing is appended after the last message (Phi-3's EOS). So the rendering of every prefix of a
    conversation is a prefix of the conversation's rendering, and of the generation prompt (DESIGN §4.12)."""
    if add_generation_prompt:
        return _apply(tokenizer, messages, True)
    found = traits(tokenizer)
    if found.user_head is not None and messages and messages[-1]["role"] == "assistant":
        continued = _apply(tokenizer, list(messages) + [{"role": "user", "content": _CUT}], False)
        return continued[: continued.rfind(found.user_head + _CUT)]
    text = _apply(tokenizer, messages, False)
    return text[: -len(found.trailing)] if found.trailing and text.endswith(found.trailing) else text


def accepted(tokenizer: Any, messages: Sequence[Message]) -> list[Message]:
    """`messages` in the shape the template accepts (DESIGN §4.12). A template without a system role gets each
    system message folded into the next user turn ("system\n\nuser", as Gemma 3's own template folds it; one
    with no user turn after it is dropped); a template that requires user/assistant alternation gets a
    conversation's leading replies dropped (a role-swapped copy starts with one: there is nothing it answers).
    Other templates get the messages unchanged."""
    found = traits(tokenizer)
    if found.system and not found.alternation:
        return list(messages)
    out: list[Message] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system" and not found.system:
            pending.append(message["content"])
            continue
        if found.alternation and message["role"] == "assistant" and not any(m["role"] == "user" for m in out):
            continue
        if pending and message["role"] == "user":
            message = {**message, "content": "\n\n".join(pending + [message["content"]])}
            pending = []
        out.append(message)
    return out


_SPECIALS: dict[tuple[int, int], tuple[Any, tuple[str, ...]]] = {}


def special_texts(tokenizer: Any) -> tuple[str, ...]:
    """The strings the tokenizer turns into special tokens wherever they occur in text, longest first."""
    key = (id(tokenizer), len(tokenizer))  # len: tokens added later
    if key not in _SPECIALS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        found = (
            {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
            if backend is not None
            else set(tokenizer.all_special_tokens)
        )
        _SPECIALS[key] = (tokenizer, tuple(sorted((t for t in found if t), key=len, reverse=True)))
    return _SPECIALS[key][1]


def has_special_text(tokenizer: Any, texts: Sequence[str]) -> bool:
    specials = special_texts(tokenizer)
    return any(token in text for text in texts for token in specials)


@contextmanager
def plain_specials(tokenizer: Any) -> Iterator[Any]:
    """The fast tokenizer's backend encoding special-token strings as the text they are (DESIGN §4.13)."""
    backend = tokenizer.backend_tokenizer
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        yield backend
    finally:
        backend.encode_special_tokens = previous


def _mask(tokenizer: Any, content: str) -> str:
    for token in special_texts(tokenizer):
        content = content.replace(token, "\x01" * len(token))
    return content


def encode_rendering(
    tokenizer: Any, messages: Sequence[Message], text: str, add_generation_prompt: bool = False
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of `text`, the rendering of `messages`, without special tokens added: the
    special tokens the template writes are special, special-token strings inside message content are text
    (DESIGN §4.13: no message can open a turn). Where no content holds such a string this is the tokenizer's
    own encoding. Otherwise the conversation is rendered again with those strings masked by as many control
    characters: the special tokens of that rendering are the template's, and the text between them is encoded
    with special tokens split."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not has_special_text(tokenizer, [m["content"] for m in messages]) or backend is None:
        if backend is None or backend.truncation is not None or backend.padding is not None:
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=backend is not None)
            return encoding["input_ids"], encoding.get("offset_mapping", [])
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets
    masked = [{**m, "content": _mask(tokenizer, m["content"])} for m in messages]
    skeleton = render(tokenizer, masked, add_generation_prompt)
    if len(skeleton) != len(text):
        raise TemplateError(
            "the chat template changes message content in a way that hides where special-token text "
            "sits in the rendering; such text cannot be kept as plain text with this template"
        )
    special_ids = set(tokenizer.all_special_ids) | {
        i for i, t in backend.get_added_tokens_decoder().items() if t.special
    }
    markup = backend.encode(skeleton, add_special_tokens=False)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    position = 0

    def plain(end: int) -> None:
        if end > position:
            with plain_specials(tokenizer) as split:
                piece = split.encode(text[position:end], add_special_tokens=False)
            ids.extend(piece.ids)
            offsets.extend((start + position, stop + position) for start, stop in piece.offsets)

    for token_id, (start, end) in zip(markup.ids, markup.offsets):
        if token_id in special_ids and start >= position:
            plain(start)
            ids.append(token_id)
            offsets.append((start, end))
            position = end
    plain(len(text))
    return ids, offsets


def end_of_turn_token(tokenizer: Any) -> str:
    """The special token the template writes right after an assistant reply (ChatML `<|im_end|>`, GPT-2 EOS)."""
    probe = "Zq9 probe reply"
    text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    tail = text[text.rindex(probe) + len(probe) :]
    specials = sorted(
        set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})), key=len, reverse=True
    )
    stripped = tail.lstrip()
    for token in specials:
        if token and stripped.startswith(token):
            return token
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise TemplateError(f"the chat template writes no special token after an assistant reply (it writes {tail!r})")


def stop_token_ids(tokenizer: Any, generation_eos: int | list[int] | None) -> list[int]:
    """Generation stops at the model's EOS ids and at the template's end-of-turn token."""
    eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    return sorted({i for i in eos if i is not None} | {tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))})


def _probe_renderings(tokenizer: Any) -> dict[str, str]:
    system = [{"role": "system", "content": _PROBE_SYSTEM}]
    user = [{"role": "user", "content": _PROBE_USER}]
    assistant = [{"role": "assistant", "content": _PROBE_USER}]
    out = {
        "plain": render(tokenizer, user),
        "with_system": render(tokenizer, system + user),
        "system_only": render(tokenizer, system),
        "exchange": render(tokenizer, system + user + assistant),
    }
    if not (out["with_system"].startswith(out["system_only"]) and out["exchange"].startswith(out["with_system"])):
        raise TemplateError("the chat template does not render conversations as stable prefixes")
    out["user_block"] = out["with_system"][len(out["system_only"]) :]
    if not out["plain"].endswith(out["user_block"]):
        raise TemplateError("the chat template renders a user turn differently after a system message")
    return out


def fixed_prefix(tokenizer: Any) -> str:
    """What the template writes before the first message whatever it is (a BOS; '' for most templates).

    It is what precedes the system block's header, the header every message block starts with (the common
    prefix of a user block and an assistant block: ChatML's `<|im_start|>`). transformers refuses to render an
    empty conversation, so it cannot be read off directly.
    """
    if not traits(tokenizer).system:  # no system block: the first user block's head minus a later one's
        user, reply, later = (
            {"role": r, "content": f"Zq{i} probe {r}"} for i, r in ((1, "user"), (2, "assistant"), (3, "user"))
        )
        one, two, three = (render(tokenizer, [user, reply, later][:n]) for n in (1, 2, 3))
        first, again = one[: one.index(user["content"])], three[len(two) : three.index(later["content"])]
        return first[: len(first) - len(again)] if again and first.endswith(again) else ""
    probe = _probe_renderings(tokenizer)
    header = os.path.commonprefix([probe["user_block"], probe["exchange"][len(probe["with_system"]) :]])
    system_only = probe["system_only"]
    return system_only[: system_only.find(header)] if header and header in system_only else ""


def injected_system_block(tokenizer: Any) -> str:
    """The text the template writes for a conversation without a system message ('' when it adds none): what
    precedes the user's block when one user turn is rendered alone, beyond the fixed prefix."""
    if not traits(tokenizer).system:
        return ""
    probe = _probe_renderings(tokenizer)
    head = probe["plain"][: len(probe["plain"]) - len(probe["user_block"])]
    fixed = fixed_prefix(tokenizer)
    return head[len(fixed) :] if head.startswith(fixed) else head


def with_system_prompt(tokenizer: Any, setting: str) -> Any:
    """Rewrite the tokenizer's chat template so that conversations without a system message get `setting`:
    'default' leaves the template as it is, 'none' removes the block it injects, any other text becomes
    the system message. Conversations that bring their own system message keep it. Returns the tokenizer."""
    if setting == SYSTEM_DEFAULT:
        return tokenizer
    if not traits(tokenizer).system:
        if setting == SYSTEM_NONE:
            return tokenizer
        raise TemplateError(
            f"tokenize.system_prompt: {setting[:40]!r} needs a system role, which this chat template does "
            "not have (Gemma, Mistral [INST]); expected default or none, or put the text in your data's "
            "system messages (they are folded into the first user turn)"
        )
    original = tokenizer.chat_template
    if setting == SYSTEM_NONE:
        block = injected_system_block(tokenizer)
        if not block:
            return tokenizer
        escaped = block.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        # Capture the original rendering and drop the injected block once; the original logic stays intact.
        tokenizer.chat_template = (
            "{% set rendered %}" + original + "{% endset %}{{ rendered | replace('" + escaped + "', '', 1) }}"
        )
    else:
        escaped = setting.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        tokenizer.chat_template = (
            "{% if not messages or messages[0]['role'] != 'system' %}"
            "{% set messages = [{'role': 'system', 'content': '" + escaped + "'}] + messages %}{% endif %}" + original
        )
    return tokenizer


def trim_history(messages: Sequence[Message], length: Callable[[list[Message]], int], budget: int) -> list[Message]:
    """`messages` without their oldest whole turns (the system message is kept) until `length` of them fits
    `budget` tokens; a history never starts on an assistant turn.

    Raises TemplateError when even the last turn alone does not fit: a prompt is never cut mid-turn."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    history = list(messages[len(system) :])
    while True:
        needed = length(system + history)
        if needed <= budget:
            return system + history
        if len(history) <= 1:
            raise TemplateError(
                f"the last turn alone needs {needed} prompt tokens, more than the {budget} available; "
                "shorten it or raise the context budget"
            )
        history = history[1:]
        while len(history) > 1 and history[0]["role"] == "assistant":
            history = history[1:]


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The generation prompt's ids: the template's markup as special tokens, the content as text (DESIGN §4.13),
    for the messages as the template accepts them (`accepted`)."""
    messages = accepted(tokenizer, messages)
    return encode_rendering(tokenizer, messages, render(tokenizer, messages, add_generation_prompt=True), True)[0]


def fit_prompt(tokenizer: Any, messages: Sequence[Message], budget: int) -> list[int]:
    """Token ids of the generation prompt for `messages`, trimmed by `trim_history` to `budget` tokens."""
    return prompt_ids(tokenizer, trim_history(messages, lambda kept: len(prompt_ids(tokenizer, kept)), budget))
