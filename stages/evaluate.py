"""DVC stage `evaluate@<method>`: spec §5 protocol on every evaluation set, over every seed.

Writes predictions eval/<method>/<set>.jsonl (one row per example and seed) and the DVC metrics file
metrics/eval/<method>.json: per set, the Rouge-L of each seed (mean over examples), their mean and std.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from pipeline import engine
from pipeline.config import exit_on_user_error, load_params
from pipeline.data import build_prompt, read_jsonl
from pipeline.evaluation import generate_responses, score_records
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.models import load_model, load_tokenizer
from pipeline.synthetic import EVAL_SETS
from pipeline.tracking import StageRun

# The SFT baseline is the checkpoint picked by validation Rouge-L (spec §2).
CHECKPOINTS = {"teacher": "models/teacher", "sft": "models/sft/best_rouge", "kd": "models/kd/model",
               "seqkd": "models/seqkd/model", "minillm": "models/minillm/model"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=sorted(CHECKPOINTS), required=True)
    method = parser.parse_args().method
    params = load_params()
    config = params.evaluate
    label = params.models.teacher.label if method == "teacher" else params.models.student.label
    engine.seed_everything(params.seed)
    device = torch.device(params.engine.device)

    tags = {"method": method, "student": label}
    with StageRun(f"evaluate@{method}", {"evaluate": config.model_dump()}, tags=tags) as run:
        tokenizer = load_tokenizer("data/tokenizer")
        model = load_model(CHECKPOINTS[method], engine.dtype_of(params.engine)).to(device)
        sets = [name for name in EVAL_SETS if Path(f"data/eval/{name}.jsonl").is_file()]
        metrics = {"method": method, "student": label, "sets": {}}
        with atomic_directory(f"eval/{method}") as predictions_dir:
            for name in sets:
                records = read_jsonl(f"data/eval/{name}.jsonl")
                prompts = [build_prompt(r["instruction"], r["context"]) for r in records]
                rows, per_seed = [], {}
                for seed in config.seeds:
                    responses = generate_responses(
                        model, tokenizer, prompts, seed=seed, max_new_tokens=config.max_new_tokens,
                        batch_size=config.batch_size, temperature=config.temperature, progress=f"{method} {name} seed {seed}",
                    )
                    scores = score_records(records, responses)
                    per_seed[str(seed)] = statistics.fmean(scores)
                    rows += [{"seed": seed, "instruction": r["instruction"], "context": r["context"], "response": text,
                              "references": r["references"], "rouge_l": score}
                             for r, text, score in zip(records, responses, scores)]
                values = list(per_seed.values())
                summary = {"rouge_l": statistics.fmean(values), "rouge_l_std": statistics.pstdev(values), "per_seed": per_seed}
                metrics["sets"][name] = summary
                run.log_metrics({f"{name}/rouge_l": summary["rouge_l"], f"{name}/rouge_l_std": summary["rouge_l_std"]})
                with open(predictions_dir / f"{name}.jsonl", "w", encoding="utf-8") as handle:
                    handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                print(f"evaluate@{method}: {name} Rouge-L {summary['rouge_l']:.2f} ± {summary['rouge_l_std']:.2f}")
        atomic_write_json(f"metrics/eval/{method}.json", metrics)
        for name in sets:
            run.log_artifact(f"eval/{method}/{name}.jsonl", artifact_path="predictions")


if __name__ == "__main__":
    exit_on_user_error(main)
