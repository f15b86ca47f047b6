"""Metrics on hand-computable inputs, intervals and verdicts, unbiased decoding and scoring, slicing and the gate."""

import math

import numpy as np
import pytest
import torch

from conftest import REPO
from stages.evaluate import depth_bucket, merge_small_depths, merge_small_topics, quality_gate
from stages.lib import text_metrics
from stages.lib.decoding import ReplyRepetitionPenalty
from stages.lib.params import load_params
from stages.lib.stats import (
    HUMAN_REFERENCED,
    PRIMARY,
    ConversationScores,
    Interval,
    MetricSet,
    Reply,
    bootstrap,
    paired_change,
    verdict,
)
from stages.score import fluency, sample_conversations


def conversation(
    cid: str, replies: list[tuple[str, str]], nll=0.0, tokens=0, stopped=True, topic="t"
) -> ConversationScores:
    return ConversationScores(
        cid,
        topic,
        nll=nll,
        tokens=tokens,
        correct=0,
        n_bytes=0,
        replies=[Reply(1, text, human, stopped, 0.0) for text, human in replies],
    )


def test_distinct_n_counts_over_all_replies_of_the_sample():
    metrics = MetricSet([conversation("a", [("a b a", "x")]), conversation("b", [("a b c", "x")])])
    everything = np.arange(2)
    # unigrams a b a a b c -> 3 unique of 6; bigrams ab ba ab bc -> 3 unique of 4; not a mean of per-reply values
    assert metrics.metric("distinct_1", everything) == pytest.approx(3 / 6)
    assert metrics.metric("distinct_2", everything) == pytest.approx(3 / 4)
    assert metrics.metric("distinct_1", np.array([0, 0])) == pytest.approx(2 / 6)  # a resample repeats a conversation


def test_reply_statistics_by_hand():
    metrics = MetricSet(
        [conversation("a", [("to be to be", "x"), ("", "x")], stopped=False), conversation("b", [("one two", "x")])]
    )
    everything = np.arange(2)
    assert metrics.metric("repetition_rate", everything) == pytest.approx(1 / 4)  # "to be" repeats once of 3+1 bigrams
    assert metrics.metric("mean_reply_words", everything) == pytest.approx(6 / 3)
    assert metrics.metric("empty_reply_rate", everything) == pytest.approx(1 / 3)
    assert metrics.metric("stop_rate", everything) == pytest.approx(1 / 3)


def test_bleu_and_chrf_with_beta_1_equal_sacrebleu_corpus_scores_for_any_sample():
    import sacrebleu

    pairs = [
        ("the cat sat on the mat", "the cat sat on a mat"),
        ("hello there friend", "hello my friend"),
        ("i like tea", "i like green tea a lot"),
    ]
    metrics = MetricSet([conversation(str(i), [pair]) for i, pair in enumerate(pairs)])
    for idx in (np.arange(3), np.array([0, 2, 2])):
        hyps, refs = [pairs[i][0] for i in idx], [pairs[i][1] for i in idx]
        assert metrics.metric("bleu", idx) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
        # beta = 1: precision counts as much as recall (the default beta = 2 rewards long replies)
        assert metrics.metric("chrf", idx) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs], beta=1).score)


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e") = "a c d" (3): precision 3/4, recall 3/4, F1 0.75.
    assert text_metrics.rouge_l_pair("a b c d", "a c d e") == pytest.approx(0.75)


def test_context_overlap_is_a_tfidf_cosine():
    relevance = text_metrics.Relevance(["red blue", "green yellow", "red blue"])
    assert relevance.each(["red blue", "red blue"], ["red blue", "green yellow"]) == pytest.approx([1.0, 0.0])


def test_perplexity_is_token_weighted_and_bits_per_byte_uses_reply_bytes():
    first = ConversationScores("a", "t", nll=2.0, tokens=1, correct=1, n_bytes=4)
    second = ConversationScores("b", "t", nll=3.0, tokens=3, correct=0, n_bytes=12)
    metrics = MetricSet([first, second])
    everything = np.arange(2)
    assert metrics.metric("perplexity", everything) == pytest.approx(math.exp(5.0 / 4))  # exp(sum NLL / sum tokens)
    assert metrics.metric("perplexity", everything) != pytest.approx((math.exp(2.0) + math.exp(1.0)) / 2)
    assert metrics.metric("bits_per_byte", everything) == pytest.approx(5.0 / math.log(2) / 16)
    assert metrics.metric("token_accuracy", everything) == pytest.approx(1 / 4)


