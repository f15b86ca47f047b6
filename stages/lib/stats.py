"""Metrics as functions of a sample of conversations, and their bootstrap intervals.

The test conversations are the unit that was sampled, so every headline metric is computed from
per-conversation sufficient statistics (summed NLL and tokens, sacreBLEU and chrF n-gram counts, reply
counts, ...) and resampled by conversation. A metric of a resample is the same function as the metric of
the whole set: perplexity is exp(Σ NLL / Σ tokens) over the resampled conversations, BLEU is computed from
their summed n-gram statistics, distinct-n from the union of their n-grams. Intervals come from
`scipy.stats.bootstrap` (BCa, seeded); a paired interval resamples the same conversations for both sides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from stages.lib import scoring

LOWER_IS_BETTER = {"perplexity", "bits_per_byte", "repetition_rate", "empty_reply_rate"}
NO_DIRECTION = {"mean_reply_words"}  # closer to the human mean is better, which a sign cannot say
FLUENCY = ("perplexity", "bits_per_byte", "token_accuracy")
REPLY = ("bleu", "chrf", "rouge_l", "stop_rate", "distinct_1", "distinct_2", "repetition_rate", "mean_reply_words",
         "empty_reply_rate", "context_relevance")
HEADLINE = FLUENCY + REPLY
SET_BASED = {"distinct_1", "distinct_2"}  # not sums over conversations: resampling with repeats biases them


@dataclass
class Reply:
    turn: int
    text: str
    human: str
    stopped: bool
    relevance: float  # TF-IDF cosine between the reply and its context


@dataclass
class ConversationScores:
    """One model on one test conversation."""

    id: str
    topic: str
    nll: float = 0.0    # summed over the trained tokens of every assistant turn (reply content + end of turn)
    tokens: int = 0
    correct: int = 0    # argmax predictions equal to the target
    n_bytes: int = 0    # UTF-8 bytes of the assistant replies' own text
    replies: list[Reply] = field(default_factory=list)

    @classmethod
    def from_dict(cls, cid: str, topic: str, data: dict) -> "ConversationScores":
        """From one model's entry of metrics/eval_conversations.json."""
        return cls(cid, topic, data["nll"], data["tokens"], data["correct"], data["n_bytes"], [Reply(**r) for r in data["replies"]])


