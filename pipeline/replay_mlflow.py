"""Replay the DVC metrics and plots files into the MLflow store, for stages that ran while it was unreachable.

    python -m pipeline.replay_mlflow [--experiment minillm-distillation]

Run it from the repository root. The DVC files are the source of truth: a stage whose store was unreachable
warned once and carried on (pipeline/tracking.py), and its metrics are in the uncached JSON outputs (metrics
files) and `plots:` outputs that dvc.yaml declares for it. The stages and their files are read from DVC itself (foreach/matrix resolved),
the params each stage ran with from dvc.lock. The store is the stages' own (MLFLOW_TRACKING_URI, else
mlflow.db at the repository root).

One run per stage, nested under one parent run per replay, tagged like a live stage run (`dvc.stage`,
`git.commit`, `pipeline.execution_id`, `mlflow.parentRunId`, `dvc.exp_name` when DVC_EXP_NAME is set) plus
`pipeline.replayed=true` and the sha256 of the files replayed. A stage whose files were already replayed
unchanged is skipped, so running the command twice adds nothing.

Metric names: a metrics JSON's numeric leaves by their path joined with "/" (`sets/dollyeval/rouge_l`), its
string leaves become tags (`method`, `student`, as the live evaluate runs have). A plots CSV's columns give one
point per row at its `step`; the pipeline's CSVs store the live names with "/" written "_" (`train/loss` as
`train_loss`), and the groups below are mapped back. Timestamps are the files' modification times.
"""

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

from mlflow.entities import Metric, Param

from pipeline.config import ConfigError, exit_on_user_error
from pipeline.tracking import (
    PARAMS_PER_BATCH,
    _artifact_location,
    _experiment_id,
    _git,
    _open_client,
    flatten_params,
    tracking_uri,
)

