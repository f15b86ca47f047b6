import json

import pytest

from conftest import FIXTURES, REPO, run_stage, write_params
from stages.lib.atomic import atomic_path
from stages.lib.conversations import InputError, read_conversations
from stages.lib.params import PreprocessParams, load_params
from stages.preprocess import (
    clean_conversations,
    clean_text,
    merge_turns,
    near_key,
    preprocess,
    remove_leakage,
    scrub_pii,
    split_indices,
)


def preprocess_params(**changes) -> PreprocessParams:
    """The repository's preprocess section (every key is required) with `changes`."""
    return PreprocessParams(**{**load_params(REPO / "params.yaml").preprocess.model_dump(), **changes})


def conv(cid, *pairs, topic=None):
    return {"id": cid, "messages": [{"role": r, "content": c} for r, c in pairs], "meta": {"topic": topic}}


def test_mojibake_is_repaired_and_unicode_normalised():
    assert clean_text("itâ€™s fine", pii=False, lowercase=False) == "it's fine"
    assert clean_text("cafe\u0301", pii=False, lowercase=False) == "caf\u00e9"


def test_control_and_zero_width_characters_are_removed():
    assert clean_text("he\u200bllo\x07 wor\ufeffld\u202e", pii=False, lowercase=False) == "hello world"


def test_whitespace_is_collapsed_but_line_breaks_kept():
    assert clean_text("  a \t  b  \n\n\n\n  c  ", pii=False, lowercase=False) == "a b\n\nc"


def test_lowercase_is_optional():
    assert clean_text("Hello", pii=False, lowercase=True) == "hello"
    assert clean_text("Hello", pii=False, lowercase=False) == "Hello"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("mail me at jane.doe+x@example.co.uk now", "mail me at [EMAIL] now"),
        ("see https://example.com/a?b=1 and www.test.org", "see [URL] and [URL]"),
        ("call +1 (555) 123-4567 or 555.123.4567", "call [PHONE] or [PHONE]"),
        ("in 2018 I was 25 and had 1000 dollars", "in 2018 I was 25 and had 1000 dollars"),
    ],
)
def test_pii_scrubbing(text, expected):
    assert scrub_pii(text) == expected


def test_merge_consecutive_same_role():
    merged = merge_turns(
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    )
    assert merged == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}]


def test_filters_count_each_drop_reason():
    params = preprocess_params(min_turns=2, max_turn_chars=50)
    raw = [
        conv("ok", ("user", "hi"), ("assistant", "hello")),
        conv("dup", ("user", "hi"), ("assistant", "hello")),
        conv("short", ("user", "hi")),
        conv("mono", ("user", "hi"), ("user", "again"), ("user", "anyone?")),  # merges into one user turn
        conv("long", ("user", "hi"), ("assistant", "x" * 51)),
        conv("noasst", ("system", "s"), ("user", "a"), ("user", "\u200b")),
        conv("only-users", ("user", "a"), ("system", "s"), ("user", "b")),
    ]
    kept, stats = clean_conversations(raw, params)
    assert [c["id"] for c in kept] == ["ok"]
    assert stats["dropped_duplicate"] == 1
    assert stats["dropped_too_few_turns"] == 3
    assert stats["dropped_turn_too_long"] == 1
    assert stats["dropped_no_assistant_turn"] == 1
    assert stats["empty_turns_removed"] == 1
    assert stats["turns_merged"] == 2


def test_split_is_by_conversation_seeded_and_complete():
    labels = ["a", "b", "c", "d"] * 25
    params = preprocess_params(val_fraction=0.1, test_fraction=0.1)
    first, method = split_indices(labels, params, seed=1)
    again, _ = split_indices(labels, params, seed=1)
    other, _ = split_indices(labels, params, seed=2)
    assert first == again and first != other and method == "stratify_topic"
    assert sorted(first["train"] + first["val"] + first["test"]) == list(range(100))
    assert len(first["val"]) == 10 and len(first["test"]) == 10
    assert {labels[i] for i in first["test"]} == {"a", "b", "c", "d"}  # stratified: every topic held out


def test_group_split_keeps_topics_apart():
    labels = [f"t{i % 10}" for i in range(200)]
    splits, _ = split_indices(
        labels, preprocess_params(split_by="group_topic", val_fraction=0.2, test_fraction=0.2), seed=0
    )
    train_topics = {labels[i] for i in splits["train"]}
    assert train_topics.isdisjoint({labels[i] for i in splits["val"] + splits["test"]})


