"""Stage `evaluate`: base and fine-tuned models side by side on the same held-out test conversations.

Writes metrics/eval.json (fluency, conversational accuracy, generation quality, quality gate),
metrics/eval_by_depth.json and metrics/eval_by_topic.json (slices, for `dvc plots`), data/eval_samples.json
(every regenerated turn with each model's reply; the `transcripts` stage renders a sample of them) and
metrics/runtime/evaluate.json (seconds per pass).
"""
from __future__ import annotations

import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from stages.lib import scoring
from stages.lib.atomic import write_json
from stages.lib.cli import run
from stages.lib.conversations import Conversation, read_conversations, topic_of
from stages.lib.labels import TemplateCost, WindowStats, windows
from stages.lib.modeling import collator, load_causal_lm, trained_logits
from stages.lib.params import EvaluateParams, load_params
from stages.lib.paths import EVAL_SAMPLES as SAMPLES, MODELS, TEST
from stages.lib.template import fit_prompt, stop_token_ids, with_system_prompt
EVAL_METRICS = Path("metrics/eval.json")
BY_DEPTH = Path("metrics/eval_by_depth.json")
BY_TOPIC = Path("metrics/eval_by_topic.json")
EVAL_RUNTIME = Path("metrics/runtime/evaluate.json")  # wall-clock: kept apart so metrics/*.json are reproducible


@dataclass
class TurnFluency:
    """Summed statistics of one assistant turn's trained tokens."""

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0
    n_bytes: int = 0


@dataclass
class Sample:
    """One assistant turn to regenerate from its real context."""

    conversation: int
    turn: int
    topic: str
    context: list[dict]
    human: str
    replies: dict[str, str] = field(default_factory=dict)
    stopped: dict[str, bool] = field(default_factory=dict)


def depth_bucket(turn: int, edges: list[int]) -> int:
    """The lower edge of the bucket holding a 1-based turn number."""
    return max([edge for edge in edges if edge <= turn], default=edges[0])


def run_ids(positions: list[int]) -> list[int]:
    """Index of the contiguous run each trained position belongs to: one run per assistant turn of a window."""
    ids, run, previous = [], -1, None
    for position in positions:
        if previous is None or position != previous + 1:
            run += 1
        ids.append(run)
        previous = position
    return ids


def fluency(model: Any, tokenizer: Any, conversations: list[Conversation], max_length: int, batch_size: int) -> dict[tuple[int, int], TurnFluency]:
    """NLL, token count, correct argmax and UTF-8 bytes per (conversation, assistant turn), same labels as training."""
    cost = TemplateCost.measure(tokenizer)
    rows: list[tuple[list[int], list[int], list[tuple[int, int]]]] = []
    for index, conversation in enumerate(conversations):
        messages = conversation["messages"]
        for example in windows(tokenizer, messages, max_length, "assistant", cost, WindowStats()):
            turns = [(index, t) for t in range(example.turns[0], example.turns[1] + 1) if messages[t]["role"] == "assistant"]
            rows.append((example.input_ids, example.labels, turns))
    rows.sort(key=lambda row: len(row[0]))  # similar lengths batch together: less padding
    result: dict[tuple[int, int], TurnFluency] = defaultdict(TurnFluency)
    collate = collator(tokenizer)
    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), batch_size), desc="perplexity", unit="batch", leave=False):
            chunk = rows[start : start + batch_size]
            batch = collate([{"input_ids": ids, "labels": labels} for ids, labels, _ in chunk])
            scored = trained_logits(model, batch)
            logits, targets, keep = scored.logits, scored.targets, scored.keep[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            correct = logits.argmax(-1) == targets
            offset = 0
            for row_index, (_, _, turns) in enumerate(chunk):
                mask = keep[row_index]
                count = int(mask.sum())
                segment = torch.tensor(run_ids(mask.nonzero().flatten().tolist()), dtype=torch.long)
                row_targets = targets[offset : offset + count]
                for seg, key in enumerate(turns):
                    sel = segment == seg
                    stats = result[key]
                    stats.nll += float(nll[offset : offset + count][sel].sum())
                    stats.tokens += int(sel.sum())
                    stats.correct += int(correct[offset : offset + count][sel].sum())
                    stats.n_bytes += len(tokenizer.decode(row_targets[sel].tolist()).encode("utf-8"))
                offset += count
    return result


def pick_samples(conversations: list[Conversation], per_conversation: int, seed: int) -> list[Sample]:
    """A seeded choice of assistant turns that have at least one earlier user turn."""
    rng = random.Random(seed)
    samples = []
    for index, conversation in enumerate(conversations):
        messages = conversation["messages"]
        candidates = [t for t, m in enumerate(messages) if m["role"] == "assistant" and any(p["role"] == "user" for p in messages[:t])]
        for turn in sorted(rng.sample(candidates, min(per_conversation, len(candidates)))):
            samples.append(Sample(index, turn, topic_of(conversation), messages[:turn], messages[turn]["content"]))
    return samples


def generate(model: Any, tokenizer: Any, samples: list[Sample], name: str, params: EvaluateParams, max_length: int, seed: int) -> None:
    """Batched generation with left padding and the KV cache; fills sample.replies[name] and .stopped[name]."""
    stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    prompts = [fit_prompt(tokenizer, s.context, max_length - params.max_new_tokens) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]))
    left_pad = collator(tokenizer, side="left")
    torch.manual_seed(seed)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), params.batch_size), desc=f"generate {name}", unit="batch", leave=False):
            chunk = order[start : start + params.batch_size]
            batch = left_pad([{"input_ids": prompts[i]} for i in chunk])
            output = model.generate(
                **batch, max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                temperature=params.temperature if params.do_sample else None, top_p=params.top_p if params.do_sample else None,
                repetition_penalty=params.repetition_penalty,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids,
            )
            for row, index in zip(output[:, batch["input_ids"].shape[1]:].tolist(), chunk):
                stop = next((k for k, token in enumerate(row) if token in stop_ids), None)
                reply = row if stop is None else row[:stop]
                samples[index].replies[name] = tokenizer.decode(reply, skip_special_tokens=True).strip()
                samples[index].stopped[name] = stop is not None


