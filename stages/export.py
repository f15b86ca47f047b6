"""Stage `export`: models/finetuned as models/export/ (model.gguf, an Ollama Modelfile, a model card), verified.

The GGUF is read back through transformers' GGUF loader and compared with models/finetuned on held-out test
conversations (metrics/export.json); a mismatch fails the stage and leaves no models/export/ behind.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml

from stages.lib import gguf_file, model_card, round_trip
from stages.lib.atomic import publish_together
from stages.lib.cli import run
from stages.lib.conversations import InputError, dataset_name, read_conversations
from stages.lib.launch import use_slot
from stages.lib.modeling import load_causal_lm
from stages.lib.ollama import TurnFormat, modelfile
from stages.lib.params import Params, load_params
from stages.lib.paths import BASE_MODEL, EXPORT_GGUF, FINETUNED, PROCESSED, TEST, TOKENIZED
from stages.lib.paths import EXPORT as OUTPUT
from stages.lib.template import stop_token_ids

GGUF = EXPORT_GGUF.name
METRICS = Path("metrics/export.json")
RUNTIME = Path("metrics/runtime/export.json")
EVAL, DATA, LOCK = Path("metrics/eval.json"), Path("metrics/data.json"), Path("dvc.lock")
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # bundled base names -> their hub ids
DATASETS = {"chitchat": "BYU-PCCL/chitchat-dataset"}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def load_merged() -> tuple[Any, Any, Any]:
    """models/finetuned as evaluated (a LoRA adapter on its base), its merged plain model, and the tokenizer."""
    reference, tokenizer = load_causal_lm(FINETUNED)
    if hasattr(
        reference, "merge_and_unload"
    ):  # a copy: the reference keeps the unmerged adapter, so the check covers the merge
        return reference, copy.deepcopy(reference).merge_and_unload().eval(), tokenizer
    return reference, reference, tokenizer


def verdict(params: Params, scores: round_trip.Scores, replies: round_trip.Replies) -> dict:
    settings = params.export.round_trip
    precision = params.export.precision
    change = scores.exported_perplexity / scores.reference_perplexity - 1.0
    checks: dict[str, dict] = {
        "prompt_ids": {
            "identical": replies.identical_prompt_ids,
            "of": replies.prompts,
            "passed": replies.identical_prompt_ids == replies.prompts,
        }
    }
    if precision == "q8_0":
        checks["perplexity"] = {
            "change": round(change, 6),
            "maximum": settings.max_perplexity_increase,
            "passed": abs(change) <= settings.max_perplexity_increase,
        }
    else:
        tolerance = getattr(settings.logit_tolerance, precision)
        checks["logits"] = {
            "max_abs_diff": round(scores.max_abs_logit_diff, 6),
            "tolerance": tolerance,
            "passed": scores.max_abs_logit_diff <= tolerance,
        }
        checks["greedy_replies"] = {
            "identical": replies.identical_replies,
            "of": replies.prompts,
            "passed": replies.identical_replies == replies.prompts,
        }
    return {
        "scored_tokens": scores.scored_tokens,
        "max_abs_logit_diff": round(scores.max_abs_logit_diff, 6),
        "argmax_agreement": round(scores.argmax_agreement, 6),
        "finetuned_perplexity": round(scores.reference_perplexity, 4),
        "gguf_perplexity": round(scores.exported_perplexity, 4),
        "perplexity_change": round(change, 6),
        "greedy_replies_identical": f"{replies.identical_replies}/{replies.prompts}",
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values()),
    }


def ollama_parameters(params: Params) -> dict[str, float | int]:
    """The decoding the evaluation used, so the card's numbers describe what `ollama run` does by default."""
    decode = params.evaluate
    return {
        "temperature": decode.temperature if decode.do_sample else 0,
        "top_p": decode.top_p,
        "top_k": 0,  # off, as in the evaluation (Ollama's default is 40)
        "repeat_penalty": decode.repetition_penalty,
        "num_predict": decode.max_new_tokens,
        "seed": params.seed,
    }


