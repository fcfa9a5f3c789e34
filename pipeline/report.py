"""The report: Table 1 laid out like the paper's, the measurements beyond Rouge-L, the cost model, the paper comparison
and the plots, from the metrics files the stages wrote (stages/report.py passes their paths).

reports/results.csv is the long format (method, student, train_seed, eval_set, seed, rouge_l), one row per
model, training seed, evaluation set and sampling seed. reports/table1.md (numbers in table1.csv) is built from it
with pandas: rows are the teacher, then each method per student size; columns the evaluation sets, their average
and its gap to the teacher; cells mean ± std over every (training seed, sampling seed) run; the best student of each
size bold. reports/measurements.md (long format measurements.csv): ECE, distinct-4, response length, Rouge-L by
gold-response length, ExAccErr, and cost per method from the training stages' metrics files. reports/paper.md: the
paper's published Table 1 next to ours where the paper-scale config ran. Plots: Rouge-L bars, MiniLLM training
curves, Rouge-L by length bucket, Rouge-L against training FLOPs, ExAccErr against l. reports/summary.json and
summary_sets.json, the declared DVC metrics: per model the average Rouge-L over the sets, and the mean on each set.
reports/validation_rouge_l.png: every method's validation curve, also shown by `dvc plots show`.
"""


import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import eval_metrics, significance
from pipeline.config import EVAL_SETS, METHODS
from pipeline.cost import training_flops
from pipeline.io import atomic_write_json, atomic_write_text

METHOD_NAMES = {"teacher": "Teacher", "sft": "SFT w/o KD", "sft_long": "Longer SFT", "kd": "KD", "seqkd": "SeqKD",
                "minillm": "MiniLLM", "gkd": "GKD", "distillm": "DistiLLM", "opd": "OPD"}
SET_NAMES = {"dollyeval": "DollyEval", "selfinst": "SelfInst", "vicunaeval": "VicunaEval", "sni": "S-NI", "unni": "UnNI"}
MEASUREMENTS = ["ece", "token_accuracy", "response_words", *(f"distinct_{n}" for n in eval_metrics.DISTINCT_N)]

# Every student method is compared with these, by a paired bootstrap (pipeline/significance.py).
SIGNIFICANCE_REFERENCES = ("sft", "minillm")

# The methods whose training starts from init_student's checkpoint (dvc.yaml's --start): their cost includes it.
STARTS_FROM_SFT = ("sft_long", "minillm", "gkd", "distillm", "opd")

# MINILLM_SPEC.md §6: the paper's published Table 1 cells (GPT-2 family, Rouge-L), keyed by (model size, method).
def _cells(dollyeval, selfinst, vicunaeval, sni, unni) -> dict[str, float]:
    return {"dollyeval": dollyeval, "selfinst": selfinst, "vicunaeval": vicunaeval, "sni": sni, "unni": unni}


PAPER_TABLE1 = {
    ("1.5B", "teacher"): _cells(27.6, 14.3, 16.3, 27.6, 31.8),
    ("120M", "sft"): _cells(23.3, 10.0, 14.7, 16.3, 18.5),
    ("120M", "kd"): _cells(22.8, 10.8, 13.4, 19.7, 22.0),
    ("120M", "seqkd"): _cells(22.7, 10.1, 14.3, 16.4, 18.8),
    ("120M", "minillm"): _cells(24.6, 13.2, 16.9, 25.3, 26.6),
    ("340M", "minillm"): {"dollyeval": 25.4},  # the spec leaves the other cells blank
    ("760M", "sft"): _cells(25.4, 12.4, 16.1, 21.5, 27.1),
    ("760M", "minillm"): _cells(26.4, 15.9, 18.3, 29.3, 37.7),
}
# The paper's GPT-2 checkpoints by Hub name (the last path component of `name_or_path`, so local copies count too).
PAPER_MODEL_SIZES = {"gpt2-xl": "1.5B", "gpt2": "120M", "gpt2-medium": "340M", "gpt2-large": "760M"}


REPORT_FILES = ("summary.json", "summary_sets.json", "table1.md", "table1.csv", "results.csv", "paper.md", "measurements.md",
                "measurements.csv", "rouge_l.png",
                "minillm_training.png", "rouge_l_by_length.png", "rouge_l_vs_cost.png", "exposure_bias.png",
                "validation_rouge_l.png", "validation_rouge_l_vs_flops.png", "significance.md", "compute_matched.md")


@dataclass
class EvalMetrics:
    """One metrics/eval/<name>.json, as stages/evaluate.py writes it: per evaluation set its summary (Rouge-L per
    sampling seed, measurements), and for a student the exposure-bias measurement."""

    method: str
    student: str
    train_seed: int
    sets: dict[str, dict]
    exposure_bias: dict = field(default_factory=dict)
    name: str = ""  # the file's stem, which is also the name of the stage's predictions directory (dvc.yaml)

    @classmethod
    def read(cls, path: Path) -> "EvalMetrics":
        metrics = json.loads(Path(path).read_text())
        return cls(method=metrics["method"], student=metrics["student"], train_seed=metrics["train_seed"],
                   sets=metrics["sets"], exposure_bias=metrics.get("exposure_bias", {}), name=Path(path).stem)


