"""Stage `score@base` / `score@finetuned`: one model on the held-out test conversations.

    python -m stages.score --model base|finetuned

Writes data/scores/<model>.json, for each test set (`test`: the seen topics; `unseen`: topics held out of
training): for every assistant turn of the sampled conversations its summed NLL, token count, correct
next-token predictions and UTF-8 bytes (the same labels as training); for a choice of turns the reply
generated from the real context; and for some of those turns the model's mean log-probability of the real
reply and of length-matched replies from other conversations (next-reply ranking). Every choice is seeded
by the split seed and the conversation's id, so it is the same for both models and for every revision that
scores the same conversation. `evaluate` turns both models' scores into metrics with intervals. The base
model's scores depend only on the base model, the test sets and the scoring params, so a training
experiment never re-scores it (DVC restores them from its cache).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from stages.lib.atomic import write_json_files
from stages.lib.cli import ArgumentParser, run
from stages.lib.conversations import Conversation, InputError, read_conversations, topic_of
from stages.lib.decoding import decoding
from stages.lib.labels import IGNORE_INDEX, TemplateCost, WindowStats, encode, windows
from stages.lib.launch import use_slot
from stages.lib.machine import describe as describe_machine
from stages.lib.modeling import cast_weights, collator, load_causal_lm, pick_device, trained_logits
from stages.lib.params import EvaluateParams, RankingParams, load_params
from stages.lib.paths import MODELS, SCORES, TEST_SETS
from stages.lib.precision import choose, inference_fraction
from stages.lib.template import TemplateError, fit_prompt, stop_token_ids, trim_history, with_system_prompt

RUNTIME = "metrics/runtime/score_{model}.json"  # wall-clock: kept apart so the scores are reproducible


def sample_conversations(test: list[Conversation], count: int | None, seed: int) -> list[Conversation]:
    """A seeded sample of `count` test conversations, stratified by topic (all of them when count is None)."""
    if count is None or count >= len(test):
        return test
    from sklearn.model_selection import train_test_split

    topics = [topic_of(c) for c in test]
    frequency = Counter(topics)
    strata = [topic if frequency[topic] >= 2 else "rare" for topic in topics]
    try:
        chosen, _ = train_test_split(list(range(len(test))), train_size=count, random_state=seed, stratify=strata)
    except ValueError:  # more strata than the sample can hold
        chosen = random.Random(seed).sample(range(len(test)), count)
    return [test[i] for i in sorted(chosen)]


@dataclass
class Work:
    """The forward passes a scoring pass ran, for its ratio to the GEMM ceiling."""

    calls: list[tuple[int, int]] = field(default_factory=list)  # (positions, positions the head ran at) per call

    def mean(self) -> tuple[int, int, int]:
        """(calls, mean positions per call, mean head positions per call): one group for `inference_fraction`."""
        if not self.calls:
            return (0, 0, 0)
        count = len(self.calls)
        return (count, round(sum(p for p, _ in self.calls) / count), round(sum(h for _, h in self.calls) / count))


def fluency(
    model: Any,
    tokenizer: Any,
    conversations: list[Conversation],
    max_length: int,
    batch_size: int,
    work: Work | None = None,
) -> list[dict]:
    """Per assistant turn: summed NLL, tokens, correct argmax and the reply's own UTF-8 bytes.

    Each turn is scored once, in the window that trains it (docs/DESIGN.md §4.5), with the labels of training."""
    cost = TemplateCost.measure(tokenizer)
    rows: list[tuple[list[int], list[int], list[tuple[int, int]]]] = []
    for index, conversation in enumerate(conversations):
        messages = conversation["messages"]
        for example in windows(tokenizer, messages, max_length, "assistant", cost, WindowStats()):
            turns = [
                (index, t) for t in range(example.turns[0], example.turns[1] + 1) if messages[t]["role"] == "assistant"
            ]
            rows.append((example.input_ids, example.labels, turns))
    rows.sort(key=lambda row: len(row[0]))  # similar lengths batch together: less padding
    records: list[dict] = []
    collate = collator(tokenizer)
    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), batch_size), desc="perplexity", unit="batch", leave=False):
            chunk = rows[start : start + batch_size]
            batch = {
                k: v.to(model.device)
                for k, v in collate([{"input_ids": ids, "labels": labels} for ids, labels, _ in chunk]).items()
            }
            scored = trained_logits(model, batch)
            if work is not None:
                work.calls.append((batch["input_ids"].numel(), scored.targets.numel()))
            nll = torch.nn.functional.cross_entropy(scored.logits, scored.targets, reduction="none").double().cpu()
            correct = (scored.logits.argmax(-1) == scored.targets).cpu()
            offset = 0
            for row_index, (_, _, turns) in enumerate(chunk):
                positions = scored.keep[row_index].nonzero().flatten().tolist()
                runs = [0] * len(positions)  # one contiguous run of trained positions per assistant turn
                for k in range(1, len(positions)):
                    runs[k] = runs[k - 1] + (positions[k] != positions[k - 1] + 1)
                runs_t = torch.tensor(runs, dtype=torch.long)
                for run_index, (conversation, turn) in enumerate(turns):
                    selected = runs_t == run_index
                    content = conversations[conversation]["messages"][turn]["content"]
                    records.append(
                        {
                            "conversation": conversation,
                            "turn": turn,
                            "nll": float(nll[offset : offset + len(positions)][selected].sum()),
                            "tokens": int(selected.sum()),
                            "correct": int(correct[offset : offset + len(positions)][selected].sum()),
                            "bytes": len(content.encode("utf-8")),
                        }
                    )
                offset += len(positions)
    return sorted(records, key=lambda r: (r["conversation"], r["turn"]))


def turn_order(conversation: Conversation, seed: int) -> list[int]:
    """The conversation's assistant turns that follow a user turn, in an order seeded by the split seed and the
    conversation's id alone: the first k are the scored turns, so they do not change when other conversations
    or `turns_per_conversation` do (a larger k adds turns, never swaps them)."""
    messages = conversation["messages"]
    candidates = [
        t for t, m in enumerate(messages) if m["role"] == "assistant" and any(p["role"] == "user" for p in messages[:t])
    ]
    random.Random(f"{seed}/{conversation['id']}").shuffle(candidates)
    return candidates


def pick_turns(conversations: list[Conversation], per_conversation: int, seed: int) -> list[tuple[int, int]]:
    """(conversation index, assistant turn) pairs: the first `per_conversation` of each `turn_order`."""
    return [
        (index, turn)
        for index, conversation in enumerate(conversations)
        for turn in sorted(turn_order(conversation, seed)[:per_conversation])
    ]


def words_in(text: str) -> int:
    return len(text.split())


def wording(text: str) -> str:
    """A reply reduced to its letters and digits, lowercased: "Haha, same." and "haha same" are one reply."""
    return re.sub(r"[\W_]+", "", text.lower())


def distractors(
    conversations: list[Conversation], index: int, turn: int, count: int, seed: int
) -> list[tuple[int, int]]:
    """`count` (conversation, turn) replies of OTHER conversations with as many words as the real reply (the
    nearest lengths when too few have exactly as many), a seeded choice: length alone cannot pick the real one.
    Any non-system message is a real human reply to something, so any can serve."""
    real = conversations[index]["messages"][turn]["content"]
    target = words_in(real)
    candidates = sorted(
        (abs(words_in(m["content"]) - target), c, t, wording(m["content"]))
        for c, conversation in enumerate(conversations)
        if c != index
        for t, m in enumerate(conversation["messages"])
        if m["role"] != "system"
    )
    # No copy of the real reply in other words, and no two candidates with the same wording: a model that
    # picks any of several copies of the right answer is not guessing among K.
    seen = {wording(real)}
    pool = []
    for distance, c, t, words in candidates:
        if words not in seen:
            seen.add(words)
            pool.append((distance, c, t))
    if len(pool) < count:
        return []
    # Every reply as near in length as the count-th nearest is eligible: ties are broken by the seed, not by order.
    eligible = [(c, t) for distance, c, t in pool if distance <= pool[count - 1][0]]
    rng = random.Random(f"{seed}/{conversations[index]['id']}/{turn}/ranking")
    return sorted(rng.sample(eligible, count))


def last_turn_only(labels: list[int]) -> tuple[list[int], int]:
    """Labels of the final trained run (the candidate reply and its end of turn) and where it starts."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    start = trained[-1]
    while start - 1 in trained:
        start -= 1
    return [label if i >= start else IGNORE_INDEX for i, label in enumerate(labels)], start


