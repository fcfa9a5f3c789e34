"""Kill and resume (issue 6): real training stages in subprocesses on a tiny config in a temporary copy of the repo.

Each stage is SIGKILLed at a checkpoint boundary or while a checkpoint is being written, rerun, and its final
weights, metrics, curves (and MiniLLM's rollout buffers) compared with an uninterrupted run: bit-identical, bar
wall-clock figures. Also: a changed param discards the checkpoint, the same seed twice gives the same metrics, a
NaN stops the stage and keeps the last good checkpoint (or is skipped under checkpoint.max_nonfinite_skips), and
MLflow links the resumed run to the killed one, which is marked KILLED.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline import engine
from pipeline.config import EngineConfig, Optimizer
from tests.workspace import RUN_OUTPUTS, copy_sources, stage_command

REPO = Path(__file__).resolve().parents[1]
SFT_STAGE, MINILLM_STAGE = "init_student@tiny-1234", "distill_minillm@tiny-1234"
# Wall-clock figures differ between any two runs; everything else must not.
TIMING_KEYS = {"wall_time_s", "mean_tokens_per_s"}
TIMING_COLUMNS = {"tokens_per_s", "train_tokens_per_s", "rollout_tokens_per_s"}


def run_stage(workdir: Path, env: dict, stage: str, check: bool = True) -> subprocess.CompletedProcess:
    """The stage's command as dvc.yaml declares it."""
    completed = subprocess.run(stage_command(stage, workdir), cwd=workdir, env=env, capture_output=True, text=True)
    if check and completed.returncode != 0:
        raise AssertionError(f"{stage} failed ({completed.returncode}):\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}")
    return completed


def kill_when(workdir: Path, env: dict, stage: str, marker: Path) -> None:
    """Start the stage and SIGKILL it as soon as `marker` exists."""
    process = subprocess.Popen(stage_command(stage, workdir), cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert process.poll() is None, f"{stage} ended (status {process.returncode}) before {marker.name} appeared"
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.005)
    process.kill()
    assert process.wait() == -9


