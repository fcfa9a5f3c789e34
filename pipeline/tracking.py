"""MLflow tracking for the DVC stages of the pipeline.

Every stage (build_data, pretrain, train_teacher, init_student, distill, evaluate, report) is its
own `python stages/<x>.py` process started by `dvc repro` / `dvc exp run`, and each one wraps its
work in `with StageRun(stage, params) as run:`. Runs are grouped per pipeline execution:

    dvc repro 1a2b3c4 2026-12-01 21:05   parent run (or the experiment's name for `dvc exp run`), tags
                                         pipeline.parent=true, pipeline.execution_id
    ├── build_data                   child runs, tag mlflow.parentRunId=<parent> (the UI nests them)
    ├── distill
    └── ...

The stage processes share nothing but the store, so the parent is found by searching the
experiment for the execution id: the first stage of an execution creates it, later stages find it,
and every stage moves its end time to its own end, so that it spans its children in the UI.
The experiment is tagged as a model-training one (`mlflow.experimentKind`). MLflow 3.17's UI still
opens every experiment on its GenAI overview (traces, tokens) unless the address asks for the runs
table: `ui_address` gives it (`?workflowType=machine_learning`), and the report stage prints it.

The execution id is the pid + start time of the nearest ancestor `dvc` process, so every stage
of one `dvc repro` agrees on it and two executions never do; outside DVC, stages can be grouped
by exporting MINILLM_PIPELINE_ID (see `pipeline_execution_id`).

The store is `sqlite:///<repo root>/mlflow.db` (artifacts in `<repo root>/mlartifacts/`) unless
MLFLOW_TRACKING_URI says otherwise. DVC sets DVC_ROOT for stage commands, and for queued or
temp-dir experiments (`dvc exp run --queue` + `dvc queue start`, `dvc exp run --temp`) it points
DVC_ROOT at the ORIGINAL repository rather than the temporary copy the experiment runs in, so all
experiments land in the one store. Browse it from the repo root with

    mlflow ui --backend-store-uri sqlite:///mlflow.db

A stage killed with SIGKILL cannot close its run; the next stage started on the same host marks
such runs KILLED, recognising them by their `process.host`, `process.pid` and `process.start_ticks`
tags. An unreachable or broken store costs one warning line on stderr and turns tracking off:
a training stage must never fail because of bookkeeping.
"""

import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

# One SQLite transaction per training step would dominate a fast step; 50 keeps the UI near-live.
METRICS_PER_FLUSH = 50
# MLflow rejects a log_batch holding more than 100 params and param values over 6000 characters.
PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE_CHARS = 6000

_IMPORTED_AT_NS = time.time_ns()


