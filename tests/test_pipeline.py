"""The real `dvc` CLI on the fixture pipeline in a temporary git repository."""

import json

import pytest
import yaml

from pipeline_repo import TINY_TRAIN, dvc, read_json, stages_ran
from stages.lib.allocator import glibc

# Every test here reads the fixture pipeline reproduced by `dvc repro` (minutes on 2 cores).
pytestmark = pytest.mark.slow


def test_repro_trains_and_the_loss_goes_down(llama_repo):
    train = read_json(llama_repo / "metrics" / "train.json")
    assert train["steps"] == TINY_TRAIN["max_steps"]
    assert train["val_loss_after"] < train["val_loss_before"] - 1.0
    runtime = read_json(llama_repo / "metrics" / "runtime" / "train.json")
    assert runtime["trained_tokens"] > 0 and runtime["tokens_per_s"] > 0 and runtime["peak_memory_mb"] > 0
    if glibc():  # the torchrun worker restarted itself with glibc's tcache off
        assert "freed memory kept" in runtime["allocator"] and "tcache off" in runtime["allocator"], runtime[
            "allocator"
        ]
    data = read_json(llama_repo / "metrics" / "data.json")
    assert data["input"]["conversations"] == 48
    tokens = read_json(llama_repo / "metrics" / "tokenize.json")
    assert tokens["train"]["examples"] > 0 and 0 < tokens["train"]["trained_fraction"] < 1


