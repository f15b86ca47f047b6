"""Stage `evaluate`: base and fine-tuned scores side by side, every number with its 95% interval.

Reads data/scores/{base,finetuned}.json (stage `score`), the test sets and the sentence encoder. Writes
- metrics/eval.json: for the test set of seen topics and for the held-out topics (`unseen`), each model's
  metrics with a seeded bootstrap interval over conversations (`x`, `x_low`, `x_high`), the human replies'
  own values, the paired change fine-tuned − base with its interval, Holm-adjusted p-value and verdict
  (primary metrics: better / worse; human-referenced ones: closer to / further from human; descriptive ones
  none), and the gate;
- metrics/eval_by_depth.json and metrics/eval_by_topic.json: slices with their support and intervals;
- metrics/eval_conversations.json: per-conversation statistics of both models, so that two revisions can be
  compared pairwise on the same (conversation, turn) (`python -m stages.tools.review`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Hashable

from stages.lib import text_metrics
from stages.lib.atomic import write_json_files
from stages.lib.cli import run
from stages.lib.conversations import InputError, read_conversations
from stages.lib.params import EvaluateParams, load_params
from stages.lib.paths import MODELS, SCORES, TEST_SETS
from stages.lib.semantic import load_encoder, similarities
from stages.lib.stats import (
    HEADLINE,
    HUMAN_REFERENCED,
    PRIMARY,
    ConversationScores,
    Interval,
    MetricSet,
    Reply,
    family_verdicts,
    metric_interval,
    paired_change,
)

EVAL_METRICS = Path("metrics/eval.json")
BY_DEPTH = Path("metrics/eval_by_depth.json")
BY_TOPIC = Path("metrics/eval_by_topic.json")
PER_CONVERSATION = Path("metrics/eval_conversations.json")
HUMAN_METRICS = (
    "mean_reply_words",
    "distinct_1",
    "distinct_2",
    "generic_reply_share",
    "context_overlap",
    "repetition_rate",
    "empty_reply_rate",
)
SLICE_METRICS = ("perplexity", "semantic_similarity", "stop_rate")
SETS = tuple(TEST_SETS)  # "test" (seen topics), "unseen" (topics held out of training)


def load_scores(name: str) -> dict:
    path = SCORES / f"{name}.json"
    if not path.exists():
        raise InputError(f"{path}: no scores; run the score stage first (dvc repro score@{name})")
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); rerun the score stage (dvc repro -f score@{name})") from None
    if not isinstance(scores, dict) or "sets" not in scores:
        raise InputError(f"{path}: written by an older score stage (no 'sets'); rerun it (dvc repro -f score@{name})")
    return scores


def check_same_sample(base: dict, tuned: dict) -> None:
    for name in SETS:
        a, b = base["sets"].get(name, {}), tuned["sets"].get(name, {})
        same = (
            a.get("conversations") == b.get("conversations")
            and [(r["conversation"], r["turn"], "reply" in r) for r in a.get("replies", [])]
            == [(r["conversation"], r["turn"], "reply" in r) for r in b.get("replies", [])]
            and [(r["conversation"], r["turn"], r["distractors"]) for r in a.get("ranking", [])]
            == [(r["conversation"], r["turn"], r["distractors"]) for r in b.get("ranking", [])]
        )
        if not same:
            raise InputError(
                f"{SCORES}: base and fine-tuned scores cover different {name} conversations, turns or ranking "
                "candidates; rerun both (dvc repro)"
            )


def context_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def context_digest(messages: list[dict]) -> str:
    """What a reply answers, for pairing two revisions' replies by turn."""
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def depth_bucket(turn: int, edges: list[int]) -> int:
    """The lower edge of the bucket holding a 1-based turn number."""
    return max([edge for edge in edges if edge <= turn], default=edges[0])


def hit(scores: list[float]) -> float:
    """1 when the real reply (first) is the most likely; a tie for first shares the win."""
    best = max(scores)
    return (scores[0] == best) / sum(score == best for score in scores)


