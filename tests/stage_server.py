"""Stage processes for tests, forked from an interpreter that has imported torch and transformers once.

A stage run costs a 2-core machine 2 to 5 s of imports before it does a second of work; the suite runs about a
hundred of them outside `dvc repro`. `run_stage` (conftest.py) sends each to a server that one pytest worker
starts once: it imports the libraries, then forks one child per request. The child is a process of its own (its
own exit code, stdout, stderr, stdin, working directory, environment, argv and torch thread count) that runs the
stage as `python -m` would, from its `if __name__ == "__main__"` block. Its `sys.orig_argv` is the command it
stands for, so a stage that re-executes itself runs that command.

What a forked run cannot show, and the tests that start fresh interpreters show (`dvc repro`, `subprocess`):
- anything at a library's import: its warnings, and settings it reads from the environment then (the server's
  environment is the worker's once conftest.py has set its defaults, without the thread variables);
- what differs between interpreters: every forked run has the server's string-hash seed, so a determinism test
  runs its second run fresh (`run_stage(..., fresh=True)`);
- what a run sets up before its imports differently from the server. The train stage's own set-up (its restart
  with glibc's allocator tunables, inductor's cache directory) is done by its server before the imports, as the
  stage does it, and its children carry the restart's variables. A request that sets what the libraries read
  at import otherwise (READ_AT_IMPORT) runs in a fresh interpreter, and a train request with other tunables
  re-executes its child as one.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Imported before the fork: what a stage spends its start on. Nothing of the project's: each test's repository has
# its own copy of stages/.
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "datasets", "peft", "gguf", "safetensors.torch")
TRAIN_PRELOAD = (*PRELOAD, "transformers.trainer", "transformers.integrations.integration_utils", "dvclive")
REPO = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Read when the libraries are imported (inductor's compiler; the hub's cache, which defaults under HOME, and its
# offline switches): a request that sets one otherwise than the server's environment runs in a fresh interpreter.
READ_AT_IMPORT = ("HOME", "CXX", "CC", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# The server's environment: the worker's when conftest.py has set its defaults, before any test can change it.
SERVER_ENVIRONMENT: dict[str, str] = {}


def keep_environment() -> None:
    """Take this process's environment, without the thread variables, as the server's."""
    SERVER_ENVIRONMENT.clear()
    SERVER_ENVIRONMENT.update({k: v for k, v in os.environ.items() if k not in (*THREAD_VARIABLES, "PYTHONPATH")})


SERVER = r"""
import ctypes, gc, importlib, io, json, os, runpy, signal, sys
setup = json.loads(sys.argv[1])
restarted = None
if setup["train_repo"]:  # what `python -m stages.train` does before its imports (stages/train.py), done once here
    sys.path.insert(0, setup["train_repo"])
    from stages.lib.allocator import RESTARTED, restart_with_allocator_tunables, with_allocator_tunables
    restart_with_allocator_tunables()  # may re-execute this server, before it has read or written its pipes
    restarted = {k: os.environ[k] for k in ("GLIBC_TUNABLES", RESTARTED) if RESTARTED in os.environ}
responses = os.fdopen(os.dup(1), "w")  # before the imports, so that nothing they print reads as an answer
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.close(devnull)
if setup["train_repo"]:
    from stages.lib.precision import keep_compile_cache
    keep_compile_cache()
    del sys.path[0]
    for name in [m for m in sys.modules if m == "stages" or m.startswith("stages.")]:
        del sys.modules[name]  # each request imports its own repository's stages
for name in setup["preload"]:
    importlib.import_module(name)
import torch, transformers
transformers.AutoModelForCausalLM, transformers.AutoTokenizer  # resolve the lazy names once
if setup["train_repo"]:
    transformers.Trainer, transformers.TrainingArguments, transformers.EarlyStoppingCallback
default_threads = torch.get_num_threads()
base_path = list(sys.path)
libc = ctypes.CDLL(None)
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)  # C stdio buffers too: a child would write them out again
    # The preloaded objects out of the collector's sight: a child's collections and its exit would otherwise touch
    # every one of them, copying the server's pages into the child (~1 s of CPU a run).
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        break
    responses.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")
    responses.flush()
    _, status = os.waitpid(pid, 0)
    responses.write(json.dumps({"id": request["id"], "code": os.waitstatus_to_exitcode(status)}) + "\n")
    responses.flush()
else:
    sys.exit(0)
