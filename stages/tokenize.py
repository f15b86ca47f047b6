"""Stage `tokenize`: render the processed splits with the base model's chat template and label them.

Writes data/tokenized/ (a `datasets` DatasetDict with train and val: input_ids, labels, attention_mask,
length) and metrics/tokenize.json. `python -m stages.tokenize --show N` prints example N of the train
split with the trained tokens marked, so you can see exactly what the model learns.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages.lib.atomic import atomic_path, write_json
from stages.lib.cli import run
from stages.lib.conversations import Conversation, InputError, read_conversations
from stages.lib.labels import IGNORE_INDEX, TemplateCost, WindowStats, windows
from stages.lib.params import ParamsError, TokenizeParams, load_params
from stages.lib.paths import BASE_MODEL, PROCESSED, TOKENIZED as OUTPUT
from stages.lib.template import with_system_prompt
TOKEN_METRICS = Path("metrics/tokenize.json")
SWAP = {"user": "assistant", "assistant": "user", "system": "system"}


def role_swapped(conversation: Conversation) -> Conversation:
    """The same dialogue from the other speaker's side (DESIGN §3: both speakers are real humans)."""
    return {
        "id": conversation["id"] + "#swap",
        "messages": [{"role": SWAP[m["role"]], "content": m["content"]} for m in conversation["messages"]],
        "meta": conversation.get("meta", {}),
    }


def load_tokenizer(system_prompt: str, path: Path = BASE_MODEL) -> Any:
    """The base tokenizer with `tokenize.system_prompt` written into its chat template."""
    from transformers import AutoTokenizer

    if not (path / "tokenizer_config.json").exists():
        raise InputError(f"{path}: no tokenizer; run the base_model stage first (dvc repro base_model)")
    return with_system_prompt(AutoTokenizer.from_pretrained(path), system_prompt)


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str) -> None:
    from transformers import AutoTokenizer

    _WORKER["tokenizer"] = AutoTokenizer.from_pretrained(tokenizer_path)
    _WORKER["cost"] = TemplateCost.measure(_WORKER["tokenizer"])


def _tokenize_chunk(task: tuple[list[Conversation], TokenizeParams]) -> tuple[list[dict], WindowStats]:
    conversations, params = task
    stats = WindowStats()
    rows = []
    for conversation in conversations:
        for example in windows(_WORKER["tokenizer"], conversation["messages"], params.max_length, params.loss_on, _WORKER["cost"], stats):
            rows.append({"input_ids": example.input_ids, "labels": example.labels,
                         "attention_mask": [1] * len(example.input_ids), "length": len(example.input_ids)})
    return rows, stats


def tokenize_split(tokenizer_path: Path, conversations: list[Conversation], params: TokenizeParams, desc: str) -> tuple[list[dict], dict]:
    """Tokenize conversations in parallel chunks; rows come back in input order, so output is deterministic."""
    from concurrent.futures import ProcessPoolExecutor

    chunks = [(conversations[i : i + 64], params) for i in range(0, len(conversations), 64)]
    stats = WindowStats()
    rows: list[dict] = []
    workers = max(1, min(os.cpu_count() or 1, 8, len(chunks)))
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool, \
            tqdm(total=len(conversations), desc=f"tokenize {desc}", unit="conv", mininterval=2.0) as progress:
        for (chunk, _), (chunk_rows, chunk_stats) in zip(chunks, pool.map(_tokenize_chunk, chunks)):
            rows += chunk_rows
            for field in fields(WindowStats):
                setattr(stats, field.name, getattr(stats, field.name) + getattr(chunk_stats, field.name))
            progress.update(len(chunk))
    trained = sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in rows)
    tokens = sum(row["length"] for row in rows)
    report = {
        "conversations": len(conversations),
        "examples": len(rows),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_fraction": round(trained / tokens, 4) if tokens else 0.0,
        "mean_length": round(tokens / len(rows), 2) if rows else 0.0,
        "conversations_split_into_windows": stats.conversations_split,
        "dropped_turns_too_long": stats.turns_too_long,
        "dropped_turns_without_context": stats.turns_without_context,
        "dropped_rows_without_trained_tokens": stats.rows_without_trained_tokens,
    }
    return rows, report


def build(params: TokenizeParams, tokenizer_dir: Path) -> tuple[Any, dict]:
    """Tokenize train and val with the tokenizer saved in `tokenizer_dir` (the workers load it from there)."""
    import datasets

    tokenizer = load_tokenizer(params.system_prompt)  # fails early, with a clear message, if the base model is missing
    tokenizer.save_pretrained(tokenizer_dir)
    cost = TemplateCost.measure(tokenizer)
    smallest = cost.preamble + 2 * cost.per_message + 2  # one user word and one assistant word
    if params.max_length < smallest:
        raise ParamsError(f"tokenize.max_length: {params.max_length} is smaller than one exchange of {BASE_MODEL}'s chat "
                          f"template ({smallest} tokens with one word per turn); expected a value well above it, e.g. 256")
    train = read_conversations(PROCESSED / "train.jsonl")
    val = read_conversations(PROCESSED / "val.jsonl")
    if params.role_swap:
        train = train + [role_swapped(c) for c in train]
    if params.max_val_examples is not None:
        val = val[: params.max_val_examples]  # the split is already shuffled by the seed
    splits = {}
    report = {"max_length": params.max_length, "loss_on": params.loss_on, "role_swap": params.role_swap, "system_prompt": params.system_prompt}
    for name, conversations in (("train", train), ("val", val)):
        rows, report[name] = tokenize_split(tokenizer_dir, conversations, params, name)
        if name == "train" and not rows:
            raise InputError(f"tokenize: no training example fits max_length={params.max_length}; raise tokenize.max_length")
        splits[name] = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({k: [] for k in ("input_ids", "labels", "attention_mask", "length")})
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
    print(f"train example {index} of {len(dataset)}: {len(row['input_ids'])} tokens, {n_trained} trained (inside [[ ]])\n")
    print("".join(pieces))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", type=int, metavar="N", help="print train example N with trained tokens marked, then exit")
    args = parser.parse_args()
    if args.show is not None:
        return show(args.show)
    params = load_params()
    with atomic_path(OUTPUT, is_dir=True) as staged:
        staged.mkdir(exist_ok=True)
        dataset, report = build(params.tokenize, staged / "tokenizer")
        dataset.save_to_disk(str(staged))
    write_json(TOKEN_METRICS, report)
    train = report["train"]
    print(f"tokenize: train {train['examples']} examples ({train['trained_tokens']} trained of {train['tokens']} tokens, "
          f"{train['conversations_split_into_windows']} conversations windowed, {train['dropped_turns_too_long']} turns too long), "
          f"val {report['val']['examples']} examples -> {OUTPUT}")
    return 0


if __name__ == "__main__":
    run(main)
