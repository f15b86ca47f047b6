"""Stage `preprocess`: clean conversations, filter them, and split by conversation into train/val/test.

Writes data/processed/{train,val,test}.jsonl and metrics/data.json (counts, drop reasons, statistics).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable

import ftfy
import numpy as np
from tqdm import tqdm

from stages.lib.atomic import write_json, write_jsonl
from stages.lib.cli import run
from stages.lib.conversations import Conversation, InputError, Message, read_conversations, topic_of
from stages.lib.params import PreprocessParams, load_params
from stages.lib.paths import PROCESSED, RAW

SPLITS = ("train", "val", "test")
DATA_METRICS = Path("metrics/data.json")

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


def clean_conversations(raw: list[Conversation], params: PreprocessParams) -> tuple[list[Conversation], Counter]:
    """Clean, merge and filter; returns the kept conversations and a counter of what was dropped or changed."""
    stats: Counter = Counter()
    kept: list[Conversation] = []
    seen: set[str] = set()
    for conversation in tqdm(raw, desc="preprocess", unit="conv", mininterval=2.0, leave=False):
        cleaned: list[Message] = []
        for message in conversation["messages"]:
            content = clean_text(message["content"], params.scrub_pii, params.lowercase)
            if content:
                cleaned.append({"role": message["role"], "content": content})
            else:
                stats["empty_turns_removed"] += 1
        merged = merge_turns(cleaned)
        stats["turns_merged"] += len(cleaned) - len(merged)
        reason = drop_reason(merged, params)
        candidate: Conversation = {"id": conversation["id"], "messages": merged, "meta": conversation.get("meta", {})}
        if reason is None:
            key = exact_key(candidate)
            reason = "duplicate" if key in seen else None
            seen.add(key)
        if reason:
            stats[f"dropped_{reason}"] += 1
            continue
        kept.append(candidate)
    return kept, stats


def split_indices(labels: list[str], params: PreprocessParams, seed: int) -> tuple[dict[str, list[int]], str]:
    """Split conversation indices into train/val/test; returns the splits and the method actually used."""
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    indices = np.arange(len(labels))
    held_out = params.val_fraction + params.test_fraction
    if held_out == 0 or len(labels) < 3:
        return {"train": indices.tolist(), "val": [], "test": []}, "none"
    method = params.split_by
    if method == "group_topic":
        splitter = GroupShuffleSplit(n_splits=1, test_size=held_out, random_state=seed)
        train_idx, rest_idx = next(splitter.split(indices, groups=labels))
    else:
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
    test_share = params.test_fraction / held_out
    if test_share in (0.0, 1.0) or len(rest_idx) < 2:
        val_idx, test_idx = (rest_idx, rest_idx[:0]) if test_share < 1.0 else (rest_idx[:0], rest_idx)
    else:
        val_idx, test_idx = train_test_split(rest_idx, test_size=test_share, random_state=seed)
    return {"train": sorted(train_idx.tolist()), "val": sorted(val_idx.tolist()), "test": sorted(test_idx.tolist())}, method


def remove_leakage(splits: dict[str, list[Conversation]]) -> dict[str, int]:
    """Drop val/test conversations whose normalised text also occurs in an earlier split."""
    removed = {}
    seen = {near_key(c) for c in splits["train"]}
    for name in ("val", "test"):
        before = len(splits[name])
        splits[name] = [c for c in splits[name] if near_key(c) not in seen]
        removed[name] = before - len(splits[name])
        seen |= {near_key(c) for c in splits[name]}
    return removed


def describe(values: list[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    array = np.asarray(values, dtype=float)
    return {"mean": round(float(array.mean()), 2), "p50": float(np.percentile(array, 50)), "p95": round(float(np.percentile(array, 95)), 2)}


def split_report(conversations: list[Conversation]) -> dict:
    turns = [len(c["messages"]) for c in conversations]
    chars = [sum(len(m["content"]) for m in c["messages"]) for c in conversations]
    return {"conversations": len(conversations), "turns": int(sum(turns)), "turns_per_conversation": describe(turns), "chars_per_conversation": describe(chars)}


def preprocess(raw: list[Conversation], params: PreprocessParams, seed: int) -> tuple[dict[str, list[Conversation]], dict]:
    kept, stats = clean_conversations(raw, params)
    if not kept:
        raise InputError(f"preprocess: every conversation was dropped ({dict(stats)}); check min_turns and the input")
    assignment, method = split_indices([topic_of(c) for c in kept], params, seed)
    splits = {name: [kept[i] for i in assignment[name]] for name in SPLITS}
    leaked = remove_leakage(splits)
    report = {
        "input": {"conversations": len(raw), "turns": sum(len(c["messages"]) for c in raw)},
        "output": split_report([c for name in SPLITS for c in splits[name]]),
        "dropped": {key.removeprefix("dropped_"): stats.get(key, 0) for key in ("dropped_turn_too_long", "dropped_too_few_turns", "dropped_no_assistant_turn", "dropped_duplicate")},
        "cleaning": {"empty_turns_removed": stats.get("empty_turns_removed", 0), "turns_merged": stats.get("turns_merged", 0)},
        "leakage_removed": leaked,
        "split_method": method,
        "splits": {name: split_report(splits[name]) for name in SPLITS},
        "topics": dict(sorted(Counter(topic_of(c) for name in SPLITS for c in splits[name]).items())),
    }
    return splits, report


def main() -> int:
    params = load_params()
    splits, report = preprocess(read_conversations(RAW), params.preprocess, params.seed)
    for name in SPLITS:
        write_jsonl(PROCESSED / f"{name}.jsonl", splits[name])
    write_json(DATA_METRICS, report)
    dropped = sum(report["dropped"].values())
    counts = ", ".join(f"{name} {report['splits'][name]['conversations']}" for name in SPLITS)
    print(f"preprocess: {report['input']['conversations']} -> {report['output']['conversations']} conversations "
          f"({dropped} dropped, {sum(report['leakage_removed'].values())} leaked near-duplicates removed); {counts}")
    return 0


if __name__ == "__main__":
    run(main)
