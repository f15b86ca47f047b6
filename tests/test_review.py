"""The review's verdicts: a null change gives none, a real change the right one, replies pair by turn, the
machine and the tokenizer are compared, and bad input is one line."""

import json
import math
import subprocess

import numpy as np
import pytest

from conftest import REPO
from stage_server import run_forked
from stages.tools.review import Run, setup_warnings, significance


def records(stop_probability: float, seed: int, ids: range, turn_shift: int = 0, noise: float = 0.0) -> list[dict]:
    """Per-conversation scores as evaluate writes them: two replies and one ranked turn per conversation.
    `noise` perturbs the semantic similarity like another training run would."""
    rng = np.random.default_rng(seed)
    out = []
    for i in ids:
        replies = []
        for turn in (1, 3):
            text = " ".join(rng.choice(["so", "well", "yes", "i", "think", "maybe"], int(rng.integers(3, 9))))
            replies.append(
                {
                    "turn": turn + (turn_shift if i == ids[0] else 0),
                    "text": text,
                    "human": f"human reply {i} {turn}",
                    "stopped": bool(rng.random() < stop_probability),
                    "relevance": 0.1,
                    "semantic": float(0.3 + noise * rng.normal()),
                    "context": f"ctx{i}-{turn}",
                }
            )
        scores = {
            "nll": 10.0,
            "tokens": 5,
            "correct": 1,
            "n_bytes": 20,
            "replies": replies,
            "ranked": [[1, float(rng.random() < 0.3)]],
        }
        human = {**scores, "replies": [{**r, "text": r["human"], "semantic": 1.0} for r in replies]}
        out.append({"id": f"c{i}", "topic": "t", "set": "test", "base": scores, "finetuned": scores, "human": human})
    return out


def run(label: str, data: list[dict]) -> Run:
    return Run(label, None, {(r["set"], r["id"]): r for r in data})


def row(lines: list[str], metric: str) -> str:
    return next(line for line in lines if f"| {metric} |" in line)


def verdict_of(lines: list[str], metric: str) -> str:
    return row(lines, metric).rstrip(" |").rsplit("| ", 1)[1]


def test_a_real_change_is_better_and_a_null_change_with_replicates_has_no_verdict():
    old = [run("base", records(0.5, seed=1, ids=range(150)))]
    real, _ = significance(old, [run("new", records(0.97, seed=2, ids=range(150)))], resamples=400)
    assert verdict_of(real, "stop_rate") == "better"
    # Null: the same code trained with other seeds on both sides (replicates): no verdict on any primary metric.
    base_side = [run(f"a{k}", records(0.6, seed=10 + k, ids=range(150), noise=0.05)) for k in range(3)]
    new_side = [run(f"b{k}", records(0.6, seed=20 + k, ids=range(150), noise=0.05)) for k in range(3)]
    null, _ = significance(base_side, new_side, resamples=400)
    for metric in ("perplexity", "next_reply_hits_at_1", "semantic_similarity", "stop_rate"):
        assert verdict_of(null, metric) in ("no significant change", "unchanged"), row(null, metric)
    assert "spread between training replicates" in null[0]
    assert any(line.startswith("| stop_rate |") for line in null)  # the seed-to-seed spread table


def test_without_replicates_the_verdict_says_it_concerns_two_trained_models():
    lines, _ = significance(
        [run("base", records(0.5, 1, range(40)))], [run("new", records(0.5, 1, range(40)))], resamples=200
    )
    assert "a verdict is about these two models" in lines[0]
    assert verdict_of(lines, "perplexity") == "unchanged"  # identical values are not 'no significant change'


def perplexity_times(data: list[dict], ratio: float) -> list[dict]:
    """Varied per-conversation NLLs, each raised so that the fine-tuned perplexity is `ratio` times its own."""
    out = []
    for k, record in enumerate(data):
        tuned = record["finetuned"]
        nll = 8.0 + 4.0 * (k % 5) + tuned["tokens"] * math.log(ratio)
        out.append({**record, "finetuned": {**tuned, "nll": nll}})
    return out