def test_fluency_counts_the_reply_texts_own_bytes(chatml_model):
    """bits per byte must not count the decoded end-of-turn token: 'cool' is 4 bytes, not 'cool<|im_end|>'."""
    tokenizer, model = chatml_model
    chats = [
        {
            "id": "1",
            "meta": {},
            "messages": [
                {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "cool"},
                {"role": "user", "content": "why?"},
                {"role": "assistant", "content": "café ok"},
            ],
        }
    ]
    records = fluency(model, tokenizer, chats, max_length=128, batch_size=4)
    assert [(r["turn"], r["bytes"]) for r in records] == [(1, 4), (3, 8)]  # 'é' is two bytes in UTF-8
    assert all(r["tokens"] >= 2 for r in records)  # the reply's tokens and its end-of-turn token


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, 200)
    first = bootstrap(lambda idx: float(values[idx].mean()), 200, 500, 0.95, seed=3)
    again = bootstrap(lambda idx: float(values[idx].mean()), 200, 500, 0.95, seed=3)
    assert (first.low, first.high) == (again.low, again.high)
    assert first.low < first.value < first.high
    standard_error = values.std(ddof=1) / math.sqrt(200)
    assert first.high - first.low == pytest.approx(2 * 1.96 * standard_error, rel=0.2)
    constant = bootstrap(lambda idx: 0.0, 50, 200, 0.95, seed=1)
    assert (constant.low, constant.high) == (0.0, 0.0)


def test_paired_change_tells_a_real_change_from_noise():
    """Fine-tuned replies stop far more often (real); their length differs by chance only (noise)."""
    rng = np.random.default_rng(1)
    base, tuned, people = [], [], []
    for i in range(120):
        words = " ".join(["w"] * int(rng.integers(3, 9)))
        base.append(conversation(str(i), [(words, "h")], stopped=bool(rng.random() < 0.5)))
        other = " ".join(["w"] * int(rng.integers(3, 9)))
        tuned.append(conversation(str(i), [(other, "h")], stopped=bool(rng.random() < 0.95)))
        people.append(conversation(str(i), [(" ".join(["w"] * int(rng.integers(4, 12))), "h")]))
    new, old, human = MetricSet(tuned), MetricSet(base), MetricSet(people)
    stop = paired_change("stop_rate", new, old, 1000, 0.95, seed=42)
    assert stop.low > 0 and stop.p < 0.01 and verdict("stop_rate", stop, stop.p, 0.05) == "better"
    length = paired_change("mean_reply_words", new, old, 1000, 0.95, seed=42, human=human)
    assert length.p > 0.05 and verdict("mean_reply_words", length, length.p, 0.05) == "no significant change"
    assert verdict("perplexity", Interval(-0.3, -0.5, -0.1), 0.001, 0.05) == "worse"  # a negative improvement
    assert verdict("semantic_similarity", Interval(-3.0, -5.0, -1.0), 0.001, 0.05) == "worse"
    assert verdict("bleu", Interval(-3.0, -5.0, -1.0), 0.001, 0.05) == ""  # descriptive: no verdict
    assert verdict("stop_rate", Interval(0.0, 0.0, 0.0), 1.0, 0.05, identical=True) == "unchanged"


def test_distinct_n_interval_contains_its_estimate_despite_resampling_repeats():
    """A resample repeats conversations and so lowers distinct-n on every resample: the interval is re-centred."""
    rng = np.random.default_rng(3)
    vocabulary = [f"w{i}" for i in range(60)]
    conversations = [conversation(str(i), [(" ".join(rng.choice(vocabulary, 8)), "h")]) for i in range(80)]
    metrics = MetricSet(conversations)
    for name in ("distinct_1", "distinct_2"):
        interval = bootstrap(lambda idx, n=name: metrics.metric(n, idx), 80, 500, 0.95, seed=0, recenter=True)
        assert interval.low < interval.value < interval.high, name
        biased = bootstrap(lambda idx, n=name: metrics.metric(n, idx), 80, 500, 0.95, seed=0)  # BCa falls back too
        assert biased.low <= biased.value <= biased.high, name


def test_paired_change_needs_the_same_conversations():
    with pytest.raises(ValueError, match="same conversations"):
        paired_change(
            "stop_rate",
            MetricSet([conversation("a", [("x", "y")])]),
            MetricSet([conversation("b", [("x", "y")])]),
            100,
            0.95,
            0,
        )


