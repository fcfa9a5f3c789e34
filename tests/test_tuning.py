"""Tuning on validation only (pipeline/tuning.py): the committed grids give every method the same budget and can
never read an evaluation set, the guards refuse the grids and experiments that would, and the report reads
experiments back and picks the best validation score (checked on a hand-built git repository of experiment refs)."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import tuning
from pipeline.config import METHODS, ConfigError

REPO = Path(__file__).resolve().parents[1]
GRIDS = REPO / "configs" / "tuning"
STUDENT_METHODS = [method for method in METHODS if method != "teacher"]


@pytest.fixture(scope="module")
def stages():
    return tuning.pipeline_stages(REPO)


@pytest.fixture(scope="module")
def protocol():
    return tuning.load_protocol(GRIDS)


@pytest.mark.parametrize("method", STUDENT_METHODS)
def test_every_method_has_a_grid_of_the_same_budget_whose_runs_read_no_evaluation_set(method, stages, protocol):
    grid = tuning.load_grid(GRIDS, method, protocol)
    assert len(grid.configurations()) == protocol.configurations_per_method
    tuning.check_grid(grid, stages, protocol)
    runs = tuning.upstream_closure(stages, tuning.stages_named(stages, grid.stage))
    # Independently of the guard: no evaluation or report stage runs, and nothing run declares an evaluation set.
    assert not [name for name in runs if name.startswith(("evaluate", "report"))], runs
    assert not [dep for name in runs for dep in stages[name].deps if dep.startswith(protocol.evaluation_sets)]
    # Every key is a key of params.yaml (a KeyError otherwise).
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key in grid.grid:
        value = params
        for part in key.split("."):
            value = value[part]


def test_negative_controls_the_guard_refuses_an_evaluating_grid_an_undeclared_key_and_another_budget(stages, protocol,
                                                                                                  tmp_path):
    evaluating = tuning.MethodGrid("kd", "evaluate", "metrics/eval", {"evaluate.temperature": [0.9, 1.0]})
    with pytest.raises(ConfigError, match="reads the evaluation sets"):
        tuning.check_grid(evaluating, stages, protocol)
    undeclared = tuning.MethodGrid("kd", "distill_kd", "metrics/distill/kd", {"distill.seqkd.kd_ratio": [0.0, 0.5]})
    with pytest.raises(ConfigError, match="'distill.seqkd.kd_ratio' is not a param of stage 'distill_kd'"):
        tuning.check_grid(undeclared, stages, protocol)
    (tmp_path / "kd.yaml").write_text("stage: distill_kd\nmetrics: m\ngrid: {distill.kd.ratio: [0.5, 1.0]}\n")
    with pytest.raises(ConfigError, match="grid has 2 configurations; every method gets 4"):
        tuning.load_grid(tmp_path, "kd", protocol)


def test_upstream_closure_follows_outputs_into_deps_transitively():
    io = tuning.StageIO
    stages = {
        "data": io(deps=(), outs=("data",), params=()),
        "base": io(deps=("data/train.npz",), outs=("models/base",), params=()),
        "train@a": io(deps=("models/base", "data/valid"), outs=("models/a",), params=("x",)),
        "evaluate@a": io(deps=("models/a", "data/eval"), outs=("eval/a",), params=()),
        "unrelated": io(deps=(), outs=("other",), params=()),
    }
    assert tuning.upstream_closure(stages, tuning.stages_named(stages, "train")) == {"train@a", "base", "data"}
    assert tuning.upstream_closure(stages, ["evaluate@a"]) == {"evaluate@a", "train@a", "base", "data"}


def test_queue_commands_name_each_configuration_and_target_the_stage_only():
    grid = tuning.MethodGrid("gkd", "distill_gkd", "metrics/distill/gkd",
                             {"distill.gkd.optimizer.lr": [0.0005, 0.001], "distill.gkd.seq_kd": [False, True]})
    commands = tuning.queue_commands(grid)
    assert commands[0] == ["dvc", "exp", "run", "--queue", "--name", "tune-gkd-0", "-S", "distill.gkd.optimizer.lr=0.0005",
                           "-S", "distill.gkd.seq_kd=false", "distill_gkd"]
    assert [c[5] for c in commands] == ["tune-gkd-0", "tune-gkd-1", "tune-gkd-2", "tune-gkd-3"]
    assert commands[3][7] == "distill.gkd.optimizer.lr=0.001" and commands[3][9] == "distill.gkd.seq_kd=true"


def git(root: Path, *arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def commit(root: Path, files: dict[str, str], message: str, parent_branch: str = "main") -> str:
    git(root, "checkout", "-q", parent_branch)
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    sha = git(root, "rev-parse", "HEAD")
    git(root, "reset", "-q", "--hard", "HEAD~1")  # an experiment's commit hangs off the baseline, not on the branch
    return sha


@pytest.fixture
def experiments(tmp_path):
    """A baseline and three experiments of a 2-configuration grid: scores 20 / 24 over two metrics files each."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "t@t")
    git(root, "config", "user.name", "t")
    base_params = {"distill": {"kd": {"ratio": 0.5}}}
    (root / "params.yaml").write_text(yaml.safe_dump(base_params))
    (root / "metrics/eval").mkdir(parents=True)
    (root / "metrics/eval/kd.json").write_text("{}")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "baseline")
    baseline = git(root, "rev-parse", "HEAD")

    def experiment(name, ratio, scores, extra=None):
        files = {"params.yaml": yaml.safe_dump({"distill": {"kd": {"ratio": ratio}}})}
        for student, score in zip(("a", "b"), scores):
            files[f"metrics/distill/kd/{student}-seed1.json"] = json.dumps({"best_valid_rouge_l": score})
        sha = commit(root, files | (extra or {}), name)
        git(root, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}", sha)

    experiment("tune-kd-0", 0.5, [19.0, 21.0])
    experiment("tune-kd-1", 1.0, [23.0, 25.0])
    protocol = tuning.Protocol(2, "best_valid_rouge_l", "data/eval", ("metrics/eval", "eval"))
    grid = tuning.MethodGrid("kd", "distill_kd", "metrics/distill/kd", {"distill.kd.ratio": [0.5, 1.0]})
    return root, baseline, experiment, protocol, grid


