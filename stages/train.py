"""Stage `train`: fine-tune models/base on data/tokenized with the Hugging Face Trainer.

    python -m stages.train            (what dvc.yaml runs: params and inputs checked, and the precision and
                                       compile choices measured, in this one process; then it trains here when
                                       the job is one process, or starts torchrun for train.processes per
                                       machine on train.nodes machines: stages/lib/launch.py)
    python -m stages.train --check    (the checks only)
    torchrun --standalone --nproc_per_node N -m stages.train   (the workers of the job; N > 1 on CPU uses gloo)
    accelerate launch -m stages.train                          (with your accelerate config)
train.distributed picks DDP (a full copy per process) or FSDP2 (weights, gradients and optimizer state sharded).
A job of several processes starts under torchrun, not `accelerate launch`: without a config, accelerate pins
CPU runs to one thread.

Writes models/finetuned/ (safetensors + tokenizer + chat template + generation config), metrics/train.json,
DVCLive curves under dvclive/ for `dvc plots`, and resumable checkpoints under models/checkpoints/; only the
job's first process writes them.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, so that the restart repeats only the interpreter's start
    from stages.lib.allocator import restart_with_allocator_tunables

    restart_with_allocator_tunables()

import contextlib
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import torch

from stages.lib.precision import keep_compile_cache

# Before the Trainer's import: it imports torch._dynamo, which fixes inductor's cache to torch's default under
# /tmp (emptied by a reboot) when TORCHINDUCTOR_CACHE_DIR is unset.
keep_compile_cache()

from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import DVCLiveCallback

from stages.lib.allocator import keep_freed_memory
from stages.lib.atomic import publish_together, write_json
from stages.lib.cli import ArgumentParser, run
from stages.lib.conversations import InputError
from stages.lib.labels import IGNORE_INDEX
from stages.lib.launch import main as launch
from stages.lib.launch import rendezvous, use_slot
from stages.lib.machine import describe as describe_machine
from stages.lib.modeling import (
    collator,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    read_config,
    trained_logits,
    unwrap,
)
from stages.lib.params import Params, TrainParams, load_params
from stages.lib.paths import BASE_MODEL, TOKENIZED
from stages.lib.paths import FINETUNED as OUTPUT
from stages.lib.precision import (
    CompileChoice,
    PrecisionChoice,
    choose,
    choose_compile,
    gemm_ceiling,
    keep_compile_cache,
)

CHECKPOINTS = Path("models/checkpoints")  # scratch for resuming, outside DVC: a persist out would disable the run-cache
FINGERPRINT = CHECKPOINTS / "fingerprint.json"
# Precision and compile, measured once by the job's first process, read by every torchrun worker.
MACHINE_CHOICES = CHECKPOINTS / "machine.json"
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_RUNTIME = Path("metrics/runtime/train.json")  # wall-clock and this process's history: not reproducible
DVCLIVE_DIR = Path("dvclive")
WALL_CLOCK = re.compile(r"runtime|per_second|tokens_per_s|flos|preparation_time")


def resolve_precision(requested: str, config: Any) -> PrecisionChoice:
    """`auto`: bf16 on a GPU that supports it; on a CPU, bf16 autocast only where bf16 GEMMs at this model's
    shapes measure clearly faster than float32 (stages/lib/precision.py). An explicit precision the machine
    cannot run is an error, never a silent float32 run recorded under another name."""
    if requested == "fp16" and not torch.cuda.is_available():  # the Trainer would silently run it in float32
        raise InputError("train.precision: fp16 needs a CUDA GPU and this machine has none; use auto, bf16 or fp32")
    if requested == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise InputError(
            f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(0)}; use auto, fp16 or fp32"
        )
    return choose(requested, config)


def attention_implementation(requested: str, model: Any = None) -> str:
    """`auto`: sdpa on a GPU (fused kernels); eager on a CPU, where torch's sdpa kernel for a padded batch (an
    explicit mask) ran a bf16 training step 15% slower than eager attention (benchmarks/NOTES.md; the
    stage-sdpa variant of benchmarks/train_throughput.py measures it again on any machine). An architecture
    transformers runs without sdpa (Gemma 2: its attention soft-capping) gets eager under `auto`."""
    chosen = requested if requested != "auto" else "sdpa" if torch.cuda.is_available() else "eager"
    if chosen == "sdpa" and model is not None and not getattr(type(unwrap(model)), "_supports_sdpa", True):
        if requested == "sdpa":
            raise InputError(
                f"train.attention: sdpa, but transformers runs {type(unwrap(model)).__name__} without sdpa; "
                "use auto or eager"
            )
        return "eager"
    return chosen


def fingerprint(params: Params, precision: PrecisionChoice, compiled: CompileChoice) -> str:
    """Identity of a training run: a checkpoint is resumed only by the run that wrote it, in the precision and
    compilation it measured (a resume must not continue an fp32 run in bf16)."""
    parts = [
        json.dumps(params.train.model_dump(), sort_keys=True),
        str(params.train.seed),
        precision.precision,
        str(compiled.enabled),
    ]
    for path in (
        TOKENIZED / "train" / "state.json",
        TOKENIZED / "val" / "state.json",
        BASE_MODEL / "model_card.json",
        BASE_MODEL / "config.json",
    ):
        parts.append(path.read_text() if path.exists() else "")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def complete(checkpoint: Path, processes: int) -> bool:
    """Whether a checkpoint was written whole. The first process writes trainer_state.json after its own parts,
    but every other process writes its RNG state on its own, unsynchronised: a run killed in between leaves a
    checkpoint that the Trainer resumes without that process's RNG state (logged at info level only), on another
    random stream, or fails on a cut-short file. torch.save writes a zip, whose end record comes last: a file cut
    short is not a zip."""
    names = ["rng_state.pth"] if processes == 1 else [f"rng_state_{rank}.pth" for rank in range(processes)]
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return all(zipfile.is_zipfile(checkpoint / name) for name in names)


def resumable_checkpoint(identity: str, processes: int) -> str | None:
    """The last complete checkpoint of an interrupted run with the same fingerprint, if any."""
    if not FINGERPRINT.exists() or json.loads(FINGERPRINT.read_text()).get("fingerprint") != identity:
        return None
    checkpoints = sorted(CHECKPOINTS.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    return next((str(c) for c in checkpoints if complete(c, processes)), None)


def reset_checkpoints(identity: str, status: str) -> None:
    if CHECKPOINTS.exists():
        for child in CHECKPOINTS.iterdir():
            if child.name.startswith("checkpoint-"):
                shutil.rmtree(child)
    write_json(FINGERPRINT, {"fingerprint": identity, "status": status})


def loss_before_training(trainer: Any, has_val: bool, resume: str | None, rank0: bool) -> float | None:
    """The base model's validation loss: measured on a fresh start and kept beside the checkpoints, so that
    a resumed run reports the same number as an uninterrupted one."""
    if not has_val:
        return None
    if resume is not None:
        return json.loads(FINGERPRINT.read_text()).get("eval_loss_before")
    before = trainer.evaluate()["eval_loss"]
    if rank0:
        write_json(FINGERPRINT, {**json.loads(FINGERPRINT.read_text()), "eval_loss_before": before})
    return before


def lora_target_problem(targets: str | list[str], model: Any) -> str | None:
    """Why peft could not adapt `targets` in `model` (None when it can): an unknown name, or a name of a block
    rather than of a layer. 'all-linear' fits every architecture."""
    from transformers.pytorch_utils import Conv1D

    if targets == "all-linear":
        return None
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    modules = dict(model.named_modules())
    linear = sorted(
        {name.rsplit(".", 1)[-1] for name, module in modules.items() if isinstance(module, (torch.nn.Linear, Conv1D))}
    )
    for target in targets:
        matched = [module for name, module in modules.items() if name == target or name.endswith(f".{target}")]
        if not any(isinstance(module, adaptable) for module in matched):
            kind = f"names a {type(matched[0]).__name__}, not a layer" if matched else "matches no module"
            return (
                f"train.lora.target_modules: {target!r} {kind} in {type(model).__name__}; its linear layers are "
                f"{', '.join(linear)} (or set all-linear)"
            )
    return None


def preflight(params: Params, record: bool = True) -> tuple[PrecisionChoice, CompileChoice]:
    """Checks of params and inputs that need no weights, before any work: the first process runs them before it
    trains or torchrun starts the workers (so an error is one line, not a launcher report), and each worker
    runs them again. Returns the precision training runs in and whether it compiles: the first process (`record`)
    measures both and records them, and the workers reuse that record, so every process of a DDP run trains
    alike."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for path, stage in (
        (BASE_MODEL / "config.json", "base_model"),
        (TOKENIZED / "dataset_dict.json", "tokenize"),
        (TOKENIZED / "tokenizer" / "tokenizer_config.json", "tokenize"),
    ):
        if not path.exists():
            raise InputError(f"{path}: missing; run the {stage} stage first (dvc repro {stage})")
    requested = {
        "precision": params.train.precision,
        "torch_compile": params.train.torch_compile,
        "config": (BASE_MODEL / "config.json").read_text(),
    }
    recorded = json.loads(MACHINE_CHOICES.read_text()) if MACHINE_CHOICES.exists() and not record else {}
    if recorded.get("requested") == requested:
        precision, compiled = PrecisionChoice(**recorded["precision"]), CompileChoice(**recorded["compile"])
    else:
        precision = resolve_precision(params.train.precision, AutoConfig.from_pretrained(BASE_MODEL))
        compiled = choose_compile(params.train.torch_compile, pick_device())
    if params.train.method == "qlora":
        problem = qlora_problem()
        if problem:
            raise InputError(problem)
        compiled = CompileChoice(False, "train.method qlora: bitsandbytes' 4-bit layers train eagerly")
    if params.train.method in ("lora", "qlora"):
        read_config(BASE_MODEL)
        with torch.device("meta"):  # the architecture without its weights: instant, no memory
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(BASE_MODEL))
        problem = lora_target_problem(params.train.lora.target_modules, skeleton)
        if problem:
            raise InputError(problem)
    if record:  # every check passed: record the choices for the workers
        write_json(
            MACHINE_CHOICES, {"requested": requested, "precision": precision.as_dict(), "compile": compiled.as_dict()}
        )
    return precision, compiled


