"""Shared fixtures: offline settings, running stages as a user would, and tiny real models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stage_server import keep_environment, run_forked

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every dvc command would start a daemon to send usage analytics (~0.5 s of CPU each, and no network here).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
keep_environment()  # what forked stage runs start from (stage_server.py)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(REPO))


def write_params(directory: Path, overrides: dict | None = None) -> Path:
    """params.yaml from the repository's, with nested `overrides` merged in."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    # Tiny models compile (~30 s cold) for longer than they train: tests run eagerly unless they set otherwise
    # (test_train.py runs the default, torch_compile: auto, on its own).
    merge(params, {"train": {"torch_compile": False}})
    merge(params, overrides or {})
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(stage: str, cwd: Path, *args: str, fresh: bool = False) -> subprocess.CompletedProcess:
    """`python -m stages.<stage> *args` in `cwd`: a process forked from a preloaded interpreter (stage_server.py),
    or a new interpreter when `fresh`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not fresh:
        return run_forked(f"stages.{stage}", cwd, args, env)
    command = [sys.executable, "-m", f"stages.{stage}", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "data" / "external").mkdir(parents=True)
    return tmp_path


# A test that uses one of these fixtures is `slow`, like every test on the bundled model (deselect them with
# `-m "not slow"`; CI runs everything): the fixture pipeline takes minutes on 2 cores, and the others run stages or
# chat in processes that each import torch and transformers (test_chat.py, test_export.py).
SLOW_FIXTURES = {"llama_repo", "chat_dir", "exported", "bad_workdir", "llama_workdir"}


# Under pytest-xdist (`pytest -n 2`; pyproject.toml sets `--dist loadgroup`) a test that shares a module-scoped fixture
# with others runs on their worker, so the fixture is built once; every user of the session's `llama_repo` pipeline
# shares one worker too. Every other test goes to whichever worker is free.
SESSION_GROUP = "llama_repo"


def xdist_group(item: pytest.Item, fixtures: set[str]) -> str | None:
    if SESSION_GROUP in fixtures:
        return SESSION_GROUP
    info = getattr(item, "_fixtureinfo", None)  # pytest's resolved fixtures; plugins' own (baseid "") don't count
    shared = [d for defs in (info.name2fixturedefs.values() if info else ()) for d in defs
              if d.baseid and d.scope in ("module", "session")]
    return item.module.__name__ if shared else None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & fixtures or item.get_closest_marker("bundled"):
            item.add_marker(pytest.mark.slow)
        group = xdist_group(item, fixtures)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config):
    # Each xdist worker runs its own stage processes: one torch thread each keeps two workers from fighting over
    # two cores (spinning OpenMP threads). Set before any stage process starts; a test may still override it.
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def llama_repo(tmp_path_factory) -> Path:
    """The fixture pipeline (tiny Llama, fixture chats) reproduced once with `dvc repro`.

    Tests that change it restore what they change."""
    from pipeline_repo import dvc, make_repo, stages_ran

    repo = make_repo(tmp_path_factory.mktemp("llama"), "llama")
    result = dvc(repo, "repro")
    assert stages_ran(result.stdout) == pipeline_stages(repo) - {"check_params"}  # which stages_ran leaves out
    return repo


def pipeline_stages(repo: Path) -> set[str]:
    """Every stage `dvc repro` runs in `repo`, a `foreach` stage once per item (score@base, score@finetuned)."""
    names = set()
    for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items():
        names |= {f"{name}@{item}" for item in stage["foreach"]} if "foreach" in stage else {name}
    return names
