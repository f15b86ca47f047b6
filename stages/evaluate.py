"""Stage `evaluate`: base and fine-tuned scores side by side, every number with its 95% interval.

Reads data/scores/{base,finetuned}.json (stage `score`) and the test split. Writes
- metrics/eval.json: fluency, conversational accuracy and generation quality of each model with a seeded
  bootstrap interval over test conversations (`x`, `x_low`, `x_high`), the paired change fine-tuned − base
  with its interval and a verdict (better / worse / within noise), the human replies' own values, and the gate;
- metrics/eval_by_depth.json and metrics/eval_by_topic.json: slices with their support (for `dvc plots`);
- metrics/eval_conversations.json: per-conversation statistics of both models, so that two revisions can be
  compared pairwise on the same conversations (`python -m stages.tools.review`).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Hashable

from stages.lib import scoring
from stages.lib.atomic import write_json
from stages.lib.cli import run
from stages.lib.conversations import InputError, read_conversations
from stages.lib.params import EvaluateParams, load_params
from stages.lib.paths import MODELS, SCORES, TEST
from stages.lib.stats import (SET_BASED, HEADLINE, ConversationScores, Interval, MetricSet, Reply, bootstrap,
                              change_verdict, paired_change)

EVAL_METRICS = Path("metrics/eval.json")
BY_DEPTH = Path("metrics/eval_by_depth.json")
BY_TOPIC = Path("metrics/eval_by_topic.json")
PER_CONVERSATION = Path("metrics/eval_conversations.json")
HUMAN_METRICS = ("distinct_1", "distinct_2", "repetition_rate", "mean_reply_words", "empty_reply_rate", "context_relevance")


def load_scores(name: str) -> dict:
    path = SCORES / f"{name}.json"
    if not path.exists():
        raise InputError(f"{path}: no scores; run the score stage first (dvc repro score@{name})")
    return json.loads(path.read_text(encoding="utf-8"))


def check_same_sample(base: dict, tuned: dict) -> None:
    same = (base["conversations"] == tuned["conversations"]
            and [(r["conversation"], r["turn"]) for r in base["replies"]] == [(r["conversation"], r["turn"]) for r in tuned["replies"]])
    if not same:
        raise InputError(f"{SCORES}: base and fine-tuned scores cover different test conversations or turns; rerun both (dvc repro)")


def context_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def depth_bucket(turn: int, edges: list[int]) -> int:
    """The lower edge of the bucket holding a 1-based turn number."""
    return max([edge for edge in edges if edge <= turn], default=edges[0])


class Scored:
    """Both models' scores joined to the test conversations, with per-reply relevance computed once."""

    def __init__(self, base: dict, tuned: dict, test: dict[str, dict]) -> None:
        self.conversations = base["conversations"]
        missing = [c["id"] for c in self.conversations if c["id"] not in test]
        if missing:
            raise InputError(f"{TEST}: conversations {missing[:3]} were scored but are not in the test split; rerun the score stages")
        self.messages = [test[c["id"]]["messages"] for c in self.conversations]
        self.scores = {"base": base, "finetuned": tuned}
        generated = [r for r in base["replies"] if "reply" in r]
        contexts = [context_text(self.messages[r["conversation"]][: r["turn"]]) for r in generated]
        humans = [self.messages[r["conversation"]][r["turn"]]["content"] for r in generated]
        texts = {name: [r["reply"] for r in self.scores[name]["replies"] if "reply" in r] for name in MODELS}
        relevance = scoring.Relevance(contexts + humans + texts["base"] + texts["finetuned"])
        self.relevance = {name: relevance.each(contexts, texts[name]) for name in MODELS}
        self.relevance["human"] = relevance.each(contexts, humans)

    def units(self, name: str, key: Callable[[int, int], Hashable] = lambda conversation, turn: None) -> dict[Hashable, list[ConversationScores]]:
        """ConversationScores of model `name` ('human' for the human replies), one per (conversation, key) with
        the turns whose key(conversation, turn) is that key; grouped by key."""
        source = self.scores["base" if name == "human" else name]
        pieces: dict[tuple[int, Hashable], ConversationScores] = {}

        def piece(conversation: int, turn: int) -> ConversationScores:
            k = key(conversation, turn)
            meta = self.conversations[conversation]
            return pieces.setdefault((conversation, k), ConversationScores(meta["id"], meta["topic"]))

        if name != "human":
            for t in source["turns"]:
                unit = piece(t["conversation"], t["turn"])
                unit.nll += t["nll"]
                unit.tokens += t["tokens"]
                unit.correct += t["correct"]
                unit.n_bytes += t["bytes"]
        generated = [r for r in source["replies"] if "reply" in r]
        for index, r in enumerate(generated):
            human = self.messages[r["conversation"]][r["turn"]]["content"]
            text, stopped = (human, r["human_fits_max_new_tokens"]) if name == "human" else (r["reply"], r["stopped"])
            piece(r["conversation"], r["turn"]).replies.append(Reply(r["turn"], text, human, stopped, self.relevance[name][index]))
        grouped: dict[Hashable, list[ConversationScores]] = {}
        for (conversation, k), unit in sorted(pieces.items(), key=lambda item: item[0][0]):
            grouped.setdefault(k, []).append(unit)
        return grouped


