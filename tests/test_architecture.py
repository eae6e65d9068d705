"""The layout's rules, checked on the source (ast): imports point one way, functions and files stay short.

- ``store`` imports nothing from ``pipeline`` or ``stages`` (it knows nothing of models or training);
- ``pipeline`` imports nothing from ``stages``;
- no stage module imports another stage; a stage's private helpers (``stages/<stage>_*.py``) are its own,
  and ``stages/common.py`` is shared; only the CLI (``stages/cli.py``, ``stages/__main__.py``) knows every stage;
- no function in ``pipeline/``, ``stages/`` or ``store/`` is longer than 60 lines, no file longer than 400.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "store")
STAGES = ("ingest", "teacher_fit", "teacher", "verify", "student", "evaluate", "audit")
CLI = ("cli", "__main__")
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name ``path`` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``), anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def stage_of(name: str) -> str | None:
    """The stage a module of ``stages/`` belongs to: the stage itself, or the stage its ``<stage>_*`` helper serves."""
    if name in STAGES:
        return name
    owners = [s for s in STAGES if name.startswith(s + "_")]
    return max(owners, key=len) if owners else None


def stage_imports(names: set[str]) -> set[str]:
    return {n.split(".")[1] for n in names if n.startswith("stages.") and n.count(".") >= 1}


@pytest.mark.parametrize("package,forbidden", [("store", ("pipeline", "stages")), ("pipeline", ("stages",))])
def test_lower_layers_never_import_upper_ones(package, forbidden):
    bad = {
        str(p.relative_to(ROOT)): sorted(n for n in imported(p) if n.split(".")[0] in forbidden)
        for p in modules(package)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_no_stage_imports_another_stage():
    bad = {}
    for p in modules("stages"):
        if p.stem in CLI:
            continue
        own = stage_of(p.stem)
        others = {m for m in stage_imports(imported(p)) if m != "common" and stage_of(m) != own}
        if others:
            bad[p.name] = sorted(others)
    assert not bad, f"stages importing other stages (move what they share into pipeline/): {bad}"


def test_the_import_walker_sees_a_stage_importing_another(tmp_path):
    """The rule above can fail: a module that imports a stage is caught, a private helper is not."""
    p = tmp_path / "verify.py"
    p.write_text("from stages.student_data import StoreJoin\nimport stages.common\n")
    own = stage_of("verify")
    assert {m for m in stage_imports(imported(p)) if m != "common" and stage_of(m) != own} == {"student_data"}
    assert stage_of("student_data") == "student" and stage_of("teacher_fit") == "teacher_fit"


def test_functions_and_files_stay_short():
    long_functions, long_files = [], []
    for package in PACKAGES:
        for p in modules(package):
            text = p.read_text()
            if len(text.splitlines()) > MAX_FILE_LINES:
                long_files.append(f"{p.relative_to(ROOT)} ({len(text.splitlines())} lines)")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long_functions.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long_functions, long_functions
    assert not long_files, long_files
