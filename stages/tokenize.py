"""Stage `tokenize`: render the processed splits with the base model's chat template and label them.

Writes data/tokenized/ (a `datasets` DatasetDict with train and val: input_ids, labels, attention_mask,
length) and metrics/tokenize.json. `python -m stages.tokenize --show N` prints example N of the train
split with the trained tokens marked, so you can see exactly what the model learns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

from stages.lib.atomic import publish_together
from stages.lib.cli import ArgumentParser, run
from stages.lib.conversations import (
    Conversation,
    InputError,
    lines_dataset,
    map_workers,
    parse_json_line,
    validate_conversation,
)
from stages.lib.labels import IGNORE_INDEX, TemplateCost, WindowStats, windows_batch
from stages.lib.modeling import load_tokenizer
from stages.lib.params import ParamsError, TokenizeParams, load_params
from stages.lib.paths import BASE_MODEL, PROCESSED
from stages.lib.paths import TOKENIZED as OUTPUT
from stages.lib.template import has_special_text, with_system_prompt

TOKEN_METRICS = Path("metrics/tokenize.json")
BATCH_CONVERSATIONS = 256  # per datasets.map call: bounds each worker's memory
SAVE_BATCH_ROWS = 1000  # datasets' DEFAULT_MAX_BATCH_SIZE, the record batch save_to_disk writes
SWAP = {"user": "assistant", "assistant": "user", "system": "system"}


def role_swapped(conversation: Conversation) -> Conversation:
    """The same dialogue from the other speaker's side (DESIGN §3: both speakers are real humans)."""
    return {
        "id": conversation["id"] + "#swap",
        "messages": [{"role": SWAP[m["role"]], "content": m["content"]} for m in conversation["messages"]],
        "meta": conversation.get("meta", {}),
    }


def base_tokenizer(system_prompt: str, path: Path = BASE_MODEL) -> Any:
    """The base tokenizer with `tokenize.system_prompt` written into its chat template."""
    if not (path / "tokenizer_config.json").exists():
        raise InputError(f"{path}: no tokenizer; run the base_model stage first (dvc repro base_model)")
    return with_system_prompt(load_tokenizer(path), system_prompt)


def check_max_length(params: TokenizeParams, cost: TemplateCost, model_dir: Path = BASE_MODEL) -> None:
    """Before any work: a window must fit one exchange of the template and the model's positions."""
    smallest = cost.preamble + 2 * cost.per_message + 2  # one user word and one assistant word
    if params.max_length < smallest:
        raise ParamsError(
            f"tokenize.max_length: {params.max_length} is smaller than one exchange of {model_dir}'s chat "
            f"template ({smallest} tokens with one word per turn); expected a value well above it, e.g. 256"
        )
    card = model_dir / "model_card.json"
    positions = json.loads(card.read_text()).get("max_position_embeddings") if card.exists() else None
    if isinstance(positions, int) and params.max_length > positions:
        raise ParamsError(
            f"tokenize.max_length: {params.max_length} is more than the {positions} positions the base model "
            f"has (max_position_embeddings in {card}); expected at most {positions}"
        )


def window_features() -> Any:
    """The per-conversation output of the map: its windows as lists of lists, and its window counts."""
    from datasets import Features, List, Value

    counts = {name: Value("int64") for name in STAT_FIELDS}
    return Features({"input_ids": List(List(Value("int32"))), "labels": List(List(Value("int64"))), **counts})


def example_features() -> Any:
    """One row per window; the types `Dataset.from_list` gave these columns before (input_ids int32, mask int8)."""
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int64")),
            "attention_mask": List(Value("int8")),
            "length": Value("int64"),
        }
    )


STAT_FIELDS = ("conversations",) + tuple(field.name for field in fields(WindowStats))


