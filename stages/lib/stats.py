"""Metrics as functions of a sample of conversations, their bootstrap intervals, and verdicts.

The test conversations are the unit that was sampled, so every metric is computed from per-conversation
sufficient statistics (summed NLL and tokens, sacreBLEU and chrF n-gram counts, reply counts, ranking hits,
...) and resampled by conversation. A metric of a resample is the same function as the metric of the whole
set: perplexity is exp(Σ NLL / Σ tokens) over the resampled conversations, BLEU comes from their summed
n-gram statistics, distinct-n from the union of their n-grams. Intervals come from `scipy.stats.bootstrap`
(BCa, seeded); a paired interval resamples the same conversations for both sides.

Metrics come in three families (docs/DESIGN.md §5.1):
- PRIMARY: what "converses better" means here (fluency, next-reply ranking, meaning, stopping). Each gets a
  verdict, better / worse, at a family-wise error rate of 1 - confidence (Holm over the family).
- HUMAN_REFERENCED: style, where the human replies set the target. The verdict is about the distance to the
  human value on the same conversations: closer to human / further from human (Holm over this family).
- DESCRIPTIVE: string overlap and the rest, shown with intervals, never with a verdict.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from stages.lib import text_metrics

PRIMARY = ("perplexity", "next_reply_hits_at_1", "semantic_similarity", "stop_rate")
HUMAN_REFERENCED = (
    "mean_reply_words",
    "distinct_1_vs_human",
    "distinct_2_vs_human",
    "generic_reply_share",
    "context_overlap",
    "repetition_rate",
)
DESCRIPTIVE = (
    "bits_per_byte",
    "token_accuracy",
    "chrf",
    "bleu",
    "rouge_l",
    "distinct_1",
    "distinct_2",
    "empty_reply_rate",
)
HEADLINE = PRIMARY + HUMAN_REFERENCED + DESCRIPTIVE
LOWER_IS_BETTER = {"perplexity", "bits_per_byte", "repetition_rate", "empty_reply_rate", "generic_reply_share"}
RATIO_TO_HUMAN = {"distinct_1_vs_human", "distinct_2_vs_human"}  # already model / human: the target is 1
SET_BASED = {"distinct_1", "distinct_2", "distinct_1_vs_human", "distinct_2_vs_human", "generic_reply_share"}
PROPORTIONS = {"stop_rate", "empty_reply_rate", "next_reply_hits_at_1", "generic_reply_share"}
GENERIC_SHARE, GENERIC_MIN_REPLIES = 0.02, 3  # an opening used by 2% of the replies (and 3 or more) is a formula
# The smallest change a verdict reports, in the units of the paired change (perplexity's is relative; a
# human-referenced one is the change of the distance to the human value). A significant change below it is
# 'negligible': kernels and seeds move a trained model by that much (docs/DESIGN.md §5.2).
MIN_CHANGE = {
    "perplexity": 0.01,
    "next_reply_hits_at_1": 0.02,
    "semantic_similarity": 0.01,
    "stop_rate": 0.01,
    "mean_reply_words": 1.0,
    "distinct_1_vs_human": 0.02,
    "distinct_2_vs_human": 0.02,
    "generic_reply_share": 0.01,
    "context_overlap": 0.01,
    "repetition_rate": 0.01,
}


@dataclass
class Reply:
    turn: int
    text: str
    human: str
    stopped: bool  # ended with the end-of-turn token within max_new_tokens
    relevance: float  # TF-IDF cosine between the reply and its context
    semantic: float = math.nan  # cosine of sentence embeddings with the human reply (nan: not scored, an older file)
    context: str = ""  # digest of the context the reply answers: pairing by turn checks it

    @property
    def stop(self) -> bool:
        """An empty reply that ends at once says nothing: it is not a stop."""
        return self.stopped and bool(self.text.strip())


@dataclass
class ConversationScores:
    """One model on one test conversation."""

    id: str
    topic: str
    nll: float = 0.0  # summed over the trained tokens of every assistant turn (reply content + end of turn)
    tokens: int = 0
    correct: int = 0  # argmax predictions equal to the target
    n_bytes: int = 0  # UTF-8 bytes of the assistant replies' own text
    replies: list[Reply] = field(default_factory=list)
    ranked: list[list] = field(default_factory=list)  # [turn, hit] per ranked turn: hit 1 when the real reply won

    @classmethod
    def from_dict(cls, cid: str, topic: str, data: dict) -> "ConversationScores":
        """From one model's entry of metrics/eval_conversations.json."""
        return cls(
            cid,
            topic,
            data["nll"],
            data["tokens"],
            data["correct"],
            data["n_bytes"],
            [Reply(**r) for r in data["replies"]],
            [list(r) for r in data.get("ranked", [])],
        )