def candidate_log_probs(model: Any, tokenizer: Any, history: list, replies: list[str], max_length: int) -> list[float]:
    """Mean log-probability per trained token (reply content and end of turn, as training labels them) of each
    reply after `history`, with the history trimmed to whole turns so that every candidate fits `max_length`.

    The context runs once; its KV cache is repeated for the candidates (it is the same prefix for all of them
    when the tokenizer cuts the text at the reply's start, as byte-level BPE does after a template header)."""

    def examples(kept: list) -> list:
        return [encode(tokenizer, [*kept, {"role": "assistant", "content": reply}]) for reply in replies]

    kept = trim_history(history, lambda h: max(len(e.input_ids) for e in examples(h)), max_length)
    rows = [last_turn_only(example.labels) + (example.input_ids,) for example in examples(kept)]
    prefix_length = rows[0][1]
    prefix = rows[0][2][:prefix_length]
    device = model.device
    if all(start == prefix_length and ids[:start] == prefix for _, start, ids in rows):
        context = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        cache = context.past_key_values
        cache.batch_repeat_interleave(len(rows))
        width = max(len(ids) - prefix_length for _, _, ids in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        tails = torch.tensor(
            [ids[prefix_length:] + [pad] * (width - len(ids) + prefix_length) for _, _, ids in rows], device=device
        )
        targets = torch.tensor(
            [labels[prefix_length:] + [IGNORE_INDEX] * (width - len(labels) + prefix_length) for labels, _, _ in rows],
            device=device,
        )
        real = torch.tensor(
            [[1] * (len(ids) - prefix_length) + [0] * (width - len(ids) + prefix_length) for _, _, ids in rows],
            device=device,
        )
        mask = torch.cat([torch.ones(len(rows), prefix_length, dtype=torch.long, device=device), real], 1)
        tail_logits = model(input_ids=tails, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        # The context's last position predicts each reply's first token; position t of the tail predicts t + 1.
        logits = torch.cat([context.logits[:, -1:].expand(len(rows), 1, -1), tail_logits[:, :-1]], 1).float()
    else:  # a tokenizer that merges across the reply's start: each candidate in full
        batch = {
            k: v.to(device)
            for k, v in collator(tokenizer)([{"input_ids": ids, "labels": labels} for labels, _, ids in rows]).items()
        }
        logits = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            .logits[:, :-1]
            .float()
        )
        targets = batch["labels"][:, 1:]
    log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    trained = targets != IGNORE_INDEX
    return ((log_probs * trained).sum(1) / trained.sum(1)).tolist()


def rank(
    model: Any, tokenizer: Any, conversations: list[Conversation], params: RankingParams, max_length: int, seed: int
) -> list[dict]:
    """Next-reply ranking: for the first `params.turns_per_conversation` scored turns of each conversation, the
    model's mean log-probability of the real reply (first) and of `candidates - 1` length-matched distractors."""
    records = []
    with torch.inference_mode():
        for index, conversation in enumerate(tqdm(conversations, desc="ranking", unit="conversation", leave=False)):
            for turn in sorted(turn_order(conversation, seed)[: params.turns_per_conversation]):
                others = distractors(conversations, index, turn, params.candidates - 1, seed)
                if not others:
                    continue
                messages = conversation["messages"]
                replies = [messages[turn]["content"]] + [conversations[c]["messages"][t]["content"] for c, t in others]
                try:
                    scores = candidate_log_probs(model, tokenizer, list(messages[:turn]), replies, max_length)
                except TemplateError:
                    continue  # the last user turn and a candidate do not fit max_length: the same for every model
                records.append(
                    {
                        "conversation": index,
                        "turn": turn,
                        "scores": [round(x, 6) for x in scores],
                        "distractors": [f"{conversations[c]['id']}/{t}" for c, t in others],
                    }
                )
    return records


def generate(
    model: Any,
    tokenizer: Any,
    conversations: list[Conversation],
    turns: list[tuple[int, int]],
    params: EvaluateParams,
    max_length: int,
    seed: int,
    prefills: Work | None = None,
    steps: Work | None = None,
) -> list[dict]:
    """Batched greedy (or sampled) replies with left padding and the KV cache, one per chosen turn."""
    stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    budget = max_length - params.max_new_tokens
    prompts: dict[int, list[int]] = {}
    skipped = []
    for k, (conversation, turn) in enumerate(turns):
        try:
            prompts[k] = fit_prompt(tokenizer, conversations[conversation]["messages"][:turn], budget)
        except TemplateError:
            skipped.append(k)  # its last user turn alone exceeds the prompt budget; the same for every model
    order = sorted(prompts, key=lambda k: (len(prompts[k]), k))
    left_pad = collator(tokenizer, side="left")
    keeps_last_logits = (
        "logits_to_keep" in inspect.signature(model.forward).parameters
    )  # generate's prefill: one head row per prompt
    replies: dict[int, dict] = {}
    torch.manual_seed(seed)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), params.batch_size), desc="generate", unit="batch", leave=False):
            chunk = order[start : start + params.batch_size]
            batch = {k: v.to(model.device) for k, v in left_pad([{"input_ids": prompts[i]} for i in chunk]).items()}
            width = batch["input_ids"].shape[1]
            output = model.generate(**batch, **decoding(params, width, stop_ids), pad_token_id=tokenizer.pad_token_id)
            if prefills is not None and steps is not None:  # the prompt pass, then one position per row per new token
                rows = len(chunk)
                prefills.calls.append((rows * width, rows if keeps_last_logits else rows * width))
                steps.calls += [(rows, rows)] * max(0, output.shape[1] - width - 1)
            for row, k in zip(output[:, width:].tolist(), chunk):
                stop = next((i for i, token in enumerate(row) if token in stop_ids), None)
                reply = row if stop is None else row[:stop]
                replies[k] = {
                    "reply": tokenizer.decode(reply, skip_special_tokens=True).strip(),
                    "stopped": stop is not None,
                }
    records = []
    for k, (conversation, turn) in enumerate(turns):
        human = conversations[conversation]["messages"][turn]["content"]
        fits = len(tokenizer(human, add_special_tokens=False)["input_ids"]) + 1 <= params.max_new_tokens
        record = {"conversation": conversation, "turn": turn, "human_fits_max_new_tokens": fits}
        records.append(
            {**record, **replies[k]}
            if k in replies
            else {**record, "skipped": "prompt longer than max_length - max_new_tokens"}
        )
    return records