def outputs(workdir: Path, stage: str) -> dict:
    """What a training stage leaves that must not depend on being interrupted."""
    if stage == SFT_STAGE:
        model_dir, name = workdir / "models/tiny/seed1234/sft", "init_student/tiny-seed1234"
    else:
        model_dir, name = workdir / "models/tiny/seed1234/minillm", "distill/minillm/tiny-seed1234"
    metrics = json.loads((workdir / "metrics" / f"{name}.json").read_text())
    found = {
        "weights": {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*.safetensors"))},
        "metrics": {k: v for k, v in metrics.items() if k not in TIMING_KEYS},
        "curves": {
            csv.name: pd.read_csv(csv).drop(columns=list(TIMING_COLUMNS), errors="ignore").to_dict("list")
            for csv in sorted((workdir / "plots" / name).glob("*.csv"))
        },
    }
    for round_file in sorted((model_dir / "rollouts").glob("round_*.pt")):
        saved = torch.load(round_file, weights_only=False)
        found[round_file.name] = {k: v.tolist() for k, v in saved["rollout"].items() if v is not None} | {
            "advantages": saved["advantages"].tolist(), "checkpoint_sha256": saved["checkpoint_sha256"]}
    assert found["weights"], f"no weights under {model_dir}"
    return found


def scratch_is_clean(workdir: Path, stage: str) -> None:
    """After success only the small deterministic marker is left for DVC to hash."""
    assert sorted(p.name for p in (workdir / "scratch" / stage).iterdir()) == ["done.json"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the repo with data, base models and the teacher trained, and one uninterrupted run of each
    stage under test as the reference."""
    workdir = tmp_path_factory.mktemp("resume")
    copy_sources(workdir, skipped=(*RUN_OUTPUTS, "models/", "scratch/"))
    params = yaml.safe_load((REPO / "tests" / "micro_params.yaml").read_text())
    params["models"]["students"] = {"tiny": params["models"]["students"]["tiny"]}
    params["checkpoint"] = {"every_steps": 2, "max_nonfinite_skips": 0}
    params["init_student"]["epochs"] = 2  # 10 steps: resumes cross an epoch boundary
    # 4 mini-batches of 2 (micro-batches of 1) per inner epoch, 2 inner epochs: rounds of 8 steps; 10 steps cross
    # a round boundary, and checkpoints every 2 steps fall mid-epoch, at an epoch boundary and at a round boundary.
    params["distill"]["minillm"].update(steps=10, batch_size=2, micro_batch_size=1, inner_epochs=2)
    params["distill"]["sft_long"]["train"]["steps"] = 10  # the control trains as many steps as MiniLLM
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow-test.db'}", "OMP_NUM_THREADS": "2"}
    for inherited in ("DVC_ROOT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(inherited, None)
    for stage in ("build_data", "pretrain_teacher", "pretrain_student@tiny", "train_teacher"):
        run_stage(workdir, env, stage)
    run_stage(workdir, env, SFT_STAGE)
    reference = {SFT_STAGE: outputs(workdir, SFT_STAGE)}
    run_stage(workdir, env, MINILLM_STAGE)
    reference[MINILLM_STAGE] = outputs(workdir, MINILLM_STAGE)
    return workdir, env, reference


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "marker", "resumed_from"),
    [
        # Killed while step 4's checkpoint is being written: step 2's is the last whole one (4 if the rename won).
        (SFT_STAGE, ".step_000004.tmp", {2, 4}),
        # MiniLLM in the middle of its first round's second inner epoch: the rollout buffer, the epoch's order of it
        # and the position in it come from the checkpoint. (Every kind of position, for every recipe, is also
        # resumed in-process in tests/test_recipes.py.)
        (MINILLM_STAGE, "step_000006", {6}),
        # MiniLLM at a round boundary, killed mid-write of step 8: the next round's sampling depends on restored RNGs.
        (MINILLM_STAGE, ".step_000008.tmp", {6, 8}),
    ],
)
def test_kill_and_resume_is_bit_identical(workspace, stage, marker, resumed_from):
    from mlflow import MlflowClient

    workdir, env, reference = workspace
    scratch = workdir / "scratch" / stage
    kill_when(workdir, env, stage, scratch / marker)
    killed_run_id = json.loads(next(scratch.glob("step_*/meta.json")).read_text())["run_id"]

    rerun = run_stage(workdir, env, stage)
    resumed = [int(line.rsplit(" ", 1)[1]) for line in rerun.stdout.splitlines() if "resuming from step" in line]
    assert len(resumed) == 1 and resumed[0] in resumed_from, rerun.stdout[-2000:]
    assert outputs(workdir, stage) == reference[stage]
    scratch_is_clean(workdir, stage)

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    assert client.get_run(killed_run_id).info.status == "KILLED"
    experiment = client.get_experiment_by_name("minillm-distillation")
    linked = client.search_runs([experiment.experiment_id], filter_string=f"tags.resumed_from = '{killed_run_id}'")
    assert [run.info.status for run in linked] == ["FINISHED"]
    assert client.get_metric_history(linked[0].info.run_id, "train/lr")


@pytest.mark.slow
def test_a_changed_param_discards_the_checkpoint(workspace):
    workdir, env, _ = workspace
    scratch = workdir / "scratch" / SFT_STAGE
    kill_when(workdir, env, SFT_STAGE, scratch / "step_000002")
    original = (workdir / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["init_student"]["optimizer"]["lr"] = 0.003
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        rerun = run_stage(workdir, env, SFT_STAGE)
    finally:
        (workdir / "params.yaml").write_text(original)
    assert "resuming" not in rerun.stdout
    assert "checkpoint of step 2 was written with other params, inputs or code; discarded, starting fresh" in rerun.stdout
    scratch_is_clean(workdir, SFT_STAGE)


@pytest.mark.slow
def test_the_same_seed_twice_gives_bit_identical_metrics(workspace):
    workdir, env, reference = workspace
    run_stage(workdir, env, SFT_STAGE)
    assert outputs(workdir, SFT_STAGE) == reference[SFT_STAGE]


def run_in_process(workdir: Path, env: dict, monkeypatch, stage: str) -> None:
    """The stage's main() in this process, so that a loss function can be monkeypatched."""
    import runpy

    command = stage_command(stage, workdir)  # [python, -m, module, args...]
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setattr(sys, "argv", command[2:])
    monkeypatch.setattr(engine, "teardown", lambda: None)  # keep this process's group for the other tests
    runpy.run_module(command[2], run_name="not_main")["main"]()


def nan_on_call(monkeypatch, module, name: str, bad_call: int, part: str | None = None) -> None:
    """Make the `bad_call`-th training-time call of module.name return NaN (in `part` of a dict result)."""
    original, calls = getattr(module, name), {"n": 0}

    def poisoned(*args, **kwargs):
        result = original(*args, **kwargs)
        if not torch.is_grad_enabled():  # validation
            return result
        calls["n"] += 1
        if calls["n"] != bad_call:
            return result
        if part is None:
            return result * float("nan")
        parts, tokens = result
        return parts | {part: parts[part] * float("nan")}, tokens

    monkeypatch.setattr(module, name, poisoned)


@pytest.mark.slow
def test_nan_stops_the_stage_and_keeps_the_last_good_checkpoint(workspace, monkeypatch):
    from pipeline import sft
    from pipeline.checkpoint import NonFiniteLoss

    workdir, env, reference = workspace
    scratch = workdir / "scratch" / SFT_STAGE
    # Two micro-batches per step: call 9 is step 5's first.
    nan_on_call(monkeypatch, sft, "response_token_loss_parts", bad_call=9, part="ce")
    with pytest.raises(NonFiniteLoss, match=r"^init_student: non-finite ce at step 5; stopped"):
        run_in_process(workdir, env, monkeypatch, SFT_STAGE)
    assert sorted(p.name for p in scratch.iterdir()) == ["step_000004"]
    # The kept checkpoint is good: resuming from it ends exactly where the uninterrupted run did.
    monkeypatch.undo()
    rerun = run_stage(workdir, env, SFT_STAGE)
    assert "resuming from step 4" in rerun.stdout
    assert outputs(workdir, SFT_STAGE) == reference[SFT_STAGE]


@pytest.mark.slow
def test_nan_in_minillm_names_the_loss_part(workspace, monkeypatch):
    from pipeline import minillm
    from pipeline.checkpoint import NonFiniteLoss

    workdir, env, _ = workspace
    # One PT micro-batch per micro-step, two micro-steps per step: call 5 is in step 3.
    nan_on_call(monkeypatch, minillm, "pt_loss_sum", bad_call=5)
    with pytest.raises(NonFiniteLoss, match=r"^distill.minillm: non-finite pt at step 3; stopped"):
        run_in_process(workdir, env, monkeypatch, MINILLM_STAGE)
    assert sorted(p.name for p in (workdir / "scratch" / MINILLM_STAGE).glob("step_*")) == ["step_000002"]


@pytest.mark.slow
def test_max_nonfinite_skips_skips_the_bad_step(workspace, monkeypatch):
    from pipeline import sft

    workdir, env, _ = workspace
    original = (workdir / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["checkpoint"]["max_nonfinite_skips"] = 1
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    nan_on_call(monkeypatch, sft, "response_token_loss_parts", bad_call=3, part="ce")
    try:
        run_in_process(workdir, env, monkeypatch, SFT_STAGE)
    finally:
        (workdir / "params.yaml").write_text(original)
    metrics = json.loads((workdir / "metrics/init_student/tiny-seed1234.json").read_text())
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 9
    train_curve = pd.read_csv(workdir / "plots/init_student/tiny-seed1234/train.csv")
    assert 2 not in set(train_curve["step"]) and train_curve["train_loss"].notna().all()


def test_a_non_finite_gradient_leaves_weights_optimizer_and_schedule_untouched():
    """engine.FiniteStepAdamW under DeepSpeed (ZeRO 0): the skipped step is a no-op, the next one is a real step."""
    from pipeline.config import Architecture
    from pipeline.models import build_causal_lm

    config = EngineConfig(num_procs=1, launcher="torchrun", device="cpu", precision="fp32", zero_stage=0)
    engine.setup(config)
    torch.manual_seed(0)
    model = build_causal_lm(Architecture(n_layer=1, n_embd=16, n_head=2), 50, 32, 0).eval()
    optimizer = Optimizer(lr=1e-3, min_lr=1e-4, weight_decay=0.01, grad_clip=1.0, schedule="cosine", warmup_steps=2)
    model_engine = engine.initialize(model, optimizer, 10, 2, 1, config)
    batch = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    model_engine.backward(model_engine(input_ids=batch, labels=batch).loss)
    model_engine.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in model_engine.optimizer.state.values()]
    lr = model_engine.get_lr()[0]

    model_engine.backward(model_engine(input_ids=batch, labels=batch).loss * float("nan"))
    model_engine.step()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, model_engine.optimizer.state.values()))
    assert model_engine.get_lr()[0] == lr and model_engine.skipped_steps == 1

    model_engine.backward(model_engine(input_ids=batch, labels=batch).loss)
    model_engine.step()
    assert not all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_the_fingerprint_follows_params_and_input_content_not_mtimes(tmp_path, monkeypatch):
    from pipeline import checkpoint

    monkeypatch.chdir(REPO)  # the training code is part of every fingerprint
    inputs = tmp_path / "data"
    inputs.mkdir()
    (inputs / "train.npz").write_bytes(b"tokens")
    params = {"seed": 1, "init_student": {"lr": 0.002}}
    first = checkpoint.fingerprint(params, [inputs])
    os.utime(inputs / "train.npz", (0, 0))
    assert checkpoint.fingerprint(params, [inputs]) == first
    assert checkpoint.fingerprint({"seed": 1, "init_student": {"lr": 0.003}}, [inputs]) != first
    (inputs / "train.npz").write_bytes(b"tokenz")
    assert checkpoint.fingerprint(params, [inputs]) != first
    with pytest.raises(checkpoint.ConfigError, match="missing: input not found"):
        checkpoint.fingerprint(params, [tmp_path / "missing"])


