"""Conversation measured directly: next-reply ranking, semantic similarity, sameness, unseen topics, and the
statistics behind the verdicts (docs/DESIGN.md §5.1)."""

import math
import random

import numpy as np
import pytest
import torch

from conftest import REPO
from stages.evaluate import hit, quality_gate
from stages.lib.params import load_params
from stages.lib.semantic import embed, load_encoder, similarities
from stages.lib.stats import (
    ConversationScores,
    Interval,
    MetricSet,
    Reply,
    family_verdicts,
    holm,
    metric_interval,
    wilson,
)
from stages.preprocess import split_with_unseen
from stages.score import distractors, pick_turns, rank


def chat(cid: str, replies: list[str], topic: str = "t") -> dict:
    messages = []
    for index, reply in enumerate(replies):
        messages += [{"role": "user", "content": f"question {index} of {cid}"}, {"role": "assistant", "content": reply}]
    return {"id": cid, "meta": {"topic": topic}, "messages": messages}


def conversation(cid: str, texts: list[str], stopped: bool = True) -> ConversationScores:
    return ConversationScores(cid, "t", replies=[Reply(1, text, "a human reply", stopped, 0.0) for text in texts])


def test_the_scored_turns_of_a_conversation_depend_on_its_id_only():
    rng = random.Random(0)
    test = [chat(f"c{i}", [f"reply {j}" for j in range(rng.randint(2, 8))]) for i in range(50)]
    two, three = pick_turns(test, 2, seed=5), pick_turns(test, 3, seed=5)
    assert set(two) <= set(three)  # a larger count adds turns, never swaps them
    without_first = pick_turns(test[1:], 2, seed=5)
    shifted = {(test[1:][c]["id"], t) for c, t in without_first}
    assert shifted == {(test[c]["id"], t) for c, t in two if c > 0}  # dropping a conversation moves no other's turns
    assert pick_turns(test, 2, seed=6) != two


def test_distractors_have_the_real_replys_word_count_so_length_alone_picks_at_chance():
    rng = np.random.default_rng(0)
    vocabulary = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    test = [
        chat(f"c{i}", [" ".join(rng.choice(vocabulary, int(rng.integers(2, 9)))) for _ in range(3)]) for i in range(120)
    ]
    candidates, hits_by_words, hits_by_characters = 5, [], []
    for index, conversation in enumerate(test):
        turn = 3
        others = distractors(test, index, turn, candidates - 1, seed=1)
        texts = [conversation["messages"][turn]["content"]] + [test[c]["messages"][t]["content"] for c, t in others]
        assert len(others) == candidates - 1 and all(c != index for c, _ in others)
        assert {len(t.split()) for t in texts} == {len(texts[0].split())}  # enough replies have exactly its length
        hits_by_words.append(hit([len(t.split()) for t in texts]))  # a tie for first shares the win
        hits_by_characters.append(hit([-len(t) for t in texts]))
    assert np.mean(hits_by_words) == pytest.approx(1 / candidates)
    low, high = wilson(sum(hits_by_characters), len(hits_by_characters), 0.95)
    assert low < 1 / candidates < high, np.mean(hits_by_characters)
    assert distractors(test, 0, 3, candidates - 1, seed=1) == distractors(test, 0, 3, candidates - 1, seed=1)


def test_no_distractor_is_the_real_reply_in_other_words_or_a_copy_of_another():
    replies = ["Haha, same.", "haha same", "HAHA same!!", "Not at all.", "not at all", "Pretty good.", "Fine, you?"]
    test = [chat(f"c{i}", [reply]) for i, reply in enumerate(replies)]
    chosen = distractors(test, 0, 1, 3, seed=1)  # the real reply: "Haha, same."
    texts = [test[c]["messages"][t]["content"] for c, t in chosen]
    wordings = {"".join(ch for ch in text.lower() if ch.isalnum()) for text in texts}
    assert "hahasame" not in wordings and len(wordings) == len(texts) == 3, texts


def test_ranking_prefers_the_real_reply_for_a_trained_model_and_is_at_chance_for_a_random_one(llama_repo):
    """The fixture pipeline's fine-tuned model learnt the fixture conversations: it ranks their real replies
    first; an untrained model of the same shape ranks at chance (1/K within the interval)."""
    from stages.lib.conversations import read_conversations
    from stages.lib.modeling import load_causal_lm
    from stages.lib.params import RankingParams
    from tiny import tiny_model

    conversations = read_conversations(llama_repo / "data" / "processed" / "train.jsonl")
    params = RankingParams(candidates=4, turns_per_conversation=2)
    model, tokenizer = load_causal_lm(llama_repo / "models" / "finetuned")
    trained = [hit(r["scores"]) for r in rank(model.eval(), tokenizer, conversations, params, 128, seed=3)]
    assert len(trained) >= 40 and np.mean(trained) > 0.7, np.mean(trained)
    random_model = tiny_model("llama", len(tokenizer), seed=7).eval()
    chance = [hit(r["scores"]) for r in rank(random_model, tokenizer, conversations, params, 128, seed=3)]
    low, high = wilson(sum(chance), len(chance), 0.95)
    assert low < 1 / 4 < high, np.mean(chance)


