"""The typed schema of `params.yaml`, validated before any stage does work.

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

    conversation_id: str = "conversation_id"
    speaker: str = "speaker"
    text: str = "text"
    order: Optional[str] = None
    topic: Optional[str] = None


class DataParams(Section):
    source: str = Field("chitchat", min_length=1)
    format: Literal["auto", "chitchat", "openai", "sharegpt", "rows"] = "auto"
    columns: RowColumns = RowColumns()
    hub_split: str = "train"
    max_conversations: Optional[int] = Field(None, ge=1)


class PreprocessParams(Section):
    min_turns: int = Field(2, ge=1)
    max_turn_chars: int = Field(2000, ge=1)
    scrub_pii: bool = True
    lowercase: bool = False
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    split_by: Literal["random", "stratify_topic", "group_topic"] = "stratify_topic"

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> "PreprocessParams":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 (got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class ModelParams(Section):
    base: str = Field("smollm2-135m-instruct", min_length=1)
    revision: Optional[str] = None
    trust_remote_code: bool = False


class TokenizeParams(Section):
    max_length: int = Field(256, ge=16, le=32768)
    loss_on: Literal["assistant", "all"] = "assistant"
    role_swap: bool = True
    max_val_examples: Optional[int] = Field(None, ge=1)


class LoraParams(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
    merge: bool = True


class TrainParams(Section):
    method: Literal["full", "lora"] = "full"
    processes: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=-1)
    epochs: float = Field(1.0, gt=0.0)
    eval_steps: int = Field(50, ge=1)
    early_stopping_patience: Optional[int] = Field(None, ge=1)
    max_grad_norm: float = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(50, ge=1)
    lora: LoraParams = LoraParams()

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainParams":
        if self.max_steps == 0:
            raise ValueError("max_steps must be positive, or -1 to train for `epochs`")
        if self.save_steps % self.logging_steps:
            # A resumed run restarts its loss average at the checkpoint: on a logging step, its curve is the same.
            raise ValueError(f"save_steps ({self.save_steps}) must be a multiple of logging_steps ({self.logging_steps})")
        return self


class GateParams(Section):
    min_perplexity_improvement: float = Field(0.3, ge=-1.0, le=1.0)  # relative: 1 - ppl_finetuned / ppl_base
    min_stop_rate: float = Field(0.9, ge=0.0, le=1.0)
    fail_on_gate: bool = False


class EvaluateParams(Section):
    max_conversations: int = Field(24, ge=1)
    turns_per_conversation: int = Field(2, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=1.0)
    depth_buckets: list[int] = Field([1, 3, 7, 15], min_length=1)
    transcripts: int = Field(8, ge=0)
    gate: GateParams = GateParams()

    @model_validator(mode="after")
    def _buckets_ascend(self) -> "EvaluateParams":
        if self.depth_buckets != sorted(set(self.depth_buckets)) or self.depth_buckets[0] != 1:
            raise ValueError(f"depth_buckets must be strictly increasing and start at 1 (got {self.depth_buckets})")
        return self


class Params(Section):
    seed: int = Field(42, ge=0)
    data: DataParams = DataParams()
    preprocess: PreprocessParams = PreprocessParams()
    model: ModelParams = ModelParams()
    tokenize: TokenizeParams = TokenizeParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "<top level>"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key (value {error['input']!r}); check the spelling against params.yaml's documented keys"
    message = error["msg"].removeprefix("Value error, ")
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