def tokenizer_digest(tokenizer: Any) -> str:
    """What decides which tokens perplexity counts: the vocabulary and the chat template."""
    text = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "template": tokenizer.chat_template}, sort_keys=True
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def score_set(
    model: Any, tokenizer: Any, test: list[Conversation], params: Any, work: dict[str, Work]
) -> tuple[dict, dict]:
    evaluate, seed, max_length = params.evaluate, params.seed, params.tokenize.max_length
    seconds = {}
    started = time.perf_counter()
    turns = fluency(model, tokenizer, test, max_length, evaluate.batch_size, work["scoring"])
    seconds["fluency_s"] = time.perf_counter() - started
    started = time.perf_counter()
    replies = generate(
        model,
        tokenizer,
        test,
        pick_turns(test, evaluate.turns_per_conversation, seed),
        evaluate,
        max_length,
        seed,
        work["prefills"],
        work["steps"],
    )
    seconds["generation_s"] = time.perf_counter() - started
    started = time.perf_counter()
    ranking = rank(model, tokenizer, test, evaluate.ranking, max_length, seed)
    seconds["ranking_s"] = time.perf_counter() - started
    scores = {
        "conversations": [{"id": c["id"], "topic": topic_of(c)} for c in test],
        "turns": turns,
        "replies": replies,
        "ranking": ranking,
    }
    return scores, seconds


