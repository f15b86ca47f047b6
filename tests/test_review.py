"""The review's significance table on a fixture: one change is real, one is noise, and the test sets can differ."""
import json
import subprocess

import numpy as np

from stages.tools.review import significance


def records(stop_probability: float, seed: int, ids: range) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in ids:
        text = " ".join(["w"] * int(rng.integers(3, 9)))  # reply length: the same distribution on both revisions
        reply = {"turn": 1, "text": text, "human": "w w w", "stopped": bool(rng.random() < stop_probability), "relevance": 0.0}
        scores = {"nll": 10.0, "tokens": 5, "correct": 1, "n_bytes": 20, "replies": [reply]}
        out.append({"id": f"c{i}", "topic": "t", "base": scores, "finetuned": scores, "human": scores})
    return out


def commit(repo, data: list[dict]) -> None:
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics" / "eval_conversations.json").write_text(json.dumps(data))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "scores"], cwd=repo, check=True)


def row(lines: list[str], metric: str) -> str:
    return next(line for line in lines if line.startswith(f"| {metric} |"))


def test_a_real_change_is_better_and_noise_is_within_noise(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    commit(tmp_path, records(0.5, seed=1, ids=range(150)))
    (tmp_path / "metrics" / "eval_conversations.json").write_text(json.dumps(records(0.97, seed=2, ids=range(150))))
    monkeypatch.chdir(tmp_path)
    lines, warnings = significance("HEAD")
    assert row(lines, "stop_rate").endswith("| better |")
    assert row(lines, "mean_reply_words").endswith("| within noise |")
    assert row(lines, "perplexity").endswith("| within noise |")  # identical on both revisions
    assert warnings == []


def test_different_test_sets_are_compared_on_the_shared_conversations_with_a_warning(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    commit(tmp_path, records(0.5, seed=1, ids=range(0, 100)))
    (tmp_path / "metrics" / "eval_conversations.json").write_text(json.dumps(records(0.5, seed=1, ids=range(50, 150))))
    monkeypatch.chdir(tmp_path)
    lines, warnings = significance("HEAD")
    assert len(warnings) == 1 and "different test conversations" in warnings[0] and "50 shared" in warnings[0]
    assert "50 test conversations" in lines[0]


def write_training_record(repo, precision: str, device: str, compile_record: dict | None) -> None:
    (repo / "metrics" / "runtime").mkdir(parents=True, exist_ok=True)
    (repo / "metrics" / "train.json").write_text(json.dumps({"precision": precision}))
    runtime = {"device": device, **({"compile": compile_record} if compile_record is not None else {})}
    (repo / "metrics" / "runtime" / "train.json").write_text(json.dumps(runtime))


def test_runs_at_another_precision_device_or_compilation_are_flagged(tmp_path, monkeypatch):
    """Two revisions trained in bf16 and fp32, on two devices, or one compiled and one eager, differ in the third
    decimal for no reason a reviewer could see in the diff: the review says so. A revision recorded before the
    compile field existed is not flagged for it."""
    from stages.tools.review import setup_warnings

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    write_training_record(tmp_path, "bf16", "cpu (2 threads)", {"enabled": True, "reason": "inductor compiles on cpu here"})
    commit(tmp_path, records(0.5, seed=1, ids=range(10)))
    monkeypatch.chdir(tmp_path)
    write_training_record(tmp_path, "fp32", "NVIDIA H100", {"enabled": False, "reason": "set in params.yaml"})
    warnings = setup_warnings("HEAD")
    assert [w.split(":")[0] for w in warnings] == ["Different training precision", "Different training device",
                                                   "Different training compilation"], warnings
    assert "compiled at `HEAD`, eager here" in warnings[2]
    write_training_record(tmp_path, "bf16", "cpu (2 threads)", {"enabled": True, "reason": "set in params.yaml"})
    assert setup_warnings("HEAD") == []  # the reason alone is no difference in what ran
    write_training_record(tmp_path, "bf16", "cpu (2 threads)", None)
    commit(tmp_path, records(0.5, seed=1, ids=range(10)))
    write_training_record(tmp_path, "bf16", "cpu (2 threads)", {"enabled": False, "reason": "set in params.yaml"})
    assert setup_warnings("HEAD") == []
