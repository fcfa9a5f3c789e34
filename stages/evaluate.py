"""DVC stages `evaluate_teacher`, `evaluate_sft@<student>-<train seed>` and `evaluate@<method>-<student>-<train seed>`:
spec §5 protocol on every evaluation set, over every sampling seed, plus the measurements of pipeline/eval_metrics.py.

Writes predictions eval/<name>/<set>.jsonl (one row per example and sampling seed) and the DVC metrics file
metrics/eval/<name>.json (name: "teacher" or "<method>-<student>-seed<train seed>"). Per set: the Rouge-L of each
sampling seed (mean over examples), their mean and std; Rouge-L by gold-response length bucket, response length
and distinct-n (each the mean over sampling seeds); ECE and token accuracy teacher-forced on the gold responses.
For students, `exposure_bias`: ExAccErr against the teacher at a few lengths l, and the whole curve.
A distillation method's stage then evaluates the run's compute-matched checkpoint (--model-at-budget, pipeline/cost.py)
into eval_at_budget/ and metrics/eval_at_budget/ the same way, exposure bias aside. Both checkpoints of a run come
from one training stage's output, so one process evaluates them: a stage of its own would pay its start-up again.
MLflow: the stage run holds every number (the compute-matched checkpoint's under `at_budget/`); one child run per
checkpoint and evaluation set (tags `checkpoint`: `table1` or `at_budget`, and `eval_set`) holds that set's.
"""

import argparse
import json
from pathlib import Path

import torch

from pipeline import engine, eval_metrics
from pipeline.config import EVAL_SETS, METHODS, ConfigError, exit_on_user_error, load_params
from pipeline.data import read_jsonl
from pipeline.dvc_stages import declaration
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.models import load_model, load_tokenizer
from pipeline.tracking import StageRun


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--student", help="a label of models.students (every method but the teacher)")
    parser.add_argument("--seed", type=int, help="the student's training seed, one of train_seeds (not for the teacher)")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer directory")
    parser.add_argument("--eval-sets", required=True, help="the directory of the evaluation sets, <set>.jsonl each")
    parser.add_argument("--model", required=True, help="the checkpoint to evaluate (Table 1's)")
    parser.add_argument("--teacher", help="the SFT teacher: the exposure-bias measurement of a student needs it")
    parser.add_argument("--predictions", required=True, help="the directory of predictions to write, <set>.jsonl each")
    parser.add_argument("--metrics", required=True, help="the metrics file to write (.json)")
    parser.add_argument("--model-at-budget", help="a distillation method's compute-matched checkpoint (model_at_budget/): "
                                                  "Rouge-L and the set measurements, no exposure bias")
    parser.add_argument("--predictions-at-budget", help="its predictions directory (with --model-at-budget)")
    parser.add_argument("--metrics-at-budget", help="its metrics file (with --model-at-budget)")
    arguments = parser.parse_args()
    method, student, train_seed = arguments.method, arguments.student, arguments.seed
    params = load_params()
    if method != "teacher" and student not in params.models.students:
        raise ConfigError(f"--student {student}: not a label of models.students")
    if method != "teacher" and train_seed not in params.train_seeds:
        raise ConfigError(f"--seed {train_seed}: not one of train_seeds {params.train_seeds}")
    at_budget = (arguments.model_at_budget, arguments.predictions_at_budget, arguments.metrics_at_budget)
    if any(at_budget) and not all(at_budget):
        raise ConfigError("--model-at-budget, --predictions-at-budget and --metrics-at-budget: give all three or none")
    if arguments.model_at_budget and method in ("teacher", "sft"):
        raise ConfigError(f"--model-at-budget: only a distillation method keeps a compute-matched checkpoint, not {method}")
    if method != "teacher" and not arguments.teacher:
        raise ConfigError(f"--teacher: required to evaluate a student (--method {method})")
    if method == "teacher":
        train_seed = params.seed
    label = params.models.teacher.label if method == "teacher" else student
    stage = {"teacher": "evaluate_teacher", "sft": f"evaluate_sft@{student}-{train_seed}"}.get(
        method, f"evaluate@{method}-{student}-{train_seed}")
    engine.seed_everything(params.seed)
    device = torch.device(params.engine.device)

    tags = {"method": method, "student": label, "train_seed": str(train_seed)}
    with StageRun(stage, declaration(stage).params, tags=tags) as run:
        tokenizer = load_tokenizer(arguments.tokenizer)
        set_files = {set_name: Path(arguments.eval_sets) / f"{set_name}.jsonl" for set_name in EVAL_SETS}
        set_files = {set_name: path for set_name, path in set_files.items() if path.is_file()}
        checkpoints = [("table1", arguments.model, arguments.predictions, arguments.metrics)]
        if arguments.model_at_budget:
            checkpoints.append(("at_budget", arguments.model_at_budget, arguments.predictions_at_budget,
                                arguments.metrics_at_budget))
        for checkpoint, model_dir, predictions, metrics_path in checkpoints:
            model = load_model(model_dir, engine.dtype_of(params.engine)).to(device)
            metrics = {"method": method, "student": label, "train_seed": train_seed}
            with atomic_directory(predictions) as predictions_dir:
                metrics["sets"] = evaluate_sets(model, tokenizer, set_files, predictions_dir, params, run, stage,
                                                checkpoint)
                exposure_set = eval_metrics.EXPOSURE_BIAS_SET
                if checkpoint == "table1" and method != "teacher" and exposure_set in set_files:
                    metrics["exposure_bias"] = measure_exposure_bias(
                        model, arguments.teacher, tokenizer, read_jsonl(set_files[exposure_set]), params, run, stage)
            atomic_write_json(metrics_path, metrics)
            artifact_path = "predictions" if checkpoint == "table1" else "predictions_at_budget"
            for set_name in set_files:
                run.log_artifact(Path(predictions) / f"{set_name}.jsonl", artifact_path=artifact_path)


