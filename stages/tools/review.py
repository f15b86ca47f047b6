"""A markdown review of what a change did to the pipeline's results, for a pull request.

    python -m stages.tools.review --base main --out review/review.md

Opens with the significance table: for each headline metric of the fine-tuned model, the base revision's
value, the workspace's, the change with its paired 95% interval (both revisions' per-conversation scores,
resampled together over the conversations they share) and a verdict: better, worse or within noise. Then
warnings (different test sets, precisions or devices), the gate, `dvc params diff`, the other metrics, every
top-level plot of dvc.yaml drawn as a PNG (base revision dashed against the workspace, named after the report)
and the diff of the sample transcripts. The GitHub workflow (.github/workflows/review.yml) only installs,
reproduces and posts this file.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.lib.stats import HEADLINE, SET_BASED, ConversationScores, MetricSet, bootstrap, verdict

TRANSCRIPTS = "metrics/transcripts.md"
EVAL = "metrics/eval.json"
PER_CONVERSATION = "metrics/eval_conversations.json"
TRAIN_RUNTIME = "metrics/runtime/train.json"
TRAIN = "metrics/train.json"
OTHER_METRICS = ("metrics/train.json", "metrics/data.json", "metrics/tokenize.json")
RESAMPLES, CONFIDENCE, SEED = 2000, 0.95, 0


def command(*args: str) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def dvc(*args: str) -> str:
    return command(sys.executable, "-m", "dvc", *args)


def read_at(revision: str | None, path: str) -> str | None:
    """A file's text at a git revision (None: the workspace); None when it does not exist there."""
    if revision is None:
        file = Path(path)
        return file.read_text() if file.exists() else None
    result = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def json_at(revision: str | None, path: str) -> Any:
    text = read_at(revision, path)
    return json.loads(text) if text else None


def metric_set(records: list[dict], ids: list[str]) -> MetricSet:
    by_id = {r["id"]: r for r in records}
    return MetricSet([ConversationScores.from_dict(i, by_id[i]["topic"], by_id[i]["finetuned"]) for i in ids])


def significance(base: str) -> tuple[list[str], list[str]]:
    """The significance table's lines and the warnings about what the two revisions did differently."""
    old, new = json_at(base, PER_CONVERSATION), json_at(None, PER_CONVERSATION)
    warnings: list[str] = []
    if old is None or new is None:
        missing = base if old is None else "the workspace"
        return [f"_No per-conversation scores at {missing} ({PER_CONVERSATION}); run `dvc repro` there to compare with intervals._"], warnings
    old_ids, new_ids = [r["id"] for r in old], [r["id"] for r in new]
    shared = [i for i in new_ids if i in set(old_ids)]
    if set(old_ids) != set(new_ids):
        warnings.append(f"The two revisions scored different test conversations ({len(old_ids)} at `{base}`, {len(new_ids)} here, "
                        f"{len(shared)} shared): the changes below are over the shared ones only.")
    if not shared:
        return ["_The two revisions share no test conversation: nothing can be compared pairwise._"], warnings
    before, after = metric_set(old, shared), metric_set(new, shared)
    lines = [f"Fine-tuned model, {len(shared)} test conversations; change = workspace − `{base}` with its paired "
             f"{CONFIDENCE:.0%} interval (bootstrap over conversations, {RESAMPLES} resamples).", "",
             f"| metric | `{base}` | workspace | change [95% interval] | verdict |", "|---|---|---|---|---|"]
    for name in HEADLINE:
        interval = bootstrap(lambda idx, n=name: after.metric(n, idx) - before.metric(n, idx), len(shared), RESAMPLES, CONFIDENCE, SEED,
                             recenter=name in SET_BASED)
        everything = list(range(len(shared)))
        lines.append(f"| {name} | {before.metric(name, everything):.4g} | {after.metric(name, everything):.4g} | "
                     f"{interval.value:+.4g} [{interval.low:+.4g}, {interval.high:+.4g}] | {verdict(name, interval)} |")
    return lines, warnings