def window_rows(
    lines: list[str],
    indices: list[int],
    tokenizer: Any,
    cost: TemplateCost,
    params: TokenizeParams,
    path: str,
    swap: bool,
) -> dict[str, list]:
    """datasets.map function: JSONL lines of one split -> each conversation's windows and counts."""
    conversations, special = [], []
    for line, index in zip(lines, indices):
        if line.strip():
            where = f"{path}:{index + 1}"
            conversation = validate_conversation(parse_json_line(line, where), where)
            conversations.append(role_swapped(conversation) if swap else conversation)
            special.append(has_special_text(tokenizer, [m["content"] for m in conversation["messages"]]))
    stats = [WindowStats(special_token_text=int(flag)) for flag in special]
    kept = [k for k, flag in enumerate(special) if not (flag and params.special_token_text == "drop")]
    out: dict[str, list] = {"input_ids": [], "labels": [], **{name: [] for name in STAT_FIELDS}}
    batch = windows_batch(
        tokenizer,
        [conversations[k]["messages"] for k in kept],
        params.max_length,
        params.loss_on,
        cost,
        [stats[k] for k in kept],
    )
    windows_of = dict(zip(kept, batch))
    results = iter((windows_of.get(k, []), own) for k, own in enumerate(stats))
    for line in lines:
        examples, own = next(results) if line.strip() else ([], WindowStats())
        out["input_ids"].append([e.input_ids for e in examples])
        out["labels"].append([e.labels for e in examples])
        out["conversations"].append(int(bool(line.strip())))
        for field in fields(WindowStats):
            out[field.name].append(getattr(own, field.name))
    return out


def first_lines(lines: Any, conversations: int | None) -> Any:
    """The rows of a text dataset up to and including its `conversations`-th non-blank line."""
    if conversations is None:
        return lines
    seen = 0
    for row, text in enumerate(lines["text"]):
        seen += bool(text.strip())
        if seen == conversations:
            return lines.select(range(row + 1))
    return lines


def record_batches(dataset: Any) -> Iterator[Any]:
    """The dataset's Arrow record batches read from its cache files with plain reads, not through a memory map:
    pages of a map count as the process's resident memory until the kernel needs them back."""
    import pyarrow as pa

    if not dataset.cache_files:
        for table in dataset.with_format("arrow").iter(batch_size=1000):
            yield from table.combine_chunks().to_batches()
        return
    for cache in dataset.cache_files:
        with pa.OSFile(cache["filename"]) as source:
            yield from pa.ipc.open_stream(source)