def test_finetuned_model_carries_its_chat_format(llama_repo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = llama_repo / "models" / "finetuned"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token != "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there, i am visitor 3."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    assert generated[0, -1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")  # it learned to stop


def test_dvclive_curves_and_plots(llama_repo):
    loss = (llama_repo / "dvclive" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert loss[0].split("\t")[:2] == ["step", "loss"] and len(loss) > 3
    plots = llama_repo / "dvclive" / "plots" / "metrics"
    series = {p.relative_to(plots).as_posix() for p in (llama_repo / "dvclive").rglob("*.tsv")}
    assert {"loss.tsv", "eval/loss.tsv", "learning_rate.tsv"} <= series
    timings = ("runtime", "per_second", "tokens_per_s", "flos")
    assert not [name for name in series if any(w in name for w in timings)], series
    shown = dvc(llama_repo, "plots", "show", "--json")
    assert "Training loss" in shown.stdout


def test_nothing_changed_means_nothing_runs(llama_repo):
    assert "Data and pipelines are up to date" in dvc(llama_repo, "status").stdout
    assert stages_ran(dvc(llama_repo, "repro").stdout) == set()


def test_param_changes_rerun_only_what_depends_on_them(llama_repo):
    params_file = llama_repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    try:
        params["train"]["learning_rate"] = 1.0e-3
        params["seed"] = 7
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(dvc(llama_repo, "status", "--json").stdout)
        assert "train" in status and "preprocess" in status  # the seed drives the split too
        assert "tokenize" not in status and "base_model" not in status and "ingest" not in status

        params = yaml.safe_load(original)
        params["preprocess"]["max_turn_chars"] = 3000  # reruns preprocess; its outputs are unchanged
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        ran = stages_ran(dvc(llama_repo, "repro").stdout)
        assert ran == {"preprocess"}
    finally:
        params_file.write_text(original)
    dvc(llama_repo, "repro")
    assert "Data and pipelines are up to date" in dvc(llama_repo, "status").stdout


VERDICTS = (
    "better",
    "worse",
    "closer to human",
    "further from human",
    "no significant change",
    "negligible",
    "unchanged",
    "",
)


def test_finetuned_model_beats_the_base_on_fluency_and_stopping(llama_repo):
    results = read_json(llama_repo / "metrics" / "eval.json")
    base, tuned, change = results["base"], results["finetuned"], results["change"]
    assert tuned["perplexity"] < base["perplexity"] and tuned["bits_per_byte"] < base["bits_per_byte"]
    assert tuned["stop_rate"] > base["stop_rate"]
    assert change["perplexity_improvement"]["verdict"] == "better" and change["perplexity_improvement"]["low"] > 0
    assert "distinct_1" in results["human"] and "passed" in results["gate"]


def test_every_headline_metric_carries_its_interval_and_a_paired_verdict(llama_repo):
    results = read_json(llama_repo / "metrics" / "eval.json")
    from stages.lib.stats import DESCRIPTIVE, HEADLINE

    for key in HEADLINE:
        for model in (results["base"], results["finetuned"]):
            assert model[f"{key}_low"] <= model[key] <= model[f"{key}_high"], key
        paired = results["change"]["perplexity_improvement" if key == "perplexity" else key]
        assert paired["low"] <= paired["value"] <= paired["high"], key
        assert paired["verdict"] in VERDICTS and (paired["verdict"] in ("", "unchanged")) == (
            key in DESCRIPTIVE or paired["verdict"] == "unchanged"
        ), (key, paired["verdict"])
    assert {"base", "finetuned", "human", "change"} <= set(results["unseen"])  # the held-out topics, beside


def test_eval_records_the_precision_each_model_was_scored_in(llama_repo):
    results = read_json(llama_repo / "metrics" / "eval.json")
    for model in ("base", "finetuned"):
        ran = read_json(llama_repo / "metrics" / "runtime" / f"score_{model}.json")["precision"]["precision"]
        assert ran in ("fp32", "bf16") and results["precision"][model] == ran, (model, results["precision"], ran)


def test_slices_and_per_conversation_statistics_are_written(llama_repo):
    results = read_json(llama_repo / "metrics" / "eval.json")
    depth = read_json(llama_repo / "metrics" / "eval_by_depth.json")
    assert depth and {"depth", "replies", "tokens", "base_perplexity", "finetuned_perplexity"} <= set(depth[0])
    per_conversation = read_json(llama_repo / "metrics" / "eval_conversations.json")
    assert sum(r["set"] == "test" for r in per_conversation) == results["test_conversations"]
    assert sum(r["set"] == "unseen" for r in per_conversation) == results["unseen"]["test_conversations"] > 0
    assert {"id", "base", "finetuned"} <= set(per_conversation[0])


def test_transcripts_show_human_and_finetuned_replies(llama_repo):
    transcripts = (llama_repo / "metrics" / "transcripts.md").read_text()
    assert transcripts.count("- **human**:") >= 1 and "- **finetuned**:" in transcripts


def test_dvc_metrics_show_lists_the_evaluation_with_intervals(llama_repo):
    shown = dvc(llama_repo, "metrics", "show", "--json").stdout
    assert "finetuned" in shown and "perplexity_low" in shown


def test_scoring_reports_its_fraction_of_the_measured_gemm_ceiling(llama_repo):
    for model in ("base", "finetuned"):
        runtime = read_json(llama_repo / "metrics" / "runtime" / f"score_{model}.json")
        for name in ("fluency_ceiling", "generation_ceiling"):
            ceiling = runtime[name]
            assert ceiling["ceiling_s"] > 0 and ceiling["ceiling_gflops"] > 0, (model, name)
            assert ceiling["fraction_of_ceiling"] > 0, (model, name)
        assert runtime["fluency_positions_per_s"] >= runtime["scored_tokens_per_s"]
        assert runtime["generation_forward_calls"] > 0


def test_evaluation_only_change_does_not_retrain_and_gate_can_fail(llama_repo):
    params_file = llama_repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    try:
        gate = {"min_perplexity_improvement": 1.0, "min_stop_rate": 0.0, "fail_on_gate": True}
        params["evaluate"]["gate"].update(gate)
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        result = dvc(llama_repo, "repro", check=False)
        assert result.returncode != 0 and stages_ran(result.stdout) == {"evaluate"}  # neither model is scored again
        assert "quality gate failed" in result.stderr + result.stdout
    finally:
        params_file.write_text(original)
    restored = dvc(llama_repo, "repro").stdout
    assert stages_ran(restored) == {"evaluate"}  # transcripts read the scores, which did not change


def test_ingest_depends_on_the_file_data_source_names_and_nothing_else(llama_repo):
    source = llama_repo / "data" / "external" / "chats.jsonl"
    original = source.read_bytes()
    unrelated = llama_repo / "data" / "external" / "notes.txt"
    dangling = llama_repo / "data" / "external" / "gone.jsonl"
    try:
        unrelated.write_text("not a dataset")
        # A dangling link once broke every dvc command when the folder was a dependency.
        dangling.symlink_to(llama_repo / "no-such-file")
        assert "Data and pipelines are up to date" in dvc(llama_repo, "status").stdout
        source.write_bytes(original.replace(b"hello", b"hullo", 1))
        assert "ingest" in json.loads(dvc(llama_repo, "status", "--json").stdout)
    finally:
        source.write_bytes(original)
        unrelated.unlink(missing_ok=True)
        dangling.unlink(missing_ok=True)
    assert "Data and pipelines are up to date" in dvc(llama_repo, "status").stdout
