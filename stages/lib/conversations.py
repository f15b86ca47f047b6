"""The canonical conversation schema (docs/DESIGN.md §2) and its JSONL reader.

{"id": "...", "messages": [{"role": "user", "content": "..."}, ...],
 "meta": {"topic": "...", "source": "..."}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, TypedDict

from stages.lib.errors import InputError  # noqa: F401  (re-exported: stages raise it from here)

ROLES = ("system", "user", "assistant")


class Message(TypedDict):
    role: str
    content: str


class Conversation(TypedDict):
    id: str
    messages: list[Message]
    meta: dict[str, Any]


def read_text_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is accepted, as spreadsheets write one
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not valid UTF-8 at byte offset {exc.start} (byte 0x{data[exc.start]:02x}); "
            "re-encode the file as UTF-8"
        ) from None


def parse_json_line(text: str, where: str, multiline: bool = False) -> Any:
    """One JSON document; every way JSON can fail (syntax, nesting too deep) is one line naming `where`
    (and the line, for a `multiline` document)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"{where}:{exc.lineno}" if multiline else where
        raise InputError(f"{at}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line, reading one line at a time."""
    offset = 0
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{line_no}: not valid UTF-8 at byte offset {offset + exc.start} "
                    f"(byte 0x{raw[exc.start]:02x}); "
                    "re-encode the file as UTF-8"
                ) from None
            if line_no == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write
            offset += len(raw)
            if line.strip():
                yield line_no, parse_json_line(line, f"{path}:{line_no}")


def make_conversation(conv_id: str, messages: list[Message], topic: str | None, source: str) -> Conversation:
    return {"id": str(conv_id), "messages": messages, "meta": {"topic": topic, "source": source}}


def validate_conversation(obj: Any, where: str) -> Conversation:
    """Check one canonical record; `where` is 'file:line' for the error message."""
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not isinstance(obj.get("messages"), list):
        raise InputError(f"{where}: expected an object with string 'id' and list 'messages'")
    for index, message in enumerate(obj["messages"]):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise InputError(
                f"{where}: messages[{index}] must be {{'role': one of {list(ROLES)}, 'content': string}}, "
                f"got {message!r}"
            )
    obj.setdefault("meta", {})
    return obj


def read_conversations(path: Path | str) -> list[Conversation]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found; run the stage that writes it first (dvc repro)")
    return [validate_conversation(obj, f"{path}:{line_no}") for line_no, obj in iter_jsonl(path)]


def topic_of(conversation: Conversation) -> str:
    """The conversation's topic label ('unknown' when it has none)."""
    return str(conversation.get("meta", {}).get("topic") or "unknown")


def _lines(path: str) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield {"text": line.rstrip("\n")}


def lines_dataset(path: Path, cache: Path) -> Any:
    """A JSONL file as a `datasets.Dataset` of its lines (blank ones included, so a row's index + 1 is its
    line number), written to Arrow under `cache` in batches: the input of a `map` over all cores."""
    import datasets

    return datasets.Dataset.from_generator(
        _lines,
        features=datasets.Features({"text": datasets.Value("string")}),
        cache_dir=str(cache / "lines"),
        gen_kwargs={"path": str(path)},
    )


def map_workers(rows: int, batch_size: int) -> int | None:
    """`num_proc` for datasets.map: every core, but no more processes than batches (None: in process)."""
    workers = max(1, min(os.cpu_count() or 1, rows // batch_size + 1))
    return workers if workers > 1 else None


def dataset_name(source: str) -> str:
    """What `data.source` names: a `.source` file names a dataset that is not a file ('chitchat', a hub id) on its
    first line that is not blank or a comment; anything else names itself."""
    path = Path(source)
    if not (source.endswith(".source") and path.is_file()):
        return source
    names = [
        line.strip() for line in read_text_utf8(path).splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    if not names:
        raise InputError(
            f"{path}: names no dataset; its first line should be 'chitchat' or a hub id such as owner/name"
        )
    if names[0].endswith(".source"):
        raise InputError(f"{path}: names another .source file; name the dataset itself")
    return names[0]
