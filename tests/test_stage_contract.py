"""The stage contract: dvc.yaml declares every project module a stage can import (so editing one reruns exactly the
stages that use it), and every file a stage opens (tests/audit/sitecustomize.py records them during the end-to-end
`dvc repro`; tests/test_pipeline_e2e.py checks them with `undeclared_accesses`).

The import closure is static: every `import` of a project module anywhere in a file, lazy ones inside functions
included, followed transitively from the module the stage's `cmd` runs (`python -m stages.<name>`, which also runs
`stages/__init__.py`). Each check has a negative control: a copy of the stages with one declaration dropped fails.
"""

import ast
import shlex
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pipeline", "stages")


def module_file(module: str, root: Path = REPO) -> PurePosixPath | None:
    """`pipeline.sft` -> pipeline/sft.py (or a package's __init__.py), relative to root; None outside the project."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = PurePosixPath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / candidate).is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module named by an import statement in the file (`from pipeline import io` names pipeline.io too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def import_closure(entry_module: str, root: Path = REPO) -> set[PurePosixPath]:
    """The project files (relative to root) that running `python -m entry_module` can import, itself included, with
    the parent packages' __init__.py files Python runs first. Empty __init__.py files are left out: they cannot change
    what a stage computes."""
    parts = entry_module.split(".")
    pending = [".".join(parts[: i + 1]) for i in range(len(parts))]
    seen_modules, files = set(), set()
    while pending:
        module = pending.pop()
        if module in seen_modules:
            continue
        seen_modules.add(module)
        path = module_file(module, root)
        if path is None:
            continue
        files.add(path)
        pending += imported_modules(root / path, module)
        prefix = module.split(".")
        pending += [".".join(prefix[:i]) for i in range(1, len(prefix))]  # a submodule runs its packages first
    return {path for path in files if not (path.name == "__init__.py" and not (root / path).read_text().strip())}


def stage_entry_module(cmd: str) -> str:
    words = shlex.split(cmd)
    assert words[:2] == ["python", "-m"], f"stage cmd must be `python -m stages.<name> ...`: {cmd}"
    return words[2]


def declared(path: PurePosixPath, deps: set[PurePosixPath]) -> bool:
    """Declared directly, or inside a declared directory."""
    return any(path == dep or dep in path.parents for dep in deps)


def undeclared_imports(stages: dict[str, tuple[str, set[PurePosixPath]]], root: Path = REPO) -> dict[str, list[str]]:
    """{stage: the project files its entry point can import that its deps do not declare}, for stages {name: (cmd,
    deps)}; stages that declare everything are left out."""
    missing = {}
    for name, (cmd, deps) in stages.items():
        gaps = sorted(str(path) for path in import_closure(stage_entry_module(cmd), root) if not declared(path, deps))
        if gaps:
            missing[name] = gaps
    return missing


def dvc_stages(root: Path = REPO) -> dict[str, tuple[str, set[PurePosixPath], set[PurePosixPath]]]:
    """{stage as `dvc repro` names it: (cmd, deps, outs)} from dvc.yaml with the committed params, through DVC."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {
            stage.name: (
                stage.cmd,
                {PurePosixPath(dep.def_path) for dep in stage.deps if not dep.def_path.endswith(".yaml")},
                {PurePosixPath(out.def_path) for out in stage.outs},
            )
            for stage in repo.index.stages
        }


# Paths a stage may touch without declaring them: its resume checkpoints (scratch/, deleted once the stage ends),
# the MLflow store, DVC's and git's own files (pipeline/dvc_stages.py reads the pipeline through DVC), and the
# parameters, which stages declare key by key under `params:`. Modules and their bytecode: the import check.
UNDECLARED_ALLOWED = ("scratch/", "mlflow", "mlartifacts/", ".dvc/", ".git/", "dvc.lock", "dvc.yaml", "params.yaml")
UNDECLARED_NAMES = (".gitignore", ".dvcignore")
UNDECLARED_SUFFIXES = (".py", ".pyc")


def undeclared_accesses(stages: dict[str, tuple[str, set[PurePosixPath], set[PurePosixPath]]],
                        accesses: list[dict]) -> dict[str, list[str]]:
    """{stage: files it read that are neither deps nor outs, or wrote that are not outs}. `accesses`: one record per
    stage process, {"argv": [...], "read": [relative paths], "written": [...]}, as tests/audit/sitecustomize.py writes
    them. A process is matched to its stage by its command line."""
    by_command = {tuple(shlex.split(cmd)[1:]): name for name, (cmd, _, _) in stages.items()}
    problems: dict[str, list[str]] = {}
    for record in accesses:
        name = by_command.get(tuple(record["argv"]))
        assert name is not None, f"a process ran no stage's command: {record['argv']}"
        _, deps, outs = stages[name]
        for kind, paths, allowed in (("read", record["read"], deps | outs), ("written", record["written"], outs)):
            for path in paths:
                path = PurePosixPath(path)
                if (path.suffix in UNDECLARED_SUFFIXES or path.name in UNDECLARED_NAMES
                        or str(path).startswith(UNDECLARED_ALLOWED) or declared(path, allowed)):
                    continue
                problems.setdefault(name, []).append(f"{kind} {path}")
    return {name: sorted(set(paths)) for name, paths in problems.items()}


@pytest.fixture(scope="module")
def stages():
    return dvc_stages()


