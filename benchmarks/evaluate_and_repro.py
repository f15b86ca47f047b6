"""Scoring passes (stage `score`) and a no-op `dvc repro`, timed on the current workspace.

    python benchmarks/evaluate_and_repro.py                         # params.yaml's evaluate section
    python benchmarks/evaluate_and_repro.py --batch-sizes 16 1 --max-conversations 8

Needs a reproduced pipeline (models/base, models/finetuned, data/processed). For each evaluate batch size it
runs `stages.score.score` for each model in a subprocess (nothing is written to data/ or metrics/) and reports
the perplexity pass and the generation pass of each model separately, plus the whole call and peak resident memory.
Then it times `dvc repro` and `dvc status` with nothing changed (median of 3). Prints a table and writes
benchmarks/results/evaluate_and_repro.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path("benchmarks/results/evaluate_and_repro.json")


def time_evaluate(batch_size: int, max_conversations: int | None) -> dict:
    from stages.lib.params import load_params
    from stages.score import score

    params = load_params()
    changes = {"batch_size": batch_size}
    if max_conversations:
        changes["max_conversations"] = max_conversations
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update=changes)})
    started = time.perf_counter()
    row: dict = {"batch_size": batch_size}
    for name in ("base", "finetuned"):
        scores, runtime = score(name, params)
        row.update(
            {
                "conversations": len(scores["conversations"]),
                "replies": runtime["replies"],
                f"{name}_perplexity_s": runtime["fluency_s"],
                f"{name}_generation_s": runtime["generation_s"],
                f"{name}_precision": runtime["precision"]["precision"],
            }
        )
    return {
        **row,
        "total_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def median_seconds(command: list[str], runs: int = 3) -> tuple[float, str]:
    times, output = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{output[-2000:]}")
    return round(statistics.median(times), 2), output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="evaluate.batch_size values (default: params.yaml's)"
    )
    parser.add_argument("--max-conversations", type=int, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(time_evaluate(args.one, args.max_conversations)))
        return 0
    from stages.lib.params import load_params

    sizes = args.batch_sizes or [load_params().evaluate.batch_size]
    rows = []
    for size in sizes:
        print(f"evaluate with batch_size {size} ...", flush=True)
        command = [sys.executable, __file__, "--one", str(size)]
        if args.max_conversations:
            command += ["--max-conversations", str(args.max_conversations)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"evaluate failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    repro_s, repro_out = median_seconds([sys.executable, "-m", "dvc", "repro"])
    status_s, _ = median_seconds([sys.executable, "-m", "dvc", "status"])
    if "Running stage" in repro_out:
        sys.exit("the workspace is not reproduced: `dvc repro` ran a stage; run it once, then benchmark")

    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print(f"\nno-op `dvc repro`: {repro_s} s (median of 3); `dvc status`: {status_s} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    results = {"evaluate": rows, "noop_dvc_repro_s": repro_s, "dvc_status_s": status_s}
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
