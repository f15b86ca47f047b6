"""The layout is the pipeline: one module per DVC stage in stages/, each stage depends on exactly the code it runs."""
from __future__ import annotations

import ast
import re
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
            found |= {f"{node.module}.{alias.name}" for alias in node.names if module_file(f"{node.module}.{alias.name}")}
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
    assert files == stage_modules, "stages/ should hold the stage modules only; the library is stages/lib, tools stages/tools"


def test_the_closure_follows_imports_inside_functions(tmp_path):
    # Imports inside functions count too: a stage that imports a module lazily still runs its code.
    assert "stages/lib/template.py" in code_closure("stages.tokenize")
    assert code_closure("stages.lib.template") == {"stages/lib/template.py", "stages/lib/errors.py"}
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from stages.lib import scoring\n    import stages.lib.paths\n")
    assert project_imports(module) == {"stages.lib.scoring", "stages.lib.paths"}