def test_ranking_with_a_shared_context_cache_equals_scoring_each_candidate_alone(llama_repo):
    from stages.lib.labels import encode
    from stages.lib.modeling import load_causal_lm
    from stages.score import candidate_log_probs, last_turn_only

    model, tokenizer = load_causal_lm(llama_repo / "models" / "finetuned")
    history = [{"role": "user", "content": "do you have a pet?"}]
    replies = ["i have a small cat named pepper.", "trains, because you can watch the land go by.", "ok"]
    cached = candidate_log_probs(model.eval(), tokenizer, history, replies, 128)
    for reply, value in zip(replies, cached):
        example = encode(tokenizer, history + [{"role": "assistant", "content": reply}])
        labels, _ = last_turn_only(example.labels)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1].float()
        targets = torch.tensor(labels[1:])
        trained = targets != -100
        log_probs = torch.log_softmax(logits, -1)[trained].gather(-1, targets[trained].unsqueeze(-1))
        assert value == pytest.approx(float(log_probs.mean()), abs=1e-4)


def test_semantic_similarity_is_the_cosine_of_mean_pooled_embeddings(tmp_path):
    from tiny import save_tiny_encoder

    model, tokenizer = load_encoder(save_tiny_encoder(tmp_path / "encoder"))
    a, b = "my favorite color is blue", "i like pizza"
    vectors = []
    for text in (a, b):
        batch = tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state[0]
        vectors.append(hidden.mean(0))  # one text, no padding: the mean over its tokens
    by_hand = float(torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0))
    assert similarities(model, tokenizer, [a], [b]) == pytest.approx([by_hand], abs=1e-5)
    assert similarities(model, tokenizer, [a], [a]) == pytest.approx([1.0], abs=1e-5)
    padded = embed(model, tokenizer, [a, b + " and a much longer tail of words"])  # padding is not averaged in
    assert float(padded[0] @ embed(model, tokenizer, [a])[0]) == pytest.approx(1.0, abs=1e-5)


def test_an_empty_reply_scores_zero_semantic_similarity(tmp_path):
    from tiny import save_tiny_encoder

    model, tokenizer = load_encoder(save_tiny_encoder(tmp_path / "encoder"))
    empty, spaces, said = similarities(model, tokenizer, ["", "  ", "i like pizza"], ["i like pizza"] * 3)
    assert (empty, spaces) == (0.0, 0.0) and said == pytest.approx(1.0, abs=1e-5)


@pytest.mark.bundled
def test_the_bundled_encoder_tells_paraphrase_from_unrelated(tmp_path, monkeypatch):
    from stages.encoder import materialise

    (tmp_path / "encoder").mkdir()
    materialise("all-minilm-l6-v2", tmp_path / "encoder")
    model, tokenizer = load_encoder(tmp_path / "encoder")
    close, far = similarities(
        model, tokenizer, ["How are you today?"] * 2, ["How are you doing?", "The stock market fell."]
    )
    assert close == pytest.approx(0.69, abs=0.01) and far == pytest.approx(0.14, abs=0.01)


def test_generic_reply_share_is_one_for_a_model_that_always_says_the_same():
    same = MetricSet([conversation(str(i), ["I'm not sure.", "i'm not sure what you mean"]) for i in range(20)])
    everything = np.arange(20)
    assert same.metric("generic_reply_share", everything) == 1.0
    varied = MetricSet([conversation(str(i), [f"word{i} and more", f"other{i} words here"]) for i in range(20)])
    assert varied.metric("generic_reply_share", everything) == 0.0


def test_distinct_n_against_the_human_replies_is_measured_at_the_same_length():
    """A model whose replies are the human replies padded with more words is not 'less diverse' by length."""
    same = ConversationScores("a", "t", replies=[Reply(1, "one two three", "one two three", True, 0.0)])
    longer = ConversationScores(
        "b", "t", replies=[Reply(1, "four five six and and and and", "four five six", True, 0.0)]
    )
    metrics = MetricSet([same, longer])
    everything = np.arange(2)
    assert metrics.metric("distinct_1_vs_human", everything) == pytest.approx(1.0)
    assert metrics.metric("distinct_1", everything) < 1.0