def context_text(sample: Sample) -> str:
    return "\n".join(m["content"] for m in sample.context if m["role"] != "system")


def reply_metrics(samples: list[Sample], name: str, relevance: scoring.Relevance) -> dict[str, float]:
    replies = [s.human if name == "human" else s.replies[name] for s in samples]
    quality = {
        "distinct_1": scoring.distinct_n(replies, 1),
        "distinct_2": scoring.distinct_n(replies, 2),
        "repetition_rate": scoring.repetition_rate(replies),
        "mean_reply_words": scoring.mean_words(replies),
        "empty_reply_rate": scoring.empty_rate(replies),
        "context_relevance": relevance.mean([context_text(s) for s in samples], replies),
    }
    if name == "human":
        return quality
    humans = [s.human for s in samples]
    return {
        "bleu": scoring.bleu(replies, humans),
        "chrf": scoring.chrf(replies, humans),
        "rouge_l": scoring.rouge_l(replies, humans),
        "stop_rate": sum(s.stopped[name] for s in samples) / len(samples) if samples else 0.0,
        **quality,
    }


def within_budget(replies: list[str], tokenizer: Any, max_new_tokens: int) -> float:
    """Share of replies that, with their end-of-turn token, fit in `max_new_tokens`."""
    if not replies:
        return 0.0
    lengths = [len(ids) + 1 for ids in tokenizer(replies, add_special_tokens=False)["input_ids"]]
    return sum(n <= max_new_tokens for n in lengths) / len(replies)


def fluency_metrics(turns: Iterable[TurnFluency]) -> dict[str, float]:
    turns = list(turns)
    nll, tokens = sum(t.nll for t in turns), sum(t.tokens for t in turns)
    return {
        "perplexity": scoring.perplexity(nll, tokens),
        "bits_per_byte": scoring.bits_per_byte(nll, sum(t.n_bytes for t in turns)),
        "token_accuracy": sum(t.correct for t in turns) / tokens if tokens else float("nan"),
        "scored_tokens": tokens,
    }


def rounded(values: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}


def slice_rows(key_name: str, keys: list, fluency_by: dict, samples: list[Sample], sample_key, turn_key, relevance) -> list[dict]:
    rows = []
    for key in keys:
        row: dict[str, Any] = {key_name: key}
        chosen = [s for s in samples if sample_key(s) == key]
        row["replies"] = len(chosen)
        for name in MODELS:
            turns = [t for k, t in fluency_by[name].items() if turn_key(k) == key]
            row[f"{name}_perplexity"] = round(fluency_metrics(turns)["perplexity"], 4) if turns else None
            if chosen:
                metrics = reply_metrics(chosen, name, relevance)
                row[f"{name}_chrf"] = round(metrics["chrf"], 4)
                row[f"{name}_stop_rate"] = round(metrics["stop_rate"], 4)
        row["tokens"] = sum(t.tokens for k, t in fluency_by["finetuned"].items() if turn_key(k) == key)
        rows.append(row)
    return rows


