"""docs/DESIGN.md §4: each label rule, on a ChatML template and on the plain GPT-2 template."""

import pytest
import torch
from tokenizers import normalizers, pre_tokenizers

from stages.base_model import prepare_tokenizer
from stages.lib.labels import (
    IGNORE_INDEX,
    TemplateCost,
    WindowStats,
    assistant_spans,
    composer,
    encode,
    prefix_spans,
    template_blocks,
    windows,
    windows_batch,
)
from stages.lib.modeling import collator
from stages.lib.template import PLAIN_CHAT_TEMPLATE, end_of_turn_token, with_system_prompt
from stages.train import trained_position_loss
from tiny import TINY_DECODER, tiny_model, train_tokenizer

CONVERSATION = [
    {"role": "system", "content": "you are a helpful assistant."},
    {"role": "user", "content": "what is your favorite color? assistant:"},
    {"role": "assistant", "content": "my favorite color is blue."},
    {"role": "user", "content": "why blue?"},
    {"role": "assistant", "content": "because blue is calm."},
]


@pytest.fixture(params=["chatml", "gpt2"])
def tokenizer(request):
    """Prepared as the base_model stage prepares it: template, end-of-turn and a pad that no label needs."""
    tok = train_tokenizer(request.param)
    model = tiny_model("llama" if request.param == "chatml" else "gpt2", len(tok))
    prepare_tokenizer(model, tok)
    tok.test_model = model
    return tok


def trained_segments(tok, example):
    """Decoded runs of consecutive trained tokens."""
    segments, current = [], []
    for token_id, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token_id)
        elif current:
            segments.append(tok.decode(current))
            current = []
    if current:
        segments.append(tok.decode(current))
    return segments


def test_1_labels_cover_exactly_the_assistant_replies(tokenizer):
    # The user turn ends with the text "assistant:", which a marker-string search would mistake for a reply start.
    eot = end_of_turn_token(tokenizer)
    example = encode(tokenizer, CONVERSATION)
    prefix = " " if tokenizer.chat_template == PLAIN_CHAT_TEMPLATE else ""
    assert trained_segments(tokenizer, example) == [
        f"{prefix}my favorite color is blue.{eot}",
        f"{prefix}because blue is calm.{eot}",
    ]


def test_1_everything_outside_the_spans_is_ignored(tokenizer):
    example = encode(tokenizer, CONVERSATION)
    untrained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    for prompt in ("you are a helpful assistant.", "what is your favorite color? assistant:", "why blue?"):
        assert prompt in untrained
    assert "blue is calm" not in untrained and "color is blue." not in untrained
    assert example.labels[0] == IGNORE_INDEX


def test_2_end_of_turn_is_trained_and_pad_differs_from_it(tokenizer):
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    example = encode(tokenizer, CONVERSATION)
    pairs = enumerate(zip(example.input_ids, example.labels))
    trained_eot = [i for i, (t, label) in pairs if t == eot_id and label == eot_id]
    assert len(trained_eot) == 2  # one per assistant reply
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eot_id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_2_plain_template_for_models_without_one():
    tok = train_tokenizer("gpt2")
    assert tok.chat_template is None
    info = prepare_tokenizer(tiny_model("gpt2", len(tok)), tok)
    assert info["chat_template"].startswith("plain") and info["end_of_turn"] == "<|endoftext|>"
    assert info["pad_token"] == "<|pad|>"  # GPT-2 has no spare special token, so one is added
    text = tok.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert (
        text == "User: what is your favorite color? assistant:<|endoftext|>\n"
        "Assistant: my favorite color is blue.<|endoftext|>\n"
    )


def test_3_one_bos_at_most():
    tok = train_tokenizer("bos")  # template writes BOS and the tokenizer would add one more
    bos = tok.bos_token_id
    naive = tok(tok.apply_chat_template(CONVERSATION, tokenize=False))["input_ids"]
    assert naive[:2] == [bos, bos]  # the trap is real
    example = encode(tok, CONVERSATION)
    assert example.input_ids[0] == bos and example.input_ids[1] != bos


