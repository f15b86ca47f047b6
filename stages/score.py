"""Stage `score@base` / `score@finetuned`: one model on the held-out test conversations.

    python -m stages.score --model base|finetuned

Writes data/scores/<model>.json: for every assistant turn of the sampled test conversations its summed NLL,
token count, correct next-token predictions and UTF-8 bytes (the same labels as training), and for a seeded
choice of turns the reply generated from the real context. `evaluate` turns both models' scores into metrics
with intervals. The base model's scores depend only on the base model, the test split and the scoring
params, so a training experiment never re-scores it (DVC restores them from its cache).
"""
from __future__ import annotations

import argparse
import inspect
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from stages.lib.atomic import write_json
from stages.lib.cli import ArgumentParser, run
from stages.lib.conversations import Conversation, InputError, read_conversations, topic_of
from stages.lib.labels import TemplateCost, WindowStats, windows
from stages.lib.modeling import cast_weights, collator, load_causal_lm, pick_device, trained_logits
from stages.lib.params import EvaluateParams, load_params
from stages.lib.paths import MODELS, SCORES, TEST
from stages.lib.precision import choose, inference_fraction
from stages.lib.template import TemplateError, fit_prompt, stop_token_ids, with_system_prompt

RUNTIME = "metrics/runtime/score_{model}.json"  # wall-clock: kept apart so the scores are reproducible


class ReplyRepetitionPenalty:
    """CTRL-style repetition penalty over the tokens of the reply being generated only.

    transformers' `repetition_penalty` also penalises every prompt token, and the end-of-turn token closes the
    system block and every earlier turn of the prompt: the token that ends a reply would be penalised at every
    step, pushing the stop rate down and replies longer, and reusing words of the context (which chrF rewards)
    would be penalised too. Here the prompt is never penalised and the stop tokens never are.
    """

    def __init__(self, penalty: float, prompt_length: int, exempt_ids: list[int]) -> None:
        self.penalty, self.prompt_length = penalty, prompt_length
        self.exempt = torch.tensor(sorted(set(exempt_ids)), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0 or self.penalty == 1.0:
            return scores
        original = torch.gather(scores, 1, generated)
        penalised = torch.where(original < 0, original * self.penalty, original / self.penalty)
        penalised = torch.where(torch.isin(generated, self.exempt.to(generated.device)), original, penalised)
        return scores.scatter(1, generated, penalised)


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


def fluency(model: Any, tokenizer: Any, conversations: list[Conversation], max_length: int, batch_size: int,
            work: Work | None = None) -> list[dict]:
    """Per assistant turn: summed NLL, tokens, correct argmax and the reply's own UTF-8 bytes.

    Each turn is scored once, in the window that trains it (DESIGN §4.5), with the labels of training."""
    cost = TemplateCost.measure(tokenizer)
    rows: list[tuple[list[int], list[int], list[tuple[int, int]]]] = []
    for index, conversation in enumerate(conversations):
        messages = conversation["messages"]
        for example in windows(tokenizer, messages, max_length, "assistant", cost, WindowStats()):
            turns = [(index, t) for t in range(example.turns[0], example.turns[1] + 1) if messages[t]["role"] == "assistant"]
            rows.append((example.input_ids, example.labels, turns))
    rows.sort(key=lambda row: len(row[0]))  # similar lengths batch together: less padding
    records: list[dict] = []
    collate = collator(tokenizer)
    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), batch_size), desc="perplexity", unit="batch", leave=False):
            chunk = rows[start : start + batch_size]
            batch = {k: v.to(model.device) for k, v in collate([{"input_ids": ids, "labels": labels} for ids, labels, _ in chunk]).items()}
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
                    records.append({"conversation": conversation, "turn": turn,
                                    "nll": float(nll[offset : offset + len(positions)][selected].sum()),
                                    "tokens": int(selected.sum()),
                                    "correct": int(correct[offset : offset + len(positions)][selected].sum()),
                                    "bytes": len(content.encode("utf-8"))})
                offset += len(positions)
    return sorted(records, key=lambda r: (r["conversation"], r["turn"]))


def pick_turns(conversations: list[Conversation], per_conversation: int, seed: int) -> list[tuple[int, int]]:
    """A seeded choice of (conversation, assistant turn) with at least one earlier user turn."""
    rng = random.Random(seed)
    chosen = []
    for index, conversation in enumerate(conversations):
        messages = conversation["messages"]
        candidates = [t for t, m in enumerate(messages) if m["role"] == "assistant" and any(p["role"] == "user" for p in messages[:t])]
        chosen += [(index, turn) for turn in sorted(rng.sample(candidates, min(per_conversation, len(candidates))))]
    return chosen