def tracking_uri() -> str:
    """Where runs are stored: MLFLOW_TRACKING_URI, else mlflow.db at the root of the repository."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if os.environ.get("DVC_ROOT"):
        root = os.path.abspath(os.environ["DVC_ROOT"])
    else:
        root = _git("rev-parse", "--show-toplevel") or os.getcwd()
    return f"sqlite:///{root}/mlflow.db"


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are a flat map of strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_params(value, name))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)[:MAX_PARAM_VALUE_CHARS]
        else:
            flat[name] = str(value)[:MAX_PARAM_VALUE_CHARS]
    return flat


def pipeline_execution_id() -> str:
    """Identifies one `dvc repro` / `dvc exp run` execution, the same in all of its stage processes.

    DVC starts each stage command (through a shell) below the dvc process that runs the execution
    (`dvc exp exec-run` for queued experiments), so the nearest dvc ancestor is that execution.
    Its pid alone could be reused by a later execution, hence pid + start time + boot id.
    """
    pid = os.getppid()
    while pid > 0:
        stat = _read_stat(pid)
        if stat is None:
            break
        parent_pid, start_ticks = stat
        if _runs_dvc(_read_cmdline(pid)):
            return f"{pid}-{start_ticks}-{_boot_id()}"
        pid = parent_pid
    if os.environ.get("MINILLM_PIPELINE_ID"):
        return os.environ["MINILLM_PIPELINE_ID"]
    own_stat = _read_stat(os.getpid())
    if own_stat is None:  # no /proc (not Linux): the import time stands in for the start time
        return f"{os.getpid()}-{_IMPORTED_AT_NS}"
    return f"{os.getpid()}-{own_stat[1]}-{_boot_id()}"


class StageRun:
    """An MLflow run for one DVC stage, nested under its pipeline execution's parent run.

    Uses its own MlflowClient rather than mlflow's global active run, so several can coexist.
    `enabled=False` (the non-main ranks of a data-parallel stage) never touches the store and makes
    every method a no-op, so one stage yields one run however many processes it spans.
    """

    def __init__(
        self,
        stage: str,
        params: dict,
        *,
        tags: dict[str, str] | None = None,
        experiment: str = "minillm-distillation",
        enabled: bool = True,
    ) -> None:
        self.stage = stage
        self.params = params
        self.extra_tags = tags or {}
        self.experiment = experiment
        self.enabled = enabled
        self.uri = tracking_uri()
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: MlflowClient | None = None
        self._parent_id: str | None = None
        self._pending_metrics: list[Metric] = []

    def __enter__(self) -> "StageRun":
        if not self.enabled:
            return self
        # MLflow's defaults retry a dead server for minutes; a stage should lose seconds at most.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        try:
            self._start()
        except Exception as error:  # bookkeeping must never stop a training stage
            self._disable(error)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        elif isinstance(exc, SystemExit):
            status = "FINISHED" if exc.code in (0, None) else "KILLED"
        else:
            status = "FAILED"
        self._flush_metrics()
        if self._client is not None:
            try:
                self._client.set_terminated(self.run_id, status)
                # The parent ends with its latest child, in that child's state (a failed stage stops `dvc repro`).
                self._client.set_terminated(self._parent_id, status)
            except Exception as error:
                self._disable(error)
        return False

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._client is None:
            return
        timestamp_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending_metrics.append(Metric(key, float(value), timestamp_ms, step or 0))
        if len(self._pending_metrics) >= METRICS_PER_FLUSH:
            self._flush_metrics()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copies a file, or a directory with its contents, into the run's artifacts."""
        if self._client is None:
            return
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as error:
            self._disable(error)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._client is None:
            return
        try:
            run_tags = [RunTag(key, str(value)) for key, value in tags.items()]
            self._client.log_batch(self.run_id, tags=run_tags)
        except Exception as error:
            self._disable(error)

    def log_child_run(self, name: str, tags: dict[str, str], metrics: dict[str, float]) -> None:
        """A finished run nested under this one, with this run's tags plus `tags`, holding `metrics`: the evaluate
        stage logs one per evaluation set, so that filters such as `tags.eval_set = 'sni'` select single sets."""
        if self._client is None:
            return
        try:
            stage_run = self._client.get_run(self.run_id)
            shared = ("git.commit", "pipeline.execution_id", "dvc.exp_name")
            child_tags = {key: value for key, value in stage_run.data.tags.items() if key in shared}
            child_tags |= self.extra_tags | {"dvc.stage": self.stage, "mlflow.parentRunId": self.run_id} | tags
            child = self._client.create_run(stage_run.info.experiment_id, tags=child_tags, run_name=name)
            timestamp_ms = int(time.time() * 1000)
            child_metrics = [Metric(key, float(value), timestamp_ms, 0) for key, value in metrics.items()]
            self._client.log_batch(child.info.run_id, metrics=child_metrics)
            self._client.set_terminated(child.info.run_id, "FINISHED")
        except Exception as error:
            self._disable(error)

    def _start(self) -> None:
        client = _open_client(self.uri)
        experiment_id = _experiment_id(client, self.experiment, _artifact_location(self.uri))
        host = socket.gethostname()
        _mark_dead_runs_killed(client, experiment_id, host)

        execution_id = pipeline_execution_id()
        commit = _git("rev-parse", "HEAD") or "unknown"
        exp_name = os.environ.get("DVC_EXP_NAME")
        process = {"process.pid": str(os.getpid()), "process.host": host}
        own_stat = _read_stat(os.getpid())
        if own_stat is not None:
            process["process.start_ticks"] = str(own_stat[1])
        parent_id = _parent_run_id(client, experiment_id, execution_id, commit, exp_name, process)

        tags = {
            "dvc.stage": self.stage,
            "git.commit": commit,
            "mlflow.parentRunId": parent_id,
            "pipeline.execution_id": execution_id,
            **process,
        }
        if exp_name:
            tags["dvc.exp_name"] = exp_name
        tags.update(self.extra_tags)
        run = client.create_run(experiment_id, tags=tags, run_name=self.stage)

        params = [Param(key, value) for key, value in flatten_params(self.params).items()]
        for first in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=params[first : first + PARAMS_PER_BATCH])
        self._client = client
        self.experiment_id = experiment_id
        self._parent_id = parent_id
        self.run_id = run.info.run_id

    def _flush_metrics(self) -> None:
        if self._client is None or not self._pending_metrics:
            return
        try:
            self._client.log_batch(self.run_id, metrics=self._pending_metrics)
        except Exception as error:
            self._disable(error)
        self._pending_metrics = []

    def _disable(self, error: Exception) -> None:
        """Turns every later call into a no-op, after one line on stderr saying why."""
        message = " ".join(str(error).split())
        print(
            f"[tracking] MLflow store {self.uri} unusable, tracking disabled: "
            f"{type(error).__name__}: {message}",
            file=sys.stderr,
        )
        self._client = None
        self.run_id = None


