"""A Hugging Face model card (README.md with YAML metadata) for the exported model.

Everything in it is a function of the stage's inputs, so the card is byte-identical for the same code, params
and data: the lineage names data by its DVC hash (content-addressed) and the code by the last commit that
changed it (`code_revision`), not by the commit checked out when the stage ran, which would change with every
unrelated commit (a README edit) while the model stays the same.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

CODE = ("stages", "dvc.yaml")  # what the pipeline runs; params are covered by dvc.lock's hashes and the card's tables
INTERVAL_KEYS = (("ci_low", "ci_high"), ("low", "high"), ("lo", "hi"), ("lower", "upper"))
POINT_KEYS = ("value", "mean", "point", "estimate")


def code_revision(root: Path = Path(".")) -> str:
    """The last commit that changed the pipeline code, marked when the work tree changes it further."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    revision = git("log", "-1", "--format=%H", "--", *CODE)
    if not revision:
        return "unknown (not a git repository, or the code is not committed)"
    return revision + (" with uncommitted changes" if git("status", "--porcelain", "--", *CODE) else "")


def dvc_hashes(lock: dict | None, paths: tuple[str, ...]) -> dict[str, str]:
    """The md5 dvc.lock records for each path among the stages' outs."""
    found = {}
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") in paths:
                found[out["path"]] = out.get("md5", "?")
    return {path: found.get(path, "not recorded in dvc.lock") for path in paths}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric(section: dict, key: str) -> tuple[float, tuple[float, float] | None] | None:
    """A metric's value and its interval, in whichever shape evaluate writes it: `x` with `x_ci_low`/`x_ci_high`
    (or _low/_high, _lo/_hi, _lower/_upper, or `x_ci` as a pair) beside it, or `x` as a mapping of a point value
    and its bounds."""
    value = section.get(key)
    if isinstance(value, dict):
        point = next((value[k] for k in POINT_KEYS if _number(value.get(k))), None)
        if point is None:
            return None
        bounds = next(
            ((value[lo], value[hi]) for lo, hi in INTERVAL_KEYS if _number(value.get(lo)) and _number(value.get(hi))),
            None,
        )
        if bounds is None and isinstance(value.get("ci"), list) and len(value["ci"]) == 2:
            bounds = tuple(value["ci"])
        return point, bounds
    if not _number(value):
        return None
    for lo, hi in INTERVAL_KEYS:
        if _number(section.get(f"{key}_{lo}")) and _number(section.get(f"{key}_{hi}")):
            return value, (section[f"{key}_{lo}"], section[f"{key}_{hi}"])
    pair = section.get(f"{key}_ci")
    if isinstance(pair, list) and len(pair) == 2 and all(_number(v) for v in pair):
        return value, (pair[0], pair[1])
    return value, None


def metric_keys(section: dict) -> list[str]:
    """Keys that are metrics themselves, not another metric's bound."""
    bounds = {f"_{part}" for pair in INTERVAL_KEYS for part in pair} | {"_ci"}
    return [
        k
        for k in section
        if metric(section, k) is not None and not any(k.endswith(b) and k[: -len(b)] in section for b in bounds)
    ]


def _cell(found: tuple[float, tuple[float, float] | None] | None) -> str:
    if found is None:
        return ""
    value, bounds = found
    return f"{value:.4g}" + (f" [{bounds[0]:.4g}, {bounds[1]:.4g}]" if bounds else "")


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list) and not all(isinstance(v, (int, float, str)) for v in obj):
        for index, value in enumerate(obj):
            yield from flatten(value, f"{prefix}[{index}]")
    else:
        yield prefix, obj


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def front_matter(name: str, base_model: str | None, license: str, dataset: str, evaluation: dict) -> dict:
    tuned = evaluation.get("finetuned", {})
    results = [
        {"type": key, "name": key.replace("_", " "), "value": metric(tuned, key)[0]}
        for key in metric_keys(tuned)
        if not key.endswith("_tokens")
    ]  # a count (scored_tokens) is no result
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model
    meta.update(
        {
            "license": license,
            "datasets": [dataset],
            "pipeline_tag": "text-generation",
            "library_name": "gguf",
            "tags": ["gguf", "ollama", "conversational"],
            "model-index": [
                {
                    "name": name,
                    "results": [
                        {
                            "task": {"type": "text-generation", "name": "Chat reply generation"},
                            "dataset": {
                                "type": dataset,
                                "name": f"{dataset} (held-out test conversations)",
                                "split": "test",
                            },
                            "metrics": results,
                        }
                    ],
                }
            ],
        }
    )
    return meta


def card(
    meta: dict,
    name: str,
    export_summary: dict,
    evaluation: dict,
    train: dict,
    data: dict,
    lineage: dict[str, str],
    commands: str,
) -> str:
    models = [m for m in ("base", "finetuned", "human") if isinstance(evaluation.get(m), dict)]
    keys = list(dict.fromkeys(k for m in models for k in metric_keys(evaluation[m])))
    eval_rows = [[k] + [_cell(metric(evaluation[m], k)) for m in models] for k in keys]
    has_intervals = any(metric(evaluation[m], k) and metric(evaluation[m], k)[1] for m in models for k in keys)
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---",
        f"# {name}",
        f"A chat model fine-tuned from `{meta.get('base_model', export_summary['base'])}` on `{meta['datasets'][0]}`, "
        f"exported as GGUF ({export_summary['precision']}, {export_summary['size_mb']:.1f} MB) "
        "for llama.cpp, Ollama and LM Studio.",
        "## Use it with Ollama",
        commands,
        "## Evaluation",
        "Held-out test conversations; perplexity covers the assistant replies and their end-of-turn token."
        + (" Brackets: 95% intervals from metrics/eval.json." if has_intervals else ""),
        table(["metric", *models], eval_rows)
        if eval_rows
        else "No evaluation recorded (metrics/eval.json is missing).",
        "## Export check",
        "The GGUF read back by transformers' GGUF loader against the fine-tuned model (metrics/export.json):",
        table(["check", "value"], [[k, v] for k, v in flatten(export_summary["round_trip"])]),
        "## Training parameters",
        table(["param", "value"], [[k, v] for k, v in flatten(train)]),
        "## Data",
        table(["statistic", "value"], [[k, v] for k, v in flatten(data)])
        if data
        else "No data report (metrics/data.json is missing).",
        "## Lineage",
        table(["input", "identity"], [[k, f"`{v}`"] for k, v in lineage.items()]),
    ]
    return "\n\n".join(parts) + "\n"
