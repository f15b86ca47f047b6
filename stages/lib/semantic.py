"""Semantic similarity of two texts: the cosine of their sentence embeddings (SemScore, docs/DESIGN.md
§5.1). The encoder (all-MiniLM-L6-v2 by default, a BERT with mean pooling) is materialised by the
`encoder` stage as models/encoder/, safetensors only; nothing reads the wheel at scoring time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

ENCODER = Path("models/encoder")


def load_encoder(directory: Path | str = ENCODER) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from stages.lib.errors import InputError

    transformers.logging.disable_progress_bar()

    directory = Path(directory)
    if not any(directory.glob("*.safetensors")):
        raise InputError(
            f"{directory}: no sentence encoder in safetensors; run the encoder stage first (dvc repro encoder)"
        )
    try:
        model = AutoModel.from_pretrained(directory, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{directory}: cannot load the sentence encoder: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def embed(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 64, max_length: int = 256) -> np.ndarray:
    """Unit-length mean-pooled embeddings (padding excluded from the mean), one row per text, float32."""
    import torch

    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def similarities(model: Any, tokenizer: Any, texts: Sequence[str], references: Sequence[str]) -> list[float]:
    """Cosine of each text with its reference; an empty text says nothing and scores 0, not the similarity of an
    empty sentence's embedding."""
    if not texts:
        return []
    vectors = embed(model, tokenizer, list(texts) + list(references))
    a, b = vectors[: len(texts)], vectors[len(texts) :]
    return [float(x) if text.strip() else 0.0 for text, x in zip(texts, (a * b).sum(1))]