class Scored:
    """Both models' scores of one test set joined to its conversations, with per-reply relevance and semantic
    similarity computed once."""

    def __init__(self, name: str, base: dict, tuned: dict, test: dict[str, dict], encoder: tuple[Any, Any]) -> None:
        self.conversations = base["conversations"]
        missing = [c["id"] for c in self.conversations if c["id"] not in test]
        if missing:
            raise InputError(
                f"{TEST_SETS[name]}: conversations {missing[:3]} were scored but are not in it; rerun the score stages"
            )
        self.messages = [test[c["id"]]["messages"] for c in self.conversations]
        self.scores = {"base": base, "finetuned": tuned}
        generated = [r for r in base["replies"] if "reply" in r]
        contexts = [context_text(self.messages[r["conversation"]][: r["turn"]]) for r in generated]
        self.contexts = [context_digest(self.messages[r["conversation"]][: r["turn"]]) for r in generated]
        humans = [self.messages[r["conversation"]][r["turn"]]["content"] for r in generated]
        texts = {model: [r["reply"] for r in self.scores[model]["replies"] if "reply" in r] for model in MODELS}
        # Fitted on what the test set fixes (contexts and human replies), never on the models' own replies: one
        # model's replies would otherwise move the other's overlap, and a review across revisions.
        relevance = text_metrics.Relevance(contexts + humans)
        self.relevance = {model: relevance.each(contexts, texts[model]) for model in MODELS}
        self.relevance["human"] = relevance.each(contexts, humans)
        self.semantic = {model: similarities(*encoder, texts[model], humans) for model in MODELS}
        self.semantic["human"] = [1.0] * len(humans)

    def depth(self, conversation: int, turn: int) -> int:
        """The 1-based dialogue turn of message `turn` (its index), system messages not counted."""
        return turn + 1 - sum(m["role"] == "system" for m in self.messages[conversation][:turn])

    def units(
        self, name: str, key: Callable[[int, int], Hashable] = lambda conversation, turn: None
    ) -> dict[Hashable, list[ConversationScores]]:
        """ConversationScores of model `name` ('human' for the human replies), one per (conversation, key) with
        the turns whose key(conversation, turn) is that key; grouped by key."""
        source = self.scores["base" if name == "human" else name]
        pieces: dict[tuple[int, Hashable], ConversationScores] = {}

        def piece(conversation: int, turn: int) -> ConversationScores:
            k = key(conversation, turn)
            meta = self.conversations[conversation]
            return pieces.setdefault((conversation, k), ConversationScores(meta["id"], meta["topic"]))

        if name == "human":  # the human replies cover the models' conversations, replies generated or not
            for t in source["turns"] + source["ranking"]:
                piece(t["conversation"], t["turn"])
        else:
            for t in source["turns"]:
                unit = piece(t["conversation"], t["turn"])
                unit.nll += t["nll"]
                unit.tokens += t["tokens"]
                unit.correct += t["correct"]
                unit.n_bytes += t["bytes"]
            for r in source["ranking"]:
                piece(r["conversation"], r["turn"]).ranked.append([r["turn"], hit(r["scores"])])
        generated = [r for r in source["replies"] if "reply" in r]
        for index, r in enumerate(generated):
            human = self.messages[r["conversation"]][r["turn"]]["content"]
            text, stopped = (human, r["human_fits_max_new_tokens"]) if name == "human" else (r["reply"], r["stopped"])
            piece(r["conversation"], r["turn"]).replies.append(
                Reply(
                    r["turn"],
                    text,
                    human,
                    stopped,
                    self.relevance[name][index],
                    self.semantic[name][index],
                    self.contexts[index],
                )
            )
        grouped: dict[Hashable, list[ConversationScores]] = {}
        for (_, k), unit in sorted(pieces.items(), key=lambda item: item[0][0]):
            grouped.setdefault(k, []).append(unit)
        return grouped


def interval_fields(name: str, interval: Interval) -> dict[str, float | None]:
    fields = {k: (v if math.isfinite(v) else None) for k, v in interval.as_dict().items()}
    return {name: fields["value"], f"{name}_low": fields["low"], f"{name}_high": fields["high"]}


