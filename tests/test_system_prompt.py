"""tokenize.system_prompt (docs/DESIGN.md §4.10): written into the chat template, so training, evaluation and chat
agree."""

import pytest

from stages.lib.labels import IGNORE_INDEX, encode
from stages.lib.template import fit_prompt, injected_system_block, render, with_system_prompt
from tiny import CHATML_TEMPLATE, PERSONA, PERSONA_TEMPLATE, train_tokenizer

CHAT = [
    {"role": "user", "content": "hi, how was your day?"},
    {"role": "assistant", "content": "great, i went hiking."},
    {"role": "user", "content": "where?"},
    {"role": "assistant", "content": "up the hill."},
]


def persona_tokenizer(template: str = PERSONA_TEMPLATE):
    tokenizer = train_tokenizer("chatml")
    tokenizer.chat_template = template
    return tokenizer


def test_the_injected_block_is_found_for_templates_that_inject_one():
    assert injected_system_block(persona_tokenizer()) == f"<|im_start|>system\n{PERSONA}<|im_end|>\n"
    assert injected_system_block(persona_tokenizer(CHATML_TEMPLATE)) == ""
    bos = train_tokenizer("bos")
    assert injected_system_block(bos) == ""  # a BOS written by the template is not a system prompt


def test_none_removes_the_persona_and_keeps_a_conversations_own_system_message():
    tokenizer = with_system_prompt(persona_tokenizer(), "none")
    assert render(tokenizer, CHAT).startswith("<|im_start|>user\nhi, how was your day?")
    assert PERSONA not in render(tokenizer, CHAT[:1], add_generation_prompt=True)
    own = [{"role": "system", "content": "be kind"}] + CHAT
    assert render(tokenizer, own).startswith("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user")


def test_custom_text_becomes_the_system_message_of_every_conversation_without_one():
    tokenizer = with_system_prompt(persona_tokenizer(), "You are a friendly person chatting.")
    assert render(tokenizer, CHAT).startswith(
        "<|im_start|>system\nYou are a friendly person chatting.<|im_end|>\n<|im_start|>user"
    )
    assert PERSONA not in render(tokenizer, CHAT)
    own = [{"role": "system", "content": "be kind"}] + CHAT
    assert render(tokenizer, own).startswith("<|im_start|>system\nbe kind<|im_end|>")


def test_default_keeps_the_template_as_it_is():
    tokenizer = persona_tokenizer()
    assert with_system_prompt(tokenizer, "default").chat_template == PERSONA_TEMPLATE
    assert PERSONA in render(tokenizer, CHAT)


@pytest.mark.parametrize("setting", ["default", "none", 'It\'s a "quoted" text\nwith a newline \\ and a backslash.'])
def test_labels_stay_on_the_replies_and_chat_prompts_equal_the_training_prefix(setting, tmp_path):
    """The saved tokenizer carries the choice: chat's prompt tokens equal the prefix of the trained example."""
    from transformers import AutoTokenizer

    with_system_prompt(persona_tokenizer(), setting).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # what train saves with the model and chat loads
    example = encode(tokenizer, CHAT)
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert trained == "great, i went hiking.<|im_end|>up the hill.<|im_end|>"
    first_reply = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = fit_prompt(tokenizer, CHAT[:1], 10_000)
    assert prompt == example.input_ids[:first_reply]
    if setting == "none":
        assert PERSONA not in tokenizer.decode(example.input_ids)
    elif setting != "default":
        assert tokenizer.decode(example.input_ids).startswith(f"<|im_start|>system\n{setting}<|im_end|>")