def test_report_reads_every_experiment_and_picks_the_best_validation_score(experiments, tmp_path):
    root, baseline, _, protocol, grid = experiments
    collected = tuning.collect(root, {"kd": grid}, protocol)
    runs = collected["kd"]
    assert [(r.name, r.configuration, r.score, r.metrics_files, r.baseline) for r in runs] == [
        ("tune-kd-0", {"distill.kd.ratio": 0.5}, 20.0, 2, baseline),
        ("tune-kd-1", {"distill.kd.ratio": 1.0}, 24.0, 2, baseline)]
    assert tuning.pick(runs).name == "tune-kd-1"
    tuning.write_report(collected, {"kd": grid}, protocol, tmp_path)
    picks = json.loads((tmp_path / "tuning.json").read_text())
    assert picks["kd"]["pick"] == {"distill.kd.ratio": 1.0} and picks["kd"]["score"] == 24.0
    assert "| tune-kd-1 | 1.0 | 24.00 | **pick** |" in (tmp_path / "tuning.md").read_text()


def test_report_keeps_the_previous_record_of_a_method_it_cannot_see_unless_its_grid_changed(experiments, tmp_path):
    root, baseline, _, protocol, grid = experiments
    seqkd = tuning.MethodGrid("seqkd", "distill_seqkd", "metrics/distill/seqkd", {"distill.seqkd.kd_ratio": [0.0, 0.5]})
    sft = tuning.MethodGrid("sft", "init_student", "metrics/init_student", {"init_student.epochs": [4, 8]})
    old_run = {"experiment": "tune-seqkd-1", "configuration": {"distill.seqkd.kd_ratio": 0.5}, "score": 17.0}
    previous = {"seqkd": {"stage": "distill_seqkd", "baseline": "f" * 40, "experiment": "tune-seqkd-1", "score": 17.0,
                          "pick": {"distill.seqkd.kd_ratio": 0.5}, "missing": [0], "runs": [old_run]},
                "sft": {"stage": "init_student", "baseline": "f" * 40, "experiment": "tune-sft-0", "score": 9.0,
                        "pick": {"init_student.lr": 1.0}, "missing": [],
                        "runs": [{"experiment": "tune-sft-0", "configuration": {"init_student.lr": 1.0}, "score": 9.0}]}}
    (tmp_path / "tuning.json").write_text(json.dumps(previous))
    grids = {"kd": grid, "seqkd": seqkd, "sft": sft}
    tuning.write_report(tuning.collect(root, grids, protocol), grids, protocol, tmp_path)
    picks = json.loads((tmp_path / "tuning.json").read_text())
    assert set(picks) == {"kd", "seqkd"} and picks["seqkd"] == previous["seqkd"] and picks["kd"]["baseline"] == baseline
    report = (tmp_path / "tuning.md").read_text()
    assert "| tune-seqkd-1 | 0.5 | 17.00 | **pick** |" in report and "Carried from the previous report" in report
    assert "Missing (failed or not run): configurations [0]" in report
    assert "Not tuned: no tune-sft-<k> experiment found." in report  # its grid changed: the old record is dropped


def test_a_tie_goes_to_the_earlier_configuration():
    runs = [tuning.TuningRun("tune-kd-1", 1, "c", "b", {}, 20.0, 1), tuning.TuningRun("tune-kd-0", 0, "c", "b", {}, 20.0, 1)]
    assert tuning.pick(runs).name == "tune-kd-0"


def test_report_refuses_an_experiment_that_changed_an_evaluation_output(experiments):
    root, _, experiment, protocol, grid = experiments
    experiment("tune-kd-0", 0.5, [30.0, 30.0], extra={"metrics/eval/kd.json": '{"rouge_l": 1}'})
    with pytest.raises(ConfigError, match=r"tune-kd-0 .* changed evaluation outputs \(metrics/eval/kd.json\)"):
        tuning.collect(root, {"kd": grid}, protocol)


def test_params_yaml_holds_the_committed_picks():
    """reports/tuning.json is what `python -m pipeline.tuning report` wrote; params.yaml must carry each pick (the
    methods not yet tuned are listed as such in reports/tuning.md)."""
    picks = json.loads((REPO / "reports" / "tuning.json").read_text())
    assert picks and set(picks) <= set(STUDENT_METHODS)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for method, entry in picks.items():
        for key, picked in entry["pick"].items():
            value = params
            for part in key.split("."):
                value = value[part]
            assert value == picked, f"params.yaml {key} = {value}, but the tuning of {method} picked {picked}"
