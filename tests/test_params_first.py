"""An invalid params.yaml never costs an output: stage check_params validates the whole file before DVC removes any
stage's outputs, with the real `dvc repro` and `dvc exp run -S` on the fixture pipeline (trained once, committed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pipeline_repo import dvc, make_repo, sh, share_cache, stages_ran

KEPT = (
    "models/finetuned",
    "metrics/train.json",
    "metrics/runtime/train.json",
    "dvclive",
    "data/tokenized",
    "models/base",
)
CHECKED = Path("data/params_checked.txt")


def digest(path: Path) -> str:
    """sha256 over a file, or over a directory's relative paths and contents."""
    hasher = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        hasher.update(str(file.relative_to(path.parent)).encode() + b"\0" + file.read_bytes())
    return hasher.hexdigest()


def snapshot(repo: Path) -> dict[str, str]:
    return {name: digest(repo / name) for name in KEPT}


@pytest.fixture(scope="module")
def trained(llama_repo, tmp_path_factory) -> Path:
    """The fixture pipeline reproduced up to train and committed, as a user's last good run (restored from
    llama_repo's run-cache: the same params and data, trained once for the session)."""
    repo = make_repo(tmp_path_factory.mktemp("params-first"), "llama")
    share_cache(repo, llama_repo)
    reproduced = dvc(repo, "repro", "train").stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in reproduced, reproduced
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "good run")
    return repo


def set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *sections, key = dotted.split(".")
    node = params
    for section in sections:
        node = node[section]
    node[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def error_lines(result) -> list[str]:
    return [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("error:")]


def test_every_stage_waits_for_the_params_check():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["check_params"]["params"] == [{"params.yaml": None}]  # every key, and a misspelt new one too
    missing = [
        name
        for name, stage in stages.items()
        if name != "check_params" and str(CHECKED) not in stage.get("do", stage)["deps"]
    ]
    assert not missing, f"stages that DVC could run (removing their outputs) before params.yaml is validated: {missing}"


@pytest.mark.slow
def test_an_invalid_param_stops_dvc_repro_before_any_output_is_removed(trained):
    before = snapshot(trained)
    original = (trained / "params.yaml").read_text()
    try:
        set_param(trained, "train.max_steps", -5)
        result = dvc(trained, "repro", check=False)
        assert result.returncode != 0
        assert stages_ran(result.stdout, with_check=True) == {"check_params"}
        errors = error_lines(result)
        assert len(errors) == 1 and "train.max_steps" in errors[0] and "-5" in errors[0], errors
        assert "Traceback" not in result.stderr
        assert snapshot(trained) == before

        (trained / "params.yaml").write_text(original)
        set_param(trained, "evaluate.bootstrap.resamples", 0)  # evaluate's own outputs: the check comes first too
        result = dvc(trained, "repro", "evaluate", check=False)
        assert result.returncode != 0 and stages_ran(result.stdout, with_check=True) == {"check_params"}
        assert "evaluate.bootstrap.resamples" in error_lines(result)[0]
    finally:
        (trained / "params.yaml").write_text(original)
    restored = dvc(trained, "repro", "train").stdout  # the check's output comes back; nothing else reruns
    assert stages_ran(restored, with_check=True) <= {"check_params"}
    assert snapshot(trained) == before
    assert "up to date" in dvc(trained, "status", "--with-deps", "train").stdout


@pytest.mark.slow
def test_a_rejected_exp_run_keeps_every_output_and_says_how_to_restore_params(trained):
    before = snapshot(trained)
    committed = (trained / "params.yaml").read_text()
    result = dvc(trained, "exp", "run", "-S", "train.learning_rate=abc", "train", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert snapshot(trained) == before
    errors = error_lines(result)
    assert len(errors) == 2 and "train.learning_rate" in errors[0] and "'abc'" in errors[0], errors
    assert "`git checkout HEAD -- params.yaml`" in errors[1], errors
    # DVC wrote the rejected value into the workspace before any stage ran; the error's command restores the file.
    assert "learning_rate: abc" in (trained / "params.yaml").read_text()
    sh(trained, "git", "checkout", "HEAD", "--", "params.yaml")
    assert (trained / "params.yaml").read_text() == committed
    assert stages_ran(dvc(trained, "repro", "train").stdout, with_check=True) <= {"check_params"}
    assert snapshot(trained) == before


@pytest.mark.slow
def test_a_queued_experiment_with_an_invalid_param_fails_alone(trained):
    before = snapshot(trained)
    committed = (trained / "params.yaml").read_text()
    dvc(trained, "exp", "run", "--queue", "-S", "train.max_steps=-5", "train")
    result = dvc(trained, "exp", "run", "--run-all", check=False)
    assert "train.max_steps" in result.stdout + result.stderr
    assert (trained / "params.yaml").read_text() == committed and snapshot(trained) == before
    dvc(trained, "queue", "remove", "--all", check=False)


@pytest.mark.slow
def test_a_valid_edit_reruns_only_the_stages_whose_params_changed(trained):
    checked = (trained / CHECKED).read_text()
    original = (trained / "params.yaml").read_text()
    try:
        set_param(trained, "evaluate.gate.min_stop_rate", 0.5)  # read by evaluate only
        status = json.loads(dvc(trained, "status", "--json", "--with-deps", "train").stdout)
        assert set(status) == {"check_params"}, status
        assert stages_ran(dvc(trained, "repro", "train").stdout, with_check=True) == {"check_params"}
        assert (trained / CHECKED).read_text() == checked  # constant: nothing downstream is invalidated through it
        assert "up to date" in dvc(trained, "status", "--with-deps", "train").stdout
        nothing = dvc(trained, "repro", "train").stdout
        assert stages_ran(nothing, with_check=True) == set()  # nothing changed: nothing runs
    finally:
        (trained / "params.yaml").write_text(original)
        dvc(trained, "repro", "train")