def long_results(evaluations: list[EvalMetrics]) -> pd.DataFrame:
    rows = []
    for metrics in evaluations:
        for eval_set, summary in metrics.sets.items():
            for seed, rouge in summary["per_seed"].items():
                rows.append({"method": metrics.method, "student": metrics.student,
                             "train_seed": metrics.train_seed, "eval_set": eval_set, "seed": int(seed), "rouge_l": rouge})
    return pd.DataFrame(rows, columns=["method", "student", "train_seed", "eval_set", "seed", "rouge_l"])


def ordered_sets(names) -> list[str]:
    return [s for s in EVAL_SETS if s in set(names)] + sorted(set(names) - set(EVAL_SETS))


def table1_numbers(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (student, method), the teacher first: per set the mean and std (ddof 1) of Rouge-L over every
    (training seed, sampling seed) run, `average` over the sets of those means, and `gap_to_teacher` = average
    minus the teacher's average."""
    stats = results.groupby(["student", "method", "eval_set"])["rouge_l"].agg(["mean", "std"]).fillna({"std": 0.0})
    wide = stats.unstack("eval_set")
    sets = ordered_sets(results["eval_set"].unique())
    table = pd.DataFrame(index=wide.index)
    for eval_set in sets:
        table[f"{eval_set}_mean"] = wide[("mean", eval_set)]
        table[f"{eval_set}_std"] = wide[("std", eval_set)]
    table["average"] = wide["mean"][sets].mean(axis=1, skipna=False)
    table = table.reset_index()
    teacher_average = table.loc[table["method"] == "teacher", "average"]
    table["gap_to_teacher"] = table["average"] - (teacher_average.iloc[0] if len(teacher_average) else float("nan"))
    # The teacher first, then each student size with its methods in the paper's order.
    table["is_student"] = table["method"] != "teacher"
    table["order"] = table["method"].map(METHODS.index)
    table = table.sort_values(["is_student", "student", "order"]).drop(columns=["is_student", "order"])
    return table.reset_index(drop=True)


def table1_markdown(numbers: pd.DataFrame, significance: dict | None = None) -> str:
    """Cells "mean ± std"; in every column the best student of each size is bold (ties at 2 decimals all bold).
    With `significance` ({(method, student, reference): {"average": Interval, ...}}), two more columns: each
    student's average difference to SFT w/o KD and to MiniLLM, starred where its paired bootstrap 95% interval
    excludes 0 (pipeline/significance.py)."""
    sets = [column.removesuffix("_mean") for column in numbers.columns if column.endswith("_mean")]
    rows = []
    for _, row in numbers.iterrows():
        same_size = numbers[(numbers["method"] != "teacher") & (numbers["student"] == row["student"])]

        def best(column: str) -> bool:
            return row["method"] != "teacher" and round(row[column], 2) == round(same_size[column].max(), 2)

        cells = {"Model": row["student"], "Method": METHOD_NAMES[row["method"]]}
        for eval_set in sets:
            text = f"{row[f'{eval_set}_mean']:.2f} ± {row[f'{eval_set}_std']:.2f}"
            cells[SET_NAMES.get(eval_set, eval_set)] = f"**{text}**" if best(f"{eval_set}_mean") else text
        average = f"{row['average']:.2f}"
        cells["Avg."] = f"**{average}**" if best("average") else average
        cells["Δ teacher"] = "" if row["method"] == "teacher" else f"{row['gap_to_teacher']:+.2f}"
        if significance is not None:
            for reference in SIGNIFICANCE_REFERENCES:
                interval = significance.get((row["method"], row["student"], reference), {}).get("average")
                cells[f"vs {METHOD_NAMES[reference]}"] = "" if interval is None else (
                    f"{interval.difference:+.2f}" + ("*" if interval.significant else ""))
        rows.append(cells)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)  # keep "-8.00", not -8


def headline(numbers: pd.DataFrame) -> tuple[dict, dict]:
    """The declared DVC metrics, what `dvc exp show` and `dvc metrics diff` compare, keyed by model ("teacher", or
    "<method>@<student>"): reports/summary.json its average Rouge-L over the sets (Table 1's Avg.), flat so that
    `dvc exp show` columns stay narrow; reports/summary_sets.json its mean Rouge-L on each set."""
    averages, per_set = {}, {}
    for _, row in numbers.iterrows():
        model = "teacher" if row["method"] == "teacher" else f"{row['method']}@{row['student']}"
        averages[model] = round(row["average"], 2)
        per_set[model] = {column.removesuffix("_mean"): round(row[column], 2)
                          for column in numbers.columns if column.endswith("_mean")}
    return averages, per_set


def validation_curves(init_curves: list[Path], distill_curves: list[Path]) -> dict[str, pd.DataFrame]:
    """{"<method>@<student>": validation Rouge-L against the step, mean over training seeds}, from the curve files
    of init_student (<run>/valid.csv: SFT w/o KD) and of the distill stages (<method>/<run>/valid.csv), runs named
    <student>-seed<k>."""
    runs: dict[str, list[pd.DataFrame]] = {}
    for method_of, files in ((lambda path: "sft", init_curves), (lambda path: path.parent.parent.name, distill_curves)):
        for path in files:
            if path.name != "valid.csv":
                continue
            student = path.parent.name.rsplit("-seed", 1)[0]
            runs.setdefault(f"{method_of(path)}@{student}", []).append(pd.read_csv(path)[["step", "valid_rouge_l"]])
    return {model: pd.concat(frames).groupby("step", as_index=False)["valid_rouge_l"].mean() for model, frames in runs.items()}


