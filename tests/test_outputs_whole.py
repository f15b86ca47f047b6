"""Whole-stage outputs (stages/lib/atomic.py): a real SIGKILL at every rename of a publication, a real file-size
limit and a file where a directory belongs; the next reader sees the whole old set or the whole new set."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

TARGETS = ("metrics/a.json", "metrics/runtime/b.json", "models/x")

# Publishes three outputs (two files, a directory) through stages.lib.cli.run; KILL_AT=k kills the process with a
# real SIGKILL at its k-th rename (os.rename/os.replace), FSIZE=n limits the size of any file it writes.
DRIVER = textwrap.dedent("""
    import os, resource, signal, sys
    sys.path.insert(0, {repo!r})
    kill_at, calls = int(os.environ.get("KILL_AT", "0")), [0]
    for name in ("rename", "replace"):
        def wrapped(src, dst, *, _real=getattr(os, name), **kw):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(src, dst, **kw)
        setattr(os, name, wrapped)
    if os.environ.get("FSIZE"):
        limit = int(os.environ["FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from stages.lib.atomic import publish_together
    from stages.lib.cli import run

    def main():
        value = sys.argv[1]
        with publish_together(files=["metrics/a.json", "metrics/runtime/b.json"], dirs=["models/x"]) as out:
            out.write_json("metrics/a.json", {{"v": value}})
            out.write_json("metrics/runtime/b.json", {{"v": value}})
            (out["models/x"] / "weights").write_text(value * int(os.environ.get("REPEAT", "1")))
        print("renames", calls[0])
        return 0

    run(main)
""").format(repo=str(REPO))


def publish(work: Path, value: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(work / "driver.py"), value], cwd=work, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def state(work: Path) -> tuple[str | None, ...]:
    """Each output's value (None: missing)."""
    values = []
    for target in TARGETS:
        path = work / target
        if path.is_dir():
            values.append((path / "weights").read_text() if (path / "weights").exists() else None)
        else:
            values.append(json.loads(path.read_text())["v"] if path.exists() else None)
    return tuple(values)


def read_through_recovery(work: Path) -> tuple[str | None, ...]:
    """What the next stage or tool reads: stages/lib/cli.py finishes a killed publication first."""
    reader = ("import sys; sys.path.insert(0, %r)\nfrom stages.lib.cli import run\nrun(lambda: 0)\n" % str(REPO))
    result = subprocess.run([sys.executable, "-c", reader], cwd=work, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return state(work)


def leftovers(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in work.rglob(".*") if p.name.endswith((".tmp", ".journal")))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "driver.py").write_text(DRIVER)
    result = publish(tmp_path, "old")
    assert result.returncode == 0, result.stderr
    assert state(tmp_path) == ("old",) * 3
    return tmp_path


def test_a_kill_at_any_rename_leaves_the_whole_old_or_the_whole_new_set(work):
    renames = int(publish(work, "old").stdout.split()[-1])  # the journal, then each output (a directory takes two)
    assert renames == 5
    seen = set()
    for kill_at in range(1, renames + 1):
        result = publish(work, "new", KILL_AT=str(kill_at))
        assert result.returncode == -9, (kill_at, result.stderr)
        seen.add(state(work))  # a reader that bypasses the project may see a mix until the next run...
        after = read_through_recovery(work)
        assert after in {("old",) * 3, ("new",) * 3}, (kill_at, after)  # ...the next stage or tool never does
        assert (after == ("new",) * 3) == (kill_at > 1), kill_at  # once the journal exists, the new set wins
        assert publish(work, "old").returncode == 0  # the next run cleans what the killed one left
        assert state(work) == ("old",) * 3 and leftovers(work) == [], (kill_at, leftovers(work))
    assert len(seen) > 2  # the kills did land between the renames


def test_what_a_killed_stage_leaves_is_git_ignored_and_cleaned_by_the_next_run(work):
    result = publish(work, "new", KILL_AT="3")
    assert result.returncode == -9
    left = leftovers(work)
    assert any(name.startswith("models/.x.") for name in left) and any(".journal" in name for name in left), left
    shutil.copy(REPO / ".gitignore", work / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    ignored = subprocess.run(["git", "check-ignore", *left], cwd=work, capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == left
    assert publish(work, "newer").returncode == 0
    assert state(work) == ("newer",) * 3 and leftovers(work) == []


def test_a_file_size_limit_is_one_line_naming_the_output_and_keeps_the_old_set(work):
    result = publish(work, "new", FSIZE="4096", REPEAT="10000")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: models/x/weights: cannot write (File too large); the file-size limit (ulimit -f) is below this output's "
        "size; raise it; the previous outputs are unchanged"]
    assert state(work) == ("old",) * 3 and leftovers(work) == []


def test_a_file_where_a_directory_belongs_is_one_line_before_any_work(work):
    shutil.rmtree(work / "metrics" / "runtime")
    (work / "metrics" / "runtime").write_text("not a directory")
    result = publish(work, "new")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: metrics/runtime/b.json: cannot write ("), lines
    assert lines[0].endswith("a file stands where a directory is needed; move it away; the previous outputs are unchanged")
    assert (work / "metrics" / "a.json").read_text() and state(work)[0] == "old" and state(work)[2] == "old"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_one_line_naming_it(work):
    (work / "models").chmod(0o555)
    try:
        result = publish(work, "new")
    finally:
        (work / "models").chmod(0o755)
    assert result.returncode == 1 and result.stderr.startswith("error: models/x: cannot write (Permission denied)")
    assert state(work) == ("old",) * 3
