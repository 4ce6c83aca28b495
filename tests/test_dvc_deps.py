"""Every first-party module a DVC stage runs is one of that stage's deps, so a code change can
never leave `dvc repro` reporting stale results as current.

The modules a stage runs are the static import closure (function-local imports included) of
its command: `clipshift <stage>` (cli.py) and the flow it starts (flows/<stage>.py); the
torchrun entry points are stage modules themselves, so they are inside the closure.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
FIRST_PARTY = ("clipshift", "flows")
# files a module reads at run time: they shape results like code does
DATA_OF = {Path("src/clipshift/models.py"): Path("src/clipshift/model_configs")}


def module_file(name: str) -> Path | None:
    """The file of first-party module ``name`` (a package's __init__), or None."""
    root = SRC if name.split(".")[0] == "clipshift" else REPO
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """First-party modules ``path`` imports anywhere in its body (``from a import b`` counts
    ``a.b`` when b is a module, and ``a`` always: importing a.b runs a/__init__)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in FIRST_PARTY:
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name for name in found if module_file(name) is not None}


def closure(entry_modules: list[str]) -> set[Path]:
    seen: set[str] = set()
    todo = list(entry_modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)) - seen)
    return {module_file(name).relative_to(REPO) for name in seen}


def stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: [str(d) for d in spec["deps"]] for name, spec in stages.items()}


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(stage_deps()))
def test_every_module_a_stage_runs_is_a_dep(stage):
    deps = stage_deps()[stage]
    modules = closure(["clipshift.cli", f"flows.{stage}"])
    assert Path(f"src/clipshift/stages/{stage}.py") in modules  # the closure is not empty
    files = modules | {DATA_OF[m] for m in modules if m in DATA_OF}
    missing = sorted(str(p) for p in files if not covered(p, deps))
    assert not missing, f"dvc.yaml stage '{stage}' runs these without depending on them"


def test_stages_import_no_other_stage_but_scaling_pretrain():
    """Stages import methods/ and data/, never another stage (one allowed edge)."""
    for path in sorted((SRC / "clipshift" / "stages").glob("*.py")):
        stages = {
            m.rsplit(".", 1)[1] for m in imported_modules(path) if m.startswith("clipshift.stages.")
        }
        allowed = {"pretrain"} if path.stem == "scaling" else set()
        assert stages - {path.stem} <= allowed, f"{path.name} imports stages {stages}"


def test_methods_import_no_stage_and_no_tracking():
    for path in sorted((SRC / "clipshift" / "methods").glob("*.py")):
        bad = {
            m
            for m in imported_modules(path)
            if m.startswith("clipshift.stages") or m in ("clipshift.tracking", "flows")
        }
        assert not bad, f"methods/{path.name} imports {bad}"
