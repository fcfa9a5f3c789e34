import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.tracking import StageRun, flatten_params, pipeline_execution_id, tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating its tables takes seconds. Tests stay independent
    by using an experiment of their own."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


@pytest.fixture
def client(store_uri: str, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("MINILLM_PIPELINE_ID", raising=False)
    return MlflowClient(tracking_uri=store_uri)


def _git_repo_with_commit(path: Path) -> str:
    path.mkdir()
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    return head.stdout.strip()


def _start_ticks_of_this_process() -> int:
    # Field 22 of proc(5) stat; this test process's name has no spaces or parentheses.
    return int(Path("/proc/self/stat").read_text().split()[21])


def test_flatten_params_by_hand() -> None:
    params = {
        "model": {"name": "gpt2", "layers": [1, 2], "adapter": {"rank": 8, "dropout": None}},
        "lr": 0.001,
        "use_ptx": True,
        "prompt": "x" * 7000,
    }
    assert flatten_params(params) == {
        "model.name": "gpt2",
        "model.layers": "[1, 2]",
        "model.adapter.rank": "8",
        "model.adapter.dropout": "None",
        "lr": "0.001",
        "use_ptx": "True",
        "prompt": "x" * 6000,
    }
    assert flatten_params({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": "1"}


def test_tracking_uri_prefers_env_then_dvc_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    monkeypatch.setenv("DVC_ROOT", "/somewhere")
    assert tracking_uri() == "http://tracking.example:5000"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", "repo")  # relative, as a user might export it
    assert tracking_uri() == f"sqlite:///{tmp_path}/repo/mlflow.db"
    assert tracking_uri().startswith("sqlite:////")  # four slashes: an absolute SQLite path


def test_tracking_uri_falls_back_to_git_root_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    repo = tmp_path / "repo"
    _git_repo_with_commit(repo)
    (repo / "stages").mkdir()
    monkeypatch.chdir(repo / "stages")
    assert tracking_uri() == f"sqlite:///{repo.resolve()}/mlflow.db"

    (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path / "plain")
    assert tracking_uri() == f"sqlite:///{tmp_path}/plain/mlflow.db"


def test_execution_id_outside_dvc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINILLM_PIPELINE_ID", raising=False)
    own = pipeline_execution_id()
    assert own == pipeline_execution_id()
    assert own.split("-")[:2] == [str(os.getpid()), str(_start_ticks_of_this_process())]

    monkeypatch.setenv("MINILLM_PIPELINE_ID", "nightly-42")
    assert pipeline_execution_id() == "nightly-42"


def test_execution_id_is_shared_by_the_stages_of_one_dvc_process(tmp_path: Path) -> None:
    """A fake `dvc` runs two 'stages' through a shell, as `dvc repro` does: both must report the
    same id, derived from the dvc process, even though MINILLM_PIPELINE_ID is set."""
    stage = "from pipeline.tracking import pipeline_execution_id; print(pipeline_execution_id())"
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text(
        f"#!{sys.executable}\n"
        "import os, subprocess, sys\n"
        "print(os.getpid(), flush=True)\n"
        "for _ in range(2):\n"
        f"    subprocess.run(['bash', '-c', {f'{sys.executable} -c {stage!r}'!r}], check=True)\n"
    )
    fake_dvc.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MINILLM_PIPELINE_ID": "from-env"}
    result = subprocess.run(
        [str(fake_dvc), "repro"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    dvc_pid, first_stage_id, second_stage_id = result.stdout.split()
    assert first_stage_id == second_stage_id
    assert first_stage_id.split("-")[0] == dvc_pid


def test_stages_of_one_execution_nest_under_one_parent(
    client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = _git_repo_with_commit(tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setenv("MINILLM_PIPELINE_ID", "exec-A")
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lamb")
    experiment = "nesting"

    with StageRun("pretrain", {"model": {"name": "gpt2"}, "lr": 0.01}, experiment=experiment) as pre:
        for step in range(3):
            pre.log_metrics({"loss": 10.0 - step}, step=step)
    with StageRun(
        "distill", {"kd": {"alpha": 0.2, "layers": [1, 2]}}, tags={"owner": "me"}, experiment=experiment
    ) as dist:
        for step in range(120):
            dist.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.5}, step=step)
    monkeypatch.setenv("MINILLM_PIPELINE_ID", "exec-B")
    with StageRun("pretrain", {}, experiment=experiment) as other:
        pass

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = {run.info.run_id: run for run in client.search_runs([experiment_id])}
    assert len(runs) == 5  # two parents, three children
    parents = [run for run in runs.values() if run.data.tags.get("pipeline.parent") == "true"]
    parent_a = next(p for p in parents if p.data.tags["pipeline.execution_id"] == "exec-A")
    parent_b = next(p for p in parents if p.data.tags["pipeline.execution_id"] == "exec-B")
    assert parent_a.info.status == "FINISHED"
    assert parent_a.data.tags["git.commit"] == commit
    assert parent_a.data.tags["dvc.exp_name"] == "brisk-lamb"
    # Named so that a person recognises it, and spanning its children in the UI.
    assert re.fullmatch(rf"brisk-lamb {commit[:7]} \d{{4}}-\d\d-\d\d \d\d:\d\d", parent_a.info.run_name)
    assert parent_a.info.start_time <= runs[pre.run_id].info.start_time
    assert parent_a.info.end_time >= runs[dist.run_id].info.end_time > runs[pre.run_id].info.end_time
    # MLflow 3's UI opens an experiment of this kind on its runs table, not on the GenAI overview.
    assert client.get_experiment_by_name(experiment).tags["mlflow.experimentKind"] == "custom_model_development"

    pre_run, dist_run, other_run = runs[pre.run_id], runs[dist.run_id], runs[other.run_id]
    assert pre_run.data.tags["mlflow.parentRunId"] == parent_a.info.run_id
    assert dist_run.data.tags["mlflow.parentRunId"] == parent_a.info.run_id
    assert other_run.data.tags["mlflow.parentRunId"] == parent_b.info.run_id
    assert pre_run.info.run_name == "pretrain"
    assert dist_run.data.tags["dvc.stage"] == "distill"
    assert dist_run.data.tags["owner"] == "me"
    assert dist_run.data.tags["git.commit"] == commit
    assert dist_run.data.tags["dvc.exp_name"] == "brisk-lamb"
    assert dist_run.data.tags["pipeline.execution_id"] == "exec-A"
    assert dist_run.data.tags["process.pid"] == str(os.getpid())
    assert dist_run.data.tags["process.host"] == socket.gethostname()
    assert dist_run.info.status == "FINISHED"
    assert pre_run.data.params == {"model.name": "gpt2", "lr": "0.01"}
    assert dist_run.data.params == {"kd.alpha": "0.2", "kd.layers": "[1, 2]"}

    history = sorted(client.get_metric_history(dist.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(120))
    assert [m.value for m in history] == [1.0 / (step + 1) for step in range(120)]
    assert len(client.get_metric_history(dist.run_id, "lr")) == 120
    pre_history = sorted(client.get_metric_history(pre.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in pre_history] == [(0, 10.0), (1, 9.0), (2, 8.0)]
    assert abs(pre_history[0].timestamp / 1000 - time.time()) < 60


def test_metrics_reach_the_store_before_the_stage_ends(client: MlflowClient) -> None:
    with StageRun("distill", {}, experiment="live-metrics") as run:
        for step in range(60):
            run.log_metrics({"loss": float(step)}, step=step)
        visible_mid_run = len(client.get_metric_history(run.run_id, "loss"))
    assert 50 <= visible_mid_run < 60
    assert len(client.get_metric_history(run.run_id, "loss")) == 60


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (None, "FINISHED"),
        (ValueError("diverged"), "FAILED"),
        (KeyboardInterrupt(), "KILLED"),
        (SystemExit(1), "KILLED"),
        (SystemExit(0), "FINISHED"),
    ],
)
def test_exit_status(client: MlflowClient, error: BaseException | None, status: str) -> None:
    stage_run = StageRun("evaluate", {}, experiment="exit-status")
    if error is None:
        with stage_run:
            stage_run.log_metrics({"rougeL": 0.3})
    else:
        with pytest.raises(type(error)):
            with stage_run:
                stage_run.log_metrics({"rougeL": 0.3})
                raise error
    run = client.get_run(stage_run.run_id)
    assert run.info.status == status
    assert run.data.metrics == {"rougeL": 0.3}  # flushed even when the stage died


def test_runs_of_dead_processes_are_marked_killed(client: MlflowClient) -> None:
    experiment_id = client.create_experiment("stale")
    exited = subprocess.Popen(["true"])
    exited.wait()
    host = socket.gethostname()
    own_ticks = _start_ticks_of_this_process()

    def running_run(tags: dict[str, str]) -> str:
        return client.create_run(experiment_id, tags=tags).info.run_id

    dead = running_run({"process.host": host, "process.pid": str(exited.pid)})
    pid_reused = running_run(
        {"process.host": host, "process.pid": str(os.getpid()), "process.start_ticks": str(own_ticks - 1)}
    )
    alive = running_run(
        {"process.host": host, "process.pid": str(os.getpid()), "process.start_ticks": str(own_ticks)}
    )
    other_host = running_run({"process.host": f"not-{host}", "process.pid": str(exited.pid)})

    with StageRun("distill", {}, experiment="stale"):
        pass

    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(pid_reused).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(other_host).info.status == "RUNNING"


def test_a_parent_whose_first_stage_was_killed_is_marked_killed(client: MlflowClient, tmp_path: Path) -> None:
    """kill -9 of the first stage of a `dvc repro` leaves its run and the parent RUNNING: the next execution's
    first stage marks both KILLED, so that no run is left RUNNING after a rerun."""
    killed_stage = ("import os\nfrom pipeline.tracking import StageRun\n"
                    "with StageRun('build_data', {}, experiment='killed'):\n    os.kill(os.getpid(), 9)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MINILLM_PIPELINE_ID": "killed-run"}
    assert subprocess.run([sys.executable, "-c", killed_stage], env=env, cwd=tmp_path).returncode == -9
    experiment_id = client.get_experiment_by_name("killed").experiment_id
    assert {r.info.status for r in client.search_runs([experiment_id])} == {"RUNNING"}
    with StageRun("build_data", {}, experiment="killed"):
        pass
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment_id])
                if r.data.tags.get("pipeline.execution_id") == "killed-run"}
    assert list(statuses.values()) == ["KILLED", "KILLED"]
    [parent] = [r for r in client.search_runs([experiment_id]) if r.data.tags.get("pipeline.parent") == "true"
                and r.data.tags["pipeline.execution_id"] == "killed-run"]
    assert parent.info.run_name.startswith("dvc repro unknown ")  # outside git, no DVC experiment


def test_artifacts_are_stored_beside_the_sqlite_store(
    client: MlflowClient, store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cwd that DVC would delete afterwards (queued experiments run in temporary copies).
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "report.md"
    report.write_text("# results\n")
    with StageRun("report", {}, experiment="artifacts") as run:
        run.log_artifact(report, artifact_path="reports")
        run.set_tags({"best": "student"})

    assert [a.path for a in client.list_artifacts(run.run_id, "reports")] == ["reports/report.md"]
    store_dir = Path(store_uri.removeprefix("sqlite:///")).parent
    stored = store_dir / "mlartifacts" / run.run_id / "artifacts" / "reports" / "report.md"
    assert stored.read_text() == "# results\n"
    assert not (tmp_path / "mlruns").exists()
    assert client.get_run(run.run_id).data.tags["best"] == "student"


@pytest.mark.parametrize("broken", ["http://127.0.0.1:1", "sqlite:///{tmp_path}/a_file/mlflow.db"])
def test_unusable_store_warns_once_and_the_stage_runs(
    broken: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    uri = broken.format(tmp_path=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capfd.readouterr()

    started = time.monotonic()
    body_ran = False
    with StageRun("distill", {"lr": 1}) as run:
        for step in range(120):
            run.log_metrics({"loss": 1.0}, step=step)
        run.log_artifact(tmp_path / "a_file")
        run.set_tags({"k": "v"})
        body_ran = True
    elapsed = time.monotonic() - started

    assert body_ran
    assert run.run_id is None
    assert elapsed < 15
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert uri in lines[0]


def test_disabled_run_never_touches_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """A non-main rank: even a broken store must stay silent, since it is never contacted."""
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/a_file/mlflow.db")
    capfd.readouterr()
    with StageRun("distill", {"lr": 1}, enabled=False) as run:
        run.log_metrics({"loss": 1.0}, step=0)
        run.log_artifact(tmp_path / "a_file")
        run.set_tags({"k": "v"})
    assert run.run_id is None
    assert capfd.readouterr().err == ""


@pytest.mark.slow
def test_concurrent_stages_can_create_a_fresh_store(tmp_path: Path) -> None:
    """Parallel queued experiments (`dvc queue start -j 3`) open a store that does not exist yet."""
    stage = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.tracking import StageRun\n"
        "Path(sys.argv[1] + '.ready').touch()\n"
        "while not Path(sys.argv[1]).parent.joinpath('go').exists():\n"
        "    time.sleep(0.01)\n"
        "with StageRun('distill', {'lr': 1}) as run:\n"
        "    run.log_metrics({'loss': 1.0}, step=0)\n"
        "print(run.run_id)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    stages = [
        subprocess.Popen(
            [sys.executable, "-c", stage, str(tmp_path / f"stage{i}")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(3)
    ]
    while len(list(tmp_path.glob("*.ready"))) < 3:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outputs = [stage.communicate(timeout=60) for stage in stages]

    assert [err for _, err in outputs] == ["", "", ""]
    run_ids = [out.strip() for out, _ in outputs]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert [client.get_run(run_id).info.status for run_id in run_ids] == ["FINISHED"] * 3
