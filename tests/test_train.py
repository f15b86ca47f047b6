"""The train stage on tiny models: gradient accumulation, LoRA, resume after a kill, two-process DDP."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from conftest import FIXTURES, REPO, run_stage, write_params
from pipeline_repo import TINY_TRAIN, dvc_command, dvc_train, read_json, tool_env, wait_until_gone
from stage_server import run_forked
from stages.lib.allocator import glibc
from stages.lib.params import load_params
from tiny import save_tiny


def tiny_params(train: dict | None = None, **sections: dict) -> dict:
    """The fixture pipeline's params: tiny Llama, fixture chats, TINY_TRAIN updated with `train`."""
    return {
        "data": {"source": "data/external/chats.jsonl"},
        "model": {"base": "tiny-model"},
        "preprocess": {"val_fraction": 0.1, "test_fraction": 0.1},
        "tokenize": {"max_length": 128, "max_val_examples": None},
        "train": {**TINY_TRAIN, **(train or {})},
        "evaluate": {"max_new_tokens": 24, "precision": "fp32", "bootstrap": {"resamples": 200, "confidence": 0.95}},
        **sections,
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A work directory with models/base and data/tokenized for a tiny Llama, made by the real stages."""
    work = tmp_path_factory.mktemp("prepared")
    (work / "data" / "external").mkdir(parents=True)
    shutil.copy(FIXTURES / "conversations.jsonl", work / "data" / "external" / "chats.jsonl")
    save_tiny(work / "tiny-model", "llama")
    write_params(work, tiny_params())
    for stage in ("ingest", "preprocess", "base_model", "tokenize"):
        result = run_stage(stage, work)
        assert result.returncode == 0, result.stderr
    return work


def workspace(prepared: Path, tmp_path: Path, train: dict | None = None) -> Path:
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    if train:
        write_params(work, tiny_params(train))
    return work


def one_step_weights(
    prepared: Path, tmp_path: Path, batch: int, accumulation: int, model_class: type | None = None
) -> dict[str, torch.Tensor]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train import build_trainer

    params = load_params(prepared / "params.yaml")
    params = params.model_copy(
        update={
            "train": params.train.model_copy(
                update={
                    "batch_size": batch,
                    "gradient_accumulation": accumulation,
                    "max_steps": 1,
                    "warmup_ratio": 0.0,
                    "lr_scheduler": "constant",
                    "learning_rate": 0.5,
                    "max_grad_norm": 1e9,
                }
            )
        }
    )
    model = (model_class or AutoModelForCausalLM).from_pretrained(prepared / "models" / "base", use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "models" / "base")
    data = datasets.load_from_disk(str(prepared / "data" / "tokenized"))
    data["val"] = data["val"].select([])
    trainer, counter = build_trainer(
        params,
        model,
        tokenizer,
        data,
        tmp_path / f"out-{batch}x{accumulation}",
        optim="sgd",
        train_sampling_strategy="sequential",
        report_to="none",
        save_strategy="no",
    )
    trainer.train()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}, counter


def test_6_gradient_accumulation_matches_one_big_batch(prepared, tmp_path):
    """Loss normalised by the trained tokens of the whole accumulated batch: 8x1 and 2x4 give one gradient."""
    base, _ = one_step_weights(prepared, tmp_path, batch=1, accumulation=1)  # a different batch, as a control
    big, counted_big = one_step_weights(prepared, tmp_path, batch=8, accumulation=1)
    small, counted_small = one_step_weights(prepared, tmp_path, batch=2, accumulation=4)
    assert counted_big.trained == counted_small.trained > 0
    for name in big:
        assert torch.allclose(big[name], small[name], atol=2e-5, rtol=1e-4), name
    assert any(not torch.allclose(big[name], base[name], atol=1e-4) for name in big)


class LlamaWithoutLossKwargs(LlamaForCausalLM):
    """A causal LM whose forward takes no **kwargs: the Trainer then does not pass num_items_in_batch to it."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, use_cache=None):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            logits_to_keep=logits_to_keep,
            use_cache=use_cache,
        )


