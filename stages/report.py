"""DVC stage `report`: every evaluation in one table laid out like the paper's Table 1, plus two plots.

reports/results.csv is the long format (method, student, train_seed, eval_set, seed, rouge_l), one row per
model, training seed, evaluation set and sampling seed; reports/table1.md is built from it with pandas: rows are the teacher, then each
method per student size; columns the evaluation sets; cells mean ± std over seeds.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.config import exit_on_user_error, load_params
from pipeline.io import atomic_write_text
from pipeline.synthetic import EVAL_SETS
from pipeline.tracking import StageRun

METHOD_ORDER = ["teacher", "sft", "kd", "seqkd", "minillm"]
METHOD_NAMES = {"teacher": "Teacher", "sft": "SFT w/o KD", "kd": "KD", "seqkd": "SeqKD", "minillm": "MiniLLM"}
SET_NAMES = {"dollyeval": "DollyEval", "selfinst": "SelfInst", "vicunaeval": "VicunaEval", "sni": "S-NI", "unni": "UnNI"}


def long_results(metrics_dir: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(metrics_dir.glob("*.json")):
        metrics = json.loads(path.read_text())
        for eval_set, summary in metrics["sets"].items():
            for seed, rouge in summary["per_seed"].items():
                rows.append({"method": metrics["method"], "student": metrics["student"],
                             "train_seed": metrics["train_seed"], "eval_set": eval_set, "seed": int(seed), "rouge_l": rouge})
    return pd.DataFrame(rows, columns=["method", "student", "train_seed", "eval_set", "seed", "rouge_l"])


def table1(results: pd.DataFrame) -> pd.DataFrame:
    summary = results.groupby(["method", "student", "eval_set"])["rouge_l"].agg(["mean", "std"]).reset_index()
    summary["cell"] = summary.apply(lambda r: f"{r['mean']:.2f} ± {0.0 if pd.isna(r['std']) else r['std']:.2f}", axis=1)
    table = summary.pivot(index=["student", "method"], columns="eval_set", values="cell")
    sets = [s for s in EVAL_SETS if s in table.columns] + sorted(set(table.columns) - set(EVAL_SETS))
    table = table[sets].rename(columns=SET_NAMES).reset_index()
    # The teacher first, then each student size with its methods in the paper's order.
    table["is_student"] = table["method"] != "teacher"
    table["order"] = table["method"].map(METHOD_ORDER.index)
    table = table.sort_values(["is_student", "student", "order"]).drop(columns=["is_student", "order"])
    table["method"] = table["method"].map(METHOD_NAMES)
    return table.rename(columns={"student": "Model", "method": "Method"})


def plot_rouge_bars(results: pd.DataFrame, path: str) -> None:
    """Rouge-L per evaluation set, one bar per method and student, error bars = std over seeds."""
    summary = results.groupby(["method", "student", "eval_set"])["rouge_l"].agg(["mean", "std"]).reset_index()
    summary["model"] = summary["method"].map(METHOD_NAMES) + " (" + summary["student"] + ")"
    summary["order"] = summary["method"].map(METHOD_ORDER.index)
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


def plot_minillm_training(curves_dir: Path, path: str) -> None:
    """MiniLLM's reward, reverse KL and validation Rouge-L against the optimiser step, a line per student."""
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for student_dir in sorted(p for p in curves_dir.iterdir() if p.is_dir()):
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


def save_figure(figure, path: str) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)


def main() -> None:
    params = load_params()
    with StageRun("report", {"evaluate.seeds": params.evaluate.seeds, "train_seeds": params.train_seeds}) as run:
        results = long_results(Path("metrics/eval"))
        atomic_write_text("reports/results.csv", results.to_csv(index=False))
        table = table1(results)
        markdown = (
            "# Rouge-L (×100), mean ± std over sampling seeds "
            f"{', '.join(str(s) for s in params.evaluate.seeds)}"
            f" and student training seeds {', '.join(str(s) for s in params.train_seeds)}\n\n"
            "Laid out like Table 1 of the MiniLLM paper. Generated by `dvc repro`; the long format is results.csv.\n\n"
            + table.to_markdown(index=False) + "\n"
        )
        atomic_write_text("reports/table1.md", markdown)
        plot_rouge_bars(results, "reports/rouge_l.png")
        plot_minillm_training(Path("plots/distill/minillm"), "reports/minillm_training.png")
        for artifact in ("table1.md", "results.csv", "rouge_l.png", "minillm_training.png"):
            run.log_artifact(f"reports/{artifact}")
        print(markdown)


if __name__ == "__main__":
    exit_on_user_error(main)
