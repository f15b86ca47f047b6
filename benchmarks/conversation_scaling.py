"""Headline conversation metrics against training tokens: how long to train before the model converses better,
not just in the right style.

    python benchmarks/conversation_scaling.py                 # 1x, 2x, 4x, 10x the default train.max_steps
    python benchmarks/conversation_scaling.py --multiples 1 2  # what a 2-core CPU affords in half an hour

Each point is one `dvc exp run --temp -S train.max_steps=N evaluate` (train, score@finetuned, evaluate; the base
model's scores come from the cache), so the numbers are the pipeline's own, with their intervals. Prints a
table and writes benchmarks/results/conversation_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

METRICS = (
    "perplexity",
    "next_reply_hits_at_1",
    "semantic_similarity",
    "stop_rate",
    "generic_reply_share",
    "distinct_1_vs_human",
)
OUT = Path("benchmarks/results/conversation_scaling.json")


def run_point(steps: int, save_steps: int) -> tuple[dict, float]:
    started = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "dvc",
        "exp",
        "run",
        "--temp",
        "-n",
        f"scaling-{steps}",
        "-S",
        f"train.max_steps={steps}",
        "-S",
        f"train.eval_steps={steps}",
        "-S",
        f"train.save_steps={save_steps}",
        "evaluate",
    ]
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True
        ).stdout
    )
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for revision in experiment.get("revs", []):
                if revision.get("name") == f"scaling-{steps}":
                    return revision["data"]["metrics"]["metrics/eval.json"]["data"], seconds
    raise SystemExit(f"experiment scaling-{steps} not found in dvc exp show")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiples", type=float, nargs="+", default=[1, 2, 4, 10])
    args = parser.parse_args()
    train = yaml.safe_load(Path("params.yaml").read_text())["train"]
    tokens_per_step = train["batch_size"] * train["gradient_accumulation"] * train["processes"]
    rows = []
    for multiple in args.multiples:
        steps = max(1, round(train["max_steps"] * multiple))
        save_steps = train["logging_steps"] * max(1, steps // (2 * train["logging_steps"]))  # a checkpoint half-way
        eval_json, seconds = run_point(steps, save_steps)
        row = {"steps": steps, "windows": steps * tokens_per_step, "seconds": round(seconds, 1)}
        for name in METRICS:
            tuned, base = eval_json["finetuned"], eval_json["base"]
            row[name] = {
                "base": base.get(name),
                "finetuned": tuned.get(name),
                "low": tuned.get(f"{name}_low"),
                "high": tuned.get(f"{name}_high"),
            }
            row[f"{name}_verdict"] = (
                eval_json["change"].get("perplexity_improvement" if name == "perplexity" else name, {}).get("verdict")
            )
        rows.append(row)
        print(
            f"{steps:>5} steps ({row['windows']:>6} windows, {seconds:6.0f} s): "
            + "  ".join(
                f"{name} {row[name]['finetuned']} [{row[name]['low']}, {row[name]['high']}] ({row[f'{name}_verdict']})"
                for name in METRICS
            )
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"-> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
