"""A markdown review of what a change did to the pipeline's results, for a pull request.

    python -m stages.tools.review --base main --out review/review.md
    python -m stages.tools.review --base main exp-a1 exp-a2 --new workspace exp-b1 exp-b2   # with replicates

Opens with the significance table: for each metric of the fine-tuned model, the base revision's value, the
new one's, the change with its 95% interval and a verdict. Replies are paired by (conversation, turn), and a
turn whose context or human reply differs between the revisions is left out and counted. Verdicts are
Holm-adjusted within the primary and the human-referenced families (docs/DESIGN.md §5.2); descriptive
metrics get none. With one trained model per side the interval covers the test sample only, and the verdict
is about these two trained models. With training replicates on a side (`dvc exp run --queue -S
train.seed=1,2,3`; pass the experiments' names), every resample also redraws the replicates, so a verdict
must exceed the run-to-run spread as well. Then warnings (different test sets, tokenizers, machines,
libraries, precisions), the gate, `dvc params diff`, the other metrics, every top-level plot of dvc.yaml as
a PNG (base dashed) and the diff of the sample transcripts. The GitHub workflow (.github/workflows/review.yml)
only installs, reproduces and posts this file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stages.lib.cli import ArgumentParser, run
from stages.lib.errors import InputError
from stages.lib.stats import (
    HEADLINE,
    HUMAN_REFERENCED,
    PRIMARY,
    SET_BASED,
    ConversationScores,
    Interval,
    MetricSet,
    distance_to_human,
    family_verdicts,
    p_value,
)

TRANSCRIPTS = "metrics/transcripts.md"
EVAL = "metrics/eval.json"
PER_CONVERSATION = "metrics/eval_conversations.json"
TRAIN_RUNTIME = "metrics/runtime/train.json"
SCORE_RUNTIME = "metrics/runtime/score_finetuned.json"
TRAIN = "metrics/train.json"
OTHER_METRICS = ("metrics/train.json", "metrics/data.json", "metrics/tokenize.json")
RESAMPLES, CONFIDENCE, SEED = 2000, 0.95, 0
WORKSPACE = "workspace"
NOT_TOKEN_COMPARABLE = ("perplexity", "token_accuracy")  # per token: they depend on the tokenizer and template


def command(*args: str) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode != 0:
        raise InputError(f"{' '.join(args)} failed: {(result.stderr.strip().splitlines() or ['no message'])[-1]}")
    return result.stdout


def dvc(*args: str) -> str:
    return command(sys.executable, "-m", "dvc", *args)


def resolve(revision: str) -> str | None:
    """A git commit for a revision or a DVC experiment's name; None for the workspace. Only revisions are
    accepted: a value starting with '-' would be read by git as an option."""
    if revision == WORKSPACE:
        return None
    if not revision or revision.startswith("-") or any(c.isspace() or ord(c) < 32 for c in revision):
        raise InputError(f"--base/--new: {revision!r} is not a git revision or experiment name")
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if found.returncode == 0:
        return found.stdout.strip()
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{revision}"], capture_output=True, text=True
    ).stdout.split()
    if len(refs) == 1:
        return refs[0]
    raise InputError(
        f"--base/--new: {revision!r} is neither a git revision nor a DVC experiment here "
        "(git log, dvc exp show list them)"
    )


def read_at(commit: str | None, path: str) -> str | None:
    """A file's text at a commit (None: the workspace); None when it does not exist there."""
    if commit is None:
        file = Path(path)
        try:
            return file.read_text(encoding="utf-8") if file.exists() else None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: unreadable ({exc})") from None
    result = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def json_at(commit: str | None, path: str, label: str) -> Any:
    text = read_at(commit, path)
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path} at {label}: not valid JSON (line {exc.lineno}: {exc.msg}); rerun `dvc repro` there"
        ) from None


@dataclass
class Run:
    """One trained model's per-conversation scores (a revision or an experiment)."""

    label: str
    commit: str | None
    records: dict[tuple[str, str], dict]  # (set, conversation id) -> record