def test_repetition_penalty_never_touches_the_prompt_or_the_stop_tokens():
    end_of_turn, repeated, prompt_word = 5, 7, 3
    processor = ReplyRepetitionPenalty(2.0, prompt_length=4, exempt_ids=[end_of_turn])
    # the prompt holds the end-of-turn token (it closed earlier turns) and a word; the reply so far repeats both
    input_ids = torch.tensor([[prompt_word, end_of_turn, 9, end_of_turn, repeated, end_of_turn]])
    scores = torch.full((1, 10), 4.0)
    scores[0, 8] = -4.0
    out = processor(input_ids, scores.clone())
    assert out[0, end_of_turn] == scores[0, end_of_turn]  # the token that ends a reply is never penalised
    assert out[0, prompt_word] == scores[0, prompt_word]  # a word from the context is not penalised
    assert out[0, repeated] == pytest.approx(2.0)  # the reply's own repeated token is
    assert processor(input_ids[:, :4], scores.clone()).equal(scores)  # nothing generated yet: nothing changes


def test_conversation_sample_is_seeded_and_stratified_by_topic():
    test = [{"id": str(i), "meta": {"topic": "a" if i % 4 else "b"}, "messages": []} for i in range(40)]
    sample = sample_conversations(test, 20, seed=1)
    assert [c["id"] for c in sample] == [c["id"] for c in sample_conversations(test, 20, seed=1)]
    assert [c["id"] for c in sample] != [c["id"] for c in test[:20]]  # not the first N in file order
    assert sum(c["meta"]["topic"] == "b" for c in sample) == 5  # the topic mix of the split (1 in 4)
    assert sample_conversations(test, None, seed=1) == test


def test_gate_compares_the_lower_bound_when_asked():
    params = load_params(REPO / "params.yaml").evaluate
    change = {"perplexity_improvement": {"value": 0.35, "low": 0.28, "high": 0.4}}
    tuned = {
        "stop_rate": 0.95,
        "stop_rate_low": 0.92,
        "empty_reply_rate": 0.0,
        "empty_reply_rate_high": 0.01,
        "generic_reply_share": 0.01,
        "generic_reply_share_high": 0.03,
    }
    gate = quality_gate(change, tuned, params)
    assert params.gate.use_lower_bound and not gate["passed"] and not gate["perplexity_improvement"]["passed"]
    assert gate["stop_rate"]["passed"]
    point = quality_gate(
        change, tuned, params.model_copy(update={"gate": params.gate.model_copy(update={"use_lower_bound": False})})
    )
    assert point["passed"]


def test_depth_buckets_and_small_slices_merge():
    edges = [1, 3, 7, 15]
    assert [depth_bucket(t, edges) for t in (1, 2, 3, 6, 7, 14, 15, 400)] == [1, 1, 3, 3, 7, 7, 15, 15]
    assert merge_small_depths(20)([(1, 100), (3, 50), (7, 12), (15, 3)]) == [
        (1, [1]),
        (3, [3, 7, 15]),
    ]  # 7 and 15 hold 15 replies
    assert merge_small_depths(20)([(1, 5), (3, 50), (7, 30)]) == [(1, [1, 3]), (7, [7])]  # the first joins the next
    assert merge_small_topics(20)([("a", 30), ("b", 5), ("c", 2)]) == [("a", ["a"]), ("other (2 topics)", ["b", "c"])]


@pytest.fixture(scope="module")
def chatml_model():
    from stages.base_model import prepare_tokenizer
    from tiny import tiny_model, train_tokenizer

    tokenizer = train_tokenizer("chatml")
    model = tiny_model("llama", len(tokenizer))
    prepare_tokenizer(model, tokenizer)
    return tokenizer, model.eval()


