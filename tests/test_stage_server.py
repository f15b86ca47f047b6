"""A stage forked from the tests' preloaded interpreter (stage_server.py) gives what a fresh `python -m` gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, REPO, write_params
from stage_server import run_forked


def both(module: str, cwd: Path, *args: str, stdin: str | None = None) -> tuple[subprocess.CompletedProcess, ...]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    fresh = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True
    )
    return fresh, run_forked(module, cwd, args, env, stdin)


def test_a_forked_stage_exits_prints_and_writes_as_a_fresh_process(workdir):
    (workdir / "data" / "external" / "chats.jsonl").write_bytes((FIXTURES / "conversations.jsonl").read_bytes())
    write_params(workdir, {"data": {"source": "data/external/chats.jsonl"}})
    fresh, forked = both("stages.ingest", workdir)
    assert fresh.returncode == forked.returncode == 0, (fresh.stderr, forked.stderr)
    assert (fresh.stdout, fresh.stderr) == (forked.stdout, forked.stderr)
    written = (workdir / "data" / "raw" / "conversations.jsonl").read_bytes()
    assert written and b'"messages"' in written

    fresh, forked = both("stages.tokenize", workdir, "--show", "abc")  # argparse's error, in the stage's words
    assert fresh.returncode == forked.returncode == 1
    assert fresh.stderr == forked.stderr and fresh.stderr.startswith("error: ")


def test_a_forked_process_has_the_requests_cwd_environment_argv_and_stdin(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        "print(os.getcwd(), os.environ['PROBE'], sys.argv[1:], sys.orig_argv[1:3], sys.stdin.read().strip())\n"
        "sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PROBE": "set"}
    forked = run_forked("probe", tmp_path, ("a", "b"), env, "typed")
    assert forked.returncode == 3
    assert forked.stdout.strip() == f"{tmp_path} set ['a', 'b'] ['-m', 'probe'] typed"
