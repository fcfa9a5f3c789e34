"""The study's reading of experiments and its verdicts (pipeline/study.py), on worlds with known answers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import study
from pipeline.config import ConfigError

SETS = ("dollyeval", "sni")


def world(shifts: dict[str, float], train_seeds=(1, 2)) -> dict:
    """Scores of methods that are SFT's scores plus a constant shift, per set [3 sampling seeds, 40 prompts]."""
    rng = np.random.default_rng(0)
    base = {(k, name): rng.uniform(0, 60, (3, 40)) for k in train_seeds for name in SETS}
    return {(method, "s", k): {name: base[(k, name)] + shift for name in SETS}
            for method, shift in shifts.items() for k in train_seeds}


def test_a_constant_shift_gives_that_shift_exactly_and_a_constant_method_its_level():
    scores = world({"sft": 0.0, "minillm": 5.0, "kd": -5.0})
    scores |= {("opd", "s", k): {name: np.full((3, 40), 30.0) for name in SETS} for k in (1, 2)}
    summary = study.summarize_world(scores, "s")
    assert list(summary.levels) == ["sft", "kd", "minillm", "opd"]  # the pipeline's method order
    for (a, b), shift in {("sft", "minillm"): -5.0, ("kd", "minillm"): -10.0, ("sft", "kd"): 5.0}.items():
        interval = summary.pairs[(a, b)]
        assert interval.difference == pytest.approx(shift) and interval.low == pytest.approx(shift)
        assert interval.high == pytest.approx(shift) and interval.significant
    opd = summary.levels["opd"]
    assert (opd.difference, opd.low, opd.high) == (30.0, 30.0, 30.0)
    sft = summary.levels["sft"]
    assert sft.low < sft.difference < sft.high  # prompts vary: a real interval around the mean
    assert study.leaders(summary) == ["minillm"]
    assert summary.per_seed["minillm"] == pytest.approx([v + 5.0 for v in summary.per_seed["sft"]])


def test_a_reversed_significant_ordering_is_a_flip_and_equal_worlds_hold():
    holding = {1234: study.summarize_world(world({"sft": 0.0, "minillm": 5.0}), "s"),
               7: study.summarize_world(world({"sft": 0.0, "minillm": 4.0}), "s")}
    assert study.flips(holding) == []
    assert "**No significant ordering flips between worlds.**" in study.study_markdown({"s": holding}, "c.yaml")
    flipped = holding | {99: study.summarize_world(world({"sft": 0.0, "minillm": -3.0}), "s")}
    assert study.flips(flipped) == [("minillm", "sft", 7, 99), ("sft", "minillm", 99, 1234)]
    report = study.study_markdown({"s": flipped}, "c.yaml")
    assert "**The ranking does not hold.**" in report and "MiniLLM > SFT w/o KD in world 7, the reverse in world 99" in report
    assert "| MiniLLM | " in report and "| -3.00 [-3.00, -3.00]* |" in report  # MiniLLM vs SFT in world 99


def test_a_report_carries_the_worlds_of_the_previous_one_and_overrides_those_it_summarises_again():
    first = study.summarize_world(world({"sft": 0.0, "minillm": 5.0}), "s", baseline="a" * 40)
    previous = json.loads(json.dumps({"s": {"7": first.to_json(), "99": first.to_json()}}))  # as study.json holds it
    assert study.WorldSummary.from_json(previous["s"]["7"]) == first
    again = study.summarize_world(world({"sft": 0.0, "minillm": -3.0}), "s", baseline="b" * 40)
    merged = study.merge_worlds({"s": {99: again, 1234: again}}, previous)
    assert list(merged["s"]) == [7, 99, 1234] and merged["s"][7] == first and merged["s"][99] == again
    assert "world seed 7 (training seeds [1, 2], commit aaaaaaa)" in study.study_markdown(merged, "c.yaml")


def test_queue_runs_the_whole_pipeline_per_world_and_the_config_is_checked(tmp_path):
    config = study.StudyConfig(worlds={1234: (1, 2, 3), 7: (1,)})
    assert study.queue_commands(config) == [
        ["dvc", "exp", "run", "--queue", "--name", "study-world1234", "-S", "seed=1234", "-S", "train_seeds=[1, 2, 3]"],
        ["dvc", "exp", "run", "--queue", "--name", "study-world7", "-S", "seed=7", "-S", "train_seeds=[1]"]]
    (tmp_path / "study.yaml").write_text("worlds: {1: [1], 2: seven}\nmetrics: m\npredictions: p\n")
    with pytest.raises(ConfigError, match=r"study.yaml: worlds: 2: an integer world seed with a non-empty list"):
        study.load_config(tmp_path / "study.yaml")
    (tmp_path / "study.yaml").write_text("worlds: [1, 2]\nmetrics: m\npredictions: p\n")
    with pytest.raises(ConfigError, match=r"study.yaml: worlds: a mapping of world seed"):
        study.load_config(tmp_path / "study.yaml")
    committed = study.load_config(Path(__file__).parents[1] / "configs" / "study.yaml")
    assert list(committed.worlds)[0] == 1234 and len(committed.worlds[1234]) >= 3  # the 3 training seeds


def run(root: Path, *command: str) -> str:
    return subprocess.run(command, cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_world_scores_reads_an_experiments_predictions_from_the_dvc_cache(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    run(root, "git", "init", "-q", "-b", "main")
    run(root, "git", "config", "user.email", "t@t")
    run(root, "git", "config", "user.name", "t")
    run(root, sys.executable, "-m", "dvc", "init", "-q")
    run(root, "git", "commit", "-q", "-m", "baseline")
    baseline = run(root, "git", "rev-parse", "HEAD")
    rows = [{"seed": seed, "rouge_l": float(10 * seed + prompt)} for seed in (1, 2) for prompt in range(3)]
    (root / "eval" / "kd-s-seed5").mkdir(parents=True)
    (root / "eval" / "kd-s-seed5" / "sni.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "metrics" / "eval").mkdir(parents=True)
    (root / "metrics" / "eval" / "kd-s-seed5.json").write_text(
        json.dumps({"method": "kd", "student": "s", "train_seed": 5, "sets": {"sni": {}}}))
    (root / "metrics" / "eval" / "teacher.json").write_text(json.dumps({"method": "teacher"}))
    run(root, sys.executable, "-m", "dvc", "add", "-q", "eval/kd-s-seed5")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "world 7")
    experiment = run(root, "git", "rev-parse", "HEAD")
    run(root, "git", "reset", "-q", "--hard", baseline)  # an experiment hangs off its baseline, as DVC keeps it
    run(root, "git", "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/study-world7", experiment)
    shutil.rmtree(root / "eval")  # git-ignored by `dvc add`: only the cache holds the predictions now
    assert study.world_experiments(root) == {7: (experiment, baseline)}
    scores = study.world_scores(root, experiment, study.StudyConfig({7: (5,)}, "metrics/eval", "eval"))
    assert list(scores) == [("kd", "s", 5)]
    np.testing.assert_array_equal(scores[("kd", "s", 5)]["sni"], [[10, 11, 12], [20, 21, 22]])
