"""An Ollama Modelfile whose TEMPLATE renders conversations exactly as the model's Jinja chat template does.

A Jinja template cannot be translated to Go's text/template in general, but a chat template is a sequence of
per-role blocks. `TurnFormat.probe` measures those blocks by rendering probe conversations; `TurnFormat.render`
re-assembles conversations from them the way the emitted Go template does, and `check` compares that with the
Jinja rendering on real conversations, so a template whose output depends on more than the role (position,
content, loop index) is refused instead of shipped subtly wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from stages.lib.errors import TemplateError
from stages.lib.template import Message, accepted, fixed_prefix, injected_system_block, render, traits

ROLES = ("system", "user", "assistant")
_PROBE = {"system": "Zq7 probe system", "user": "Zq6 probe user", "assistant": "Zq5 probe reply"}


@dataclass(frozen=True)
class TurnFormat:
    prefix: str  # written before any turn (a BOS the template writes itself)
    injected: str  # written when the conversation has no system message
    blocks: dict[str, tuple[str, str]]  # role -> (text before the content, text after it)
    generation: str  # the assistant header that add_generation_prompt appends
    fold_system: bool = False  # no system role: system text opens the next user turn ("system\n\nuser", DESIGN §4.12)

    @classmethod
    def probe(cls, tokenizer: Any) -> "TurnFormat":
        fold = not traits(tokenizer).system
        messages = [{"role": role, "content": _PROBE[role]} for role in ROLES if not (fold and role == "system")]
        prefix = fixed_prefix(tokenizer)
        blocks, previous = {}, prefix
        for count, message in enumerate(messages, start=1):
            text = render(tokenizer, messages[:count])
            if not text.startswith(previous):
                raise TemplateError("the chat template does not render conversations as stable prefixes")
            block = text[len(previous) :]
            if block.count(message["content"]) != 1:
                raise TemplateError(
                    f"the chat template does not write a {message['role']} message's content once, verbatim"
                )
            before, after = block.split(message["content"])
            blocks[message["role"]] = (before, after)
            previous = text
        prompt = messages[:2]
        generation = render(tokenizer, prompt, add_generation_prompt=True)[len(render(tokenizer, prompt)) :]
        return cls(prefix, injected_system_block(tokenizer), blocks, generation, fold)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        parts = [self.prefix]
        if not messages or messages[0]["role"] != "system":
            parts.append(self.injected)
        pending: list[str] = []
        for message in messages:
            content = message["content"]
            if self.fold_system and message["role"] == "system":
                pending.append(content)
                continue
            if pending and message["role"] == "user":
                content, pending = "\n\n".join(pending + [content]), []
            before, after = self.blocks[message["role"]]
            parts += [before, content, after]
        if add_generation_prompt:
            parts.append(self.generation)
        return "".join(parts)

    def check(self, tokenizer: Any, conversations: Sequence[Sequence[Message]]) -> int:
        """Compare with the Jinja rendering at every assistant turn's prompt; returns the prompts compared."""
        compared = 0
        alternation = traits(tokenizer).alternation  # a leading reply is dropped for such templates (template.accepted)
        for index, messages in enumerate(conversations):
            for turn, message in enumerate(messages):
                if message["role"] != "assistant" or turn == 0:
                    continue
                context = list(messages[:turn])
                for history, generation in ((context, True), (list(messages[: turn + 1]), False)):
                    shaped = accepted(
                        tokenizer, history
                    )  # what training renders; Ollama gets the system messages to fold
                    ours = [
                        m
                        for k, m in enumerate(history)
                        if not (
                            alternation and m["role"] == "assistant" and all(p["role"] != "user" for p in history[:k])
                        )
                    ]
                    if shaped and self.render(ours, generation) != render(
                        tokenizer, shaped, add_generation_prompt=generation
                    ):
                        raise TemplateError(
                            f"test conversation {index + 1}, turn {turn + 1}: the chat template renders it in a way "
                            "a per-role Ollama template cannot reproduce"
                        )
                compared += 1
        return compared

    def go_template(self) -> str:
        """Ollama's TEMPLATE: one line without whitespace trimming, so every literal is written as it is."""

        def literal(text: str) -> str:
            if "{{" in text or '"""' in text:
                raise TemplateError(
                    f"the chat template writes {text!r}, which an Ollama TEMPLATE cannot hold literally"
                )
            return text

        roles = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{literal(before)}'
            + ("{{ $sys }}" if self.fold_system and role == "user" else "")
            + "{{ .Content }}"
            + (f"{{{{ if not $last }}}}{literal(after)}{{{{ end }}}}" if role == "assistant" else literal(after))
            + ('{{ $sys = "" }}' if self.fold_system and role == "user" else "")
            for i, (role, (before, after)) in enumerate(self.blocks.items())
        )
        if self.fold_system:
            roles = '{{ if eq .Role "system" }}{{ $sys = print $sys .Content "\\n\\n" }}{{ else ' + roles[len("{{ ") :]
        return (
            literal(self.prefix)
            + ('{{ $sys := "" }}' if self.fold_system else "")
            + (
                '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                + literal(self.injected)
                + "{{ end }}"
                if self.injected
                else ""
            )
            + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + roles
            + "{{ end }}"
            + f'{{{{ if and $last (ne .Role "assistant") }}}}{literal(self.generation)}{{{{ end }}}}'
            + "{{ end }}"
        )


def modelfile(gguf_name: str, turns: TurnFormat, stops: Sequence[str], parameters: dict[str, float | int]) -> str:
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{turns.go_template()}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    lines += [f"PARAMETER {name} {value}" for name, value in parameters.items()]
    return "\n".join(lines) + "\n"
