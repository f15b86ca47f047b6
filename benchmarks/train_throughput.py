"""Training throughput against the limit measured in the same run, and against peers, on the same data.

    pip install -r benchmarks/requirements.txt                 # TRL, for the trl-* peer variants
    python benchmarks/train_throughput.py                      # the default variants, train.max_steps steps each
    python benchmarks/train_throughput.py --variants stage stage-no-compile --steps 20

The ceiling: before the variants run, the GEMMs of one training step at this model's own shapes (every linear
layer's forward, input gradient and weight gradient over a batch of the subset's mean width; the vocabulary
head at the trained positions) are timed in float32 and in bf16 (stages/lib/precision.py `gemm_ceiling`).
Tokens/s at that rate is the most a step could do if nothing but its matrix products ran; every variant is
reported as a fraction of the ceiling of the precision it ran in. On CUDA the same code measures the GPU's
GEMMs; `--peak-tflops` adds MFU against the device's dense peak.

Needs the pipeline's data/tokenized and models/base (`dvc repro tokenize`). Every stage variant trains on
the stage's own first `steps` batches (its length-grouped sampler over the whole training split, as a
pipeline run draws them), the baseline on a seeded random subset of as many windows, TRL on as many
processed conversations: one pass, same learning-rate schedule, each in its own subprocess (so peak
resident memory is its own). Then each scores the same held-out validation set
(assistant tokens, the loss the pipeline reports). Prints a table and writes benchmarks/results/train.json.

Variants
- baseline: what most users start from (transformers' run_clm.py approach): Trainer, float32, every
  example padded to max_length, the model's own loss on every non-pad token, full vocabulary logits
  at every position, random batches.
- stage: `stages.train.build_trainer` with params.yaml's train section (length-grouped dynamic padding,
  loss and vocabulary head at trained positions only, precision `auto`, torch_compile `auto`), with the
  inductor cache an earlier variant of this invocation filled (stage-cold, when it ran first).
- stage-*: the stage with one lever changed (see VARIANTS), for benchmarks/NOTES.md. stage-cold compiles
  with an empty inductor cache (a machine's first run); stage-no-compile trains eagerly.
- stage-default-malloc: the stage with glibc's default malloc (every other stage variant, as the stage, keeps
  freed memory and runs without glibc's tcache: stages/lib/allocator.py).
- trl-fp32, trl-bf16: TRL's SFTTrainer (benchmarks/requirements.txt) on the same processed conversations,
  base model, batch size and max_length, with its defaults otherwise (loss on every token, padding to the
  longest row, truncation instead of windows). trl-bf16-kept-memory: with the stage's allocator setting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.lib.allocator import keep_freed_memory, with_allocator_tunables  # noqa: E402
from stages.lib.labels import IGNORE_INDEX  # noqa: E402
from stages.lib.modeling import collator, trained_logits, unwrap  # noqa: E402
from stages.lib.params import Params, load_params  # noqa: E402

RESULTS = Path("benchmarks/results/train.json")
TOKENIZED = Path("data/tokenized")
PROCESSED_TRAIN = Path("data/processed/train.jsonl")
BASE_MODEL = Path("models/base")
COMPILE_CACHE = Path(tempfile.gettempdir()) / "train_throughput_inductor"
DEFAULT_VARIANTS = ["baseline", "trl-fp32", "trl-bf16", "stage-fp32", "stage-no-compile", "stage-cold", "stage"]


def stage_overrides(args: dict | None = None, **train_changes: Any) -> Callable[[Params], tuple[Params, dict]]:
    """A stage variant: params.train fields to change, and extra TrainingArguments."""

    def apply(params: Params) -> tuple[Params, dict]:
        return params.model_copy(update={"train": params.train.model_copy(update=train_changes)}), dict(args or {})

    return apply


VARIANTS: dict[str, Callable[[Params], tuple[Params, dict]] | None] = {
    "baseline": None,
    "trl-fp32": None,
    "trl-bf16": None,
    "trl-bf16-kept-memory": None,  # TRL with the stage's allocator setting, to show what part of the gap that is
    "stage": stage_overrides(),
    "stage-fp32": stage_overrides(precision="fp32"),
    "stage-bf16": stage_overrides(precision="bf16"),
    "stage-sdpa": stage_overrides(attention="sdpa"),
    "stage-eager": stage_overrides(attention="eager"),
    "stage-default-malloc": stage_overrides(),  # the stage without stages/lib/allocator.py's setting
    "stage-cold": stage_overrides(),  # the stage with an empty inductor cache: a machine's first run
    "stage-no-compile": stage_overrides(torch_compile=False),
    "stage-fused-adamw": stage_overrides(args={"optim": "adamw_torch_fused"}),
    "stage-workers2": stage_overrides(args={"dataloader_num_workers": 2}),
    "stage-batch16": stage_overrides(batch_size=16),
    "stage-lora": stage_overrides(method="lora", learning_rate=1e-3),
    "stage-loss-on-all": stage_overrides(),  # labels on every token, as the baseline: isolates the loss mask
}


def subset(dataset: Any, count: int, seed: int) -> Any:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return dataset.select(sorted(order))


def stage_batches(dataset: Any, steps: int, batch_size: int, seed: int) -> Any:
    """The windows of the stage's own first `steps` batches, in order: its length-grouped sampler over the whole
    training split, as a pipeline run draws them (2% of the positions are padding there). Grouping a small
    random subset instead sorts only within 24 windows: 13% padding that no pipeline run pays."""
    from stages.train import seeded_length_sampler

    order = list(iter(seeded_length_sampler(dataset, batch_size, seed)))[: steps * batch_size]
    return dataset.select(order)


def heldout_loss(model: Any, val: Any, tokenizer: Any, batch_size: int) -> float:
    """Mean loss over the validation set's trained (assistant) tokens: same definition and precision (the model's
    own, float32, as the evaluate stage on a CPU) for every variant, whatever it trained in."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), batch_size):
            batch = collator(tokenizer)([val[i] for i in range(start, min(start + batch_size, len(val)))])
            scored = trained_logits(model, {key: value.to(model.device) for key, value in batch.items()})
            total += float(torch.nn.functional.cross_entropy(scored.logits, scored.targets, reduction="sum"))
            count += scored.targets.numel()
    return total / count