def interval_fields(name: str, interval: Interval) -> dict[str, float]:
    fields = interval.as_dict()
    return {name: fields["value"], f"{name}_low": fields["low"], f"{name}_high": fields["high"]}


def model_summary(metrics: MetricSet, names: tuple[str, ...], params: EvaluateParams, seed: int) -> dict[str, float]:
    summary: dict[str, float] = {}
    for name in names:
        summary.update(interval_fields(name, bootstrap(lambda idx, n=name: metrics.metric(n, idx), len(metrics),
                                                       params.bootstrap.resamples, params.bootstrap.confidence, seed,
                                                       recenter=name in SET_BASED)))
    summary["scored_tokens"] = int(metrics.tokens.sum())
    return summary


def quality_gate(change: dict, tuned: dict, params: EvaluateParams) -> dict:
    """Each check compares the interval's lower bound (or the point estimate) with its threshold."""
    bound = "low" if params.gate.use_lower_bound else "value"
    improvement = change["perplexity_improvement"]
    stop = {"value": tuned["stop_rate"], "low": tuned["stop_rate_low"]}
    checks = {
        "perplexity_improvement": {"value": improvement["value"], "low": improvement["low"],
                                   "minimum": params.gate.min_perplexity_improvement,
                                   "passed": improvement[bound] >= params.gate.min_perplexity_improvement},
        "stop_rate": {"value": stop["value"], "low": stop["low"], "minimum": params.gate.min_stop_rate,
                      "passed": stop[bound] >= params.gate.min_stop_rate},
    }
    return {"passed": all(c["passed"] for c in checks.values()), "compares": "lower bound" if bound == "low" else "point estimate", **checks}


def slice_table(scored: Scored, key_name: str, key: Callable[[int, int], Hashable], order: list, merge: Callable[[list], list],
                min_replies: int) -> list[dict]:
    """Per-slice values with their support; slices with fewer than `min_replies` generated replies are merged."""
    by_model = {name: scored.units(name, key) for name in MODELS}
    support = {k: sum(len(u.replies) for u in by_model["finetuned"].get(k, [])) for k in order}
    groups = merge([(k, support[k]) for k in order if k in by_model["finetuned"]])
    rows = []
    for label, members in groups:
        row: dict[str, Any] = {key_name: label}
        units = {name: [u for k in members for u in by_model[name].get(k, [])] for name in MODELS}
        row["conversations"] = len({u.id for u in units["finetuned"]})
        row["replies"] = sum(len(u.replies) for u in units["finetuned"])
        row["tokens"] = sum(u.tokens for u in units["finetuned"])
        for name in MODELS:
            metrics = MetricSet(units[name])
            everything = list(range(len(metrics)))
            row[f"{name}_perplexity"] = round(metrics.metric("perplexity", everything), 4) if row["tokens"] else None
            for metric in ("chrf", "stop_rate"):
                row[f"{name}_{metric}"] = round(metrics.metric(metric, everything), 4) if row["replies"] else None
        rows.append(row)
    return rows


def merge_small_topics(min_replies: int) -> Callable[[list], list]:
    def merge(items: list) -> list:
        kept = [(k, [k]) for k, n in items if n >= min_replies]
        small = [k for k, n in items if n < min_replies]
        return kept + ([(f"other ({len(small)} topics)", small)] if small else [])
    return merge


def merge_small_depths(min_replies: int) -> Callable[[list], list]:
    """Ordered buckets: a bucket below the minimum joins the one before it (the first joins the next)."""
    def merge(items: list) -> list:
        groups: list[list] = []  # [label, members, support]
        for k, n in items:
            if groups and (n < min_replies or groups[-1][2] < min_replies):
                groups[-1][1].append(k)
                groups[-1][2] += n
            else:
                groups.append([k, [k], n])
        return [(label, members) for label, members, _ in groups]
    return merge