def flatten(per_conversation: Any, totals: dict[str, int]) -> Iterator[Any]:
    """Each window of each conversation as one row: Arrow's own list flattening, no Python ints. Adds the rows'
    tokens and trained tokens to `totals` on the way."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    for batch in record_batches(per_conversation):
        ids = pc.list_flatten(batch.column("input_ids"))
        labels = pc.list_flatten(batch.column("labels"))
        ones = pa.array(np.ones(ids.offsets[-1].as_py() - ids.offsets[0].as_py(), dtype=np.int8))
        lengths = pc.list_value_length(ids).cast(pa.int64())
        totals["tokens"] += int(pc.sum(lengths).as_py() or 0)
        totals["trained"] += int(pc.sum(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)).as_py() or 0)
        yield pa.table(
            {
                "input_ids": ids,
                "labels": labels,
                "attention_mask": pa.ListArray.from_arrays(
                    pa.array(np.asarray(ids.offsets) - ids.offsets[0].as_py(), pa.int32()), ones
                ),
                "length": lengths,
            }
        )


class AlignedWriter:
    """Writes record batches of exactly `rows` rows (the last one shorter), as `save_to_disk` slices a table
    built in memory. Arrow records a slice's buffer with its length padded to 8 bytes when the array goes on
    past it, and exactly at the array's end: so every batch but the last is written while more rows wait
    behind it in the same array, and the files are byte-identical to those of `Dataset.from_list`."""

    def __init__(self, writer: Any, rows: int = 1000) -> None:
        self.writer, self.rows, self.pending = writer, rows, []

    def _flush(self, final: bool) -> None:
        import pyarrow as pa

        waiting = sum(t.num_rows for t in self.pending)
        ready = waiting if final else (waiting - 1) // self.rows * self.rows  # at least one row stays behind
        if not ready:
            return
        joined = pa.concat_tables(self.pending).combine_chunks()
        for start in range(0, ready, self.rows):
            self.writer.write_table(joined.slice(start, min(self.rows, ready - start)))
        self.pending = [joined.slice(ready)]

    def write(self, table: Any) -> None:
        self.pending.append(table)
        if sum(t.num_rows for t in self.pending) > self.rows:
            self._flush(final=False)

    def close(self) -> None:
        if self.pending:
            self._flush(final=True)
        self.writer.finalize()


def tokenize_split(
    lines: Any,
    tokenizer: Any,
    cost: TemplateCost,
    params: TokenizeParams,
    path: str,
    name: str,
    swaps: tuple[bool, ...],
    cache: Path,
    fingerprint: str,
) -> tuple[Any, dict]:
    """Tokenize a split's JSONL lines with datasets.map over all cores, streamed to Arrow on disk."""
    import datasets
    import pyarrow.compute as pc
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import MemoryMappedTable

    totals = {name: 0 for name in STAT_FIELDS + ("tokens", "trained")}
    target = cache / f"{name}.arrow"
    with ArrowWriter(features=example_features(), path=str(target), writer_batch_size=SAVE_BATCH_ROWS) as arrow_writer:
        writer = AlignedWriter(arrow_writer, SAVE_BATCH_ROWS)
        for swap in swaps:
            per_conversation = lines.map(
                window_rows,
                batched=True,
                batch_size=BATCH_CONVERSATIONS,
                with_indices=True,
                input_columns="text",
                remove_columns=["text"],
                features=window_features(),
                num_proc=map_workers(len(lines), BATCH_CONVERSATIONS),
                fn_kwargs={"tokenizer": tokenizer, "cost": cost, "params": params, "path": path, "swap": swap},
                cache_file_name=str(cache / f"{name}-{swap}.arrow"),
                load_from_cache_file=False,
                new_fingerprint=f"{fingerprint}-{name}-{swap}",
                desc=f"tokenize {name}{' (role-swapped)' if swap else ''}",
            )
            for field in STAT_FIELDS:
                totals[field] += int(pc.sum(per_conversation.data.column(field)).as_py() or 0)
            for table in flatten(per_conversation, totals):
                writer.write(table)
            for cache_file in per_conversation.cache_files:  # its windows are in `target` now
                Path(cache_file["filename"]).unlink()
        writer.close()
    table = MemoryMappedTable.from_file(str(target))
    tokens, trained = totals["tokens"], totals["trained"]
    dataset = datasets.Dataset(
        table,
        info=datasets.DatasetInfo(features=example_features()),
        fingerprint=hashlib.sha256(f"{fingerprint} {name}".encode()).hexdigest()[:16],
    )
    report = {
        "conversations": totals["conversations"],
        "examples": table.num_rows,
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_fraction": round(trained / tokens, 4) if tokens else 0.0,
        "mean_length": round(tokens / table.num_rows, 2) if table.num_rows else 0.0,
        "conversations_split_into_windows": totals["conversations_split"],
        "dropped_turns_too_long": totals["turns_too_long"],
        "dropped_turns_without_context": totals["turns_without_context"],
        "dropped_rows_without_trained_tokens": totals["rows_without_trained_tokens"],
        # DESIGN §4.13: content holding special-token strings, trained as plain text or dropped
        # (tokenize.special_token_text)
        "conversations_with_special_token_text": totals["special_token_text"],
    }
    return dataset, report


def save_workers(dataset: Any) -> int | None:
    """`save_to_disk` writes shards of 500 MB. Once there are several, they are written by worker processes, each
    mapping only its own shard: read in this process, every page of the output would stay counted as resident."""
    from datasets import config
    from datasets.utils.py_utils import convert_file_size_to_int

    shards = max(split.data.nbytes for split in dataset.values()) // convert_file_size_to_int(config.MAX_SHARD_SIZE) + 1
    return min(os.cpu_count() or 1, shards) if shards > 1 else None