def generate(model: Any, tokenizer: Any, conversations: list[Conversation], turns: list[tuple[int, int]],
             params: EvaluateParams, max_length: int, seed: int, prefills: Work | None = None, steps: Work | None = None) -> list[dict]:
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
    keeps_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters  # generate's prefill: one head row per prompt
    replies: dict[int, dict] = {}
    torch.manual_seed(seed)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), params.batch_size), desc="generate", unit="batch", leave=False):
            chunk = order[start : start + params.batch_size]
            batch = {k: v.to(model.device) for k, v in left_pad([{"input_ids": prompts[i]} for i in chunk]).items()}
            width = batch["input_ids"].shape[1]
            output = model.generate(
                **batch, max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                temperature=params.temperature if params.do_sample else None, top_p=params.top_p if params.do_sample else None,
                logits_processor=[ReplyRepetitionPenalty(params.repetition_penalty, width, stop_ids)],
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids,
            )
            if prefills is not None and steps is not None:  # the prompt pass, then one position per row per new token
                rows = len(chunk)
                prefills.calls.append((rows * width, rows if keeps_last_logits else rows * width))
                steps.calls += [(rows, rows)] * max(0, output.shape[1] - width - 1)
            for row, k in zip(output[:, width:].tolist(), chunk):
                stop = next((i for i, token in enumerate(row) if token in stop_ids), None)
                reply = row if stop is None else row[:stop]
                replies[k] = {"reply": tokenizer.decode(reply, skip_special_tokens=True).strip(), "stopped": stop is not None}
    records = []
    for k, (conversation, turn) in enumerate(turns):
        human = conversations[conversation]["messages"][turn]["content"]
        fits = len(tokenizer(human, add_special_tokens=False)["input_ids"]) + 1 <= params.max_new_tokens
        record = {"conversation": conversation, "turn": turn, "human_fits_max_new_tokens": fits}
        records.append({**record, **replies[k]} if k in replies else {**record, "skipped": "prompt longer than max_length - max_new_tokens"})
    return records


def score(name: str, params: Any) -> tuple[dict, dict]:
    evaluate, seed = params.evaluate, params.seed
    test = sample_conversations(read_conversations(TEST), evaluate.max_conversations, seed)
    if not test:
        raise InputError(f"{TEST}: no test conversations; raise preprocess.test_fraction")
    device = pick_device()
    model, tokenizer = load_causal_lm(MODELS[name])
    precision = choose(evaluate.precision, model.config)
    model = cast_weights(model, precision.dtype).to(device)  # parameters only: RoPE frequencies stay float32
    if name == "base":  # the fine-tuned tokenizer carries the system prompt choice already; the base one gets the same
        tokenizer = with_system_prompt(tokenizer, params.tokenize.system_prompt)
    scoring, prefills, steps = Work(), Work(), Work()
    started = time.perf_counter()
    turns = fluency(model, tokenizer, test, params.tokenize.max_length, evaluate.batch_size, scoring)
    fluency_s = time.perf_counter() - started
    started = time.perf_counter()
    replies = generate(model, tokenizer, test, pick_turns(test, evaluate.turns_per_conversation, seed), evaluate,
                       params.tokenize.max_length, seed, prefills, steps)
    generation_s = time.perf_counter() - started
    fluency_ceiling = inference_fraction(model, precision.precision, [scoring.mean()], fluency_s, device)
    generation_ceiling = inference_fraction(model, precision.precision, [prefills.mean(), steps.mean()],
                                            generation_s, device)
    scores = {
        "model": name,
        "precision": precision.precision,
        "conversations": [{"id": c["id"], "topic": topic_of(c)} for c in test],
        "turns": turns,
        "replies": replies,
    }
    generated = [r for r in replies if "reply" in r]
    runtime = {"device": str(device), "precision": precision.as_dict(), "fluency_s": round(fluency_s, 1),
               "generation_s": round(generation_s, 1), "scored_tokens": sum(t["tokens"] for t in turns),
               "scored_tokens_per_s": round(sum(t["tokens"] for t in turns) / max(fluency_s, 1e-9), 1),
               "fluency_positions_per_s": round(sum(p for p, _ in scoring.calls) / max(fluency_s, 1e-9), 1),
               "fluency_ceiling": fluency_ceiling,
               "replies": len(generated), "replies_per_s": round(len(generated) / max(generation_s, 1e-9), 2),
               "generation_forward_calls": len(prefills.calls) + len(steps.calls), "generation_ceiling": generation_ceiling,
               "torch_threads": torch.get_num_threads()}
    return scores, runtime


def main() -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    args = parser.parse_args()
    params = load_params()
    scores, runtime = score(args.model, params)
    write_json(SCORES / f"{args.model}.json", scores)
    write_json(RUNTIME.format(model=args.model), runtime)
    tokens = sum(t["tokens"] for t in scores["turns"])
    print(f"score {args.model}: {len(scores['conversations'])} test conversations, {tokens} scored tokens in "
          f"{runtime['fluency_s']} s ({runtime['fluency_ceiling']['fraction_of_ceiling']:.0%} of the GEMM ceiling measured here), "
          f"{runtime['replies']} replies in {runtime['generation_s']} s ({runtime['generation_ceiling']['fraction_of_ceiling']:.0%}) "
          f"({scores['precision']}, {runtime['device']}) -> {SCORES / (args.model + '.json')}")
    return 0


if __name__ == "__main__":
    run(main)
