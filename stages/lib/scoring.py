"""Offline reply metrics: no `evaluate.load` of hub scripts, only sacrebleu, rouge-score and scikit-learn.

Every function aggregates over the replies it is given (a slice), never by averaging per-slice results.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of the replies together (Li et al., 2016)."""
    grams = [g for reply in replies for g in ngrams(words(reply), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(replies: Sequence[str], n: int = 2) -> float:
    """Share of n-grams inside a reply that repeat an earlier n-gram of the same reply, over all replies."""
    repeated = total = 0
    for reply in replies:
        grams = ngrams(words(reply), n)
        counts = Counter(grams)
        repeated += sum(c - 1 for c in counts.values())
        total += len(grams)
    return repeated / total if total else 0.0


def mean_words(replies: Sequence[str]) -> float:
    return sum(len(words(r)) for r in replies) / len(replies) if replies else 0.0


def empty_rate(replies: Sequence[str]) -> float:
    return sum(not r.strip() for r in replies) / len(replies) if replies else 0.0


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score) if hypotheses else 0.0


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score) if hypotheses else 0.0


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over pairs, in percent."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


class Relevance:
    """TF-IDF cosine between a context and a reply, with one vocabulary fitted on all texts of the run."""

    def __init__(self, texts: Sequence[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(lowercase=True).fit([t for t in texts if t.strip()] or ["empty"])

    def mean(self, contexts: Sequence[str], replies: Sequence[str]) -> float:
        from sklearn.metrics.pairwise import paired_cosine_distances

        if not replies:
            return 0.0
        distances = paired_cosine_distances(self.vectorizer.transform(contexts), self.vectorizer.transform(replies))
        return float(sum(1.0 - d for d in distances) / len(replies))


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(total NLL / total tokens): token-weighted, never a mean of per-example perplexities."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Total NLL in bits over the UTF-8 bytes of the scored text: comparable across tokenizers."""
    return nll_sum / math.log(2) / n_bytes if n_bytes else float("nan")
