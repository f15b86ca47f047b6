"""Where a stage's processes run: torchrun's rendezvous when a training job spans several machines, and this
experiment's share of the machine when several experiments run at once (`dvc queue start -j N`).

    python -m stages.lib.launch --nproc_per_node P -m stages.train      (what `python -m stages.train` starts)

runs `torchrun --standalone --nproc_per_node P -m stages.train` on one machine (the default), or, on node R of a
job of N machines,

    torchrun --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT --nproc_per_node P -m stages.train

N is `train.nodes`, or SKYPILOT_NUM_NODES / NNODES when the environment sets one; R is SKYPILOT_NODE_RANK /
NODE_RANK; HOST is MASTER_ADDR, else the first line of SKYPILOT_NODE_IPS (SkyPilot's head node); PORT is
MASTER_PORT, else 29500. Every node runs the same command on the same inputs; the job's first process writes the
outputs (docs/DESIGN.md §8).

Slots. DVC runs queued experiments side by side without assigning devices, so `N` trainings on one machine each
take every core and every GPU and fight over them. With STAGES_SLOTS=N in the environment of
`dvc queue start -j N`, every model-running stage first claims one of N slots: an exclusive lock on
`slot-K.lock` under STAGES_SLOTS_DIR (default ~/.cache/stages/slots), held until the stage's last process exits
(a killed run frees it: the kernel drops the lock). Slot K gets the K-th of N equal ranges of this machine's
cores (CPU affinity; threads per process = its cores / processes) and the K-th of N equal groups of its GPUs
(CUDA_VISIBLE_DEVICES; with fewer GPUs than slots, GPU K mod count). A stage that finds every slot taken waits.
Without STAGES_SLOTS nothing changes. Child processes inherit the slot (STAGES_SLOT) instead of claiming another.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, MutableMapping

from stages.lib.errors import InputError

SLOTS = "STAGES_SLOTS"
SLOTS_DIR = "STAGES_SLOTS_DIR"
HELD = "STAGES_SLOT"  # "K/N": set for the children of a process that holds slot K of N
DEFAULT_PORT = 29500
_held: list[int] = []  # the open lock files: the lock lasts as long as the descriptor


@dataclass(frozen=True)
class Slot:
    index: int
    count: int
    cpus: tuple[int, ...]
    threads: int
    gpus: tuple[str, ...] | None  # None: no GPU on this machine

    def as_dict(self) -> dict:
        return asdict(self)


def slot_count(env: Mapping[str, str]) -> int | None:
    """STAGES_SLOTS as a positive count, None when unset; a one-line error otherwise."""
    value = env.get(SLOTS, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InputError(
            f"{SLOTS}={value!r}: expected the number of experiments run at once (dvc queue start -j N), e.g. {SLOTS}=2"
        )
    return int(value)


def visible_gpus(env: Mapping[str, str]) -> tuple[str, ...] | None:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES, else those nvidia-smi lists), None when there are none.
    Read without importing torch: CUDA must not be initialised before CUDA_VISIBLE_DEVICES is narrowed."""
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        listed = tuple(gpu.strip() for gpu in env["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip() not in ("", "-1"))
        return listed or None
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        lines = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return tuple(str(i) for i, line in enumerate(line for line in lines if line.startswith("GPU "))) or None


def share(index: int, count: int, processes: int, cpus: tuple[int, ...], gpus: tuple[str, ...] | None) -> Slot:
    """Slot `index` of `count`: its contiguous range of `cpus` and its group of `gpus`."""
    per = max(len(cpus) // count, 1)
    mine = cpus[(index * per) % len(cpus) :][:per] or cpus[:per]
    group = None
    if gpus:
        if len(gpus) >= count:
            size = len(gpus) // count
            group = gpus[index * size : (index + 1) * size]
        else:
            group = (gpus[index % len(gpus)],)
    return Slot(index, count, tuple(mine), max(len(mine) // max(processes, 1), 1), group)


def _lock_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get(SLOTS_DIR) or Path.home() / ".cache" / "stages" / "slots")


def _claim_index(count: int, env: Mapping[str, str], poll_s: float = 0.2) -> int:
    """Lock the first free slot file, waiting while all are taken."""
    directory = _lock_dir(env)
    directory.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(count):
            fd = os.open(directory / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.set_inheritable(fd, True)  # an exec'd launcher (torchrun) keeps holding it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {os.getcwd()}\n".encode())
            _held.append(fd)
            return index
        if not waited:
            print(f"waiting for a free slot: all {count} under {directory} are taken", file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll_s)


def use_slot(processes: int = 1, env: MutableMapping[str, str] | None = None) -> Slot | None:
    """Claim this experiment's slot (or take the one a parent process holds) and confine this process and its
    children to it: CPU affinity, OMP/MKL thread counts, CUDA_VISIBLE_DEVICES. Call it before torch initialises
    CUDA. Returns the slot for the runtime record, None without STAGES_SLOTS."""
    env = os.environ if env is None else env
    count = slot_count(env)
    if count is None:
        return None
    index, _, of = env.get(HELD, "").partition("/")
    has_affinity = hasattr(os, "sched_getaffinity")
    affinity = tuple(sorted(os.sched_getaffinity(0))) if has_affinity else tuple(range(os.cpu_count() or 1))
    if of == str(count):  # a parent holds the slot and confined this process already
        gpus = env.get("CUDA_VISIBLE_DEVICES")
        threads = int(env.get("OMP_NUM_THREADS") or 1)
        return Slot(int(index), count, affinity, threads, tuple(gpus.split(",")) if gpus else None)
    if int(env.get("LOCAL_WORLD_SIZE", "1")) > 1:
        return None  # a torchrun worker started without stages.lib.launch: a slot per process would split one job
    slot = share(_claim_index(count, env), count, processes, affinity, visible_gpus(env))
    if has_affinity:
        os.sched_setaffinity(0, slot.cpus)
    env[HELD] = f"{slot.index}/{count}"
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(slot.threads)
    if slot.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(slot.threads)
    return slot


@dataclass(frozen=True)
class Rendezvous:
    nodes: int
    rank: int | None
    endpoint: str | None

    def torchrun_args(self) -> list[str]:
        if self.nodes == 1:
            return ["--standalone"]
        rank = [] if self.rank is None else ["--node-rank", str(self.rank)]
        return ["--nnodes", str(self.nodes), *rank, "--rdzv-backend", "c10d", "--rdzv-endpoint", str(self.endpoint)]


def _integer(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise InputError(f"{name}={value!r}: expected a whole number")
            return name, int(value)
    return None


def rendezvous(nodes_param: int, env: Mapping[str, str]) -> Rendezvous:
    """The job's shape from params and the environment (module doc); a one-line error when a multi-node job
    lacks what its nodes need to find each other."""
    from_env = _integer(env, ("SKYPILOT_NUM_NODES", "NNODES"))
    source, nodes = from_env if from_env else ("train.nodes", nodes_param)
    if nodes < 1:
        raise InputError(f"{source}: {nodes} nodes; expected 1 or more")
    if nodes == 1:
        return Rendezvous(1, None, None)
    ranked = _integer(env, ("SKYPILOT_NODE_RANK", "NODE_RANK"))
    rank = ranked[1] if ranked else None
    if rank is not None and rank >= nodes:
        raise InputError(f"{ranked[0]}={rank}: a node rank must be below the node count ({source}: {nodes})")
    host = env.get("MASTER_ADDR", "").strip()
    if not host and env.get("SKYPILOT_NODE_IPS", "").strip():
        host = env["SKYPILOT_NODE_IPS"].split()[0]
    if not host:
        raise InputError(
            f"{source}: {nodes} nodes, but no rendezvous host: set MASTER_ADDR (the first node's address) "
            f"or run under SkyPilot (SKYPILOT_NODE_IPS)"
        )
    port = env.get("MASTER_PORT", "").strip() or str(DEFAULT_PORT)
    if not port.isdigit():
        raise InputError(f"MASTER_PORT={port!r}: expected a port number")
    return Rendezvous(nodes, rank, f"{host}:{port}")


def main(argv: list[str] | None = None) -> int:
    """Claim the slot, then exec torchrun with the rendezvous arguments before `argv` (torchrun's own)."""
    from stages.lib.params import load_params

    argv = sys.argv[1:] if argv is None else argv
    shape = rendezvous(load_params().train.nodes, os.environ)
    per_node = ("--nproc_per_node", "--nproc-per-node")
    counts = (argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in per_node)
    processes = next((int(count) for count in counts if count.isdigit()), 1)
    use_slot(processes)
    command = ["torchrun", *shape.torchrun_args(), *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, os.environ)
    return 1  # not reached


if __name__ == "__main__":
    from stages.lib.cli import run

    run(main)
