"""Offline per-reply text statistics: no `evaluate.load` of hub scripts, only rouge-score and scikit-learn.

stages/lib/stats.py turns them (and sacreBLEU's sufficient statistics) into corpus metrics of any sample of
conversations, never by averaging per-slice results.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_bigrams(reply: str) -> tuple[int, int]:
    """(bigrams that repeat an earlier bigram of the same reply, all bigrams of the reply)."""
    grams = ngrams(words(reply), 2)
    return sum(c - 1 for c in Counter(grams).values()), len(grams)


def opening(reply: str, length: int = 3) -> str:
    """The first `length` words, lowercased, without punctuation: "I'm not sure." and "i'm not sure" agree."""
    cleaned = [word.strip('.,!?;:"()') for word in words(reply)]
    return " ".join([word for word in cleaned if word][:length])


def matched_prefixes(reply: str, human: str) -> tuple[list[str], list[str]]:
    """Both texts' words cut to the shorter one's length: distinct-n depends on how many words it counts, so
    a model is compared with the human replies at the same length (docs/DESIGN.md §5.1)."""
    a, b = words(reply), words(human)
    m = min(len(a), len(b))
    return a[:m], b[:m]


def rouge_l_pair(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 of one reply against its human reference (0..1)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, hypothesis)["rougeL"].fmeasure


class Relevance:
    """TF-IDF cosine between a context and a reply, with one vocabulary fitted on all texts of the run."""

    def __init__(self, texts: Sequence[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(lowercase=True).fit([t for t in texts if t.strip()] or ["empty"])

    def each(self, contexts: Sequence[str], replies: Sequence[str]) -> list[float]:
        from sklearn.metrics.pairwise import paired_cosine_distances

        if not replies:
            return []
        return [
            float(1.0 - d)
            for d in paired_cosine_distances(self.vectorizer.transform(contexts), self.vectorizer.transform(replies))
        ]