def data_fingerprint(params: TokenizeParams, tokenizer: Any, inputs: list[Path]) -> str:
    """A datasets fingerprint from what the output depends on (train.py keys resumable checkpoints on it)."""
    digest = hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode() + str(tokenizer.chat_template).encode())
    for path in inputs:
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def build(params: TokenizeParams, tokenizer_dir: Path, cache: Path) -> tuple[Any, dict]:
    """Tokenize train and val; the tokenizer with the system-prompt choice is saved in `tokenizer_dir`."""
    import datasets

    tokenizer = base_tokenizer(params.system_prompt)  # fails early, with a clear message, if the base model is missing
    cost = TemplateCost.measure(tokenizer)
    check_max_length(params, cost)
    tokenizer.save_pretrained(tokenizer_dir)
    paths = {name: PROCESSED / f"{name}.jsonl" for name in ("train", "val")}
    for path in paths.values():
        if not path.exists():
            raise InputError(f"{path}: not found; run the stage that writes it first (dvc repro)")
    fingerprint = data_fingerprint(params, tokenizer, list(paths.values()))
    splits = {}
    report = {
        "max_length": params.max_length,
        "loss_on": params.loss_on,
        "role_swap": params.role_swap,
        "system_prompt": params.system_prompt,
    }
    for name, path in paths.items():
        lines = lines_dataset(path, cache)
        if name == "val":
            lines = first_lines(lines, params.max_val_examples)  # the split is already shuffled by the seed
        swaps = (False, True) if name == "train" and params.role_swap else (False,)
        splits[name], report[name] = tokenize_split(
            lines, tokenizer, cost, params, str(path), name, swaps, cache, fingerprint
        )
        if name == "train" and not report[name]["examples"]:
            raise InputError(
                f"tokenize: no training example fits max_length={params.max_length}; raise tokenize.max_length"
            )
    return datasets.DatasetDict(splits), report


def show(index: int) -> int:
    """Print one tokenized training example; trained tokens are wrapped in [[ ]]."""
    import datasets
    from transformers import AutoTokenizer

    if not (OUTPUT / "dataset_dict.json").exists():
        raise InputError(f"{OUTPUT}: no tokenized data; run the tokenize stage first (dvc repro tokenize)")
    tokenizer = AutoTokenizer.from_pretrained(OUTPUT / "tokenizer")
    dataset = datasets.load_from_disk(str(OUTPUT))["train"]
    if not 0 <= index < len(dataset):
        raise InputError(f"--show {index}: out of range; the train split has examples 0 to {len(dataset) - 1}")
    row = dataset[index]
    pieces, trained = [], False
    for token_id, label in zip(row["input_ids"], row["labels"]):
        now = label != IGNORE_INDEX
        if now != trained:
            pieces.append("[[" if now else "]]")
            trained = now
        pieces.append(tokenizer.decode([token_id]))
    pieces.append("]]" if trained else "")
    n_trained = sum(label != IGNORE_INDEX for label in row["labels"])
    print(
        f"train example {index} of {len(dataset)}: {len(row['input_ids'])} tokens, {n_trained} trained (inside [[ ]])\n"
    )
    print("".join(pieces))
    return 0


def main() -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--show", type=int, metavar="N", help="print train example N with trained tokens marked, then exit"
    )
    args = parser.parse_args()
    if args.show is not None:
        return show(args.show)
    params = load_params()
    # The dataset and its report are published together, or neither (docs/DESIGN.md §9).
    with publish_together(files=[TOKEN_METRICS], dirs=[OUTPUT]) as outputs:
        staged = outputs[OUTPUT]
        with tempfile.TemporaryDirectory(dir=staged.parent) as cache:
            dataset, report = build(params.tokenize, staged / "tokenizer", Path(cache))
            dataset.save_to_disk(str(staged), num_proc=save_workers(dataset))
        outputs.write_json(TOKEN_METRICS, report)
    train = report["train"]
    print(
        f"tokenize: train {train['examples']} examples ({train['trained_tokens']} trained of {train['tokens']} tokens, "
        f"{train['conversations_split_into_windows']} conversations windowed, "
        f"{train['dropped_turns_too_long']} turns too long), "
        f"val {report['val']['examples']} examples -> {OUTPUT}"
    )
    return 0


if __name__ == "__main__":
    run(main)
