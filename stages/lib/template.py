"""Chat templates: rendering, the end-of-turn token, the system prompt, and prompts that fit a budget.

The system prompt choice (`tokenize.system_prompt`) is written into the tokenizer's chat template itself
(`with_system_prompt`), so every later consumer (tokenize, train's saved model, evaluate, chat, export)
renders conversations identically without being told about the choice (DESIGN §4.8, §4.10).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

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
SYSTEM_NONE = "none"        # no system message unless the conversation has one
_PROBE_USER, _PROBE_SYSTEM = "Zq9 probe user", "Zq8 probe system"


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def end_of_turn_token(tokenizer: Any) -> str:
    """The special token the template writes right after an assistant reply (ChatML `<|im_end|>`, GPT-2 EOS)."""
    probe = "Zq9 probe reply"
    text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    tail = text[text.rindex(probe) + len(probe):]
    specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})), key=len, reverse=True)
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
    out = {"plain": render(tokenizer, user), "with_system": render(tokenizer, system + user),
           "system_only": render(tokenizer, system), "exchange": render(tokenizer, system + user + assistant)}
    if not (out["with_system"].startswith(out["system_only"]) and out["exchange"].startswith(out["with_system"])):
        raise TemplateError("the chat template does not render conversations as stable prefixes")
    out["user_block"] = out["with_system"][len(out["system_only"]):]
    if not out["plain"].endswith(out["user_block"]):
        raise TemplateError("the chat template renders a user turn differently after a system message")
    return out


def fixed_prefix(tokenizer: Any) -> str:
    """What the template writes before the first message whatever it is (a BOS; '' for most templates).

    It is what precedes the system block's header, the header every message block starts with (the common
    prefix of a user block and an assistant block: ChatML's `<|im_start|>`). transformers refuses to render an
    empty conversation, so it cannot be read off directly.
    """
    probe = _probe_renderings(tokenizer)
    header = os.path.commonprefix([probe["user_block"], probe["exchange"][len(probe["with_system"]):]])
    system_only = probe["system_only"]
    return system_only[: system_only.find(header)] if header and header in system_only else ""


def injected_system_block(tokenizer: Any) -> str:
    """The text the template writes for a conversation without a system message ('' when it adds none): what
    precedes the user's block when one user turn is rendered alone, beyond the fixed prefix."""
    probe = _probe_renderings(tokenizer)
    head = probe["plain"][: len(probe["plain"]) - len(probe["user_block"])]
    fixed = fixed_prefix(tokenizer)
    return head[len(fixed):] if head.startswith(fixed) else head


def with_system_prompt(tokenizer: Any, setting: str) -> Any:
    """Rewrite the tokenizer's chat template so that conversations without a system message get `setting`:
    'default' leaves the template as it is, 'none' removes the block it injects, any other text becomes
    the system message. Conversations that bring their own system message keep it. Returns the tokenizer."""
    if setting == SYSTEM_DEFAULT:
        return tokenizer
    original = tokenizer.chat_template
    if setting == SYSTEM_NONE:
        block = injected_system_block(tokenizer)
        if not block:
            return tokenizer
        escaped = block.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        # Capture the original rendering and drop the injected block once; the original logic stays intact.
        tokenizer.chat_template = "{% set rendered %}" + original + "{% endset %}{{ rendered | replace('" + escaped + "', '', 1) }}"
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
    history = list(messages[len(system):])
    while True:
        needed = length(system + history)
        if needed <= budget:
            return system + history
        if len(history) <= 1:
            raise TemplateError(f"the last turn alone needs {needed} prompt tokens, more than the {budget} available; "
                                "shorten it or raise the context budget")
        history = history[1:]
        while len(history) > 1 and history[0]["role"] == "assistant":
            history = history[1:]


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def fit_prompt(tokenizer: Any, messages: Sequence[Message], budget: int) -> list[int]:
    """Token ids of the generation prompt for `messages`, trimmed by `trim_history` to `budget` tokens."""
    return prompt_ids(tokenizer, trim_history(messages, lambda kept: len(prompt_ids(tokenizer, kept)), budget))
