"""Metrics on hand-computable inputs, slicing, the quality gate and transcripts."""
import math

import pytest

from stages.lib import scoring
from stages.evaluate import TurnFluency, depth_bucket, fluency_metrics, pick_samples, quality_gate, run_ids, within_budget
from tiny import train_tokenizer
from stages.lib.params import EvaluateParams, GateParams


def test_distinct_n_counts_over_all_replies_of_a_slice():
    replies = ["a b a", "a b c"]  # unigrams: a b a a b c -> 3 unique of 6; bigrams: ab ba ab bc -> 3 of 4
    assert scoring.distinct_n(replies, 1) == pytest.approx(3 / 6)
    assert scoring.distinct_n(replies, 2) == pytest.approx(3 / 4)
    # A slice is scored on its own replies, not as a mean of per-reply values (which would be (2/3 + 1) / 2).
    assert scoring.distinct_n(replies, 1) != pytest.approx((2 / 3 + 1) / 2)
    assert scoring.distinct_n([], 1) == 0.0


def test_repetition_rate_and_lengths():
    assert scoring.repetition_rate(["to be to be", "no repeats here"]) == pytest.approx(1 / 5)  # "to be" repeats once
    assert scoring.mean_words(["one two", "three", ""]) == pytest.approx(1.0)
    assert scoring.empty_rate(["x", " ", ""]) == pytest.approx(2 / 3)


def test_bleu_chrf_rouge_on_exact_and_disjoint_replies():
    assert scoring.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert scoring.chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert scoring.rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert scoring.bleu(["xyz qqq"], ["the cat sat on the mat"]) == pytest.approx(0.0)


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e") = "a c d" (3): precision 3/4, recall 3/4, F1 0.75.
    assert scoring.rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(75.0)


def test_context_relevance_is_a_cosine():
    relevance = scoring.Relevance(["red blue", "green yellow", "red blue"])
    assert relevance.mean(["red blue"], ["red blue"]) == pytest.approx(1.0)
    assert relevance.mean(["red blue"], ["green yellow"]) == pytest.approx(0.0)


def test_perplexity_is_token_weighted_and_bits_per_byte():
    turns = [TurnFluency(nll=2.0, tokens=1, correct=1, n_bytes=4), TurnFluency(nll=3.0, tokens=3, correct=0, n_bytes=12)]
    metrics = fluency_metrics(turns)
    assert metrics["perplexity"] == pytest.approx(math.exp(5.0 / 4))  # exp(sum NLL / sum tokens)
    assert metrics["perplexity"] != pytest.approx((math.exp(2.0) + math.exp(1.0)) / 2)  # not a mean of perplexities
    assert metrics["bits_per_byte"] == pytest.approx(5.0 / math.log(2) / 16)
    assert metrics["token_accuracy"] == pytest.approx(1 / 4)


def test_run_ids_split_trained_positions_by_turn():
    assert run_ids([3, 4, 5, 9, 10, 20]) == [0, 0, 0, 1, 1, 2]
    assert run_ids([]) == []


def test_depth_buckets():
    edges = [1, 3, 7, 15]
    assert [depth_bucket(t, edges) for t in (1, 2, 3, 6, 7, 14, 15, 400)] == [1, 1, 3, 3, 7, 7, 15, 15]


def test_samples_are_seeded_and_have_context():
    conversations = [{"id": str(i), "meta": {"topic": "t"}, "messages": [
        {"role": "assistant" if k % 2 else "user", "content": f"m{k}"} for k in range(10)]} for i in range(5)]
    first = pick_samples(conversations, 2, seed=1)
    assert [(s.conversation, s.turn) for s in first] == [(s.conversation, s.turn) for s in pick_samples(conversations, 2, seed=1)]
    assert len(first) == 10 and all(s.context and s.context[-1]["role"] == "user" for s in first)
    assert all(s.human == conversations[s.conversation]["messages"][s.turn]["content"] for s in first)


def test_gate_records_each_check():
    params = EvaluateParams(gate=GateParams(min_perplexity_improvement=0.3, min_stop_rate=0.9))
    passing = quality_gate({"base": {"perplexity": 20.0}, "finetuned": {"perplexity": 10.0, "stop_rate": 0.95}}, params)
    assert passing["passed"] and passing["perplexity_improvement"]["value"] == pytest.approx(0.5)
    failing = quality_gate({"base": {"perplexity": 20.0}, "finetuned": {"perplexity": 18.0, "stop_rate": 0.95}}, params)
    assert not failing["passed"] and not failing["perplexity_improvement"]["passed"] and failing["stop_rate"]["passed"]


def test_depth_buckets_must_ascend_from_one():
    with pytest.raises(ValueError, match="depth_buckets"):
        EvaluateParams(depth_buckets=[3, 1])


def test_within_budget_counts_the_end_of_turn_token():
    tokenizer = train_tokenizer("chatml")
    replies = ["blue", "blue is calm and it reminds me of the sea"]
    short = len(tokenizer("blue", add_special_tokens=False)["input_ids"]) + 1
    assert within_budget(replies, tokenizer, short) == pytest.approx(0.5)
    assert within_budget(replies, tokenizer, short - 1) == 0.0
    assert within_budget(replies, tokenizer, 1000) == 1.0
