"""Whole-stage outputs (stages/lib/atomic.py): a real SIGKILL at every rename of a publication, a real file-size
limit and a file where a directory belongs; the next reader sees the whole old set or the whole new set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
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
    return subprocess.run(
        [sys.executable, str(work / "driver.py"), value],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


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
    reader = "import sys; sys.path.insert(0, %r)\nfrom stages.lib.cli import run\nrun(lambda: 0)\n" % str(REPO)
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


# A stage that forks a helper (as datasets.map's pool does) and is stopped by SIGTERM to its process group, as
# `kill` of a job, `dvc queue kill` or a scheduler sends it. The helper writes a marker if it unwinds the stage's code.
FORKING_STAGE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from stages.lib.atomic import publish_together
    from stages.lib.cli import run

    if {slow_child!r}:  # a child the scheduler starts late: the signal arrives before the stage's own fork hook ran
        os.register_at_fork(after_in_child=lambda: time.sleep(1.0))

    def main():
        with publish_together(files=["metrics/a.json"]) as out:
            out.write_json("metrics/a.json", {{"v": "new"}})
            helper = os.fork()
            try:
                if helper:
                    open("helper.pid", "w").write(str(helper))
                while True:
                    time.sleep(0.01)
            finally:
                if not helper:
                    open("unwound-in-helper", "w").write("the helper ran the stage's cleanup")
        return 0

    run(main)
""")


@pytest.mark.parametrize("slow_child", [False, True], ids=["helper-running", "helper-starting"])
def test_sigterm_stops_a_stage_cleanly_and_its_forked_helpers_at_once(tmp_path, slow_child):
    (tmp_path / "stage.py").write_text(FORKING_STAGE.format(repo=str(REPO), slow_child=slow_child))
    stage = subprocess.Popen([sys.executable, "stage.py"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    pid_file = tmp_path / "helper.pid"
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert stage.poll() is None and time.time() < deadline, stage.stderr.read() if stage.poll() else "timed out"
        time.sleep(0.01)
    helper = int(pid_file.read_text())
    os.killpg(stage.pid, signal.SIGTERM)
    assert stage.wait(timeout=30) == 128 + signal.SIGTERM
    assert stage.stderr.read().strip() == "terminated"  # one line, no traceback
    deadline = time.time() + 10  # the orphaned helper is reaped by init once it died
    while Path(f"/proc/{helper}").exists():
        assert time.time() < deadline, "the forked helper outlived the signal"
        time.sleep(0.01)
    assert not (tmp_path / "unwound-in-helper").exists(), "the helper unwound the stage's own cleanup"
    assert leftovers(tmp_path) == [] and not (tmp_path / "metrics" / "a.json").exists()  # the stage's did run


def test_a_file_size_limit_is_one_line_naming_the_output_and_keeps_the_old_set(work):
    result = publish(work, "new", FSIZE="4096", REPEAT="10000")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: models/x/weights: cannot write (File too large); the file-size limit (ulimit -f) is below this "
        "output's size; raise it; the previous outputs are unchanged"
    ]
    assert state(work) == ("old",) * 3 and leftovers(work) == []


def test_a_file_where_a_directory_belongs_is_one_line_before_any_work(work):
    shutil.rmtree(work / "metrics" / "runtime")
    (work / "metrics" / "runtime").write_text("not a directory")
    result = publish(work, "new")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: metrics/runtime/b.json: cannot write ("), lines
    assert lines[0].endswith(
        "a file stands where a directory is needed; move it away; the previous outputs are unchanged"
    )
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


# The export stage itself (models/export, metrics/export.json, metrics/runtime/export.json), run as `python -m
# stages.export` would run, with the same kill and limit hooks as DRIVER.
EXPORT_DRIVER = (
    DRIVER.split("from stages.lib.atomic")[0] + "import runpy\nrunpy.run_module('stages.export', run_name='__main__')\n"
)
EXPORTED = ("models/export", "metrics/export.json", "metrics/runtime/export.json")


def run_export(work: Path, **env: str) -> subprocess.CompletedProcess:
    (work / "export_driver.py").write_text(EXPORT_DRIVER)
    return subprocess.run(
        [sys.executable, str(work / "export_driver.py")],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=600,
    )


def exported_set(work: Path) -> dict[str, bytes]:
    files = {}
    for name in EXPORTED:
        path = work / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            files[str(file.relative_to(work))] = file.read_bytes()
    return files


def consistent(work: Path, name: str) -> bool:
    """The three outputs belong to one run: the export named `name`, whose GGUF size metrics/export.json records."""
    summary = json.loads((work / "metrics" / "export.json").read_text())
    gguf = work / "models" / "export" / "model.gguf"
    card = (work / "models" / "export" / "README.md").read_text()
    timings = json.loads((work / "metrics" / "runtime" / "export.json").read_text())
    return summary["size_bytes"] == gguf.stat().st_size and f"ollama create {name} " in card and "verify_s" in timings


@pytest.fixture(scope="module")
def export_work(tmp_path_factory) -> Path:
    from test_export import make_workdir

    work = make_workdir(tmp_path_factory.mktemp("export-whole"), "llama", {"name": "old-name"})
    result = run_export(work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert consistent(work, "old-name")
    return work


def rename_export(work: Path, name: str) -> None:
    import yaml

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["export"]["name"] = name
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_export_killed_between_its_renames_is_finished_whole_by_the_next_run(export_work):
    rename_export(export_work, "new-name")
    result = run_export(export_work, KILL_AT="4")  # the journal, the two metrics files, then the old model aside
    assert result.returncode == -9, result.stderr[-3000:]
    assert not consistent(export_work, "new-name")  # new metrics beside the old model: a mix on disk...
    reader = subprocess.run(
        [sys.executable, "-m", "stages.check_params"],
        cwd=export_work,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert reader.returncode == 0, reader.stderr
    assert consistent(export_work, "new-name")  # ...that the next stage finished before doing anything
    assert leftovers(export_work) == []


@pytest.mark.slow
def test_export_under_a_file_size_limit_is_one_line_and_keeps_the_old_outputs(export_work):
    before = exported_set(export_work)
    rename_export(export_work, "limited-name")
    result = run_export(export_work, FSIZE="20000")  # the f32 GGUF of the tiny model is larger
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: models/export/model.gguf: cannot write (File too large); the file-size limit "
        "(ulimit -f) is below this output's size; raise it; the previous outputs are unchanged"
    ], errors
    assert exported_set(export_work) == before and leftovers(export_work) == []


@pytest.mark.slow
def test_export_into_an_unwritable_place_is_one_line_naming_it(export_work):
    before = exported_set(export_work)
    runtime = export_work / "metrics" / "runtime"
    kept = runtime.with_name("runtime-kept")
    runtime.rename(kept)
    runtime.write_text("a file where the directory belongs")
    try:
        result = run_export(export_work)
    finally:
        runtime.unlink()
        kept.rename(runtime)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors[0].startswith("error: metrics/runtime/export.json: cannot write ("), errors
    assert exported_set(export_work) == before


def test_zero_round_trip_prompts_is_rejected_with_the_key():
    import yaml

    from stages.lib.params import ParamsError, parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["export"]["round_trip"]["prompts"] = 0
    with pytest.raises(ParamsError, match=r"export\.round_trip\.prompts: .*greater than or equal to 1 \(got 0\)"):
        parse_params(raw)