def plot_rouge_bars(results: pd.DataFrame, path: str) -> None:
    """Rouge-L per evaluation set, one bar per method and student, error bars = std over seeds."""
    summary = results.groupby(["method", "student", "eval_set"])["rouge_l"].agg(["mean", "std"]).reset_index()
    summary["model"] = summary["method"].map(METHOD_NAMES) + " (" + summary["student"] + ")"
    summary["order"] = summary["method"].map(METHODS.index)
    models = summary.sort_values(["order", "student"])["model"].unique()
    sets = [s for s in EVAL_SETS if s in set(summary["eval_set"])]
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        rows = summary[summary["model"] == model].set_index("eval_set").reindex(sets)
        positions = [i + index * width for i in range(len(sets))]
        axis.bar(positions, rows["mean"], width, yerr=rows["std"].fillna(0), label=model, capsize=2)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], [SET_NAMES.get(s, s) for s in sets])
    axis.set_ylabel("Rouge-L (×100)")
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    save_figure(figure, path)


def plot_minillm_training(curve_dirs: list[Path], path: str) -> None:
    """MiniLLM's reward, reverse KL and validation Rouge-L against the optimiser step, a line per student."""
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for student_dir in curve_dirs:
        train, valid = pd.read_csv(student_dir / "train.csv"), pd.read_csv(student_dir / "valid.csv")
        axes[0].plot(train["step"], train["rollout_reward_mean"], label=student_dir.name)
        axes[1].plot(train["step"], train["rollout_reverse_kl_per_token"], label=f"{student_dir.name} rollouts (per token)")
        axes[1].plot(valid["step"], valid["valid_reverse_kl"] / 10, marker="o", label=f"{student_dir.name} validation (per sequence / 10)")
        axes[2].plot(valid["step"], valid["valid_rouge_l"], marker="o", label=student_dir.name)
    axes[0].set_title("mean per-token reward log p − log q")
    axes[1].set_title("reverse KL of student samples")
    axes[2].set_title("validation Rouge-L")
    for axis in axes:
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def in_table_order(frame: pd.DataFrame) -> pd.DataFrame:
    """The teacher first, then each student size with its methods in the paper's order (as in Table 1)."""
    keys = frame.assign(is_student=frame["method"] != "teacher", order=frame["method"].map(METHODS.index))
    return frame.loc[keys.sort_values(["is_student", "student", "order"]).index]


def set_measurements(evaluations: list[EvalMetrics]) -> pd.DataFrame:
    """One row per (method, student, train_seed, eval_set): the evaluate stage's measurements beyond Rouge-L."""
    rows = []
    for metrics in evaluations:
        for eval_set, summary in metrics.sets.items():
            row = {"method": metrics.method, "student": metrics.student, "train_seed": metrics.train_seed,
                   "eval_set": eval_set, "rouge_l": summary["rouge_l"]}
            row |= {key: summary.get(key) for key in MEASUREMENTS}
            for bucket, values in summary.get("rouge_l_by_length", {}).items():
                row[f"rouge_l_len_{bucket}"] = values["rouge_l"]
                row[f"count_len_{bucket}"] = values["count"]
            rows.append(row)
    return pd.DataFrame(rows)


def rouge_by_length(measurements: pd.DataFrame) -> pd.DataFrame:
    """Rouge-L per (method, student, length bucket) over all sets: bucket means weighted by their example counts,
    then averaged over training seeds."""
    rows = []
    for bucket in [eval_metrics.bucket_name(first, last) for first, last in eval_metrics.LENGTH_BUCKETS]:
        score, count = f"rouge_l_len_{bucket}", f"count_len_{bucket}"
        if score not in measurements:
            continue
        present = measurements.dropna(subset=[score]).assign(weighted=lambda frame: frame[score] * frame[count])
        per_run = present.groupby(["method", "student", "train_seed"])[["weighted", count]].sum()
        per_run["rouge_l"] = per_run["weighted"] / per_run[count]
        per_model = per_run.groupby(["method", "student"]).agg(rouge_l=("rouge_l", "mean"), examples=(count, "first"))
        rows.append(per_model.reset_index().assign(bucket=bucket))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["method", "student", "bucket", "rouge_l", "examples"])


def exposure_curves(evaluations: list[EvalMetrics]) -> pd.DataFrame:
    """ExAccErr(l) per (method, student, l), averaged over training seeds; the teacher has none."""
    rows = []
    for metrics in evaluations:
        curve = metrics.exposure_bias.get("curve")
        if curve:
            rows += [{"method": metrics.method, "student": metrics.student, "train_seed": metrics.train_seed,
                      "l": l, "ex_acc_err": value} for l, value in zip(curve["l"], curve["ex_acc_err"])]
    frame = pd.DataFrame(rows, columns=["method", "student", "train_seed", "l", "ex_acc_err"])
    return frame.groupby(["method", "student", "l"], as_index=False)["ex_acc_err"].mean()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class TrainingMetrics:
    """Where the training stages' metrics files are: one <student>-seed<k>.json per run in `init_student` and in
    `distill`/<method>/, and the teacher's SFT and SeqKD generation files."""

    init_student: Path
    distill: Path
    train_teacher: Path
    teacher_generate: Path