def synthetic_scores(replied: list[bool]) -> tuple[dict, dict]:
    """Scores of two conversations as the score stage writes them; conversation i has a generated reply when
    replied[i] (a reply prompt that does not fit max_length is skipped, its turn still scored)."""
    conversations = [{"id": f"c{i}", "topic": "t"} for i in range(len(replied))]
    turns = [{"conversation": i, "turn": 1, "nll": 2.0, "tokens": 2, "correct": 1, "bytes": 8} for i in range(2)]
    replies = [
        {"conversation": i, "turn": 1, "human_fits_max_new_tokens": True}
        | ({"reply": f"hello number {i}", "stopped": True} if replied[i] else {})
        for i in range(len(replied))
    ]
    scores = {"conversations": conversations, "turns": turns, "ranking": [], "replies": replies}
    test = {
        f"c{i}": {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hey {i}"}]}
        for i in range(len(replied))
    }
    return scores, test


def test_a_conversation_without_a_generated_reply_is_evaluated_not_a_crash(tmp_path):
    from stages.evaluate import Scored, evaluate_set
    from stages.lib.semantic import load_encoder
    from tiny import save_tiny_encoder

    encoder = load_encoder(save_tiny_encoder(tmp_path / "encoder"))
    scores, test = synthetic_scores([True, False])
    params = load_params(REPO / "params.yaml").evaluate.model_copy(
        update={"bootstrap": load_params(REPO / "params.yaml").evaluate.bootstrap.model_copy(update={"resamples": 50})}
    )
    scored = Scored("test", scores, scores, test, encoder)
    results, *_ = evaluate_set("test", scored, params, seed=0)
    assert results["human"]["mean_reply_words"] == 2.0  # the human reply of the conversation with a reply
    assert results["change"]["mean_reply_words"]["verdict"] == "unchanged"


def test_an_empty_reply_has_no_semantic_similarity(tmp_path):
    from stages.evaluate import Scored
    from stages.lib.semantic import load_encoder
    from tiny import save_tiny_encoder

    encoder = load_encoder(save_tiny_encoder(tmp_path / "encoder"))
    scores, test = synthetic_scores([True, True])
    empty = {**scores, "replies": [{**scores["replies"][0], "reply": ""}, scores["replies"][1]]}
    scored = Scored("test", empty, empty, test, encoder)
    assert scored.semantic["finetuned"][0] == 0.0 and scored.semantic["finetuned"][1] != 0.0


def test_a_verdict_needs_the_interval_shown_to_exclude_zero():
    """A p-value below alpha beside an interval that holds 0 (BCa moves the ends) is no significant change."""
    assert verdict("semantic_similarity", Interval(0.02, 0.005, 0.04), 0.01, 0.05) == "better"
    assert verdict("semantic_similarity", Interval(0.02, -0.002, 0.04), 0.01, 0.05) == "no significant change"


def test_a_significant_change_smaller_than_what_matters_is_negligible():
    """The reference retrained on another CPU (bf16 against fp32): perplexity 32.95 -> 33.06, a relative change of
    -0.34% [-0.41%, -0.28%], p 0.004. Real for these two models, and smaller than a training seed moves it."""
    from stages.lib.stats import MIN_CHANGE

    assert verdict("perplexity", Interval(-0.0034, -0.0041, -0.0028), 0.004, 0.05) == "negligible"
    assert verdict("perplexity", Interval(-0.03, -0.04, -0.02), 0.004, 0.05) == "worse"
    assert verdict("context_overlap", Interval(0.005, 0.001, 0.009), 0.01, 0.05) == "negligible"
    assert verdict("context_overlap", Interval(0.05, 0.01, 0.09), 0.01, 0.05) == "further from human"
    assert verdict("chrf", Interval(0.1, 0.05, 0.15), 0.01, 0.05) == ""  # descriptive: never a verdict
    assert set(MIN_CHANGE) <= set(PRIMARY + HUMAN_REFERENCED)  # a margin for a metric that has verdicts only


def test_the_decoding_leaves_nothing_to_the_models_generation_config(tmp_path):
    """A hub model's generation_config.json (top_k, repetition_penalty) or transformers' default top_k 50 must not
    slip into the measured decoding."""
    from transformers import GenerationConfig

    from stages.lib.decoding import decoding
    from tiny import tiny_model

    params = load_params(REPO / "params.yaml").evaluate
    model = tiny_model("llama", 64)
    model.generation_config = GenerationConfig(top_k=20, repetition_penalty=1.05, no_repeat_ngram_size=3, min_p=0.1)
    arguments = {k: v for k, v in decoding(params, 4, [2]).items() if k not in ("logits_processor",)}
    config, _ = model._prepare_generation_config(None, **arguments)
    assert (config.top_k, config.repetition_penalty, config.no_repeat_ngram_size, config.min_p) == (0, 1.0, 0, 0.0)
    assert (config.temperature, config.top_p, config.do_sample) == (params.temperature, params.top_p, True)
