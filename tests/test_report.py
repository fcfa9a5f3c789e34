"""The report stage on a small fake metrics tree whose table values are computed by hand, and the README's
`mlflow.search_runs` snippet against a temporary store."""

import json
import re
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from dvc.repo import Repo

from pipeline import report
from pipeline.config import Params, deep_merge
from stages import report as report_stage
from tests.workspace import stage_command

REPO = Path(__file__).resolve().parents[1]

# Rouge-L per sampling seed (10, 20), by (method, student, training seed) and set.
ROUGE = {
    ("teacher", "T", 1234): {"dollyeval": [30.0, 34.0], "sni": [50.0, 50.0]},
    ("sft", "S", 1): {"dollyeval": [20.0, 22.0], "sni": [40.0, 42.0]},
    ("sft", "S", 2): {"dollyeval": [24.0, 26.0], "sni": [44.0, 46.0]},
    ("minillm", "S", 1): {"dollyeval": [25.0, 27.0], "sni": [38.0, 40.0]},
    ("minillm", "S", 2): {"dollyeval": [29.0, 31.0], "sni": [40.0, 42.0]},
}
# MiniLLM's compute-matched checkpoints (evaluate --model-at-budget): SFT w/o KD's scores, +2 on DollyEval.
ROUGE_AT_BUDGET = {
    ("minillm", "S", 1): {"dollyeval": [22.0, 24.0], "sni": [40.0, 42.0]},
    ("minillm", "S", 2): {"dollyeval": [26.0, 28.0], "sni": [44.0, 46.0]},
}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def fake_metrics_tree(root: Path) -> None:
    for (method, student, train_seed), sets, evaluation in (
            [(*item, "eval") for item in ROUGE.items()] + [(*item, "eval_at_budget") for item in ROUGE_AT_BUDGET.items()]):
        summary = {}
        for eval_set, (first, second) in sets.items():
            summary[eval_set] = {
                "per_seed": {"10": first, "20": second}, "rouge_l": (first + second) / 2,
                "rouge_l_by_length": {"0-5": {"rouge_l": first, "count": 3}, "11-inf": {"rouge_l": second, "count": 1}},
                "ece": 0.1, "token_accuracy": 0.5, "response_words": 4.0, "distinct_1": 0.2, "distinct_2": 0.4, "distinct_4": 0.8,
            }
        metrics = {"method": method, "student": student, "train_seed": train_seed, "sets": summary}
        if method != "teacher" and evaluation == "eval":
            curve = [10.0, 20.0] if method == "sft" else [-5.0, -train_seed * 1.0]
            metrics["exposure_bias"] = {"ex_acc_err_at": {"2": curve[1]}, "curve": {"l": [1, 2], "ex_acc_err": curve}}
        name = "teacher" if method == "teacher" else f"{method}-{student}-seed{train_seed}"
        write_json(root / evaluation / f"{name}.json", metrics)
        # Predictions: two prompts per sampling seed, scored mean - 1 and mean + 1 (so the seed's mean is as above).
        predictions = root.parent / evaluation / name
        predictions.mkdir(parents=True, exist_ok=True)
        for eval_set, per_seed in sets.items():
            rows = [{"seed": seed, "rouge_l": mean + offset} for seed, mean in zip((10, 20), per_seed) for offset in (-1, 1)]
            (predictions / f"{eval_set}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_json(root / "train_teacher.json", {"parameters": 5000})
    for train_seed, trained, wall in ((1, 100, 10.0), (2, 200, 20.0)):
        write_json(root / "init_student" / f"S-seed{train_seed}.json",
                   {"parameters": 1000, "response_tokens_trained": trained, "wall_time_s": wall})
        write_json(root / "distill" / "minillm" / f"S-seed{train_seed}.json",
                   {"parameters": 1000, "response_tokens_trained": 50, "generated_tokens": 40,
                    "teacher_forward_tokens": 60, "wall_time_s": 30.0,
                    "at_budget": {"budget_flops": 1e9, "exceeded_at_step": 2 + train_seed, "valid_rouge_l": 20.0,
                                  "run_flops": 2e9 * train_seed, "kept": "the best validated within budget"}})


def eval_files(metrics_root: Path) -> list[report.EvalMetrics]:
    return [report.EvalMetrics.read(path) for path in sorted((metrics_root / "eval").glob("*.json"))]


def training_files(metrics_root: Path) -> report.TrainingMetrics:
    return report.TrainingMetrics(init_student=metrics_root / "init_student", distill=metrics_root / "distill",
                                  train_teacher=metrics_root / "train_teacher.json",
                                  teacher_generate=metrics_root / "teacher_generate.json")


@pytest.fixture
def metrics_root(tmp_path: Path) -> Path:
    fake_metrics_tree(tmp_path / "metrics")
    return tmp_path / "metrics"


def test_table1_numbers_by_hand(metrics_root: Path):
    numbers = report.table1_numbers(report.long_results(eval_files(metrics_root))).set_index("method")
    assert list(numbers.index) == ["teacher", "sft", "minillm"]
    # Mean and sample std (ddof 1) over the (training seed, sampling seed) runs.
    sd_four_spaced_by_two = (20 / 3) ** 0.5  # e.g. 20, 22, 24, 26: deviations -3, -1, 1, 3
    expected = {
        "teacher": (32.0, 8**0.5, 50.0, 0.0),
        "sft": (23.0, sd_four_spaced_by_two, 43.0, sd_four_spaced_by_two),
        "minillm": (28.0, sd_four_spaced_by_two, 40.0, (8 / 3) ** 0.5),  # 38, 40, 40, 42
    }
    for method, (dolly_mean, dolly_std, sni_mean, sni_std) in expected.items():
        row = numbers.loc[method]
        assert (row["dollyeval_mean"], row["sni_mean"]) == pytest.approx((dolly_mean, sni_mean))
        assert (row["dollyeval_std"], row["sni_std"]) == pytest.approx((dolly_std, sni_std))
    assert numbers["average"].tolist() == pytest.approx([41.0, 33.0, 34.0])
    assert numbers.loc["sft", "gap_to_teacher"] == pytest.approx(-8.0)
    assert numbers.loc["minillm", "gap_to_teacher"] == pytest.approx(-7.0)


def test_table1_markdown_marks_the_best_student_per_column(metrics_root: Path):
    markdown = report.table1_markdown(report.table1_numbers(report.long_results(eval_files(metrics_root))))
    rows = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")[3:-1]]
            for line in markdown.splitlines()[2:]}
    assert rows["Teacher"] == ["32.00 ± 2.83", "50.00 ± 0.00", "41.00", ""]  # the teacher is never marked
    assert rows["SFT w/o KD"] == ["23.00 ± 2.58", "**43.00 ± 2.58**", "33.00", "-8.00"]
    assert rows["MiniLLM"] == ["**28.00 ± 2.58**", "40.00 ± 1.63", "**34.00**", "-7.00"]


