"""Stage `check_params`: the whole params.yaml validated before any other stage runs.

DVC removes a stage's outputs before it runs the stage's command, so a check inside the stage would come after
its last good outputs are gone. Every other stage depends on this stage's output: an invalid value stops
`dvc repro` and `dvc exp run` here, before any output is removed. The output's content never changes, so a valid
edit reruns this stage (a second) and, that dependency unchanged, only the stages whose own params changed
(docs/DESIGN.md §9).
"""

from __future__ import annotations

import os
from pathlib import Path

from stages.lib.atomic import write_text
from stages.lib.cli import run
from stages.lib.params import PARAMS_FILE, ParamsError, load_params

OUTPUT = Path("data/params_checked.txt")
CONTENT = "params.yaml matches the schema of stages/lib/params.py\n"  # constant: see the module's docstring


def workspace_experiment() -> bool:
    """Whether `dvc exp run` is running in the workspace (it wrote its -S values into params.yaml there);
    queued and --temp experiments run in a copy under .dvc/tmp/exps and leave the workspace as it was."""
    root = os.environ.get("DVC_ROOT")
    return bool(os.environ.get("DVC_EXP_NAME")) and root is not None and Path(root).resolve() == Path.cwd().resolve()


def main() -> int:
    try:
        load_params()
    except ParamsError as exc:
        if not workspace_experiment():
            raise
        raise ParamsError(
            f"{exc}\n{PARAMS_FILE}: `dvc exp run` wrote the rejected value into the workspace's "
            f"params.yaml and removed no output; fix it, or restore the committed file with "
            f"`git checkout HEAD -- {PARAMS_FILE}` (which also drops uncommitted edits to it)"
        ) from None
    write_text(OUTPUT, CONTENT)
    print(f"check_params: {PARAMS_FILE} is valid")
    return 0


if __name__ == "__main__":
    run(main)