METRIC_GROUPS = ("train", "valid", "loss", "rollout")  # live prefixes: `rollout_reward_mean` was `rollout/reward_mean`
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def dvc_stages_with_metrics(root: Path) -> list[dict]:
    """[{name, files: [metrics JSON and plots CSV paths that exist], params: {...}}] for every stage of dvc.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
        stages = list(repo.index.stages)
    except DvcException as error:
        raise ConfigError(f"{root}: cannot read the DVC pipeline ({' '.join(str(error).split())})") from None
    found = []
    for stage in stages:
        files = []
        for out in stage.outs:
            path = Path(out.fs_path)
            # The stages' own metrics files are uncached JSON outs; only the report's headline is a declared
            # DVC metric (so that `dvc exp show` stays readable).
            if (out.metric or (not out.use_cache and path.suffix == ".json")) and path.is_file():
                files.append(path)
            elif out.plot and path.is_dir():
                files += sorted(path.rglob("*.csv"))
            elif out.plot and path.suffix == ".csv" and path.is_file():
                files.append(path)
        if not files:
            continue
        params = {}
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency) and isinstance(dep.hash_info.value, dict):
                params.update(dep.hash_info.value)
        found.append({"name": stage.addressing, "files": files, "params": params})
    return found


def metrics_json_points(path: Path, timestamp_ms: int) -> tuple[list[Metric], dict[str, str]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ConfigError(f"{path}: not a valid JSON metrics file ({' '.join(str(error).split())})") from None
    metrics, tags = [], {}

    def walk(value, keys: list[str]) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, keys + [str(key)])
        elif isinstance(value, (int, float)):  # bools too, as 0 / 1
            metrics.append(Metric("/".join(keys), float(value), timestamp_ms, 0))
        elif isinstance(value, str) and keys:
            tags["/".join(keys)] = value

    walk(content, [])
    return metrics, tags


def live_metric_name(column: str, csv_stem: str) -> str:
    group, _, rest = column.partition("_")
    if group in METRIC_GROUPS and rest:
        return f"{group}/{rest}"
    return f"{csv_stem}/{column}"


def plots_csv_points(path: Path, timestamp_ms: int) -> list[Metric]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(f"{path}: not a valid CSV plots file ({error})") from None
    metrics = []
    for line_number, row in enumerate(rows, start=2):
        try:
            step = int(float(row["step"])) if "step" in row else line_number - 2
            for column, text in row.items():
                if column in (None, "step") or text in (None, ""):
                    continue
                value = float(text)
                if not math.isnan(value):
                    metrics.append(Metric(live_metric_name(column, path.stem), value, timestamp_ms, step))
        except (TypeError, ValueError):
            raise ConfigError(f"{path}:{line_number}: not a number") from None
    return metrics


def files_sha256(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def replay(root: Path, experiment: str) -> list[tuple[str, str]]:
    """Replay every stage's DVC files into the store; returns [(stage, "replayed" | "unchanged")]."""
    stages = dvc_stages_with_metrics(root)
    uri = tracking_uri()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        client = _open_client(uri)
        experiment_id = _experiment_id(client, experiment, _artifact_location(uri))
    except Exception as error:
        raise ConfigError(f"MLflow store {uri} unusable: {type(error).__name__}: {' '.join(str(error).split())}") from None

    commit = _git("rev-parse", "HEAD") or "unknown"
    exp_name = os.environ.get("DVC_EXP_NAME")
    execution_id = f"replay-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
    parent_id = None
    outcome = []
    for stage in stages:
        sha256 = files_sha256(root, stage["files"])
        already = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`dvc.stage` = '{stage['name']}' and tags.`replay.files_sha256` = '{sha256}'",
            max_results=1,
        )
        if already:
            outcome.append((stage["name"], "unchanged"))
            continue

        metrics, metric_tags = [], {}
        # A stage with several metrics files (evaluate: Table 1's checkpoint and the compute-matched one, in
        # metrics/eval/ and metrics/eval_at_budget/) holds the same keys in each: its directory tells them apart.
        several_json = sum(path.suffix == ".json" for path in stage["files"]) > 1
        for path in stage["files"]:
            timestamp_ms = int(path.stat().st_mtime * 1000)
            if path.suffix == ".csv":
                metrics += plots_csv_points(path, timestamp_ms)
            else:
                points, tags = metrics_json_points(path, timestamp_ms)
                if several_json:
                    points = [Metric(f"{path.parent.name}/{m.key}", m.value, m.timestamp, m.step) for m in points]
                metrics += points
                metric_tags |= tags

        if parent_id is None:
            parent_tags = {"pipeline.execution_id": execution_id, "pipeline.parent": "true", "git.commit": commit,
                           "pipeline.replayed": "true"}
            if exp_name:
                parent_tags["dvc.exp_name"] = exp_name
            parent = client.create_run(experiment_id, tags=parent_tags, run_name=f"pipeline {execution_id}")
            client.set_terminated(parent.info.run_id, "FINISHED")
            parent_id = parent.info.run_id
        tags = metric_tags | {
            "dvc.stage": stage["name"],
            "git.commit": commit,
            "mlflow.parentRunId": parent_id,
            "pipeline.execution_id": execution_id,
            "pipeline.replayed": "true",
            "replay.files": ", ".join(str(path.relative_to(root)) for path in stage["files"]),
            "replay.files_sha256": sha256,
        }
        if exp_name:
            tags["dvc.exp_name"] = exp_name
        started_ms = min(int(path.stat().st_mtime * 1000) for path in stage["files"])
        run = client.create_run(experiment_id, start_time=started_ms, tags=tags, run_name=stage["name"])
        params = [Param(key, value) for key, value in flatten_params(stage["params"]).items()]
        for first in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=params[first : first + PARAMS_PER_BATCH])
        for first in range(0, len(metrics), METRICS_PER_BATCH):
            client.log_batch(run.info.run_id, metrics=metrics[first : first + METRICS_PER_BATCH])
        client.set_terminated(run.info.run_id, "FINISHED", end_time=max(int(p.stat().st_mtime * 1000) for p in stage["files"]))
        outcome.append((stage["name"], "replayed"))
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="minillm-distillation", help="MLflow experiment (the stages' default)")
    arguments = parser.parse_args()
    outcome = replay(Path.cwd().resolve(), arguments.experiment)
    for stage, status in outcome:
        print(f"replay_mlflow: {stage}: {status}")
    replayed = sum(status == "replayed" for _, status in outcome)
    print(f"replay_mlflow: {replayed} stage run(s) replayed into {tracking_uri()}, {len(outcome) - replayed} unchanged")


if __name__ == "__main__":
    exit_on_user_error(main)