def setup_warnings(base: str) -> list[str]:
    """Runs at different precisions, on different devices, or one compiled and one eager, differ in the third
    decimal, not by a real change."""
    warnings = []
    pairs = {"evaluation precision": (EVAL, lambda d: d.get("precision")), "training precision": (TRAIN, lambda d: d.get("precision")),
             "training device": (TRAIN_RUNTIME, lambda d: d.get("device")),
             "training compilation": (TRAIN_RUNTIME, lambda d: {True: "compiled", False: "eager"}.get((d.get("compile") or {}).get("enabled")))}
    for label, (path, pick) in pairs.items():
        old, new = (pick(record) if record is not None else None for record in (json_at(base, path), json_at(None, path)))
        if None not in (old, new) and old != new:
            warnings.append(f"Different {label}: {old} at `{base}`, {new} here; expect differences of about 3 decimals "
                            "that no change of the code or params caused.")
    return warnings


def gate_lines(base: str) -> list[str]:
    word = lambda gate: "—" if gate is None else ("passed" if gate.get("passed") else "FAILED")  # noqa: E731
    old, new = (json_at(revision, EVAL) or {} for revision in (base, None))
    old_gate, new_gate = old.get("gate"), new.get("gate")
    lines = [f"| check | `{base}` | workspace |", "|---|---|---|", f"| **gate** | {word(old_gate)} | {word(new_gate)} |"]
    for check in sorted({k for g in (old_gate or {}, new_gate or {}) for k, v in g.items() if isinstance(v, dict)}):
        lines.append(f"| {check} | {word((old_gate or {}).get(check))} | {word((new_gate or {}).get(check))} |")
    return lines


def parse_rows(text: str, path: str) -> list[dict[str, Any]]:
    if path.endswith(".json"):
        data = json.loads(text)
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


def render_plot(title: str, x: str, ys: dict[str, list[str]], base: str, out: Path) -> bool:
    """Draw the base revision (dashed) against the workspace (solid); False when neither has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for revision, style, label in ((base, "--", base), (None, "-", "this change")):
        for path, fields in ys.items():
            text = read_at(revision, path)
            if not text:
                continue
            rows = parse_rows(text, path)
            for field in fields:
                points = [(float(r[x]), float(r[field])) for r in rows if r.get(field) not in (None, "") and r.get(x) not in (None, "")]
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


def report(base: str, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    table, warnings = significance(base)
    warnings += setup_warnings(base)
    sections = [f"# Pipeline review against `{base}`", "", "## Significance", "", *table, ""]
    if warnings:
        sections += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    sections += ["## Quality gate", "", *gate_lines(base), ""]
    params = dvc("params", "diff", base, "--md").strip()
    sections += ["## Parameters", "", params or "_No parameter changed._", ""]
    existing = [path for path in OTHER_METRICS if Path(path).exists()]
    others = dvc("metrics", "diff", base, "--md", "--precision", "4", "--targets", *existing).strip() if existing else ""
    sections += ["## Data and training metrics", "", others or "_No data or training metric changed._", ""]
    sections += ["## Plots", ""]
    for title, x, ys in plot_definitions():
        image = out.parent / f"{out.stem}-{slug(title)}.png"
        if render_plot(title, x, ys, base, image):
            sections += [f"![{title}]({image.name})", ""]
    transcripts = subprocess.run(["git", "diff", "--no-color", base, "--", TRANSCRIPTS], capture_output=True, text=True).stdout
    sections += ["## Transcripts", ""]
    sections += ["```diff", transcripts.strip(), "```", ""] if transcripts.strip() else ["_Sample transcripts unchanged._", ""]
    text = "\n".join(sections)
    out.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision to compare the workspace with")
    parser.add_argument("--out", type=Path, default=Path("review/review.md"), help="markdown file; PNG plots go beside it")
    args = parser.parse_args(argv)
    try:
        report(args.base, args.out)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"review: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
