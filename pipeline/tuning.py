"""Hyperparameter tuning on validation only, as DVC experiments: every method gets the same number of configurations,
each configuration runs its method's training stage (and what that stage needs) and nothing downstream of it, and each
method's pick is the configuration with the best validation Rouge-L. The evaluation sets are never read.

    python -m pipeline.tuning queue sft kd seqkd        # queue each method's grid: `dvc exp run --queue` per configuration
    dvc queue start -j 1                                # run them, one at a time (`dvc queue status` shows progress)
    python -m pipeline.tuning report                    # reports/tuning.md and tuning.json: every run's score, the picks

The grids are configs/tuning/<method>.yaml; configs/tuning/protocol.yaml holds what every method shares: the number of
configurations, the validation score read from the training stage's metrics, the evaluation sets no tuning stage may
read and the evaluation outputs no tuning experiment may change. Two guards keep the evaluation sets out:
- `queue` refuses a grid whose stage, or any stage upstream of it, declares a dep under the evaluation sets, or that
  is (or is upstream of) no training stage (tests/test_tuning.py checks every committed grid);
- `report` refuses an experiment whose commit changed an evaluation output: an evaluation ran in it.

An experiment is the commit DVC keeps under refs/exps/ (its params.yaml and git-tracked metrics); a method's runs are
the experiments named tune-<method>-<k> on the latest baseline commit that has any.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from pipeline.config import ConfigError, exit_on_user_error

EXPERIMENT_NAME = re.compile(r"tune-(?P<method>[a-z_]+)-(?P<index>\d+)")


@dataclass(frozen=True)
class Protocol:
    configurations_per_method: int
    score: str  # a key of the training stage's metrics file
    evaluation_sets: str
    evaluation_outputs: tuple[str, ...]


@dataclass(frozen=True)
class MethodGrid:
    method: str
    stage: str  # a stage of dvc.yaml; a matrix stage's name covers all of its items
    metrics: str  # the directory of the stage's metrics files
    grid: dict[str, list]  # params.yaml key (dotted) -> values

    def configurations(self) -> list[dict[str, object]]:
        """Every combination of the grid's values, the first key varying slowest."""
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    content = yaml.safe_load(path.read_text())
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: not a mapping")
    return content


def load_protocol(directory: Path) -> Protocol:
    path = directory / "protocol.yaml"
    content = _read_yaml(path)
    try:
        return Protocol(int(content["configurations_per_method"]), str(content["score"]), str(content["evaluation_sets"]),
                        tuple(content["evaluation_outputs"]))
    except KeyError as missing:
        raise ConfigError(f"{path}: missing key {missing}") from None


def load_grid(directory: Path, method: str, protocol: Protocol) -> MethodGrid:
    path = directory / f"{method}.yaml"
    content = _read_yaml(path)
    for key in ("stage", "metrics", "grid"):
        if key not in content:
            raise ConfigError(f"{path}: missing key '{key}'")
    grid = content["grid"]
    if not isinstance(grid, dict) or not all(isinstance(values, list) and values for values in grid.values()):
        raise ConfigError(f"{path}: grid: a mapping of params.yaml keys to non-empty lists of values")
    method_grid = MethodGrid(method, str(content["stage"]), str(content["metrics"]), grid)
    size = len(method_grid.configurations())
    if size != protocol.configurations_per_method:
        raise ConfigError(f"{path}: grid has {size} configurations; every method gets "
                          f"{protocol.configurations_per_method} (protocol.yaml: configurations_per_method)")
    return method_grid


# --- the guard: a tuning run reads no evaluation set -------------------------------------------------------------

@dataclass(frozen=True)
class StageIO:
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...]  # declared params.yaml keys


