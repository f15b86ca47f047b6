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
