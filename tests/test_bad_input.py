"""Bad model directories and chat arguments: one `error:` line, exit 1, and the previous outputs untouched."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import REPO, run_stage, write_params
from stage_server import run_forked
from test_chat import chat_dir  # noqa: F401  (a work directory whose models/base came from a good tiny Llama)
from test_params import stage_error
from tiny import save_tiny, tiny_model, train_tokenizer


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def drop_tokenizer(directory: Path) -> None:
    for file in directory.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            file.unlink()


def truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def garble_weights(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"\xff" * 4096)


def cut_config(directory: Path) -> None:
    text = (directory / "config.json").read_text()
    (directory / "config.json").write_text(text[: len(text) // 2])


def drop_a_layer(directory: Path) -> None:
    """Weights for one layer fewer than config.json describes (transformers would initialise it randomly)."""
    weights = load_file(directory / "model.safetensors")
    last = json.loads((directory / "config.json").read_text())["num_hidden_layers"] - 1
    save_file(
        {k: v for k, v in weights.items() if f"layers.{last}." not in k},
        directory / "model.safetensors",
        metadata={"format": "pt"},
    )


@pytest.mark.parametrize(
    "case,expected",
    [
        (drop_tokenizer, r"directory has no tokenizer \(none of tokenizer.json"),
        (truncate_weights, r"safetensors weights are corrupted or truncated \(.*incomplete metadata"),
        (garble_weights, r"safetensors weights are corrupted or truncated"),
        (cut_config, r"config\.json:\d+:\d+: not valid JSON"),
        (
            lambda d: edit_config(d, hidden_size=64, intermediate_size=128),
            r"config\.json does not match the weights: .* is \[\d+, 32\] in the safetensors but \[\d+, 64\]",
        ),
        (
            lambda d: edit_config(d, vocab_size=300),
            r"config\.json does not match the weights: model\.embed_tokens\.weight",
        ),
        (drop_a_layer, r"the weights lack \d+ tensors that config\.json describes \(first: model\.layers\.1\."),
        (lambda d: edit_config(d, model_type=None), r"config\.json: expected a transformers config .*model_type"),
        (lambda d: edit_config(d, model_type="llamaa"), r"cannot load the model: .*model type `llamaa`"),
    ],
    ids=[
        "no-tokenizer",
        "truncated-safetensors",
        "garbage-safetensors",
        "invalid-config-json",
        "config-hidden-size",
        "config-vocab-size",
        "missing-tensors",
        "no-model-type",
        "unknown-model-type",
    ],
)
def test_broken_model_directory_is_one_line_and_keeps_models_base(chat_dir, tmp_path, case, expected):
    import re

    broken = tmp_path / "broken"
    shutil.copytree(chat_dir / "tiny-model", broken)
    case(broken)
    before = snapshot(chat_dir / "models" / "base")
    write_params(chat_dir, {"model": {"base": str(broken)}})
    message = stage_error(run_stage("base_model", chat_dir))
    assert re.search(expected, message), message
    assert snapshot(chat_dir / "models" / "base") == before
    assert sorted(p.name for p in (chat_dir / "models").iterdir()) == ["base"]  # no staging directory left behind


def test_tokenizer_much_smaller_than_the_embeddings_is_refused(chat_dir, tmp_path):
    """A tokenizer that does not belong to the weights (here 4x smaller) would leave most embeddings unused."""
    tokenizer = train_tokenizer("chatml")
    other = tmp_path / "other"
    tiny_model("llama", 4 * len(tokenizer)).save_pretrained(other, safe_serialization=True)
    tokenizer.save_pretrained(other)
    write_params(chat_dir, {"model": {"base": str(other)}})
    message = stage_error(run_stage("base_model", chat_dir))
    assert (
        f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {4 * len(tokenizer)} rows"
        in message
    )


def test_gpt2_directory_without_tokenizer_is_refused_not_given_an_empty_one(chat_dir, tmp_path):
    """transformers builds an empty GPT-2 tokenizer here; base_model used to resize the embeddings to 2 rows."""
    directory = save_tiny(tmp_path / "gpt2", "gpt2")
    drop_tokenizer(directory)
    write_params(chat_dir, {"model": {"base": str(directory)}})
    assert "directory has no tokenizer" in stage_error(run_stage("base_model", chat_dir))


def chat(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return run_forked("stages.tools.chat", work, args, env, timeout=300)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens 0: expected at least 1"),
        (["--max-new-tokens", "-5"], "--max-new-tokens -5: expected at least 1"),
        (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
        (["--temperature", "-0.5"], "--temperature -0.5: expected 0 (greedy) or more"),
        (["--top-p", "0"], "--top-p 0.0: expected a value in (0, 1]"),
        (["--top-p", "1.5"], "--top-p 1.5: expected a value in (0, 1]"),
        (["--context-tokens", "5", "--max-new-tokens", "128"], "--context-tokens 5: must exceed --max-new-tokens 128"),
        (["--prompts", "missing.jsonl"], "--prompts missing.jsonl: no such file"),
        (["--prompt", "hi", "--prompts", "missing.jsonl"], "--prompt and --prompts: give one of them"),
        (["--model", "no-such-dir"], "--model no-such-dir: expected base, finetuned or export, or a model directory"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_chat_arguments_out_of_range_are_rejected(args, expected, monkeypatch):
    from stages.lib.errors import InputError
    from stages.tools.chat import parse_args

    monkeypatch.chdir(REPO)  # the defaults not given come from params.yaml
    with pytest.raises(InputError) as caught:
        parse_args(args)
    assert str(caught.value).startswith(expected)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model", "base", "--top-p", "1.5"], "error: --top-p 1.5: expected a value in (0, 1]"),
        (["--model", "finetuned"], "error: models/finetuned: no model; run the pipeline first (dvc repro)"),
    ],
)
def test_chat_bad_arguments_exit_with_one_line(chat_dir, args, expected):
    assert stage_error(chat(chat_dir, "--prompt", "hi", *args)) == expected


def test_chat_context_too_small_for_the_prompt_is_one_line(chat_dir):
    message = stage_error(
        chat(
            chat_dir,
            "--model",
            "base",
            "--prompt",
            "tell me about colors " * 5,
            "--context-tokens",
            "20",
            "--max-new-tokens",
            "16",
        )
    )
    assert "--context-tokens 20 minus --max-new-tokens 16:" in message


def test_tokenizer_larger_than_the_embeddings_is_refused():
    """Token ids past the embedding rows would crash training with an IndexError."""
    from stages.lib.errors import InputError
    from stages.lib.modeling import check_vocabulary

    tokenizer = train_tokenizer("chatml")
    with pytest.raises(
        InputError,
        match=rf"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {len(tokenizer) - 8} rows",
    ):
        check_vocabulary(tiny_model("llama", len(tokenizer) - 8), tokenizer, "model.base 'x'")
    check_vocabulary(
        tiny_model("llama", len(tokenizer) + 8), tokenizer, "model.base 'x'"
    )  # padded embeddings are common


def test_stage_arguments_that_argparse_rejects_are_one_line(workdir):
    from conftest import run_stage

    for stage, args in (("tokenize", ("--show", "abc")), ("score", ("--model", "nope"))):
        result = run_stage(stage, workdir, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (stage, result.stderr)
