"""Build a temporary git + DVC repository from this one, pointed at the tiny fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import FIXTURES, REPO, write_params
from stage_server import run_forked
from tiny import save_tiny, save_tiny_encoder

TINY_TRAIN = {
    "max_steps": 150,
    "batch_size": 8,
    "learning_rate": 5.0e-3,
    "warmup_ratio": 0.1,
    "eval_steps": 75,
    "save_steps": 75,
    "logging_steps": 15,
    "lr_scheduler": "linear",
    "precision": "fp32",  # tests assert exact equalities; `auto` (measured per machine) has its own test
    "attention": "sdpa",
}


def tool_env() -> dict:
    """The environment of a user whose virtual environment is active (dvc, torchrun on PATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def dvc_command(work: Path) -> str:
    """The train stage's command in dvc.yaml."""
    command = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    assert "${" not in command, command  # no params to substitute, as dvc would
    return command


def dvc_train(work: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The train stage's command as dvc.yaml runs it (checks, then training here or under torchrun), with `env`'s
    changes (None removes a variable): forked from a preloaded interpreter (stage_server.py), which runs it fresh
    when the changes reach what the libraries read at import."""
    command = dvc_command(work)
    full = {k: v for k, v in {**tool_env(), "PYTHONPATH": str(REPO), **(env or {})}.items() if v is not None}
    assert command.split()[:3] == ["python", "-m", "stages.train"], command
    return run_forked("stages.train", work, tuple(command.split()[3:]), full)


def sh(cwd: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(cwd, sys.executable, "-m", "dvc", *args, check=check)


def make_repo(root: Path, arch: str = "llama", overrides: dict | None = None) -> Path:
    repo = root / "repo"
    repo.mkdir()
    for item in ("stages", "dvc.yaml", "params.yaml", ".gitignore"):
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo / item)
    (repo / "data" / "external").mkdir(parents=True)
    shutil.copy(REPO / "data" / "chitchat.source", repo / "data" / "chitchat.source")
    shutil.copy(FIXTURES / "conversations.jsonl", repo / "data" / "external" / "chats.jsonl")
    save_tiny(repo / "tiny-model", arch)
    save_tiny_encoder(repo / "tiny-encoder")
    params = {
        "data": {"source": "data/external/chats.jsonl"},
        "preprocess": {"val_fraction": 0.1, "test_fraction": 0.1, "unseen_topics": 1},
        "encoder": {"model": "tiny-encoder"},
        "model": {"base": "tiny-model"},
        "tokenize": {"max_length": 128, "max_val_examples": None},
        "train": dict(TINY_TRAIN),
        "evaluate": {
            "max_conversations": 5,
            "max_unseen_conversations": 4,
            "ranking": {"candidates": 4, "turns_per_conversation": 1},
            "max_new_tokens": 24,
            "batch_size": 8,
            "precision": "fp32",
            "min_slice_replies": 3,
            "bootstrap": {"resamples": 200, "confidence": 0.95},
        },
    }
    for section, values in (overrides or {}).items():
        params.setdefault(section, {}).update(values)
    write_params(repo, params)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "test@example.com")
    sh(repo, "git", "config", "user.name", "test")
    dvc(repo, "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "fixture pipeline")
    return repo


def share_cache(repo: Path, other: Path) -> None:
    """Point `repo` at `other`'s DVC cache, run-cache included: a stage `other` ran with the same command, deps and
    params is restored, not run again (`dvc repro --no-run-cache` runs it)."""
    dvc(repo, "cache", "dir", "--local", str(other / ".dvc" / "cache"))


def stages_ran(output: str, with_check: bool = False) -> set[str]:
    """Stages `dvc repro` ran (not those it restored from the run-cache or skipped). check_params, which reruns
    on any edit of params.yaml in a second and invalidates nothing, counts only `with_check`."""
    ran = {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}
    return ran if with_check else ran - {"check_params"}


def stage_process_running(module: str, repo: Path) -> bool:
    """A process of `python -m stages.<module>` (or torchrun ... -m stages.<module>) is alive in `repo`: not one of
    another test's (the suite runs on several workers) or of a pipeline the developer runs meanwhile."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        if b"-m" in cmdline and f"stages.{module}".encode() in cmdline and cwd.is_relative_to(repo.resolve()):
            return True
    return False


def wait_until_gone(module: str, repo: Path, seconds: float, why: str) -> None:
    """Fail with `why` unless every process of stage `module` in `repo` has exited within `seconds`."""
    deadline = time.time() + seconds
    while stage_process_running(module, repo):
        assert time.time() < deadline, why
        time.sleep(0.1)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
