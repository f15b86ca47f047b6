import pytest
import yaml

from conftest import REPO
from stages.params import ParamsError, load_params, parse_params


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
