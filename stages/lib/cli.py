"""Entry-point wrapper shared by every stage: known errors become one clear line and exit code 1."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

from stages.lib.atomic import recover
from stages.lib.errors import InputError
from stages.lib.params import ParamsError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (`--max-new-tokens abc`, an unknown option) are one `error:` line like any other
    bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`, so temporary outputs are removed


def run(entry: Callable[[], int]) -> None:
    """Run a stage's main(); SIGTERM (what `kill` and job schedulers send) exits cleanly like Ctrl-C."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        recover()  # outputs a killed stage left half published: finished before anything reads them
        code = entry()
    except (InputError, ParamsError) as exc:
        for line in str(exc).splitlines():  # several invalid params: one line each
            print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: `finally` blocks removed what was staged; no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
