"""Entry-point wrapper shared by every stage: known errors become one clear line and exit code 1."""
from __future__ import annotations

import sys
from typing import Callable

from stages.conversations import InputError
from stages.params import ParamsError


def run(entry: Callable[[], int]) -> None:
    try:
        code = entry()
    except (InputError, ParamsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)