class StepClock:
    """TrainerCallback that records when each optimizer step ends."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.times.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                clock.times.append(time.perf_counter())

        self.times: list[float] = []
        self.callback = Callback()


def baseline_trainer(params: Params, model: Any, tokenizer: Any, train_set: Any, output_dir: str) -> Any:
    """transformers' run_clm.py recipe: float32, pad to max_length, loss on all tokens via the model."""
    from transformers import Trainer, TrainingArguments

    width = params.tokenize.max_length

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = tokenizer.pad(
            [{"input_ids": f["input_ids"]} for f in features],
            padding="max_length",
            max_length=width,
            return_tensors="pt",
        )
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return batch

    args = TrainingArguments(
        output_dir=output_dir,
        seed=params.seed,
        data_seed=params.seed,
        learning_rate=params.train.learning_rate,
        lr_scheduler_type=params.train.lr_scheduler,
        warmup_steps=params.train.warmup_ratio,
        per_device_train_batch_size=params.train.batch_size,
        max_steps=len(train_set) // params.train.batch_size,
        max_grad_norm=params.train.max_grad_norm,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10_000,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate, processing_class=tokenizer)


def trl_trainer(
    params: Params, model: Any, tokenizer: Any, steps: int, bf16: bool, output_dir: str
) -> tuple[Any, list[int]]:
    """TRL's SFTTrainer on the same processed training conversations (a seeded subset of steps × batch size)."""
    import datasets as hf_datasets
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in PROCESSED_TRAIN.read_text().splitlines() if line.strip()]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(params.seed))[
        : steps * params.train.batch_size
    ]
    dataset = hf_datasets.Dataset.from_list([{"messages": rows[i]["messages"]} for i in sorted(order.tolist())])
    tokens: list[int] = []

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, num_items_in_batch)

    config = SFTConfig(
        output_dir=output_dir,
        max_length=params.tokenize.max_length,
        per_device_train_batch_size=params.train.batch_size,
        max_steps=steps,
        learning_rate=params.train.learning_rate,
        lr_scheduler_type=params.train.lr_scheduler,
        warmup_steps=params.train.warmup_ratio,
        max_grad_norm=params.train.max_grad_norm,
        seed=params.seed,
        data_seed=params.seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10_000,
        report_to="none",
        disable_tqdm=True,
    )
    return CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer), tokens


def kept_memory(name: str) -> bool:
    """Whether the variant runs with the stage's allocator settings (stages/lib/allocator.py)."""
    return (VARIANTS[name] is not None and name != "stage-default-malloc") or name.endswith("-kept-memory")