def load_run(label: str) -> Run:
    commit = resolve(label)
    data = json_at(commit, PER_CONVERSATION, label)
    if data is None:
        raise InputError(f"{PER_CONVERSATION}: none at {label}; run `dvc repro` there to compare with intervals")
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and {"id", "topic", "finetuned", "human"} <= r.keys() for r in data
    ):
        raise InputError(
            f"{PER_CONVERSATION} at {label}: expected a list of per-conversation records (id, topic, finetuned, "
            "human); rerun `dvc repro evaluate` there"
        )
    for record in data:
        for model in ("finetuned", "human"):
            scores = record[model]
            values = [scores.get(k) for k in ("nll", "tokens")] if isinstance(scores, dict) else [None]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise InputError(
                    f"{PER_CONVERSATION} at {label}: conversation {record['id']!r} has a {model} score that is not a "
                    "finite number; rerun `dvc repro evaluate` there"
                )
    return Run(label, commit, {(r.get("set", "test"), str(r["id"])): r for r in data})


def conversation_scores(record: dict, model: str, turns: set[int], ranked: set[int]) -> ConversationScores:
    try:
        unit = ConversationScores.from_dict(record["id"], record["topic"], record[model])
    except (KeyError, TypeError) as exc:
        raise InputError(
            f"{PER_CONVERSATION}: conversation {record.get('id')!r} has no valid {model} scores ({exc}); "
            "rerun `dvc repro evaluate`"
        ) from None
    return replace(
        unit,
        replies=[r for r in unit.replies if r.turn in turns],
        ranked=[r for r in unit.ranked if r[0] in ranked],  # ranked by every run
    )


@dataclass
class Paired:
    keys: list[tuple[str, str]]
    sides: dict[str, list[MetricSet]]  # "old"/"new" -> one MetricSet per replicate, same conversations in order
    human: MetricSet
    excluded_turns: int
    shared_turns: int


def pair(old: list[Run], new: list[Run], test_set: str) -> Paired | None:
    """Both sides' fine-tuned scores on the conversations every run scored, replies matched by (conversation,
    turn) where the context and the human reply are the same text in every run."""
    runs = old + new
    keys = sorted(set.intersection(*(set(k for k in run.records if k[0] == test_set) for run in runs)))
    if not keys:
        return None
    excluded = shared = 0
    chosen: dict[tuple[str, str], tuple[set[int], set[int]]] = {}
    for key in keys:
        replies = [
            {r["turn"]: (r["human"], r.get("context", "")) for r in run.records[key]["finetuned"]["replies"]}
            for run in runs
        ]
        ranked = [{turn for turn, _ in run.records[key]["finetuned"].get("ranked", [])} for run in runs]
        every = set.intersection(*(set(r) for r in replies))
        same = {t for t in every if len({r[t] for r in replies}) == 1}
        excluded += sum(len(r) for r in replies[:1]) - len(same)
        shared += len(same)
        chosen[key] = (same, set.intersection(*ranked))
    sides = {
        name: [MetricSet([conversation_scores(run.records[k], "finetuned", *chosen[k]) for k in keys]) for run in group]
        for name, group in (("old", old), ("new", new))
    }
    human = MetricSet([conversation_scores(new[0].records[k], "human", *chosen[k]) for k in keys])
    return Paired(keys, sides, human, excluded, shared)


def statistic(name: str, paired: Paired, idx: np.ndarray, picks: dict[str, np.ndarray]) -> float:
    """Mean over the picked replicates of each side, then new − old (as in stats.paired_change)."""

    def side(which: str) -> float:
        metric_sets = [paired.sides[which][r] for r in picks[which]]
        if name in HUMAN_REFERENCED:
            return float(np.mean([distance_to_human(name, m, paired.human, idx) for m in metric_sets]))
        return float(np.mean([m.metric(name, idx) for m in metric_sets]))

    if name == "perplexity":
        return 1.0 - side("new") / side("old")
    return side("new") - side("old")


