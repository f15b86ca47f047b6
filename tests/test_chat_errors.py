"""chat under bad input and interruption: one line naming the file or option, Ctrl-C quiet, base prompts as scored."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_params
from stage_server import run_forked
from tiny import PERSONA, PERSONA_TEMPLATE, save_tiny

pytestmark = pytest.mark.slow  # a chat subprocess loads torch and transformers: ~5 s each on a quiet 2-core CPU
ENV = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """models/base: a tiny Llama whose template injects SmolLM2's persona; models/export/model.gguf written from it."""
    from transformers import AutoTokenizer

    from stages.lib import gguf_file
    from stages.lib.modeling import load_causal_lm

    work = tmp_path_factory.mktemp("chat-errors")
    base = save_tiny(work / "models" / "base", "llama")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = PERSONA_TEMPLATE
    tokenizer.save_pretrained(base)
    write_params(work, {"model": {"base": "tiny-model"}, "tokenize": {"system_prompt": "none"}})
    model, tokenizer = load_causal_lm(base)
    (work / "models" / "export").mkdir(parents=True)
    vocab = gguf_file.vocabulary(tokenizer, model.config.vocab_size)
    gguf_file.write(work / "models" / "export" / "model.gguf", model, vocab, "f32", {"name": "tiny", "license": "mit"})
    return work


def chat(work: Path, *args: str, model: str = "base") -> subprocess.CompletedProcess:
    args = ("--model", model, "--max-new-tokens", "4", "--temperature", "0", *args)
    return run_forked("stages.tools.chat", work, args, ENV, timeout=300)


def one_line(result: subprocess.CompletedProcess) -> str:
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in stderr, (result.returncode, stderr[-3000:])
    return lines[0]


def test_base_prompts_are_formatted_as_score_at_base_formats_them(work, monkeypatch):
    import torch

    from stages.lib.modeling import load_causal_lm
    from stages.lib.template import fit_prompt, with_system_prompt
    from stages.tools import chat as chat_tool

    monkeypatch.chdir(work)
    _, tokenizer, _ = chat_tool.load_model(chat_tool.parse_args(["--model", "base"]), torch.device("cpu"))
    _, scored = load_causal_lm(Path("models/base"))
    scored = with_system_prompt(scored, "none")  # what stages/score.py does for the base model
    messages = [{"role": "user", "content": "hello there"}]
    assert fit_prompt(tokenizer, messages, 400) == fit_prompt(scored, messages, 400)
    assert PERSONA not in tokenizer.decode(fit_prompt(tokenizer, messages, 400))


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_gguf_is_one_line(work, tmp_path, damage):
    gguf = work / "models" / "export" / "model.gguf"
    good = gguf.read_bytes()
    try:
        gguf.write_bytes(b"" if damage == "empty" else good[: len(good) // 2])
        line = one_line(chat(work, "--prompt", "hi", model="export"))
    finally:
        gguf.write_bytes(good)
    assert line.startswith("error: models/export/model.gguf: ") and "dvc checkout models/export" in line, line


def test_an_argument_that_is_not_utf8_is_one_line(work):
    command = [sys.executable.encode(), b"-m", b"stages.tools.chat", b"--model", b"base", b"--prompt", b"hi \xff there"]
    result = subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True, errors="replace", timeout=300)
    assert one_line(result) == "error: --prompt: not UTF-8 text (byte 0xff at character 4); pass UTF-8"


def test_a_lora_adapter_saved_as_pickle_is_refused_in_one_line(work):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = work / "pickled-adapter"
    base = AutoModelForCausalLM.from_pretrained(work / "models" / "base")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(adapter, safe_serialization=False)
    AutoTokenizer.from_pretrained(work / "models" / "base").save_pretrained(adapter)
    (adapter / "base_model.json").write_text(json.dumps({"base_model": "models/base"}))
    assert (adapter / "adapter_model.bin").exists()
    line = one_line(chat(work, "--prompt", "hi", model=str(adapter.name)))
    assert line.startswith(f"error: {adapter.name}: the LoRA adapter must be saved as safetensors"), line
    assert "adapter_model.bin" in line


def test_a_template_the_sandbox_refuses_is_one_line(work):
    import shutil

    refused = work / "refused-template"
    shutil.copytree(work / "models" / "base", refused)
    (refused / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    config = json.loads((refused / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (refused / "tokenizer_config.json").write_text(json.dumps(config))
    line = one_line(chat(work, "--prompt", "hi", model=refused.name))
    assert line.startswith(f"error: {refused.name}: ") and "unsafe" in line, line


def test_ctrl_c_during_a_reply_ends_quietly(work):
    # Enough prompts that a fast CPU is still answering them when the signal comes (a tiny model's reply can be one
    # forward pass: 400 of them took under half a second on an AMX Xeon).
    count = 20_000
    prompts = [json.dumps({"prompt": f"tell me about colors number {i}"}) for i in range(count)]
    (work / "many.jsonl").write_text("\n".join(prompts) + "\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stages.tools.chat",
            "--model",
            "base",
            "--prompts",
            "many.jsonl",
            "--max-new-tokens",
            "64",
            "--temperature",
            "0",
        ],
        cwd=work,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a shell starts a foreground command: Ctrl-C at its default. A process that ignores SIGINT passes that on
        # to its children, and Python then never raises KeyboardInterrupt; the suite's worker process may.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    inherited = signal.getsignal(signal.SIGINT)
    try:
        first = process.stdout.readline()  # the first reply is out: the next one is being generated
        assert json.loads(first)["prompt"] == "tell me about colors number 0"
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, (len(stdout.splitlines()), inherited, stderr[-3000:])
    assert "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.strip()][-1:] == ["interrupted"], stderr
    assert len(stdout.splitlines()) < count - 1  # it stopped mid-way
