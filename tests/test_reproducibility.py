"""Reproducibility, caching and data safety through the real `dvc` CLI on the fixture pipeline."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pipeline_repo import (
    dvc,
    make_repo,
    read_json,
    sh,
    share_cache,
    stage_process_running,
    stages_ran,
    tool_env,
    wait_until_gone,
)
from stage_server import run_forked
from test_pipeline import VERDICTS

DVC_OUTPUTS = [
    "data/raw/conversations.jsonl",
    "data/processed",
    "data/tokenized",
    "models/base",
    "models/finetuned",
    "data/scores/base.json",
    "data/scores/finetuned.json",
]


# The README's comparison: the columns that matter, out of ~200 (every metric and param).
EXP_COLUMNS = (
    r"Experiment|train\.learning_rate|finetuned\.(perplexity|chrf|stop_rate)$"
    r"|(.*runtime/train\.json:)?trained_tokens_per_s$"
)


def digest(path: Path) -> str:
    """sha256 of a file, or of a directory's relative paths and file contents."""
    sha = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        sha.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        sha.update(file.read_bytes())
    return sha.hexdigest()


def metrics_snapshot(repo: Path) -> dict[str, bytes]:
    """Every reproducible metrics file (metrics/runtime/ holds the wall-clock ones and is left out)."""
    return {p.name: p.read_bytes() for p in sorted((repo / "metrics").glob("*.json"))} | {
        "transcripts.md": (repo / "metrics" / "transcripts.md").read_bytes()
    }


def set_params(repo: Path, section: str, **values) -> str:
    """Change params.yaml in place; returns the original text to restore."""
    path = repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return original


def test_every_param_reaches_a_stage_so_exp_run_set_param_works():
    """`dvc exp run -S key=value` only reruns what declares the key: every leaf of params.yaml is declared."""
    declared = [
        p
        for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
        for p in stage.get("do", stage).get("params", [])
        if isinstance(p, str)
    ]  # not check_params' `params.yaml:` (the whole file, for validation only)

    def leaves(tree: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in tree.items():
            out += leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
        return out

    for leaf in leaves(yaml.safe_load((REPO / "params.yaml").read_text())):
        assert any(leaf == d or leaf.startswith(d + ".") for d in declared), f"{leaf} is read by no stage in dvc.yaml"


def test_a_training_change_reruns_downstream_is_reviewed_and_going_back_restores_from_run_cache(llama_repo):
    """Commit the reference run, change a training param, reproduce, review the workspace against the commit, then
    go back: every stage comes back from the run-cache with the reference's bytes. (One training run serves the
    three claims: on 2 cores the fixture pipeline's training and scoring take minutes.)"""
    before = metrics_snapshot(llama_repo)
    model = digest(llama_repo / "models" / "finetuned")
    sh(llama_repo, "git", "add", "-A")
    sh(llama_repo, "git", "commit", "-qm", "reference run", check=False)
    original = set_params(llama_repo, "train", learning_rate=3.0e-3)
    try:
        # A training change re-scores the fine-tuned model only: the base model's scores are not recomputed.
        ran = stages_ran(dvc(llama_repo, "repro").stdout)
        assert ran == {"train", "score@finetuned", "evaluate", "transcripts", "export"}
        review = ("--base", "HEAD", "--out", "review/review.md")
        result = run_forked("stages.tools.review", llama_repo, review, tool_env())
        assert result.returncode == 0, result.stderr[-3000:]
        report = (llama_repo / "review" / "review.md").read_text()
        assert "train.learning_rate" in report and "0.005" in report and "0.003" in report
        assert report.index("## Significance") < report.index("## Parameters")  # the table opens the report
        assert "| perplexity |" in report and "| stop_rate |" in report and "[" in report
        assert any(f"| {word} |" in report for word in VERDICTS if word)
        assert "a verdict is about these two models" in report  # one trained model a side: said plainly
        assert "| **gate** |" in report and "metrics/train.json" in report
        image = llama_repo / "review" / "review-training-loss.png"  # named after the report, not generically
        assert "![Training loss](review-training-loss.png)" in report and image.stat().st_size > 1000
        assert "## Transcripts" in report
        assert "review/review.md" in result.stdout
    finally:
        (llama_repo / "params.yaml").write_text(original)
        shutil.rmtree(llama_repo / "review", ignore_errors=True)
    back = dvc(llama_repo, "repro")
    assert stages_ran(back.stdout) == {"evaluate", "transcripts"}, (
        back.stdout
    )  # nothing recomputed but the seconds-long summaries
    for stage in ("train", "score@finetuned", "export"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in back.stdout
    assert metrics_snapshot(llama_repo) == before and digest(llama_repo / "models" / "finetuned") == model
    assert "Data and pipelines are up to date" in dvc(llama_repo, "status").stdout


def test_push_to_a_remote_and_pull_into_an_empty_cache(llama_repo, tmp_path):
    before = metrics_snapshot(llama_repo)
    outputs = {output: digest(llama_repo / output) for output in DVC_OUTPUTS}
    cache, session_cache = llama_repo / ".dvc" / "cache", tmp_path / "session-cache"
    dvc(llama_repo, "remote", "add", "--local", "-d", "store", str(tmp_path / "remote"))
    try:
        started = time.perf_counter()
        pushed = dvc(llama_repo, "push")
        push_s = time.perf_counter() - started
        assert "pushed" in pushed.stdout
        shutil.move(cache, session_cache)  # put back afterwards: later tests restore stages from its run-cache
        for output in DVC_OUTPUTS:
            path = llama_repo / output
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        assert "deleted" in dvc(llama_repo, "status").stdout
        started = time.perf_counter()
        dvc(llama_repo, "pull")
        pull_s = time.perf_counter() - started
        assert "Data and pipelines are up to date" in dvc(llama_repo, "status").stdout
    finally:
        dvc(llama_repo, "remote", "remove", "--local", "store")
        if session_cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
            shutil.move(session_cache, cache)
    assert {output: digest(llama_repo / output) for output in DVC_OUTPUTS} == outputs
    assert metrics_snapshot(llama_repo) == before
    size = sum(p.stat().st_size for p in (tmp_path / "remote").rglob("*") if p.is_file())
    print(f"\nremote round trip: {size / 2**20:.1f} MiB, push {push_s:.1f} s, pull {pull_s:.1f} s")


def start_repro(repo: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", *args],
        cwd=repo,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # As a shell starts a foreground command: a suite started in the background ignores SIGINT and SIGQUIT,
        # and every stage would inherit that.
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGQUIT)],
    )