def quality_gate(results: dict, params: EvaluateParams) -> dict:
    base, tuned = results["base"], results["finetuned"]
    improvement = 1.0 - tuned["perplexity"] / base["perplexity"]
    checks = {
        "perplexity_improvement": {"value": round(improvement, 4), "minimum": params.gate.min_perplexity_improvement,
                                   "passed": improvement >= params.gate.min_perplexity_improvement},
        "stop_rate": {"value": round(tuned["stop_rate"], 4), "minimum": params.gate.min_stop_rate,
                      "passed": tuned["stop_rate"] >= params.gate.min_stop_rate},
    }
    return {"passed": all(c["passed"] for c in checks.values()), **checks}


def evaluate(params: EvaluateParams, max_length: int, system_prompt: str, seed: int) -> tuple[dict, list[dict], list[dict], list[dict], dict]:
    """Results (deterministic for given params, data and models), slices, samples, and wall-clock timings."""
    test = read_conversations(TEST)[: params.max_conversations]
    samples = pick_samples(test, params.turns_per_conversation, seed)
    fluency_by: dict[str, dict] = {}
    results: dict[str, Any] = {"test_conversations": len(test), "generated_replies": len(samples)}
    timings = {}
    for name, path in MODELS.items():
        model, tokenizer = load_causal_lm(path)
        if name == "base":  # the fine-tuned tokenizer carries the choice already; the base one gets the same
            tokenizer = with_system_prompt(tokenizer, system_prompt)
        started = time.perf_counter()
        fluency_by[name] = fluency(model, tokenizer, test, max_length, params.batch_size)
        timings[f"{name}_perplexity_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        generate(model, tokenizer, samples, name, params, max_length, seed)
        timings[f"{name}_generation_s"] = round(time.perf_counter() - started, 1)
        results[name] = fluency_metrics(fluency_by[name].values())
        del model
    relevance = scoring.Relevance([context_text(s) for s in samples] + [s.human for s in samples]
                                  + [s.replies[n] for s in samples for n in MODELS])
    for name in MODELS:
        results[name] = rounded({**results[name], **reply_metrics(samples, name, relevance)})
    results["human"] = rounded({
        **reply_metrics(samples, "human", relevance),
        # The stop rate's ceiling: a model replying exactly like the humans cannot stop sooner than they did.
        "within_max_new_tokens": within_budget([s.human for s in samples], tokenizer, params.max_new_tokens),
    })
    results["gate"] = quality_gate(results, params)
    depth_keys = sorted({depth_bucket(t + 1, params.depth_buckets) for t in range(max(len(c["messages"]) for c in test))})
    by_depth = slice_rows("depth", depth_keys, fluency_by, samples, lambda s: depth_bucket(s.turn + 1, params.depth_buckets),
                          lambda k: depth_bucket(k[1] + 1, params.depth_buckets), relevance)
    topics = sorted({topic_of(c) for c in test})
    by_topic = slice_rows("topic", topics, fluency_by, samples, lambda s: s.topic, lambda k: topic_of(test[k[0]]), relevance)
    return results, by_depth, by_topic, [asdict(sample) for sample in samples], timings


def main() -> int:
    params = load_params()
    results, by_depth, by_topic, samples, timings = evaluate(params.evaluate, params.tokenize.max_length, params.tokenize.system_prompt, params.seed)
    write_json(EVAL_METRICS, results)
    write_json(EVAL_RUNTIME, {**timings, "torch_threads": torch.get_num_threads()})
    write_json(BY_DEPTH, by_depth)
    write_json(BY_TOPIC, by_topic)
    write_json(SAMPLES, samples)
    base, tuned, gate = results["base"], results["finetuned"], results["gate"]
    print(f"evaluate: perplexity {base['perplexity']:.2f} -> {tuned['perplexity']:.2f} "
          f"({100 * gate['perplexity_improvement']['value']:.1f}% better), chrF {base['chrf']:.1f} -> {tuned['chrf']:.1f}, "
          f"stop rate {base['stop_rate']:.2f} -> {tuned['stop_rate']:.2f}; gate {'passed' if gate['passed'] else 'FAILED'}")
    if params.evaluate.gate.fail_on_gate and not gate["passed"]:
        print("error: quality gate failed (evaluate.gate.fail_on_gate is true)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run(main)
