"""Stage `preprocess`: clean conversations, filter them, and split by conversation into train/val/test.

Whole topics (`preprocess.unseen_topics`, a seeded choice) are held out of all three into test_unseen.jsonl:
the model never trains or validates on them, so scores there measure adaptability to new topics.

Writes data/processed/{train,val,test,test_unseen}.jsonl, metrics/data.json (counts, drop reasons, statistics) and
metrics/data_topics.json (conversations per topic, a plot). Streams: memory holds hashes and sizes, not text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import ContextManager, Iterable

import ftfy
import numpy as np
from tqdm import tqdm

from stages.lib.atomic import publish_together
from stages.lib.cli import run
from stages.lib.conversations import (
    Conversation,
    InputError,
    Message,
    lines_dataset,
    map_workers,
    parse_json_line,
    topic_of,
    validate_conversation,
)
from stages.lib.params import PreprocessParams, load_params
from stages.lib.paths import PROCESSED, RAW

SPLITS = ("train", "val", "test", "test_unseen")
DATA_METRICS = Path("metrics/data.json")
TOPIC_PLOT = Path("metrics/data_topics.json")  # conversations per topic: a table for `dvc plots`, not 1 metric each

# Cc controls except tab/newline; Cf format characters (zero-width space/joiners, BOM, bidi marks and overrides).
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_HSPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().-]{7,}\d(?!\w)")
_MIN_PHONE_DIGITS = 9


def _scrub_phone(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group())
    return "[PHONE]" if _MIN_PHONE_DIGITS <= digits <= 15 else match.group()


def scrub_pii(text: str) -> str:
    """Replace e-mail addresses, URLs and phone numbers with placeholders."""
    text = _EMAIL.sub("[EMAIL]", text)
    text = _URL.sub("[URL]", text)
    return _PHONE.sub(_scrub_phone, text)


def clean_text(text: str, pii: bool, lowercase: bool) -> str:
    text = ftfy.fix_text(text, normalization="NFC")  # repairs mojibake such as "itâ€™s"
    text = unicodedata.normalize("NFC", _INVISIBLE.sub("", text))
    text = "\n".join(line.strip() for line in _HSPACE.sub(" ", text).split("\n"))
    text = _BLANK_LINES.sub("\n\n", text).strip()
    if pii:
        text = scrub_pii(text)
    return text.lower() if lowercase else text


def merge_turns(messages: Iterable[Message]) -> list[Message]:
    """Join consecutive messages of one role into one turn."""
    merged: list[Message] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {"role": message["role"], "content": merged[-1]["content"] + "\n" + message["content"]}
        else:
            merged.append(dict(message))  # type: ignore[arg-type]
    return merged


def exact_key(conversation: Conversation) -> str:
    payload = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in conversation["messages"])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def near_key(conversation: Conversation) -> str:
    """Hash of the text with case, punctuation, whitespace and roles removed: catches near-duplicates."""
    text = " ".join(m["content"] for m in conversation["messages"]).lower()
    text = " ".join(re.sub(r"[\W_]+", " ", text).split())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def drop_reason(messages: list[Message], params: PreprocessParams) -> str | None:
    dialogue = [m for m in messages if m["role"] != "system"]
    if any(len(m["content"]) > params.max_turn_chars for m in messages):
        return "turn_too_long"
    if len(dialogue) < params.min_turns:
        return "too_few_turns"
    if not any(m["role"] == "assistant" for m in dialogue):
        return "no_assistant_turn"
    return None


def clean_candidate(
    conversation: Conversation, params: PreprocessParams, stats: Counter
) -> tuple[Conversation, str | None]:
    """Clean and merge one conversation; returns it and why it is dropped (None: kept, unless a duplicate)."""
    cleaned: list[Message] = []
    for message in conversation["messages"]:
        content = clean_text(message["content"], params.scrub_pii, params.lowercase)
        if content:
            cleaned.append({"role": message["role"], "content": content})
        else:
            stats["empty_turns_removed"] += 1
    merged = merge_turns(cleaned)
    stats["turns_merged"] += len(cleaned) - len(merged)
    candidate: Conversation = {"id": conversation["id"], "messages": merged, "meta": conversation.get("meta", {})}
    return candidate, drop_reason(merged, params)


def digest(hex_key: str) -> bytes:
    """16 bytes of a sha256: what the duplicate and leakage sets hold, bounded at a million conversations."""
    return bytes.fromhex(hex_key)[:16]


def not_duplicate(reason: str | None, key: bytes, seen: set[bytes], stats: Counter) -> bool:
    """Count a drop (a duplicate when `key` was seen before); True when the conversation is kept."""
    if reason is None:
        reason = "duplicate" if key in seen else None
        seen.add(key)
    if reason:
        stats[f"dropped_{reason}"] += 1
    return reason is None


def clean_conversations(raw: Iterable[Conversation], params: PreprocessParams) -> tuple[list[Conversation], Counter]:
    """Clean, merge and filter; returns the kept conversations and a counter of what was dropped or changed."""
    stats: Counter = Counter()
    seen: set[bytes] = set()
    kept = []
    for conversation in raw:
        candidate, reason = clean_candidate(conversation, params, stats)
        if not_duplicate(reason, digest(exact_key(candidate)), seen, stats):
            kept.append(candidate)
    return kept, stats


CLEAN_BATCH = 500  # conversations per datasets.map call


def clean_rows(lines: list[str], indices: list[int], params: PreprocessParams, path: str) -> dict[str, list]:
    """datasets.map function: raw JSONL lines -> each cleaned conversation as its output line, with its
    drop reason, hashes and sizes (the parallel part; duplicates are decided in order afterwards)."""
    out: dict[str, list] = {name: [] for name in ROW_FIELDS}
    for line, index in zip(lines, indices):
        stats: Counter = Counter()
        if not line.strip():
            row = {
                "line": "",
                "reason": "blank",
                "exact": b"",
                "near": b"",
                "topic": "",
                "turns": 0,
                "chars": 0,
                "raw_turns": 0,
            }
        else:
            where = f"{path}:{index + 1}"
            conversation = validate_conversation(parse_json_line(line, where), where)
            candidate, reason = clean_candidate(conversation, params, stats)
            row = {
                "line": json.dumps(candidate, ensure_ascii=False) + "\n",
                "reason": reason or "",
                "exact": digest(exact_key(candidate)),
                "near": digest(near_key(candidate)),
                "topic": topic_of(candidate),
                "turns": len(candidate["messages"]),
                "chars": sum(len(m["content"]) for m in candidate["messages"]),
                "raw_turns": len(conversation["messages"]),
            }
        row.update(empty_turns_removed=stats["empty_turns_removed"], turns_merged=stats["turns_merged"])
        for name in ROW_FIELDS:
            out[name].append(row[name])
    return out


ROW_FIELDS = (
    "line",
    "reason",
    "exact",
    "near",
    "topic",
    "turns",
    "chars",
    "raw_turns",
    "empty_turns_removed",
    "turns_merged",
)


def split_indices(labels: list[str], params: PreprocessParams, seed: int) -> tuple[dict[str, list[int]], str]:
    """Split conversation indices into train/val/test; returns the splits and the method actually used."""
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    indices = np.arange(len(labels))
    held_out = params.val_fraction + params.test_fraction
    if held_out == 0 or len(labels) < 3:
        return {"train": indices.tolist(), "val": [], "test": []}, "none"
    method = params.split_by
    test_share = params.test_fraction / held_out
    if method == "group_topic":
        groups = np.asarray(labels, dtype=object)
        splitter = GroupShuffleSplit(n_splits=1, test_size=held_out, random_state=seed)
        train_idx, rest_idx = next(splitter.split(indices, groups=groups))
        rest_idx = np.sort(rest_idx)
        if test_share in (0.0, 1.0) or len(set(groups[rest_idx])) < 2:
            val_idx, test_idx = (rest_idx, rest_idx[:0]) if test_share < 1.0 else (rest_idx[:0], rest_idx)
        else:  # val and test are split by topic too: no topic in two splits
            inner = GroupShuffleSplit(n_splits=1, test_size=test_share, random_state=seed)
            val_pos, test_pos = next(inner.split(rest_idx, groups=groups[rest_idx]))
            val_idx, test_idx = rest_idx[val_pos], rest_idx[test_pos]
        return {
            "train": sorted(train_idx.tolist()),
            "val": sorted(val_idx.tolist()),
            "test": sorted(test_idx.tolist()),
        }, method
    stratify = None
    if method == "stratify_topic":
        counts = Counter(labels)
        # Topics too rare to appear in every split share one stratum.
        stratify = [label if counts[label] >= 4 else "rare" for label in labels]
    try:
        train_idx, rest_idx = train_test_split(indices, test_size=held_out, random_state=seed, stratify=stratify)
    except ValueError:  # too few examples per topic for the held-out size
        method = "random (stratification impossible at this size)"
        train_idx, rest_idx = train_test_split(indices, test_size=held_out, random_state=seed)
    rest_idx = np.sort(rest_idx)
    if test_share in (0.0, 1.0) or len(rest_idx) < 2:
        val_idx, test_idx = (rest_idx, rest_idx[:0]) if test_share < 1.0 else (rest_idx[:0], rest_idx)
    else:
        val_idx, test_idx = train_test_split(rest_idx, test_size=test_share, random_state=seed)
    return {
        "train": sorted(train_idx.tolist()),
        "val": sorted(val_idx.tolist()),
        "test": sorted(test_idx.tolist()),
    }, method


def unseen_topics(topics: list[str], count: int, seed: int) -> list[str]:
    """A seeded choice of `count` named topics to hold out whole; none when fewer than count + 1 are named
    (the model must keep at least one topic to train on)."""
    import random

    named = sorted({t for t in topics if t != "unknown"})
    if count == 0 or len(named) <= count:
        return []
    return sorted(random.Random(seed).sample(named, count))


def split_with_unseen(
    topics: list[str], params: PreprocessParams, seed: int
) -> tuple[dict[str, list[int]], str, list[str]]:
    """train/val/test over the conversations of the seen topics, and test_unseen: every conversation of the
    held-out topics."""
    held = set(unseen_topics(topics, params.unseen_topics, seed))
    seen = [i for i, topic in enumerate(topics) if topic not in held]
    assignment, method = split_indices([topics[i] for i in seen], params, seed)
    assignment = {name: [seen[i] for i in indices] for name, indices in assignment.items()}
    assignment["test_unseen"] = [i for i, topic in enumerate(topics) if topic in held]
    return assignment, method, sorted(held)


def remove_leakage(assignment: dict[str, list[int]], keys: list[bytes]) -> dict[str, int]:
    """Drop held-out conversations whose normalised text (`keys[i]`, a digest) also occurs in an earlier split."""
    removed = {}
    seen = {keys[i] for i in assignment["train"]}
    for name in [n for n in ("val", "test", "test_unseen") if n in assignment]:
        before = len(assignment[name])
        assignment[name] = [i for i in assignment[name] if keys[i] not in seen]
        removed[name] = before - len(assignment[name])
        seen |= {keys[i] for i in assignment[name]}
    return removed


def describe(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    array = np.asarray(values, dtype=float)
    return {
        "mean": round(float(array.mean()), 2),
        "p50": float(np.percentile(array, 50)),
        "p95": round(float(np.percentile(array, 95)), 2),
    }


def split_report(turns: np.ndarray, chars: np.ndarray) -> dict:
    return {
        "conversations": len(turns),
        "turns": int(turns.sum()),
        "turns_per_conversation": describe(turns),
        "chars_per_conversation": describe(chars),
    }


def check_held_out(params: PreprocessParams, counts: dict[str, int], kept: int) -> None:
    """A held-out split asked for but empty would fail much later (evaluate, after training): stop here."""
    for name, fraction, key in (
        ("test", params.test_fraction, "test_fraction"),
        ("val", params.val_fraction, "val_fraction"),
    ):
        if fraction > 0 and counts[name] == 0:
            raise InputError(
                f"preprocess: the {name} split is empty ({kept} conversations kept, {key}={fraction}); "
                f"raise preprocess.{key} or bring more conversations"
            )


class Kept:
    """What the split needs of each kept conversation, in arrays: its topic, near-duplicate digest and size."""

    def __init__(self) -> None:
        self.topics: list[str] = []
        self.near: list[bytes] = []
        self.turns: list[int] = []
        self.chars: list[int] = []

    def add(self, row: dict) -> None:
        self.topics.append(sys.intern(row["topic"]))
        self.near.append(row["near"])
        self.turns.append(row["turns"])
        self.chars.append(row["chars"])


def preprocess(
    raw_path: Path, out_dir: ContextManager[Path], params: PreprocessParams, seed: int, cache: Path
) -> tuple[dict, list[dict]]:
    """Stream `raw_path` into {train,val,test}.jsonl in the directory `out_dir` gets (a context manager
    yielding it, entered only for the last pass); returns the report and the per-topic table.

    Pass 1 cleans the conversations on every core (datasets.map, its Arrow files in `cache`), then drops
    duplicates in order and writes the kept ones to a scratch file, keeping only hashes and sizes in
    memory; the split is computed on those; pass 2 copies each kept line to its split's file."""
    stats: Counter = Counter()
    seen: set[bytes] = set()
    kept = Kept()
    raw_conversations = raw_turns = 0
    scratch = cache / "kept.jsonl"
    lines = lines_dataset(raw_path, cache)
    cleaned = lines.map(
        clean_rows,
        batched=True,
        batch_size=CLEAN_BATCH,
        with_indices=True,
        input_columns="text",
        remove_columns=["text"],
        num_proc=map_workers(len(lines), CLEAN_BATCH),
        desc="preprocess clean",
        fn_kwargs={"params": params, "path": str(raw_path)},
        cache_file_name=str(cache / "cleaned.arrow"),
        new_fingerprint=hashlib.sha256(f"{raw_path} {params.model_dump_json()}".encode()).hexdigest()[:16],
    )
    with scratch.open("w", encoding="utf-8") as handle:
        for batch in tqdm(
            cleaned.iter(batch_size=1000), desc="preprocess dedup", unit="batch", mininterval=2.0, leave=False
        ):
            for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
                stats["empty_turns_removed"] += row["empty_turns_removed"]
                stats["turns_merged"] += row["turns_merged"]
                if row["reason"] == "blank":
                    continue
                raw_conversations += 1
                raw_turns += row["raw_turns"]
                if not_duplicate(row["reason"] or None, row["exact"], seen, stats):
                    kept.add(row)
                    handle.write(row["line"])
    if not kept.topics:
        raise InputError(f"preprocess: every conversation was dropped ({dict(stats)}); check min_turns and the input")
    assignment, method, held_topics = split_with_unseen(kept.topics, params, seed)
    leaked = remove_leakage(assignment, kept.near)
    check_held_out(params, {name: len(assignment[name]) for name in SPLITS}, len(kept.topics))
    split_of = np.full(len(kept.topics), -1, dtype=np.int8)
    for number, name in enumerate(SPLITS):
        split_of[assignment[name]] = number
    with out_dir as directory:
        outputs = [(directory / f"{name}.jsonl").open("w", encoding="utf-8") for name in SPLITS]
        try:
            with scratch.open(encoding="utf-8") as handle:
                for index, line in enumerate(handle):
                    if split_of[index] >= 0:
                        outputs[split_of[index]].write(line)
        finally:
            for output in outputs:
                output.close()
    turns, chars = np.asarray(kept.turns), np.asarray(kept.chars)
    order = np.concatenate([np.asarray(assignment[name], dtype=np.int64) for name in SPLITS])
    topic_counts = Counter(kept.topics[i] for i in order.tolist())
    report = {
        "input": {"conversations": raw_conversations, "turns": raw_turns},
        "output": split_report(turns[order], chars[order]),
        "dropped": {
            key.removeprefix("dropped_"): stats.get(key, 0)
            for key in (
                "dropped_turn_too_long",
                "dropped_too_few_turns",
                "dropped_no_assistant_turn",
                "dropped_duplicate",
            )
        },
        "cleaning": {
            "empty_turns_removed": stats.get("empty_turns_removed", 0),
            "turns_merged": stats.get("turns_merged", 0),
        },
        "leakage_removed": leaked,
        "split_method": method,
        "unseen_topics": len(held_topics),  # named in metrics/data_topics.json, not one metric column each
        "splits": {name: split_report(turns[assignment[name]], chars[assignment[name]]) for name in SPLITS},
        "topics": len(topic_counts),
    }
    table = [
        {"topic": topic, "conversations": count, "held_out": topic in held_topics}
        for topic, count in sorted(topic_counts.items())
    ]
    return report, table