def processes_running_in(directory: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "cwd") == os.path.realpath(directory):
                pids.append(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            pass
    return pids


@pytest.mark.slow
def test_two_ranks_under_zero_2_resume_bit_identically_and_leave_no_orphans(workspace):
    """Per-rank ZeRO optimizer shards and RNG states; SIGKILL of the stage process takes its launcher and ranks
    along (engine.die_with_parent), so nothing trains on behind the resumed run."""
    workdir, env, _ = workspace
    original = (workdir / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["engine"] |= {"num_procs": 2, "zero_stage": 2}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = env | {"OMP_NUM_THREADS": "1"}
    try:
        run_stage(workdir, env, SFT_STAGE)
        reference = outputs(workdir, SFT_STAGE)
        kill_when(workdir, env, SFT_STAGE, workdir / "scratch" / SFT_STAGE / "step_000004")
        deadline = time.monotonic() + 30
        while processes_running_in(workdir):
            assert time.monotonic() < deadline, "ranks of the killed stage are still running"
            time.sleep(0.1)
        assert (workdir / "scratch" / SFT_STAGE / "step_000004" / "rank1.pt").is_file()
        rerun = run_stage(workdir, env, SFT_STAGE)
    finally:
        (workdir / "params.yaml").write_text(original)
    assert "resuming from step 4" in rerun.stdout
    assert outputs(workdir, SFT_STAGE) == reference
