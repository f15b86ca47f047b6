"""Paths that more than one stage reads: each stage's own outputs are named at the top of its module."""

from pathlib import Path

RAW = Path("data/raw/conversations.jsonl")
PROCESSED = Path("data/processed")
TEST = PROCESSED / "test.jsonl"
TEST_UNSEEN = PROCESSED / "test_unseen.jsonl"  # conversations of topics held out of every other split
TEST_SETS = {"test": TEST, "unseen": TEST_UNSEEN}
BASE_MODEL = Path("models/base")
TOKENIZED = Path("data/tokenized")
FINETUNED = Path("models/finetuned")
SCORES = Path("data/scores")  # <model>.json: per-turn scores and generated replies of each model
EXPORT = Path("models/export")
EXPORT_GGUF = EXPORT / "model.gguf"  # what the export stage writes and `chat --model export` loads
MODELS = {"base": BASE_MODEL, "finetuned": FINETUNED}  # the names evaluate and chat accept