def export(params: Params) -> tuple[dict, dict]:
    settings = params.export
    reference, merged, tokenizer = load_merged()  # a missing model is a one-line error here
    gguf_file.architecture(merged.config)  # everything that can refuse does so before any writing
    vocab = gguf_file.vocabulary(tokenizer, merged.config.vocab_size)
    test = read_conversations(TEST)[: settings.round_trip.conversations]
    turns = TurnFormat.probe(tokenizer)
    template_checked = turns.check(tokenizer, [c["messages"] for c in test])
    stops = [
        tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, merged.generation_config.eos_token_id)
    ]
    base_card = read_json(BASE_MODEL / "model_card.json")
    timings = {}
    # The model, its metrics and its timings are published together, or none of them (docs/DESIGN.md §9).
    with publish_together(files=[METRICS, RUNTIME], dirs=[OUTPUT]) as outputs:
        staged = outputs[OUTPUT]
        started = time.perf_counter()
        counts = gguf_file.write(
            staged / GGUF, merged, vocab, settings.precision, {"name": settings.name, "license": settings.license}
        )
        timings["write_s"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        exported = gguf_file.load(staged / GGUF)
        scores = round_trip.score(
            reference, exported[0], tokenizer, test, params.tokenize.max_length, settings.round_trip.batch_size
        )
        replies = round_trip.compare_replies(
            (reference, tokenizer),
            exported,
            round_trip.prompts(test, settings.round_trip.prompts),
            params.tokenize.max_length,
            settings.round_trip.max_new_tokens,
        )
        timings["verify_s"] = round(time.perf_counter() - started, 2)
        checked = verdict(params, scores, replies)
        if not checked["passed"]:
            failed = {k: v for k, v in checked["checks"].items() if not v["passed"]}
            raise InputError(
                f"round trip failed ({settings.precision}): {json.dumps(failed)}"
                + (f"; {replies.first_difference}" if replies.first_difference else "")
                + "; nothing exported"
            )
        summary = {
            "precision": settings.precision,
            "file": str(EXPORT_GGUF),
            "size_bytes": (staged / GGUF).stat().st_size,
            "tensors": counts,
            "architecture": merged.config.model_type,
            "tokenizer_pre": vocab.pre,
            "template_prompts_checked": template_checked,
            "stop": stops,
            "round_trip": checked,
        }
        (staged / "Modelfile").write_text(modelfile(GGUF, turns, stops, ollama_parameters(params)), encoding="utf-8")
        commands = (
            f"From the repository root (the Modelfile's `FROM ./{GGUF}` is resolved beside the Modelfile):\n\n"
            f"```sh\nollama create {settings.name} -f {OUTPUT}/Modelfile\nollama run {settings.name}\n```"
        )
        meta = model_card.front_matter(
            settings.name,
            HUB_IDS.get(base_card.get("source"))
            if base_card.get("kind") == "bundled-gguf"
            else base_card.get("source")
            if base_card.get("kind") == "hub"
            else None,
            settings.license,
            DATASETS.get(dataset_name(params.data.source), dataset_name(params.data.source)),
            read_json(EVAL),
        )
        lineage = {
            "git revision (pipeline code)": model_card.code_revision(),
            **{
                f"dvc {path}": md5
                for path, md5 in model_card.dvc_hashes(
                    yaml.safe_load(LOCK.read_text()) if LOCK.exists() else None,
                    (str(PROCESSED), str(TOKENIZED), str(FINETUNED)),
                ).items()
            },
            "base model": base_card.get("source", "unknown")
            + (f" (sha256 {base_card['sha256']})" if base_card.get("sha256") else ""),
        }
        readme = model_card.card(
            meta,
            settings.name,
            {**summary, "base": base_card.get("source", "unknown"), "size_mb": summary["size_bytes"] / 1e6},
            read_json(EVAL),
            params.train.model_dump(),
            read_json(DATA),
            lineage,
            commands,
        )
        (staged / "README.md").write_text(readme, encoding="utf-8")
        outputs.write_json(METRICS, summary)
        outputs.write_json(RUNTIME, timings)
    return summary, timings


def main() -> int:
    params = load_params()
    use_slot()  # this experiment's share of the machine when queued experiments run at once (stages/lib/launch.py)
    summary, timings = export(params)
    checked = summary["round_trip"]
    print(
        f"export: {summary['architecture']} {summary['precision']} {summary['size_bytes'] / 1e6:.1f} MB "
        f"-> {EXPORT_GGUF} "
        f"(write {timings['write_s']} s, verify {timings['verify_s']} s); "
        f"round trip max |dlogit| {checked['max_abs_logit_diff']:.2g}, "
        f"perplexity {checked['finetuned_perplexity']} -> {checked['gguf_perplexity']}, "
        f"greedy replies identical {checked['greedy_replies_identical']}"
    )
    return 0


if __name__ == "__main__":
    run(main)
