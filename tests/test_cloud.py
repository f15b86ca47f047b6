"""The SkyPilot task files (cloud/) as SkyPilot itself reads them: `pip install -r requirements-cloud.txt`."""

from pathlib import Path

import pytest
import yaml

from conftest import REPO

sky = pytest.importorskip("sky", reason="SkyPilot is not installed (pip install -r requirements-cloud.txt)")

TASKS = sorted((REPO / "cloud").glob("*.yaml"))


def pinned_skypilot() -> str:
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements-cloud.txt").read_text().splitlines()]
    return next(line.split("==")[1] for line in lines if line.startswith("skypilot"))


def test_the_installed_skypilot_is_the_pinned_one():
    from importlib.metadata import version

    assert version("skypilot") == pinned_skypilot()


@pytest.mark.parametrize("path", TASKS, ids=[path.name for path in TASKS])
def test_task_files_load_with_skypilots_loader_and_run_the_dvc_experiment(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # workdir: . is this repository
    task = sky.Task.from_yaml(str(path))
    assert task.workdir in (".", str(REPO)) or Path(str(task.workdir)).resolve() == REPO
    assert any(resource.accelerators for resource in task.resources)
    run = task.run
    assert "dvc exp run --pull --allow-missing" in run and "dvc exp push" in run and "dvc pull" in task.run
    assert "pip install -q -r requirements.txt" in task.setup
    raw = yaml.safe_load(path.read_text())
    if raw.get("num_nodes", 1) > 1:  # each node runs dvc.yaml's train command; its launcher reads SkyPilot's nodes
        assert task.num_nodes == raw["num_nodes"] >= 2
        command = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
        assert f"{command}   # dvc.yaml's train command" in run