def test_sets(params: Any) -> dict[str, list[Conversation]]:
    evaluate, seed = params.evaluate, params.seed
    test = sample_conversations(read_conversations(TEST_SETS["test"]), evaluate.max_conversations, seed)
    if not test:
        raise InputError(f"{TEST_SETS['test']}: no test conversations; raise preprocess.test_fraction")
    unseen_path = TEST_SETS["unseen"]
    unseen = read_conversations(unseen_path) if unseen_path.exists() else []
    unseen = (
        []
        if evaluate.max_unseen_conversations == 0
        else sample_conversations(unseen, evaluate.max_unseen_conversations, seed)
    )
    return {"test": test, "unseen": unseen}


def score(name: str, params: Any) -> tuple[dict, dict]:
    evaluate = params.evaluate
    sets = test_sets(params)
    device = pick_device()
    model, tokenizer = load_causal_lm(MODELS[name])
    precision = choose(evaluate.precision, model.config)
    model = cast_weights(model, precision.dtype).to(device)  # parameters only: RoPE frequencies stay float32
    if name == "base":  # the fine-tuned tokenizer carries the system prompt choice already; the base one gets the same
        tokenizer = with_system_prompt(tokenizer, params.tokenize.system_prompt)
    work = {"scoring": Work(), "prefills": Work(), "steps": Work()}
    scored, seconds = {}, {"fluency_s": 0.0, "generation_s": 0.0, "ranking_s": 0.0}
    for set_name, conversations in sets.items():
        scored[set_name], spent = score_set(model, tokenizer, conversations, params, work)
        seconds = {key: seconds[key] + spent[key] for key in seconds}
    fluency_ceiling = inference_fraction(
        model, precision.precision, [work["scoring"].mean()], seconds["fluency_s"], device
    )
    generation_ceiling = inference_fraction(
        model, precision.precision, [work["prefills"].mean(), work["steps"].mean()], seconds["generation_s"], device
    )
    scores = {
        "model": name,
        "precision": precision.precision,
        "setup": {"tokenizer": tokenizer_digest(tokenizer), "max_length": params.tokenize.max_length},
        "sets": scored,
    }
    tokens = sum(t["tokens"] for s in scored.values() for t in s["turns"])
    generated = sum("reply" in r for s in scored.values() for r in s["replies"])
    runtime = {
        "device": str(device),
        "precision": precision.as_dict(),
        "machine": describe_machine(),
        **{key: round(value, 1) for key, value in seconds.items()},
        "scored_tokens": tokens,
        "scored_tokens_per_s": round(tokens / max(seconds["fluency_s"], 1e-9), 1),
        "fluency_positions_per_s": round(sum(p for p, _ in work["scoring"].calls) / max(seconds["fluency_s"], 1e-9), 1),
        "fluency_ceiling": fluency_ceiling,
        "replies": generated,
        "replies_per_s": round(generated / max(seconds["generation_s"], 1e-9), 2),
        "generation_forward_calls": len(work["prefills"].calls) + len(work["steps"].calls),
        "generation_ceiling": generation_ceiling,
        "ranked_turns": sum(len(s["ranking"]) for s in scored.values()),
    }
    return scores, runtime


def main() -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    args = parser.parse_args()
    params = load_params()
    use_slot()  # this experiment's share of the machine when queued experiments run at once (stages/lib/launch.py)
    scores, runtime = score(args.model, params)
    write_json_files({SCORES / f"{args.model}.json": scores, RUNTIME.format(model=args.model): runtime})
    sizes = ", ".join(f"{name} {len(s['conversations'])}" for name, s in scores["sets"].items())
    print(
        f"score {args.model}: conversations {sizes}; {runtime['scored_tokens']} scored tokens in "
        f"{runtime['fluency_s']} s ({runtime['fluency_ceiling']['fraction_of_ceiling']:.0%} "
        "of the GEMM ceiling measured here), "
        f"{runtime['replies']} replies in {runtime['generation_s']} s "
        f"({runtime['generation_ceiling']['fraction_of_ceiling']:.0%}), "
        f"{runtime['ranked_turns']} turns ranked in {runtime['ranking_s']} s "
        f"({scores['precision']}, {runtime['device']}) -> {SCORES / (args.model + '.json')}"
    )
    return 0


if __name__ == "__main__":
    run(main)