# The child: the request's process, from here to its exit.
responses.close()
for fd, path, flags in (
    (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    (0, request["stdin"] or os.devnull, os.O_RDONLY),
):
    opened = os.open(path, flags, 0o644)
    os.dup2(opened, fd)
    os.close(opened)
stdin = sys.stdin
sys.stdin = sys.__stdin__ = io.TextIOWrapper(
    io.open(0, "rb", closefd=False), encoding=stdin.encoding, errors=stdin.errors, newline="\n"
)
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
if restarted:
    if with_allocator_tunables(os.environ).get("GLIBC_TUNABLES") != restarted["GLIBC_TUNABLES"]:
        # Other tunables than the server started with: a fresh interpreter, as the request stands for.
        os.execve(sys.executable, [sys.executable, "-m", request["module"], *request["args"]], os.environ)
    os.environ.update(restarted)  # as the train stage's restart leaves them
threads = request["env"].get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else default_threads)
pythonpath = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
sys.path[:] = [os.getcwd(), *pythonpath, *base_path]
sys.argv = [request["module"], *request["args"]]
sys.orig_argv = [sys.executable, "-m", request["module"], *request["args"]]
if request["timeout"]:
    signal.alarm(request["timeout"])  # SIGALRM's default ends the process, as subprocess.run's timeout would
runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
"""


class StageServer:
    def __init__(self, train: bool) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="stage-server-", suffix=".log", delete=False)
        self.requests, self.pending = 0, b""
        setup = {"preload": TRAIN_PRELOAD if train else PRELOAD, "train_repo": str(REPO) if train else None}
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-c", SERVER, json.dumps(setup)],  # -P: no working directory on sys.path
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=SERVER_ENVIRONMENT,
            cwd=tempfile.gettempdir(),
            bufsize=0,
        )

    def answer(self, request_id: int, seconds: float) -> dict:
        """The server's next answer line, read from the raw pipe (a buffered reader would hide a line that
        arrived with the one before from `select`)."""
        assert self.process.stdout is not None
        pipe = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            if not select.select([pipe], [], [], seconds)[0]:
                raise TimeoutError(f"the stage server gave no answer in {seconds:.0f} s")
            chunk = os.read(pipe, 65536)
            if not chunk:
                raise RuntimeError(f"the stage server exited: {Path(self.log.name).read_text()[-3000:]}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        answer = json.loads(line)
        assert answer["id"] == request_id, (answer, request_id)
        return answer

    def run(
        self, module: str, cwd: Path, args: tuple[str, ...], env: dict[str, str], stdin: str | None, timeout: int
    ) -> subprocess.CompletedProcess:
        self.requests += 1
        with tempfile.TemporaryDirectory() as scratch:
            stdout, stderr, typed = Path(scratch) / "stdout", Path(scratch) / "stderr", Path(scratch) / "stdin"
            if stdin is not None:
                typed.write_text(stdin)
            request = {
                "id": self.requests,
                "module": module,
                "cwd": str(cwd),
                "args": list(args),
                "env": env,
                "stdin": str(typed) if stdin is not None else None,
                "stdout": str(stdout),
                "stderr": str(stderr),
                "timeout": timeout,
            }
            assert self.process.stdin is not None
            message = json.dumps(request).encode() + b"\n"
            while message:  # a raw pipe may take part of a write
                message = message[self.process.stdin.write(message) :]
            child = self.answer(self.requests, 60)["pid"]
            try:  # the child's alarm ends it at `timeout`; this covers a stage that cancels the alarm
                code = self.answer(self.requests, timeout + 60)["code"]
            except TimeoutError:
                os.kill(child, signal.SIGKILL)
                raise
            command = [sys.executable, "-m", module, *args]
            return subprocess.CompletedProcess(
                command, code, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
            )

    def close(self) -> None:
        if self.process.poll() is None:
            if self.process.stdin:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        Path(self.log.name).unlink(missing_ok=True)


# One server for the train stage (started with the allocator tunables its restart sets), one for the others.
_servers: dict[bool, StageServer] = {}


def run_forked(
    module: str,
    cwd: Path,
    args: tuple[str, ...],
    env: dict[str, str],
    stdin: str | None = None,
    timeout: int = 600,
    trains: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m module *args` in `cwd` with `env` (and `stdin` typed in), forked from this worker's server
    (started on first use; the train stage's server for `stages.train` and a module that `trains` with its
    Trainer); ended by SIGALRM (return code -14) after `timeout` seconds. A fresh interpreter instead when `env`
    sets a variable of READ_AT_IMPORT otherwise than the server's environment."""
    if any(key in env and env[key] != SERVER_ENVIRONMENT.get(key) for key in READ_AT_IMPORT):
        command = [sys.executable, "-m", module, *args]
        return subprocess.run(command, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
    train = trains or module == "stages.train"
    server = _servers.get(train)
    if server is None or server.process.poll() is not None:
        server = _servers[train] = StageServer(train)
        atexit.register(server.close)
    try:
        return server.run(module, cwd, args, env, stdin, timeout)
    except BaseException:  # an answer may still be on its way: the next run starts a new server
        server.process.kill()
        del _servers[train]
        raise