def run_variant(name: str, steps: int) -> dict:
    import datasets as hf_datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from stages.train import build_trainer, load_model, resolve_precision

    if kept_memory(name):
        keep_freed_memory()  # as stages/train.py main() does
    params = load_params()
    args: dict = {}
    if VARIANTS[name] is not None:
        params, args = VARIANTS[name](params)
    set_seed(params.seed)
    data = hf_datasets.load_from_disk(str(TOKENIZED))
    if VARIANTS[name] is None:  # the baseline's random batches; TRL draws its own conversations below
        train_set = subset(data["train"], steps * params.train.batch_size, params.seed)
    else:  # the stage's batches, trained in this order (one pass, no repeats)
        train_set = stage_batches(data["train"], steps, params.train.batch_size, params.seed)
    if name == "stage-loss-on-all":
        train_set = train_set.map(lambda row: {"labels": row["input_ids"]})
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZED / "tokenizer")
    clock = StepClock()
    trl_tokens: list[int] = []
    with tempfile.TemporaryDirectory() as output_dir:
        if VARIANTS[name] is None:
            model = AutoModelForCausalLM.from_pretrained(BASE_MODEL, use_safetensors=True, dtype=torch.float32)
            if name.startswith("trl-"):
                precision = name.split("-")[1]
                trainer, trl_tokens = trl_trainer(params, model, tokenizer, steps, precision == "bf16", output_dir)
            else:
                trainer = baseline_trainer(params, model, tokenizer, train_set, output_dir)
                precision = "fp32"
            head_fraction = 1.0
        else:
            params = params.model_copy(update={"train": params.train.model_copy(update={"max_steps": steps})})
            model, tokenizer = load_model(params.train)
            overrides = dict(
                report_to="none",
                save_strategy="no",
                eval_strategy="no",
                logging_steps=10_000,
                disable_tqdm=True,
                train_sampling_strategy="sequential",
                **args,
            )
            trainer, _ = build_trainer(
                params, model, tokenizer, {"train": train_set, "val": data["val"]}, Path(output_dir), **overrides
            )
            precision = resolve_precision(params.train.precision, model.config).precision
            trained_tokens = sum(sum(1 for label in row[1:] if label != IGNORE_INDEX) for row in train_set["labels"])
            head_fraction = trained_tokens / sum(train_set["length"])
        trainer.add_callback(clock.callback)
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    steps_done = len(clock.times) - 1
    step_times = [b - a for a, b in zip(clock.times, clock.times[1:])]
    steady = step_times[2:] or step_times
    tokens = sum(trl_tokens) if name.startswith("trl-") else sum(train_set["length"])
    per_step = trl_tokens if name.startswith("trl-") else None
    steady_tokens = sum(per_step[2:]) if per_step and len(per_step) > 2 else tokens * len(steady) / steps_done
    trained = unwrap(trainer.model)
    flops = model_flops_per_token(trained, head_fraction)
    # Without accelerate's autocast wrapper of the forward (TRL's bf16 run has one; the stage autocasts its loss
    # itself).
    if "_original_forward" in trained.__dict__:
        trained.forward = trained.__dict__.pop("_original_forward")
    loss = heldout_loss(trained, data["val"], tokenizer, params.train.batch_size)
    return {
        "variant": name,
        "precision": precision,
        "compute": ("bf16 autocast" if precision == "bf16" else precision)
        + (f", {trained.config._attn_implementation} attention" if hasattr(trained, "config") else "")
        + (", compiled" if any(getattr(m, "_compiled_call_impl", None) is not None for m in trained.modules()) else ""),
        "steps": steps_done,
        "non_pad_tokens": tokens,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "steady_tokens_per_s": round(steady_tokens / sum(steady), 1),
        "s_per_step": round(sorted(steady)[len(steady) // 2], 2),
        "model_gflops_per_s": round(flops * tokens / wall / 1e9, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "heldout_loss": round(loss, 4),
        "heldout_perplexity": round(math.exp(loss), 2),
    }


def measure_ceilings(steps: int) -> dict[str, Any]:
    """The GEMM ceiling of one step, in float32 and bf16, at the mean size of the stage's batches (this run)."""
    import datasets as hf_datasets
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.lib.precision import gemm_ceiling

    params = load_params()
    train_set = stage_batches(
        hf_datasets.load_from_disk(str(TOKENIZED))["train"], steps, params.train.batch_size, params.seed
    )
    tokens = sum(train_set["length"])
    trained = sum(sum(1 for label in row[1:] if label != IGNORE_INDEX) for row in train_set["labels"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(BASE_MODEL))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {
        precision: gemm_ceiling(skeleton, precision, tokens // steps, trained / tokens, device=device)
        for precision in ("fp32", "bf16")
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_flops_per_token(model: Any, head_fraction: float) -> float:
    """6 FLOPs per parameter per token (forward + backward) for the transformer layers, and for the
    vocabulary head at the fraction of positions where it is applied; attention scores are left out."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - head  # tied: the embedding lookup costs no FLOPs
    return 6.0 * body + 6.0 * head * head_fraction


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "amx": bool(torch.cpu._is_amx_tile_supported()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per variant (default: params.yaml's train.max_steps, the pipeline run's length, "
        "so that the one-off start-up weighs what it weighs in a pipeline run)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the accelerator's dense bf16 peak (e.g. 989 for an H100 SXM) to report MFU",
    )
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    max_steps = load_params().train.max_steps
    args.steps = args.steps or (max_steps if max_steps > 0 else 40)
    if args.one:
        print(json.dumps(run_variant(args.one, args.steps)))
        return 0
    if not (TOKENIZED / "dataset_dict.json").exists():
        sys.exit(f"{TOKENIZED}: missing; run `dvc repro tokenize` first")
    ceilings = measure_ceilings(args.steps)
    for ceiling in ceilings.values():
        print(
            f"ceiling {ceiling.precision}: {ceiling.gflops} GFLOP/s over the step's GEMMs = "
            f"{ceiling.tokens_per_s} tokens/s",
            flush=True,
        )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(COMPILE_CACHE)}
    rows = []
    for name in args.variants:
        if name == "stage-cold":
            subprocess.run(["rm", "-rf", str(COMPILE_CACHE)], check=True)
        print(f"running {name} ({args.steps} steps) ...", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            env=with_allocator_tunables(env) if kept_memory(name) else env,
        )
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        if args.peak_tflops:
            row["mfu"] = round(row["model_gflops_per_s"] / (args.peak_tflops * 1000), 4)
        rows.append(row)
    # The machine's GEMM rate drifts by up to ~15% over tens of seconds here (a shared VM): measured again after
    # the variants, the ceiling is the faster of the two, and every row's fraction is recomputed against it.
    again = measure_ceilings(args.steps)
    for precision, ceiling in again.items():
        print(
            f"ceiling {precision} after the variants: {ceiling.tokens_per_s} tokens/s "
            f"(before: {ceilings[precision].tokens_per_s})"
        )
        ceilings[precision] = max(ceilings[precision], ceiling, key=lambda c: c.tokens_per_s)
    for row in rows:
        ceiling = ceilings[row["precision"] if row["precision"] in ceilings else "fp32"]
        row["ceiling_tokens_per_s"] = ceiling.tokens_per_s
        row["fraction_of_ceiling"] = ceiling.fraction(row["tokens_per_s"])
        row["steady_fraction_of_ceiling"] = ceiling.fraction(row["steady_tokens_per_s"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    same_machine = previous.get("machine") == machine()
    runs = {**(previous.get("runs", {}) if same_machine else {}), **{r["variant"]: r for r in rows}}
    # Peers and the fp32 reference may come from an earlier invocation on this machine (each row keeps its own ceiling).
    # TRL as its users run it, at its faster precision (not with the stage's allocator setting: that row is a probe).
    trl_best = max((r["tokens_per_s"] for name, r in runs.items() if name in ("trl-fp32", "trl-bf16")), default=None)
    fp32_loss = runs.get("stage-fp32", {}).get("heldout_loss")
    for row in runs.values():
        row["vs_best_trl"] = round(row["tokens_per_s"] / trl_best, 2) if trl_best else None
        row["steady_vs_best_trl"] = round(row["steady_tokens_per_s"] / trl_best, 2) if trl_best else None
        row["heldout_loss_vs_stage_fp32"] = round(row["heldout_loss"] - fp32_loss, 4) if fp32_loss is not None else None
    columns = [
        "variant",
        "compute",
        "tokens_per_s",
        "fraction_of_ceiling",
        "steady_tokens_per_s",
        "steady_fraction_of_ceiling",
        "s_per_step",
        "vs_best_trl",
        "steady_vs_best_trl",
        "peak_rss_mb",
        "heldout_loss",
        "heldout_loss_vs_stage_fp32",
    ]
    columns += ["mfu"] if args.peak_tflops else []
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(runs[row["variant"]].get(c)) for c in columns) + " |")
    args.output.write_text(
        json.dumps(
            {
                "machine": machine(),
                "steps": args.steps,
                "ceilings": {k: vars(v) for k, v in ceilings.items()},
                "runs": runs,
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