def training_cost(files: TrainingMetrics, student: str, train_seed: int, method: str) -> dict:
    """Compute spent to produce one student from its pre-trained base (pre-training and the teacher's SFT, shared
    by every method, are left out): the methods that start from the SFT init (STARTS_FROM_SFT) include it, SeqKD the
    teacher's generation of its training data when that stage records it. FLOPs = 6 N_s (trained tokens) + 2 N_s
    (generated tokens) + 2 N_t (teacher-forward tokens), N_s and N_t the student's and the teacher's parameters."""
    run = f"{student}-seed{train_seed}"
    init = files.init_student / f"{run}.json"
    if method == "sft":
        stage_files = [init]
    else:
        stage_files = ([init] if method in STARTS_FROM_SFT else []) + [files.distill / method / f"{run}.json"]
    teacher = read_json(files.train_teacher)
    teacher_parameters = teacher.get("parameters")
    totals = {"trained_tokens": 0, "generated_tokens": 0, "teacher_forward_tokens": 0, "wall_time_s": 0.0, "flops": 0.0,
              "start_flops": 0.0}  # start_flops: the SFT init's share, spent before the method's first step
    missing = []
    for index, path in enumerate(stage_files):
        stage = read_json(path)
        if not stage:
            missing.append(f"{path} (absent)")
            continue
        trained = stage.get("response_tokens_trained", 0) + stage.get("pt_tokens_trained", 0)  # MiniLLM's PT loss
        generated = stage.get("generated_tokens", 0)
        teacher_tokens = stage.get("teacher_forward_tokens", 0)
        missing += [f"{path}:{key}" for key in ("parameters", "wall_time_s") if key not in stage]
        totals["trained_tokens"] += trained
        totals["generated_tokens"] += generated
        totals["teacher_forward_tokens"] += teacher_tokens
        totals["wall_time_s"] += stage.get("wall_time_s", float("nan"))
        flops = training_flops(stage.get("parameters", float("nan")), trained, generated,
                               teacher_parameters if teacher_parameters else float("nan"), teacher_tokens)
        if teacher_tokens and not teacher_parameters:
            missing.append(f"{files.train_teacher}:parameters")
        totals["flops"] += flops
        if index < len(stage_files) - 1:
            totals["start_flops"] += flops
    if method == "seqkd":
        generation = read_json(files.teacher_generate)
        if "generated_tokens" in generation and teacher_parameters:
            totals["generated_tokens"] += generation["generated_tokens"]
            totals["flops"] += training_flops(teacher_parameters, 0, generation["generated_tokens"])
            totals["wall_time_s"] += generation.get("wall_time_s", float("nan"))
        else:
            missing.append(f"{files.teacher_generate} (the teacher's SeqKD generation)")
    return totals | {"missing": "; ".join(missing)}


def costs(numbers: pd.DataFrame, measurements: pd.DataFrame, files: TrainingMetrics) -> pd.DataFrame:
    """Per (method, student): training cost averaged over training seeds, next to the Table 1 average Rouge-L."""
    runs = measurements[measurements["method"] != "teacher"][["method", "student", "train_seed"]].drop_duplicates()
    rows = [{"method": r.method, "student": r.student, "train_seed": r.train_seed}
            | training_cost(files, r.student, r.train_seed, r.method) for r in runs.itertuples()]
    columns = ["trained_tokens", "generated_tokens", "teacher_forward_tokens", "flops", "start_flops", "wall_time_s"]
    if not rows:
        return pd.DataFrame(columns=["method", "student", *columns, "missing", "average"])
    frame = pd.DataFrame(rows)
    per_model = frame.groupby(["method", "student"]).agg(**{c: (c, "mean") for c in columns},
                                                         missing=("missing", lambda m: "; ".join(sorted({x for x in m if x}))))
    return per_model.reset_index().merge(numbers[["method", "student", "average"]], on=["method", "student"])


# Where the paper and the official code differ (README, "Where the paper and the official code differ"): the param,
# how to read it from the params, its paper value and the official code's. paper.md says which one produced our cells.
OFFICIAL_SWITCHES = (
    ("evaluate.no_repeat_ngram_size", lambda p: p.evaluate.no_repeat_ngram_size, 0, 6),
    ("evaluate.exposure_bias_skip_first", lambda p: p.evaluate.exposure_bias_skip_first, False, True),
    ("data.long_eval_prompts", lambda p: p.data.long_eval_prompts, "drop", "truncate"),
    # Both used the authors' published split; a random split of the same data is neither.
    ("data.splits", lambda p: "the authors' files" if p.data.splits else "random", "the authors' files",
     "the authors' files"),
    ("distill.seqkd.kd_ratio", lambda p: p.distill.seqkd.kd_ratio, 0.0, 0.5),
    ("distill.minillm.returns", lambda p: p.distill.minillm.returns, "paper", "discounted"),
    ("distill.minillm.reward_scale", lambda p: p.distill.minillm.reward_scale, 1.0, 0.5),
    ("distill.minillm.whitening", lambda p: p.distill.minillm.whitening, "round", "official_micro_batch"),
    ("distill.minillm.single_step_weighted", lambda p: p.distill.minillm.single_step_weighted, True, False),
    ("distill.minillm.pt_teacher_kd_ratio", lambda p: p.distill.minillm.pt_teacher_kd_ratio, 0.0, 0.5),
)