def qlora_problem() -> str | None:
    """Why train.method qlora cannot run here (None when it can): bitsandbytes' 4-bit kernels need CUDA."""
    if not torch.cuda.is_available():
        return (
            "train.method: qlora quantises the base model to 4 bits with bitsandbytes, which needs a CUDA device; "
            "this machine has none: use lora (the same adapters on a full-precision base) or full"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "train.method: qlora needs bitsandbytes (pip install bitsandbytes); use lora or full"
    return None


def lora_config(params: TrainParams) -> Any:
    from peft import LoraConfig

    lora = params.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def load_model(params: TrainParams) -> tuple[Any, Any]:
    """The base model (float32 weights) and the tokenizer tokenize used, LoRA-wrapped if asked; for qlora the
    base is quantised to 4 bits (NF4, bf16 compute, bitsandbytes) on this process's GPU and LoRA trains on top."""
    if params.method == "qlora":
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            BASE_MODEL,
            quantization_config=quantization,
            dtype=torch.bfloat16,
            use_safetensors=True,
            device_map={"": int(os.environ.get("LOCAL_RANK", 0))},
        )
        model.set_attn_implementation(attention_implementation(params.attention, model))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
        return get_peft_model(model, lora_config(params)), tokenize_stage_tokenizer()
    model, _ = load_causal_lm(BASE_MODEL)
    model.set_attn_implementation(attention_implementation(params.attention, model))
    tokenizer = tokenize_stage_tokenizer()
    if params.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(params))
    return model, tokenizer


