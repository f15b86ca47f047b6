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
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class LoraParams(Section):
    r: int = Field(..., ge=1)
    alpha: int = Field(..., ge=1)
    dropout: float = Field(..., ge=0.0, lt=1.0)
    target_modules: list[str]
    merge: bool


class TrainParams(Section):
    method: Literal["full", "lora"]
    processes: int = Field(..., ge=1)
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
    torch_compile: bool
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    logging_steps: int = Field(..., ge=1)
    save_steps: int = Field(..., ge=1)
    lora: LoraParams

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainParams":
        if self.max_steps == 0:
            raise ValueError("max_steps must be positive, or -1 to train for `epochs`")
        if self.save_steps % self.logging_steps:
            # A resumed run restarts its loss average at the checkpoint: on a logging step, its curve is the same.
            raise ValueError(f"save_steps ({self.save_steps}) must be a multiple of logging_steps ({self.logging_steps})")
        return self


class GateParams(Section):
    min_perplexity_improvement: float = Field(..., ge=-1.0, le=1.0)  # relative: 1 - ppl_finetuned / ppl_base
    min_stop_rate: float = Field(..., ge=0.0, le=1.0)
    use_lower_bound: bool
    fail_on_gate: bool


class BootstrapParams(Section):
    resamples: int = Field(..., ge=100, le=100000)
    confidence: float = Field(..., gt=0.5, lt=1.0)


class EvaluateParams(Section):
    max_conversations: Optional[int] = Field(..., ge=1)
    turns_per_conversation: int = Field(..., ge=1)
    max_new_tokens: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1)
    precision: Literal["auto", "bf16", "fp32"]
    do_sample: bool
    temperature: float = Field(..., gt=0.0)
    top_p: float = Field(..., gt=0.0, le=1.0)
    repetition_penalty: float = Field(..., ge=1.0)
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
    prompts: int = Field(..., ge=0)
    max_new_tokens: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1)
    logit_tolerance: LogitTolerance
    max_perplexity_increase: float = Field(..., gt=0.0, lt=1.0)


class ExportParams(Section):
    precision: Literal["f16", "q8_0", "f32"]
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]*$")  # also the Ollama model name
    license: str = Field(..., min_length=1)
    round_trip: RoundTripParams


class Params(Section):
    seed: int = Field(..., ge=0)
    data: DataParams
    preprocess: PreprocessParams
    model: ModelParams
    tokenize: TokenizeParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams

    @model_validator(mode="after")
    def _generation_fits_the_context(self) -> "Params":
        if self.evaluate.max_new_tokens >= self.tokenize.max_length // 2:
            raise ValueError(f"evaluate.max_new_tokens ({self.evaluate.max_new_tokens}) must be below half of tokenize.max_length "
                             f"({self.tokenize.max_length}): the rest of the window holds the prompt")
        return self


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key (value {error['input']!r}); check the spelling against params.yaml's documented keys"
    if error["type"] == "missing":
        return f"{path}: missing; every key must be set in params.yaml (the repository's params.yaml documents each one)"
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error["input"], dict):  # a cross-field check: the message names the fields, the section is noise
        return f"{path}: {message}" if path else message
    return f"{path}: {message} (got {error['input']!r})"


def parse_params(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  {_describe(e)}" for e in exc.errors())
        raise ParamsError(f"{source}: invalid parameters:\n{lines}") from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the repository root") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