def test_costs_by_hand(metrics_root: Path):
    numbers = report.table1_numbers(report.long_results(eval_files(metrics_root)))
    cost = report.costs(numbers, report.set_measurements(eval_files(metrics_root)), training_files(metrics_root)).set_index("method")
    # SFT: 6 N trained, seeds 1 and 2: 6*1000*100 and 6*1000*200.
    assert cost.loc["sft", "flops"] == pytest.approx((600_000 + 1_200_000) / 2)
    assert cost.loc["sft", "wall_time_s"] == pytest.approx(15.0)
    # MiniLLM = its SFT init + 6*1000*50 + 2*1000*40 (generated) + 2*5000*60 (teacher forward) = init + 980,000.
    assert cost.loc["minillm", "flops"] == pytest.approx((600_000 + 1_200_000) / 2 + 980_000)
    assert cost.loc["minillm", "wall_time_s"] == pytest.approx(45.0)
    assert cost.loc["minillm", "teacher_forward_tokens"] == 60
    assert cost.loc["minillm", "average"] == pytest.approx(34.0)
    assert cost.loc["sft", "missing"] == "" and cost.loc["minillm", "missing"] == ""


def test_cost_reports_missing_fields(metrics_root: Path):
    (metrics_root / "train_teacher.json").write_text("{}")
    cost = report.training_cost(training_files(metrics_root), "S", 1, "minillm")
    assert pd.isna(cost["flops"])
    assert "train_teacher.json:parameters" in cost["missing"]


