"""The exported file, read back by transformers' GGUF loader, against the fine-tuned model it came from.

Both models score the same held-out windows (the assistant tokens evaluate scores) and answer the same prompts
greedily. The comparison covers the writer (names, layouts, hyperparameters), the precision, the tokenizer
metadata (each model encodes the prompts with its own tokenizer and template) and, for a LoRA adapter, the merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm import tqdm

from stages.lib.conversations import Conversation
from stages.lib.labels import TemplateCost, WindowStats, windows
from stages.lib.modeling import collator, trained_logits
from stages.lib.template import Message, fit_prompt, stop_token_ids


@dataclass
class Scores:
    max_abs_logit_diff: float = 0.0
    argmax_agreement: float = 0.0
    reference_perplexity: float = float("nan")
    exported_perplexity: float = float("nan")
    scored_tokens: int = 0


def score(
    reference: Any,
    exported: Any,
    tokenizer: Any,
    conversations: Sequence[Conversation],
    max_length: int,
    batch_size: int,
) -> Scores:
    rows = []
    cost = TemplateCost.measure(tokenizer)
    for conversation in conversations:
        rows += windows(tokenizer, conversation["messages"], max_length, "assistant", cost, WindowStats())
    collate = collator(tokenizer)
    worst, agree, nll, tokens = 0.0, 0, [0.0, 0.0], 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), batch_size), desc="round trip: logits", unit="batch", leave=False):
            batch = collate([{"input_ids": r.input_ids, "labels": r.labels} for r in rows[start : start + batch_size]])
            ours, theirs = trained_logits(reference, batch), trained_logits(exported, batch)
            worst = max(worst, float((ours.logits - theirs.logits).abs().max()))
            agree += int((ours.logits.argmax(-1) == theirs.logits.argmax(-1)).sum())
            for side, scored in enumerate((ours, theirs)):
                nll[side] += float(torch.nn.functional.cross_entropy(scored.logits, scored.targets, reduction="sum"))
            tokens += len(ours.targets)
    if not tokens:
        return Scores()
    return Scores(worst, agree / tokens, math.exp(nll[0] / tokens), math.exp(nll[1] / tokens), tokens)


def prompts(conversations: Sequence[Conversation], count: int) -> list[list[Message]]:
    """The context before the first assistant turn that follows a user turn, one per conversation."""
    chosen = []
    for conversation in conversations:
        messages = conversation["messages"]
        turn = next(
            (
                t
                for t, m in enumerate(messages)
                if m["role"] == "assistant" and any(p["role"] == "user" for p in messages[:t])
            ),
            None,
        )
        if turn is not None:
            chosen.append(list(messages[:turn]))
        if len(chosen) == count:
            break
    return chosen


def greedy(
    model: Any, tokenizer: Any, context: list[Message], budget: int, max_new_tokens: int
) -> tuple[list[int], list[int]]:
    """Prompt ids and the greedy reply's ids (up to and excluding the first stop token)."""
    ids = fit_prompt(tokenizer, context, budget - max_new_tokens)
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    with torch.inference_mode():
        output = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
    reply = output[0, len(ids) :].tolist()
    stop = next((i for i, token in enumerate(reply) if token in stops), len(reply))
    return ids, reply[:stop]


@dataclass
class Replies:
    prompts: int = 0
    identical_prompt_ids: int = 0
    identical_replies: int = 0
    first_difference: str | None = None


def compare_replies(
    reference: tuple[Any, Any],
    exported: tuple[Any, Any],
    contexts: list[list[Message]],
    budget: int,
    max_new_tokens: int,
) -> Replies:
    result = Replies(prompts=len(contexts))
    for index, context in enumerate(tqdm(contexts, desc="round trip: greedy replies", unit="prompt", leave=False)):
        ours_ids, ours = greedy(*reference, context, budget, max_new_tokens)
        theirs_ids, theirs = greedy(*exported, context, budget, max_new_tokens)
        result.identical_prompt_ids += ours_ids == theirs_ids
        result.identical_replies += ours == theirs
        if (ours_ids != theirs_ids or ours != theirs) and result.first_difference is None:
            result.first_difference = (
                f"prompt {index + 1}: {'prompt ids differ' if ours_ids != theirs_ids else 'replies differ'}: "
                f"{reference[1].decode(ours)!r} vs {exported[1].decode(theirs)!r}"
            )
    return result
