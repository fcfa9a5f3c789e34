"""stages/__init__.py: a stage started by an interpreter without the project's packages (the system python, as
`.venv/bin/dvc repro` from a shell that was not activated gets) reruns under the repository's .venv, or stops with
one line that says what to do (issue 15)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "import sys\nimport torch\nprint('stage ran with torch', torch.__version__, sys.argv[1:])\n"


@pytest.fixture
def bare_python() -> str:
    """The interpreter this virtual environment was made from: it lacks the project's packages."""
    base = getattr(sys, "_base_executable", sys.executable)
    probe = subprocess.run([base, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"])
    if base == sys.executable or probe.returncode != 0:
        pytest.skip("no interpreter without torch beside this environment")
    return base


def stage_package(root: Path) -> None:
    (root / "stages").mkdir()
    shutil.copy(REPO / "stages" / "__init__.py", root / "stages" / "__init__.py")
    (root / "stages" / "probe.py").write_text(PROBE)


def test_a_stage_reruns_under_the_repositorys_venv(tmp_path: Path, bare_python: str):
    stage_package(tmp_path)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)  # this environment, as the repo's .venv
    completed = subprocess.run([bare_python, "-m", "stages.probe", "--student", "tiny"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("stage ran with torch") and "['--student', 'tiny']" in completed.stdout
    [line] = completed.stderr.splitlines()
    assert line.startswith(f"{bare_python} lacks torch") and line.endswith(f"running the stage under {tmp_path}/.venv/bin/python")


def test_without_a_venv_a_stage_stops_with_one_line(tmp_path: Path, bare_python: str):
    stage_package(tmp_path)
    completed = subprocess.run([bare_python, "-m", "stages.probe"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=60)
    assert completed.returncode == 1 and completed.stdout == ""
    [line] = completed.stderr.splitlines()
    assert line.startswith(f"error: {bare_python} lacks the project's packages (torch, ")
    assert "source .venv/bin/activate" in line


def test_with_the_packages_nothing_happens():
    """The check itself: every package it asks for is importable here, so the stages run in this interpreter."""
    from stages import REQUIRED_PACKAGES

    assert all(importlib.util.find_spec(name) is not None for name in REQUIRED_PACKAGES)