def model_summary(metrics: MetricSet, names: tuple[str, ...], params: EvaluateParams, seed: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    boot = params.bootstrap
    for name in names:
        summary.update(interval_fields(name, metric_interval(metrics, name, boot.resamples, boot.confidence, seed)))
    summary["scored_tokens"] = int(metrics.tokens.sum())
    return summary


def compare(sets: dict[str, MetricSet], params: EvaluateParams, seed: int) -> dict[str, dict]:
    """The paired change fine-tuned − base of every headline metric, with Holm-adjusted verdicts."""
    boot = params.bootstrap
    everything = list(range(len(sets["base"])))
    intervals, identical = {}, {}
    for name in HEADLINE:
        intervals[name] = paired_change(
            name,
            sets["finetuned"],
            sets["base"],
            boot.resamples,
            boot.confidence,
            seed,
            human=sets["human"] if name in HUMAN_REFERENCED else None,
        )
        a, b = sets["finetuned"].metric(name, everything), sets["base"].metric(name, everything)
        identical[name] = a == b or (math.isnan(a) and math.isnan(b))
    verdicts = family_verdicts(intervals, 1.0 - boot.confidence, identical)
    change = {}
    for name in HEADLINE:
        p, word = verdicts[name]
        interval = {k: (v if math.isfinite(v) else None) for k, v in intervals[name].as_dict().items()}
        change["perplexity_improvement" if name == "perplexity" else name] = {
            **interval,
            "measures": "distance_to_human" if name in HUMAN_REFERENCED else "change",
            "p_holm": round(p, 4) if math.isfinite(p) else None,
            "verdict": word,
        }
    return change


def bound_of(summary: dict, name: str, bound: str) -> float:
    """A model summary's `name` at `bound` (value, low or high); NaN when it is missing or null."""
    return _nan(summary.get(name if bound == "value" else f"{name}_{bound}"))


def quality_gate(change: dict, tuned: dict, params: EvaluateParams) -> dict:
    """Each check compares the interval's conservative bound (or the point estimate) with its threshold. A
    value that is not a number fails its check."""
    gate = params.gate
    low, high = ("low", "high") if gate.use_lower_bound else ("value", "value")
    checks: dict[str, dict] = {}

    def check(name: str, value: float, bound: float, threshold: float, at_least: bool) -> None:
        passed = math.isfinite(bound) and (bound >= threshold if at_least else bound <= threshold)
        checks[name] = {
            "value": value,
            "bound": bound if math.isfinite(bound) else None,
            ("minimum" if at_least else "maximum"): threshold,
            "passed": bool(passed),
        }

    improvement = change["perplexity_improvement"]
    check("perplexity_improvement", improvement["value"], _nan(improvement[low]), gate.min_perplexity_improvement, True)
    check("stop_rate", tuned["stop_rate"], bound_of(tuned, "stop_rate", low), gate.min_stop_rate, True)
    ceilings = (("empty_reply_rate", gate.max_empty_reply_rate), ("generic_reply_share", gate.max_generic_reply_share))
    for name, most in ceilings:
        if most is not None:  # a ceiling: the interval's upper end must stay under it
            check(name, tuned[name], bound_of(tuned, name, high), most, False)
    if gate.min_ranking_change is not None:
        ranking = change["next_reply_hits_at_1"]
        check("next_reply_hits_at_1_change", ranking["value"], _nan(ranking[low]), gate.min_ranking_change, True)
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "compares": "interval bound" if gate.use_lower_bound else "point estimate",
        **checks,
    }


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def slice_table(
    scored: Scored,
    key_name: str,
    key: Callable[[int, int], Hashable],
    order: list,
    merge: Callable[[list], list],
    params: EvaluateParams,
    seed: int,
) -> list[dict]:
    """Per-slice values with their intervals and support; slices with fewer than `min_slice_replies` generated
    replies are merged."""
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
            for metric in SLICE_METRICS:
                interval = metric_interval(
                    metrics, metric, params.bootstrap.resamples, params.bootstrap.confidence, seed
                )
                row.update(interval_fields(f"{name}_{metric}", interval))
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


def evaluate_set(name: str, scored: Scored, params: EvaluateParams, seed: int) -> tuple[dict, list, list, list]:
    whole = {model: scored.units(model)[None] if scored.conversations else [] for model in (*MODELS, "human")}
    metric_sets = {model: MetricSet(units) for model, units in whole.items()}
    base = scored.scores["base"]
    results: dict[str, Any] = {
        "test_conversations": len(scored.conversations),
        "generated_replies": sum("reply" in r for r in base["replies"]),
        "skipped_replies": sum("reply" not in r for r in base["replies"]),
        "ranked_turns": len(base["ranking"]),
    }
    if not scored.conversations:
        return results, [], [], []
    for model in MODELS:
        results[model] = model_summary(metric_sets[model], HEADLINE, params, seed)
    everything = list(range(len(metric_sets["human"])))  # the human replies are the reference: values, no intervals
    results["human"] = {metric: round(metric_sets["human"].metric(metric, everything), 4) for metric in HUMAN_METRICS}
    results["human"]["within_max_new_tokens"] = round(metric_sets["human"].metric("stop_rate", everything), 4)
    results["change"] = compare(metric_sets, params, seed)
    edges = params.depth_buckets
    depth_key = lambda conversation, turn: depth_bucket(scored.depth(conversation, turn), edges)  # noqa: E731
    by_depth = (
        slice_table(scored, "depth", depth_key, edges, merge_small_depths(params.min_slice_replies), params, seed)
        if name == "test"
        else []
    )  # one curve per plot: the seen-topic test set
    topics = sorted({c["topic"] for c in scored.conversations})
    by_topic = [
        {"set": name, **row}
        for row in slice_table(
            scored,
            "topic",
            lambda conversation, turn: scored.conversations[conversation]["topic"],
            topics,
            merge_small_topics(params.min_slice_replies),
            params,
            seed,
        )
    ]
    by_id = {model: {unit.id: unit for unit in units} for model, units in whole.items()}
    per_conversation = [
        {
            "id": meta["id"],
            "topic": meta["topic"],
            "set": name,
            **{
                model: _plain(by_id[model].get(meta["id"], ConversationScores(meta["id"], meta["topic"])))
                for model in (*MODELS, "human")
            },
        }
        for meta in scored.conversations
    ]
    return results, by_depth, by_topic, per_conversation