def test_rouge_by_length_and_exposure_curves(metrics_root: Path):
    by_length = report.rouge_by_length(report.set_measurements(eval_files(metrics_root)))
    sft = by_length[by_length["method"] == "sft"].set_index("bucket")
    # Per run, both sets pooled by count (3 each): seed 1 (20 + 40) / 2 = 30, seed 2 (24 + 44) / 2 = 34; mean 32.
    assert sft.loc["0-5", "rouge_l"] == pytest.approx(32.0)
    assert sft.loc["11-inf", "rouge_l"] == pytest.approx(((22 + 42) / 2 + (26 + 46) / 2) / 2)
    exposure = report.exposure_curves(eval_files(metrics_root)).set_index(["method", "l"])
    assert exposure.loc[("minillm", 2), "ex_acc_err"] == pytest.approx(-1.5)  # -1 and -2 over the training seeds
    assert ("teacher", 1) not in exposure.index


def test_paper_comparison():
    numbers = pd.DataFrame([
        {"student": "1.5B", "method": "teacher", "dollyeval_mean": 27.0, "selfinst_mean": 11.0},
        {"student": "120M", "method": "minillm", "dollyeval_mean": 25.1, "selfinst_mean": 12.2},
    ])
    paper_scale = Params.model_validate(deep_merge(yaml.safe_load((REPO / "configs" / "paper-gpt2.yaml").read_text()), {
        "models": {"teacher": {"name_or_path": "/models/gpt2-xl"}}}))
    markdown = report.paper_comparison(paper_scale, numbers)
    assert "| 120M    | MiniLLM    | 24.6 / 25.10 (+0.50) | 13.2 / 12.20 (-1.00) |" in markdown
    assert "27.6 / 27.00 (-0.60)" in markdown and "14.3 / 11.00 (-3.30)" in markdown  # the teacher's full row
    # Every published row of spec §6, KD and the 760M SFT row included; a blank cell stays blank.
    assert "| 120M    | KD         | 22.8" in markdown and "| 760M    | SFT w/o KD | 25.4" in markdown
    assert "| 340M    | MiniLLM    | 25.4                 |                      |" in markdown
    # Which of the paper's and the official code's behaviours produced the cells: the paper's, here, but for the
    # truncated prompts the paper config takes from the official code; with the official overlay, the official ones.
    assert re.search(r"\| evaluate\.no_repeat_ngram_size +\| 0 +\| 0 +\| 6 +\| paper", markdown)
    assert re.search(r"\| data\.long_eval_prompts +\| truncate +\| drop +\| truncate +\| official code", markdown)
    official = Params.model_validate(deep_merge(yaml.safe_load((REPO / "configs" / "paper-gpt2.yaml").read_text()),
                                                yaml.safe_load((REPO / "configs" / "official-gpt2.yaml").read_text())))
    settings = report.paper_comparison(official, numbers).split("## The settings")[1]
    follows = [line.split("|")[-2].strip() for line in settings.splitlines()[6:] if line.startswith("| ")]
    # A random split is neither's (both used the authors' files); the students' batch rows say it in their values.
    assert follows == ["official code"] * 3 + ["neither"] + ["official code"] * 6 + ["", "", ""]
    assert re.search(r"\| distill\.minillm\.batch_size \(120M\) +\| 256 ", settings)
    assert re.search(r"\| distill\.minillm\.batch_size \(760M\) +\| 64 ", settings)
    embedded = Params.model_validate(yaml.safe_load((REPO / "params.yaml").read_text()))
    markdown = report.paper_comparison(embedded, numbers)
    assert "no difference to the paper is computed" in markdown
    assert " / " not in markdown.split("\n| Model")[1].split("## The settings")[0]