def settings_markdown(params) -> list[str]:
    """The table of paper.md that says which of the paper's and the official code's behaviours this run used."""
    rows = []
    for key, value_of, paper, official in OFFICIAL_SWITCHES:
        value = value_of(params)
        follows = ("both" if value == paper == official else "paper" if value == paper
                   else "official code" if value == official else "neither")
        rows.append({"param": key, "this run": str(value), "paper": str(paper), "official code": str(official),
                     "follows": follows})
    for label in params.models.students:  # the official gpt2-base script's 256 rollouts per step; 64 elsewhere
        value = params.for_student(label).distill.minillm.batch_size
        rows.append({"param": f"distill.minillm.batch_size ({label})", "this run": str(value), "paper": "64",
                     "official code": "256 for gpt2, 64 for medium and large", "follows": ""})
    return ["## The settings that produced our cells", "",
            "Each difference between the paper and the official code is a param (README); this run's values:", "",
            pd.DataFrame(rows).to_markdown(index=False), ""]


def paper_comparison(params, numbers: pd.DataFrame) -> str:
    """reports/paper.md: the paper's Table 1 (spec §6) and, for a paper-scale run, ours beside it."""
    teacher_size = PAPER_MODEL_SIZES.get(Path(params.models.teacher.name_or_path or "").name)
    paper_scale = teacher_size == "1.5B" and params.data.source != "synthetic"
    sets = [s for s in EVAL_SETS if f"{s}_mean" in numbers]
    lines = ["# The paper's Table 1 (GPT-2 family, Rouge-L) next to ours", "",
             "Published numbers from MINILLM_SPEC.md §6 (cells the spec leaves blank are not filled in here).", ""]
    if not paper_scale:
        lines += ["This run is not the paper-scale configuration (a GPT-2 XL teacher on Dolly, configs/paper-gpt2.yaml): "
                  "it is a different task with different models, so no difference to the paper is computed.", ""]
    rows = []
    for (size, method), published in PAPER_TABLE1.items():
        row = {"Model": size, "Method": METHOD_NAMES[method]}
        ours = pd.DataFrame()
        if paper_scale:
            label = params.models.teacher.label if method == "teacher" else next(
                (label for label, spec in params.models.students.items()
                 if PAPER_MODEL_SIZES.get(Path(spec.name_or_path or "").name) == size), None)
            ours = numbers[(numbers["method"] == method) & (numbers["student"] == label)]
        for eval_set in sets:
            paper_value = published.get(eval_set)
            cell = "" if paper_value is None else f"{paper_value:.1f}"
            if len(ours):
                ours_value = ours.iloc[0][f"{eval_set}_mean"]
                cell = f"{cell} / {ours_value:.2f}" + (f" ({ours_value - paper_value:+.2f})" if paper_value is not None else "")
            row[SET_NAMES[eval_set]] = cell
        rows.append(row)
    if paper_scale:
        lines += ["Cells: paper / ours (ours − paper). Ours: mean over seeds, as in table1.md.", ""]
    return "\n".join([*lines, pd.DataFrame(rows).to_markdown(index=False), "", *settings_markdown(params)])


def measurements_markdown(measurements: pd.DataFrame, by_length: pd.DataFrame, exposure: pd.DataFrame, cost: pd.DataFrame) -> str:
    """reports/measurements.md: calibration, diversity, length buckets, exposure bias and cost, one table each."""
    def model_name(frame: pd.DataFrame) -> pd.Series:
        return frame["method"].map(METHOD_NAMES) + " (" + frame["student"].astype(str) + ")"

    def per_set_table(column: str, digits: int) -> str:
        means = measurements.groupby(["method", "student", "eval_set"])[column].mean().unstack("eval_set")
        means = in_table_order(means[ordered_sets(means.columns)].rename(columns=SET_NAMES).reset_index())
        means.insert(0, "Model", model_name(means))
        return means.drop(columns=["method", "student"]).round(digits).to_markdown(index=False)

    parts = ["# Measurements beyond Rouge-L", "",
             "Generated by `dvc repro` from metrics/eval (definitions: pipeline/eval_metrics.py). Each number is the "
             "mean over sampling seeds, then over training seeds.", "",
             "## Calibration: ECE of next-token probabilities, teacher-forced on the gold responses (lower is better)", "",
             per_set_table("ece", 4), "",
             "## Diversity: distinct-4 of the sampled responses", "", per_set_table("distinct_4", 3), "",
             "## Response length (words)", "", per_set_table("response_words", 2), ""]
    if len(by_length):
        pivot = by_length.pivot_table(index=["method", "student"], columns="bucket", values="rouge_l")
        buckets = [eval_metrics.bucket_name(f, l) for f, l in eval_metrics.LENGTH_BUCKETS if eval_metrics.bucket_name(f, l) in pivot]
        pivot = in_table_order(pivot[buckets].reset_index())
        pivot.insert(0, "Model", model_name(pivot))
        counts = by_length.groupby("bucket")["examples"].first().astype(int)
        pivot = pivot.drop(columns=["method", "student"]).rename(columns={b: f"{b} words ({counts[b]} ex.)" for b in buckets})
        parts += ["## Rouge-L by gold-response length (all sets pooled)", "", pivot.round(2).to_markdown(index=False), ""]
    if len(exposure):
        lengths = [l for l in eval_metrics.EXPOSURE_BIAS_REPORTED_LENGTHS if l < exposure["l"].max()] + [exposure["l"].max()]
        pivot = exposure[exposure["l"].isin(lengths)].pivot_table(index=["method", "student"], columns="l", values="ex_acc_err")
        pivot = in_table_order(pivot.reset_index())
        pivot.insert(0, "Model", model_name(pivot))
        pivot = pivot.drop(columns=["method", "student"]).rename(columns={l: f"l={l}" for l in lengths})
        parts += [f"## Exposure bias: ExAccErr(l) in % on {eval_metrics.EXPOSURE_BIAS_SET} "
                  f"(first {eval_metrics.EXPOSURE_BIAS_PROMPTS} prompts, one sample each; lower is better)", "",
                  pivot.round(1).to_markdown(index=False), ""]
    if len(cost):
        table = in_table_order(cost).assign(Model=model_name(in_table_order(cost)))
        table = table[["Model", "trained_tokens", "generated_tokens", "teacher_forward_tokens", "flops", "wall_time_s", "average"]]
        table = table.rename(columns={"trained_tokens": "trained tokens", "generated_tokens": "generated tokens",
                                      "teacher_forward_tokens": "teacher-forward tokens", "flops": "training FLOPs",
                                      "wall_time_s": "wall time (s)", "average": "avg. Rouge-L"})
        parts += ["## Cost per method", "",
                  "From the pre-trained student (Longer SFT, MiniLLM, GKD, DistiLLM and OPD include the SFT initialisation they start "
                  "from; teacher SFT and pre-training "
                  "excluded). FLOPs = 6·N_student·trained tokens + 2·N_student·generated tokens + 2·N_teacher·teacher-forward tokens; "
                  "MiniLLM's PT-loss tokens count as trained when pt_coef > 0 (pipeline/cost.py).", "",
                  table.to_markdown(index=False, floatfmt=".3g"), ""]
        gaps = sorted({m for text in cost["missing"] for m in text.split("; ") if m})
        if gaps:
            parts += ["Not recorded by the training stages (counted as 0 tokens or NaN FLOPs/time): " + "; ".join(gaps), ""]
    return "\n".join(parts)


