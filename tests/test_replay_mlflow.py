"""`python -m pipeline.replay_mlflow`: the DVC metrics and plots files replayed into a store as nested stage runs."""

import json
import sys

import pytest
from dvc.repo import Repo
from mlflow import MlflowClient

from pipeline import replay_mlflow

DVC_YAML = """
stages:
  train:
    foreach: [small, large]
    do:
      cmd: python train.py ${item}
      params:
        - lr
        - models.${item}
      outs:
        - models/${item}
        - metrics/train/${item}.json: {cache: false}    # a metrics file as the pipeline declares it: an uncached out
      plots:
        - plots/train/${item}: {cache: false}
  evaluate:
    cmd: python evaluate.py
    metrics:
      - metrics/eval.json: {cache: false}
  evaluate_both:                                       # two checkpoints' metrics files, as dvc.yaml's evaluate has
    cmd: python evaluate.py --both
    outs:
      - metrics/eval/kd.json: {cache: false}
      - metrics/eval_at_budget/kd.json: {cache: false}
  build:
    cmd: python build.py
    outs: [data]
"""

PARAMS = {"lr": 0.01, "models": {"small": {"layers": 2}, "large": {"layers": 4}}}

# dvc.lock holds the params values each stage ran with: the replayed runs must log those.
DVC_LOCK = """
schema: '2.0'
stages:
  train@small:
    cmd: python train.py small
    params:
      params.yaml:
        lr: 0.005
        models.small:
          layers: 2
"""


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds); each test uses its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


@pytest.fixture
def workspace(tmp_path, monkeypatch, store_uri):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    (tmp_path / "params.yaml").write_text(json.dumps(PARAMS))
    Repo.init(str(tmp_path), no_scm=True)
    for size, losses in (("small", [3.0, 2.5, 2.25]), ("large", [2.0, 1.5, 1.0])):
        (tmp_path / "plots" / "train" / size).mkdir(parents=True)
        (tmp_path / "plots" / "train" / size / "train.csv").write_text(
            "step,train_loss,lr,rollout_reward_mean\n" + "".join(f"{i + 1},{loss},0.01,{-loss}\n" for i, loss in enumerate(losses))
        )
        (tmp_path / "plots" / "train" / size / "valid.csv").write_text("step,valid_rouge_l\n3,21.5\n")
        (tmp_path / "metrics" / "train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "metrics" / "train" / f"{size}.json").write_text(json.dumps({"final_loss": losses[-1], "steps": 3}))
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(
        {"method": "kd", "student": "small", "sets": {"sni": {"rouge_l": 30.5, "per_seed": {"10": 30.0, "20": 31.0}}}}
    ))
    for directory, rouge_l in (("eval", 30.5), ("eval_at_budget", 28.0)):
        (tmp_path / "metrics" / directory).mkdir()
        (tmp_path / "metrics" / directory / "kd.json").write_text(json.dumps({"method": "kd", "sets": {"sni": {"rouge_l": rouge_l}}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def runs_by_name(client, experiment):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id])


def test_replay_creates_one_nested_run_per_stage_with_the_files_metrics(workspace, store_uri):
    outcome = replay_mlflow.replay(workspace.resolve(), "replayed")
    assert sorted(outcome) == [("evaluate", "replayed"), ("evaluate_both", "replayed"), ("train@large", "replayed"),
                               ("train@small", "replayed")]

    client = MlflowClient(tracking_uri=store_uri)
    runs = runs_by_name(client, "replayed")
    parents = [r for r in runs if r.data.tags.get("pipeline.parent") == "true"]
    assert len(parents) == 1 and len(runs) == 5  # the stage without metrics files gets no run
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert set(children) == {"train@small", "train@large", "evaluate", "evaluate_both"}
    for name, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["dvc.stage"] == name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["pipeline.execution_id"] == parent.data.tags["pipeline.execution_id"]
        assert run.data.tags["pipeline.replayed"] == "true"
        assert "git.commit" in run.data.tags

    small = children["train@small"]
    history = sorted(client.get_metric_history(small.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5), (3, 2.25)]
    assert [m.value for m in client.get_metric_history(small.info.run_id, "rollout/reward_mean")] == [-3.0, -2.5, -2.25]
    assert len(client.get_metric_history(small.info.run_id, "train/lr")) == 3  # `lr` in train.csv is train/lr live
    assert [(m.step, m.value) for m in client.get_metric_history(small.info.run_id, "valid/rouge_l")] == [(3, 21.5)]
    assert small.data.metrics["final_loss"] == 2.25 and small.data.metrics["steps"] == 3
    assert small.data.params == {"lr": "0.005", "models.small.layers": "2"}  # from dvc.lock, not params.yaml
    assert small.data.tags["replay.files"] == (
        "metrics/train/small.json, plots/train/small/train.csv, plots/train/small/valid.csv"
    )
    large = children["train@large"]
    assert [m.value for m in client.get_metric_history(large.info.run_id, "train/loss")] == [2.0, 1.5, 1.0]

    evaluate = children["evaluate"]
    assert evaluate.data.metrics == {"sets/sni/rouge_l": 30.5, "sets/sni/per_seed/10": 30.0, "sets/sni/per_seed/20": 31.0}
    assert evaluate.data.tags["method"] == "kd" and evaluate.data.tags["student"] == "small"
    # Each file's directory keeps its numbers apart: the same key in both would hold one value only.
    both = children["evaluate_both"]
    assert both.data.metrics == {"eval/sets/sni/rouge_l": 30.5, "eval_at_budget/sets/sni/rouge_l": 28.0}
    assert both.data.tags["method"] == "kd"


def test_replaying_again_adds_only_changed_stages(workspace, store_uri):
    replay_mlflow.replay(workspace.resolve(), "again")
    assert [status for _, status in replay_mlflow.replay(workspace.resolve(), "again")] == ["unchanged"] * 4
    client = MlflowClient(tracking_uri=store_uri)
    assert len(runs_by_name(client, "again")) == 5

    (workspace / "metrics" / "eval.json").write_text(json.dumps({"sets": {"sni": {"rouge_l": 40.0}}}))
    assert sorted(replay_mlflow.replay(workspace.resolve(), "again")) == [
        ("evaluate", "replayed"), ("evaluate_both", "unchanged"), ("train@large", "unchanged"), ("train@small", "unchanged")
    ]
    assert len(runs_by_name(client, "again")) == 7  # a second parent and the new evaluate run


def test_command_line_and_its_errors(workspace, store_uri, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["replay_mlflow", "--experiment", "cli"])
    replay_mlflow.exit_on_user_error(replay_mlflow.main)
    out = capsys.readouterr().out
    assert "replay_mlflow: train@small: replayed" in out
    assert out.strip().splitlines()[-1] == f"replay_mlflow: 4 stage run(s) replayed into {store_uri}, 0 unchanged"

    (workspace / "plots" / "train" / "small" / "valid.csv").write_text("step,valid_rouge_l\n3,high\n")
    with pytest.raises(SystemExit) as exited:
        replay_mlflow.exit_on_user_error(replay_mlflow.main)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {workspace.resolve()}/plots/train/small/valid.csv:2: not a number"

    (workspace / "a_file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace}/a_file/mlflow.db")
    (workspace / "plots" / "train" / "small" / "valid.csv").write_text("step,valid_rouge_l\n3,21.5\n")
    with pytest.raises(SystemExit) as exited:
        replay_mlflow.exit_on_user_error(replay_mlflow.main)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: MLflow store sqlite:///{workspace}/a_file/mlflow.db unusable:") and "\n" not in err
