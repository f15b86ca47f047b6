"""A markdown review of what a change did to the pipeline's results, for a pull request.

    python -m stages.tools.review --base main --out review/review.md

Joins `dvc params diff`, `dvc metrics diff`, every top-level plot of dvc.yaml drawn as a PNG with
the base revision against the workspace, and the diff of the sample transcripts. The GitHub workflow
(.github/workflows/review.yml) only installs, reproduces and posts this file.
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

TRANSCRIPTS = "metrics/transcripts.md"


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
    sections = [f"# Pipeline review against `{base}`", ""]
    params = dvc("params", "diff", base, "--md").strip()
    sections += ["## Parameters", "", params or "_No parameter changed._", ""]
    metrics = dvc("metrics", "diff", base, "--md", "--precision", "4").strip()
    sections += ["## Metrics", "", metrics or "_No metric changed._", ""]
    sections += ["## Plots", ""]
    for title, x, ys in plot_definitions():
        image = out.parent / f"{slug(title)}.png"
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
