"""Chat with the fine-tuned model (or the base model), formatted exactly as in training.

    python -m stages.tools.chat                          interactive; /reset clears the history, /exit quits
    python -m stages.tools.chat --model base             the base model, for comparison
    python -m stages.tools.chat --model export           the exported GGUF (models/export/model.gguf), as it ships
    python -m stages.tools.chat --prompt "Hi there!"     answer one prompt and exit
    python -m stages.tools.chat --prompts in.jsonl       answer each {"prompt": ...} line, print JSONL replies

The history is rendered with the model's saved chat template; when it outgrows the context window the
oldest turns are dropped. Replies stream token by token in interactive mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import torch

from stages.lib.cli import ArgumentParser, run
from stages.lib.conversations import InputError, iter_jsonl
from stages.lib.decoding import decoding
from stages.lib.gguf_file import load as load_gguf
from stages.lib.modeling import inference_dtype, load_causal_lm, pick_device
from stages.lib.params import load_params
from stages.lib.paths import EXPORT_GGUF, MODELS
from stages.lib.template import TemplateError, fit_prompt, stop_token_ids, with_system_prompt

HELP = "commands: /reset (forget the conversation), /exit (quit), /help"
RESTORE_EXPORT = "restore it with `dvc checkout models/export`, or export it again with `dvc repro -f export`"


class Chat:
    def __init__(self, model: Any, tokenizer: Any, args: argparse.Namespace) -> None:
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict[str, str]] = []
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
        self.context_tokens = min(args.context_tokens or positions, positions)
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)

    def reset(self) -> None:
        self.history = []

    def reply(self, text: str, stream: bool = False) -> str:
        from transformers import TextStreamer

        self.history.append({"role": "user", "content": text})
        budget = self.context_tokens - self.args.max_new_tokens
        try:
            ids = fit_prompt(self.tokenizer, self.system + self.history, budget)
        except TemplateError as exc:
            self.history.pop()
            raise InputError(
                f"--context-tokens {self.context_tokens} minus --max-new-tokens {self.args.max_new_tokens}: {exc}"
            ) from None
        settings = SimpleNamespace(
            max_new_tokens=self.args.max_new_tokens,
            do_sample=self.args.temperature > 0,
            temperature=self.args.temperature,
            top_p=self.args.top_p,
            repetition_penalty=self.args.repetition_penalty,
        )
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=torch.tensor([ids], device=self.model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.model.device),
                **decoding(settings, len(ids), self.stop_ids),
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
            )
        new = output[0, len(ids) :].tolist()
        stop = next((i for i, token in enumerate(new) if token in self.stop_ids), len(new))
        answer = self.tokenizer.decode(new[:stop], skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def prompts_from(path: Path) -> Iterable[str]:
    for line_no, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InputError(f'{path}:{line_no}: expected {{"prompt": "..."}}')
        yield record["prompt"]


def interactive(chat: Chat) -> None:
    print(f"chatting with {chat.args.model} ({HELP})", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        except UnicodeDecodeError:
            print("error: that line is not UTF-8 text; type it again", file=sys.stderr)
            continue
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            chat.reset()
            print("(history cleared)")
            continue
        if text == "/help":
            print(HELP)
            continue
        print("bot> ", end="", flush=True)
        chat.reply(text, stream=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="finetuned", help="finetuned, base, export (the GGUF), or a model directory")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument(
        "--prompts", type=Path, help='JSONL of {"prompt": ...}; each is a new conversation unless --keep-history'
    )
    parser.add_argument("--keep-history", action="store_true", help="with --prompts: one conversation across all lines")
    parser.add_argument("--system", help="system message")
    # Decoding defaults: params.yaml's evaluate section, the decoding the metrics measured (stages/lib/decoding.py).
    parser.add_argument(
        "--temperature",
        type=float,
        help="0 for greedy (default: evaluate.temperature, 0 when evaluate.do_sample is false)",
    )
    parser.add_argument("--top-p", type=float, help="default: evaluate.top_p")
    parser.add_argument(
        "--repetition-penalty", type=float, help="on the reply's own tokens (default: evaluate.repetition_penalty)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="default: evaluate.max_new_tokens")
    parser.add_argument(
        "--context-tokens", type=int, help="prompt + reply budget (default: the model's context window)"
    )
    parser.add_argument("--seed", type=int, help="default: params.yaml's seed")
    args = parser.parse_args(argv)
    if None in (args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens, args.seed):
        params = load_params()
        measured = params.evaluate
        defaults = {
            "temperature": measured.temperature if measured.do_sample else 0.0,
            "top_p": measured.top_p,
            "repetition_penalty": measured.repetition_penalty,
            "max_new_tokens": measured.max_new_tokens,
            "seed": params.seed,
        }
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    for name, value in vars(args).items():  # bytes that are not UTF-8 reach Python as lone surrogates
        if isinstance(value, (str, Path)):
            try:
                str(value).encode("utf-8")
            except UnicodeEncodeError as exc:
                byte = ord(str(value)[exc.start]) & 0xFF
                raise InputError(
                    f"--{name.replace('_', '-')}: not UTF-8 text (byte 0x{byte:02x} at character "
                    f"{exc.start + 1}); pass UTF-8"
                ) from None
    problem = argument_problem(args)
    if problem:
        raise InputError(problem)
    return args


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, checked before a model is loaded."""
    if args.max_new_tokens < 1:
        return f"--max-new-tokens {args.max_new_tokens}: expected at least 1"
    if not args.temperature >= 0:  # NaN too
        return f"--temperature {args.temperature}: expected 0 (greedy) or more"
    if not 0 < args.top_p <= 1:
        return f"--top-p {args.top_p}: expected a value in (0, 1]"
    if not args.repetition_penalty >= 1:
        return f"--repetition-penalty {args.repetition_penalty}: expected 1 (none) or more"
    if args.context_tokens is not None and args.context_tokens <= args.max_new_tokens:
        return (
            f"--context-tokens {args.context_tokens}: must exceed --max-new-tokens {args.max_new_tokens}, "
            f"leaving room for the prompt"
        )
    if args.prompt is not None and args.prompts is not None:
        return "--prompt and --prompts: give one of them"
    if args.prompts is not None and not args.prompts.is_file():
        return f"--prompts {args.prompts}: no such file"
    if args.model not in (*MODELS, "export") and not Path(args.model).is_dir():
        return f"--model {args.model}: expected {', '.join(MODELS)} or export, or a model directory"
    return None