def evaluate(params: EvaluateParams, seed: int) -> dict[str, Any]:
    base, tuned = load_scores("base"), load_scores("finetuned")
    check_same_sample(base, tuned)
    test = {c["id"]: c for c in read_conversations(TEST)}
    scored = Scored(base, tuned, test)
    whole = {name: scored.units(name)[None] for name in (*MODELS, "human")}  # one unit per conversation
    metric_sets = {name: MetricSet(units) for name, units in whole.items()}
    boot = params.bootstrap
    results: dict[str, Any] = {
        "test_conversations": len(scored.conversations),
        "generated_replies": sum("reply" in r for r in base["replies"]),
        "skipped_replies": sum("reply" not in r for r in base["replies"]),
        "precision": {name: scored.scores[name]["precision"] for name in MODELS},
        "bootstrap": {"unit": "conversation", "resamples": boot.resamples, "confidence": boot.confidence, "seed": seed},
    }
    for name in MODELS:
        results[name] = model_summary(metric_sets[name], HEADLINE, params, seed)
    everything = list(range(len(metric_sets["human"])))  # the human replies are the reference: values, no intervals
    results["human"] = {name: round(metric_sets["human"].metric(name, everything), 4) for name in HUMAN_METRICS}
    results["human"]["within_max_new_tokens"] = round(metric_sets["human"].metric("stop_rate", everything), 4)
    change = {}
    for name in HEADLINE:
        interval = paired_change(name, metric_sets["finetuned"], metric_sets["base"], boot.resamples, boot.confidence, seed)
        change["perplexity_improvement" if name == "perplexity" else name] = {**interval.as_dict(), "verdict": change_verdict(name, interval)}
    results["change"] = change
    results["gate"] = quality_gate(change, results["finetuned"], params)
    edges = params.depth_buckets
    depth_key = lambda conversation, turn: depth_bucket(turn + 1, edges)  # noqa: E731
    by_depth = slice_table(scored, "depth", depth_key, edges, merge_small_depths(params.min_slice_replies), params.min_slice_replies)
    topics = sorted({c["topic"] for c in scored.conversations})
    by_topic = slice_table(scored, "topic", lambda conversation, turn: scored.conversations[conversation]["topic"], topics,
                           merge_small_topics(params.min_slice_replies), params.min_slice_replies)
    by_id = {name: {unit.id: unit for unit in units} for name, units in whole.items()}
    per_conversation = [{"id": meta["id"], "topic": meta["topic"],
                         **{name: _plain(by_id[name].get(meta["id"], ConversationScores(meta["id"], meta["topic"])))
                            for name in (*MODELS, "human")}}
                        for meta in scored.conversations]
    return {"results": results, "by_depth": by_depth, "by_topic": by_topic, "per_conversation": per_conversation}


def _plain(unit: ConversationScores) -> dict:
    data = asdict(unit)
    data.pop("id"), data.pop("topic")
    data["nll"] = round(data["nll"], 6)
    for reply in data["replies"]:
        reply["relevance"] = round(reply["relevance"], 6)
    return data


def main() -> int:
    params = load_params()
    out = evaluate(params.evaluate, params.seed)
    results = out["results"]
    write_json(EVAL_METRICS, results)
    write_json(BY_DEPTH, out["by_depth"])
    write_json(BY_TOPIC, out["by_topic"])
    write_json(PER_CONVERSATION, out["per_conversation"])
    base, tuned, gate, change = results["base"], results["finetuned"], results["gate"], results["change"]
    improvement = change["perplexity_improvement"]
    print(f"evaluate: {results['test_conversations']} conversations, {results['generated_replies']} replies; perplexity "
          f"{base['perplexity']:.2f} -> {tuned['perplexity']:.2f} ({100 * improvement['value']:.1f}% better, 95% CI "
          f"{100 * improvement['low']:.1f}..{100 * improvement['high']:.1f}), stop rate {base['stop_rate']:.2f} -> "
          f"{tuned['stop_rate']:.2f} [{tuned['stop_rate_low']:.2f}, {tuned['stop_rate_high']:.2f}]; "
          f"gate {'passed' if gate['passed'] else 'FAILED'} ({gate['compares']})")
    if params.evaluate.gate.fail_on_gate and not gate["passed"]:
        print("error: quality gate failed (evaluate.gate.fail_on_gate is true)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run(main)