# The stages whose outputs fake_metrics_tree writes, as a matrix over methods and training seeds like dvc.yaml's.
FAKE_PIPELINE = """
stages:
  evaluate_teacher:
    cmd: "true"
    outs: [{metrics/eval/teacher.json: {cache: false}}]
  evaluate:
    matrix: {method: [sft, minillm], seed: [1, 2]}
    cmd: "true"
    outs: [{"metrics/eval/${item.method}-S-seed${item.seed}.json": {cache: false}}]
  evaluate_at_budget:
    matrix: {seed: [1, 2]}
    cmd: "true"
    outs: [{"metrics/eval_at_budget/minillm-S-seed${item.seed}.json": {cache: false}}]
  distill_minillm:
    cmd: "true"
    plots: [{plots/distill/minillm/S-seed1/train.csv: {cache: false}}, {plots/distill/minillm/S-seed1/valid.csv: {cache: false}}]
  report:
    cmd: >-
      python -m stages.report --eval-metrics metrics/eval --predictions eval --init-metrics metrics/init_student
      --distill-metrics metrics/distill --teacher-metrics metrics/train_teacher.json
      --generate-metrics metrics/teacher_generate.json --init-plots plots/init_student --distill-plots plots/distill
      --budget-metrics metrics/eval_at_budget --budget-predictions eval_at_budget --out reports
    params: [evaluate.seeds, train_seeds, compute_budget_flops]
"""


def test_report_stage_writes_every_file(metrics_root: Path, monkeypatch: pytest.MonkeyPatch):
    workdir = metrics_root.parent
    shutil.copy(REPO / "tests" / "micro_params.yaml", workdir / "params.yaml")
    for name in ("train.csv", "valid.csv"):
        source = REPO / "plots" / "distill" / "minillm" / "180K-seed1234" / name
        target = workdir / "plots" / "distill" / "minillm" / "S-seed1"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target / name)
    (workdir / "reports").mkdir()
    # The report reads the outputs of the stages dvc.yaml defines, here the fake tree's; a file left by a stage
    # that no longer exists (training seed 9) must not reach the table.
    (workdir / "dvc.yaml").write_text(FAKE_PIPELINE)
    write_json(metrics_root / "eval" / "minillm-S-seed9.json", {"method": "minillm", "student": "S", "train_seed": 9,
                                                                "sets": {"dollyeval": {"per_seed": {"10": 99.0}}}})
    monkeypatch.chdir(workdir)
    Repo.init(no_scm=True).close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    monkeypatch.setenv("MINILLM_PIPELINE_ID", "report-test")
    monkeypatch.setattr("sys.argv", stage_command("report", workdir)[2:])
    report_stage.main()
    assert set(pd.read_csv(workdir / "reports" / "results.csv")["train_seed"]) == {1, 2, 1234}
    averages = json.loads((workdir / "reports" / "summary.json").read_text())
    per_set = json.loads((workdir / "reports" / "summary_sets.json").read_text())
    assert averages == {"teacher": 41.0, "sft@S": 33.0, "minillm@S": 34.0}  # minillm: (28 + 40) / 2
    assert per_set["minillm@S"] == {"dollyeval": 28.0, "sni": 40.0}  # (25+27+29+31)/4, (38+40+40+42)/4
    valid = pd.read_csv(workdir / "plots" / "distill" / "minillm" / "S-seed1" / "valid.csv")
    [(model, curve)] = report.validation_curves([], report_stage.current_outputs("plots/distill")).items()
    assert model == "minillm@S"  # one training seed: its own curve
    assert curve.to_dict("list") == valid[["step", "valid_rouge_l"]].to_dict("list")
    for name in report.REPORT_FILES:
        assert (workdir / "reports" / name).stat().st_size > 0, name
    assert "**28.00 ± 2.58**" in (workdir / "reports" / "table1.md").read_text()
    measurements = (workdir / "reports" / "measurements.md").read_text()
    assert re.search(r"\| MiniLLM \(S\) +\| +-1\.5 \|", measurements)  # ExAccErr at the longest l, 2
    # The compute-matched table: the teacher's and SFT w/o KD's Table 1 rows, MiniLLM's checkpoints at the budget:
    # DollyEval (22+24+26+28)/4 = 25, S-NI 43, Avg. 34; SFT w/o KD + 2 on every DollyEval pair and + 0 on S-NI,
    # a constant +1 on the average, so its interval is exactly +1 (significant).
    matched = (workdir / "reports" / "compute_matched.md").read_text()
    assert "every method at 1.8e+08 training FLOPs" in matched  # tests/micro_params.yaml
    rows = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")[3:-1]]
            for line in matched.split("## What each run kept")[0].splitlines() if line.startswith("| S ")}
    assert rows["MiniLLM"] == ["**25.00 ± 2.58**", "**43.00 ± 2.58**", "**34.00**", "-7.00", "+1.00*", ""]
    assert rows["SFT w/o KD"][:3] == ["23.00 ± 2.58", "**43.00 ± 2.58**", "33.00"]
    kept = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")[3:-1]]
            for line in matched.split("## What each run kept")[1].splitlines() if line.startswith("| S ")}
    # MiniLLM's runs spent 2e9 and 4e9 (mean 3e9), past the budget at steps 3 and 4; Table 1's Avg. 34.
    assert kept["MiniLLM"] == ["3e+09", "no", "3, 4", "the best validated within budget", "34.00"]