def test_another_machines_rounding_is_negligible_and_a_real_perplexity_change_is_a_verdict():
    """The reference retrained on another CPU (bf16, not fp32) moved perplexity by 0.34% with a tight interval:
    a real difference between the two models, smaller than a training seed moves it, so no 'worse'."""
    same = records(0.5, 1, range(60))
    old = [run("base", perplexity_times(same, 1.0))]
    rounding, _ = significance(old, [run("new", perplexity_times(same, 1.0034))], resamples=200)
    assert verdict_of(rounding, "perplexity") == "negligible", row(rounding, "perplexity")
    real, _ = significance(old, [run("new", perplexity_times(same, 1.03))], resamples=200)
    assert verdict_of(real, "perplexity") == "worse", row(real, "perplexity")


def test_a_turn_that_answers_another_context_is_left_out_with_a_warning():
    old = run("base", records(0.5, 1, range(30)))
    shifted = run("new", records(0.5, 1, range(30), turn_shift=1))  # conversation c0 scored other turns
    lines, warnings = significance([old], [shifted], resamples=200)
    assert any("2 generated `test` turns were left out" in w for w in warnings), warnings
    assert "58 paired turns" in lines[0]
    changed = records(0.5, 1, range(30))
    changed[3]["finetuned"]["replies"][0]["context"] = "another context"
    _, warnings = significance([old], [run("new", changed)], resamples=200)
    assert any("1 generated `test` turns were left out" in w for w in warnings), warnings


def test_ranking_is_compared_on_the_turns_every_run_ranked():
    """One side ranked a second turn (ranking.turns_per_conversation 2): Hits@1 of both sides covers the first only."""
    from stages.tools.review import pair

    old = run("base", records(0.5, 1, range(30)))
    more = records(0.5, 1, range(30))
    for record in more:
        record["finetuned"] = {**record["finetuned"], "ranked": record["finetuned"]["ranked"] + [[3, 1.0]]}
    paired = pair([old], [run("new", more)], "test")
    assert list(paired.sides["new"][0].ranked) == list(paired.sides["old"][0].ranked) == [1] * 30


def test_different_test_sets_are_compared_on_the_shared_conversations_with_a_warning():
    lines, warnings = significance(
        [run("base", records(0.5, 1, range(0, 100)))], [run("new", records(0.5, 1, range(50, 150)))], resamples=200
    )
    assert any("different `test` conversations" in w and "the 50 they share" in w for w in warnings), warnings
    assert "50 conversations" in lines[0]


def commit(repo, files: dict[str, object]) -> None:
    for path, data in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(json.dumps(data))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "scores"], cwd=repo, check=True
    )


def machine(cpu: str, instructions: str) -> dict:
    return {
        "device": "cpu (2 threads)",
        "machine": {
            "cpu": cpu,
            "gpu": None,
            "gemm_instructions": instructions,
            "threads": 2,
            "torch": "2.13.0+cpu",
            "transformers": "5.23.0",
        },
    }


