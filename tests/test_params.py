import pytest
import yaml

from conftest import REPO, run_stage, write_params
from stages.lib.params import ParamsError, load_params, parse_params
from tiny import save_tiny


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "chitchat"
    assert params.seed >= 0


def test_unknown_key_is_rejected_with_its_path():
    raw = repo_params()
    raw["preprocess"]["min_turn"] = 3
    with pytest.raises(ParamsError, match=r"preprocess\.min_turn: unknown key"):
        parse_params(raw)


def test_unknown_section_is_rejected():
    raw = repo_params()
    raw["trian"] = {"learning_rate": 1e-4}
    with pytest.raises(ParamsError, match=r"trian: unknown key"):
        parse_params(raw)


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("preprocess", "min_turns", "two", r"preprocess\.min_turns: .*integer.*'two'"),
        ("preprocess", "min_turns", 0, r"preprocess\.min_turns: .*greater than or equal to 1"),
        ("preprocess", "split_by", "topic", r"preprocess\.split_by: .*'random'.*'topic'"),
        ("data", "format", "xml", r"data\.format: .*'auto'"),
        ("preprocess", "val_fraction", 0.6, r"preprocess: val_fraction \+ test_fraction must be < 1"),
        ("train", "learning_rate", -1e-4, r"train\.learning_rate: .*greater than 0.*-0\.0001"),
        ("train", "batch_size", 0, r"train\.batch_size: .*greater than or equal to 1.*got 0"),
        ("train", "batch_size", 2.5, r"train\.batch_size: .*integer.*2\.5"),
        ("train", "save_steps", 7, r"train: save_steps \(7\) must be a multiple of logging_steps \(5\)"),
        ("tokenize", "loss_on", "everything", r"tokenize\.loss_on: .*'assistant'.*'all'"),
        ("evaluate", "top_p", 1.5, r"evaluate\.top_p: .*less than or equal to 1"),
    ],
)
def test_bad_values_name_key_value_and_expectation(section, key, value, expected):
    raw = repo_params()
    raw[section][key] = value
    if key == "val_fraction":
        raw[section]["test_fraction"] = 0.5
    with pytest.raises(ParamsError, match=expected):
        parse_params(raw)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(listing)


def stage_error(result) -> str:
    """The one-line error of a stage that rejected its input: exit 1, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_unknown_model_base_names_the_key(workdir):
    write_params(workdir, {"model": {"base": "no-such-org/no-such-model"}})
    message = stage_error(run_stage("base_model", workdir))
    assert "model.base 'no-such-org/no-such-model'" in message and "bundled" in message
    assert not (workdir / "models" / "base").exists()


def test_missing_data_source_names_the_key_and_path(workdir):
    write_params(workdir, {"data": {"source": "data/external/missing.jsonl"}})
    message = stage_error(run_stage("ingest", workdir))
    assert "data.source" in message and "data/external/missing.jsonl" in message
    assert not (workdir / "data" / "raw").exists()


def test_max_length_below_one_template_turn_is_rejected_before_work(workdir):
    save_tiny(workdir / "models" / "base", "llama")
    write_params(workdir, {"tokenize": {"max_length": 16}, "evaluate": {"max_new_tokens": 4}})
    message = stage_error(run_stage("tokenize", workdir))
    assert "tokenize.max_length: 16 is smaller than one exchange" in message
    assert not (workdir / "data" / "tokenized").exists()  # rejected before reading data or writing anything


def test_generation_budget_must_leave_room_for_the_prompt():
    raw = repo_params()
    raw["evaluate"]["max_new_tokens"] = raw["tokenize"]["max_length"]
    with pytest.raises(ParamsError, match=r"evaluate\.max_new_tokens \(256\) must be below half of tokenize\.max_length \(256\)"):
        parse_params(raw)


def test_every_key_lives_in_params_yaml_and_deleting_one_is_an_error():
    raw = repo_params()
    del raw["train"]["learning_rate"]
    with pytest.raises(ParamsError, match=r"train\.learning_rate: missing"):
        parse_params(raw)
    from stages.lib.params import Params

    def defaults(model) -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            if not field.is_required():
                found.append(f"{model.__name__}.{name}")
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Params.__mro__[1]):
                found += defaults(annotation)
        return found

    assert defaults(Params) == []  # values live in params.yaml only; the schema holds types and ranges