def test_validation_curves_average_training_seeds_by_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # the report runs at the repository root, on paths relative to it
    for seed, rouge in ((1, [10.0, 20.0]), (2, [14.0, 30.0])):
        curve = tmp_path / "plots" / "distill" / "kd" / f"S-seed{seed}" / "valid.csv"
        curve.parent.mkdir(parents=True)
        curve.write_text(f"step,valid_loss,valid_rouge_l\n100,1.0,{rouge[0]}\n200,0.9,{rouge[1]}\n")
    sft = tmp_path / "plots" / "init_student" / "S-seed1" / "valid.csv"
    sft.parent.mkdir(parents=True)
    sft.write_text("step,valid_loss,valid_rouge_l\n50,2.0,5.0\n")
    files = [p.relative_to(tmp_path) for p in sorted(tmp_path.rglob("*.csv"))]
    init, distill = [f for f in files if f.parts[1] == "init_student"], [f for f in files if f.parts[1] == "distill"]
    curves = {model: curve.to_dict("list") for model, curve in report.validation_curves(init, distill).items()}
    assert curves == {"kd@S": {"step": [100, 200], "valid_rouge_l": [12.0, 25.0]},
                      "sft@S": {"step": [50], "valid_rouge_l": [5.0]}}


def readme_snippet() -> str:
    mlflow_section = (REPO / "README.md").read_text().split("\n## MLflow\n")[1].split("\n## ")[0]
    return re.search(r"```python\n(.*?)```", mlflow_section, re.DOTALL).group(1)


def test_readme_search_runs_snippet_rebuilds_the_table(metrics_root: Path, monkeypatch: pytest.MonkeyPatch):
    from pipeline.tracking import StageRun

    workdir = metrics_root.parent
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    monkeypatch.setenv("MINILLM_PIPELINE_ID", "snippet-test")
    for (method, student, train_seed), sets in ROUGE.items():
        tags = {"method": method, "student": student, "train_seed": str(train_seed)}
        with StageRun(f"evaluate@{method}-{student}-{train_seed}", {}, tags=tags) as run:
            for eval_set, per_seed in sets.items():
                run.log_child_run(eval_set, {"eval_set": eval_set, "checkpoint": "table1"},
                                  {"rouge_l": sum(per_seed) / 2, "ece": 0.1, "distinct_4": 0.8})
            # As stages/evaluate.py does, the compute-matched checkpoint's set runs come after, hence are the newest.
            for eval_set in sets:
                run.log_child_run(f"at_budget {eval_set}", {"eval_set": eval_set, "checkpoint": "at_budget"},
                                  {"rouge_l": -1.0, "ece": 0.1, "distinct_4": 0.8})
    namespace = {}
    exec(readme_snippet(), namespace)  # noqa: S102 - the README's own code, run as a user would
    table = namespace["table"]
    numbers = report.table1_numbers(report.long_results(eval_files(metrics_root))).set_index(["student", "method"])
    for (student, method), row in numbers.iterrows():
        for eval_set in ("dollyeval", "sni"):
            assert table.loc[(student, method), eval_set] == pytest.approx(row[f"{eval_set}_mean"])
    minillm_sni = namespace["minillm_sni"]
    assert set(minillm_sni["tags.train_seed"]) == {"1", "2"}
    # Each per-set run is nested under its evaluate stage run.
    stage_runs = {mlflow.get_run(run_id).data.tags["dvc.stage"] for run_id in minillm_sni["tags.mlflow.parentRunId"]}
    assert stage_runs == {"evaluate@minillm-S-1", "evaluate@minillm-S-2"}


