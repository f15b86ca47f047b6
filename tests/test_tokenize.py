"""tokenize streams windows to Arrow; the saved files must be byte-identical to `Dataset.from_list`'s."""

import random

import datasets
import pyarrow as pa
import pytest

from stages.tokenize import SAVE_BATCH_ROWS, AlignedWriter, example_features


def rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(1, 40)
        ids = [rng.randrange(50000) for _ in range(n)]
        out.append(
            {
                "input_ids": ids,
                "labels": [i if rng.random() < 0.5 else -100 for i in ids],
                "attention_mask": [1] * n,
                "length": n,
            }
        )
    return out


@pytest.mark.parametrize("count", [2 * SAVE_BATCH_ROWS + 357, 2 * SAVE_BATCH_ROWS, 5])
def test_streamed_arrow_is_byte_identical_to_from_list(tmp_path, count):
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import MemoryMappedTable

    data = rows(count)
    datasets.Dataset.from_list(data).save_to_disk(str(tmp_path / "list"))
    path = tmp_path / "streamed.arrow"
    with ArrowWriter(features=example_features(), path=str(path)) as arrow_writer:
        writer = AlignedWriter(arrow_writer, SAVE_BATCH_ROWS)
        for start in range(0, len(data), 333):  # pieces that do not line up with the record batches
            chunk = data[start : start + 333]
            writer.write(pa.Table.from_pylist(chunk, schema=example_features().arrow_schema))
        writer.close()
    streamed = datasets.Dataset(
        MemoryMappedTable.from_file(str(path)), info=datasets.DatasetInfo(features=example_features())
    )
    streamed.save_to_disk(str(tmp_path / "streamed"))
    for name in ("data-00000-of-00001.arrow", "dataset_info.json"):
        assert (tmp_path / "list" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name


def test_max_length_above_the_models_positions_is_rejected_before_work(tmp_path):
    """It used to pass until train died with an IndexError inside the embedding."""
    import json

    from conftest import REPO
    from stages.lib.labels import TemplateCost
    from stages.lib.params import ParamsError, load_params
    from stages.tokenize import check_max_length

    (tmp_path / "model_card.json").write_text(json.dumps({"max_position_embeddings": 512}))
    params = load_params(REPO / "params.yaml").tokenize
    cost = TemplateCost(preamble=3, per_message=5)
    check_max_length(params.model_copy(update={"max_length": 512}), cost, tmp_path)
    with pytest.raises(
        ParamsError,
        match=r"tokenize\.max_length: 513 is more than the 512 positions the base model has "
        r"\(max_position_embeddings in .*model_card\.json\); expected at most 512",
    ):
        check_max_length(params.model_copy(update={"max_length": 513}), cost, tmp_path)


def test_outputs_past_one_shard_are_saved_by_worker_processes(monkeypatch):
    """At 100x the saved splits span many 500 MB shards; read in the stage's own process through a memory
    map, every page of them stayed counted as resident (8 GB). Past one shard, save_to_disk's workers write them."""
    from datasets import config

    from stages.tokenize import save_workers

    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows(300)), "val": datasets.Dataset.from_list(rows(3))}
    )
    assert save_workers(splits) is None
    monkeypatch.setattr(config, "MAX_SHARD_SIZE", "1KB")
    assert save_workers(splits) is not None and save_workers(splits) >= 1
