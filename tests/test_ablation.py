"""The ablation sweep (pipeline/ablation.py): its queue commands, its config checks, and its report read back from
a git repository holding experiments the way DVC keeps them."""

import json
import subprocess
from pathlib import Path

import pytest

from pipeline import ablation
from pipeline.config import ConfigError
from tests.test_config import REPO


def test_each_variant_but_the_committed_run_is_one_queued_experiment(tmp_path):
    config = ablation.load_config(REPO / "configs" / "ablation.yaml")
    assert list(config.variants)[0] == "full" and config.paper["without length normalisation"] == 14.7
    assert ablation.queue_commands(config) == [
        ["dvc", "exp", "run", "--queue", "--name", "ablation-1", "-S", "distill.minillm.length_normalized=false"],
        ["dvc", "exp", "run", "--queue", "--name", "ablation-2", "-S", "distill.minillm.teacher_mix=0.0"],
        ["dvc", "exp", "run", "--queue", "--name", "ablation-3", "-S", "distill.minillm.single_step=false"]]
    (tmp_path / "a.yaml").write_text("variants: {full: {distill.minillm.steps: 1}}\nmetrics: m\ntraining_metrics: t\n")
    with pytest.raises(ConfigError, match=r"a.yaml: variants: the first variant is the committed run"):
        ablation.load_config(tmp_path / "a.yaml")


def commit_metrics(root: Path, dollyeval: float, best: float, message: str) -> str:
    curve = root / "plots/distill/minillm/s-seed1"
    curve.mkdir(parents=True, exist_ok=True)
    # The best (first of the tied maxima) at step 2; the last validation 10 below it.
    (curve / "valid.csv").write_text(f"step,valid_rouge_l\n0,{best - 1}\n2,{best}\n4,{best}\n6,{best - 10}\n")
    (curve / "train.csv").write_text("step,loss\n1,0.5\n")
    for directory, name, content in (
            ("metrics/eval", "minillm-s-seed1.json", {"method": "minillm", "sets": {"dollyeval": {"rouge_l": dollyeval},
                                                                                  "sni": {"rouge_l": 50.0}}}),
            ("metrics/eval", "sft-s-seed1.json", {"method": "sft", "sets": {"dollyeval": {"rouge_l": 1.0}}}),
            ("metrics/distill/minillm", "s-seed1.json", {"best_valid_rouge_l": best})):
        (root / directory).mkdir(parents=True, exist_ok=True)
        (root / directory / name).write_text(json.dumps(content))
    for command in (["git", "add", "-A"], ["git", "commit", "-q", "-m", message]):
        subprocess.run(command, cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_the_report_reads_the_baseline_and_each_variants_experiment(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for command in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"]):
        subprocess.run(command, cwd=root, check=True)
    baseline = commit_metrics(root, 30.0, 27.0, "baseline")
    variant = commit_metrics(root, 20.0, 25.0, "without teacher-mixed sampling")
    subprocess.run(["git", "reset", "-q", "--hard", baseline], cwd=root, check=True)
    subprocess.run(["git", "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/ablation-2", variant], cwd=root, check=True)
    config = ablation.load_config(REPO / "configs" / "ablation.yaml")
    assert ablation.experiments(root) == (baseline, {2: variant})
    rows = {"full": ablation.variant_row(root, baseline, config),
            "without teacher-mixed sampling": ablation.variant_row(root, variant, config)}
    assert rows["full"] == {"dollyeval": 30.0, "sni": 50.0, "average": 40.0, "best_valid_rouge_l": 27.0,  # MiniLLM only
                            "kept_steps": "2", "last_valid_rouge_l": 17.0}
    markdown = ablation.ablation_markdown(rows, config, baseline, "configs/ablation.yaml")
    assert "| full | 24.6 | 30.00 | 50.00 | 40.00 | 27.00 | 2 | 17.00 |" in markdown
    assert "| without teacher-mixed sampling | 20.4 | 20.00 | 50.00 | 35.00 | 25.00 | 2 | 15.00 |" in markdown
    assert "kept its start" not in markdown
    assert "Not run yet: without length normalisation, without the single-step term." in markdown