def pipeline_stages(root: str | Path = ".") -> dict[str, StageIO]:
    """{stage name as `dvc repro` prints it: its deps, outs and declared params}, from dvc.yaml and params.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root), config={"core": {"no_scm": True}}) as repo:
        return {
            stage.addressing: StageIO(
                deps=tuple(d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)),
                outs=tuple(o.def_path for o in stage.outs),
                params=tuple(key for d in stage.deps if isinstance(d, ParamsDependency) for key in d.read_params()),
            )
            for stage in repo.index.stages
        }


def _within(path: str, directory: str) -> bool:
    path, directory = PurePosixPath(path), PurePosixPath(directory)
    return path == directory or directory in path.parents or path in directory.parents


def stages_named(stages: dict[str, StageIO], stage: str) -> list[str]:
    """The stage `stage`, or every item of the matrix stage `stage`."""
    return [name for name in stages if name == stage or name.startswith(f"{stage}@")]


def upstream_closure(stages: dict[str, StageIO], targets: list[str]) -> set[str]:
    """The targets and every stage whose outputs they need, transitively: what `dvc exp run <target>` may run."""
    closure, frontier = set(), list(targets)
    while frontier:
        name = frontier.pop()
        if name in closure:
            continue
        closure.add(name)
        frontier += [other for other, io in stages.items() if other not in closure
                     and any(_within(dep, out) for dep in stages[name].deps for out in io.outs)]
    return closure


def check_grid(grid: MethodGrid, stages: dict[str, StageIO], protocol: Protocol) -> None:
    """Refuse a grid whose run could read an evaluation set, or whose keys its stage does not declare (a change to
    them would not rerun it)."""
    targets = stages_named(stages, grid.stage)
    if not targets:
        raise ConfigError(f"configs/tuning/{grid.method}.yaml: stage '{grid.stage}' is not in dvc.yaml")
    for name in sorted(upstream_closure(stages, targets)):
        reads = [dep for dep in stages[name].deps if _within(dep, protocol.evaluation_sets)]
        if reads:
            raise ConfigError(f"configs/tuning/{grid.method}.yaml: stage {name}, which a tuning run of "
                              f"'{grid.stage}' runs, reads the evaluation sets ({', '.join(reads)})")
    for key in grid.grid:
        if not all(any(key == p or key.startswith(f"{p}.") for p in stages[name].params) for name in targets):
            raise ConfigError(f"configs/tuning/{grid.method}.yaml: grid key '{key}' is not a param of stage "
                              f"'{grid.stage}' in dvc.yaml")


def queue_commands(grid: MethodGrid) -> list[list[str]]:
    """One `dvc exp run --queue` per configuration, named tune-<method>-<k>, running only the method's stage."""
    return [["dvc", "exp", "run", "--queue", "--name", f"tune-{grid.method}-{index}",
             *itertools.chain.from_iterable(("-S", f"{key}={json.dumps(value)}") for key, value in configuration.items()),
             grid.stage]
            for index, configuration in enumerate(grid.configurations())]


# --- reading the experiments back --------------------------------------------------------------------------------

def git(*arguments: str, root: Path) -> str:
    """The output of a git command in `root` (pipeline/study.py reads its experiments with it too)."""
    return subprocess.run(["git", *arguments], cwd=root, check=True, capture_output=True, text=True).stdout


def latest_named_experiments(root: Path, name) -> tuple[str, dict[int, str]]:
    """(baseline, {the number in the name: experiment commit}) of the experiments whose name matches the compiled
    pattern `name` (one integer group), on the latest baseline that has any; ("", {}) when none does. The study and
    the ablation read their experiments with it."""
    found = []
    for line in git("for-each-ref", "refs/exps", "--format=%(objectname) %(refname)", root=root).splitlines():
        commit, ref = line.split()
        match = name.fullmatch(ref.rsplit("/", 1)[-1])
        if match:
            baseline = git("rev-parse", f"{commit}^", root=root).strip()
            found.append((int(git("show", "-s", "--format=%ct", baseline, root=root)), baseline, int(match[1]), commit))
    if not found:
        return "", {}
    latest = max(found)[1]
    return latest, {number: commit for _, baseline, number, commit in sorted(found) if baseline == latest}


