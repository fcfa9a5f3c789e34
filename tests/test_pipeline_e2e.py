"""End to end: `dvc repro` of the micro config in a temporary copy of the repo, MLflow in a temporary store.

One pipeline run (module fixture) is shared by the checks: every stage ran, the report has every method,
the MLflow store holds one parent run with a finished child per stage, a second `dvc repro` does nothing,
an evaluation-only param change retrains nothing, two queued experiments run at once into the one MLflow store,
and a typo in params.yaml stops `dvc repro` with one line.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.report import METHOD_NAMES
from tests.workspace import copy_sources, run

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ("tiny", "tiny2")  # tests/micro_params.yaml: two students, so every student stage is a matrix
TRAIN_SEED = 1234  # tests/micro_params.yaml train_seeds
METHODS = {"teacher", "sft", "sft_long", "kd", "seqkd", "minillm", "gkd", "distillm", "opd"}
EVALUATIONS = {"evaluate_teacher"} | {f"evaluate_sft@{s}-{TRAIN_SEED}" for s in STUDENTS} | {
    f"evaluate@{m}-{s}-{TRAIN_SEED}" for m in METHODS - {"teacher", "sft"} for s in STUDENTS}
TRAINING = {f"{stage}@{s}-{TRAIN_SEED}" for stage in ("init_student", *(f"distill_{m}" for m in METHODS - {"teacher", "sft"}))
            for s in STUDENTS}
STAGES = ({"check_params", "build_data", "pretrain_teacher", "train_teacher", "teacher_generate", "report"}
          | {f"pretrain_student@{s}" for s in STUDENTS} | TRAINING | EVALUATIONS)

pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("repo")
    copy_sources(workdir)
    shutil.copy(REPO / "tests" / "micro_params.yaml", workdir / "params.yaml")
    (workdir / "reports").mkdir(exist_ok=True)
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow-test.db'}",
        "OMP_NUM_THREADS": "2",
        # tests/audit/sitecustomize.py logs every file each stage process opens (the stage contract).
        "PYTHONPATH": str(workdir / "tests" / "audit"),
        "STAGE_AUDIT_DIR": str(tmp_path_factory.mktemp("stage-audit")),
    }
    # Other tests may have initialised torch.distributed in this process: its rendezvous must not leak into DVC's.
    for inherited in ("DVC_ROOT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(inherited, None)
    run(["git", "init", "-q"], workdir, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], workdir, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot"], workdir, env)
    first = run(["dvc", "repro"], workdir, env)
    # As a user does after a run, and as queued experiments need: their copies start from the commit, so the lock and
    # the uncached metrics files (git-tracked, not in DVC's cache) must be in it or every stage reruns there.
    run(["git", "add", "-A", "--", ".", ":!mlflow-test.db"], workdir, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "dvc repro"], workdir, env)
    return workdir, env, first


def test_every_stage_ran_and_the_report_has_every_method(pipeline):
    workdir, _, first = pipeline
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, stage
    results = pd.read_csv(workdir / "reports" / "results.csv")
    assert list(results.columns) == ["method", "student", "train_seed", "eval_set", "seed", "rouge_l"]
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    assert set(results["method"]) == METHODS
    assert set(results["student"]) == {"micro-T", *STUDENTS}
    assert set(results["eval_set"]) == {"dollyeval", "selfinst", "vicunaeval", "sni", "unni"}
    assert len(results) == len(EVALUATIONS) * 5 * len(params["evaluate"]["seeds"])
    assert results["rouge_l"].between(0, 100).all()
    table = (workdir / "reports" / "table1.md").read_text()
    for name in ("Teacher", "SFT w/o KD", "KD", "SeqKD", "MiniLLM", "DollyEval", "±"):
        assert name in table
    metrics = json.loads((workdir / "metrics" / "eval" / f"minillm-tiny-seed{TRAIN_SEED}.json").read_text())
    assert set(metrics["sets"]["dollyeval"]["per_seed"]) == {str(s) for s in params["evaluate"]["seeds"]}
    # Each model is of its family (tests/micro_params.yaml), from its base to its distilled student.
    seed_dir = f"seed{TRAIN_SEED}"
    for model_dir, family in (("teacher/sft", "llama"), (f"tiny/{seed_dir}/minillm/model", "gpt2"),
                              (f"tiny2/{seed_dir}/minillm/model", "qwen2"), (f"tiny2/{seed_dir}/gkd/model", "qwen2")):
        config = json.loads((workdir / "models" / model_dir / "config.json").read_text())
        assert config["model_type"] == family, model_dir
    rollouts = sorted((workdir / "models" / "tiny2" / f"seed{TRAIN_SEED}" / "minillm" / "rollouts").glob("round_*.pt"))
    assert rollouts, "MiniLLM rollout buffers are saved"
    # The compute-matched table: every method and student; each run's row says what its metrics file says it kept.
    kept_rows = (workdir / "reports" / "compute_matched.md").read_text().split("## What each run kept")[1].splitlines()
    for method in METHODS - {"teacher"}:
        for student in STUDENTS:
            pattern = rf"\| {student} +\| {re.escape(METHOD_NAMES[method])} +\|"
            cells = [cell.strip() for cell in next(r for r in kept_rows if re.match(pattern, r)).split("|")[1:-1]]
            if method == "sft":
                assert cells[5] == "the Table 1 model"
                continue
            metrics_file = workdir / "metrics" / "distill" / method / f"{student}-seed{TRAIN_SEED}.json"
            entry = json.loads(metrics_file.read_text())["at_budget"]
            assert cells[5] == entry["kept"] and entry["budget_flops"] == params["compute_budget_flops"]
            # The last validation is at the last step, so a run is past the budget there exactly when it ends past it.
            assert (entry["exceeded_at_step"] is None) == (entry["run_flops"] <= entry["budget_flops"])
            assert (workdir / "models" / student / f"seed{TRAIN_SEED}" / method / "model_at_budget").is_dir()


def test_every_file_a_stage_opened_is_declared(pipeline):
    """The stage contract at run time: every file a stage process of the first `dvc repro` read is among its deps or
    outs, and every file it wrote among its outs (tests/test_stage_contract.py checks the imported modules)."""
    from tests.test_stage_contract import dvc_stages, undeclared_accesses

    workdir, env, _ = pipeline
    records = [json.loads(path.read_text()) for path in sorted(Path(env["STAGE_AUDIT_DIR"]).glob("*.json"))]
    stages = dvc_stages(workdir)
    ran = {name for name, (cmd, _, _) in stages.items() if any(r["argv"] == shlex.split(cmd)[1:] for r in records)}
    assert ran == STAGES, STAGES ^ ran
    assert undeclared_accesses(stages, records) == {}


def test_seqkd_trains_on_teacher_samples_not_gold(pipeline):
    workdir, _, _ = pipeline
    records = [json.loads(line) for line in (workdir / "teacher_data" / "train.jsonl").read_text().splitlines()]
    assert records and all(r["response"] == r["references"][0] for r in records)
    assert sum(r["response"] != r["gold_response"] for r in records) > len(records) // 2


def test_mlflow_holds_one_parent_with_a_finished_child_per_stage(pipeline):
    from mlflow import MlflowClient

    workdir, env, _ = pipeline
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("minillm-distillation")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pipeline.parent") == "true"]
    # Evaluate stages nest one run per evaluation set under their own run.
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and "eval_set" not in r.data.tags]
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.tags["dvc.stage"] for r in children} == STAGES
    assert all(r.info.status == "FINISHED" for r in children)
    teacher_run = next(r for r in children if r.data.tags["dvc.stage"] == "train_teacher")
    assert client.get_metric_history(teacher_run.info.run_id, "train/loss")
    assert "train_teacher.optimizer.lr" in teacher_run.data.params


def test_second_repro_does_nothing_and_eval_param_retrains_nothing(pipeline):
    workdir, env, _ = pipeline
    again = run(["dvc", "repro"], workdir, env)
    assert "Running stage" not in again.stdout
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["evaluate"]["seeds"] = [10]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    dry = run(["dvc", "repro", "--dry"], workdir, env)
    ran = {line.split("'")[1] for line in dry.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"check_params", "report"} | EVALUATIONS
    run(["git", "checkout", "params.yaml"], workdir, env)


def test_two_queued_experiments_run_at_once_and_share_the_mlflow_store(pipeline):
    """The README's sweep recipe: `dvc exp run --queue -S ...` twice, `dvc queue start -j 2` (both at once, one SQLite
    store), then `dvc exp show` and `dvc metrics diff`. (Each queued experiment is a `dvc exp run -S` in a copy of
    the workspace: this also covers the README's plain `dvc exp run -S`.) Sampling seeds no earlier test used, so
    DVC's run cache cannot stand in for running the stages; only evaluation, the report and check_params may run.
    (A training param would run fewer stages, but the micro models sample the same tokens after a small change in
    their weights: two KD divergences gave equal Rouge-L, so the experiments could not be told apart.)"""
    from mlflow import MlflowClient

    workdir, env, _ = pipeline
    run(["git", "checkout", "params.yaml"], workdir, env)
    experiments = {"queued-seed30": 30, "queued-seed40": 40}
    for name, seed in experiments.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"evaluate.seeds=[{seed}]"], workdir, env)
    run(["dvc", "queue", "start", "-j", "2"], workdir, env)
    try:
        deadline = time.monotonic() + 900
        while True:
            status = run(["dvc", "queue", "status"], workdir, env).stdout
            states = {line.split()[1]: line.split()[-1] for line in status.splitlines() if any(n in line for n in experiments)}
            if len(states) == len(experiments) and all(state in ("Success", "Failed") for state in states.values()):
                break
            assert time.monotonic() < deadline, status
            time.sleep(5)
    finally:
        run(["dvc", "queue", "stop"], workdir, env, check=False)
    logs = {name: run(["dvc", "queue", "logs", name], workdir, env, check=False).stdout for name in experiments}
    assert states == {name: "Success" for name in experiments}, logs

    # `dvc exp show` lists both with the headline, the only declared metrics (reports/summary.json: every model's
    # average Rouge-L; summary_sets.json: per set), and the two differ.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], workdir, env).stdout)
    rouge = {}
    for baseline in shown:
        for branch in baseline.get("experiments") or []:
            for revision in branch["revs"]:
                if revision.get("name") in experiments:
                    assert set(revision["data"]["metrics"]) == {"reports/summary.json", "reports/summary_sets.json"}
                    rouge[revision["name"]] = revision["data"]["metrics"]["reports/summary.json"]["data"]
    first, second = (rouge.get(name, {}) for name in experiments)
    assert first.keys() == {"teacher"} | {f"{m}@{s}" for m in METHODS - {"teacher"} for s in STUDENTS}, rouge
    assert first.keys() == second.keys() and first != second, rouge
    diff = json.loads(run(["dvc", "metrics", "diff", *experiments, "--json"], workdir, env).stdout)
    assert {"reports/summary.json", "reports/summary_sets.json"} <= diff.keys(), diff
    # The README's command for a terminal: the changed param and each model's average, nothing per set.
    table = run(readme_command("dvc exp show --only-changed"), workdir, env | {"COLUMNS": "2000"}).stdout  # 15 models wide
    header = next(line for line in table.splitlines() if "Experiment" in line).split()
    changed = {model for model in first if first[model] != second[model]}  # --only-changed drops unchanged ones
    # After the metrics: the changed param, then the changed deps (the report reads the predictions, eval/).
    assert header[0] == "Experiment" and "evaluate.seeds" in header, table
    models = header[1 : header.index("evaluate.seeds")]
    assert changed and changed <= set(models) <= set(first), table  # averages only, no per-set columns

    # Every declared plot renders for the workspace and for both experiments, without a warning.
    for command in (["dvc", "plots", "show"], ["dvc", "plots", "diff", *experiments]):
        shown = run(command, workdir, env)
        assert "WARNING" not in shown.stdout + shown.stderr and "failed" not in shown.stdout + shown.stderr, shown

    expected_stages = {"check_params", "report"} | EVALUATIONS
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment_id = client.get_experiment_by_name("minillm-distillation").experiment_id
    for name in experiments:
        ran = {line.split("'")[1] for line in logs[name].splitlines() if line.startswith("Running stage")}
        assert ran == expected_stages, logs[name]
        assert "[tracking]" not in logs[name] and "database is locked" not in logs[name], logs[name]
        runs = client.search_runs([experiment_id], filter_string=f"tags.`dvc.exp_name` = '{name}'", max_results=1000)
        [parent] = [r for r in runs if r.data.tags.get("pipeline.parent") == "true"]
        stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["dvc.stage"] for r in stage_runs) == sorted(expected_stages)
        assert all(r.info.status == "FINISHED" for r in stage_runs)
        for stage_run in stage_runs:  # an evaluate stage logs Rouge-L in its run or in its per-set child runs
            if stage_run.data.tags["dvc.stage"].startswith("evaluate"):
                nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == stage_run.info.run_id]
                assert stage_run.data.metrics or (nested and all(r.data.metrics for r in nested)), stage_run.data.tags


def test_removed_students_and_seeds_leave_nothing_stale_and_a_killed_repro_resumes(pipeline):
    """Issue 15. Drop student tiny2, make tiny an OPT and replace training seed 1234 by 7, with DVC's cache emptied so that nothing can
    be restored from its run-cache. kill -9 the whole `dvc repro` inside MiniLLM's training; the rerun completes, and
    what it resumed equals an uninterrupted recomputation (`dvc repro --force --downstream` of the killed stage).
    The report then holds only the current stages' results, and dvc.lock only their entries."""
    from mlflow import MlflowClient

    workdir, env, _ = pipeline
    run(["git", "checkout", "params.yaml"], workdir, env)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["models"]["students"] = {"tiny": params["models"]["students"]["tiny"]}
    # tiny becomes an OPT: with the Llama teacher and the Qwen2 tiny2 of the first repro, a fourth family runs every
    # stage, a kill and a resume included.
    params["models"]["students"]["tiny"]["arch"]["family"] = "opt"
    params["train_seeds"] = [7]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.rmtree(workdir / ".dvc" / "cache", ignore_errors=True)

    killed_stage = "distill_minillm@tiny-7"
    repro = subprocess.Popen(["dvc", "repro"], cwd=workdir, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker, deadline = workdir / "scratch" / killed_stage / "step_000002", time.monotonic() + 900
    while not marker.exists():
        assert repro.poll() is None and time.monotonic() < deadline, f"dvc repro ended or stalled before {marker}"
        time.sleep(0.01)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()

    rerun = run(["dvc", "repro"], workdir, env, timeout=900)
    assert f"Running stage '{killed_stage}'" in rerun.stdout and "resuming from step" in rerun.stdout + rerun.stderr
    current = {"check_params", "build_data", "pretrain_teacher", "train_teacher", "teacher_generate", "report",
               "evaluate_teacher", "pretrain_student@tiny"} | {
        f"{stage}@tiny-7" for stage in ("init_student", *(f"distill_{m}" for m in METHODS - {"teacher", "sft"}))} | {
        f"evaluate@{method}-tiny-7" for method in METHODS - {"teacher", "sft"}} | {"evaluate_sft@tiny-7"}
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    assert set(lock) == current
    results = pd.read_csv(workdir / "reports" / "results.csv")
    students = results[results["method"] != "teacher"]
    assert set(zip(students["student"], students["train_seed"])) == {("tiny", 7)}
    assert "training seeds 7\n" in (workdir / "reports" / "table1.md").read_text()
    assert sorted(p.name for p in (workdir / "metrics" / "eval").iterdir()) == sorted(
        ["teacher.json"] + [f"{m}-tiny-seed7.json" for m in METHODS - {"teacher"}])
    assert not (workdir / "models" / "tiny2").exists() and not (workdir / "models" / "tiny" / "seed1234").exists()
    for method in ("sft_long", "kd", "seqkd", "minillm", "gkd", "distillm", "opd"):
        config = json.loads((workdir / "models" / "tiny" / "seed7" / method / "model" / "config.json").read_text())
        assert config["model_type"] == "opt", method
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment_id = client.get_experiment_by_name("minillm-distillation").experiment_id
    assert client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'") == []

    def cached_outputs(lock: dict) -> dict:  # the models and predictions; the metrics files also hold wall times
        return {out["path"]: out["md5"] for name in (killed_stage, "evaluate@minillm-tiny-7")
                for out in lock[name]["outs"] if out["path"].startswith(("models/", "eval/"))}

    resumed = cached_outputs(lock)
    assert set(resumed) == {"models/tiny/seed7/minillm", "eval/minillm-tiny-seed7"}
    resumed_table = (workdir / "reports" / "table1.md").read_text()
    run(["dvc", "repro", "--force", "--downstream", killed_stage], workdir, env, timeout=900)
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    assert cached_outputs(lock) == resumed
    assert (workdir / "reports" / "table1.md").read_text() == resumed_table
    run(["git", "checkout", "params.yaml"], workdir, env)


def readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with `prefix`, without its comment, split as a shell would."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(prefix))
    return shlex.split(line, comments=True)


def test_typo_in_params_stops_repro_with_one_line(pipeline):
    workdir, env, _ = pipeline
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["distill"]["minillm"]["teacher_mixx"] = 0.3
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    failed = run(["dvc", "repro"], workdir, env, check=False)
    assert failed.returncode != 0
    assert "error: params.yaml: distill.minillm.teacher_mixx: unknown key" in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
