"""Export: tiny Llama and GPT-2 written as GGUF, read back by transformers' GGUF loader and compared with the
model they came from; the Modelfile template, the model card, a LoRA merge, and bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FIXTURES, REPO, run_stage, write_params
from stage_server import run_forked
from stages.lib import model_card
from stages.lib.errors import TemplateError
from stages.lib.ollama import TurnFormat
from stages.lib.template import with_system_prompt
from tiny import save_tiny, tiny_model, train_tokenizer

ROUND_TRIP = {"conversations": 4, "prompts": 2, "max_new_tokens": 8, "batch_size": 8}
SMOLLM_LIKE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def workdir_params(export: dict | None = None) -> dict:
    return {
        "model": {"base": "tiny-model"},
        "tokenize": {"max_length": 128},
        "evaluate": {"max_new_tokens": 32},
        "export": {"round_trip": dict(ROUND_TRIP), **(export or {})},
    }


def make_workdir(root: Path, arch: str = "llama", export: dict | None = None) -> Path:
    """models/base from the base_model stage, copied as models/finetuned; the fixture chats as the test split."""
    save_tiny(root / "tiny-model", arch)
    write_params(root, workdir_params(export))
    result = run_stage("base_model", root)
    assert result.returncode == 0, result.stderr
    shutil.copytree(root / "models" / "base", root / "models" / "finetuned")
    (root / "data" / "processed").mkdir(parents=True)
    shutil.copy(FIXTURES / "conversations.jsonl", root / "data" / "processed" / "test.jsonl")
    return root


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def gguf_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    """Read back with transformers' own GGUF loader, as a user would (GPT-2's n_ctx quirk aside)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, gguf_file="model.gguf")
    if config.model_type == "gpt2":
        config.n_positions = config.n_ctx
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file="model.gguf", config=config, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def finetuned_logits(work: Path, ids: list[int]) -> torch.Tensor:
    from stages.lib.modeling import load_causal_lm

    model, _ = load_causal_lm(work / "models" / "finetuned")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.fixture(scope="module")
def llama_workdir(tmp_path_factory) -> Path:
    """make_workdir's tiny Llama, made once for the module: tests take a copy (`workdir_like`)."""
    return make_workdir(tmp_path_factory.mktemp("export-llama-template"))


