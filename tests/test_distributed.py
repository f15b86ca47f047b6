"""Placing a stage's processes (stages/lib/launch.py): torchrun's rendezvous across nodes from params and the
environment, and slots that split one machine between queued experiments. `dvc queue start -j 2` running two
experiments in their own slots is tested on the fixture pipeline in test_reproducibility.py; the multi-process
training equalities are in test_train.py."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from pipeline_repo import dvc_train
from stages.lib.errors import InputError
from stages.lib.launch import HELD, Rendezvous, rendezvous, share, use_slot


def test_one_node_is_torchrun_standalone_whatever_else_the_environment_says():
    assert rendezvous(1, {}).torchrun_args() == ["--standalone"]
    assert rendezvous(1, {"MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1"}).torchrun_args() == ["--standalone"]
    assert rendezvous(2, {"SKYPILOT_NUM_NODES": "1"}).torchrun_args() == ["--standalone"]  # the environment wins


def test_skypilot_nodes_meet_at_the_head_node():
    env = {"SKYPILOT_NUM_NODES": "3", "SKYPILOT_NODE_RANK": "2", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n10.0.0.7\n"}
    assert rendezvous(1, env) == Rendezvous(3, 2, "10.0.0.5:29500")
    assert rendezvous(1, env).torchrun_args() == [
        "--nnodes",
        "3",
        "--node-rank",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "10.0.0.5:29500",
    ]
    assert rendezvous(1, {**env, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}).endpoint == "head:1234"
    assert rendezvous(2, {"MASTER_ADDR": "127.0.0.1", "NODE_RANK": "0"}) == Rendezvous(2, 0, "127.0.0.1:29500")


@pytest.mark.parametrize(
    "nodes, env, message",
    [
        (2, {}, "train.nodes: 2 nodes, but no rendezvous host: set MASTER_ADDR"),
        (
            1,
            {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "2", "MASTER_ADDR": "h"},
            "SKYPILOT_NODE_RANK=2: a node rank must be below the node count (SKYPILOT_NUM_NODES: 2)",
        ),
        (1, {"NNODES": "two"}, "NNODES='two': expected a whole number"),
        (2, {"MASTER_ADDR": "h", "MASTER_PORT": "http"}, "MASTER_PORT='http': expected a port number"),
    ],
)
def test_a_multi_node_job_that_cannot_meet_is_one_line(nodes, env, message):
    with pytest.raises(InputError) as error:
        rendezvous(nodes, env)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_slots_split_cores_and_gpus_evenly():
    cpus = tuple(range(8))
    assert [share(k, 2, 1, cpus, None).cpus for k in (0, 1)] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert share(1, 2, 2, cpus, None).threads == 2  # two torchrun processes share the slot's four cores
    assert share(0, 4, 1, (0, 1), None).cpus == (0,) and share(3, 4, 1, (0, 1), None).cpus == (1,)  # slots > cores
    gpus = ("0", "1", "2", "3")
    assert [share(k, 2, 1, cpus, gpus).gpus for k in (0, 1)] == [("0", "1"), ("2", "3")]
    assert [share(k, 3, 1, cpus, ("0", "1")).gpus for k in (0, 1, 2)] == [("0",), ("1",), ("0",)]


HOLD_A_SLOT = """
import json, os, sys, time
from stages.lib.launch import use_slot
slot = use_slot()
print(json.dumps({**slot.as_dict(), "omp": os.environ["OMP_NUM_THREADS"], "held": os.environ["STAGES_SLOT"],
                  "affinity": sorted(os.sched_getaffinity(0))}), flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_concurrent_stages_take_different_slots_and_a_third_waits_for_one(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "STAGES_SLOTS": "2",
        "STAGES_SLOTS_DIR": str(tmp_path / "slots"),
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    env.pop(HELD, None)

    def hold(seconds: str) -> subprocess.Popen:
        command = [sys.executable, "-c", HOLD_A_SLOT, seconds]
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)

    first, second = hold("8"), hold("2")
    a, b = json.loads(first.stdout.readline()), json.loads(second.stdout.readline())
    started = time.monotonic()
    third = subprocess.run(
        [sys.executable, "-c", HOLD_A_SLOT, "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    waited = time.monotonic() - started
    first.wait(), second.wait()
    c = json.loads(third.stdout)
    assert {a["index"], b["index"]} == {0, 1} and {a["gpus"][0], b["gpus"][0]} == {"0", "1"}
    assert a["affinity"] == a["cpus"] and b["affinity"] == b["cpus"] and a["omp"] == str(a["threads"])
    if (os.cpu_count() or 1) >= 2:
        assert not set(a["cpus"]) & set(b["cpus"])
    # The third stage found both slots held: it waited for the one the second stage freed on exit.
    assert "waiting for a free slot" in third.stderr and c["index"] == b["index"]
    assert waited < 7, waited  # ... not for the first one, which was still held


def test_without_stages_slots_nothing_changes(monkeypatch):
    env = {key: value for key, value in os.environ.items() if key != "STAGES_SLOTS"}
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    assert use_slot(env=env) is None
    assert env == {key: value for key, value in os.environ.items() if key != "STAGES_SLOTS"}
    assert before is None or os.sched_getaffinity(0) == before


@pytest.mark.parametrize(
    "train, message",
    [
        (
            {"nodes": 2},
            "error: train.nodes: 2 nodes, but no rendezvous host: set MASTER_ADDR (the first node's address) "
            "or run under SkyPilot (SKYPILOT_NODE_IPS)",
        ),
        (
            {"distributed": "fsdp", "processes": 1},
            "error: train.distributed: fsdp shards the model across processes, but "
            "train.processes is 1 on 1 node; set train.processes to the GPUs per machine (or run on several nodes), "
            "or use ddp",
        ),
    ],
)
def test_the_train_command_rejects_an_impossible_layout_in_one_line_before_any_work(tmp_path, train, message):
    """dvc.yaml's command, as dvc runs it: the first process's checks stop with one line, torchrun never starts."""
    from conftest import write_params

    write_params(tmp_path, {"train": train})
    unset = dict.fromkeys(("MASTER_ADDR", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES", "NNODES"))
    result = dvc_train(tmp_path, unset)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "models").exists()


def test_fsdp_with_qlora_is_refused_by_the_params_check():
    import yaml

    from stages.lib.params import ParamsError, parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(method="qlora", distributed="fsdp")
    with pytest.raises(ParamsError) as error:
        parse_params(raw, "params.yaml")
    assert str(error.value) == (
        "params.yaml: train: distributed: fsdp cannot shard the 4-bit bitsandbytes weights of "
        "method qlora; use ddp (or method lora to shard)"
    )