def change_interval(name: str, paired: Paired, resamples: int, seed: int) -> Interval:
    """Percentile bootstrap over conversations and, where a side has replicates, over its replicates too."""
    n = len(paired.keys)
    everything = {side: np.arange(len(runs)) for side, runs in paired.sides.items()}
    value = statistic(name, paired, np.arange(n), everything)
    if n < 2 or not math.isfinite(value):
        return Interval(value, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for b in range(resamples):
        idx = rng.integers(0, n, n)
        picks = {side: rng.integers(0, len(runs), len(runs)) for side, runs in paired.sides.items()}
        draws[b] = statistic(name, paired, idx, picks)
    finite = draws[np.isfinite(draws)]
    if not finite.size:
        return Interval(value, float("nan"), float("nan"))
    shift = value - float(finite.mean()) if name in SET_BASED else 0.0
    low, high = np.quantile(finite, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return Interval(value, min(value, float(low) + shift), max(value, float(high) + shift), p_value(finite, shift))


def seed_spread(metric_sets: list[MetricSet], name: str) -> float:
    """Standard deviation of a metric across one side's replicates (nan with one)."""
    if len(metric_sets) < 2:
        return float("nan")
    everything = np.arange(len(metric_sets[0]))
    return float(np.std([m.metric(name, everything) for m in metric_sets], ddof=1))


def fmt(value: float, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def significance(
    old: list[Run], new: list[Run], test_set: str = "test", comparable: bool = True, resamples: int = RESAMPLES
) -> tuple[list[str], list[str]]:
    """The significance table's lines and the warnings about what was compared."""
    warnings: list[str] = []
    paired = pair(old, new, test_set)
    if paired is None:
        return [f"_The two sides share no `{test_set}` conversation: nothing can be compared pairwise._"], warnings
    sizes = {run.label: sum(1 for k in run.records if k[0] == test_set) for run in old + new}
    if len(set(sizes.values())) > 1 or any(size != len(paired.keys) for size in sizes.values()):
        warnings.append(
            f"The runs scored different `{test_set}` conversations "
            f"({', '.join(f'{k}: {v}' for k, v in sizes.items())}); "
            f"the changes below are over the {len(paired.keys)} they share."
        )
    if paired.excluded_turns:
        warnings.append(
            f"{paired.excluded_turns} generated `{test_set}` turns were left out: another turn was scored, or its "
            "context or human reply differs between the runs; "
            f"{paired.shared_turns} turns are paired."
        )
    replicated = any(len(runs) > 1 for runs in paired.sides.values())
    scope = (
        "the change exceeds the test-sample noise and the spread between training replicates"
        if replicated
        else "one trained model per side: a verdict is about these two models, not about the change (at the "
        "defaults, a training seed alone moved Hits@1 by up to 0.058 and semantic similarity by up to 0.039; "
        "training replicates separate a change from that: README, Experiments)"
    )
    names = [n for n in HEADLINE if comparable or n not in NOT_TOKEN_COMPARABLE]
    intervals = {name: change_interval(name, paired, resamples, SEED) for name in names}
    identical = {
        name: intervals[name].value == 0 and intervals[name].low == intervals[name].high == 0 for name in names
    }
    verdicts = family_verdicts(intervals, 1 - CONFIDENCE, identical)
    old_label, new_label = " + ".join(r.label for r in old), " + ".join(r.label for r in new)
    lines = [
        f"Fine-tuned model, `{test_set}` set: {len(paired.keys)} conversations, {paired.shared_turns} paired turns; "
        f"change = new − base with its {CONFIDENCE:.0%} interval; {scope}. Verdicts are Holm-adjusted within the "
        "primary and the human-referenced families; human-referenced changes are of the distance to the human value "
        "(negative: closer); a significant change smaller than the metric's smallest change that matters "
        "(docs/DESIGN.md §5.2) is negligible.",
        "",
        f"| family | metric | base (`{old_label}`) | new (`{new_label}`) | change [95% interval] "
        "| p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    everything = np.arange(len(paired.keys))
    for name in names:
        family = "primary" if name in PRIMARY else "human-referenced" if name in HUMAN_REFERENCED else "descriptive"
        values = {
            side: float(np.mean([m.metric(name, everything) for m in sets])) for side, sets in paired.sides.items()
        }
        interval, (p, word) = intervals[name], verdicts[name]
        lines.append(
            f"| {family} | {name} | {fmt(values['old'])} | {fmt(values['new'])} | {fmt(interval.value, True)} "
            f"[{fmt(interval.low, True)}, {fmt(interval.high, True)}] | {fmt(p)} | {word or '—'} |"
        )
    if replicated:
        lines += [
            "",
            "Seed-to-seed spread (standard deviation across replicates) of the primary metrics:",
            "",
            "| metric | base side | new side |",
            "|---|---|---|",
        ]
        for name in PRIMARY:
            if name in names:
                spreads = [fmt(seed_spread(paired.sides[side], name)) for side in ("old", "new")]
                lines.append(f"| {name} | {spreads[0]} | {spreads[1]} |")
    return lines, warnings


# docs/DESIGN.md §5.2: how far another machine moves the same code, measured on the default pipeline.
MEASURED_MACHINE_EFFECT = (
    "Measured: the default pipeline retrained and rescored on an Intel Xeon with AMX (bf16) against the same code "
    "on an AMD EPYC (fp32) moved perplexity 0.34%, Hits@1 0.011 and semantic similarity 0.001, less than a "
    "training seed moves them (up to 0.9%, 0.058 and 0.039 between three seeds)."
)
MACHINE_FIELDS = {
    "cpu": "processor",
    "gpu": "GPU",
    "gemm_instructions": "matrix instruction sets",
    "threads": "thread count",
    "torch": "torch version",
    "transformers": "transformers version",
}


def setup_warnings(old: str | None, new: str | None, old_label: str, new_label: str) -> tuple[list[str], bool]:
    """Differences in what ran: precision, device, compilation, machine, libraries, tokenizer. Returns the
    warnings and whether per-token metrics stay comparable (same tokenizer, template and max_length)."""
    warnings = []
    pairs = {
        "evaluation precision": (EVAL, lambda d: d.get("precision")),
        "training precision": (TRAIN, lambda d: d.get("precision")),
        "training device": (TRAIN_RUNTIME, lambda d: d.get("device")),
        "training compilation": (
            TRAIN_RUNTIME,
            lambda d: {True: "compiled", False: "eager"}.get((d.get("compile") or {}).get("enabled")),
        ),
    }
    for field, label in MACHINE_FIELDS.items():
        pairs[f"training {label}"] = (TRAIN_RUNTIME, lambda d, f=field: (d.get("machine") or {}).get(f))
    differences = []
    for label, (path, pick) in pairs.items():
        before, after = (json_at(commit, path, name) for commit, name in ((old, old_label), (new, new_label)))
        a, b = (pick(r) if isinstance(r, dict) else None for r in (before, after))
        if None not in (a, b) and a != b:
            differences.append(f"{label} {a} → {b}")
    if differences:
        warnings.append(
            f"What ran differs between `{old_label}` and `{new_label}`: {'; '.join(differences)}. "
            f"{MEASURED_MACHINE_EFFECT} Read verdicts with replicates on both sides."
        )
    setups = [(json_at(commit, EVAL, name) or {}).get("setup") for commit, name in ((old, old_label), (new, new_label))]
    comparable = True
    if all(isinstance(s, dict) and s for s in setups) and setups[0] != setups[1]:
        comparable = False
        changed = ", ".join(k for k in sorted(set(setups[0]) | set(setups[1])) if setups[0].get(k) != setups[1].get(k))
        warnings.append(
            f"The tokenizer, chat template or max_length differs ({changed}): perplexity and token accuracy count "
            "other tokens and are left out; bits per byte, ranking and the reply metrics stay comparable."
        )
    return warnings, comparable


def gate_word(gate: Any) -> str:
    if gate is None:
        return "—"
    passed = gate.get("passed") if isinstance(gate, dict) else None
    return "passed" if passed is True else "FAILED" if passed is False else f"FAILED (not a verdict: {passed!r})"


def gate_lines(old: str | None, new: str | None, old_label: str, new_label: str) -> list[str]:
    before, after = (json_at(commit, EVAL, label) or {} for commit, label in ((old, old_label), (new, new_label)))
    old_gate, new_gate = before.get("gate"), after.get("gate")
    lines = [
        f"| check | `{old_label}` | `{new_label}` |",
        "|---|---|---|",
        f"| **gate** | {gate_word(old_gate)} | {gate_word(new_gate)} |",
    ]
    for check in sorted({k for g in (old_gate or {}, new_gate or {}) for k, v in g.items() if isinstance(v, dict)}):
        lines.append(
            f"| {check} | {gate_word((old_gate or {}).get(check))} | {gate_word((new_gate or {}).get(check))} |"
        )
    return lines


def parse_rows(text: str, path: str) -> list[dict[str, Any]]:
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return []
        return data if isinstance(data, list) else []
    return list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.endswith(".tsv") else ","))


def plot_definitions(dvc_yaml: Path = Path("dvc.yaml")) -> list[tuple[str, str, dict[str, list[str]]]]:
    """(title, x field, {file: [y fields]}) for each top-level plot in dvc.yaml."""
    plots = []
    for entry in yaml.safe_load(dvc_yaml.read_text()).get("plots", []):
        for title, spec in entry.items():
            if isinstance(spec, dict) and isinstance(spec.get("y"), dict):
                ys = {file: fields if isinstance(fields, list) else [fields] for file, fields in spec["y"].items()}
                plots.append((title, spec.get("x", "step"), ys))
    return plots


def number(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def render_plot(title: str, x: str, ys: dict[str, list[str]], old: str | None, old_label: str, out: Path) -> bool:
    """Draw the base revision (dashed) against the new one (solid); False when neither has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for commit, style, label in ((old, "--", old_label), (None, "-", "this change")):
        for path, fields in ys.items():
            text = read_at(commit, path)
            if not text:
                continue
            rows = parse_rows(text, path)
            for field in fields:
                points = [(number(r.get(x)), number(r.get(field))) for r in rows]
                points = [(a, b) for a, b in points if a is not None and b is not None]
                if points:
                    axis.plot(*zip(*points), style, marker=".", label=f"{field} ({Path(path).stem}, {label})")
                    drawn = True
    if drawn:
        axis.set_title(title)
        axis.set_xlabel(x)
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out, dpi=110)
    plt.close(figure)
    return drawn


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def report(old_labels: list[str], new_labels: list[str], out: Path) -> str:
    old_runs, new_runs = [load_run(label) for label in old_labels], [load_run(label) for label in new_labels]
    base, head = old_runs[0], new_runs[0]
    warnings, comparable = setup_warnings(base.commit, head.commit, base.label, head.label)
    sections = [f"# Pipeline review: `{head.label}` against `{base.label}`", ""]
    for test_set, title in (("test", "Significance"), ("unseen", "Significance on topics held out of training")):
        if not any(k[0] == test_set for k in base.records):
            continue
        table, notes = significance(old_runs, new_runs, test_set, comparable)
        sections += [f"## {title}", "", *table, ""]
        warnings = notes + warnings
    if warnings:
        sections += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    sections += ["## Quality gate", "", *gate_lines(base.commit, head.commit, base.label, head.label), ""]
    if head.commit is None and base.commit is not None:
        params = dvc("params", "diff", base.commit, "--md").strip()
        sections += ["## Parameters", "", params or "_No parameter changed._", ""]
        existing = [path for path in OTHER_METRICS if Path(path).exists()]
        others = (
            dvc("metrics", "diff", base.commit, "--md", "--precision", "4", "--targets", *existing).strip()
            if existing
            else ""
        )
        sections += ["## Data and training metrics", "", others or "_No data or training metric changed._", ""]
        sections += ["## Plots", ""]
        for title, x, ys in plot_definitions():
            image = out.parent / f"{out.stem}-{slug(title)}.png"
            if render_plot(title, x, ys, base.commit, base.label, image):
                sections += [f"![{title}]({image.name})", ""]
        transcripts = subprocess.run(
            ["git", "diff", "--no-color", base.commit, "--", TRANSCRIPTS], capture_output=True, text=True
        ).stdout
        sections += ["## Transcripts", ""]
        sections += (
            ["```diff", transcripts.strip(), "```", ""]
            if transcripts.strip()
            else ["_Sample transcripts unchanged._", ""]
        )
    text = "\n".join(sections)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write the report ({exc.strerror}); choose a writable path") from None
    return text


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base",
        nargs="+",
        default=["main"],
        metavar="REV",
        help="git revision to compare with, then (optional) more revisions or experiments: its training replicates",
    )
    parser.add_argument(
        "--new",
        nargs="+",
        default=[WORKSPACE],
        metavar="REV",
        help=f"'{WORKSPACE}' (default) or a revision, then (optional) its training replicates",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("review/review.md"), help="markdown file; PNG plots go beside it"
    )
    args = parser.parse_args(argv)
    for label in args.base + args.new:  # checked before any work
        resolve(label)
    out = args.out
    if out.exists() and out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file name such as {out / 'review.md'}")
    try:  # before any work: a report that cannot be written is known at once
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write there ({exc.strerror}); choose a writable path") from None
    report(args.base, args.new, out)
    print(f"review: {out}")
    return 0


if __name__ == "__main__":
    run(main)