def test_near_duplicates_across_splits_are_removed_from_held_out():
    conversations = [
        conv("t", ("user", "Hello there!"), ("assistant", "Hi.")),
        conv("v", ("user", "hello   there"), ("assistant", "HI")),
        conv("v2", ("user", "other"), ("assistant", "x")),
        conv("w", ("user", "other!"), ("assistant", "X")),
    ]
    assert near_key(conversations[0]) == near_key(conversations[1])
    assignment = {"train": [0], "val": [1, 2], "test": [3]}
    removed = remove_leakage(assignment, [near_key(c) for c in conversations])
    assert removed == {"val": 1, "test": 1}
    assert assignment == {"train": [0], "val": [2], "test": []}


def run_preprocess(tmp_path, params, raw=FIXTURES / "conversations.jsonl", seed=42):
    out = tmp_path / "processed"
    report, topics = preprocess(raw, atomic_path(out, is_dir=True), params, seed, tmp_path / "cache")
    return (
        {name: read_conversations(out / f"{name}.jsonl") for name in ("train", "val", "test", "test_unseen")},
        report,
        topics,
    )


def test_report_counts_are_consistent(tmp_path):
    splits, report, topics = run_preprocess(tmp_path, preprocess_params(val_fraction=0.1, test_fraction=0.1))
    assert report["input"]["conversations"] == 48
    assert (
        sum(report["splits"][s]["conversations"] for s in ("train", "val", "test", "test_unseen"))
        == report["output"]["conversations"]
    )
    held = {row["topic"] for row in topics if row["held_out"]}
    assert report["unseen_topics"] == len(held) == 2 and {c["meta"]["topic"] for c in splits["test_unseen"]} == held
    assert (
        report["output"]["conversations"] + sum(report["dropped"].values()) + sum(report["leakage_removed"].values())
        == 48
    )
    assert {row["topic"] for row in topics} == {"colors", "food", "travel", "pets"} and report["topics"] == 4
    assert sum(row["conversations"] for row in topics) == report["output"]["conversations"]
    assert report["splits"]["train"]["turns_per_conversation"]["p50"] > 0
    assert all(len(splits[name]) == report["splits"][name]["conversations"] for name in splits)


def test_metrics_hold_no_column_per_topic(tmp_path):
    """One metric per topic made `dvc exp show` print 272 columns; the table is a plot file now."""
    raw = tmp_path / "many_topics.jsonl"
    raw.write_text(
        "".join(
            json.dumps(conv(f"c{i}", ("user", f"question {i}"), ("assistant", f"answer {i}"), topic=f"topic {i}"))
            + "\n"
            for i in range(60)
        )
    )
    _, report, topics = run_preprocess(tmp_path, preprocess_params(val_fraction=0.1, test_fraction=0.1), raw)
    flat = json.dumps(report)
    assert len(topics) == 60 and report["topics"] == 60 and "topic 1" not in flat


def test_group_split_never_shares_a_topic_between_val_and_test():
    labels = [f"t{i % 10}" for i in range(200)]
    for seed in range(5):
        splits, _ = split_indices(
            labels, preprocess_params(split_by="group_topic", val_fraction=0.2, test_fraction=0.2), seed=seed
        )
        topics = {name: {labels[i] for i in splits[name]} for name in splits}
        assert topics["val"] and topics["test"]
        assert topics["val"].isdisjoint(topics["test"]) and topics["train"].isdisjoint(topics["val"] | topics["test"])


def test_empty_test_split_is_an_error_naming_the_param(tmp_path):
    raw = tmp_path / "small.jsonl"
    raw.write_text(
        "".join(json.dumps(conv(f"c{i}", ("user", f"q {i}"), ("assistant", f"a {i}"))) + "\n" for i in range(8))
    )
    params = preprocess_params(val_fraction=0.05, test_fraction=0.05)  # one held-out conversation of 8: it goes to val
    with pytest.raises(
        InputError,
        match=rf"the test split is empty \(8 conversations kept, test_fraction={params.test_fraction}\); "
        r"raise preprocess\.test_fraction",
    ):
        run_preprocess(tmp_path, params, raw)


@pytest.mark.slow
def test_cli_is_deterministic(workdir):
    raw = workdir / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "conversations.jsonl").write_text((FIXTURES / "conversations.jsonl").read_text())
    write_params(workdir)
    outputs = []
    for fresh in (False, True):  # two interpreters: two string-hash seeds
        result = run_stage("preprocess", workdir, fresh=fresh)
        assert result.returncode == 0, result.stderr
        outputs.append(
            [(workdir / "data" / "processed" / f"{s}.jsonl").read_bytes() for s in ("train", "val", "test")]
            + [(workdir / "metrics" / "data.json").read_bytes()]
        )
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0][-1])["output"]["conversations"] == 48