def test_every_stage_declares_every_project_module_it_can_import(stages):
    assert undeclared_imports({name: (cmd, deps) for name, (cmd, deps, _) in stages.items()}) == {}


def test_negative_control_a_dropped_module_dependency_is_reported(stages):
    name, (cmd, deps, _) = next((n, s) for n, s in stages.items() if n.startswith("distill_minillm@"))
    dropped = PurePosixPath("pipeline/minillm_loss.py")
    assert dropped in deps
    assert undeclared_imports({name: (cmd, deps - {dropped})}) == {name: [str(dropped)]}


def test_the_import_closure_follows_lazy_and_transitive_imports(tmp_path):
    """A hand-built project: stages/a.py imports pipeline.b at top level, b imports pipeline.c inside a function,
    c imports nothing from the project; pipeline/d.py is never imported. An empty pipeline/__init__.py is skipped,
    a non-empty stages/__init__.py is not."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("import sys\n")
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "stages" / "a.py").write_text("from pipeline import b\nimport json\n")
    (tmp_path / "pipeline" / "b.py").write_text("def f():\n    from pipeline.c import g\n    return g\n")
    (tmp_path / "pipeline" / "c.py").write_text("import os\n")
    (tmp_path / "pipeline" / "d.py").write_text("")
    closure = import_closure("stages.a", tmp_path)
    assert closure == {PurePosixPath(p) for p in ("stages/__init__.py", "stages/a.py", "pipeline/b.py", "pipeline/c.py")}


def test_negative_control_an_undeclared_file_access_is_reported(stages):
    name, (cmd, deps, outs) = next((n, s) for n, s in stages.items() if n.startswith("distill_seqkd@"))
    argv = shlex.split(cmd)[1:]
    declared_read = sorted(str(dep) for dep in deps if not str(dep).endswith(".py"))[0]
    fine = {"argv": argv, "read": [declared_read, "scratch/x/state.pt", "pipeline/sft.py"],
            "written": [str(sorted(outs)[0])]}
    assert undeclared_accesses(stages, [fine]) == {}
    bad = {"argv": argv, "read": ["data/instructions/test.jsonl"], "written": [declared_read]}
    assert undeclared_accesses(stages, [bad]) == {name: ["read data/instructions/test.jsonl", f"written {declared_read}"]}


def test_the_evaluate_matrix_covers_every_student_method_of_the_protocol(stages):
    """dvc.yaml's `evaluate` matrix cannot read pipeline/config.py: with evaluate_sft and evaluate_teacher, its method
    list must match METHODS."""
    from pipeline.config import METHODS

    evaluated = {name.split("@")[1].split("-")[0] for name in stages if name.startswith("evaluate@")}
    assert evaluated | {"sft", "teacher"} == set(METHODS) and "sft" not in evaluated
    assert "evaluate_teacher" in stages and any(name.startswith("evaluate_sft@") for name in stages)


def undeclared_cmd_paths(stages: dict[str, tuple[str, set[PurePosixPath], set[PurePosixPath]]]) -> dict[str, list[str]]:
    """{stage: the path arguments of its cmd (values of `--x` options holding a `/` or naming a dep or out) that are
    neither among its deps and outs, nor inside one of them, nor the directory of outs it writes (its curves)}."""
    problems = {}
    for name, (cmd, deps, outs) in stages.items():
        words = shlex.split(cmd)[3:]
        values = [value for option, value in zip(words, words[1:]) if option.startswith("--")]
        paths = [PurePosixPath(v) for v in values if "/" in v or PurePosixPath(v) in deps | outs]
        gaps = sorted(str(path) for path in paths
                      if not declared(path, deps | outs) and not any(path in out.parents for out in outs))
        if gaps:
            problems[name] = gaps
    return problems


def test_every_path_a_stage_is_given_is_declared(stages):
    """dvc.yaml passes each stage its inputs and outputs in `cmd`: each must be a declared dep or out."""
    assert undeclared_cmd_paths(stages) == {}
    name, (cmd, deps, outs) = next((n, s) for n, s in stages.items() if n.startswith("distill_minillm@"))
    assert "--pt-blocks data/pretrain/blocks.npy" in cmd
    assert undeclared_cmd_paths({name: (cmd, deps - {PurePosixPath("data/pretrain")}, outs)}) == {
        name: ["data/pretrain/blocks.npy"]}


# The top-level directories of what the stages read and write: dvc.yaml names them, the code never does.
ARTIFACT_ROOTS = ("data/", "models/", "metrics/", "plots/", "eval/", "reports/", "teacher_data", "checks/")


def artifact_path_literals(files: list[Path]) -> list[str]:
    """`file:line: literal` for each string constant (docstrings aside) that starts with an artifact directory."""
    found = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and node.value.startswith(ARTIFACT_ROOTS)):
                found.append(f"{path.relative_to(path.parents[1])}:{node.lineno}: {node.value!r}")
    return found


def test_no_stage_or_library_module_writes_an_artifact_path(tmp_path):
    """dvc.yaml is the only place a path is written: stages take theirs as arguments, the library takes paths."""
    assert artifact_path_literals(sorted((REPO / "pipeline").glob("*.py")) + sorted((REPO / "stages").glob("*.py"))) == []
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "x.py").write_text('"""Reads data/eval."""\nPATH = "data/tokenizer"\n')
    assert artifact_path_literals([tmp_path / "stages" / "x.py"]) == ["stages/x.py:2: 'data/tokenizer'"]
