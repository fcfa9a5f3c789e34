"""DVC stages `evaluate_teacher` and `evaluate@<method>-<student>`: spec §5 protocol on every evaluation set,
over every seed.

Writes predictions eval/<name>/<set>.jsonl (one row per example and sampling seed) and the DVC metrics file
metrics/eval/<name>.json (name: "teacher" or "<method>-<student>-seed<train seed>"): per set, the Rouge-L of each
sampling seed (mean over examples), their mean and std.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from pipeline import engine
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.data import build_prompt, read_jsonl
from pipeline.evaluation import generate_responses, score_records
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.models import load_model, load_tokenizer
from pipeline.synthetic import EVAL_SETS
from pipeline.tracking import StageRun

METHODS = ("teacher", "sft", "kd", "seqkd", "minillm")


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
    with StageRun(stage, {"evaluate": config.model_dump()}, tags=tags) as run:
        tokenizer = load_tokenizer("data/tokenizer")
        model = load_model(checkpoint(method, student, train_seed), engine.dtype_of(params.engine)).to(device)
        sets = [set_name for set_name in EVAL_SETS if Path(f"data/eval/{set_name}.jsonl").is_file()]
        metrics = {"method": method, "student": label, "train_seed": train_seed, "sets": {}}
        with atomic_directory(f"eval/{name}") as predictions_dir:
            for set_name in sets:
                records = read_jsonl(f"data/eval/{set_name}.jsonl")
                prompts = [build_prompt(r["instruction"], r["context"]) for r in records]
                rows, per_seed = [], {}
                for seed in config.seeds:
                    responses = generate_responses(
                        model, tokenizer, prompts, seed=seed, max_new_tokens=config.max_new_tokens,
                        batch_size=config.batch_size, temperature=config.temperature, progress=f"{stage} {set_name} seed {seed}",
                    )
                    scores = score_records(records, responses)
                    per_seed[str(seed)] = statistics.fmean(scores)
                    rows += [{"seed": seed, "instruction": r["instruction"], "context": r["context"], "response": text,
                              "references": r["references"], "rouge_l": score}
                             for r, text, score in zip(records, responses, scores)]
                values = list(per_seed.values())
                summary = {"rouge_l": statistics.fmean(values), "rouge_l_std": statistics.pstdev(values), "per_seed": per_seed}
                metrics["sets"][set_name] = summary
                run.log_metrics({f"{set_name}/rouge_l": summary["rouge_l"], f"{set_name}/rouge_l_std": summary["rouge_l_std"]})
                with open(predictions_dir / f"{set_name}.jsonl", "w", encoding="utf-8") as handle:
                    handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                print(f"{stage}: {set_name} Rouge-L {summary['rouge_l']:.2f} ± {summary['rouge_l_std']:.2f}")
        atomic_write_json(f"metrics/eval/{name}.json", metrics)
        for set_name in sets:
            run.log_artifact(f"eval/{name}/{set_name}.jsonl", artifact_path="predictions")

if __name__ == "__main__":
    exit_on_user_error(main)
