"""The layout's rules, checked on the source (ast): imports point one way, functions and files stay short, and
``dvc.yaml`` lists the code every stage's output depends on.

- ``store`` imports nothing from ``pipeline`` or ``stages`` (it knows nothing of models or training);
- ``pipeline`` imports nothing from ``stages``; it holds only sub-packages, one per step of the data flow,
  and each imports only from the steps before it: core ← data ← views ← {train, audit};
- no stage module imports another stage; a stage's private helpers (``stages/<stage>_*.py``) are its own;
  only the CLI (``stages/cli.py``, ``stages/__main__.py``) knows every stage;
- no function in ``pipeline/``, ``stages/`` or ``store/`` is longer than 60 lines, no file longer than 400;
- every module a DVC stage's command imports (through ``pipeline/`` and its own helpers), core utilities aside,
  is a dependency of that stage in ``dvc.yaml``, so a changed view, loss or model is never "up to date".
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "store")
STAGES = ("ingest", "teacher_fit", "teacher", "verify", "student", "evaluate", "audit")
CLI = ("cli", "__main__")
GROUPS = {"core": 0, "data": 1, "views": 2, "train": 3, "audit": 3}
"""pipeline's sub-packages and their place in the data flow: a group imports only from groups of a lower place."""
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
UTILITIES = ("pipeline/core/", "pipeline/train/distributed.py")
"""Modules whose change cannot change a stage's output (errors, progress, report, files, config, ranks)."""


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


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


def group_of(name: str) -> str | None:
    """The pipeline group of a module name (``pipeline.views.replay`` -> ``views``)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pipeline" and parts[1] in GROUPS else None


@pytest.mark.parametrize("package,forbidden", [("store", ("pipeline", "stages")), ("pipeline", ("stages",))])
def test_lower_layers_never_import_upper_ones(package, forbidden):
    bad = {
        str(p.relative_to(ROOT)): sorted(n for n in imported(p) if n.split(".")[0] in forbidden)
        for p in modules(package)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_pipeline_is_sub_packages_of_the_data_flow():
    loose = [p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules directly in pipeline/ (put each in the group of its step): {loose}"
    folders = {p.name for p in (ROOT / "pipeline").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(GROUPS)


def import_violations(path: Path, group: str) -> list[str]:
    """The imports of a module of ``group`` that reach a later (or parallel) step of the data flow."""
    bad = []
    for name in imported(path):
        other = group_of(name)
        if other is not None and other != group and GROUPS[other] >= GROUPS[group]:
            bad.append(name)
    return sorted(bad)


def test_pipeline_groups_import_only_earlier_steps():
    bad = {}
    for group in GROUPS:
        for p in modules(f"pipeline/{group}"):
            if found := import_violations(p, group):
                bad[str(p.relative_to(ROOT))] = found
    assert not bad, f"imports against the data flow core <- data <- views <- {{train, audit}}: {bad}"


def test_the_group_rule_catches_an_import_against_the_flow(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from pipeline.train.models import create_student\nfrom pipeline.core import files\n"
                 "import pipeline.audit.tables\n")
    assert import_violations(p, "views") == ["pipeline.audit.tables", "pipeline.train.models",
                                             "pipeline.train.models.create_student"]
    assert import_violations(p, "train") == ["pipeline.audit.tables"]


def test_no_stage_imports_another_stage():
    bad = {}
    for p in modules("stages"):
        if p.stem in CLI:
            continue
        own = stage_of(p.stem)
        others = {m for m in stage_imports(imported(p)) if stage_of(m) != own}
        if others:
            bad[p.name] = sorted(others)
    assert not bad, f"stages importing other stages (move what they share into pipeline/): {bad}"


def test_the_import_walker_sees_a_stage_importing_another(tmp_path):
    """The rule above can fail: a module that imports a stage is caught, a private helper is not."""
    p = tmp_path / "verify.py"
    p.write_text("from stages.student_data import x\nimport stages.verify_report\n")
    own = stage_of("verify")
    assert {m for m in stage_imports(imported(p)) if stage_of(m) != own} == {"student_data"}
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


# ------------------------------------------------------------------------------------ dvc.yaml's code deps


def module_file(name: str) -> Path | None:
    """The source file of a module name of this project (``pipeline.views`` -> its ``__init__.py``)."""
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def closure(stage_module: str) -> set[str]:
    """Every file of ``pipeline/`` and of the stage's own modules that the stage's command imports, directly or
    not (core utilities and empty package files aside), as paths relative to the repository."""
    own = stage_of(stage_module)
    seen: set[Path] = set()
    todo = [ROOT / "stages" / f"{stage_module}.py"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported(path):
            top = name.split(".")[0]
            if top == "pipeline" or (top == "stages" and name.count(".") and stage_of(name.split(".")[1]) == own):
                found = module_file(name)
                if found is not None:
                    todo.append(found)
    rel = {str(p.relative_to(ROOT)) for p in seen}
    return {r for r in rel if not r.startswith(UTILITIES) and (ROOT / r).read_text().strip()}


DVC_STAGES = {"ingest": "ingest", "teacher-fit": "teacher_fit", "teacher": "teacher", "student": "student",
              "evaluate": "evaluate", "audit": "audit"}


def uncovered(deps: list[str], files: set[str]) -> list[str]:
    """The files no dependency covers (a dependency on a folder covers every file in it)."""
    paths = [d.rstrip("/") for d in deps if "${" not in d]
    return sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in paths))


@pytest.mark.parametrize("name", sorted(DVC_STAGES))
def test_dvc_stages_depend_on_every_module_they_run(name):
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    stage = stage.get("do", stage)
    deps = [next(iter(d)) if isinstance(d, dict) else d for d in stage["deps"]]
    missing = uncovered(deps, closure(DVC_STAGES[name]))
    assert not missing, f"dvc.yaml's {name} stage does not list code it runs: {missing}"


def test_the_closure_sees_what_the_teacher_and_students_run():
    teacher, student = closure("teacher"), closure("student")
    for f in ("pipeline/views/handover.py", "pipeline/views/loading.py", "pipeline/views/sampling.py",
              "pipeline/train/models.py", "pipeline/train/run_store.py", "stages/teacher_units.py"):
        assert f in teacher, f
    for f in ("pipeline/train/losses.py", "pipeline/train/checkpoint.py", "pipeline/train/evaluation.py"):
        assert f in student and f not in teacher, f
    assert not any(f.startswith("pipeline/core/") for f in teacher | student)
    assert uncovered(["pipeline/views", "stages/teacher.py"], {"pipeline/views/rng.py", "pipeline/viewsx.py",
                                                               "stages/teacher.py"}) == ["pipeline/viewsx.py"]
