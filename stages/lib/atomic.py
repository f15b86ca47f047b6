"""Atomic outputs: each output is written to a temporary sibling and renamed into place, and the outputs of one
stage are published together (docs/DESIGN.md §9).

One file replaces its target by a single rename. Several outputs, or a directory (which takes two renames:
the old one aside, the new one in), are published through a journal: every output is complete in its
temporary sibling, the journal listing the renames is renamed into place, the renames run, the journal is
deleted. A process killed during the renames leaves its journal, and the next stage or tool completes them
(`recover`, run by stages/lib/cli.py and before anything is staged): a reader that starts through this project
sees the whole old set or the whole new set, never a mix. A process killed before its journal existed leaves
only temporary siblings `.<name>.<pid>-<random>.tmp`, git-ignored and removed the next time their target is
written. An output that cannot be written (read-only directory, full disk, file-size limit) is one line naming
it, and the old outputs stay as they were.

    with publish_together(files=[METRICS, RUNTIME], dirs=[OUTPUT]) as out:
        write_model(out[OUTPUT])                  # out[target]: where to write it
        out.write_json(METRICS, summary)
    write_json_files({EVAL: results, BY_DEPTH: depth})   # several JSON files, all or none
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from stages.lib.errors import InputError

JOURNAL_GLOB = ".publish.*.journal"  # in the working directory (the repository root for stages and tools)
_WRITE_ERRNOS = {errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_ADVICE = {
    errno.EFBIG: "the file-size limit (ulimit -f) is below this output's size; raise it",
    errno.ENOSPC: "the disk is full; free space",
    errno.EDQUOT: "the disk quota is exhausted; free space",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "not writable; check its permissions and those of its directory",
    errno.EPERM: "not writable; check its permissions and those of its directory",
    errno.ENOTDIR: "a file stands where a directory is needed; move it away",
    errno.EEXIST: "a file stands where a directory is needed; move it away",
    errno.EISDIR: "a directory stands where a file is needed; move it away",
}


class OutputError(InputError):
    """An output that cannot be written: the message names the path, the reason and what to do."""


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = _ADVICE.get(exc.errno, "check the path and the disk")
    return OutputError(f"{path}: cannot write ({reason}); {advice}; the previous outputs are unchanged")


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner(name: str, prefix: str) -> int | None:
    """The pid in `<prefix><pid>-<random>.tmp` or `.publish.<pid>.journal`; None when the name holds none."""
    middle = name[len(prefix) :].split("-", 1)[0].split(".", 1)[0]
    return int(middle) if middle.isdigit() else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _apply(entry: Mapping[str, str]) -> None:
    """One journal entry: the staged output onto its target (the old target aside first when a plain replace
    cannot take its place). Idempotent: a rerun after a kill at any point finishes the entry."""
    staged, target, old = Path(entry["staged"]), Path(entry["target"]), Path(entry["old"])
    if not (staged.exists() or staged.is_symlink()):
        return  # already in place
    if not target.is_symlink() and (target.is_dir() or (staged.is_dir() and target.exists())):
        os.rename(target, old)
    os.replace(staged, target)


def recover(root: Path | str = ".") -> int:
    """Finish the publications of killed processes (their journals in `root`); returns how many."""
    finished = 0
    for partial in Path(root).glob(f"{JOURNAL_GLOB}.*.tmp"):  # a journal not yet complete: nothing was renamed
        pid = _owner(partial.name, ".publish.")
        if pid is None or not _alive(pid):
            _remove(partial)
    for journal in sorted(Path(root).glob(JOURNAL_GLOB)):
        pid = _owner(journal.name, ".publish.")
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # publishing right now
        try:
            handle = journal.open("r", encoding="utf-8")
        except FileNotFoundError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another process is finishing it
            if not journal.exists():
                continue
            try:
                entries = json.load(handle)
            except ValueError:
                raise OutputError(
                    f"{journal}: an unreadable publication journal; check the outputs it names, then delete it"
                ) from None
            for entry in entries:
                _apply(entry)
            journal.unlink()
        for entry in entries:
            shutil.rmtree(entry["tmp"], ignore_errors=True)
        finished += 1
    return finished


class Outputs:
    """A stage's outputs staged beside their targets, published together by `publish_together`."""

    def __init__(self) -> None:
        self._tmp: dict[Path, Path] = {}  # target -> its temporary sibling directory

    def stage(self, target: Path | str, is_dir: bool = False) -> Path:
        """Where to write `target` (created now: an unwritable place fails before any work)."""
        target = Path(target)
        if target in self._tmp:
            return self[target]
        prefix = f".{target.name}."
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            for stale in target.parent.glob(f"{prefix}*.tmp"):  # left by a process killed before it published
                pid = _owner(stale.name, prefix)
                if pid is None or not _alive(pid):
                    _remove(stale)
            tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", suffix=".tmp", dir=target.parent))
        except OSError as exc:
            raise _output_error(target, exc) from None
        self._tmp[target] = tmp
        if is_dir:
            (tmp / target.name).mkdir()
        return tmp / target.name

    def __getitem__(self, target: Path | str) -> Path:
        return self._tmp[Path(target)] / Path(target).name

    def write_text(self, target: Path | str, text: str) -> None:
        self.stage(target).write_text(text, encoding="utf-8")

    def write_json(self, target: Path | str, obj: Any) -> None:
        self.write_text(target, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def public(self, path: Path | str) -> Path:
        """A staged path as the path it will be published at (for messages)."""
        path = Path(path)
        for target, tmp in self._tmp.items():
            with contextlib.suppress(ValueError):
                return target / path.relative_to(tmp / target.name)
        return path

    def last_written(self) -> Path | None:
        """The staged file written most recently: the one a write error without a file name was writing."""
        files = [p for tmp in self._tmp.values() for p in tmp.rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None

    def error(self, exc: OSError) -> OutputError | None:
        """A write error as one line naming the output; None for an error that is not about an output."""
        named = Path(os.fsdecode(exc.filename)) if exc.filename is not None else None
        if named is None and exc.errno is None and " written" in str(exc):  # numpy's short write (tofile): no errno
            staged = self.last_written()
            if staged is None:
                return None
            soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
            limited = soft != resource.RLIM_INFINITY and staged.stat().st_size >= soft
            code = errno.EFBIG if limited else errno.ENOSPC
            exc = OSError(code, os.strerror(code), str(staged))
            named = staged
        if named is None and exc.errno in _WRITE_ERRNOS:
            named = self.last_written()
        where = named.absolute() if named is not None else None
        tmps = [tmp.absolute() for tmp in self._tmp.values()]
        staged_here = where is not None and any(tmp == where or tmp in where.parents for tmp in tmps)
        if named is None or not (exc.errno in _WRITE_ERRNOS or staged_here):
            return None
        return _output_error(self.public(named), exc)

    def publish(self) -> None:
        entries = [
            {
                "staged": str((tmp / target.name).absolute()),
                "target": str(target.absolute()),
                "old": str((tmp / f"{target.name}.previous").absolute()),
                "tmp": str(tmp.absolute()),
            }
            for target, tmp in self._tmp.items()
        ]
        if len(entries) == 1 and not Path(entries[0]["target"]).is_dir():
            _apply(entries[0])  # one rename: atomic by itself
            return
        journal = Path(f".publish.{os.getpid()}.journal")
        try:
            handle = tempfile.NamedTemporaryFile(
                "w", dir=".", prefix=f"{journal.name}.", suffix=".tmp", delete=False, encoding="utf-8"
            )
        except OSError as exc:
            raise _output_error(journal.absolute(), exc) from None
        with handle:
            try:
                json.dump(entries, handle)
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:
                os.unlink(handle.name)
                raise _output_error(journal.absolute(), exc) from None
            fcntl.flock(handle, fcntl.LOCK_EX)  # held until the renames are done: a concurrent `recover` skips it
            os.replace(handle.name, journal)
            try:
                for entry in entries:
                    _apply(entry)
            except BaseException:
                self._tmp = {}  # the journal keeps what is staged: the next `recover` finishes the renames
                raise
            journal.unlink()

    def discard(self) -> None:
        for tmp in self._tmp.values():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def publish_together(files: Iterable[Path | str] = (), dirs: Iterable[Path | str] = ()) -> Iterator[Outputs]:
    """Stage `files` and `dirs` (more with `out.stage(...)`), yield; on success publish them all at once.

    Nothing is published when the block raises. A write error (to an output, or a full disk or file-size
    limit anywhere in the block) becomes an OutputError naming the output."""
    outputs = Outputs()
    try:
        recover()
        for target in files:
            outputs.stage(target)
        for target in dirs:
            outputs.stage(target, is_dir=True)
        yield outputs
        outputs.publish()
    except OSError as exc:
        error = outputs.error(exc)
        if error is None:
            raise
        raise error from None
    finally:
        outputs.discard()


@contextlib.contextmanager
def atomic_path(target: Path | str, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success move it onto `target`."""
    with publish_together(dirs=[target] if is_dir else [], files=[] if is_dir else [target]) as outputs:
        yield outputs[target]


def write_json_files(objects: Mapping[Path | str, Any]) -> None:
    """Several JSON outputs (path -> object), published together: all of them or none."""
    with publish_together(files=objects) as outputs:
        for target, obj in objects.items():
            outputs.write_json(target, obj)


def write_text(target: Path | str, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: Path | str, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(target: Path | str, rows: Iterable[Any]) -> int:
    count = 0
    with atomic_path(target) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    return count