def workdir_like(template: Path, target: Path, export: dict | None = None) -> Path:
    """A copy of `template` (a make_workdir of the same model) with `export` in its params."""
    shutil.copytree(template, target)
    write_params(target, workdir_params(export))
    return target


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, llama_workdir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    if request.param == "llama":
        work = workdir_like(llama_workdir, root / "work", {"precision": "f32"})
    else:
        work = make_workdir(root, request.param, {"precision": "f32"})
    result = run_stage("export", work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work


def test_one_parse_of_a_gguf_serves_its_tokenizer_and_weights_as_separate_parses_do(exported, monkeypatch):
    """base_model loads the bundled GGUF under `gguf_parsed_once`: transformers reads the file once instead of three
    times, and gets the tokenizer and weights it gets without it; gguf's own reader is back afterwards."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from stages.base_model import gguf_parsed_once

    path = exported / "models" / "export" / "model.gguf"

    def load() -> tuple[dict, dict]:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if config.model_type == "gpt2":  # GPT-2's n_ctx quirk, as in gguf_logits
            config.n_positions = config.n_ctx
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32
        )
        return tokenizer.get_vocab(), model.state_dict()

    parsed = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs) -> None:
            parsed.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    vocabulary, weights = load()
    assert len(parsed) == 3  # what the block saves: tokenizer, config, weights
    parsed.clear()
    with gguf_parsed_once(path):
        once_vocabulary, once_weights = load()
    assert parsed == [path] and gguf.GGUFReader is CountedReader
    assert once_vocabulary == vocabulary and set(once_weights) == set(weights)
    assert all(torch.equal(once_weights[name], weights[name]) for name in weights)


def test_gguf_reads_back_with_the_same_logits_and_tokenizer(exported):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    out = exported / "models" / "export"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "model.gguf"]
    finetuned = AutoTokenizer.from_pretrained(exported / "models" / "finetuned")
    loaded = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    text = finetuned.apply_chat_template(
        [{"role": "user", "content": "do you like blue skies, 42?"}], tokenize=False, add_generation_prompt=True
    )
    ids = finetuned(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.chat_template == finetuned.chat_template
    assert torch.allclose(gguf_logits(out, ids), finetuned_logits(exported, ids), atol=1e-4)
    reader = GGUFReader(out / "model.gguf")
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.ffn_down.weight" in names  # gguf's own names, not transformers'
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    eot = finetuned.convert_tokens_to_ids("<|im_end|>" if "<|im_end|>" in finetuned.get_vocab() else "<|endoftext|>")
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == eot
    metrics = json.loads((exported / "metrics" / "export.json").read_text())
    assert metrics["round_trip"]["passed"] and metrics["size_bytes"] == (out / "model.gguf").stat().st_size


def test_modelfile_names_the_file_template_and_stops(exported):
    text = (exported / "models" / "export" / "Modelfile").read_text()
    stops = json.loads((exported / "metrics" / "export.json").read_text())["stop"]
    assert text.startswith("FROM ./model.gguf\n") and 'TEMPLATE """' in text
    assert all(f"PARAMETER stop {json.dumps(s)}" in text for s in stops)
    from stages.lib.params import load_params

    decoding = load_params(exported / "params.yaml").evaluate
    lines = text.splitlines()
    expected = decoding.temperature if decoding.do_sample else 0  # the decoding that was evaluated
    assert f"PARAMETER temperature {expected}" in lines and f"PARAMETER top_p {decoding.top_p}" in lines


def test_chat_with_the_exported_file(exported):
    args = ("--model", "export", "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "4")
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": ""}
    result = run_forked("stages.tools.chat", exported, args, env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == 1


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_card_yaml_lineage_intervals_and_determinism(llama_workdir, tmp_path):
    work = workdir_like(llama_workdir, tmp_path / "work")
    (work / "metrics").mkdir()
    evaluation = {
        "base": {"perplexity": 60.0, "perplexity_ci_low": 55.0, "perplexity_ci_high": 65.0},
        "finetuned": {
            "scored_tokens": 120,
            "perplexity": 34.0,
            "perplexity_ci_low": 31.0,
            "perplexity_ci_high": 37.5,
            "chrf": {"value": 16.2, "ci_low": 15.0, "ci_high": 17.4},
        },
    }
    (work / "metrics" / "eval.json").write_text(json.dumps(evaluation))
    (work / "metrics" / "data.json").write_text(json.dumps({"output": {"conversations": 48}}))
    hashes = {"data/processed": "aa11.dir", "data/tokenized": "bb22.dir", "models/finetuned": "cc33.dir"}
    (work / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    name: {"cmd": "x", "outs": [{"path": path, "md5": md5}]}
                    for name, (path, md5) in zip(("preprocess", "tokenize", "train"), hashes.items())
                },
            }
        )
    )
    (work / "stages").mkdir()
    (work / "stages" / "code.py").write_text("x = 1\n")
    git(work, "init", "-q")
    git(work, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "code", "--allow-empty")
    git(work, "add", "stages")
    git(work, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "code")
    revision = git(work, "rev-parse", "HEAD")
    assert run_stage("export", work).returncode == 0
    card = (work / "models" / "export" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["pipeline_tag"] == "text-generation" and front["datasets"]
    scores = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"perplexity": 34.0, "chrf": 16.2}
    assert "| perplexity | 60 [55, 65] | 34 [31, 37.5] |" in card and "16.2 [15, 17.4]" in card
    assert all(md5 in card for md5 in hashes.values()) and revision in card
    (work / "NOTES.md").write_text("an unrelated commit\n")
    git(work, "add", "NOTES.md")
    git(work, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "docs")
    first = {p.name: p.read_bytes() for p in (work / "models" / "export").iterdir()}
    assert run_stage("export", work, fresh=True).returncode == 0  # another interpreter: another hash seed
    assert {p.name: p.read_bytes() for p in (work / "models" / "export").iterdir()} == first  # byte-identical