def merged_bf16(model: Any, params: TrainParams) -> Any:
    """A QLoRA run's adapters merged into the base loaded in bf16 (not into its 4-bit copy, which would round
    the merged weights to 4 bits): the model score and export read."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapters = {
        name: value.detach().to("cpu", torch.bfloat16) for name, value in get_peft_model_state_dict(model).items()
    }
    base, _ = load_causal_lm(BASE_MODEL, torch.bfloat16)
    wrapped = get_peft_model(base, lora_config(params))
    set_peft_model_state_dict(wrapped, adapters)
    return wrapped.merge_and_unload()


def tokenize_stage_tokenizer() -> Any:
    """The tokenizer exactly as tokenize used it (its chat template carries the system prompt choice)."""
    if not (TOKENIZED / "tokenizer" / "tokenizer_config.json").exists():
        raise InputError(f"{TOKENIZED}: no tokenized data; run the tokenize stage first (dvc repro tokenize)")
    return load_tokenizer(TOKENIZED / "tokenizer")


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of `targets`, in float32 whatever the logits' dtype (bf16 under autocast).
    Compiled (train.torch_compile), the upcast, log-softmax, gather and sum become one pass over the logits and
    the backward one more: eager, each makes a [positions × vocabulary] float32 tensor (~150 MB at the default
    batch), and the log-softmax backward alone took 7% of a step (benchmarks/NOTES.md)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def trained_position_loss(
    model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None, nll: Any = nll_sum
) -> tuple[torch.Tensor, Any]:
    """Causal LM loss over trained positions only: summed NLL over `num_items_in_batch` (the trained-token
    count of the whole accumulated, all-process batch, DESIGN §4.6), or the batch's own count when none is given."""
    scored = trained_logits(model, inputs, upcast=False)
    total = nll(scored.logits, scored.targets)
    count = scored.targets.numel() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device, dtype=total.dtype).clamp(min=1), scored