def test_pareto_front_by_hand():
    cost = pd.DataFrame([
        {"method": "kd", "student": "S", "flops": 10.0, "average": 20.0},
        {"method": "seqkd", "student": "S", "flops": 5.0, "average": 15.0},
        {"method": "minillm", "student": "S", "flops": 30.0, "average": 25.0},
        {"method": "gkd", "student": "S", "flops": 40.0, "average": 24.0},  # dominated by MiniLLM
        {"method": "opd", "student": "S", "flops": 10.0, "average": 18.0},  # dominated by KD (same FLOPs)
        {"method": "sft", "student": "S", "flops": float("nan"), "average": 99.0},  # not recorded: left out
    ])
    assert report.pareto_front(cost)["method"].tolist() == ["seqkd", "kd", "minillm"]


def test_methods_from_the_sft_init_count_it_in_their_cost(metrics_root: Path):
    write_json(metrics_root / "distill" / "gkd" / "S-seed1.json",
               {"parameters": 1000, "response_tokens_trained": 10, "generated_tokens": 5, "teacher_forward_tokens": 10,
                "wall_time_s": 1.0})
    cost = report.training_cost(training_files(metrics_root), "S", 1, "gkd")
    init_flops = 6 * 1000 * 100
    assert cost["start_flops"] == init_flops
    assert cost["flops"] == init_flops + 6 * 1000 * 10 + 2 * 1000 * 5 + 2 * 5000 * 10
    assert report.training_cost(training_files(metrics_root), "S", 1, "kd")["start_flops"] == 0.0


def test_paired_bootstrap_known_answers():
    """Identical predictions: an interval of exactly 0, not significant. A constant shift: exactly that shift."""
    import numpy as np

    from pipeline.significance import paired_bootstrap

    rng = np.random.default_rng(0)
    zeros = {"a": np.zeros((2, 3, 8)), "b": np.zeros((2, 3, 16))}
    for interval in paired_bootstrap(zeros, seed=1, resamples=200).values():
        assert (interval.difference, interval.low, interval.high) == (0.0, 0.0, 0.0) and not interval.significant
    shifted = {name: np.full(array.shape, 0.5) for name, array in zeros.items()}
    for interval in paired_bootstrap(shifted, seed=1, resamples=200).values():
        assert (interval.difference, interval.low, interval.high) == (0.5, 0.5, 0.5) and interval.significant
    # Noise around a shift of 0.5: the interval holds 0.5 and narrows with more prompts.
    widths = []
    for prompts in (50, 5000):
        noisy = {"a": 0.5 + rng.normal(size=(1, 2, prompts))}
        interval = paired_bootstrap(noisy, seed=1, resamples=400)["average"]
        assert interval.low < 0.5 < interval.high
        widths.append(interval.high - interval.low)
    assert widths[1] < widths[0] / 5


def test_significance_pairs_methods_by_training_seed(metrics_root: Path):
    tests = report.significance_tests(eval_files(metrics_root), metrics_root.parent / "eval", seed=0)
    minillm_vs_sft = tests[("minillm", "S", "sft")]
    # MiniLLM - SFT per training seed and sampling seed, dollyeval: 25-20, 27-22, 29-24, 31-26 = 5 everywhere;
    # sni: 38-40, 40-42, 40-44, 42-46 = -2, -2, -4, -4.
    assert minillm_vs_sft["dollyeval"].difference == pytest.approx(5.0)
    assert minillm_vs_sft["sni"].difference == pytest.approx(-3.0)
    assert minillm_vs_sft["average"].difference == pytest.approx(1.0)
    assert minillm_vs_sft["dollyeval"].significant  # every pair differs by exactly 5: a constant shift
    assert ("sft", "S", "sft") not in tests and ("minillm", "S", "minillm") not in tests
    assert ("teacher", "T", "sft") not in tests