def wait_for(condition, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"dvc repro ended before the test could act:\n{process.stdout.read()[-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def kill_group(process: subprocess.Popen, signum: int) -> None:
    os.killpg(process.pid, signum)
    process.wait(timeout=60)
    assert process.returncode != 0


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> tuple[Path, str, bytes]:
    """A repository whose preprocess ran to the end on the bundled chats: its outputs' digest and data report."""
    repo = make_repo(tmp_path_factory.mktemp("killed"), "llama", {"data": {"source": "data/chitchat.source"}})
    dvc(repo, "repro", "preprocess")  # 7k conversations: ~10 s of work
    return repo, digest(repo / "data" / "processed"), (repo / "metrics" / "data.json").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_repro_killed_during_preprocess_leaves_no_torn_output(preprocessed, signum):
    repo, complete, report = preprocessed  # each case leaves it as it found it: complete and up to date
    processed = repo / "data" / "processed"
    process = start_repro(repo, "--force", "--single-item", "preprocess")
    wait_for(lambda: stage_process_running("preprocess", repo), process)
    time.sleep(2.0)  # mid-way through cleaning (datasets.map on two worker processes)
    kill_group(process, signum)
    # the stage and every process it forked are gone, not hung on each other
    wait_until_gone("preprocess", repo, 30, "the stage outlived its signal")
    if signum == signal.SIGTERM:  # a clean stop, told in one line: no library's traceback from its killed workers
        output = process.stdout.read()
        assert "terminated" in output and "Traceback" not in output, output[-3000:]
    assert not processed.exists() or digest(processed) == complete, "half-written data/processed"

    again = dvc(repo, "repro", "preprocess")  # reruns it, or restores the completed run from the run-cache
    assert "preprocess" in stages_ran(again.stdout) or "Stage 'preprocess' is cached" in again.stdout
    assert digest(processed) == complete and (repo / "metrics" / "data.json").read_bytes() == report
    if "preprocess" not in stages_ran(again.stdout):  # a run-cache restore runs no code: the next run sweeps
        dvc(repo, "repro", "--force", "preprocess")
    assert not list((repo / "data").glob(".processed.*.tmp")), "temporary output left behind"
    assert "Data and pipelines are up to date" in dvc(repo, "status", "preprocess").stdout


def test_a_run_killed_during_train_and_resumed_reproduces_the_model_scores_and_metrics_byte_for_byte(
    llama_repo, tmp_path
):
    """The same params and data in a second repository, killed (SIGKILL) after a checkpoint and resumed, gives the
    uninterrupted run's model, scores and metrics byte for byte (llama_repo: its losses are averaged over every
    step, not since the resume); while it runs, a second `dvc repro` is refused. The second repository shares
    llama_repo's cache: the data stages come back from its run-cache, while training and scoring run again."""
    repo = make_repo(tmp_path, "llama")  # the same params and data as llama_repo
    share_cache(repo, llama_repo)
    restored = dvc(repo, "repro", "tokenize", "base_model")
    assert stages_ran(restored.stdout) == set(), restored.stdout
    process = start_repro(repo, "--no-run-cache", "train")  # trains: llama_repo's run-cache holds this run
    wait_for(lambda: stage_process_running("train", repo), process)
    second = dvc(repo, "repro", check=False)  # a concurrent run must be refused, not interleaved
    refused = second.stderr + second.stdout
    assert second.returncode != 0 and (
        "Unable to acquire lock" in refused or "is busy, it is being blocked by" in refused
    ), refused

    from stages.train import complete

    checkpoint = repo / "models" / "checkpoints" / "checkpoint-75"
    wait_for(lambda: complete(checkpoint, 1), process)  # fully written: a half-written one is rightly not resumed
    kill_group(process, signal.SIGKILL)
    wait_until_gone("train", repo, 10, "the train stage outlived its killed `dvc repro`")
    assert not (repo / "models" / "finetuned").exists(), "half-written models/finetuned"
    assert not (repo / "metrics" / "train.json").exists()

    resumed = dvc(repo, "repro", "--no-run-cache", "train")
    assert "train" in stages_ran(resumed.stdout)
    assert read_json(repo / "metrics" / "runtime" / "train.json")["resumed_from_step"] == 75, (
        sorted(p.name for p in (repo / "models" / "checkpoints").iterdir()),
        resumed.stdout[-1500:],
    )
    checkpoints = repo / "models" / "checkpoints"  # finished: marked complete, its step checkpoints removed
    assert read_json(checkpoints / "fingerprint.json")["status"] == "complete"
    assert not list(checkpoints.glob("checkpoint-*"))
    scored = dvc(repo, "repro", "--no-run-cache", "score@finetuned")  # the resumed model, scored again
    assert stages_ran(scored.stdout) == {"score@finetuned"}, scored.stdout
    dvc(repo, "repro")  # the rest: score@base from the run-cache; evaluate, transcripts and export run
    first_metrics, second_metrics = metrics_snapshot(llama_repo), metrics_snapshot(repo)
    assert first_metrics.keys() == second_metrics.keys() and len(first_metrics) >= 7
    for name, content in first_metrics.items():
        assert second_metrics[name] == content, f"metrics/{name} differs from the uninterrupted run"
    for output in DVC_OUTPUTS:
        assert digest(llama_repo / output) == digest(repo / output), output
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout
    print("\nbyte-identical across two runs, one of them killed and resumed:")
    for name, content in first_metrics.items():
        print(f"  metrics/{name:<22} sha256 {hashlib.sha256(content).hexdigest()[:16]}")
    for output in DVC_OUTPUTS:
        print(f"  {output:<30} sha256 {digest(repo / output)[:16]}")


def queued_experiment(repo: Path, name: str) -> tuple[bytes, dict, str]:
    """An experiment's train metrics, runtime record and trained model's hash, read from its Git ref (the
    metrics are Git-tracked; dvc.lock holds the model directory's hash)."""
    refs = sh(repo, "git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").stdout.splitlines()
    (rev,) = [line.split()[0] for line in refs if line.endswith(f"/{name}")]
    show = lambda path: sh(repo, "git", "show", f"{rev}:{path}").stdout  # noqa: E731
    lock = yaml.safe_load(show("dvc.lock"))
    (model,) = [out["md5"] for out in lock["stages"]["train"]["outs"] if out["path"] == "models/finetuned"]
    return show("metrics/train.json").encode(), json.loads(show("metrics/runtime/train.json")), model


def test_a_queued_sweep_runs_two_at_once_in_their_own_slots_trains_as_alone_and_compares(llama_repo, monkeypatch):
    """`dvc exp run --queue` then `STAGES_SLOTS=2 dvc queue start -j 2`: both experiments run from the last commit
    at the same time, each on its own half of the cores (slots 0 and 1); one trains, byte for byte, the model and
    metrics it trains alone (there on every core); `dvc exp show` compares them with the README's columns."""
    from stages.lib.launch import HELD

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "STAGES_SLOTS", HELD):
        monkeypatch.delenv(name, raising=False)
    sh(llama_repo, "git", "add", "-A")
    sh(llama_repo, "git", "commit", "-qm", "baseline for the sweep", check=False)  # queued runs start from HEAD
    rates = ("0.002", "0.01")
    short = ["-S", "train.max_steps=45", "-S", "train.eval_steps=45", "-S", "train.save_steps=45"]  # a third of it
    for rate in rates:  # to evaluate: not export
        queued = ["exp", "run", "--queue", "-n", f"lr-{rate}", "-S", f"train.learning_rate={rate}", *short, "evaluate"]
        dvc(llama_repo, *queued)
    env = {**tool_env(), "STAGES_SLOTS": "2", "STAGES_SLOTS_DIR": str(llama_repo.parent / "slots")}
    started = subprocess.run(
        [sys.executable, "-m", "dvc", "queue", "start", "-j", "2"],
        cwd=llama_repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert started.returncode == 0, started.stderr
    # `dvc queue status` costs a second of CPU, taken from the two experiments: ask it when both have committed
    # (git, milliseconds) or every 20 s, in case one failed.
    deadline, asked, wanted = time.time() + 900, time.time(), {f"lr-{rate}" for rate in rates}
    while True:
        refs = sh(llama_repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
        if wanted <= {ref.rsplit("/", 1)[-1] for ref in refs} or time.time() - asked > 20:
            status, asked = dvc(llama_repo, "queue", "status").stdout, time.time()
            if not any(word in status for word in ("Queued", "Running")):
                break
        assert time.time() < deadline, status
        time.sleep(0.5)
    if status.count("Success") != 2:
        logs = "\n".join(dvc(llama_repo, "queue", "logs", f"lr-{rate}", check=False).stdout[-3000:] for rate in rates)
        raise AssertionError(f"{status}\n{logs}")

    shown = dvc(llama_repo, "exp", "show", "--md", "--drop", ".*", "--keep", EXP_COLUMNS).stdout
    header = [cell.strip() for cell in shown.splitlines()[0].strip("|").split("|")]
    header = [cell.rsplit(":", 1)[-1] for cell in header]  # DVC prefixes a file only when two files share a key
    metric_columns = {"trained_tokens_per_s", "finetuned.perplexity", "finetuned.chrf", "finetuned.stop_rate"}
    assert header[0] == "Experiment" and header[-1] == "train.learning_rate", header  # metrics' order: DVC's
    assert set(header[1:-1]) == metric_columns, header
    shown_rates = sorted(line.strip("|").split("|")[-1].strip() for line in shown.splitlines()[2:] if "[" in line)
    assert shown_rates == sorted(rates), shown

    slots, models = set(), set()
    for rate in rates:
        _, runtime, model = queued_experiment(llama_repo, f"lr-{rate}")
        models.add(model)
        assert runtime["slot"]["count"] == 2, runtime["slot"]
        slots.add(runtime["slot"]["index"])
        if (os.cpu_count() or 1) >= 2:
            assert len(runtime["slot"]["cpus"]) == (os.cpu_count() or 1) // 2
    assert slots == {0, 1}  # the second experiment found slot 0 held: they ran at the same time
    assert len(models) == 2  # two learning rates, two models: the comparison can tell models apart

    # The first rate again, alone (no slot, no pinning) with the slot's thread count: --force --single-item
    # retrains it (not a run-cache restore). Another thread count may sum products in another order (DESIGN §8).
    threads = str(runtime["slot"]["threads"])
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    monkeypatch.setenv("MKL_NUM_THREADS", threads)
    alone = ["exp", "run", "--temp", "-f", "-s", "-n", "alone", "-S", f"train.learning_rate={rates[0]}", *short]
    dvc(llama_repo, *alone, "train")
    metrics, runtime, model = queued_experiment(llama_repo, f"lr-{rates[0]}")
    alone_metrics, alone_runtime, alone_model = queued_experiment(llama_repo, "alone")
    print(
        {
            "queued": (json.loads(metrics)["val_loss_after"], model),
            "alone": (json.loads(alone_metrics)["val_loss_after"], alone_model),
        }
    )
    assert alone_runtime["slot"] is None and alone_runtime["resumed_from_step"] == 0
    assert metrics == alone_metrics and model == alone_model
    assert "Data and pipelines are up to date" in dvc(llama_repo, "status").stdout  # the workspace is untouched
