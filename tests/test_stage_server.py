"""A stage forked from the tests' preloaded interpreter (stage_server.py) gives what a fresh `python -m` gives."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO, write_params
from stage_server import run_forked
from stages.lib.allocator import TUNABLES, glibc, gpu_host


def both(
    module: str, cwds: tuple[Path, Path], *args: str, env: dict | None = None, stdin: str | None = None
) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The same command as a fresh interpreter in cwds[0] and forked in cwds[1]."""
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    fresh = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwds[0], env=env, input=stdin, capture_output=True, text=True
    )
    return fresh, run_forked(module, cwds[1], args, env, stdin)


def test_a_forked_stage_exits_prints_and_writes_as_a_fresh_process(workdir, tmp_path):
    (workdir / "data" / "external" / "chats.jsonl").write_bytes((FIXTURES / "conversations.jsonl").read_bytes())
    write_params(workdir, {"data": {"source": "data/external/chats.jsonl"}})
    twin = shutil.copytree(workdir, tmp_path / "twin")
    fresh, forked = both("stages.ingest", (workdir, twin))
    assert fresh.returncode == forked.returncode == 0, (fresh.stderr, forked.stderr)
    assert (fresh.stdout, fresh.stderr) == (forked.stdout, forked.stderr)
    written = [cwd / "data" / "raw" / "conversations.jsonl" for cwd in (workdir, twin)]
    assert b'"messages"' in written[0].read_bytes() and written[1].read_bytes() == written[0].read_bytes()

    fresh, forked = both("stages.tokenize", (workdir, twin), "--show", "abc")  # argparse's error, the stage's words
    assert fresh.returncode == forked.returncode == 1
    assert fresh.stderr == forked.stderr and fresh.stderr.startswith("error: ")


PROBE = """
import os, sys, torch
how = sys.argv[1]
if how == "report":
    print(os.getcwd(), os.environ["PROBE"], sys.argv[1:], sys.orig_argv[1:3], torch.get_num_threads())
    print(repr(sys.stdin.read()))
    sys.exit(3)
if how == "message":
    sys.exit("a message")
if how == "raise":
    raise ValueError("broken")
if how == "signal":
    os.kill(os.getpid(), 15)
"""


@pytest.mark.parametrize("how", ["report", "message", "raise", "signal"])
def test_a_forked_probe_has_the_requests_process_state_and_ends_as_a_fresh_one(tmp_path, how):
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PROBE": "set", "OMP_NUM_THREADS": "1"}
    fresh, forked = both("probe", (tmp_path, tmp_path), how, "b", env=env, stdin="typed\r\nline\n")
    assert forked.returncode == fresh.returncode == {"report": 3, "message": 1, "raise": 1, "signal": -15}[how]
    assert forked.stdout == fresh.stdout
    assert forked.stderr.strip().splitlines()[-1:] == fresh.stderr.strip().splitlines()[-1:]
    if how == "report":
        assert fresh.stdout == f"{tmp_path} set ['report', 'b'] ['-m', 'probe'] 1\n'typed\\r\\nline\\n'\n"


def test_a_module_that_does_not_exist_fails_as_a_fresh_one(tmp_path):
    fresh, forked = both("stages.no_such_stage", (tmp_path, tmp_path))
    assert fresh.returncode == 1 and forked.returncode == 1
    assert "No module named stages.no_such_stage" in fresh.stderr and "stages.no_such_stage" in forked.stderr


def test_a_run_past_its_timeout_ends_and_the_next_run_works(tmp_path):
    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(30)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert run_forked("sleeper", tmp_path, (), env, timeout=1).returncode == -14  # SIGALRM
    (tmp_path / "quick.py").write_text("print('done')\n")
    assert run_forked("quick", tmp_path, (), env).stdout == "done\n"


TRAIN_START = """
if __name__ == "__main__":  # the train stage's first lines (stages/train.py)
    from stages.lib.allocator import restart_with_allocator_tunables

    restart_with_allocator_tunables()
import os, sys
from stages.lib.precision import keep_compile_cache

keep_compile_cache()
print(os.environ.get("GLIBC_TUNABLES"), os.environ["TORCHINDUCTOR_CACHE_DIR"], "transformers.trainer" in sys.modules)
print(sys.modules["stages"].__path__[0])
"""


@pytest.mark.skipif(
    not glibc() or gpu_host() or TUNABLES in os.environ.get("GLIBC_TUNABLES", ""),
    reason="the train stage restarts with glibc's tunables on a CPU host that has not set them",
)
@pytest.mark.parametrize("tunables", [None, "glibc.malloc.arena_max=2"], ids=["restart-done", "restart-differs"])
def test_a_forked_train_stage_starts_as_the_restarted_process_it_stands_for(tmp_path, tunables):
    """The train server restarts with the stage's allocator tunables and sets its compile cache before the
    imports; a child then runs the stage without restarting it. A request with other tunables than the server's
    restarts the child: a fresh interpreter, which has not imported the Trainer."""
    for cwd in (tmp_path / "fresh", tmp_path / "forked"):
        (cwd / "stages").mkdir(parents=True)
        shutil.copytree(REPO / "stages" / "lib", cwd / "stages" / "lib")
        (cwd / "stages" / "__init__.py").write_text("")
        (cwd / "stages" / "train.py").write_text(TRAIN_START)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PYTHONPATH")}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    fresh, forked = both("stages.train", (tmp_path / "fresh", tmp_path / "forked"), env=env)
    assert fresh.returncode == forked.returncode == 0, (fresh.stderr, forked.stderr)
    (fresh_tunables, cache, fresh_preloaded), fresh_package = (line.split() for line in fresh.stdout.splitlines())
    (forked_tunables, forked_cache, preloaded), package = (line.split() for line in forked.stdout.splitlines())
    assert forked_tunables == fresh_tunables != "None" and forked_cache == cache
    assert fresh_preloaded == "False" and preloaded == ("False" if tunables else "True")
    assert fresh_package == [str(tmp_path / "fresh" / "stages")] and package == [str(tmp_path / "forked" / "stages")]