def test_an_empty_reply_is_not_a_stop_and_the_gate_fails_on_empty_replies():
    half_empty = MetricSet([conversation(str(i), ["", "a real reply"]) for i in range(30)])
    everything = np.arange(30)
    assert half_empty.metric("stop_rate", everything) == pytest.approx(0.5)
    assert half_empty.metric("empty_reply_rate", everything) == pytest.approx(0.5)
    params = load_params(REPO / "params.yaml").evaluate
    change = {"perplexity_improvement": {"value": 0.5, "low": 0.45, "high": 0.55}}
    tuned = {
        "stop_rate": 1.0,
        "stop_rate_low": 0.98,
        "empty_reply_rate": 0.5,
        "empty_reply_rate_high": 0.6,
        "generic_reply_share": 0.0,
        "generic_reply_share_high": 0.02,
    }
    gate = quality_gate(change, tuned, params)
    assert not gate["passed"] and not gate["empty_reply_rate"]["passed"]
    nan = quality_gate(
        {"perplexity_improvement": {"value": float("nan"), "low": None, "high": None}},
        {**tuned, "empty_reply_rate": 0.0, "empty_reply_rate_high": 0.0},
        params,
    )
    assert not nan["passed"] and not nan["perplexity_improvement"]["passed"]  # not a number never passes


def test_a_proportion_at_one_gets_a_lower_bound_below_one():
    """361 stops in 361 replies over 200 conversations: not [1, 1] but the Wilson bound with one observation per
    conversation (replies of one conversation are not independent)."""
    units = [conversation(str(i), ["ok then"] * (2 if i < 161 else 1)) for i in range(200)]
    metrics = MetricSet(units)
    assert sum(len(u.replies) for u in units) == 361
    interval = metric_interval(metrics, "stop_rate", 500, 0.95, seed=0)
    assert interval.value == 1.0 and interval.high == 1.0
    assert 0.975 < interval.low < 0.985


def test_a_share_s_interval_stays_between_0_and_1():
    """The generic share is set-based: its bootstrap spread is re-centred on the estimate, which can carry the lower
    end past 0 (3 of 8 replies open alike: the percentiles reach -0.04 once re-centred)."""
    units = [conversation(str(i), ["i'm not sure that works" if i < 3 else f"word{i} other"]) for i in range(8)]
    interval = metric_interval(MetricSet(units), "generic_reply_share", 200, 0.95, seed=42)
    assert interval.value == pytest.approx(3 / 8)
    assert interval.low == 0.0 and interval.value < interval.high <= 1.0


def test_holm_adjusts_within_a_family_and_verdicts_need_the_adjusted_p():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    changes = {
        "stop_rate": Interval(0.1, 0.01, 0.2, p=0.02),
        "semantic_similarity": Interval(0.1, 0.01, 0.2, p=0.02),
        "next_reply_hits_at_1": Interval(0.1, 0.01, 0.2, p=0.02),
        "perplexity": Interval(0.1, 0.01, 0.2, p=0.02),
        "bleu": Interval(1.0, 0.5, 2.0, p=0.001),
    }
    verdicts = family_verdicts(changes, 0.05, {})
    assert verdicts["stop_rate"] == (pytest.approx(0.08), "no significant change")  # 4 × 0.02: not below 0.05
    assert verdicts["bleu"][1] == ""  # descriptive


def test_held_out_topics_never_appear_in_train_or_val():
    from stages.lib.params import PreprocessParams

    topics = [f"topic{i % 6}" for i in range(300)] + ["unknown"] * 20
    params = PreprocessParams(
        min_turns=2,
        max_turn_chars=2000,
        scrub_pii=False,
        lowercase=False,
        val_fraction=0.1,
        test_fraction=0.1,
        split_by="stratify_topic",
        unseen_topics=2,
    )
    assignment, _, held = split_with_unseen(topics, params, seed=4)
    assert len(held) == 2 and "unknown" not in held
    assert {topics[i] for i in assignment["test_unseen"]} == set(held)
    assert sum(1 for t in topics if t in held) == len(assignment["test_unseen"])  # every conversation of them
    for name in ("train", "val", "test"):
        assert not {topics[i] for i in assignment[name]} & set(held), name
    assert split_with_unseen(topics, params, seed=4)[2] == held and split_with_unseen(topics, params, seed=5)[2] != held
    none = split_with_unseen(["unknown"] * 40, params, seed=4)
    assert none[2] == [] and none[0]["test_unseen"] == []  # no named topics: nothing to hold out


def test_hit_shares_ties():
    assert hit([2.0, 1.0, 0.5]) == 1.0 and hit([1.0, 2.0]) == 0.0 and hit([1.0, 1.0, 0.0]) == 0.5
    assert math.isclose(hit([0.0] * 4), 0.25)
