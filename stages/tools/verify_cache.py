"""Verify DVC's local cache: every object's content against the md5 its name records.

    python -m stages.tools.verify_cache            list damaged objects (exit 1 when there are any)
    python -m stages.tools.verify_cache --remove   also delete them; then `dvc pull` (or `dvc repro -f <stage>`)
                                                   and `dvc checkout --relink` restore the cache and the workspace

DVC remembers a file's hash by its inode, mtime and size, so an object damaged in place (same size and mtime: a
disk error, a bad copy) is checked out without complaint, and `dvc status`, `dvc status --cloud`, `dvc push` and
`dvc pull` all report it in sync (docs/DESIGN.md §9). This reads every object once.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from stages.lib.cli import ArgumentParser, run
from stages.lib.errors import InputError


def cache_dir() -> Path:
    """The cache DVC uses here (`dvc cache dir`), or .dvc/cache."""
    try:
        found = subprocess.run(
            [sys.executable, "-m", "dvc", "cache", "dir"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        found = None
    if found is not None and found.returncode == 0 and found.stdout.strip():
        return Path(found.stdout.strip())
    return Path(".dvc/cache")


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def damaged(cache: Path) -> tuple[int, list[Path]]:
    """(objects checked, objects whose content does not hash to their name) under cache/files/md5."""
    root = cache / "files" / "md5"
    if not root.is_dir():
        raise InputError(f"{root}: no DVC 3 cache here; run from the repository root (or pass --cache)")
    checked, bad = 0, []
    for path in sorted(root.glob("??/*")):
        if not path.is_file() or path.name.endswith((".tmp", ".unpacked")):
            continue
        checked += 1
        if md5(path) != path.parent.name + path.name.removesuffix(".dir"):
            bad.append(path)
    return checked, bad


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="the cache directory (default: `dvc cache dir`)")
    parser.add_argument(
        "--remove", action="store_true", help="delete damaged objects so that DVC fetches or rebuilds them"
    )
    args = parser.parse_args(argv)
    checked, bad = damaged(args.cache or cache_dir())
    for path in bad:
        if args.remove:
            path.chmod(0o644)
            path.unlink()
        print(f"damaged: {path}{' (removed)' if args.remove else ''}")
    if not bad:
        print(f"verify_cache: {checked} objects, all intact")
        return 0
    advice = (
        (
            "restore them with `dvc pull` (or `dvc repro -f <stage>` for outputs no remote holds), then "
            "`dvc checkout --relink` to rewrite the workspace copies"
        )
        if args.remove
        else "rerun with --remove"
    )
    print(f"verify_cache: {len(bad)} of {checked} objects damaged; {advice}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    run(main)