def _dotted(params: dict, key: str):
    value = params
    for part in key.split("."):
        value = value[part]
    return value


@dataclass
class TuningRun:
    name: str
    index: int
    commit: str
    baseline: str
    configuration: dict[str, object]
    score: float  # mean over the stage's metrics files (students x training seeds)
    metrics_files: int


def experiment_refs(root: Path) -> dict[str, list[tuple[str, str]]]:
    """{method: [(experiment name, commit)]} of every tune-<method>-<k> experiment under refs/exps/."""
    found: dict[str, list[tuple[str, str]]] = {}
    for line in git("for-each-ref", "refs/exps", "--format=%(objectname) %(refname)", root=root).splitlines():
        commit, ref = line.split()
        match = EXPERIMENT_NAME.fullmatch(ref.rsplit("/", 1)[-1])
        if match:
            found.setdefault(match["method"], []).append((match[0], commit))
    return found


def read_run(root: Path, name: str, commit: str, grid: MethodGrid, protocol: Protocol) -> TuningRun:
    baseline = git("rev-parse", f"{commit}^", root=root).strip()
    changed = git("diff", "--name-only", baseline, commit, "--", *protocol.evaluation_outputs, root=root).split()
    if changed:
        raise ConfigError(f"experiment {name} ({commit[:7]}) changed evaluation outputs ({', '.join(changed[:3])}): "
                          "an evaluation ran in a tuning run")
    params = yaml.safe_load(git("show", f"{commit}:params.yaml", root=root))
    files = [path for path in git("ls-tree", "-r", "--name-only", commit, "--", grid.metrics, root=root).split()
             if path.endswith(".json")]
    if not files:
        raise ConfigError(f"experiment {name} ({commit[:7]}): no metrics under {grid.metrics}")
    scores = [float(json.loads(git("show", f"{commit}:{path}", root=root))[protocol.score]) for path in files]
    return TuningRun(name, int(EXPERIMENT_NAME.fullmatch(name)["index"]), commit, baseline,
                     {key: _dotted(params, key) for key in grid.grid}, sum(scores) / len(scores), len(files))


def collect(root: Path, grids: dict[str, MethodGrid], protocol: Protocol) -> dict[str, list[TuningRun]]:
    """{method: its runs on the latest baseline that has any, in grid order}."""
    refs = experiment_refs(root)
    collected = {}
    for method, grid in grids.items():
        runs = [read_run(root, name, commit, grid, protocol) for name, commit in refs.get(method, [])]
        if not runs:
            continue
        times = {run.baseline: int(git("show", "-s", "--format=%ct", run.baseline, root=root)) for run in runs}
        latest = max(times, key=times.get)
        collected[method] = sorted((run for run in runs if run.baseline == latest), key=lambda run: run.index)
    return collected


def pick(runs: list[TuningRun]) -> TuningRun:
    """The best validation score; a tie goes to the earlier configuration of the grid."""
    return max(runs, key=lambda run: (run.score, -run.index))


def method_entry(runs: list[TuningRun], grid: MethodGrid) -> dict:
    """A method's record in tuning.json: every run of its latest baseline, and the pick."""
    best = pick(runs)
    return {"stage": grid.stage, "baseline": best.baseline, "experiment": best.name, "score": best.score,
            "pick": best.configuration,
            "missing": sorted(set(range(len(grid.configurations()))) - {run.index for run in runs}),
            "runs": [{"experiment": r.name, "configuration": r.configuration, "score": r.score} for r in runs]}


def merge_entries(collected: dict[str, list[TuningRun]], grids: dict[str, MethodGrid], previous: dict) -> dict:
    """The methods tuned now, and the previous report's record of the others: experiments live in one clone's
    refs/exps, so a report written elsewhere keeps what it cannot see, unless that method's grid has changed since."""
    entries = {}
    for method, grid in grids.items():
        if method in collected:
            entries[method] = method_entry(collected[method], grid)
        elif method in previous and all(set(run["configuration"]) == set(grid.grid) for run in previous[method]["runs"]):
            entries[method] = previous[method]
    return entries


