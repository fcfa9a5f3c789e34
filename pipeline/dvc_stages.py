"""The pipeline as `dvc.yaml` defines it now, read through DVC itself (which expands `foreach` and `matrix` over the
current params): each stage's declarations, and the removal of what stages that no longer exist left behind.

A stage takes what it tells MLflow and what its resume fingerprint covers from `declaration(<its name>)`, so
neither can drift from dvc.yaml: the params are the keys the stage declares, with the values DVC tracks, and the
inputs are its declared deps, code included.

Removing a training seed from `train_seeds` or a student from `models.students` removes matrix stages, but DVC
leaves their outputs in the workspace (git-tracked metrics files among them) and their entries in `dvc.lock`. A
report that globbed `metrics/eval/` then pooled those stale results, from another config or another synthetic world,
with the current ones. So the report reads exactly the outputs of the current stages (`current_outputs`), and
`check_params`, which reruns whenever params.yaml changes, deletes the rest (`prune_removed_stages`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from pipeline.config import ConfigError
from pipeline.io import atomic_write_text


@dataclass(frozen=True)
class Declaration:
    """What dvc.yaml declares for one stage, as DVC resolves it."""

    cmd: str
    deps: tuple[str, ...]  # paths: data, models and code
    params: dict  # {declared params.yaml key: its value}
    outs: tuple[str, ...]


def declaration(stage_name: str, root: str | Path = ".") -> Declaration:
    """The declarations of the stage `dvc repro` calls `stage_name` (e.g. `distill_kd@tiny-1234`) in the project at
    `root`."""
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageNotFound

    try:
        # Reading dvc.yaml and params.yaml needs no git: a stage also runs in a plain copy of the project.
        with Repo(str(root), config={"core": {"no_scm": True}}) as repo:
            # This one stage, not the whole index: every stage process starts here, and building the index of every
            # stage took ~1.5 s of each one's start-up.
            try:
                [stage] = repo.stage.collect(f"{Path(repo.root_dir) / 'dvc.yaml'}:{stage_name}")
            except StageNotFound:
                raise ConfigError(f"dvc.yaml: no stage {stage_name} with the current params.yaml") from None
            params = {}
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    params |= dep.read_params()
            return Declaration(cmd=stage.cmd, deps=tuple(d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)),
                               params=params, outs=tuple(out.def_path for out in stage.outs))
    except DvcException as error:
        raise ConfigError(f"dvc.yaml: cannot read stage {stage_name}: {error}") from error


def current_stages() -> dict[str, list[str]]:
    """{stage name as `dvc repro` prints it: its output paths (outs, metrics and plots)}, from dvc.yaml and the
    params in the working directory's repository."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        return _stages(repo)


def _stages(repo) -> dict[str, list[str]]:
    return {stage.addressing: [out.def_path for out in stage.outs] for stage in repo.index.stages}


def current_outputs(under: str) -> list[Path]:
    """The outputs of the current stages that lie under the directory `under`, sorted."""
    root = PurePosixPath(under)
    paths = {PurePosixPath(path) for outs in current_stages().values() for path in outs}
    return [Path(path) for path in sorted(paths) if root in path.parents]


def _overlaps(path: PurePosixPath, others: set[PurePosixPath]) -> bool:
    return any(path == other or path in other.parents or other in path.parents for other in others)


def prune_removed_stages(lock_path: str | Path = "dvc.lock") -> list[str]:
    """Delete the outputs, and drop the dvc.lock entries, of every stage the lock records but dvc.yaml no longer
    defines. An output that is also (inside, or a parent of) a current stage's output is kept. Returns the names of
    the removed stages; prints one line for each."""
    from dvc.repo import Repo

    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return []
    lock = yaml.safe_load(lock_path.read_text()) or {}
    recorded = lock.get("stages") or {}
    with Repo(".") as repo:
        stages = _stages(repo)
        removed = [name for name in recorded if name not in stages]
        kept_outputs = {PurePosixPath(path) for outs in stages.values() for path in outs}
        for name in removed:
            deleted = []
            for out in recorded[name].get("outs") or []:
                path = PurePosixPath(out["path"])
                if _overlaps(path, kept_outputs):
                    continue
                # DVC lists a cached output in the .gitignore beside it: that line goes too (a no-op outside git).
                repo.scm_context.ignore_remove(str(Path(path).resolve()))
                if Path(path).exists():
                    shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
                    deleted.append(str(path))
                _remove_empty_parents(Path(path))
            del recorded[name]
            print(f"removed stage {name}: no longer in dvc.yaml; deleted {', '.join(deleted) or 'nothing'} "
                  "and its dvc.lock entry")
    if removed:
        atomic_write_text(lock_path, yaml.safe_dump(lock, sort_keys=False, allow_unicode=True))
    return removed


def _remove_empty_parents(path: Path) -> None:
    """models/<student>/seed<k>/ goes with the last output in it; the repository root and non-empty folders stay."""
    for parent in path.parents[:-1]:  # the last parent is "."
        if not parent.is_dir() or any(parent.iterdir()):
            return
        parent.rmdir()