def seeded_length_sampler(dataset: Any, batch_size: int, seed: int) -> Any:
    """Length-grouped batches in an order that depends only on (seed, epoch) and not on length.

    transformers' LengthGroupedSampler puts the longest batch first (to fail early on memory) and draws from
    the global RNG, which differs between an uninterrupted and a resumed run. Here the batches are grouped by
    length for padding, then shuffled as whole batches, so warm-up and the peak learning rate see a
    representative slice, and resuming is exact.
    """
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            generator = torch.Generator().manual_seed(seed + int(self.epoch))
            grouped = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
            batches = [grouped[i : i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
            order = torch.randperm(len(batches), generator=generator).tolist()
            return iter([index for b in order for index in batches[b]])

    return SeededLengthGroupedSampler(batch_size, dataset=dataset, lengths=list(dataset["length"]))


class TokenCounter:
    """Counts non-pad and trained tokens of each training batch (for tokens/s and metrics)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.trained = 0
        self.batches = 0

    def add(self, inputs: dict[str, torch.Tensor]) -> None:
        self.batches += 1
        self.tokens += int(inputs["attention_mask"].sum())
        self.trained += int((inputs["labels"] != IGNORE_INDEX).sum())


def compile_settings() -> None:
    """Deterministic algorithms for compiled runs: without them inductor's C++ backward of the embedding lookup
    adds the rows of repeated tokens from parallel threads in no fixed order, so the embedding gradient, and
    every loss after the first step, differed run to run (benchmarks/NOTES.md); with them it generates an
    ordered accumulation, at no measured cost (once the NaN fill below is off). And inductor's cache kept past
    reboots."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, a debugging aid against kernels that read memory
    # they never wrote: a pass over all memory a step allocates (~2% of a step in the profile), then overwritten.
    torch.utils.deterministic.fill_uninitialized_memory = False
    keep_compile_cache()


def compile_blocks(model: Any) -> list[str]:
    """Regional compilation, in place: each module of a ModuleList of identical blocks (the decoder layers of any
    architecture, LoRA-wrapped or not), so inductor compiles one block's code for all of them. The embedding,
    final norm and head stay eager (the loss is compiled on its own: `nll_sum`). Returns the names of the
    compiled blocks."""
    compile_settings()
    compiled: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{block}.") for block in compiled)
        if (
            not inside
            and isinstance(module, torch.nn.ModuleList)
            and len(module) > 1
            and len({type(b) for b in module}) == 1
        ):
            for index, block in enumerate(module):
                block.compile()
                compiled.append(f"{name}.{index}")
    return compiled


def fsdp_settings(train: TrainParams) -> dict[str, Any]:
    """The Trainer's FSDP2 settings (accelerate's plugin): every decoder block (the model's `_no_split_modules`)
    and the whole model sharded across all processes of all nodes, weights gathered block by block inside the
    forward and freed after it; checkpoints hold the full state dict, so a run resumes on any process count."""
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
        "activation_checkpointing": train.gradient_checkpointing,
    }


# The training arithmetic (docs/DESIGN.md §4.6), all of it. One optimizer step sees a global batch of
# batch_size × gradient_accumulation × processes windows, holding N trained tokens (the Trainer counts N over
# all micro-batches and processes first and passes it as `num_items_in_batch`). For each micro-batch:
#     loss = Σ NLL over its trained positions / N               ChatTrainer.compute_loss (trained_position_loss)
#     loss = loss × processes                                   DDP's all-reduce averages the processes' gradients
#     loss.backward()                                           gradients add up over the accumulation steps
# and the optimizer steps once: the gradient of the mean NLL per trained token of the global batch, however the
# batch is split into processes and micro-batches (tests/test_train.py, test_6_*). Precision: bf16 autocast
# around the forward and the loss (`autocast_smart_context_manager`), the NLL summed in float32 (`nll_sum`).
# Order: batches grouped by length and shuffled whole, from (train.seed, epoch) alone (`seeded_length_sampler`).
#
# Trainer internals this relies on, each pinned by tests/test_train.py::test_the_trainer_internals_train_py_uses:
#   Trainer.loss_is_scaled_for_ga = True      training_step must not divide the loss by the accumulation steps
#   Trainer.model_accepts_loss_kwargs = True  the Trainer counts num_items_in_batch for every model
#   Trainer.accelerator.native_amp = False    accelerate must not wrap model.forward in its own autocast
#   Trainer._get_train_sampler (private)      overridden: the seeded sampler
#   Trainer.model_wrapped, Trainer._prepare_inputs (private)   the token-weighted evaluation loop
#   DVCLiveCallback._initialized (private)    Curves.setup skips DVCLive's dump of every TrainingArguments field
#   TrainingArguments.warmup_steps            a float below 1 is a ratio of the total steps (train.warmup_ratio)
#   Trainer._save_rng_state (private)         names each process's RNG file as `complete` expects


class ChatTrainer(Trainer):
    """The Hugging Face Trainer with the loss, precision, sampler and evaluation above; `counter` counts tokens."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's trained-token count itself

    def __init__(self, *args: Any, counter: TokenCounter, nll: Any = nll_sum, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counter, self.nll = counter, nll
        self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch for any model
        # bf16 autocast around the loss's forward here, not accelerate's wrapper of model.forward: that wrapper also
        # converts every output to float32, a [positions × vocabulary] float32 copy of the logits and one of their
        # gradient each step, which nll_sum's own upcast makes redundant. FSDP and DeepSpeed keep accelerate's
        # mixed precision (they shard and cast the weights themselves).
        plain = not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        self.autocast_dtype = torch.bfloat16 if self.args.bf16 and plain else None
        if self.autocast_dtype is not None:
            self.accelerator.native_amp = False

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        if self.autocast_dtype is None:
            return super().autocast_smart_context_manager(cache_enabled)
        return torch.autocast(self.args.device.type, dtype=self.autocast_dtype, cache_enabled=cache_enabled)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.counter.add(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Grouped by the global batch (all processes, all accumulation steps): the same windows form one
        # optimizer step whether it runs as 1 process × 8 or 2 processes × 4.
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return seeded_length_sampler(dataset, global_batch, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = trained_position_loss(model, inputs, num_items_in_batch, self.nll)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Token-weighted validation loss (total NLL over all trained tokens, as the score stage computes it),
        not the Trainer's mean of per-batch means."""
        loader = self.get_eval_dataloader(eval_dataset)
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        # One autocast region for the whole pass: the precision training runs in, before training (when
        # accelerate has not yet wrapped an fp16 model's forward) as after, and weights cast once, not per batch.
        half = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        cast = torch.autocast(self.args.device.type, dtype=half) if half else contextlib.nullcontext()
        with torch.no_grad(), cast:
            for inputs in loader:
                inputs = self._prepare_inputs(inputs)
                scored = trained_logits(model, inputs)
                per_position = torch.nn.functional.cross_entropy(scored.logits, scored.targets, reduction="none")
                by_example = sums.new_zeros(scored.keep.shape)
                by_example[scored.keep] = per_position.double()  # [example, position]: the logits' row-major order
                example_nll, example_tokens = by_example.sum(1), scored.keep.sum(1).double()
                # Per example, so that accelerate can drop the examples its sampler repeated to give every
                # process as many batches: summed across processes, they counted twice.
                example_nll, example_tokens = self.accelerator.gather_for_metrics((example_nll, example_tokens))
                sums += torch.stack([example_nll.sum(), example_tokens.sum()])
        model.train(was_training)
        metrics = {
            f"{metric_key_prefix}_loss": float(sums[0] / sums[1].clamp(min=1)),
            f"{metric_key_prefix}_tokens": int(sums[1]),
        }
        self.log({f"{metric_key_prefix}_loss": metrics[f"{metric_key_prefix}_loss"]})
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class Throughput(TrainerCallback):
    """Adds tokens/s since the previous log to each log record (DVCLive then plots it)."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self.last = (time.perf_counter(), 0, 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now, tokens, trained = time.perf_counter(), self.counter.tokens, self.counter.trained
        elapsed = max(now - self.last[0], 1e-9)
        world = max(args.world_size, 1)
        logs["tokens_per_s"] = round((tokens - self.last[1]) * world / elapsed, 1)
        logs["trained_tokens_per_s"] = round((trained - self.last[2]) * world / elapsed, 1)
        self.last = (now, tokens, trained)


class NoCheckpointAtTheEnd(TrainerCallback):
    """The Trainer checkpoints the last step too, though the finished run deletes its checkpoints (1.6 GB for
    the default model). The trade-off: a run that dies after its last step (saving the model) resumes from the
    checkpoint before. Kept where load_best_model_at_end reads checkpoints."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and not args.load_best_model_at_end:
            control.should_save = False


class Curves(DVCLiveCallback):
    """DVCLive's curves without its dump of every TrainingArguments field: params.yaml is the record, and an
    extra git-tracked output would switch off DVC's run-cache for this stage."""

    def setup(self, args, state, model):
        self._initialized = True

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        # Wall-clock series (runtimes, samples/s, tokens/s) differ on every run: they belong to
        # metrics/runtime/train.json, not to git-tracked curves that `dvc plots diff` compares.
        kept = {k: v for k, v in (logs or {}).items() if not WALL_CLOCK.search(k)}
        super().on_log(args, state, control, model=model, logs=kept, **kwargs)


def training_arguments(train: TrainParams, output_dir: Path, precision: str, has_val: bool, **overrides: Any) -> Any:
    """The Trainer's settings, all from params.yaml's `train` section."""
    early = train.early_stopping_patience is not None and has_val
    arguments = dict(
        output_dir=str(output_dir),
        seed=train.seed,
        data_seed=train.seed,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # below 1: a ratio of the total steps
        weight_decay=train.weight_decay,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation,
        max_steps=train.max_steps,
        num_train_epochs=train.epochs,
        max_grad_norm=train.max_grad_norm,
        activation_checkpointing=train.gradient_checkpointing,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps" if has_val else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=1 if not early else 2,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        remove_unused_columns=False,
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    if train.distributed == "fsdp":
        # FSDP's own activation checkpointing: the Trainer's would all-gather each block's weights a second time.
        arguments.update(fsdp=True, fsdp_config=fsdp_settings(train), activation_checkpointing=False)
    arguments.update(overrides)
    return TrainingArguments(**arguments)


def build_trainer(
    params: Params,
    model: Any,
    tokenizer: Any,
    datasets: Any,
    output_dir: Path,
    precision: PrecisionChoice | None = None,
    compiled: CompileChoice | None = None,
    **overrides: Any,
) -> tuple[ChatTrainer, TokenCounter]:
    train = params.train
    precision = (precision or resolve_precision(train.precision, model.config)).precision
    compiled = compiled or choose_compile(train.torch_compile, pick_device())
    nll = nll_sum
    if compiled.enabled:
        compile_blocks(model)
        nll = torch.compile(nll_sum, dynamic=True)  # dynamic: the count of trained positions differs every batch
    counter = TokenCounter()
    has_val = len(datasets["val"]) > 0
    args = training_arguments(train, output_dir, precision, has_val, **overrides)
    callbacks: list[Any] = [Throughput(counter), NoCheckpointAtTheEnd()]
    if train.early_stopping_patience is not None and has_val:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    if args.process_index == 0 and overrides.get("report_to", "dvclive") == "dvclive":
        from dvclive import Live

        callbacks.append(Curves(live=Live(dir=str(DVCLIVE_DIR), save_dvc_exp=False, dvcyaml=None, report=None)))
    trainer = ChatTrainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["val"] if has_val else None,
        data_collator=collator(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
        counter=counter,
        nll=nll,
    )
    return trainer, counter


def full_state_dict(trainer: Any) -> dict[str, torch.Tensor]:
    """The trained weights, whole, on the first process: under FSDP the shards gathered (a collective every process
    must join; the other processes get an empty dict), else the model's own state dict."""
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    return trainer.model.state_dict()


def end_worker(code: int) -> NoReturn:
    """End one of torchrun's workers at once, everything it writes written: the interpreter's teardown of its
    gloo process group sometimes aborted ("terminate called without an active exception") or hung, failing a job
    that had trained and saved. A gloo thread's last release of a tensor needs the GIL, which the main thread holds
    while it joins that thread in the group's destructor; `destroy_process_group` does not avoid it, as DDP's
    reducer keeps the group and frees it the same way (docs/DESIGN.md §8)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # NCCL collectives only order the stream: the last one may still be running
    sys.stdout.flush()
    sys.stderr.flush()
    import ctypes

    ctypes.CDLL(None).fflush(None)  # C stdio buffers (a library's printf) too
    os._exit(code)


def unsharded(params: TrainParams, weights: dict[str, torch.Tensor]) -> Any:
    """A whole copy of the trained model (LoRA-wrapped if it was) holding the gathered `weights`, so that an FSDP
    run saves (and merges) exactly what an unsharded run saves."""
    model, _ = load_model(params)
    model.load_state_dict(weights)
    return model


def saved_as(params: TrainParams) -> str:
    """What `save_model` writes: full weights, LoRA merged into them (the default) or the adapter alone, or the
    QLoRA adapters merged into a bf16 base."""
    if params.method == "qlora":
        return "qlora-merged-bf16"
    if params.method == "lora":
        return "lora-merged" if params.lora.merge else "lora-adapter"
    return "full"


def save_model(model: Any, tokenizer: Any, params: TrainParams, directory: Path) -> None:
    """Save weights (merged LoRA by default), tokenizer, chat template and generation config (DESIGN §4.8) into
    `directory`, which the caller publishes together with the training metrics."""
    saved = saved_as(params)
    if saved == "qlora-merged-bf16":
        model = merged_bf16(model, params)
    elif saved == "lora-merged":
        model = model.merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if saved == "lora-adapter":
        write_json(
            directory / "base_model.json",
            {"base_model": str(BASE_MODEL), "card": json.loads((BASE_MODEL / "model_card.json").read_text())},
        )


def mean_logged_loss(history: list[dict]) -> float | None:
    """Mean training loss over the logged steps, each log weighted by the steps it covers.

    Unlike the Trainer's `training_loss`, which only averages the steps since a resume, this is the same for
    an interrupted-and-resumed run as for an uninterrupted one (checkpoints fall on logging steps).
    """
    total, steps, last = 0.0, 0, 0
    for entry in history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    return round(total / steps, 4) if steps else None


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def die_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so killing the launcher's process group (`kill -9` of
    `dvc repro`, the OOM killer) used to leave the workers training on, writing checkpoints and DVCLive files
    beside the run that resumes. Linux delivers SIGKILL to a worker whose launcher is gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the line above
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    parser = ArgumentParser(description="Fine-tune models/base (see the module doc for launchers).")
    parser.add_argument(
        "--check", action="store_true", help="only check params and inputs, and record precision and compile choices"
    )
    args = parser.parse_args(argv)
    # Before anything imports torch._dynamo: that import sets TORCHINDUCTOR_CACHE_DIR to torch's default under /tmp
    # when it is unset, and a worker that reuses the recorded choices reaches compile_settings only after it.
    keep_compile_cache()
    params = load_params()
    shape = rendezvous(params.train.nodes, os.environ)  # a multi-node job that cannot meet: one line, before any work
    if params.train.distributed == "fsdp" and params.train.processes * shape.nodes == 1:
        raise InputError(
            "train.distributed: fsdp shards the model across processes, but train.processes is 1 on 1 node; "
            "set train.processes to the GPUs per machine (or run on several nodes), or use ddp"
        )
    worker = "TORCHELASTIC_RUN_ID" in os.environ  # one of torchrun's processes: the job was checked and launched
    # This experiment's cores and GPUs when queued experiments share the machine (STAGES_SLOTS).
    slot = use_slot(1 if worker else params.train.processes)
    precision, compiled = preflight(params, record=not worker)
    if args.check:
        return 0
    if not worker and params.train.processes * shape.nodes > 1:  # torchrun starts the job's processes
        return launch(["--nproc_per_node", str(params.train.processes), "-m", "stages.train"])  # execs torchrun
    allocator = keep_freed_memory()
    import datasets as hf_datasets
    from transformers import set_seed

    set_seed(params.train.seed)
    data = hf_datasets.load_from_disk(str(TOKENIZED))
    model, tokenizer = load_model(params.train)
    identity = fingerprint(params, precision, compiled)
    nodes = int(os.environ.get("WORLD_SIZE", "1")) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's
    # Checkpoints live on the first node's disk, which the other nodes do not see: a multi-node run that was
    # interrupted starts again from step 0 (to the same result), never from a step only one node could load.
    resume = resumable_checkpoint(identity, int(os.environ.get("WORLD_SIZE", "1"))) if nodes == 1 else None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if resume is None and rank0:
        reset_checkpoints(identity, "running")
    trainer, counter = build_trainer(params, model, tokenizer, data, CHECKPOINTS, precision, compiled)
    before = loss_before_training(trainer, len(data["val"]) > 0, resume, rank0)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - started
    history = trainer.state.log_history
    evals = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    final_eval = None
    if len(data["val"]):
        if trainer.args.load_best_model_at_end and trainer.state.best_metric is not None:
            final_eval = trainer.state.best_metric  # the saved model is the best checkpoint, not the last step
        else:
            at_end = [loss for step, loss in evals if step == trainer.state.global_step]
            final_eval = at_end[-1] if at_end else trainer.evaluate()["eval_loss"]
    weights = (
        full_state_dict(trainer) if trainer.is_fsdp_enabled else None
    )  # collective: before the other processes leave
    if not trainer.is_world_process_zero():
        end_worker(0)
    world = max(trainer.args.world_size, 1)
    ceiling = gemm_ceiling(
        unwrap(trainer.model),
        precision.precision,
        max(counter.tokens // max(counter.batches, 1), 1),
        counter.trained / max(counter.tokens, 1),
    )
    trained = trainer.model if weights is None else unsharded(params.train, weights)
    saved = saved_as(params.train)
    # Only what the same params and data reproduce, resumed or not: byte-identical across runs on one machine.
    metrics = {
        "method": saved,
        "precision": precision.precision,  # what ran (the review warns when two revisions differ)
        "processes": world,
        "steps": trainer.state.global_step,
        "train_loss": mean_logged_loss(history),
        "final_logged_train_loss": next((round(e["loss"], 4) for e in reversed(history) if "loss" in e), None),
        # Validation split, token-weighted over trained tokens (the same definition as evaluate's test perplexity).
        "val_loss_before": round(before, 4) if before is not None else None,
        "val_loss_after": round(final_eval, 4) if final_eval is not None else None,
        "best_val_loss": round(min([loss for _, loss in evals] + [final_eval]), 4) if final_eval is not None else None,
        "val_perplexity_before": round(math.exp(before), 3) if before is not None else None,
        "val_perplexity_after": round(math.exp(final_eval), 3) if final_eval is not None else None,
    }
    runtime = {
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
        "machine": describe_machine(),
        "precision": precision.as_dict(),  # the choice and why (measured GFLOP/s where `auto` measured)
        "attention": unwrap(trainer.model).config._attn_implementation,
        "compile": compiled.as_dict(),  # whether inductor compiled the decoder blocks and the loss, and why
        "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if compiled.enabled
        else None,  # what a later run reuses
        "allocator": allocator,
        "resumed_from_step": int(Path(resume).name.split("-")[-1]) if resume else 0,
        "distributed": params.train.distributed if world > 1 else None,
        "nodes": nodes,
        "slot": slot.as_dict() if slot else None,  # the share of this machine a queued experiment ran in (STAGES_SLOTS)
        "tokens_seen": counter.tokens * world,  # by this process since it started (after the resume point)
        "trained_tokens": counter.trained * world,
        "tokens_per_s": round(counter.tokens * world / wall, 1),
        "trained_tokens_per_s": round(counter.trained * world / wall, 1),
        "wall_time_s": round(wall, 1),
        # The limit: this step's GEMMs alone at the rate measured here just now (stages/lib/precision.py).
        "ceiling_tokens_per_s": ceiling.tokens_per_s,
        "ceiling_gflops": ceiling.gflops,
        "fraction_of_ceiling": ceiling.fraction(counter.tokens / wall),
        "peak_memory_mb": peak_memory_mb(),
    }
    # The model and its metrics are published together, or none of them (docs/DESIGN.md §9).
    with publish_together(files=[TRAIN_METRICS, TRAIN_RUNTIME], dirs=[OUTPUT]) as outputs:
        save_model(trained, tokenizer, params.train, outputs[OUTPUT])
        outputs.write_json(TRAIN_RUNTIME, runtime)
        outputs.write_json(TRAIN_METRICS, metrics)
    reset_checkpoints(identity, "complete")
    print(
        f"train: {metrics['steps']} steps ({saved}, {metrics['precision']}, {runtime['device']}), val loss "
        f"{metrics['val_loss_before']} -> {metrics['val_loss_after']}, {runtime['tokens_per_s']} tokens/s "
        f"({runtime['fraction_of_ceiling']:.0%} of the {runtime['ceiling_tokens_per_s']:.0f} tokens/s "
        "GEMM ceiling measured here), "
        f"{runtime['wall_time_s']} s, peak {runtime['peak_memory_mb']} MB -> {OUTPUT}"
    )
    if worker:
        end_worker(0)
    return 0


if __name__ == "__main__":
    run(main)
