"""Temporary copies of the repository for the tests that run real stages or `dvc repro` in them."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Outputs of a local run must not leak into a copy: it starts from the sources alone.
RUN_OUTPUTS = ("metrics/", "plots/", "eval/", "reports/", "checks/", "dvc.lock")


def copy_sources(workdir: Path, skipped: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Copy the repository's tracked and untracked-but-not-ignored files, except those under `skipped`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith(skipped):
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, workdir / name)


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    completed = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return completed


# What `dvc_project` adds to a directory.
DVC_PROJECT_FILES = (".dvc", ".dvcignore", "dvc.yaml")


def dvc_project(directory: Path) -> None:
    """Make `directory` a DVC project with the repository's dvc.yaml (no git), so that a stage run in it in-process
    finds its declaration (pipeline/dvc_stages.py)."""
    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", directory / "dvc.yaml")
    Repo.init(str(directory), no_scm=True).close()


def stage_command(stage_name: str, root: Path) -> list[str]:
    """The stage's command exactly as dvc.yaml in `root` declares it, run by this interpreter."""
    from pipeline.dvc_stages import declaration

    words = shlex.split(declaration(stage_name, root).cmd)
    assert words[0] == "python", words
    return [sys.executable, *words[1:]]