def column(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


class MetricSet:
    """Per-conversation statistics of one model, as arrays indexed by conversation."""

    def __init__(self, conversations: Sequence[ConversationScores]) -> None:
        from sacrebleu.metrics import BLEU, CHRF

        self.ids = [c.id for c in conversations]
        # chrF with beta = 1 weighs precision as much as recall; the default beta = 2 rewards long replies.
        self._bleu, self._chrf = BLEU(), CHRF(beta=1)
        self.nll = column([c.nll for c in conversations])
        self.tokens = column([c.tokens for c in conversations])
        self.correct = column([c.correct for c in conversations])
        self.n_bytes = column([c.n_bytes for c in conversations])
        self.replies = column([len(c.replies) for c in conversations])
        self.stopped = column([sum(r.stop for r in c.replies) for c in conversations])
        self.words = column([sum(len(text_metrics.words(r.text)) for r in c.replies) for c in conversations])
        self.empty = column([sum(not r.text.strip() for r in c.replies) for c in conversations])
        self.relevance = column([sum(r.relevance for r in c.replies) for c in conversations])
        self.semantic = column([sum(r.semantic for r in c.replies) for c in conversations])
        self.hits = column([sum(hit for _, hit in c.ranked) for c in conversations])
        self.ranked = column([len(c.ranked) for c in conversations])
        self.rouge = column([sum(text_metrics.rouge_l_pair(r.text, r.human) for r in c.replies) for c in conversations])
        self.bleu_stats = self._sentence_stats(self._bleu, conversations, 10)
        self.chrf_stats = self._sentence_stats(self._chrf, conversations, 18)
        repeats = [[text_metrics.repeated_bigrams(r.text) for r in c.replies] for c in conversations]
        self.repeated = column([sum(r for r, _ in conv) for conv in repeats])
        self.bigrams = column([sum(t for _, t in conv) for conv in repeats])
        self.openings = [Counter(text_metrics.opening(r.text) for r in c.replies) for c in conversations]
        self.grams: dict[Any, list[set]] = {}
        self.gram_totals: dict[Any, np.ndarray] = {}
        for n in (1, 2):
            self._add_grams(n, [[text_metrics.words(r.text) for r in c.replies] for c in conversations])
            matched = [[text_metrics.matched_prefixes(r.text, r.human) for r in c.replies] for c in conversations]
            self._add_grams((n, "model"), [[model for model, _ in conv] for conv in matched])
            self._add_grams((n, "human"), [[human for _, human in conv] for conv in matched])

    def _add_grams(self, key: Any, texts: list[list[list[str]]]) -> None:
        n = key if isinstance(key, int) else key[0]
        self.grams[key] = [{g for words in conv for g in text_metrics.ngrams(words, n)} for conv in texts]
        self.gram_totals[key] = column([sum(len(text_metrics.ngrams(words, n)) for words in conv) for conv in texts])

    @staticmethod
    def _sentence_stats(metric: Any, conversations: Sequence[ConversationScores], width: int) -> np.ndarray:
        hypotheses = [r.text for c in conversations for r in c.replies]
        references = [r.human for c in conversations for r in c.replies]
        per_reply = (
            np.asarray(metric._extract_corpus_statistics(hypotheses, [references]), dtype=np.float64)
            if hypotheses
            else np.zeros((0, width))
        )
        out = np.zeros((len(conversations), per_reply.shape[1] if per_reply.size else width))
        row = 0
        for index, conversation in enumerate(conversations):
            count = len(conversation.replies)
            out[index] = per_reply[row : row + count].sum(0)
            row += count
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def _distinct(self, key: Any, idx: np.ndarray) -> float:
        total = float(self.gram_totals[key][idx].sum())
        return len(set().union(*(self.grams[key][i] for i in idx))) / total if total else float("nan")

    def _generic_share(self, idx: np.ndarray) -> float:
        counts: Counter = Counter()
        for i in idx:
            counts.update(self.openings[i])
        total = sum(counts.values())
        if not total:
            return float("nan")
        floor = max(GENERIC_MIN_REPLIES, GENERIC_SHARE * total)
        return sum(n for opening, n in counts.items() if opening and n >= floor) / total

    def metric(self, name: str, idx: np.ndarray) -> float:
        """`name` over the conversations `idx` (indices may repeat: a bootstrap resample). NaN when the sample
        holds nothing the metric counts (no tokens, no replies, no ranked turn)."""
        s = lambda array: float(array[idx].sum())  # noqa: E731
        ratio = lambda a, b: s(a) / s(b) if s(b) else float("nan")  # noqa: E731
        if name == "perplexity":
            return math.exp(ratio(self.nll, self.tokens)) if s(self.tokens) else float("nan")
        if name == "bits_per_byte":
            return ratio(self.nll, self.n_bytes) / math.log(2)
        if name == "token_accuracy":
            return ratio(self.correct, self.tokens)
        if name == "next_reply_hits_at_1":
            return ratio(self.hits, self.ranked)
        if name == "semantic_similarity":
            return ratio(self.semantic, self.replies)
        if name in ("bleu", "chrf"):
            scorer, stats = (self._bleu, self.bleu_stats) if name == "bleu" else (self._chrf, self.chrf_stats)
            return (
                float(scorer._compute_score_from_stats(list(stats[idx].sum(0))).score)
                if s(self.replies)
                else float("nan")
            )
        if name == "rouge_l":
            return 100.0 * ratio(self.rouge, self.replies)
        if name == "stop_rate":
            return ratio(self.stopped, self.replies)
        if name in ("distinct_1", "distinct_2"):
            return self._distinct(int(name[-1]), idx)
        if name in RATIO_TO_HUMAN:
            n = int(name[9])
            return self._distinct((n, "model"), idx) / self._distinct((n, "human"), idx)
        if name == "generic_reply_share":
            return self._generic_share(idx)
        if name == "repetition_rate":
            return ratio(self.repeated, self.bigrams) if s(self.bigrams) else 0.0
        if name == "mean_reply_words":
            return ratio(self.words, self.replies)
        if name == "empty_reply_rate":
            return ratio(self.empty, self.replies)
        if name == "context_overlap":
            return ratio(self.relevance, self.replies)
        raise KeyError(name)

    def clusters(self, name: str) -> int:
        """Conversations that count for `name`: the effective sample size of a proportion at 0 or 1."""
        counted = self.ranked if name == "next_reply_hits_at_1" else self.replies
        return int((counted > 0).sum())


@dataclass
class Interval:
    value: float
    low: float
    high: float
    p: float = float("nan")  # two-sided bootstrap p-value of "the value is 0" (changes only)

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {"value": round(self.value, digits), "low": round(self.low, digits), "high": round(self.high, digits)}


def p_value(distribution: np.ndarray, shift: float) -> float:
    """Two-sided: twice the smaller share of (re-centred) resamples on either side of zero, +1 smoothed."""
    finite = distribution[np.isfinite(distribution)] + shift
    if finite.size == 0:
        return float("nan")
    below, above = float((finite <= 0).sum()), float((finite >= 0).sum())
    return min(1.0, 2.0 * (min(below, above) + 1.0) / (finite.size + 1.0))


def bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int,
    confidence: float,
    seed: int,
    recenter: bool = False,
) -> Interval:
    """Seeded BCa bootstrap over `n` conversations of `statistic(indices)`, with its p-value against 0.

    `recenter` (set-based metrics such as distinct-n): a resample repeats conversations, and a repeated reply
    adds n-grams but no new unique ones, so every resample is biased; the percentile spread is then
    re-centred on the estimate. The same is done whenever BCa is undefined or misses its own estimate.
    """
    import warnings

    from scipy.stats import bootstrap as scipy_bootstrap

    everything = np.arange(n)
    value = statistic(everything)
    if n < 2 or not math.isfinite(value):
        return Interval(value, float("nan"), float("nan"))

    def run(method: str) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return scipy_bootstrap(
                (everything,),
                lambda sample: statistic(sample.astype(np.int64)),
                vectorized=False,
                n_resamples=resamples,
                confidence_level=confidence,
                method=method,
                random_state=np.random.default_rng(seed),
            )

    if not recenter:
        result = run("BCa")
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high) and low <= value <= high:
            return Interval(value, low, high, p_value(result.bootstrap_distribution, 0.0))
    distribution = run("percentile").bootstrap_distribution
    finite = distribution[np.isfinite(distribution)]
    if finite.size == 0:
        return Interval(value, value, value, float("nan"))
    shift = value - float(finite.mean()) if recenter else 0.0
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return Interval(value, min(value, float(low) + shift), max(value, float(high) + shift), p_value(finite, shift))


