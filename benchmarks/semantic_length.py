"""How much of the fine-tuned model's semantic-similarity gap to the base model is reply length.

    python benchmarks/semantic_length.py   (after `dvc repro`: reads data/scores/*.json, the test sets and
                                             models/encoder)

The base model answers in ~46 words, the fine-tuned one and people in ~15. A longer reply shares more meaning with
any reference, so the base model's replies are scored again cut to the first N words: to the fine-tuned reply's
word count on the same turn (length-matched), and to fixed lengths. Each row is the paired change against the
fine-tuned model with its 95% interval (bootstrap over conversations, as `evaluate`). Prints a table and writes
benchmarks/results/semantic_length.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from stages.lib.conversations import read_conversations  # noqa: E402
from stages.lib.params import Params, load_params  # noqa: E402
from stages.lib.paths import SCORES, TEST_SETS  # noqa: E402
from stages.lib.semantic import load_encoder, similarities  # noqa: E402
from stages.lib.stats import Interval, bootstrap  # noqa: E402

RESULTS = Path("benchmarks/results/semantic_length.json")


def first_words(text: str, count: int) -> str:
    return " ".join(text.split()[:count])


def scored(encoder: Any, tokenizer: Any, texts: list[str], human: list[str]) -> np.ndarray:
    """Semantic similarity per reply, as `evaluate` scores it."""
    return np.array(similarities(encoder, tokenizer, texts, human))


def replies(scores: dict) -> dict[tuple[int, int], str]:
    return {(r["conversation"], r["turn"]): r["reply"] for r in scores["replies"] if "reply" in r}


def paired_change(first: np.ndarray, second: np.ndarray, conversation_of: np.ndarray, params: Params) -> Interval:
    """Mean of `first` minus mean of `second` over the same turns, resampling whole conversations."""
    members = [np.flatnonzero(conversation_of == c) for c in np.unique(conversation_of)]

    def change(sample: np.ndarray) -> float:
        chosen = np.concatenate([members[i] for i in sample])
        return float(first[chosen].mean() - second[chosen].mean())

    resampling = params.evaluate.bootstrap
    return bootstrap(change, len(members), resampling.resamples, resampling.confidence, params.seed)


def main() -> int:
    params = load_params()
    encoder, tokenizer = load_encoder()
    results = {}
    for set_name in ("test", "unseen"):
        scores = {m: json.loads((SCORES / f"{m}.json").read_text())["sets"][set_name] for m in ("base", "finetuned")}
        by_id = {c["id"]: c for c in read_conversations(TEST_SETS[set_name])}
        ids = [c["id"] for c in scores["base"]["conversations"]]
        base, tuned = replies(scores["base"]), replies(scores["finetuned"])
        turns = sorted(set(base) & set(tuned))
        human = [by_id[ids[c]]["messages"][t]["content"] for c, t in turns]
        variants = {
            "base, whole replies": [base[k] for k in turns],
            "base, cut to the fine-tuned reply's length": [first_words(base[k], len(tuned[k].split())) for k in turns],
            "base, first 15 words": [first_words(base[k], 15) for k in turns],
            "base, first 25 words": [first_words(base[k], 25) for k in turns],
        }
        tuned_sim = scored(encoder, tokenizer, [tuned[k] for k in turns], human)
        conversation_of = np.array([c for c, _ in turns])
        rows = {"fine-tuned": {"semantic_similarity": round(float(tuned_sim.mean()), 4)}}
        for name, texts in variants.items():
            sim = scored(encoder, tokenizer, texts, human)
            interval = paired_change(tuned_sim, sim, conversation_of, params)
            rows[name] = {
                "semantic_similarity": round(float(sim.mean()), 4),
                "fine_tuned_minus_this": [round(interval.value, 4), round(interval.low, 4), round(interval.high, 4)],
                "mean_words": round(float(np.mean([len(t.split()) for t in texts])), 1),
            }
        rows["fine-tuned"]["mean_words"] = round(float(np.mean([len(tuned[k].split()) for k in turns])), 1)
        results[set_name] = {"turns": len(turns), "temperature": params.evaluate.temperature, "rows": rows}
        print(f"\n{set_name}: {len(turns)} turns, temperature {params.evaluate.temperature}")
        print(f"{'replies':45} {'words':>6} {'similarity':>10}  fine-tuned minus this [95%]")
        for name, row in rows.items():
            change_text = (
                ""
                if "fine_tuned_minus_this" not in row
                else "{:+.4f} [{:+.4f}, {:+.4f}]".format(*row["fine_tuned_minus_this"])
            )
            print(f"{name:45} {row['mean_words']:>6} {row['semantic_similarity']:>10.4f}  {change_text}")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
