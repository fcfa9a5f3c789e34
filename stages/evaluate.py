"""DVC stages `evaluate_teacher` and `evaluate@<method>-<student>-<train seed>`: spec §5 protocol on every
evaluation set, over every sampling seed, plus the measurements of pipeline/eval_metrics.py.

Writes predictions eval/<name>/<set>.jsonl (one row per example and sampling seed) and the DVC metrics file
metrics/eval/<name>.json (name: "teacher" or "<method>-<student>-seed<train seed>"). Per set: the Rouge-L of each
sampling seed (mean over examples), their mean and std; Rouge-L by gold-response length bucket, response length
and distinct-n (each the mean over sampling seeds); ECE and token accuracy teacher-forced on the gold responses.
For students, `exposure_bias`: ExAccErr against the teacher at a few lengths l, and the whole curve.
MLflow: the stage run holds every number; one child run per evaluation set (tag `eval_set`) holds that set's.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from pipeline import engine, eval_metrics
from pipeline.config import EVAL_SETS, METHODS, ConfigError, exit_on_user_error, load_params
from pipeline.data import build_prompt, read_jsonl
from pipeline.dvc_stages import declaration
from pipeline.evaluation import generate_responses, score_records
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.models import load_model, load_tokenizer
from pipeline.tracking import StageRun


def checkpoint(method: str, student: str | None, train_seed: int | None) -> str:
    """The SFT baseline is the student SFT picked by validation Rouge-L (spec §2)."""
    if method == "teacher":
        return "models/teacher/sft"
    if method == "sft":
        return f"models/{student}/seed{train_seed}/sft/best_rouge"
    return f"models/{student}/seed{train_seed}/{method}/model"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--student", help="a label of models.students (every method but the teacher)")
    parser.add_argument("--seed", type=int, help="the student's training seed, one of train_seeds (not for the teacher)")
    arguments = parser.parse_args()
    method, student, train_seed = arguments.method, arguments.student, arguments.seed
    params = load_params()
    if method != "teacher" and student not in params.models.students:
        raise ConfigError(f"--student {student}: not a label of models.students")
    if method != "teacher" and train_seed not in params.train_seeds:
        raise ConfigError(f"--seed {train_seed}: not one of train_seeds {params.train_seeds}")
    if method == "teacher":
        train_seed = params.seed
    config = params.evaluate
    label = params.models.teacher.label if method == "teacher" else student
    name = "teacher" if method == "teacher" else f"{method}-{student}-seed{train_seed}"  # file and directory names
    stage = "evaluate_teacher" if method == "teacher" else f"evaluate@{method}-{student}-{train_seed}"
    engine.seed_everything(params.seed)
    device = torch.device(params.engine.device)

    tags = {"method": method, "student": label, "train_seed": str(train_seed)}
    with StageRun(stage, declaration(stage).params, tags=tags) as run:
        tokenizer = load_tokenizer("data/tokenizer")
        dtype = engine.dtype_of(params.engine)
        model = load_model(checkpoint(method, student, train_seed), dtype).to(device)
        sets = [set_name for set_name in EVAL_SETS if Path(f"data/eval/{set_name}.jsonl").is_file()]
        metrics = {"method": method, "student": label, "train_seed": train_seed, "sets": {}}
        with atomic_directory(f"eval/{name}") as predictions_dir:
            for set_name in sets:
                records = read_jsonl(f"data/eval/{set_name}.jsonl")
                prompts = [build_prompt(r["instruction"], r["context"]) for r in records]
                rows, per_seed, by_length, words = [], {}, [], []
                distinct = {n: [] for n in eval_metrics.DISTINCT_N}
                for seed in config.seeds:
                    responses, _ = generate_responses(
                        model, tokenizer, prompts, seed=seed, max_new_tokens=config.max_new_tokens,
                        batch_size=config.batch_size, temperature=config.temperature, progress=f"{stage} {set_name} seed {seed}",
                    )
                    scores = score_records(records, responses)
                    per_seed[str(seed)] = statistics.fmean(scores)
                    by_length.append(eval_metrics.rouge_by_length([r["response"] for r in records], scores))
                    words.append(eval_metrics.mean_words(responses))
                    for n in eval_metrics.DISTINCT_N:
                        distinct[n].append(eval_metrics.distinct_n(responses, n))
                    rows += [{"seed": seed, "instruction": r["instruction"], "context": r["context"], "response": text,
                              "references": r["references"], "rouge_l": score}
                             for r, text, score in zip(records, responses, scores)]
                confidences, correct = eval_metrics.gold_token_predictions(
                    model, tokenizer, records, max_length=params.data.max_length,
                    max_prompt_length=params.data.max_prompt_length, batch_size=config.batch_size,
                )
                values = list(per_seed.values())
                summary = {
                    "rouge_l": statistics.fmean(values),
                    "rouge_l_std": statistics.pstdev(values),
                    "per_seed": per_seed,
                    # Buckets hold the same examples for every seed: average the per-seed bucket means.
                    "rouge_l_by_length": {
                        bucket: {"rouge_l": statistics.fmean(seed_buckets[bucket]["rouge_l"] for seed_buckets in by_length),
                                 "count": by_length[0][bucket]["count"]}
                        for bucket in by_length[0]
                    },
                    "response_words": statistics.fmean(words),
                    **{f"distinct_{n}": statistics.fmean(distinct[n]) for n in eval_metrics.DISTINCT_N},
                    "ece": eval_metrics.expected_calibration_error(confidences, correct),
                    "token_accuracy": float(correct.float().mean()),
                }
                metrics["sets"][set_name] = summary
                set_metrics = {key: value for key, value in summary.items() if isinstance(value, float)}
                set_metrics |= {f"rouge_l_len_{bucket}": v["rouge_l"] for bucket, v in summary["rouge_l_by_length"].items()}
                run.log_metrics({f"{set_name}/{key}": value for key, value in set_metrics.items()})
                run.log_child_run(f"{stage} {set_name}", {"eval_set": set_name}, set_metrics)
                with open(predictions_dir / f"{set_name}.jsonl", "w", encoding="utf-8") as handle:
                    handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                print(f"{stage}: {set_name} Rouge-L {summary['rouge_l']:.2f} ± {summary['rouge_l_std']:.2f}, "
                      f"ECE {summary['ece']:.3f}, distinct-4 {summary['distinct_4']:.3f}, {summary['response_words']:.1f} words")
            exposure_set = eval_metrics.EXPOSURE_BIAS_SET
            if method != "teacher" and exposure_set in sets:
                teacher = load_model(checkpoint("teacher", None, None), dtype).to(device)
                records = read_jsonl(f"data/eval/{exposure_set}.jsonl")[: eval_metrics.EXPOSURE_BIAS_PROMPTS]
                exposure = eval_metrics.exposure_bias(
                    model, teacher, tokenizer, records, seed=config.seeds[0], max_new_tokens=config.max_new_tokens,
                    batch_size=config.batch_size, progress=f"{stage} exposure bias",
                )
                metrics["exposure_bias"] = {"eval_set": exposure_set} | exposure
                run.log_metrics({f"ex_acc_err_{l}": value for l, value in exposure["ex_acc_err_at"].items() if value is not None})
                for l, value in zip(exposure["curve"]["l"], exposure["curve"]["ex_acc_err"]):
                    if value is not None:
                        run.log_metrics({"ex_acc_err": value}, step=l)  # the UI draws the curve against l
                print(f"{stage}: ExAccErr on {exposure_set} "
                      + ", ".join(f"l={l}: {value:.1f}%" for l, value in exposure["ex_acc_err_at"].items() if value is not None))
        atomic_write_json(f"metrics/eval/{name}.json", metrics)
        for set_name in sets:
            run.log_artifact(f"eval/{name}/{set_name}.jsonl", artifact_path="predictions")

if __name__ == "__main__":
    exit_on_user_error(main)