@contextlib.contextmanager
def template_errors(source: Path) -> Iterator[None]:
    """A chat template that jinja's sandbox refuses (or cannot render) as one line naming the model."""
    from jinja2 import TemplateError as JinjaError

    try:
        yield
    except TemplateError as exc:  # refused by the sandbox, or unusable as the pipeline needs it (lib/template.py)
        raise InputError(f"{source}: {exc}") from None
    except JinjaError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{source}: its chat template cannot be rendered ({type(exc).__name__}: {reason}); "
            f"fix chat_template in its tokenizer files"
        ) from None


def load_gguf_file(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """The exported GGUF, or one line when the file is empty, truncated or not GGUF."""
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: empty; {RESTORE_EXPORT}")
    try:
        return load_gguf(path, dtype)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, IndexError, EOFError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path}: not a readable GGUF file, truncated or corrupted ({reason}); {RESTORE_EXPORT}"
        ) from None


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, Path]:
    """The model and tokenizer `--model` names, with the tokenizer formatting prompts as the pipeline scored them."""
    if args.model == "export":  # read through transformers' GGUF loader, as the export stage verified it
        model, tokenizer = load_gguf_file(EXPORT_GGUF, inference_dtype(device))
        return model.to(device), tokenizer, EXPORT_GGUF
    source = MODELS.get(args.model, Path(args.model))
    model, tokenizer = load_causal_lm(source, inference_dtype(device), device)
    if args.model == "base":  # as score@base renders its prompts: the base template with tokenize.system_prompt applied
        with template_errors(source):
            tokenizer = with_system_prompt(tokenizer, load_params().tokenize.system_prompt)
    return model, tokenizer, source


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device()
    model, tokenizer, source = load_model(args, device)
    with template_errors(source):
        talk(Chat(model, tokenizer, args), args)
    return 0


def talk(chat: Chat, args: argparse.Namespace) -> None:
    if args.prompt is not None:
        print(chat.reply(args.prompt))
    elif args.prompts is not None:
        for prompt in prompts_from(args.prompts):
            if not args.keep_history:
                chat.reset()
            print(json.dumps({"prompt": prompt, "reply": chat.reply(prompt)}, ensure_ascii=False), flush=True)
    else:
        interactive(chat)


if __name__ == "__main__":
    run(main)