def main() -> int:
    params = load_params()
    if not RAW.exists():
        raise InputError(f"{RAW}: not found; run the stage that writes it first (dvc repro)")
    # Scratch (the cleaned corpus, datasets' Arrow files) in the system's temporary directory (TMPDIR): a
    # killed run whose rerun DVC restores from its run-cache leaves nothing beside the outputs.
    # The splits and their report are published together, or none of them (docs/DESIGN.md §9).
    with (
        tempfile.TemporaryDirectory(prefix="preprocess.") as cache,
        publish_together(files=[DATA_METRICS, TOPIC_PLOT], dirs=[PROCESSED]) as outputs,
    ):
        report, topics = preprocess(
            RAW, contextlib.nullcontext(outputs[PROCESSED]), params.preprocess, params.seed, Path(cache)
        )
        outputs.write_json(DATA_METRICS, report)
        outputs.write_json(TOPIC_PLOT, topics)
    dropped = sum(report["dropped"].values())
    counts = ", ".join(f"{name} {report['splits'][name]['conversations']}" for name in SPLITS)
    held = [row["topic"] for row in topics if row["held_out"]]
    counts += f" (topics held out of training: {'; '.join(held) or 'none'})"
    print(
        f"preprocess: {report['input']['conversations']} -> {report['output']['conversations']} conversations "
        f"({dropped} dropped, {sum(report['leakage_removed'].values())} leaked near-duplicates removed); {counts}"
    )
    return 0


if __name__ == "__main__":
    run(main)