def test_6_accumulation_is_exact_for_a_model_whose_forward_takes_no_loss_kwargs(prepared, tmp_path):
    big, _ = one_step_weights(prepared, tmp_path / "a", batch=8, accumulation=1, model_class=LlamaWithoutLossKwargs)
    small, _ = one_step_weights(prepared, tmp_path / "b", batch=2, accumulation=4, model_class=LlamaWithoutLossKwargs)
    for name in big:
        assert torch.allclose(big[name], small[name], atol=2e-5, rtol=1e-4), name
    # The control: the step moved the weights, so two equal results are not two runs that trained nothing.
    initial = LlamaWithoutLossKwargs.from_pretrained(prepared / "models" / "base", use_safetensors=True)
    assert any(not torch.allclose(big[name], weight, atol=1e-4) for name, weight in initial.named_parameters())


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ddp_step(
    work: Path, out: Path, processes: int, batch: int, distributed: str = "ddp", nodes: int = 1
) -> tuple[dict[str, torch.Tensor], dict]:
    """tests/ddp_step.py under torchrun: one launcher (--standalone), or `nodes` launchers on this machine started
    the way dvc.yaml starts each node of a multi-node job (stages/lib/launch.py: NNODES, NODE_RANK, MASTER_ADDR).
    One process in all runs as the train stage runs a one-process job: without a launcher."""
    env = {**tool_env(), "PYTHONPATH": str(REPO)}
    if processes == nodes == 1:
        env["PYTHONPATH"] += os.pathsep + str(REPO / "tests")
        result = run_forked("ddp_step", work, (str(out), str(batch), distributed), env, trains=True)
        assert result.returncode == 0, result.stderr[-4000:]
        return load_file(out), read_json(out.with_suffix(".json"))
    script = [
        "--nproc_per_node",
        str(processes),
        str(REPO / "tests" / "ddp_step.py"),
        str(out),
        str(batch),
        distributed,
    ]
    if nodes == 1:
        launchers = [(["torchrun", "--standalone", *script], env)]
    else:
        meet = {"NNODES": str(nodes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        launchers = [
            ([sys.executable, "-m", "stages.lib.launch", *script], {**env, **meet, "NODE_RANK": str(rank)})
            for rank in range(nodes)
        ]
    running = [
        subprocess.Popen(command, cwd=work, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command, node_env in launchers
    ]
    for process in running:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-4000:]
    return load_file(out), read_json(out.with_suffix(".json"))


@pytest.fixture(scope="module")
def reference_steps(prepared, tmp_path_factory) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """One SGD step of 1 process × 8 examples and of 2 DDP processes × 4: what every other layout must equal."""
    out = tmp_path_factory.mktemp("reference")
    return {
        "one": ddp_step(prepared, out / "one.safetensors", 1, 8),
        "ddp": ddp_step(prepared, out / "two.safetensors", 2, 4),
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.mark.slow
def test_6_two_ddp_processes_of_4_equal_one_process_of_8(prepared, reference_steps, tmp_path):
    """Gradients averaged by DDP, losses normalised by the global trained-token count: one SGD step of 2 × 4
    gives the weights of 1 × 8 (a wrong scale, e.g. a mean of per-process means, would not). And the validation
    loss over 2 processes is the one over 1: the examples the sampler repeats to even out the processes' batches
    (the validation set is not a multiple of 8) used to count twice."""
    import datasets

    assert len(datasets.load_from_disk(str(prepared / "data" / "tokenized"))["val"]) % 8 != 0
    one, one_eval = reference_steps["one"]
    two, two_eval = reference_steps["ddp"]
    control, _ = ddp_step(prepared, tmp_path / "control.safetensors", 1, 4)  # half the batch: a different step
    for name in one:
        assert torch.allclose(one[name], two[name], atol=2e-6, rtol=1e-5), name
    assert any(not torch.allclose(one[name], control[name], atol=1e-4) for name in one)
    assert two_eval["eval_tokens"] == one_eval["eval_tokens"]
    assert two_eval["eval_loss"] == pytest.approx(one_eval["eval_loss"], abs=1e-6)


@pytest.mark.slow
def test_two_nodes_and_fsdp_take_the_step_of_one_process_with_the_global_batch(prepared, reference_steps, tmp_path):
    """2 nodes × 1 process (two launchers meeting through c10d on 127.0.0.1) and FSDP2 across 2 processes give the
    weights of 1 process × 8 after one optimizer step, and FSDP those of DDP: the length-grouped sampler forms the
    same global batch whatever the layout, and FSDP's gathered state dict is the whole model."""
    one, one_eval = reference_steps["one"]
    ddp, _ = reference_steps["ddp"]
    nodes, nodes_eval = ddp_step(prepared, tmp_path / "nodes.safetensors", 1, 4, nodes=2)
    fsdp, fsdp_eval = ddp_step(prepared, tmp_path / "fsdp.safetensors", 2, 4, distributed="fsdp")
    differences = {
        "2 nodes vs 1 process": max_difference(nodes, one),
        "fsdp vs 1 process": max_difference(fsdp, one),
        "fsdp vs ddp": max_difference(fsdp, ddp),
        "2 nodes vs 2 processes": max_difference(nodes, ddp),
    }
    print(differences)
    assert nodes_eval["world_size"] == fsdp_eval["world_size"] == 2
    assert max(differences.values()) < 2e-6, differences
    base = load_file(prepared / "models" / "base" / "model.safetensors")
    assert max(float((one[name] - base[name]).abs().max()) for name in base) > 1e-3  # the step moved the weights
    assert nodes_eval["eval_loss"] == pytest.approx(one_eval["eval_loss"], abs=1e-6) == fsdp_eval["eval_loss"]


def run_train(work: Path, *launcher: str) -> subprocess.CompletedProcess:
    env = {**tool_env(), "PYTHONPATH": str(REPO)}
    if not launcher:
        return run_forked("stages.train", work, (), env)
    return subprocess.run([*launcher, "-m", "stages.train"], cwd=work, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_lora_trains_and_saves_a_merged_model(prepared, tmp_path):
    work = workspace(
        prepared,
        tmp_path,
        {
            "method": "lora",
            "learning_rate": 1.0e-2,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "merge": True},
        },
    )
    result = run_train(work)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(work / "metrics" / "train.json")
    assert metrics["method"] == "lora-merged" and metrics["val_loss_after"] < metrics["val_loss_before"]
    merged = load_file(work / "models" / "finetuned" / "model.safetensors")
    base = load_file(work / "models" / "base" / "model.safetensors")
    assert not any("lora" in key for key in merged) and set(merged) == set(base)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


@pytest.mark.slow
def test_lora_adapter_only_records_its_base_and_score_loads_it(prepared, tmp_path):
    lora = {"method": "lora", "max_steps": 4, "lora": {"r": 4, "alpha": 8, "merge": False}}
    work = workspace(prepared, tmp_path, lora)
    result = run_train(work)
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / "models" / "finetuned"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert read_json(out / "base_model.json")["base_model"] == "models/base"
    write_params(work, tiny_params(lora, evaluate={"max_conversations": 3, "max_new_tokens": 8}))
    scored = run_stage("score", work, "--model", "finetuned")  # base model + adapter on top, the way score loads it
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert read_json(work / "metrics" / "runtime" / "score_finetuned.json")["scored_tokens"] > 0


SIX_STEPS = {"max_steps": 6, "eval_steps": 6, "save_steps": 6, "logging_steps": 3}


@pytest.fixture(scope="module")
def two_processes(prepared, tmp_path_factory) -> tuple[Path, str]:
    """dvc.yaml's train command with train.processes 2 (DDP over gloo): the workspace and what it printed."""
    work = workspace(prepared, tmp_path_factory.mktemp("two-processes"), {**SIX_STEPS, "processes": 2})
    result = dvc_train(work)
    assert result.returncode == 0, result.stderr[-4000:]
    return work, result.stdout


@pytest.mark.slow
def test_two_cpu_processes_train_with_ddp_and_save_once(two_processes):
    work, stdout = two_processes
    metrics = read_json(work / "metrics" / "train.json")
    assert metrics["processes"] == 2 and metrics["steps"] == 6
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert stdout.count("train: 6 steps") == 1  # only rank 0 reports and saves
    assert (work / "models" / "finetuned" / "model.safetensors").exists()


def kill_after_checkpoint(work: Path, command: list[str] | str, step: int, processes: int) -> None:
    """Start the train stage, SIGKILL its whole process group once checkpoint-`step` is complete."""
    from stages.train import complete

    env = {**tool_env(), "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        command,
        cwd=work,
        env=env,
        shell=isinstance(command, str),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    checkpoint = work / "models" / "checkpoints" / f"checkpoint-{step}"
    while not complete(checkpoint, processes) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    # torchrun's workers run in sessions of their own: the group kill does not reach them
    wait_until_gone("train", work, 10, "a train worker outlived its killed launcher (it would write beside the resume)")
    assert not (work / "models" / "finetuned").exists() and not (work / "metrics" / "train.json").exists()


def test_a_checkpoint_is_resumed_only_when_every_process_wrote_its_part(tmp_path):
    """The first process writes trainer_state.json, the others their RNG states on their own: a kill in between
    must not leave a checkpoint that resumes with one process's random stream missing or cut short."""
    from stages.train import complete

    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 10')  # cut short mid-write
    torch.save({"cpu": torch.random.get_rng_state()}, checkpoint / "rng_state_0.pth")
    assert not complete(checkpoint, 2)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    assert not complete(checkpoint, 2), "rank 1's RNG state is missing"
    whole = (checkpoint / "rng_state_0.pth").read_bytes()
    (checkpoint / "rng_state_1.pth").write_bytes(whole[: len(whole) // 2])
    assert not complete(checkpoint, 2), "rank 1's RNG state is cut short"
    (checkpoint / "rng_state_1.pth").write_bytes(whole)
    assert complete(checkpoint, 2)
    assert not complete(checkpoint, 1), "one process writes rng_state.pth"
    (checkpoint / "rng_state.pth").write_bytes(whole)
    assert complete(checkpoint, 1)


@pytest.mark.slow
def test_fsdp_resumes_after_a_kill_to_the_same_weights_and_saves_a_model_score_loads(prepared, tmp_path):
    """FSDP2 across 2 processes through dvc.yaml's command: a run killed after a checkpoint resumes to the weights
    and metrics of an uninterrupted one, and the saved model is a whole safetensors model that score loads."""
    settings = {
        "distributed": "fsdp",
        "processes": 2,
        "max_steps": 30,
        "save_steps": 10,
        "eval_steps": 30,
        "logging_steps": 10,
        "batch_size": 2,
    }
    straight = workspace(prepared, tmp_path / "a", settings)
    result = dvc_train(straight)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = workspace(prepared, tmp_path / "b", settings)
    kill_after_checkpoint(killed, dvc_command(killed), 10, 2)
    resumed = dvc_train(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runtime = read_json(killed / "metrics" / "runtime" / "train.json")
    assert 10 <= runtime["resumed_from_step"] < 30 and runtime["distributed"] == "fsdp"
    assert (killed / "metrics" / "train.json").read_bytes() == (straight / "metrics" / "train.json").read_bytes()
    a = load_file(straight / "models" / "finetuned" / "model.safetensors")
    b = load_file(killed / "models" / "finetuned" / "model.safetensors")
    base = load_file(prepared / "models" / "base" / "model.safetensors")
    assert set(a) == set(b) == set(base)  # the whole model, not a shard
    print({"fsdp straight vs resumed": max(float((a[k] - b[k]).abs().max()) for k in a)})
    for key in a:
        assert a[key].shape == base[key].shape and torch.allclose(a[key], b[key], atol=1e-6), key
    scored = run_stage("score", killed, "--model", "finetuned")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert (killed / "data" / "scores" / "finetuned.json").exists()


@pytest.mark.slow
def test_fsdp_trains_lora_in_bf16_with_gradient_checkpointing_as_ddp_does(prepared, tmp_path):
    """LoRA, bf16 and FSDP's activation checkpointing under FSDP2: the merged model it saves is the one DDP saves,
    to bf16's rounding."""
    settings = {
        "method": "lora",
        "precision": "bf16",
        "gradient_checkpointing": True,
        "processes": 2,
        "max_steps": 4,
        "eval_steps": 4,
        "save_steps": 4,
        "logging_steps": 2,
        "learning_rate": 1.0e-2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "merge": True},
    }
    runs = {}
    for mode in ("ddp", "fsdp"):
        work = workspace(prepared, tmp_path / mode, {**settings, "distributed": mode})
        result = dvc_train(work)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode] = (
            read_json(work / "metrics" / "train.json"),
            load_file(work / "models" / "finetuned" / "model.safetensors"),
        )
    base = load_file(prepared / "models" / "base" / "model.safetensors")
    (ddp_metrics, ddp), (fsdp_metrics, fsdp) = runs["ddp"], runs["fsdp"]
    assert fsdp_metrics["method"] == "lora-merged" and fsdp_metrics["precision"] == "bf16" and set(fsdp) == set(base)
    moved = max(float((ddp[k] - base[k]).abs().max()) for k in base)
    apart = max(float((fsdp[k] - ddp[k]).abs().max()) for k in base)
    print({"lora bf16 update": moved, "fsdp vs ddp": apart})
    assert moved > 1e-3 and apart < 0.05 * moved, (moved, apart)
    assert fsdp_metrics["val_loss_after"] == pytest.approx(ddp_metrics["val_loss_after"], abs=0.02)
    assert fsdp_metrics["val_loss_after"] < fsdp_metrics["val_loss_before"]


@pytest.mark.slow
def test_the_train_command_on_two_nodes_trains_as_two_processes_on_one_and_writes_once(
    prepared, two_processes, tmp_path
):
    """dvc.yaml's command on two "machines" (two copies of the inputs, two launchers meeting at 127.0.0.1 through
    NNODES, NODE_RANK, MASTER_ADDR): the first node writes the model and metrics, the other nothing, and they are
    those of 1 node × 2 processes."""
    single, _ = two_processes
    heads = [workspace(prepared, tmp_path / f"node{rank}", SIX_STEPS) for rank in (0, 1)]
    meet = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env = {**tool_env(), "PYTHONPATH": str(REPO), **meet}
    running = [
        subprocess.Popen(
            dvc_command(work),
            shell=True,
            cwd=work,
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, work in enumerate(heads)
    ]
    outputs = [process.communicate(timeout=900) for process in running]
    for process, (_, stderr) in zip(running, outputs):
        assert process.returncode == 0, stderr[-3000:]
    writers = [work for work in heads if (work / "metrics" / "train.json").exists()]
    assert len(writers) == 1 and sum(stdout.count("train: 6 steps") for stdout, _ in outputs) == 1
    (writer,) = writers
    other = heads[1 - heads.index(writer)]
    assert not (other / "models" / "finetuned").exists() and not (other / "dvclive" / "metrics.json").exists()
    runtime = read_json(writer / "metrics" / "runtime" / "train.json")
    assert runtime["nodes"] == 2 and read_json(writer / "metrics" / "train.json")["processes"] == 2
    assert (writer / "metrics" / "train.json").read_bytes() == (single / "metrics" / "train.json").read_bytes()
    a = load_file(single / "models" / "finetuned" / "model.safetensors")
    b = load_file(writer / "models" / "finetuned" / "model.safetensors")
    print({"2 nodes x 1 vs 1 node x 2, 6 steps": max(float((a[k] - b[k]).abs().max()) for k in a)})
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_auto_precision_is_measured_and_explained():
    from transformers import LlamaConfig

    from stages.lib.precision import BF16_MARGIN, choose

    config = LlamaConfig(hidden_size=64, intermediate_size=128)
    choice = choose("auto", config, tokens=256)
    assert choice.fp32_gflops > 0 and choice.bf16_gflops > 0 and "measured" in choice.reason
    assert choice.precision == ("bf16" if choice.bf16_gflops >= BF16_MARGIN * choice.fp32_gflops else "fp32")
    fp16 = choose("fp16", config)
    if not torch.cuda.is_available():  # recorded as what runs, not as what was asked for
        assert fp16.precision == "fp32" and "fp16 needs a GPU" in fp16.reason


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, (
        result.returncode,
        result.stderr[-3000:],
    )
    return lines[0]


def with_previous_outputs(work: Path) -> dict[Path, bytes]:
    """Outputs of an earlier run, which a rejected run must leave as they were."""
    (work / "models" / "finetuned").mkdir(parents=True)
    (work / "models" / "finetuned" / "model.safetensors").write_bytes(b"earlier weights")
    (work / "metrics").mkdir(exist_ok=True)
    (work / "metrics" / "train.json").write_text('{"earlier": true}')
    return {
        path: path.read_bytes()
        for path in (work / "models" / "finetuned" / "model.safetensors", work / "metrics" / "train.json")
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
@pytest.mark.slow
def test_fp16_on_a_cpu_is_refused_in_one_line_before_any_work(prepared, tmp_path):
    """The Trainer ran fp16 on a CPU in float32 while metrics/train.json recorded fp16."""
    work = workspace(prepared, tmp_path, {"precision": "fp16"})
    previous = with_previous_outputs(work)
    message = one_line_error(dvc_train(work))
    assert message == "error: train.precision: fp16 needs a CUDA GPU and this machine has none; use auto, bf16 or fp32"
    assert {path: path.read_bytes() for path in previous} == previous
    assert not (work / "models" / "checkpoints").exists()  # refused before any work


@pytest.fixture(scope="module")
def one_process_auto(prepared, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """dvc.yaml's command for 2 steps of one process, precision auto, with a `torchrun` on PATH that fails: the
    workspace and the finished command. One run for the two claims below."""
    tmp_path = tmp_path_factory.mktemp("one-process-auto")
    short = {"precision": "auto", "max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}
    work = workspace(prepared, tmp_path, short)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text("#!/bin/sh\necho 'torchrun started' >&2\nexit 3\n")
    (fake / "torchrun").chmod(0o755)
    result = dvc_train(work, {"PATH": f"{fake}{os.pathsep}{tool_env()['PATH']}"})
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


@pytest.mark.slow
def test_a_one_process_job_trains_in_the_stage_process_without_torchrun(one_process_auto):
    """Under torchrun even one process joins a gloo process group and the Trainer wraps the model in DDP, whose
    bucketing splits the compiled graph: the default run's model came out different. dvc.yaml's command trains a
    one-process job itself; a `torchrun` on PATH that fails shows it never starts (two processes use it: above)."""
    work, result = one_process_auto
    assert "torchrun started" not in result.stderr, result.stderr[-3000:]
    assert read_json(work / "metrics" / "train.json")["processes"] == 1 and result.stdout.count("train: 2 steps") == 1


@pytest.mark.slow
def test_recorded_precision_and_compile_are_the_ones_that_ran(one_process_auto):
    """`auto` is recorded as what it resolved to on this machine (measured once, by `--check`, for every worker),
    never as `auto` or a precision that did not run; compile set off is recorded off, with no cache."""
    work, _ = one_process_auto
    runtime = read_json(work / "metrics" / "runtime" / "train.json")
    choice = runtime["precision"]
    assert read_json(work / "metrics" / "train.json")["precision"] == choice["precision"] in ("bf16", "fp32")
    assert choice == read_json(work / "models" / "checkpoints" / "machine.json")["precision"]
    assert runtime["compile"] == {"enabled": False, "reason": "set in params.yaml"} and runtime["compile_cache"] is None


def test_the_compiled_loss_equals_the_eager_loss_and_its_gradient():
    """train.torch_compile compiles the loss (upcast, log-softmax, gather, sum in one pass) beside the decoder
    blocks: on bf16 logits it must give the eager float32 loss and gradient, for every number of positions."""
    from stages.train import nll_sum

    compiled = torch.compile(nll_sum, dynamic=True)
    generator = torch.Generator().manual_seed(0)
    for positions in (37, 64, 101):  # a new count every batch: one dynamic graph, no recompiles that differ
        logits = (4 * torch.randn(positions, 1000, generator=generator)).to(torch.bfloat16)
        targets = torch.randint(0, 1000, (positions,), generator=generator)
        results = {}
        for name, loss in (("eager", nll_sum), ("compiled", compiled)):
            leaf = logits.clone().requires_grad_(True)
            value = loss(leaf, targets)
            value.backward()
            results[name] = (value.detach(), leaf.grad)
        assert results["compiled"][1].dtype == torch.bfloat16
        torch.testing.assert_close(results["compiled"][0], results["eager"][0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(results["compiled"][1].float(), results["eager"][1].float(), rtol=1.6e-2, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_auto_compiles_where_inductor_works_and_trains_eagerly_where_it_cannot(prepared, tmp_path):
    """`auto` compiles where a two-line function compiles for real (a C++ compiler on a CPU) and records why; a
    machine without a compiler trains eagerly and says so; `true` there is a one-line error before any work.
    Compiled and eager runs agree on the validation loss to the precision's rounding."""
    from stages.lib.precision import compile_problem

    short = {"max_steps": 4, "eval_steps": 4, "save_steps": 4, "logging_steps": 1, "torch_compile": "auto"}
    home = tmp_path / "home"  # no TORCHINDUCTOR_CACHE_DIR: the cache goes where a reboot keeps it, in every process
    work = workspace(prepared, tmp_path / "auto", short)
    result = dvc_train(work, {"HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": None})
    assert result.returncode == 0, result.stderr[-3000:]
    auto, auto_loss = read_json(work / "metrics" / "runtime" / "train.json"), read_json(work / "metrics" / "train.json")

    no_compiler = {"CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty-cache")}
    work = workspace(prepared, tmp_path / "no-compiler", short)
    assert dvc_train(work, no_compiler).returncode == 0
    recorded = read_json(work / "metrics" / "runtime" / "train.json")["compile"]
    assert not recorded["enabled"] and "No working C++ compiler" in recorded["reason"], recorded
    if compile_problem(torch.device("cpu")) is None:
        assert auto["compile"] == {"enabled": True, "reason": "inductor compiles on cpu here"}
        assert auto["compile_cache"] == str(home / ".cache" / "torchinductor")  # the worker's, not torch's /tmp
        eager_loss = read_json(work / "metrics" / "train.json")  # the same run, trained eagerly
        assert abs(auto_loss["val_loss_after"] - eager_loss["val_loss_after"]) < 1e-3

    work = workspace(prepared, tmp_path / "refused", {**short, "torch_compile": True})
    previous = with_previous_outputs(work)
    message = one_line_error(dvc_train(work, no_compiler))
    assert (
        message.startswith("error: train.torch_compile: true, but torch.compile fails on this machine (")
        and "No working C++ compiler" in message
    )
    assert {path: path.read_bytes() for path in previous} == previous


def test_unknown_lora_target_is_one_line_naming_the_layers_before_training(prepared, tmp_path):
    work = workspace(prepared, tmp_path, {"method": "lora", "lora": {"target_modules": ["q_proj", "qkv_proj"]}})
    previous = with_previous_outputs(work)
    message = one_line_error(dvc_train(work))
    assert message.startswith(
        "error: train.lora.target_modules: 'qkv_proj' matches no module in LlamaForCausalLM; its linear layers are "
    )
    assert "q_proj" in message and "down_proj" in message and "all-linear" in message
    assert {path: path.read_bytes() for path in previous} == previous
    assert not (work / "models" / "checkpoints").exists()


@pytest.fixture(scope="module")
def gpt2_prepared(prepared, tmp_path_factory) -> Path:
    """`prepared` with a tiny GPT-2 (Conv1D layers named c_attn, c_proj, c_fc) as models/base."""
    work = tmp_path_factory.mktemp("gpt2") / "work"
    shutil.copytree(prepared, work)
    for llama in ("models/base", "data/tokenized", "tiny-model"):  # tiny-model: no ChatML template file left over
        shutil.rmtree(work / llama)
    save_tiny(work / "tiny-model", "gpt2")
    for stage in ("base_model", "tokenize"):
        result = run_stage(stage, work)
        assert result.returncode == 0, result.stderr
    return work


@pytest.mark.slow
def test_gpt2_gets_the_plain_template_and_learns_the_chats_with_it(gpt2_prepared, tmp_path):
    """GPT-2 has no chat template: base_model gives it the plain one, <|endoftext|> ending each turn and a pad token
    of its own, and a full fine-tune through dvc.yaml's command learns the fixture chats in that format."""
    card = read_json(gpt2_prepared / "models" / "base" / "model_card.json")
    assert card["chat_template"].startswith("plain")
    assert card["end_of_turn"] == "<|endoftext|>" and card["pad_token"] == "<|pad|>"
    work = workspace(gpt2_prepared, tmp_path)
    result = dvc_train(work)
    assert result.returncode == 0, result.stderr[-3000:]
    train = read_json(work / "metrics" / "train.json")
    assert train["method"] == "full" and train["val_loss_after"] < train["val_loss_before"] - 1.0, train


@pytest.mark.slow
def test_lora_with_default_target_modules_trains_gpt2(gpt2_prepared, tmp_path):
    """The default used to name Llama's q_proj...down_proj: GPT-2 failed with a 73-line traceback."""
    assert load_params(REPO / "params.yaml").train.lora.target_modules == "all-linear"
    work = workspace(
        gpt2_prepared,
        tmp_path,
        {"method": "lora", "max_steps": 4, "eval_steps": 4, "save_steps": 4, "logging_steps": 2},
    )
    assert load_params(work / "params.yaml").train.lora == load_params(REPO / "params.yaml").train.lora
    result = dvc_train(work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(work / "metrics" / "train.json")["method"] == "lora-merged"
    base = load_file(work / "models" / "base" / "model.safetensors")
    merged = load_file(work / "models" / "finetuned" / "model.safetensors")
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed and all(key.rsplit(".", 2)[-2] in ("c_attn", "c_proj", "c_fc") for key in changed)


@pytest.mark.slow
def test_llama_target_names_on_gpt2_name_gpt2s_layers(gpt2_prepared, tmp_path):
    work = workspace(gpt2_prepared, tmp_path, {"method": "lora", "lora": {"target_modules": ["q_proj", "v_proj"]}})
    message = one_line_error(dvc_train(work))
    assert message == (
        "error: train.lora.target_modules: 'q_proj' matches no module in GPT2LMHeadModel; "
        "its linear layers are c_attn, c_fc, c_proj, lm_head (or set all-linear)"
    )


def test_the_last_step_writes_no_checkpoint_the_finished_run_would_delete(prepared, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train import build_trainer

    params = load_params(prepared / "params.yaml")
    params = params.model_copy(
        update={"train": params.train.model_copy(update={"max_steps": 4, "save_steps": 2, "eval_steps": 4})}
    )
    model = AutoModelForCausalLM.from_pretrained(prepared / "models" / "base", use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "models" / "base")
    data = datasets.load_from_disk(str(prepared / "data" / "tokenized"))
    trainer, _ = build_trainer(params, model, tokenizer, data, tmp_path / "out", report_to="none")
    trainer.train()
    assert trainer.state.global_step == 4
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2"]  # resumable mid-run


ALLOCATION_LOOP = """
import ctypes, resource, sys, torch
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: with huge pages "always", faults would count 2 MB pages
from stages.lib.allocator import keep_freed_memory
done = keep_freed_memory() if sys.argv[1] == "kept" else "default"
def step():  # a training step's pattern: large tensors alive together (all over glibc's mmap threshold), then freed
    held = [torch.empty(size, dtype=torch.uint8).fill_(1) for size in (2**26, 3 * 2**24, 2**25 + 4096)]
    return sum(t.numel() for t in held)
for _ in range(10):  # the heap grows over the first few steps (up to the 6th, seen) until every layout fits
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touched = sum(step() for _ in range(8))
print(done, "|", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "|", touched)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_not_faulted_in_again_every_step():
    faults = {}
    for mode in ("default", "kept"):
        result = subprocess.run(
            [sys.executable, "-c", ALLOCATION_LOOP, mode], cwd=REPO, capture_output=True, text=True, check=True
        )
        done, count, touched = result.stdout.split("|")
        faults[mode] = int(count)
    assert "freed memory kept" in done
    pages = int(touched) // os.sysconf("SC_PAGE_SIZE")
    assert faults["default"] > pages // 2, faults  # every step maps its tensors afresh and faults their pages in
    assert faults["kept"] < pages // 10, faults  # the same pages, step after step


SAME_SIZE_LOOP = """
import ctypes, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE, as above
from stages.lib.allocator import keep_freed_memory, restart_with_allocator_tunables
if sys.argv[1] == "restart":
    restart_with_allocator_tunables()  # what `python -m stages.train` does first
import torch
done = keep_freed_memory()
def step():  # a block the size of the embedding's gradient, made and freed step after step
    held = torch.zeros(2**24)
    return held.numel() * held.element_size()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touched = sum(step() for _ in range(6))
print(done, "|", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "|", touched, "|", sys.argv[1:])
"""


@pytest.mark.skipif(not glibc(), reason="glibc's tunables")
def test_a_freed_block_is_reused_for_the_next_block_of_the_same_size():
    """torch's 64-byte aligned blocks leave small fragments beside them that glibc's tcache held on to, so a
    freed block could not be reused for the next of the same size: fresh pages every step."""
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    runs = {}
    for mode in ("kept", "restart"):
        result = subprocess.run(
            [sys.executable, "-c", SAME_SIZE_LOOP, mode], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        done, count, touched, argv = result.stdout.split("|")
        runs[mode] = (done, int(count), argv.strip())
    pages = int(touched) // os.sysconf("SC_PAGE_SIZE")
    assert "tcache on" in runs["kept"][0] and runs["kept"][1] > pages // 2, runs  # the heap grew every step
    assert "tcache off" in runs["restart"][0] and runs["restart"][1] < pages // 10, runs
    assert runs["restart"][2] == "['restart']", runs  # the restarted process kept its arguments


def test_validation_loss_is_in_the_training_precision_before_training_too(prepared, tmp_path):
    """Before train(), accelerate has not wrapped the forward in autocast: the loss before training used to be a
    float32 figure beside a bf16 loss after it."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train import build_trainer

    tokenizer = AutoTokenizer.from_pretrained(prepared / "models" / "base")
    data = datasets.load_from_disk(str(prepared / "data" / "tokenized"))
    losses = {}
    for precision in ("fp32", "bf16"):
        params = load_params(prepared / "params.yaml")
        params = params.model_copy(update={"train": params.train.model_copy(update={"precision": precision})})
        model = AutoModelForCausalLM.from_pretrained(prepared / "models" / "base", use_safetensors=True)
        trainer, _ = build_trainer(params, model, tokenizer, data, tmp_path / precision, report_to="none")
        losses[precision] = trainer.evaluate()["eval_loss"]
    trainer.model_wrapped = trainer.accelerator.prepare_model(
        trainer.model, evaluation_mode=True
    )  # as train() leaves it
    assert trainer.evaluate()["eval_loss"] == losses["bf16"] != losses["fp32"]


def test_bf16_training_hands_the_loss_bf16_logits_not_a_float32_copy(prepared, tmp_path, monkeypatch):
    """accelerate's mixed precision wraps the model's forward in a float32 conversion of its outputs: a
    [positions x vocabulary] float32 copy of the logits, and of their gradient, every step, which the loss's own
    upcast makes redundant. The stage autocasts its loss's forward itself."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import stages.train as train

    dtypes = []
    upcasting_loss = train.nll_sum

    def spy(logits, targets):
        dtypes.append(logits.dtype)
        return upcasting_loss(logits, targets)

    monkeypatch.setattr(train, "nll_sum", spy)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "models" / "base")
    data = datasets.load_from_disk(str(prepared / "data" / "tokenized"))
    params = load_params(prepared / "params.yaml")
    params = params.model_copy(update={"train": params.train.model_copy(update={"precision": "bf16", "max_steps": 2})})
    model = AutoModelForCausalLM.from_pretrained(prepared / "models" / "base", use_safetensors=True)
    trainer, _ = train.build_trainer(
        params, model, tokenizer, data, tmp_path, report_to="none", save_strategy="no", eval_strategy="no"
    )
    trainer.train()
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # autocast: the weights stay float32
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


COMPILED_EMBEDDING_BACKWARD = """
import sys, torch
torch.set_num_threads(2)
if sys.argv[1] == "stage":
    from stages.train import compile_settings
    compile_settings()
torch.manual_seed(0)
embedding = torch.nn.Embedding(1000, 256)
loss = torch.compile(lambda ids, w: (embedding(ids) * w).sum())
ids = torch.randint(0, 10, (16384,))  # few distinct tokens: many threads add into the same rows
weights = torch.randn(16384, 256)
grads = []
for _ in range(8):
    embedding.zero_grad(set_to_none=True)
    loss(ids, weights).backward()
    grads.append(embedding.weight.grad.clone())
print(all(torch.equal(grads[0], g) for g in grads[1:]))
"""


@pytest.mark.slow
def test_compiled_training_accumulates_the_embedding_gradient_in_a_fixed_order(tmp_path):
    """train.torch_compile: inductor's C++ backward of an embedding lookup added the rows of repeated tokens from
    parallel threads in no fixed order, so compiled runs ended at different losses run to run (3.6353, 3.6364,
    3.6367 with one warm cache). The stage's compile settings make that gradient the same every time."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    same = {}
    for mode in ("default", "stage"):
        result = subprocess.run(
            [sys.executable, "-c", COMPILED_EMBEDDING_BACKWARD, mode],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        same[mode] = result.stdout.strip().splitlines()[-1] == "True"
    assert same["stage"]
    if (os.cpu_count() or 1) >= 2:  # the race needs two threads: the control shows the test can see it
        assert not same["default"]


def test_the_trainer_internals_train_py_uses():
    """Each Trainer internal listed above ChatTrainer in stages/train.py still means what the training arithmetic
    needs: an upgrade of transformers or accelerate that renames or reroutes one fails here, not silently."""
    import inspect

    from accelerate import Accelerator
    from transformers import Trainer, TrainingArguments
    from transformers.integrations import DVCLiveCallback

    trainer_source = inspect.getsource(Trainer)
    # read by training_step: True stops the division of the loss by the accumulation steps
    assert "self.loss_is_scaled_for_ga" in inspect.getsource(Trainer.training_step)
    # what makes the Trainer count the trained tokens of the whole step (num_items_in_batch)
    assert "self.model_accepts_loss_kwargs" in inspect.getsource(Trainer._get_num_items_in_batch)
    # accelerate wraps model.forward in its autocast (and a float32 conversion of outputs) only when native_amp
    assert "if self.native_amp:" in inspect.getsource(Accelerator.prepare_model)
    # the sampler hook: its signature, and the train dataloader still asks it for the sampler
    assert list(inspect.signature(Trainer._get_train_sampler).parameters) == ["self", "train_dataset"]
    assert "sampler_fn=self._get_train_sampler" in trainer_source
    # the evaluation loop's inputs and model
    assert list(inspect.signature(Trainer._prepare_inputs).parameters) == ["self", "inputs"]
    assert "self.model_wrapped = model" in inspect.getsource(Trainer.__init__)
    # DVCLive: setup sets _initialized, and on_log calls setup only when it is not set
    assert "self._initialized = True" in inspect.getsource(DVCLiveCallback.setup)
    assert "if not self._initialized" in inspect.getsource(DVCLiveCallback.on_log)
    # train.warmup_ratio passed as warmup_steps: a float below 1 is a ratio of the total steps
    arguments = TrainingArguments(output_dir="unused", warmup_steps=0.05, max_steps=40, use_cpu=True, report_to="none")
    assert arguments.get_warmup_steps(40) == 2 and arguments.get_warmup_steps(100) == 5
    # the RNG files `complete` waits for: one per process, named by its index, or one file without a process group
    rng_source = inspect.getsource(Trainer._save_rng_state)
    assert '"rng_state.pth"' in rng_source and 'f"rng_state_{self.args.process_index}.pth"' in rng_source


def test_allocator_tuning_is_only_for_cpu_training(tmp_path, monkeypatch):
    """The glibc allocator settings were measured on CPU training: a GPU host keeps glibc's defaults."""
    from stages.lib.allocator import gpu_host

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert not gpu_host(tmp_path)
    gpus = tmp_path / "proc" / "driver" / "nvidia" / "gpus"
    gpus.mkdir(parents=True)
    assert not gpu_host(tmp_path)  # the driver without a GPU
    (gpus / "0000:01:00.0").mkdir()
    assert gpu_host(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not gpu_host(tmp_path)  # hidden: this process trains on the CPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    (tmp_path / "proc").rename(tmp_path / "elsewhere")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "kfd").touch()  # ROCm
    assert gpu_host(tmp_path)


def test_importing_the_train_stage_keeps_inductors_cache_out_of_tmp(tmp_path):
    """The Trainer's import fixes inductor's cache directory: the stage must set it first, or every reboot
    recompiles."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env |= {"PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    shown = subprocess.run(
        [sys.executable, "-c", "import os, stages.train; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip() == str(tmp_path / ".cache" / "torchinductor"), shown.stdout


def test_a_checkpoint_is_resumed_only_in_the_precision_and_compilation_it_was_written_in():
    from stages.lib.precision import CompileChoice, PrecisionChoice
    from stages.train import fingerprint

    params = load_params(REPO / "params.yaml")
    fp32, bf16 = PrecisionChoice("fp32", "measured"), PrecisionChoice("bf16", "measured")
    eager, compiled = CompileChoice(False, "off"), CompileChoice(True, "on")
    prints = {fingerprint(params, p, c) for p in (fp32, bf16) for c in (eager, compiled)}
    assert len(prints) == 4
    assert fingerprint(params, fp32, eager) == fingerprint(params, PrecisionChoice("fp32", "another reason"), eager)
