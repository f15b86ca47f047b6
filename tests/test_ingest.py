import json

import pandas as pd
import pytest

from conftest import FIXTURES, REPO, run_stage, write_params
from stages.ingest import OUTPUT, from_chitchat, ingest, load_source
from stages.lib.conversations import InputError, read_conversations
from stages.lib.params import DataParams, RowColumns, load_params


def data_params(source, **kwargs) -> DataParams:
    """The repository's data section (every key is required), with `source` and `kwargs` replaced."""
    defaults = load_params(REPO / "params.yaml").data.model_dump()
    return DataParams(**{**defaults, "source": str(source), **kwargs})


def load(params: DataParams) -> list:
    return list(load_source(params))


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_openai_jsonl(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [
            {
                "id": "a",
                "messages": [
                    {"role": "system", "content": "be nice"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                ],
                "meta": {"topic": "greet"},
            },
            {"messages": [{"role": "human", "content": "x"}, {"role": "gpt", "content": "y"}]},
        ],
    )
    a, b = load(data_params(path))
    assert a == {
        "id": "a",
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        "meta": {"topic": "greet", "source": "c.jsonl"},
    }
    assert b["id"] == "conv-000001" and [m["role"] for m in b["messages"]] == ["user", "assistant"]


def test_sharegpt_json_list(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": "s1",
                    "conversations": [
                        {"from": "system", "value": "sys"},
                        {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"},
                    ],
                }
            ]
        )
    )
    (conv,) = load(data_params(path))
    assert conv["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_rows_csv_with_order_and_custom_columns(tmp_path):
    path = tmp_path / "rows.csv"
    pd.DataFrame(
        {
            "cid": ["c1", "c1", "c2", "c1", "c2"],
            "who": ["assistant", "user", "user", "user", "assistant"],
            "msg": ["second", "first", "only q", "third", "only a"],
            "n": [2, 1, 1, 3, 2],
            "t": ["x", "x", "y", "x", "y"],
        }
    ).to_csv(path, index=False)
    columns = RowColumns(conversation_id="cid", speaker="who", text="msg", order="n", topic="t")
    c1, c2 = load(data_params(path, columns=columns))
    assert [m["content"] for m in c1["messages"]] == ["first", "second", "third"]
    assert c1["meta"]["topic"] == "x" and c2["id"] == "c2"


def test_rows_parquet_keeps_file_order_without_order_column(tmp_path):
    path = tmp_path / "rows.parquet"
    pd.DataFrame({"conversation_id": [7, 7], "speaker": ["user", "assistant"], "text": ["q", "a"]}).to_parquet(path)
    (conv,) = load(data_params(path))
    assert conv["id"] == "7" and [m["role"] for m in conv["messages"]] == ["user", "assistant"]


def test_chitchat_shape_maps_first_sender_to_user_and_joins_utterances(tmp_path):
    data = {
        "c": {
            "prompt": "Pets?",
            "messages": [
                [{"text": "hi", "sender": "A", "timestamp": "t"}, {"text": "there", "sender": "A", "timestamp": "t"}],
                [{"text": "hello", "sender": "B", "timestamp": "t"}],
                [{"text": "bye", "sender": "A", "timestamp": "t"}],
            ],
        }
    }
    (conv,) = list(from_chitchat(data, "x.json", "chitchat"))
    assert conv["messages"] == [
        {"role": "user", "content": "hi\nthere"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    assert conv["meta"] == {"topic": "Pets?", "source": "chitchat"}


def test_bundled_chitchat_loads_every_conversation():
    conversations = load(data_params("chitchat"))
    assert len(conversations) == 7168
    assert all(m["role"] in ("user", "assistant") for c in conversations[:200] for m in c["messages"])


def test_a_source_file_names_the_bundled_dataset_and_is_what_dvc_hashes(tmp_path):
    """params.yaml's default data.source is data/chitchat.source: a file DVC can depend on, naming the bundled set."""
    assert load_params(REPO / "params.yaml").data.source == "data/chitchat.source"
    named = load(data_params(REPO / "data" / "chitchat.source", max_conversations=50))
    assert [c["id"] for c in named] == [c["id"] for c in load(data_params("chitchat", max_conversations=50))][
        : len(named)
    ]
    assert named[0]["meta"]["source"] == "chitchat"
    from stages.lib.conversations import dataset_name

    assert dataset_name(str(REPO / "data" / "chitchat.source")) == "chitchat"  # what the export's model card names
    assert dataset_name("data/external/chats.jsonl") == "data/external/chats.jsonl"
    empty = tmp_path / "empty.source"
    empty.write_text("# nothing named\n")
    with pytest.raises(InputError, match=r"empty\.source: names no dataset"):
        load(data_params(empty))


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"messages": []}\n{"messages": [oops\n', r"c\.jsonl:2: malformed JSON"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}\n', r"c\.jsonl:1 messages\[0\]: unknown role 'wizard'"),
        ('{"messages": [{"content": "x"}]}\n', r"c\.jsonl:1 messages\[0\]: missing required field 'role'"),
        ('{"text": "x"}\n', r"unrecognised record shape.*expected one of the shapes in README\.md"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, expected):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=expected):
        load(data_params(path))


def test_not_utf8_names_byte_offset(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"messages": [{"role": "user", "content": "caf'.encode() + b"\xe9" + b'"}]}\n')
    with pytest.raises(InputError, match=r"latin\.jsonl:1: not valid UTF-8 at byte offset 46"):
        load(data_params(path))
    csv = tmp_path / "latin.csv"
    csv.write_bytes(b"conversation_id,speaker,text\n1,user,caf\xe9\n")
    with pytest.raises(InputError, match=r"latin\.csv: not valid UTF-8 at byte offset 39"):
        load(data_params(csv))


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("conversation_id,speaker,body\n1,user,hi\n")
    with pytest.raises(InputError, match=r"rows\.csv:2: missing required column 'text'"):
        load(data_params(path, format="rows"))


def test_unknown_speaker_in_rows_is_named(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("conversation_id,speaker,text\n1,user,hi\n1,narrator,once upon\n")
    with pytest.raises(InputError, match=r"rows\.csv:3: unknown role 'narrator'"):
        load(data_params(path))


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("empty.jsonl", "", "the file is empty"),
        ("notes.txt", "hello", "unsupported extension '.txt'"),
    ],
)
def test_empty_file_and_bad_extension(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=expected):
        load(data_params(path))


def test_missing_path_and_offline_hub_fail_fast(tmp_path):
    with pytest.raises(InputError, match="file does not exist"):
        load(data_params(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="hub dataset id"):
        load(data_params("someone/some-dataset"))


def test_zero_usable_conversations(tmp_path):
    path = write_lines(tmp_path / "blank.jsonl", [{"messages": [{"role": "user", "content": "  "}]}])
    with pytest.raises(InputError, match="zero usable conversations"):
        ingest(data_params(path), tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_writes_canonical_output(workdir):
    source = workdir / "data" / "external" / "chats.jsonl"
    source.write_text((FIXTURES / "conversations.jsonl").read_text())
    write_params(workdir, {"data": {"source": "data/external/chats.jsonl"}})
    result = run_stage("ingest", workdir)
    assert result.returncode == 0, result.stderr
    assert "ingest: 48 conversations" in result.stdout
    assert len(read_conversations(workdir / OUTPUT)) == 48


def test_cli_error_exits_nonzero_and_keeps_previous_output(workdir):
    previous = workdir / OUTPUT
    previous.parent.mkdir(parents=True)
    previous.write_text("previous\n")
    bad = workdir / "data" / "external" / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n{broken\n')
    write_params(workdir, {"data": {"source": "data/external/bad.jsonl"}})
    result = run_stage("ingest", workdir)
    assert result.returncode == 1
    assert "bad.jsonl:2: malformed JSON" in result.stderr and "Traceback" not in result.stderr
    assert previous.read_text() == "previous\n"
    assert [p.name for p in previous.parent.iterdir()] == ["conversations.jsonl"]


def test_cli_rejects_bad_params_before_work(workdir):
    write_params(workdir, {"data": {"sorce": "x"}})
    result = run_stage("ingest", workdir)
    assert result.returncode == 1 and "data.sorce: unknown key" in result.stderr
    assert not (workdir / OUTPUT).exists()


# Silent wrong results and tracebacks on unusual but valid-looking input.


def test_csv_order_column_sorts_as_numbers(tmp_path):
    path = tmp_path / "rows.csv"
    turns = list(range(1, 13))
    pd.DataFrame(
        {
            "conversation_id": ["c"] * len(turns),
            "speaker": ["user", "assistant"] * 6,
            "text": [f"turn {n}" for n in turns],
            "n": turns,
        }
    ).iloc[::-1].to_csv(path, index=False)
    columns = load_params(REPO / "params.yaml").data.columns.model_copy(update={"order": "n"})
    (conv,) = load(data_params(path, columns=columns))
    assert [m["content"] for m in conv["messages"]] == [f"turn {n}" for n in turns]  # not 1, 10, 11, 12, 2, ...


def test_jsonl_order_mixing_numbers_and_strings_does_not_crash(tmp_path):
    path = write_lines(
        tmp_path / "rows.jsonl",
        [
            {"conversation_id": "c", "speaker": "assistant", "text": "second", "n": "2"},
            {"conversation_id": "c", "speaker": "user", "text": "first", "n": 1},
            {"conversation_id": "c", "speaker": "user", "text": "tenth", "n": 10},
        ],
    )
    columns = load_params(REPO / "params.yaml").data.columns.model_copy(update={"order": "n"})
    (conv,) = load(data_params(path, columns=columns))
    assert [m["content"] for m in conv["messages"]] == ["first", "second", "tenth"]


@pytest.mark.parametrize(
    "record,expected",
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": {"x": 1}}]}]},
            r"c\.jsonl:1 messages\[0\] content\[0\]: 'text' must be a string, got dict",
        ),
        (
            {"id": {"a": 1}, "messages": [{"role": "user", "content": "hi"}]},
            r"c\.jsonl:1: 'id' must be a string or an integer, got dict",
        ),
        (
            {"id": ["x"], "messages": [{"role": "user", "content": "hi"}]},
            r"c\.jsonl:1: 'id' must be a string or an integer, got list",
        ),
    ],
)
def test_non_string_parts_and_object_ids_are_errors_not_repr(tmp_path, record, expected):
    path = write_lines(tmp_path / "c.jsonl", [record])
    with pytest.raises(InputError, match=expected):
        load(data_params(path))


@pytest.mark.parametrize("name", ["c.jsonl", "c.json"])
def test_utf8_byte_order_mark_is_accepted_for_json(tmp_path, name):
    record = {"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    text = json.dumps(record) + "\n" if name.endswith("l") else json.dumps([record])
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    (conv,) = load(data_params(path))
    assert conv["id"] == "a" and conv["messages"][1]["content"] == "hello"


def test_semicolon_csv_gets_a_separator_hint_not_a_columns_hint(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("conversation_id;speaker;text\n1;user;hi\n1;assistant;hello\n")
    with pytest.raises(InputError, match=r"rows\.csv:1: the header .* is semicolon-separated") as error:
        load(data_params(path))
    assert "data.columns" not in str(error.value)


def test_data_format_is_not_ignored_for_csv(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("conversation_id,speaker,text\n1,user,hi\n")
    with pytest.raises(InputError, match=r"data\.format: 'openai' does not apply to .*rows\.csv"):
        load(data_params(path, format="openai"))


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"messages": ' + "[" * 100000 + "]" * 100000 + "}\n", r"c\.jsonl:1: JSON nested too deeply"),
        (
            '{"messages": [{"role": "user", "content": "a\\uZZZZ"}]}\n',
            r"c\.jsonl:1: malformed JSON \(Invalid \\uXXXX escape",
        ),
        (
            '{"messages": [{"role": "user", "content": "a\\ud800"}]}\n',
            r"c\.jsonl:1 messages\[0\]: invalid Unicode escape \\ud800",
        ),
    ],
)
def test_deep_json_and_bad_unicode_escapes_are_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=expected) as error:
        load(data_params(path))
    assert "\n" not in str(error.value)
