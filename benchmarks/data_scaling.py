"""ingest -> preprocess -> tokenize on synthetic corpora 1x, 10x, 100x the bundled chitchat.

    python benchmarks/data_scaling.py                       # scales 1 10 100, all three stages
    python benchmarks/data_scaling.py --scales 1 10 --stages ingest preprocess

Each corpus is the bundled 7,168 conversations copied `scale` times; every copy after the first is perturbed
(a few words of each message swapped with a seeded RNG and a copy number added to the first message) so that
neither exact nor near-duplicate removal collapses the copies. The corpus is an OpenAI-format JSONL under a
scratch directory (--work); each run gets a workspace there with its own params.yaml (data.source pointing
at the corpus) and models/base linked to --base-model. Each stage runs as `python -m stages.<stage>` there, as
DVC would run it; wall time and the peak memory of the stage's whole process tree (the sum of proportional set
sizes, map workers included, sampled every 0.25 s; and its anonymous part, without the page cache of
memory-mapped files) are written to benchmarks/results/data_scaling.json and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "data_scaling.json"
STAGES = ("ingest", "preprocess", "tokenize")


def bundled_conversations() -> list[dict]:
    from stages.ingest import load_source
    from stages.lib.params import load_params

    params = load_params(REPO / "params.yaml").data.model_copy(update={"source": "chitchat", "max_conversations": None})
    return list(load_source(params))


def perturbed(conversation: dict, copy: int, rng: random.Random) -> dict:
    """Copy 0 is the original; later copies swap two words in each message and number the first message."""
    messages = []
    for index, message in enumerate(conversation["messages"]):
        words = message["content"].split(" ")
        if copy and len(words) > 2:
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        text = " ".join(words) + (f" ({copy})" if copy and index == 0 else "")
        messages.append({"role": message["role"], "content": text})
    meta = {"topic": conversation["meta"]["topic"]}
    return {"id": f"{conversation['id']}-{copy}", "messages": messages, "meta": meta}


def build_corpus(path: Path, scale: int, base: list[dict], seed: int = 0) -> int:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for copy in range(scale):
            for conversation in base:
                handle.write(json.dumps(perturbed(conversation, copy, rng), ensure_ascii=False) + "\n")
    partial.rename(path)
    return scale * len(base)


def workspace(work: Path, label: str, scale: int, base_model: Path) -> Path:
    """A scratch repository for one scale: params.yaml pointing at the corpus, models/base linked."""
    root = work / label / f"x{scale}"
    corpus = work / "corpora" / f"x{scale}.jsonl"  # shared by the labels (before/after)
    if not corpus.exists():
        build_corpus(corpus, scale, bundled_conversations())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(corpus.resolve())
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "models").mkdir(exist_ok=True)
    link = root / "models" / "base"
    if not link.exists():
        link.symlink_to(base_model.resolve(), target_is_directory=True)
    return root


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """Proportional set size of the process and its children (forked workers share pages, which RSS would count
    once per process), and its anonymous part: the heap, without the page cache of files mapped for reading."""
    total = anonymous = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            with open(f"/proc/{member.pid}/smaps_rollup") as rollup:
                fields = {
                    line.split(":")[0]: int(line.split()[1]) * 1024
                    for line in rollup
                    if line.startswith(("Pss:", "Pss_Anon:"))
                }
            total += fields["Pss"]
            anonymous += fields.get("Pss_Anon", fields["Pss"])
        except (OSError, KeyError, psutil.Error):
            pass
    return total, anonymous


def run_stage(root: Path, stage: str, timeout: float, code: Path = REPO) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    watched, peak, peak_anonymous = psutil.Process(child.pid), 0, 0
    while child.poll() is None:
        total, anonymous = tree_memory(watched)
        peak, peak_anonymous = max(peak, total), max(peak_anonymous, anonymous)
        if time.perf_counter() - start > timeout:
            child.kill()
            break
        time.sleep(0.25)
    seconds = time.perf_counter() - start
    summary = (child.stdout.read() if child.stdout else "").strip().splitlines()
    return {
        "stage": stage,
        "seconds": round(seconds, 1),
        "peak_memory_mb": round(peak / 2**20),
        "peak_anonymous_mb": round(peak_anonymous / 2**20),
        "exit": child.returncode,
        "summary": summary[-1] if summary else "",
    }


def tokens_per_second(root: Path, seconds: float) -> float | None:
    path = root / "metrics" / "tokenize.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    return round((report["train"]["tokens"] + report["val"]["tokens"]) / seconds)


def encoder_ceiling(root: Path, base_model: Path, limit: int = 20_000) -> dict:
    """The fast tokenizer alone, on every core (its Rust thread pool), encoding the processed training split's
    message texts: the most tokens/s any tokenize stage built on it could reach on this machine."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(base_model).backend_tokenizer
    texts = []
    with (root / "data" / "processed" / "train.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            texts.extend(m["content"] for m in json.loads(line)["messages"])
            if len(texts) >= limit:
                break
    backend.encode_batch(texts[:1000], add_special_tokens=False)  # warm-up
    started = time.perf_counter()
    tokens = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
    return {"texts": len(texts), "tokens": tokens, "tokens_per_s": round(tokens / (time.perf_counter() - started))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/data_scaling"))
    parser.add_argument("--base-model", type=Path, default=REPO / "models" / "base", help="a base_model stage output")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per stage before it is stopped")
    parser.add_argument("--label", default="after", help="the key the rows are stored under in the results file")
    parser.add_argument(
        "--code", type=Path, default=REPO, help="a checkout whose stages/ to run (e.g. an older commit, to compare)"
    )
    args = parser.parse_args()
    if "tokenize" in args.stages and not (args.base_model / "config.json").exists():
        parser.error(f"--base-model {args.base_model}: no base model; run `dvc repro base_model` or pass a directory")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    rows = results.setdefault(args.label, {})
    for scale in args.scales:
        root = workspace(args.work, args.label, scale, args.base_model)
        for stage in args.stages:
            row = run_stage(root, stage, args.timeout, args.code.resolve())
            if stage == "tokenize" and row["exit"] == 0:
                row["tokens_per_s"] = tokens_per_second(root, row["seconds"])
                row["encoder_ceiling"] = encoder_ceiling(root, args.base_model)
                ceiling = row["encoder_ceiling"]["tokens_per_s"]
                row["fraction_of_encoder_ceiling"] = round(row["tokens_per_s"] / ceiling, 3)
            rows[f"x{scale} {stage}"] = {"scale": scale, "conversations": scale * 7168, **row}
            print(
                f"x{scale:<4} {stage:<11} {row['seconds']:>8.1f} s {row['peak_memory_mb']:>7} MB "
                f"({row['peak_anonymous_mb']} MB anonymous)  exit {row['exit']}  {row.get('tokens_per_s') or ''}",
                flush=True,
            )
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            if row["exit"] != 0:
                break
    print(f"\n{'scale':<6} {'stage':<11} {'seconds':>8} {'peak mem MB':>12} {'anonymous MB':>13} {'tokens/s':>10}")
    for row in rows.values():
        print(
            f"x{row['scale']:<5} {row['stage']:<11} {row['seconds']:>8} {row['peak_memory_mb']:>12} "
            f"{row.get('peak_anonymous_mb', ''):>13} {row.get('tokens_per_s') or '':>10}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
