"""Stage processes for tests, forked from an interpreter that has imported torch and transformers once.

A stage run costs a 2-core machine 2 to 5 s of imports before it does a second of work; the suite runs about a
hundred of them outside `dvc repro`. `run_stage` (conftest.py) sends each to a server that one pytest worker
starts once: it imports the libraries, then forks one child per request. The child is a process of its own (its
own exit code, stdout, stderr, working directory, environment and argv) that runs the stage as `python -m`
would, from its `if __name__ == "__main__"` block; only the library imports were done before the fork. Its
`sys.orig_argv` is the command it stands for, so a stage that re-executes itself runs that command.

What this cannot show, the tests that run stages under `dvc repro` or with `subprocess` show: a stage's start in
a fresh interpreter (import-time warnings, import order) and anything set before the imports (the train stage's
allocator restart and compile cache: stages/train.py runs as a fresh process, never from here).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Imported before the fork: what every stage but `train` spends its start on. Nothing of the project's.
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "datasets", "peft", "gguf", "safetensors.torch")

SERVER = r"""
import importlib, json, os, runpy, signal, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
import transformers
transformers.AutoModelForCausalLM, transformers.AutoTokenizer  # resolve the lazy names once
base_path = [p for p in sys.path if p not in ("", os.getcwd())]
responses = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        break
    _, status = os.waitpid(pid, 0)
    responses.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    responses.flush()
else:
    sys.exit(0)
# The child: the request's process, from here to its exit.
responses.close()
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
os.dup2(os.open(request["stdin"] or os.devnull, os.O_RDONLY), 0)
sys.stdin = open(0, closefd=False)
for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
pythonpath = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
sys.path[:] = [request["cwd"], *pythonpath, *base_path]
sys.argv = [request["module"], *request["args"]]
sys.orig_argv = [sys.executable, "-m", request["module"], *request["args"]]
if request["timeout"]:
    signal.alarm(request["timeout"])  # SIGALRM's default ends the process, as subprocess.run's timeout would
runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
"""


class StageServer:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": ""}
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, *PRELOAD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=tempfile.gettempdir(),
            text=True,
        )

    def run(
        self, module: str, cwd: Path, args: tuple[str, ...], env: dict[str, str], stdin: str | None, timeout: int
    ) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as scratch:
            stdout, stderr, typed = Path(scratch) / "stdout", Path(scratch) / "stderr", Path(scratch) / "stdin"
            if stdin is not None:
                typed.write_text(stdin)
            request = {
                "module": module,
                "cwd": str(cwd),
                "args": list(args),
                "env": env,
                "stdin": str(typed) if stdin is not None else None,
                "stdout": str(stdout),
                "stderr": str(stderr),
                "timeout": timeout,
            }
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
            assert answer, "the stage server exited"
            command = [sys.executable, "-m", module, *args]
            return subprocess.CompletedProcess(
                command, json.loads(answer), stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
            )

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


_server: StageServer | None = None


def run_forked(
    module: str,
    cwd: Path,
    args: tuple[str, ...],
    env: dict[str, str],
    stdin: str | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """`python -m module *args` in `cwd` with `env` (and `stdin` typed in), forked from this worker's server
    (started on first use); ended by SIGALRM after `timeout` seconds."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = StageServer()
        atexit.register(_server.close)
    return _server.run(module, cwd, args, env, stdin, timeout)