def wilson(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion: valid at 0 and 1, where a bootstrap collapses to a point."""
    from scipy.stats import norm

    if n <= 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def metric_interval(metrics: MetricSet, name: str, resamples: int, confidence: float, seed: int) -> Interval:
    """A metric of one model with its interval. A proportion at 0 or 1 (or whose resamples all agree) gets the
    Wilson interval with one observation per conversation: replies of a conversation are not independent, so
    that is the conservative effective sample size."""
    interval = bootstrap(
        lambda idx: metrics.metric(name, idx), len(metrics), resamples, confidence, seed, recenter=name in SET_BASED
    )
    if (
        name in PROPORTIONS
        and math.isfinite(interval.value)
        and (interval.value in (0.0, 1.0) or interval.low == interval.high)
    ):
        clusters = metrics.clusters(name)
        low, high = wilson(interval.value * clusters, clusters, confidence)
        return Interval(interval.value, min(low, interval.value), max(high, interval.value))
    if name in PROPORTIONS and math.isfinite(interval.low):  # a re-centred spread can pass 0 or 1; a share cannot
        return Interval(interval.value, max(0.0, interval.low), min(1.0, interval.high), interval.p)
    return interval


def distance_to_human(name: str, model: MetricSet, human: MetricSet | None, idx: np.ndarray) -> float:
    """How far a human-referenced metric is from the human replies' value on the same conversations."""
    if name in RATIO_TO_HUMAN:
        return abs(model.metric(name, idx) - 1.0)
    assert human is not None
    return abs(model.metric(name, idx) - human.metric(name, idx))


def paired_change(
    name: str,
    new: MetricSet,
    old: MetricSet,
    resamples: int,
    confidence: float,
    seed: int,
    human: MetricSet | None = None,
) -> Interval:
    """Interval of new − old on the same conversations: the relative improvement 1 − new/old for perplexity,
    the change of the distance to the human value for a human-referenced metric (negative: closer)."""
    if new.ids != old.ids or (human is not None and human.ids != new.ids):
        raise ValueError("a paired comparison needs the same conversations in the same order")
    if name == "perplexity":
        statistic = lambda idx: 1.0 - new.metric(name, idx) / old.metric(name, idx)  # noqa: E731
    elif name in HUMAN_REFERENCED:
        statistic = lambda idx: distance_to_human(name, new, human, idx) - distance_to_human(name, old, human, idx)  # noqa: E731
    else:
        statistic = lambda idx: new.metric(name, idx) - old.metric(name, idx)  # noqa: E731
    return bootstrap(statistic, len(new), resamples, confidence, seed, recenter=name in SET_BASED)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment: controls the chance of any false verdict in the family at alpha."""
    finite = sorted((p, name) for name, p in p_values.items() if math.isfinite(p))
    adjusted: dict[str, float] = {name: float("nan") for name, p in p_values.items() if not math.isfinite(p)}
    running = 0.0
    for rank, (p, name) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[name] = running
    return adjusted


def verdict(name: str, change: Interval, adjusted_p: float, alpha: float, identical: bool = False) -> str:
    """The word for a change: 'unchanged' (identical values), 'better'/'worse' (primary), 'closer to human'/
    'further from human' (human-referenced), 'no significant change' (the family-adjusted p-value is not
    below alpha: absence of evidence, not evidence of none), 'negligible' (significant, but smaller than
    MIN_CHANGE), '' for descriptive metrics."""
    if identical:
        return "unchanged"
    if not math.isfinite(change.value):
        return "n/a (not a number)"
    if name in DESCRIPTIVE:
        return ""
    # Both tests must agree: the adjusted p-value (from the percentile bootstrap) and the interval shown beside
    # it (BCa, whose ends can move past 0 where the percentiles do not). A change whose interval holds 0 is no win.
    holds_zero = not (change.low > 0.0 or change.high < 0.0)
    if not math.isfinite(adjusted_p) or adjusted_p >= alpha or holds_zero:
        return "no significant change"
    if abs(change.value) < MIN_CHANGE.get(name, 0.0):
        return "negligible"
    up = change.value > 0.0
    if name in HUMAN_REFERENCED:
        return "further from human" if up else "closer to human"
    if name == "perplexity":  # its change is an improvement: positive is better
        return "better" if up else "worse"
    return "better" if up != (name in LOWER_IS_BETTER) else "worse"


def family_verdicts(
    changes: dict[str, Interval], alpha: float, identical: dict[str, bool]
) -> dict[str, tuple[float, str]]:
    """(Holm-adjusted p-value, verdict) of each metric, Holm applied within PRIMARY and HUMAN_REFERENCED."""
    out: dict[str, tuple[float, str]] = {}
    for family in (PRIMARY, HUMAN_REFERENCED):
        members = {name: changes[name].p for name in family if name in changes}
        for name, p in holm(members).items():
            out[name] = (p, verdict(name, changes[name], p, alpha, identical.get(name, False)))
    for name in changes:
        if name not in out:
            out[name] = (float("nan"), verdict(name, changes[name], float("nan"), alpha, identical.get(name, False)))
    return out