def test_another_machine_precision_or_tokenizer_is_flagged(tmp_path, monkeypatch):
    """Two trainings on different CPUs differ by kernel rounding: the review names the difference. A changed
    tokenizer leaves perplexity out of the comparison."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    commit(
        tmp_path,
        {
            "metrics/runtime/train.json": machine("AMD EPYC", "AVX2"),
            "metrics/train.json": {"precision": "bf16"},
            "metrics/eval.json": {"setup": {"tokenizer": "aaa", "max_length": 256}},
        },
    )
    commit(
        tmp_path,
        {
            "metrics/runtime/train.json": machine("Intel Xeon", "AMX+AVX512"),
            "metrics/train.json": {"precision": "fp32"},
            "metrics/eval.json": {"setup": {"tokenizer": "bbb", "max_length": 256}},
        },
    )
    warnings, comparable = setup_warnings("HEAD~1", "HEAD", "HEAD~1", "HEAD")
    assert warnings[0].startswith("What ran differs between `HEAD~1` and `HEAD`: training precision bf16 → fp32;")
    for difference in ("training processor AMD EPYC → Intel Xeon", "matrix instruction sets AVX2 → AMX+AVX512"):
        assert difference in warnings[0], warnings[0]
    assert "Measured: " in warnings[0] and "thread count" not in warnings[0]  # only what differs
    assert not comparable and "perplexity and token accuracy" in warnings[-1]
    same, comparable = setup_warnings("HEAD", "HEAD", "HEAD", "HEAD")
    assert same == [] and comparable


def review(cwd, *args: str) -> subprocess.CompletedProcess:
    return run_forked("stages.tools.review", cwd, args, {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_bad_input_is_one_line_and_base_takes_revisions_only(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    commit(tmp_path, {"metrics/eval_conversations.json": records(0.5, 1, range(10))})
    injected = review(tmp_path, "--base=--output=/tmp/x", "--out", str(tmp_path / "r.md"))
    assert injected.returncode == 1 and injected.stderr.count("\n") == 1 and "not a git revision" in injected.stderr
    unknown = review(tmp_path, "--base", "no-such-branch")
    assert unknown.returncode == 1 and "neither a git revision nor a DVC experiment" in unknown.stderr
    (tmp_path / "metrics" / "eval_conversations.json").write_text('[{"id": "c0", "topic"')  # truncated
    truncated = review(tmp_path, "--base", "HEAD", "--out", str(tmp_path / "r.md"))
    assert truncated.returncode == 1 and truncated.stderr.startswith(
        "error: metrics/eval_conversations.json at workspace: not valid JSON"
    )
    assert "Traceback" not in truncated.stderr and truncated.stderr.count("\n") == 1
    (tmp_path / "a-file").write_text("x")
    under_a_file = review(tmp_path, "--base", "HEAD", "--out", str(tmp_path / "a-file" / "r.md"))
    assert (
        under_a_file.returncode == 1
        and under_a_file.stderr.startswith("error: --out ")
        and "cannot write there" in under_a_file.stderr
    )
    nan = records(0.5, 1, range(10))
    nan[2]["finetuned"]["nll"] = float("nan")
    (tmp_path / "metrics" / "eval_conversations.json").write_text(json.dumps(nan))  # json writes NaN, and reads it back
    not_a_number = review(tmp_path, "--base", "HEAD", "--out", str(tmp_path / "r.md"))
    assert (
        not_a_number.returncode == 1
        and "conversation 'c2' has a finetuned score that is not a finite number" in not_a_number.stderr
    )
    (tmp_path / "metrics" / "eval_conversations.json").write_text('{"not": "a list"}')
    mistyped = review(tmp_path, "--base", "HEAD", "--out", str(tmp_path / "r.md"))
    assert mistyped.returncode == 1 and "expected a list of per-conversation records" in mistyped.stderr


@pytest.mark.parametrize(
    "gate,word",
    [
        ({"passed": True}, "passed"),
        ({"passed": False}, "FAILED"),
        ({"passed": float("nan")}, "FAILED (not a verdict: nan)"),
    ],
)
def test_a_gate_that_is_not_a_boolean_is_never_read_as_passed(gate, word):
    from stages.tools.review import gate_word

    assert gate_word(gate) == word


def test_a_file_from_before_a_metric_existed_gives_no_verdict_on_it():
    """Scores written before semantic similarity and ranking existed compare as 'n/a', never as a change from 0."""
    old = records(0.5, 1, range(40))
    for record in old:
        for reply in record["finetuned"]["replies"]:
            del reply["semantic"]
        del record["finetuned"]["ranked"]
    lines, _ = significance([run("base", old)], [run("new", records(0.5, 1, range(40)))], resamples=200)
    assert verdict_of(lines, "semantic_similarity") == "n/a (not a number)"
    assert verdict_of(lines, "next_reply_hits_at_1") == "n/a (not a number)"
