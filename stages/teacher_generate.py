"""DVC stage `teacher_generate`: SeqKD's data, one teacher sample per training prompt (spec §3).

Sampling as in the spec (temperature 1, top-p 1, top-k 0). The student then trains on these responses,
never on the gold ones (the official scripts re-read the gold responses by mistake: LMOps issue #250).

It writes metrics/teacher_generate.json (tokens the teacher sampled, wall time): SeqKD's cost in the report includes
this generation.
"""

import argparse
import time

import torch

from pipeline import engine
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.data import build_prompt, read_jsonl, tokenize_records
from pipeline.dvc_stages import declaration
from pipeline.evaluation import generate_responses
from pipeline.io import atomic_directory, atomic_write_json, atomic_write_jsonl
from pipeline.models import load_model, load_tokenizer
from pipeline.tracking import StageRun


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="the tokenizer directory")
    parser.add_argument("--teacher", required=True, help="the SFT teacher")
    parser.add_argument("--prompts", required=True, help="the training records (.jsonl) whose prompts the teacher answers")
    parser.add_argument("--out", required=True, help="the directory to write: train.jsonl and its tokenized train.npz")
    parser.add_argument("--metrics", required=True, help="the metrics file to write (.json)")
    arguments = parser.parse_args()
    params = load_params()
    config = params.distill.seqkd
    engine.seed_everything(params.seed)
    device = torch.device(params.engine.device)
    with StageRun("teacher_generate", declaration("teacher_generate").params) as run:
        tokenizer = load_tokenizer(arguments.tokenizer)
        teacher = load_model(arguments.teacher, engine.teacher_dtype_of(params.engine)).to(device)
        records = read_jsonl(arguments.prompts)
        prompts = [build_prompt(r["instruction"], r["context"]) for r in records]
        started = time.perf_counter()
        responses, generated_tokens = generate_responses(
            teacher, tokenizer, prompts, seed=params.seed, max_new_tokens=config.max_new_tokens,
            batch_size=params.evaluate.batch_size, progress="teacher_generate",
        )
        wall_time_s = time.perf_counter() - started
        teacher_records = [r | {"response": text, "references": [text], "gold_response": r["response"]}
                           for r, text in zip(records, responses) if text]
        if not teacher_records:
            raise ConfigError("teacher_generate: the teacher produced no non-empty response")
        split, kept, _ = tokenize_records(tokenizer, teacher_records, params.data.max_length, params.data.max_prompt_length)
        if not kept:
            raise ConfigError(f"teacher_generate: every prompt is over data.max_prompt_length ({params.data.max_prompt_length})")
        with atomic_directory(arguments.out) as out:
            atomic_write_jsonl(out / "train.jsonl", kept)
            split.save(out / "train.npz")
        metrics = {"examples": len(kept), "empty_responses": len(records) - len(teacher_records),
                   "mean_response_words": sum(len(r["response"].split()) for r in kept) / len(kept),
                   "generated_tokens": generated_tokens, "wall_time_s": wall_time_s}
        run.log_metrics(metrics)
        atomic_write_json(arguments.metrics, metrics)
        print(f"teacher_generate: {len(kept)} teacher responses ({len(records) - len(teacher_records)} empty dropped)")


if __name__ == "__main__":
    exit_on_user_error(main)