class MetricSet:
    """Per-conversation statistics of one model, as arrays indexed by conversation."""

    def __init__(self, conversations: Sequence[ConversationScores]) -> None:
        from sacrebleu.metrics import BLEU, CHRF

        self.ids = [c.id for c in conversations]
        self._bleu, self._chrf = BLEU(), CHRF()
        column = lambda values: np.asarray(values, dtype=np.float64)  # noqa: E731
        self.nll = column([c.nll for c in conversations])
        self.tokens = column([c.tokens for c in conversations])
        self.correct = column([c.correct for c in conversations])
        self.n_bytes = column([c.n_bytes for c in conversations])
        self.replies = column([len(c.replies) for c in conversations])
        self.stopped = column([sum(r.stopped for r in c.replies) for c in conversations])
        self.words = column([sum(len(scoring.words(r.text)) for r in c.replies) for c in conversations])
        self.empty = column([sum(not r.text.strip() for r in c.replies) for c in conversations])
        self.relevance = column([sum(r.relevance for r in c.replies) for c in conversations])
        self.rouge = column([sum(scoring.rouge_l_pair(r.text, r.human) for r in c.replies) for c in conversations])
        self.bleu_stats = self._sentence_stats(self._bleu, conversations, 10)
        self.chrf_stats = self._sentence_stats(self._chrf, conversations, 18)
        repeats = [[scoring.repeated_bigrams(r.text) for r in c.replies] for c in conversations]
        self.repeated = column([sum(r for r, _ in conv) for conv in repeats])
        self.bigrams = column([sum(t for _, t in conv) for conv in repeats])
        self.grams = {n: [self._ngram_set(c, n) for c in conversations] for n in (1, 2)}
        self.gram_totals = {n: column([sum(len(scoring.ngrams(scoring.words(r.text), n)) for r in c.replies) for c in conversations])
                            for n in (1, 2)}

    @staticmethod
    def _sentence_stats(metric, conversations: Sequence[ConversationScores], width: int) -> np.ndarray:
        hypotheses = [r.text for c in conversations for r in c.replies]
        references = [r.human for c in conversations for r in c.replies]
        per_reply = np.asarray(metric._extract_corpus_statistics(hypotheses, [references]), dtype=np.float64) if hypotheses else np.zeros((0, width))
        out = np.zeros((len(conversations), per_reply.shape[1] if per_reply.size else width))
        row = 0
        for index, conversation in enumerate(conversations):
            count = len(conversation.replies)
            out[index] = per_reply[row : row + count].sum(0)
            row += count
        return out

    @staticmethod
    def _ngram_set(conversation: ConversationScores, n: int) -> set:
        return {g for r in conversation.replies for g in scoring.ngrams(scoring.words(r.text), n)}

    def __len__(self) -> int:
        return len(self.ids)

    def metric(self, name: str, idx: np.ndarray) -> float:
        """`name` over the conversations `idx` (indices may repeat: a bootstrap resample)."""
        s = lambda array: float(array[idx].sum())  # noqa: E731
        ratio = lambda a, b: s(a) / s(b) if s(b) else float("nan")  # noqa: E731
        if name == "perplexity":
            return math.exp(ratio(self.nll, self.tokens)) if s(self.tokens) else float("nan")
        if name == "bits_per_byte":
            return ratio(self.nll, self.n_bytes) / math.log(2)
        if name == "token_accuracy":
            return ratio(self.correct, self.tokens)
        if name == "bleu":
            return float(self._bleu._compute_score_from_stats(list(self.bleu_stats[idx].sum(0))).score) if s(self.replies) else 0.0
        if name == "chrf":
            return float(self._chrf._compute_score_from_stats(list(self.chrf_stats[idx].sum(0))).score) if s(self.replies) else 0.0
        if name == "rouge_l":
            return 100.0 * ratio(self.rouge, self.replies)
        if name == "stop_rate":
            return ratio(self.stopped, self.replies)
        if name in ("distinct_1", "distinct_2"):
            n = int(name[-1])
            total = s(self.gram_totals[n])
            return len(set().union(*(self.grams[n][i] for i in idx))) / total if total else 0.0
        if name == "repetition_rate":
            return ratio(self.repeated, self.bigrams) if s(self.bigrams) else 0.0
        if name == "mean_reply_words":
            return ratio(self.words, self.replies)
        if name == "empty_reply_rate":
            return ratio(self.empty, self.replies)
        if name == "context_relevance":
            return ratio(self.relevance, self.replies)
        raise KeyError(name)


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {"value": round(self.value, digits), "low": round(self.low, digits), "high": round(self.high, digits)}


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, resamples: int, confidence: float, seed: int,
              recenter: bool = False) -> Interval:
    """Seeded BCa bootstrap over `n` conversations of `statistic(indices)`.

    `recenter` (set-based metrics such as distinct-n): a resample repeats conversations, and a repeated reply
    adds n-grams but no new unique ones, so every resample is biased low; the percentile spread is then
    re-centred on the estimate. The same is done whenever BCa is undefined or misses its own estimate.
    """
    import warnings

    from scipy.stats import bootstrap as scipy_bootstrap

    everything = np.arange(n)
    value = statistic(everything)
    if n < 2:
        return Interval(value, float("nan"), float("nan"))

    def run(method: str) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return scipy_bootstrap((everything,), lambda sample: statistic(sample.astype(np.int64)), vectorized=False,
                                   n_resamples=resamples, confidence_level=confidence, method=method,
                                   random_state=np.random.default_rng(seed))

    if not recenter:
        result = run("BCa")
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high) and low <= value <= high:
            return Interval(value, low, high)
    distribution = run("percentile").bootstrap_distribution
    finite = distribution[np.isfinite(distribution)]
    if finite.size == 0:
        return Interval(value, value, value)
    shift = value - float(finite.mean())
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return Interval(value, min(value, float(low) + shift), max(value, float(high) + shift))


def verdict(name: str, change: Interval) -> str:
    """'better', 'worse' or 'within noise' from a paired interval of (new - old); 'higher'/'lower' for metrics
    without a direction."""
    if not (math.isfinite(change.low) and math.isfinite(change.high)) or change.low <= 0.0 <= change.high:
        return "within noise"
    up = change.low > 0.0
    if name in NO_DIRECTION:
        return "higher" if up else "lower"
    return "better" if up != (name in LOWER_IS_BETTER) else "worse"


def paired_change(name: str, new: MetricSet, old: MetricSet, resamples: int, confidence: float, seed: int) -> Interval:
    """Interval of new − old on the same conversations (relative improvement 1 − new/old for perplexity)."""
    if new.ids != old.ids:
        raise ValueError("a paired comparison needs the same conversations in the same order")
    if name == "perplexity":
        statistic = lambda idx: 1.0 - new.metric(name, idx) / old.metric(name, idx)  # noqa: E731
    else:
        statistic = lambda idx: new.metric(name, idx) - old.metric(name, idx)  # noqa: E731
    return bootstrap(statistic, len(new), resamples, confidence, seed, recenter=name in SET_BASED)


def change_verdict(name: str, change: Interval) -> str:
    """The verdict of a paired change; perplexity's change is an improvement (positive is better)."""
    if name == "perplexity":
        return verdict("token_accuracy", change)  # same orientation: higher is better
    return verdict(name, change)