def plot_rouge_by_length(by_length: pd.DataFrame, path: str) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.6))
    buckets = [eval_metrics.bucket_name(f, l) for f, l in eval_metrics.LENGTH_BUCKETS
               if eval_metrics.bucket_name(f, l) in set(by_length["bucket"])]
    for (method, student), rows in sorted(by_length.groupby(["method", "student"]), key=lambda kv: METHODS.index(kv[0][0])):
        rows = rows.set_index("bucket").reindex(buckets)
        axis.plot(buckets, rows["rouge_l"], marker="o", label=f"{METHOD_NAMES[method]} ({student})")
    axis.set_xlabel("gold response length (words)")
    axis.set_ylabel("Rouge-L (×100), all sets")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def pareto_front(cost: pd.DataFrame) -> pd.DataFrame:
    """The models no other model beats on both axes: at most their FLOPs and at least their average Rouge-L, one of
    them strictly. Sorted by FLOPs."""
    recorded = cost[cost["flops"] > 0].sort_values(["flops", "average"], ascending=[True, False])
    front, best = [], -float("inf")
    for row in recorded.itertuples():
        if row.average > best:
            front.append(row.Index)
            best = row.average
    return recorded.loc[front]


def plot_rouge_vs_cost(cost: pd.DataFrame, path: str) -> None:
    """Average Rouge-L against training FLOPs, a point per model, and the Pareto front through the best of them."""
    figure, axis = plt.subplots(figsize=(6, 3.6))
    recorded = in_table_order(cost[cost["flops"] > 0])  # NaN (a training stage did not record its counts) drops out
    for row in recorded.itertuples():
        axis.scatter(row.flops, row.average, label=f"{METHOD_NAMES[row.method]} ({row.student})")
    if len(recorded):
        front = pareto_front(recorded)
        axis.step(front["flops"], front["average"], where="post", color="grey", linewidth=0.8, label="Pareto front")
        axis.set_xscale("log")
        axis.legend(fontsize=7)
    else:
        axis.text(0.5, 0.5, "no training stage recorded its token counts and parameters", ha="center", transform=axis.transAxes)
    axis.set_xlabel("training FLOPs (from the pre-trained student)")
    axis.set_ylabel("average Rouge-L (×100)")
    figure.tight_layout()
    save_figure(figure, path)


def plot_validation_vs_flops(curves: dict[str, pd.DataFrame], cost: pd.DataFrame, path: str,
                             budget_flops: float | None = None) -> None:
    """Every method's validation Rouge-L against the training FLOPs spent to reach each checkpoint: the start (the SFT
    init, for the methods that begin there) plus the method's FLOPs in proportion to its steps done (each method's
    FLOPs per step taken as constant, which holds on average for the on-policy ones); a vertical line at the
    compute-matched table's budget."""
    figure, axis = plt.subplots(figsize=(6, 3.6))
    per_model = {f"{row.method}@{row.student}": row for row in cost.itertuples()}
    for model, curve in sorted(curves.items(), key=lambda kv: (METHODS.index(kv[0].split("@")[0]), kv[0])):
        row = per_model.get(model)
        if row is None or not row.flops > 0 or curve["step"].max() == 0:
            continue
        spent = row.start_flops + (row.flops - row.start_flops) * curve["step"] / curve["step"].max()
        method, student = model.split("@", 1)
        axis.plot(spent, curve["valid_rouge_l"], marker="o", markersize=3, label=f"{METHOD_NAMES[method]} ({student})")
    if budget_flops is not None:
        axis.axvline(budget_flops, color="grey", linestyle="--", linewidth=0.8, label="compute_matched.md budget")
    axis.set_xscale("log")
    axis.set_xlabel("training FLOPs spent (from the pre-trained student)")
    axis.set_ylabel("validation Rouge-L")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def plot_exposure_bias(exposure: pd.DataFrame, path: str) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for (method, student), rows in sorted(exposure.groupby(["method", "student"]), key=lambda kv: METHODS.index(kv[0][0])):
        axis.plot(rows["l"], rows["ex_acc_err"], label=f"{METHOD_NAMES[method]} ({student})")
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xlabel("generated length l (tokens)")
    axis.set_ylabel("ExAccErr(l) (%)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def plot_validation_curves(curves: dict[str, pd.DataFrame], path: str) -> None:
    """Every method's validation Rouge-L against its own optimiser step, a line per method and student."""
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for model, curve in sorted(curves.items(), key=lambda kv: (METHODS.index(kv[0].split("@")[0]), kv[0])):
        method, student = model.split("@", 1)
        axis.plot(curve["step"], curve["valid_rouge_l"], marker="o", markersize=3, label=f"{METHOD_NAMES[method]} ({student})")
    axis.set_xlabel("optimiser step of the method")
    axis.set_ylabel("validation Rouge-L")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def save_figure(figure, path: str) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)




