"""Chat with a tiny model: one prompt, a JSONL of prompts, the interactive loop, and an overflowing history."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, run_stage, write_params
from stages.lib.template import fit_prompt
from tiny import save_tiny, train_tokenizer


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("chat")
    save_tiny(work / "tiny-model", "llama")
    write_params(work, {"model": {"base": "tiny-model"}})
    result = run_stage("base_model", work)
    assert result.returncode == 0, result.stderr
    return work


def chat(work, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "stages.tools.chat", "--model", "base", "--max-new-tokens", "8", *args],
                          cwd=work, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": ""},
                          input=stdin, capture_output=True, text=True, timeout=300)


def test_one_prompt(chat_dir):
    result = chat(chat_dir, "--prompt", "hello there", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_prompts_file_gives_one_json_line_each(chat_dir):
    (chat_dir / "in.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "do you like red?"}\n')
    result = chat(chat_dir, "--prompts", "in.jsonl", "--temperature", "0.8", "--top-p", "0.9")
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in replies] == ["hello", "do you like red?"] and all(isinstance(r["reply"], str) for r in replies)


def test_bad_prompts_file_is_a_clear_error(chat_dir):
    (chat_dir / "bad.jsonl").write_text('{"text": "hello"}\n')
    result = chat(chat_dir, "--prompts", "bad.jsonl")
    assert result.returncode == 1 and 'bad.jsonl:1: expected {"prompt": "..."}' in result.stderr


def test_interactive_session_with_reset_and_overflowing_history(chat_dir):
    turns = "".join(f"tell me about colors number {i} please\n" for i in range(12))
    result = chat(chat_dir, "--context-tokens", "48", "--temperature", "0", stdin=turns + "/reset\nhello again\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "(history cleared)" in result.stdout and result.stdout.count("bot> ") == 13


def test_fit_prompt_drops_oldest_turns_and_keeps_system():
    tokenizer = train_tokenizer("chatml")
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(30):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last question"})
    ids = fit_prompt(tokenizer, messages, 60)
    text = tokenizer.decode(ids)
    assert len(ids) <= 60
    assert text.startswith("<|im_start|>system\nbe brief") and "last question" in text and "question 0<" not in text
    assert text.split("<|im_end|>\n")[1].startswith("<|im_start|>user")  # history resumes on a user turn
    assert text.endswith("<|im_start|>assistant\n")