@pytest.mark.slow
def test_q8_0_perplexity_within_one_percent(llama_workdir, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    work = workdir_like(llama_workdir, tmp_path / "work", {"precision": "q8_0"})
    result = run_stage("export", work)
    assert result.returncode == 0, result.stderr[-3000:]
    checked = json.loads((work / "metrics" / "export.json").read_text())["round_trip"]
    assert abs(checked["gguf_perplexity"] / checked["finetuned_perplexity"] - 1) <= 0.01
    types = {t.tensor_type for t in GGUFReader(work / "models" / "export" / "model.gguf").tensors}
    assert GGMLQuantizationType.Q8_0 in types


@pytest.mark.slow
def test_lora_adapter_is_merged(llama_workdir, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = workdir_like(llama_workdir, tmp_path / "work", {"precision": "f32"})
    shutil.rmtree(work / "models" / "finetuned")
    base = AutoModelForCausalLM.from_pretrained(work / "models" / "base")
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # B starts at zero: without this the merge would change nothing
    peft.save_pretrained(work / "models" / "finetuned")
    AutoTokenizer.from_pretrained(work / "models" / "base").save_pretrained(work / "models" / "finetuned")
    (work / "models" / "finetuned" / "base_model.json").write_text(json.dumps({"base_model": "models/base"}))
    result = run_stage("export", work)
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.chdir(work)  # base_model.json names the base relative to the repository root
    ids = AutoTokenizer.from_pretrained(work / "models" / "base")("hello there", add_special_tokens=False)["input_ids"]
    exported = gguf_logits(work / "models" / "export", ids)
    assert torch.allclose(exported, finetuned_logits(work, ids), atol=1e-4)  # the adapter, applied
    plain = AutoModelForCausalLM.from_pretrained(
        work / "models" / "base"
    ).eval()  # get_peft_model changed `base` in place
    with torch.no_grad():
        assert not torch.allclose(exported, plain(torch.tensor([ids])).logits, atol=1e-2)


@pytest.fixture(scope="module")
def bad_workdir(llama_workdir, tmp_path_factory) -> Path:
    return workdir_like(llama_workdir, tmp_path_factory.mktemp("export-bad") / "work")


def copy_of(workdir: Path, target: Path, export: dict | None = None) -> Path:
    shutil.copytree(workdir, target)
    if export is not None:
        write_params(target, {"model": {"base": "tiny-model"}, "export": export})
    return target


def assert_nothing_exported(work: Path) -> None:
    assert not (work / "models" / "export").exists()
    assert not list((work / "models").glob(".export.*"))


def test_missing_finetuned_model_is_one_line(bad_workdir, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    shutil.copy(bad_workdir / "params.yaml", work / "params.yaml")
    assert "models/finetuned: no model" in error_line(run_stage("export", work))
    assert not (work / "models" / "export").exists()


def test_unsupported_architecture_is_one_line_naming_it(tmp_path, bad_workdir):
    from transformers import OPTConfig, OPTForCausalLM

    work = copy_of(bad_workdir, tmp_path / "opt")
    shutil.rmtree(work / "models" / "finetuned")
    tokenizer = train_tokenizer("chatml")
    OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    ).save_pretrained(work / "models" / "finetuned")
    tokenizer.save_pretrained(work / "models" / "finetuned")
    assert "architecture 'opt'" in error_line(run_stage("export", work))
    assert_nothing_exported(work)


def test_unsupported_precision_is_rejected(tmp_path, bad_workdir):
    work = copy_of(bad_workdir, tmp_path / "q4", {"precision": "q4_k"})
    result = run_stage("export", work)
    assert result.returncode == 1 and "export.precision" in result.stderr and "'q4_k'" in result.stderr
    assert_nothing_exported(work)


def test_tokenizer_the_writer_cannot_represent_is_one_line(tmp_path, bad_workdir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    work = copy_of(bad_workdir, tmp_path / "wordpiece")
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        ["hello there how are you"] * 4,
        trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]", "<|im_end|>", "<|im_start|>"]),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="[UNK]"
    )
    tokenizer.chat_template = train_tokenizer("chatml").chat_template
    tokenizer.add_tokens([f"filler{i}" for i in range(300)])  # a size the model's 400 embedding rows can belong to
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (work / "models" / "finetuned" / name).unlink()
    tokenizer.save_pretrained(work / "models" / "finetuned")
    assert "byte-level BPE" in error_line(run_stage("export", work))
    assert_nothing_exported(work)


def test_round_trip_mismatch_fails_and_leaves_no_export(tmp_path, bad_workdir):
    work = copy_of(
        bad_workdir,
        tmp_path / "strict",
        {"precision": "f16", "round_trip": {**ROUND_TRIP, "logit_tolerance": {"f32": 1e-3, "f16": 1e-9}}},
    )
    assert "round trip failed (f16)" in error_line(run_stage("export", work))
    assert_nothing_exported(work)
    assert not (work / "metrics" / "export.json").exists()


@pytest.mark.parametrize("template", ["chatml", "gpt2", "bos", "injected", "none", "custom"])
def test_ollama_turns_render_like_the_jinja_template(template):
    from stages.base_model import prepare_tokenizer

    tokenizer = train_tokenizer({"gpt2": "gpt2", "bos": "bos"}.get(template, "chatml"))
    if template == "gpt2":
        prepare_tokenizer(tiny_model("gpt2", len(tokenizer)), tokenizer)  # the documented plain template
    if template in ("injected", "none", "custom"):
        tokenizer.chat_template = SMOLLM_LIKE
        with_system_prompt(tokenizer, {"injected": "default", "none": "none", "custom": "Be brief."}[template])
    chats = [json.loads(line)["messages"] for line in (FIXTURES / "conversations.jsonl").read_text().splitlines()]
    chats.append([{"role": "system", "content": "Answer in French."}] + chats[0])
    turns = TurnFormat.probe(tokenizer)
    assert turns.check(tokenizer, chats) > 0
    assert ("You are a helpful assistant" in turns.injected) == (template == "injected")
    assert ("Be brief." in turns.injected) == (template == "custom")
    assert "{{ range $i, $_ := .Messages }}" in turns.go_template()


def test_a_template_that_depends_on_more_than_the_role_is_refused():
    tokenizer = train_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ loop.index }}:{{ message['role'] }}:{{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    chats = [json.loads(line)["messages"] for line in (FIXTURES / "conversations.jsonl").read_text().splitlines()]
    with pytest.raises(TemplateError):  # refused at the probe or at the check, never shipped
        TurnFormat.probe(tokenizer).check(tokenizer, chats)


def test_intervals_are_read_in_any_of_the_shapes_evaluate_may_write():
    section = {
        "a": 1.0,
        "a_ci_low": 0.5,
        "a_ci_high": 1.5,
        "b": {"value": 2.0, "low": 1.0, "high": 3.0},
        "c": 3.0,
        "c_ci": [2.0, 4.0],
        "d": 4.0,
        "e": {"mean": 5.0, "ci": [4.0, 6.0]},
        "note": "text",
    }
    assert model_card.metric_keys(section) == ["a", "b", "c", "d", "e"]
    assert [model_card.metric(section, k) for k in "abcde"] == [
        (1.0, (0.5, 1.5)),
        (2.0, (1.0, 3.0)),
        (3.0, (2.0, 4.0)),
        (4.0, None),
        (5.0, (4.0, 6.0)),
    ]


def test_export_runs_in_the_pipeline_with_dvc_lineage(llama_repo):
    """Under `dvc repro` the stage runs after train and evaluate, and the card carries dvc.lock's hashes."""
    from pipeline_repo import dvc

    lock = yaml.safe_load((llama_repo / "dvc.lock").read_text())
    hashes = model_card.dvc_hashes(lock, ("data/processed", "data/tokenized", "models/finetuned"))
    card = (llama_repo / "models" / "export" / "README.md").read_text()
    assert all(md5.endswith(".dir") and md5 in card for md5 in hashes.values()), hashes
    assert "export.json" in dvc(llama_repo, "metrics", "show", "--json").stdout
    front = yaml.safe_load(card.split("---\n")[1])
    tuned = json.loads((llama_repo / "metrics" / "eval.json").read_text())["finetuned"]
    assert {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}["perplexity"] == tuned[
        "perplexity"
    ]


def test_the_modelfile_decodes_as_evaluated_greedy_included(tmp_path):
    """Ollama's parameters are the evaluated decoding: the sampled temperature and top-p, or temperature 0 when
    `evaluate.do_sample` is false (Ollama has no greedy switch of its own)."""
    from stages.export import ollama_parameters
    from stages.lib.params import load_params

    sampled = load_params(write_params(tmp_path, {"evaluate": {"temperature": 0.85, "top_p": 0.8}}))
    assert ollama_parameters(sampled) | {"seed": None} == {
        "temperature": 0.85,
        "top_p": 0.8,
        "top_k": 0,
        "repeat_penalty": sampled.evaluate.repetition_penalty,
        "num_predict": sampled.evaluate.max_new_tokens,
        "seed": None,
    }
    greedy = load_params(write_params(tmp_path, {"evaluate": {"do_sample": False}}))
    assert ollama_parameters(greedy)["temperature"] == 0