def test_4_labels_equal_inputs_and_are_not_shifted(tokenizer):
    example = encode(tokenizer, CONVERSATION)
    assert all(label == token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX)
    model = tokenizer.test_model.eval()
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor([example.labels])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        model_loss = model(input_ids=ids, labels=labels).loss
    # Position t predicts token t+1: the model shifts once, so the labels must not be pre-shifted.
    targets = labels[0, 1:]
    keep = targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep])
    assert torch.allclose(model_loss, manual, atol=1e-5)


def test_4_trained_position_loss_matches_the_models_own_loss(tokenizer):
    model = tokenizer.test_model.eval()
    rows = [encode(tokenizer, CONVERSATION), encode(tokenizer, CONVERSATION[:3])]
    batch = collator(tokenizer)(
        [{"input_ids": r.input_ids, "labels": r.labels, "attention_mask": [1] * len(r.input_ids)} for r in rows]
    )
    with torch.no_grad():
        reference = model(**batch).loss
        ours, _ = trained_position_loss(model, batch)
    assert torch.allclose(reference, ours, atol=1e-5)


def long_conversation(turns: int):
    messages = [{"role": "system", "content": "you are a helpful assistant."}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"question {i}: do you like red?"},
            {"role": "assistant", "content": f"answer {i}: red is nice, but too loud."},
        ]
    return messages


def test_5_long_conversations_become_windows_of_whole_turns(tokenizer):
    messages = long_conversation(12)
    full = encode(tokenizer, messages)
    max_length = len(full.input_ids) // 3
    stats = WindowStats()
    examples = windows(tokenizer, messages, max_length, "assistant", TemplateCost.measure(tokenizer), stats)
    assert len(examples) >= 3 and stats.windows == len(examples) and stats.conversations_split == 1
    assert all(len(e.input_ids) <= max_length for e in examples)
    replies = [s for e in examples for s in trained_segments(tokenizer, e)]
    eot = end_of_turn_token(tokenizer)
    prefix = " " if tokenizer.chat_template == PLAIN_CHAT_TEMPLATE else ""
    assert replies == [f"{prefix}answer {i}: red is nice, but too loud.{eot}" for i in range(12)]  # each once, in order
    for example in examples:  # every window keeps the system prompt and opens on a user turn, never mid-turn
        assert "you are a helpful assistant." in tokenizer.decode(example.input_ids)
        assert messages[example.turns[0]]["role"] == "user" and messages[example.turns[1]]["role"] == "assistant"
    assert [e.turns for e in examples] == sorted(e.turns for e in examples)
    assert all(a.turns[1] + 1 == b.turns[0] for a, b in zip(examples, examples[1:]))  # contiguous, no turn lost
    last = tokenizer.decode(examples[-1].input_ids)
    assert "question 11" in last and "question 10" in last  # the most recent context is kept


def test_5_turn_too_long_is_dropped_and_counted(tokenizer):
    messages = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "blue " * 200},
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": "because."},
    ]
    stats = WindowStats()
    examples = windows(tokenizer, messages, 40, "assistant", TemplateCost.measure(tokenizer), stats)
    assert stats.turns_too_long == 1 and len(examples) == 1
    assert [s.strip() for s in trained_segments(tokenizer, examples[0])] == [f"because.{end_of_turn_token(tokenizer)}"]


def test_5_reply_without_context_is_not_trained(tokenizer):
    messages = [
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "how are you?"},
    ]
    stats = WindowStats()
    examples = windows(tokenizer, messages, 200, "assistant", TemplateCost.measure(tokenizer), stats)
    assert stats.turns_without_context == 1 and len(examples) == 1
    assert "hello!" not in "".join(trained_segments(tokenizer, examples[0]))


def test_5_loss_on_all_trains_every_token(tokenizer):
    stats = WindowStats()
    (example,) = windows(tokenizer, CONVERSATION, 512, "all", TemplateCost.measure(tokenizer), stats)
    assert example.labels == example.input_ids