def write_report(collected: dict[str, list[TuningRun]], grids: dict[str, MethodGrid], protocol: Protocol,
                 out: Path) -> None:
    from pipeline.io import atomic_write_json, atomic_write_text

    previous_path = out / "tuning.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    entries = merge_entries(collected, grids, previous)
    lines = ["# Tuning on validation", "",
             f"Every method gets {protocol.configurations_per_method} configurations (configs/tuning/<method>.yaml); each "
             f"runs its method's training stage only, and its score is the stage's `{protocol.score}` (mean over "
             "students and training seeds): the validation Rouge-L of the checkpoint the stage keeps, one sample per "
             "validation prompt, its best over the stage's validations. No evaluation set is read. The pick is the best "
             "score; params.yaml commits it. Regenerate: `python -m pipeline.tuning queue <methods>`, "
             "`dvc queue start`, `python -m pipeline.tuning report` (README, \"Tuning on validation\").", "",
             "One validation score is the mean over the validation prompts of one sample each, so it carries sampling "
             "noise: the same model scores differently under another sampling seed. Read differences of a few points "
             "between configurations as noise, not as a ranking.", ""]
    for method, grid in grids.items():
        lines += [f"## {method} (stage `{grid.stage}`)", ""]
        if method not in entries:
            lines += ["Not tuned: no tune-" + method + "-<k> experiment found.", ""]
            continue
        entry = entries[method]
        lines += [f"Baseline commit {entry['baseline'][:7]}."
                  + (" Carried from the previous report: its experiments are not in this clone." if method not in collected
                     else "")
                  + (f" Missing (failed or not run): configurations {entry['missing']}." if entry.get("missing") else ""),
                  "",
                  "| experiment | " + " | ".join(f"`{key}`" for key in grid.grid) + f" | {protocol.score} | |",
                  "|---" * (len(grid.grid) + 3) + "|"]
        for run in entry["runs"]:
            lines.append(f"| {run['experiment']} | " + " | ".join(str(run["configuration"][key]) for key in grid.grid)
                         + f" | {run['score']:.2f} | {'**pick**' if run['experiment'] == entry['experiment'] else ''} |")
        lines.append("")
    atomic_write_text(out / "tuning.md", "\n".join(lines))
    atomic_write_json(out / "tuning.json", entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["queue", "report"])
    parser.add_argument("methods", nargs="*", help="queue: the methods to queue (default: all with a grid)")
    parser.add_argument("--grids", default="configs/tuning", help="the directory of protocol.yaml and the grids")
    parser.add_argument("--out", default="reports", help="report: where tuning.md and tuning.json go")
    arguments = parser.parse_args()
    directory = Path(arguments.grids)
    protocol = load_protocol(directory)
    available = sorted(path.stem for path in directory.glob("*.yaml") if path.stem != "protocol")
    methods = arguments.methods or available
    unknown = sorted(set(methods) - set(available))
    if unknown:
        raise ConfigError(f"{directory}: no grid for {', '.join(unknown)} (grids: {', '.join(available)})")
    grids = {method: load_grid(directory, method, protocol) for method in methods}
    if arguments.command == "queue":
        stages = pipeline_stages()
        for grid in grids.values():
            check_grid(grid, stages, protocol)
        for grid in grids.values():
            for command in queue_commands(grid):
                print(" ".join(command), flush=True)
                # DVC of this interpreter's environment, activated or not
                subprocess.run([sys.executable, "-m", *command], check=True)
        print("queued; run them with `dvc queue start -j 1`, then `python -m pipeline.tuning report`")
    else:
        collected = collect(Path("."), grids, protocol)
        write_report(collected, grids, protocol, Path(arguments.out))
        for method, runs in collected.items():
            best = pick(runs)
            print(f"{method}: {best.name} {best.configuration} validation {best.score:.2f}")


if __name__ == "__main__":
    exit_on_user_error(main)
