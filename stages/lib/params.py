"""The typed schema of `params.yaml`, validated before any stage does work.

Values live in params.yaml only: the schema holds types and ranges, and every key is required, so deleting
one is an error rather than a silent change of behaviour outside DVC's view.

Every stage calls `load_params()`, which validates the whole file (so a typo in
any section is caught by whichever stage runs first) and returns typed objects.
Errors name the key path, the value and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = Path(os.environ.get("PARAMS_FILE", "params.yaml"))


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RowColumns(Section):
    """Column names for flat CSV/Parquet/JSONL rows: one row per message."""

    conversation_id: str
    speaker: str
    text: str
    order: Optional[str]
    topic: Optional[str]


class DataParams(Section):
    source: str = Field(..., min_length=1)
    format: Literal["auto", "chitchat", "openai", "sharegpt", "rows"]
    columns: RowColumns
    hub_split: str
    max_conversations: Optional[int] = Field(..., ge=1)


class PreprocessParams(Section):
    min_turns: int = Field(..., ge=1)
    max_turn_chars: int = Field(..., ge=1)
    scrub_pii: bool
    lowercase: bool
    val_fraction: float = Field(..., ge=0.0, lt=1.0)
    test_fraction: float = Field(..., ge=0.0, lt=1.0)
    split_by: Literal["random", "stratify_topic", "group_topic"]
    unseen_topics: int = Field(..., ge=0)  # whole topics held out of every split into test_unseen.jsonl

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> "PreprocessParams":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 (got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class ModelParams(Section):
    base: str = Field(..., min_length=1)
    revision: Optional[str]
    trust_remote_code: bool


class TokenizeParams(Section):
    max_length: int = Field(..., ge=16, le=32768)
    loss_on: Literal["assistant", "all"]
    role_swap: bool
    # 'default' (the template's own system prompt, if it injects one), 'none', or the text of a system message;
    # written into the chat template saved with the tokenized data and the fine-tuned model.
    system_prompt: str = Field(..., min_length=1)
    max_val_examples: Optional[int] = Field(..., ge=1)
    # message content holding the tokenizer's special-token strings (`<|im_start|>system`): 'text' trains it as the
    # plain text it is, 'drop' leaves those conversations out; counted in metrics/tokenize.json either way
    special_token_text: Literal["text", "drop"]


class LoraParams(Section):
    r: int = Field(..., ge=1)
    alpha: int = Field(..., ge=1)
    dropout: float = Field(..., ge=0.0, lt=1.0)
    target_modules: Union[str, list[str]]  # 'all-linear' (peft: every linear layer but the output head) or module names
    merge: bool

    @field_validator("target_modules", mode="before")
    @classmethod
    def _all_linear_or_names(cls, value: Any) -> Any:
        if value == "all-linear" or (
            isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
        ):
            return value
        raise ValueError("expected 'all-linear' or a non-empty list of module names such as [q_proj, v_proj]")


class TrainParams(Section):
    seed: int = Field(..., ge=0)  # initialisation and data order; the split seed stays fixed for replicates
    method: Literal["full", "lora", "qlora"]
    processes: int = Field(..., ge=1)
    nodes: int = Field(..., ge=1)  # machines of one training job (torchrun rendezvous: stages/lib/launch.py)
    distributed: Literal["ddp", "fsdp"]  # ddp: a copy per process; fsdp: weights, gradients, optimizer state sharded
    learning_rate: float = Field(..., gt=0.0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    warmup_ratio: float = Field(..., ge=0.0, lt=1.0)
    weight_decay: float = Field(..., ge=0.0)
    batch_size: int = Field(..., ge=1)
    gradient_accumulation: int = Field(..., ge=1)
    max_steps: int = Field(..., ge=-1)
    epochs: float = Field(..., gt=0.0)
    eval_steps: int = Field(..., ge=1)
    early_stopping_patience: Optional[int] = Field(..., ge=1)
    max_grad_norm: float = Field(..., gt=0.0)
    gradient_checkpointing: bool
    torch_compile: Union[Literal["auto"], bool]
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    attention: Literal["auto", "sdpa", "eager"]
    logging_steps: int = Field(..., ge=1)
    save_steps: int = Field(..., ge=1)
    lora: LoraParams

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainParams":
        if self.max_steps == 0:
            raise ValueError("max_steps must be positive, or -1 to train for `epochs`")
        if self.save_steps % self.logging_steps:
            # A resumed run restarts its loss average at the checkpoint: on a logging step, its curve is the same.
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of logging_steps ({self.logging_steps})"
            )
        if self.distributed == "fsdp" and self.method == "qlora":
            raise ValueError(
                "distributed: fsdp cannot shard the 4-bit bitsandbytes weights of method qlora; use ddp "
                "(or method lora to shard)"
            )
        return self


class GateParams(Section):
    min_perplexity_improvement: float = Field(..., ge=-1.0, le=1.0)  # relative: 1 - ppl_finetuned / ppl_base
    min_stop_rate: float = Field(..., ge=0.0, le=1.0)
    max_empty_reply_rate: float = Field(..., ge=0.0, le=1.0)
    max_generic_reply_share: Optional[float] = Field(..., ge=0.0, le=1.0)
    min_ranking_change: Optional[float] = Field(..., ge=-1.0, le=1.0)  # hits@1 fine-tuned - base (null: not checked)
    use_lower_bound: bool
    fail_on_gate: bool


class BootstrapParams(Section):
    resamples: int = Field(..., ge=100, le=100000)
    confidence: float = Field(..., gt=0.5, lt=1.0)


class RankingParams(Section):
    candidates: int = Field(..., ge=2, le=100)  # the real reply and candidates - 1 length-matched distractors
    turns_per_conversation: int = Field(..., ge=1)


class EvaluateParams(Section):
    max_conversations: Optional[int] = Field(..., ge=1)
    max_unseen_conversations: Optional[int] = Field(..., ge=0)
    turns_per_conversation: int = Field(..., ge=1)
    max_new_tokens: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1)
    precision: Literal["auto", "bf16", "fp32"]
    do_sample: bool
    temperature: float = Field(..., gt=0.0)
    top_p: float = Field(..., gt=0.0, le=1.0)
    repetition_penalty: float = Field(..., ge=1.0)
    ranking: RankingParams
    depth_buckets: list[int] = Field(..., min_length=1)
    min_slice_replies: int = Field(..., ge=1)
    bootstrap: BootstrapParams
    transcripts: int = Field(..., ge=0)
    gate: GateParams

    @model_validator(mode="after")
    def _buckets_ascend(self) -> "EvaluateParams":
        if self.depth_buckets != sorted(set(self.depth_buckets)) or self.depth_buckets[0] != 1:
            raise ValueError(f"depth_buckets must be strictly increasing and start at 1 (got {self.depth_buckets})")
        return self


class LogitTolerance(Section):
    f32: float = Field(..., gt=0.0)
    f16: float = Field(..., gt=0.0)


class RoundTripParams(Section):
    conversations: int = Field(..., ge=1)
    # At least one: the greedy replies are the round trip's end-to-end check (template, tokenizer, stop tokens);
    # with none, an f16/f32 export would pass on logits alone.
    prompts: int = Field(..., ge=1)
    max_new_tokens: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1)
    logit_tolerance: LogitTolerance
    max_perplexity_increase: float = Field(..., gt=0.0, lt=1.0)


class ExportParams(Section):
    precision: Literal["f16", "q8_0", "f32"]
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]*$")  # also the Ollama model name
    license: str = Field(..., min_length=1)
    round_trip: RoundTripParams


class EncoderParams(Section):
    model: str = Field(..., min_length=1)  # bundled name or a local sentence-encoder directory (safetensors)


class Params(Section):
    seed: int = Field(..., ge=0)
    data: DataParams
    preprocess: PreprocessParams
    model: ModelParams
    tokenize: TokenizeParams
    train: TrainParams
    encoder: EncoderParams
    evaluate: EvaluateParams
    export: ExportParams

    @model_validator(mode="after")
    def _generation_fits_the_context(self) -> "Params":
        if self.evaluate.max_new_tokens >= self.tokenize.max_length // 2:
            raise ValueError(
                f"evaluate.max_new_tokens ({self.evaluate.max_new_tokens}) must be below half of tokenize.max_length "
                f"({self.tokenize.max_length}): the rest of the window holds the prompt"
            )
        return self


Lines = dict[tuple, int]  # key path -> 1-based line in params.yaml


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return (
            f"{path}: unknown key (value {error['input']!r}); check the spelling against params.yaml's documented keys"
        )
    if error["type"] == "missing":
        return (
            f"{path}: missing; every key must be set in params.yaml (the repository's params.yaml documents each one)"
        )
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error["input"], dict):  # a cross-field check: the message names the fields, the section is noise
        return f"{path}: {message}" if path else message
    return f"{path}: {message} (got {error['input']!r})"


def _line_of(loc: tuple, lines: Lines) -> int | None:
    """The line of the deepest key on `loc` that the file has (a missing key: its section's line)."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def parse_params(raw: Any, source: str = str(PARAMS_FILE), lines: Lines | None = None) -> Params:
    """Validate; each problem is one line `source[:line]: key.path: what is wrong (got value)`."""
    if not isinstance(raw, dict):
        found = "nothing (the file is empty)" if raw is None else type(raw).__name__
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {found}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            line = _line_of(tuple(error["loc"]), lines or {})
            problems.append(f"{source}{f':{line}' if line else ''}: {_describe(error)}")
        raise ParamsError("\n".join(problems)) from None


def _key_lines(node: yaml.Node, source: Path, path: tuple = (), lines: Lines | None = None) -> Lines:
    """Each key path's line; a key given twice in one mapping is an error (YAML loaders silently keep the last)."""
    lines = {} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(part) for part in (*path, key))
                raise ParamsError(
                    f"{source}:{line}: duplicate key {dotted!r} (first set at line {seen[key]}); keep one"
                )
            seen[key] = line
            lines[(*path, key)] = line
            _key_lines(value_node, source, (*path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _key_lines(item, source, (*path, index), lines)
    return lines


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """`file:line:column: not valid YAML: problem (context)`, not PyYAML's multi-line report naming <unicode string>."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f"{path}: not valid YAML ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    mark = exc.problem_mark
    context = exc.context or ""
    if exc.context_mark is not None and exc.context_mark.line != mark.line:
        context += f" started at line {exc.context_mark.line + 1}"
    detail = f" ({context.strip()})" if context else ""
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {exc.problem}{detail}"


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the repository root") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ParamsError(f"{path}: unreadable ({exc.strerror})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines = _key_lines(node, path) if node is not None else {}
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ParamsError(_yaml_problem(path, exc)) from None
    finally:
        loader.dispose()
    return parse_params(raw, str(path), lines)