def test_7_dynamic_padding_does_not_change_logits(tokenizer):
    """We batch by length with padding instead of packing; padded rows must give the unpadded logits."""
    model = tokenizer.test_model.eval()
    rows = [encode(tokenizer, CONVERSATION), encode(tokenizer, CONVERSATION[:3])]
    batch = collator(tokenizer)(
        [{"input_ids": r.input_ids, "labels": r.labels, "attention_mask": [1] * len(r.input_ids)} for r in rows]
    )
    assert batch["input_ids"].shape[1] % 8 == 0
    short = len(rows[1].input_ids)
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][1, short:] == 0).all()
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row.input_ids])).logits[0]
            assert torch.allclose(padded[i, : len(row.input_ids)], alone, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "cohere"])
def test_11_loss_equals_the_models_own_for_heads_that_do_more_than_a_linear_layer(arch):
    """Gemma-2 soft-caps its final logits and Cohere scales them: the head must run inside the model's forward."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    tok = train_tokenizer("chatml")
    torch.manual_seed(0)
    shape = dict(
        vocab_size=len(tok),
        **TINY_DECODER,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=8, final_logit_softcapping=0.1))
    else:
        model = CohereForCausalLM(CohereConfig(**shape, logit_scale=0.0625))
    model.eval()
    rows = [encode(tok, CONVERSATION), encode(tok, CONVERSATION[:3])]
    batch = collator(tok)([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    with torch.no_grad():
        reference = model(**batch).loss
        ours, _ = trained_position_loss(model, batch)
        # What applying the output head to the final hidden states outside the forward gives: not the model's loss.
        hidden = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states[-1]
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        outside = torch.nn.functional.cross_entropy(
            model.get_output_embeddings()(hidden[:, :-1][keep]).float(), targets[keep]
        )
    assert torch.allclose(reference, ours, atol=1e-5)
    assert not torch.allclose(reference, outside, atol=1e-3)


SPAN_CASES = [
    CONVERSATION,
    CONVERSATION[1:],
    long_conversation(6),
    [
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "how are you?"},
    ],
    [
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "assistant"},
        {"role": "assistant", "content": " \n"},
    ],
    [{"role": "user", "content": "<|im_start|>assistant\n"}, {"role": "assistant", "content": "<|im_end|>\n"}],
    [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "late system"},
        {"role": "assistant", "content": "b  "},
    ],
]


@pytest.mark.parametrize("system_prompt", ["default", "none", "Be brief."])
@pytest.mark.parametrize("style", ["chatml", "gpt2", "bos"])
def test_1_spans_from_one_rendering_equal_the_prefix_renders(style, system_prompt):
    """Each conversation is rendered once; the spans must be exactly those of one render per prefix."""
    tok = train_tokenizer(style)
    prepare_tokenizer(tiny_model("gpt2", len(tok)), tok)
    with_system_prompt(tok, system_prompt)
    assert template_blocks(tok) is not None  # the fast path is taken, not the fallback
    for messages in SPAN_CASES:
        text = tok.apply_chat_template(messages, tokenize=False)
        assert assistant_spans(tok, messages, text) == prefix_spans(tok, messages, text), messages


def test_1_spans_fall_back_for_a_template_that_is_not_built_of_blocks():
    tok = train_tokenizer("chatml")
    # Numbers each turn: no fixed block per role, so the spans come from the prefix renders.
    tok.chat_template = (
        "{% for message in messages %}{{ loop.index }} {{ message['role'] }}: {{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}{{ messages | length + 1 }} assistant:{% endif %}"
    )
    assert template_blocks(tok) is None
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert assistant_spans(tok, CONVERSATION, text) == prefix_spans(tok, CONVERSATION, text)


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_5_batched_windows_equal_one_conversation_at_a_time(tokenizer, loss_on):
    """tokenize encodes many conversations in one batch; the windows and counts must be those of `windows`."""
    conversations = [
        long_conversation(12),
        CONVERSATION,
        CONVERSATION[1:],
        [],
        [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "blue " * 200},
            {"role": "user", "content": "why?"},
            {"role": "assistant", "content": "because."},
        ],
        [
            {"role": "assistant", "content": "hello!"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "how?"},
        ],
    ]
    cost = TemplateCost.measure(tokenizer)
    for max_length in (40, len(encode(tokenizer, long_conversation(12)).input_ids) // 3, 512):
        one, batched = [WindowStats() for _ in conversations], [WindowStats() for _ in conversations]
        expected = [windows(tokenizer, c, max_length, loss_on, cost, s) for c, s in zip(conversations, one)]
        got = windows_batch(tokenizer, conversations, max_length, loss_on, cost, batched)
        assert [[(e.input_ids, e.labels, e.turns) for e in w] for w in got] == [
            [(e.input_ids, e.labels, e.turns) for e in w] for w in expected
        ]
        assert batched == one


COMPOSE_CASES = SPAN_CASES + [
    [{"role": "user", "content": "'s it 42? 3.14 ünïcödé 🙂"}, {"role": "assistant", "content": "'ll say: yes!!\n\n"}],
    [{"role": "user", "content": "\nleading newline"}, {"role": "assistant", "content": " leading space"}],
    [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "tail <|im_end|> and <|im_start|>user\nfake"},
    ],
    [
        {"role": "system", "content": "Be terse.\n"},
        {"role": "user", "content": "hi\t"},
        {"role": "assistant", "content": "ok\r\n"},
    ],
]


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
@pytest.mark.parametrize("system_prompt", ["default", "none", "Be brief."])
@pytest.mark.parametrize("style", ["chatml", "bos"])
def test_5_windows_composed_from_content_ids_equal_encoded_windows(style, system_prompt, loss_on):
    """tokenize encodes each message once and composes windows from those ids; every window, every
    sub-range of turns, must equal rendering and encoding it (labels included)."""
    tok = train_tokenizer(style)
    prepare_tokenizer(tiny_model("gpt2", len(tok)), tok)
    with_system_prompt(tok, system_prompt)
    assert composer(tok) is not None
    composed = 0
    for messages in COMPOSE_CASES:
        system = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(system) :]
        for start in range(len(body)):
            for end in range(start, len(body)):
                window = system + body[start : end + 1]
                ids = [tok(m["content"], add_special_tokens=False)["input_ids"] for m in window]
                got, expected = encode(tok, window, loss_on, ids), encode(tok, window, loss_on)
                assert (got.input_ids, got.labels) == (expected.input_ids, expected.labels), window
                composed += (
                    composer(tok).compose(tok.apply_chat_template(window, tokenize=False), window, ids, loss_on)
                    is not None
                )
    assert composed > 50  # the composed path is what was compared, not only the fallback


def test_5_composer_refuses_what_it_cannot_prove_exact():
    plain = train_tokenizer("gpt2")
    prepare_tokenizer(tiny_model("gpt2", len(plain)), plain)
    assert composer(plain) is None  # "User: " before the content: the space joins the content's first word
    lowercase = train_tokenizer("chatml")
    lowercase.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert composer(lowercase) is None
    prefix_space = train_tokenizer("chatml")
    prefix_space.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert composer(prefix_space) is None
    two_newlines = train_tokenizer("chatml")
    two_newlines.chat_template = two_newlines.chat_template.replace(
        "'\n' + message['content']", "'\n\n' + message['content']"
    )
    assert template_blocks(two_newlines) is not None and composer(two_newlines) is None
    crossing = train_tokenizer("chatml")
    assert composer(crossing) is not None  # measured before the token below exists: the cache must not keep it
    crossing.add_special_tokens({"additional_special_tokens": ["!<|im_end|>"]})
    assert composer(crossing) is None
    without_leading_space = train_tokenizer("chatml")
    example = [{"role": "user", "content": " hi"}, {"role": "assistant", "content": "ok"}]
    ids = [without_leading_space(m["content"], add_special_tokens=False)["input_ids"] for m in example]
    assert (
        composer(without_leading_space).compose(
            without_leading_space.apply_chat_template(example, tokenize=False), example, ids, "assistant"
        )
        is None
    )
