"""Entry-point wrapper shared by every stage: known errors become one clear line and exit code 1."""

from __future__ import annotations

import argparse
import os
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


# The signal that asked the stage to stop (None while it runs). See docs/DESIGN.md §9.
_terminated_by: int | None = None


def _terminated(signum: int, frame: object) -> None:
    global _terminated_by
    _terminated_by = signum
    raise SystemExit(128 + signum)  # unwinds through `finally`, so temporary outputs are removed


_mask_before_fork: set[signal.Signals] = set()


def _hold_sigterm_across_fork() -> None:
    """Until the child has SIGTERM's default, a SIGTERM waits in the kernel: delivered earlier, the child's copy of
    the stage's handler would take it, and the default set next would find nothing left to act on."""
    _mask_before_fork.clear()
    _mask_before_fork.update(signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}))


def _release_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before_fork)


def _default_sigterm_in_child() -> None:
    """A forked helper (datasets.map's worker pool and its manager, DataLoader workers) dies at SIGTERM in the
    kernel, never through the stage's handler: unwinding it through Python would wait on pipes its dying parent
    no longer reads, and a helper forked while another thread held a lock never reaches Python code at all."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _release_sigterm()  # a SIGTERM sent since the fork kills it now


def run(entry: Callable[[], int]) -> None:
    """Run a stage's main(); SIGTERM (what `kill` and job schedulers send) exits cleanly like Ctrl-C."""
    signal.signal(signal.SIGTERM, _terminated)
    os.register_at_fork(
        before=_hold_sigterm_across_fork, after_in_parent=_release_sigterm, after_in_child=_default_sigterm_in_child
    )
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
    except BaseException:
        if _terminated_by is None:
            raise
        # Terminated: a library's cleanup may have replaced our SystemExit with its own error on the way out
        # (datasets.map's pool reports its killed workers); the exit still says what happened.
        print("terminated", file=sys.stderr)
        sys.exit(128 + _terminated_by)
    sys.exit(code)