def significance_tests(evaluations: list[EvalMetrics], predictions: Path | list[Path], seed: int) -> dict:
    """{(method, student, reference): {set or "average": Interval}} for every student method against each of
    SIGNIFICANCE_REFERENCES of the same size, from the per-prompt scores in `predictions`/<name>/<set>.jsonl
    (`predictions` one directory, or one per evaluation)."""
    roots = predictions if isinstance(predictions, list) else [predictions] * len(evaluations)
    scores = {(e.method, e.student, e.train_seed): significance.read_scores(root / e.name, ordered_sets(e.sets))
              for e, root in zip(evaluations, roots, strict=True) if e.method != "teacher"}
    tests = {}
    for method, student, _ in scores:
        for reference in SIGNIFICANCE_REFERENCES:
            if method != reference and (method, student, reference) not in tests:
                intervals = significance.compare(scores, method, reference, student, seed)
                if intervals is not None:
                    tests[(method, student, reference)] = intervals
    return tests


def significance_markdown(tests: dict) -> str:
    """reports/significance.md: every interval, a table per reference."""
    parts = ["# Paired bootstrap 95% intervals of Rouge-L differences", "",
             "Method minus reference, same student size; paired by training seed, sampling seed and prompt; "
             f"{significance.RESAMPLES} resamples of training seeds, sampling seeds and prompts (pipeline/significance.py). "
             "`*`: the interval excludes 0. With a single training seed the intervals cover the variation over sampling "
             "seeds and prompts only, not that of training: list several `train_seeds` to include it.", ""]
    for reference in SIGNIFICANCE_REFERENCES:
        rows = []
        for (method, student, ref), intervals in sorted(tests.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
            if ref != reference:
                continue
            row = {"Model": student, "Method": METHOD_NAMES[method]}
            for name, interval in intervals.items():
                row[SET_NAMES.get(name, "Avg.")] = (f"{interval.difference:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"
                                                    + ("*" if interval.significant else ""))
            rows.append(row)
        if rows:
            parts += [f"## Against {METHOD_NAMES[reference]}", "", pd.DataFrame(rows).to_markdown(index=False), ""]
    return "\n".join(parts)


def budget_runs(budget_evaluations: list[EvalMetrics], cost: pd.DataFrame, files: TrainingMetrics) -> pd.DataFrame:
    """Per (method, student) of the compute-matched table: what each training run kept at the budget (the `at_budget`
    entry of its metrics file, pipeline/cost.py), over its training seeds; SFT w/o KD's row is its Table 1 model."""
    rows = []
    for e in budget_evaluations:
        entry = read_json(files.distill / e.method / f"{e.student}-seed{e.train_seed}.json").get("at_budget", {})
        rows.append({"method": e.method, "student": e.student, "run_flops": entry.get("run_flops", float("nan")),
                     "exceeded_at_step": entry.get("exceeded_at_step"), "kept": entry.get("kept", "(not recorded)")})
    frame = pd.DataFrame(rows, columns=["method", "student", "run_flops", "exceeded_at_step", "kept"])
    per_model = frame.groupby(["method", "student"]).agg(
        run_flops=("run_flops", "mean"),
        kept=("kept", lambda kept: "; ".join(sorted(set(kept)))),
        exceeded_at_step=("exceeded_at_step", lambda steps: ", ".join(str(int(s)) for s in steps if pd.notna(s)) or "-"),
    ).reset_index()
    sft = cost[cost["method"] == "sft"][["method", "student", "flops"]].rename(columns={"flops": "run_flops"})
    sft = sft.assign(kept="the Table 1 model", exceeded_at_step="-")
    return pd.concat([sft, per_model], ignore_index=True)


def compute_matched_markdown(budget_flops: float, numbers: pd.DataFrame, tests: dict, runs: pd.DataFrame,
                             table1: pd.DataFrame) -> str:
    """reports/compute_matched.md: Table 1's layout at one training-FLOPs budget, then what each run kept."""
    kept = runs.merge(table1[["method", "student", "average"]], on=["method", "student"], how="left")
    kept = in_table_order(kept)
    kept_table = pd.DataFrame({
        "Model": kept["student"], "Method": kept["method"].map(METHOD_NAMES),
        "run FLOPs": kept["run_flops"].map(lambda f: f"{f:.3g}"),
        "within budget": (kept["run_flops"] <= budget_flops).map({True: "yes: ran to the end", False: "no"}),
        "first validation past the budget (step)": kept["exceeded_at_step"], "kept": kept["kept"],
        "Table 1 Avg.": kept["average"].map(lambda a: f"{a:.2f}"),
    })
    over = kept[(kept["method"] == "sft") & (kept["run_flops"] > budget_flops)]
    warning = ([f"SFT w/o KD spends {over['run_flops'].iloc[0]:.3g} FLOPs, more than the budget: its row is not "
                "compute-matched; raise `compute_budget_flops` above it.", ""] if len(over) else [])
    return "\n".join([
        f"# Compute-matched Rouge-L (×100): every method at {budget_flops:.3g} training FLOPs", "",
        "Table 1's layout and evaluation protocol, each method at the same training FLOPs (`compute_budget_flops`, "
        "counted from the pre-trained student as in measurements.md's cost ledger; pipeline/cost.py). Each run keeps "
        "what Table 1's selection rule keeps if the run stops at the budget: the checkpoint with the best validation "
        "Rouge-L among the validations made within it (the start when none was); a run that ends within the budget "
        "keeps its Table 1 model. The teacher and SFT w/o KD are their Table 1 rows. vs SFT w/o KD and vs MiniLLM: "
        "the paired bootstrap of Table 1, `*` where the 95% interval excludes 0. Generated by `dvc repro`.", "",
        *warning,
        table1_markdown(numbers, tests), "",
        "## What each run kept", "",
        kept_table.to_markdown(index=False, disable_numparse=True), "",
    ])


def write_report(params, evaluations: list[EvalMetrics], init_curves: list[Path], distill_curves: list[Path],
                 training: TrainingMetrics, predictions: Path, out: Path,
                 budget_evaluations: list[EvalMetrics] | None = None, budget_predictions: Path | None = None) -> str:
    """Every file of REPORT_FILES into `out`, from the evaluations (their metrics files, and the per-prompt scores
    in `predictions`), those of the compute-matched checkpoints (`budget_evaluations`, scores in
    `budget_predictions`) and the training curves (train.csv and valid.csv of each run, see validation_curves);
    returns Table 1 as markdown."""
    budget_evaluations = budget_evaluations or []
    results = long_results(evaluations)
    atomic_write_text(out / "results.csv", results.to_csv(index=False))
    numbers = table1_numbers(results)
    atomic_write_text(out / "table1.csv", numbers.to_csv(index=False))
    tests = significance_tests(evaluations, predictions, params.seed)
    atomic_write_text(out / "significance.md", significance_markdown(tests))
    markdown = (
        "# Rouge-L (×100), mean ± std over sampling seeds "
        f"{', '.join(str(s) for s in params.evaluate.seeds)}"
        f" and student training seeds {', '.join(str(s) for s in params.train_seeds)}\n\n"
        "Laid out like Table 1 of the MiniLLM paper: bold marks the best student of each size per column; Avg. is "
        "the mean over the sets, Δ teacher its difference to the teacher's; vs SFT w/o KD and vs MiniLLM are the "
        "differences of Avg., starred where a paired bootstrap 95% interval excludes 0 (every interval, per set too: "
        "significance.md). Generated by `dvc repro`; the long format is results.csv, the numbers table1.csv.\n\n"
        + table1_markdown(numbers, tests) + "\n"
    )
    atomic_write_text(out / "table1.md", markdown)
    averages, per_set = headline(numbers)
    atomic_write_json(out / "summary.json", averages)
    atomic_write_json(out / "summary_sets.json", per_set)
    atomic_write_text(out / "paper.md", paper_comparison(params, numbers))

    measurements = set_measurements(evaluations)
    atomic_write_text(out / "measurements.csv", measurements.to_csv(index=False))
    by_length = rouge_by_length(measurements)
    exposure = exposure_curves(evaluations)
    cost = costs(numbers, measurements, training)
    atomic_write_text(out / "measurements.md", measurements_markdown(measurements, by_length, exposure, cost))

    anchors = [e for e in evaluations if e.method in ("teacher", "sft")]  # their Table 1 rows
    matched = anchors + budget_evaluations
    matched_tests = significance_tests(matched, [predictions] * len(anchors) + [budget_predictions] * len(budget_evaluations),
                                       params.seed)
    atomic_write_text(out / "compute_matched.md", compute_matched_markdown(
        params.compute_budget_flops, table1_numbers(long_results(matched)), matched_tests,
        budget_runs(budget_evaluations, cost, training), numbers))

    plot_rouge_bars(results, out / "rouge_l.png")
    minillm_runs = sorted({path.parent for path in distill_curves if path.parent.parent.name == "minillm"})
    plot_minillm_training(minillm_runs, out / "minillm_training.png")
    plot_rouge_by_length(by_length, out / "rouge_l_by_length.png")
    plot_rouge_vs_cost(cost, out / "rouge_l_vs_cost.png")
    plot_exposure_bias(exposure, out / "exposure_bias.png")
    curves = validation_curves(init_curves, distill_curves)
    plot_validation_curves(curves, out / "validation_rouge_l.png")
    plot_validation_vs_flops(curves, cost, out / "validation_rouge_l_vs_flops.png", params.compute_budget_flops)
    return markdown
