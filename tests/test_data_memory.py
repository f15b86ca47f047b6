"""The data stages stream. Each runs in a child process whose heap is capped (RLIMIT_DATA) below
the size of the corpus it reads, and must still finish with outputs equal to those of an uncapped run."""

from __future__ import annotations

import hashlib
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO, run_stage, write_params
from tiny import save_tiny

WORDS = "the a blue cat likes warm tea on rainy days while we talk about travel food music and old friends".split()
STAGES = ("ingest", "preprocess", "tokenize")
MB = 2**20
# MALLOC_ARENA_MAX: glibc reserves a 64 MB arena for a thread on demand and RLIMIT_DATA counts the reservation,
# so whether one more arena appeared (thread timing) made the measured peak and the capped run differ by 64 MB.
ENV = {
    "PYTHONPATH": str(REPO),
    "PATH": "",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MALLOC_ARENA_MAX": "2",
}


def write_corpus(path: Path, megabytes: int) -> int:
    """The fixture conversations again and again with random words appended: no copy is a duplicate."""
    rng = random.Random(0)
    base = [json.loads(line) for line in (FIXTURES / "conversations.jsonl").read_text().splitlines()]
    written = count = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < megabytes * MB:
            record = base[count % len(base)]
            messages = [
                {"role": m["role"], "content": m["content"] + " " + " ".join(rng.choices(WORDS, k=60))}
                for m in record["messages"]
            ]
            line = json.dumps({"id": f"c{count}", "messages": messages, "meta": record.get("meta", {})}) + "\n"
            handle.write(line)
            written += len(line)
            count += 1
    return count


def peak_heap(stage: str, cwd: Path) -> int:
    """The largest private writable memory (VmData: heap, arenas, thread stacks) that any process of the
    stage (it and its map workers) reaches, sampled every 20 ms: RLIMIT_DATA applies per process."""
    import psutil

    child = subprocess.Popen(
        [sys.executable, "-m", f"stages.{stage}"], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    watched, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            members = [watched, *watched.children(recursive=True)]
        except psutil.Error:
            break
        for member in members:
            try:
                peak = max(peak, member.memory_info().data)
            except psutil.Error:
                pass
        time.sleep(0.02)
    assert child.wait() == 0, child.stderr.read()[-2000:]
    return peak


def run_capped(stage: str, cwd: Path, limit: int) -> subprocess.CompletedProcess:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"], cwd=cwd, capture_output=True, text=True, env=ENV, preexec_fn=cap
    )


def digests(root: Path) -> dict[str, str]:
    files = [
        root / "data" / "raw" / "conversations.jsonl",
        root / "metrics" / "data.json",
        root / "metrics" / "tokenize.json",
    ]
    files += sorted((root / "data" / "processed").glob("*.jsonl")) + sorted(
        (root / "data" / "tokenized").rglob("*.arrow")
    )
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def make_workspace(root: Path, corpus_mb: int, like: Path | None = None) -> Path:
    """A repository with a tiny base model and, as its source, a corpus of `corpus_mb` MB; `like`, a workspace
    made before, lends its base model and, if it is as large, its corpus (the same bytes: both are seeded)."""
    (root / "data" / "external").mkdir(parents=True)
    corpus = root / "data" / "external" / "chats.jsonl"
    write_params(
        root,
        {
            "data": {"source": "data/external/chats.jsonl"},
            "model": {"base": "tiny-model"},
            "preprocess": {"max_turn_chars": 100000, "val_fraction": 0.1, "test_fraction": 0.1},
            "tokenize": {"max_length": 512, "max_val_examples": None},
        },
    )
    if like is None:
        write_corpus(corpus, corpus_mb)
        save_tiny(root / "tiny-model", "llama")
        result = run_stage("base_model", root)
        assert result.returncode == 0, result.stderr[-2000:]
        return root
    source = like / "data" / "external" / "chats.jsonl"
    if source.stat().st_size >= corpus_mb * MB:
        shutil.copyfile(source, corpus)
    else:
        write_corpus(corpus, corpus_mb)
    shutil.copytree(like / "models", root / "models")
    return root


CORPUS_MB = 32
SMALL_MB = 2  # enough conversations for tokenize to start its map workers too


@pytest.mark.slow
def test_data_stages_finish_in_a_heap_smaller_than_the_corpus(tmp_path):
    """The cap is what each stage needs on a 2 MB corpus plus half the 32 MB one: a stage that held the
    corpus as Python objects (several times its size on disk) could not fit under it."""
    small = make_workspace(tmp_path / "small", SMALL_MB)
    free = make_workspace(tmp_path / "free", CORPUS_MB, like=small)
    capped = make_workspace(tmp_path / "capped", CORPUS_MB, like=free)
    for stage in STAGES:
        limit = peak_heap(stage, small) + CORPUS_MB * MB // 2
        assert run_stage(stage, free).returncode == 0
        result = run_capped(stage, capped, limit)
        assert result.returncode == 0, f"{stage} under RLIMIT_DATA={limit // MB} MB: {result.stderr[-2000:]}"
    assert digests(capped) == digests(free)