# MLflow 3's UI opens an experiment by this tag: on the runs table for model training, on traces for GenAI.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ui_address(experiment_id: str, port: int = 5000) -> str:
    """The experiment's runs table in a local `mlflow ui`. MLflow 3.17 decides between its GenAI and model-training
    pages by a switch kept in the browser (default GenAI), not by the experiment's kind tag; this parameter sets it."""
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}?workflowType=machine_learning"


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
        except MlflowException:  # a stage of a parallel queued experiment created it meanwhile
            experiment = client.get_experiment_by_name(name)
    if not EXPERIMENT_KIND.items() <= experiment.tags.items():  # a store from before the tag
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _open_client(uri: str) -> MlflowClient:
    """Opening a SQLite store creates or migrates its tables, which is not safe to do from two
    processes at once (`dvc queue start -j 2` on a fresh repo): it leaves a half-migrated database
    that every later stage fails on. A lock file keyed by the database path serialises the opening."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    db_key = hashlib.sha256(str(_sqlite_db_path(uri)).encode()).hexdigest()[:16]
    lock_fd = os.open(Path(tempfile.gettempdir()) / f"mlflow-{db_key}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=uri)
    finally:
        os.close(lock_fd)  # releases the lock


def _sqlite_db_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///")).resolve()


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite store; MLflow would put them in ./mlruns of whatever the cwd is
    (a queued experiment's temporary copy, which DVC deletes)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (_sqlite_db_path(uri).parent / "mlartifacts").as_uri()


def _parent_run_id(
    client: MlflowClient,
    experiment_id: str,
    execution_id: str,
    commit: str,
    exp_name: str | None,
    process: dict[str, str],
) -> str:
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`pipeline.execution_id` = '{execution_id}' and tags.`pipeline.parent` = 'true'"
        ),
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    # The creating stage's process tags: if it is killed before it ends the parent, the next stage's
    # _mark_dead_runs_killed marks the parent KILLED instead of leaving it RUNNING.
    tags = {"pipeline.execution_id": execution_id, "pipeline.parent": "true", "git.commit": commit, **process}
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    # A name a person recognises: the DVC experiment, or `dvc repro` at a commit, and when it started.
    started = time.strftime("%Y-%m-%d %H:%M")
    parent = client.create_run(experiment_id, tags=tags, run_name=f"{exp_name or 'dvc repro'} {commit[:7]} {started}")
    return parent.info.run_id


def _mark_dead_runs_killed(client: MlflowClient, experiment_id: str, host: str) -> None:
    """Runs still RUNNING whose process on this host is gone were SIGKILLed (OOM killer, kill -9)."""
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'",
    )
    for run in running:
        start_ticks = run.data.tags.get("process.start_ticks")
        pid = int(run.data.tags["process.pid"])
        if not _is_alive(pid, int(start_ticks) if start_ticks else None):
            client.set_terminated(run.info.run_id, "KILLED")


def _is_alive(pid: int, start_ticks: int | None) -> bool:
    """Whether the process that had `pid` and started at `start_ticks` still runs; a pid that was
    reused by a newer process has a different start time."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    stat = _read_stat(pid)
    return start_ticks is None or stat is None or stat[1] == start_ticks


def _read_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) from /proc/<pid>/stat; None without it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    fields_from_state = stat[stat.rindex(")") + 2 :].split()
    return int(fields_from_state[1]), int(fields_from_state[19])


def _read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def _runs_dvc(argv: list[str]) -> bool:
    """True for `dvc ...`, `python /venv/bin/dvc ...`, `python -m dvc ...`, and DVC's own
    background processes (`python .../dvc/__main__.py exp queue-worker ...`)."""
    if any(os.path.basename(arg) == "dvc" for arg in argv[:2]):
        return True
    if argv[1:3] == ["-m", "dvc"]:
        return True
    return len(argv) > 1 and argv[1].endswith(os.path.join("dvc", "__main__.py"))


def _boot_id() -> str:
    """Start ticks restart at every boot; the boot id keeps ids from two boots (or hosts) apart."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text()[:8]
    except OSError:
        return "noboot"


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    except OSError:  # git not installed
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip()