def evaluate(params: EvaluateParams, seed: int) -> dict[str, Any]:
    base, tuned = load_scores("base"), load_scores("finetuned")
    check_same_sample(base, tuned)
    encoder = load_encoder()
    results: dict[str, Any] = {
        "precision": {name: {"base": base, "finetuned": tuned}[name]["precision"] for name in MODELS},
        "bootstrap": {
            "unit": "conversation",
            "resamples": params.bootstrap.resamples,
            "confidence": params.bootstrap.confidence,
            "seed": seed,
            "multiplicity": "Holm within each family",
            "primary": list(PRIMARY),
            "human_referenced": list(HUMAN_REFERENCED),
        },
        "setup": base.get("setup", {}),
    }
    by_depth, by_topic, per_conversation = [], [], []
    for name in SETS:
        test = {c["id"]: c for c in read_conversations(TEST_SETS[name])} if TEST_SETS[name].exists() else {}
        scored = Scored(name, base["sets"][name], tuned["sets"][name], test, encoder)
        summary, depth, topic, conversations = evaluate_set(name, scored, params, seed)
        if name == "test":
            results.update(summary)
        else:
            results[name] = summary
        by_depth += depth
        by_topic += topic
        per_conversation += conversations
    results["gate"] = quality_gate(results["change"], results["finetuned"], params)
    return {"results": results, "by_depth": by_depth, "by_topic": by_topic, "per_conversation": per_conversation}


def _plain(unit: ConversationScores) -> dict:
    data = asdict(unit)
    data.pop("id"), data.pop("topic")
    data["nll"] = round(data["nll"], 6)
    for reply in data["replies"]:
        reply["relevance"] = round(reply["relevance"], 6)
        reply["semantic"] = round(reply["semantic"], 6)
    return data


def summary_line(results: dict) -> str:
    base, tuned, change = results["base"], results["finetuned"], results["change"]
    improvement, ranking, semantic = (
        change["perplexity_improvement"],
        change["next_reply_hits_at_1"],
        change["semantic_similarity"],
    )
    gate = results["gate"]
    return (
        f"evaluate: {results['test_conversations']} conversations, {results['generated_replies']} replies; perplexity "
        f"{base['perplexity']:.2f} -> {tuned['perplexity']:.2f} ({improvement['verdict']}); next-reply hits@1 "
        f"{base['next_reply_hits_at_1']} -> {tuned['next_reply_hits_at_1']} ({ranking['verdict']}); "
        "semantic similarity "
        f"{base['semantic_similarity']} -> {tuned['semantic_similarity']} ({semantic['verdict']}); generic replies "
        f"{tuned['generic_reply_share']} (human {results['human']['generic_reply_share']}); "
        f"gate {'passed' if gate['passed'] else 'FAILED'} ({gate['compares']})"
    )


def main() -> int:
    params = load_params()
    out = evaluate(params.evaluate, params.seed)
    results = out["results"]
    # The four files are one result: published together or not at all (docs/DESIGN.md §9).
    write_json_files(
        {
            EVAL_METRICS: results,
            BY_DEPTH: out["by_depth"],
            BY_TOPIC: out["by_topic"],
            PER_CONVERSATION: out["per_conversation"],
        }
    )
    print(summary_line(results))
    if params.evaluate.gate.fail_on_gate and not results["gate"]["passed"]:
        print("error: quality gate failed (evaluate.gate.fail_on_gate is true)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run(main)
