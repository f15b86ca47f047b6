"""Chat with a tiny model: one prompt, a JSONL of prompts, the interactive loop, and an overflowing history."""

import json

import pytest

from conftest import REPO, run_stage, write_params
from stage_server import run_forked
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
    args = ("--model", "base", "--max-new-tokens", "8", *args)
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": ""}
    return run_forked("stages.tools.chat", work, args, env, stdin, timeout=300)


def test_one_prompt_prints_the_models_own_greedy_reply(chat_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The tiny base model's greedy reply is all newlines (an empty line): redraw its weights at a larger scale so
    # that every prompt gets a different, non-empty reply and the comparison below can fail.
    tokenizer = AutoTokenizer.from_pretrained(chat_dir / "models" / "base")
    model = AutoModelForCausalLM.from_pretrained(chat_dir / "models" / "base", use_safetensors=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.normal_(0, 1.0)
    model.save_pretrained(chat_dir / "varied-model")
    tokenizer.save_pretrained(chat_dir / "varied-model")

    result = chat(
        chat_dir,
        "--model",
        "varied-model",
        "--prompt",
        "hello there",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
    )
    assert result.returncode == 0, result.stderr
    # The same reply straight from transformers: the saved chat template, greedy, stopping at EOS or end of turn.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    eos = model.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), tokenizer.convert_tokens_to_ids("<|im_end|>")}
    generated = model.eval().generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=sorted(stops))
    new = generated[0, prompt["input_ids"].shape[1] :].tolist()
    new = new[: next((i for i, token in enumerate(new) if token in stops), len(new))]
    expected = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert expected, "the model stopped at once: the comparison would prove nothing"
    assert result.stdout == expected + "\n"


def test_chat_decodes_as_the_metrics_measured_unless_told_otherwise(chat_dir, monkeypatch):
    """One decoding for users and metrics: chat's defaults are params.yaml's evaluate decoding and seed."""
    from stages.lib.params import load_params
    from stages.tools.chat import parse_args

    monkeypatch.chdir(chat_dir)
    params = load_params()
    args = parse_args(["--model", "base"])
    measured = params.evaluate
    assert (args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens, args.seed) == (
        measured.temperature if measured.do_sample else 0.0,
        measured.top_p,
        measured.repetition_penalty,
        measured.max_new_tokens,
        params.seed,
    )
    assert parse_args(["--temperature", "0", "--top-p", "0.5"]).top_p == 0.5


def test_prompts_file_gives_one_json_line_each(chat_dir):
    (chat_dir / "in.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "do you like red?"}\n')
    result = chat(chat_dir, "--prompts", "in.jsonl", "--temperature", "0.8", "--top-p", "0.9")
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in replies] == ["hello", "do you like red?"]
    assert all(isinstance(r["reply"], str) for r in replies)


def test_bad_prompts_file_is_a_clear_error(chat_dir):
    (chat_dir / "bad.jsonl").write_text('{"text": "hello"}\n')
    result = chat(chat_dir, "--prompts", "bad.jsonl")
    assert result.returncode == 1 and 'bad.jsonl:1: expected {"prompt": "..."}' in result.stderr


def test_interactive_session_with_reset_and_overflowing_history(chat_dir):
    turns = "".join(f"tell me about colors number {i} please\n" for i in range(12))
    stdin = turns + "/reset\nhello again\n/exit\n"
    result = chat(chat_dir, "--context-tokens", "48", "--temperature", "0", stdin=stdin)
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
