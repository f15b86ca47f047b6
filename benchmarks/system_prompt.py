"""Which `tokenize.system_prompt` to default to: the base model's fluency on held-out replies, and the tokens
the system block costs in every training window, for each setting.

    python benchmarks/system_prompt.py [--conversations 200]   (after `dvc repro tokenize`: needs models/base
                                                                 and data/processed/test.jsonl)

Prints a table and writes benchmarks/results/system_prompt.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stages.lib.conversations import read_conversations  # noqa: E402
from stages.lib.labels import TemplateCost  # noqa: E402
from stages.lib.modeling import cast_weights, load_causal_lm  # noqa: E402
from stages.lib.paths import BASE_MODEL, TEST  # noqa: E402
from stages.lib.precision import choose  # noqa: E402
from stages.lib.template import with_system_prompt  # noqa: E402
from stages.score import fluency  # noqa: E402

SETTINGS = ("default", "none", "You are a person chatting casually with a new acquaintance.")
RESULTS = Path("benchmarks/results/system_prompt.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    test = read_conversations(TEST)[: args.conversations]
    model, _ = load_causal_lm(BASE_MODEL)
    precision = choose("auto", model.config)
    model = cast_weights(model, precision.dtype)
    rows = []
    for setting in SETTINGS:
        _, tokenizer = load_causal_lm(BASE_MODEL)
        tokenizer = with_system_prompt(tokenizer, setting)
        started = time.perf_counter()
        turns = fluency(model, tokenizer, test, args.max_length, 16)
        nll, tokens = sum(t["nll"] for t in turns), sum(t["tokens"] for t in turns)
        rows.append(
            {
                "system_prompt": setting,
                "template_preamble_tokens": TemplateCost.measure(tokenizer).preamble,
                "scored_tokens": tokens,
                "base_perplexity": round(math.exp(nll / tokens), 3),
                "bits_per_byte": round(nll / math.log(2) / sum(t["bytes"] for t in turns), 4),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    print(f"{'system_prompt':<62} {'preamble tokens':>15} {'base perplexity':>15} {'bits/byte':>9}")
    for row in rows:
        print(
            f"{row['system_prompt'][:60]:<62} {row['template_preamble_tokens']:>15} "
            f"{row['base_perplexity']:>15} {row['bits_per_byte']:>9}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "precision": precision.as_dict(),
        "conversations": len(test),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
