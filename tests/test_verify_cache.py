"""DVC's cache gap and the check for it: an object damaged in place is checked out silently and every dvc status
reports in sync; stages.tools.verify_cache finds it, and pull + checkout --relink restore cache and workspace."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import REPO
from pipeline_repo import dvc, sh


def verify(repo: Path, *args: str):
    return sh(repo, sys.executable, "-m", "stages.tools.verify_cache", *args, check=False)


@pytest.mark.slow  # a dozen dvc commands
def test_a_damaged_cache_object_is_found_and_restored(tmp_path):
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    os.symlink(REPO / "stages", repo / "stages")
    sh(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "remote", "add", "-d", "store", str(remote))
    (repo / "data.txt").write_text("the good bytes\n")
    dvc(repo, "add", "-q", "data.txt")
    dvc(repo, "push", "-q")
    assert verify(repo).returncode == 0
    obj = next(p for p in (repo / ".dvc" / "cache" / "files" / "md5").glob("??/*"))
    stat = obj.stat()
    obj.chmod(0o644)
    obj.write_text("the BAD! bytes\n")  # same size
    os.utime(obj, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime: damage in place
    (repo / "data.txt").unlink()
    dvc(repo, "checkout", "-q")
    assert (repo / "data.txt").read_text() == "the BAD! bytes\n"  # DVC's gap: checked out without complaint...
    assert "up to date" in dvc(repo, "status").stdout  # ...and every status reports it in sync
    assert "in sync" in dvc(repo, "status", "--cloud").stdout
    found = verify(repo)
    assert found.returncode == 1 and "--remove" in found.stderr
    assert found.stdout.startswith("damaged: ") and found.stdout.strip().endswith(f"md5/{obj.parent.name}/{obj.name}")
    removed = verify(repo, "--remove")
    assert removed.returncode == 1 and "dvc checkout --relink" in removed.stderr and not obj.exists()
    dvc(repo, "pull", "-q")
    dvc(repo, "checkout", "--relink", "-q")
    assert (repo / "data.txt").read_text() == "the good bytes\n" and verify(repo).returncode == 0