def evaluate_sets(model, tokenizer, set_files: dict[str, Path], predictions_dir: Path, params, run: StageRun,
                  stage: str, checkpoint: str) -> dict:
    """Every evaluation set's summary; writes predictions_dir/<set>.jsonl and logs to MLflow, under `at_budget/` in
    the stage run for the compute-matched checkpoint."""
    config = params.evaluate
    prefix = "" if checkpoint == "table1" else f"{checkpoint}/"
    summaries = {}
    for set_name, path in set_files.items():
        summary, rows = eval_metrics.evaluate_set(
            model, tokenizer, read_jsonl(path), seeds=config.seeds, max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size, temperature=config.temperature, max_length=params.data.max_length,
            max_prompt_length=params.data.max_prompt_length, progress=f"{stage} {prefix}{set_name}",
            no_repeat_ngram_size=config.no_repeat_ngram_size,
        )
        summaries[set_name] = summary
        set_metrics = {key: value for key, value in summary.items() if isinstance(value, float)}
        set_metrics |= {f"rouge_l_len_{bucket}": v["rouge_l"] for bucket, v in summary["rouge_l_by_length"].items()}
        run.log_metrics({f"{prefix}{set_name}/{key}": value for key, value in set_metrics.items()})
        run.log_child_run(f"{stage} {prefix}{set_name}", {"eval_set": set_name, "checkpoint": checkpoint}, set_metrics)
        with open(predictions_dir / f"{set_name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{stage}: {prefix}{set_name} Rouge-L {summary['rouge_l']:.2f} ± {summary['rouge_l_std']:.2f}, "
              f"ECE {summary['ece']:.3f}, distinct-4 {summary['distinct_4']:.3f}, {summary['response_words']:.1f} words")
    return summaries


def measure_exposure_bias(model, teacher_dir: str, tokenizer, records: list[dict], params, run: StageRun,
                          stage: str) -> dict:
    """ExAccErr of the student against the SFT teacher on the first prompts of eval_metrics.EXPOSURE_BIAS_SET."""
    config = params.evaluate
    device = next(model.parameters()).device
    teacher = load_model(teacher_dir, engine.teacher_dtype_of(params.engine)).to(device)
    exposure = eval_metrics.exposure_bias(
        model, teacher, tokenizer, records[: eval_metrics.EXPOSURE_BIAS_PROMPTS], seed=config.seeds[0],
        max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
        no_repeat_ngram_size=config.no_repeat_ngram_size, skip_first_position=config.exposure_bias_skip_first,
        max_prompt_tokens=params.data.max_prompt_length, progress=f"{stage} exposure bias",
    )
    run.log_metrics({f"ex_acc_err_{l}": value for l, value in exposure["ex_acc_err_at"].items() if value is not None})
    for l, value in zip(exposure["curve"]["l"], exposure["curve"]["ex_acc_err"]):
        if value is not None:
            run.log_metrics({"ex_acc_err": value}, step=l)  # the UI draws the curve against l
    print(f"{stage}: ExAccErr on {eval_metrics.EXPOSURE_BIAS_SET} "
          + ", ".join(f"l={l}: {value:.1f}%" for l, value in exposure["ex_acc_err_at"].items() if value is not None))
    return {"eval_set": eval_metrics.EXPOSURE_BIAS_SET} | exposure


if __name__ == "__main__":
    exit_on_user_error(main)
