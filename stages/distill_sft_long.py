"""DVC stage `distill_sft_long@<student>-<train seed>`: the longer-SFT control. SFT w/o KD continued from MiniLLM's
start (--start, the init picked by validation loss) for as many optimiser steps as MiniLLM takes, on the gold
responses, with no teacher; it keeps the checkpoint with the best validation Rouge-L, as every method does. A method
that beats it gains more than the extra steps give.
"""

import argparse
import contextlib

from pipeline import engine
from pipeline.config import exit_on_user_error, load_params
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import add_sft_input_arguments, copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.stage import add_budget_arguments, budget_checkpoint, save_at_budget, student_params, training_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True, help="a label of models.students")
    parser.add_argument("--seed", type=int, required=True, help="the training seed, one of train_seeds")
    add_sft_input_arguments(parser)
    parser.add_argument("--start", required=True, help="the student checkpoint training starts from")
    parser.add_argument("--out", required=True, help="the directory to write: model/ and model_at_budget/")
    add_budget_arguments(parser)
    parser.add_argument("--metrics", required=True, help="the metrics file to write (.json)")
    parser.add_argument("--plots", required=True, help="the directory of the training curves to write")
    arguments = parser.parse_args()
    seed = arguments.seed
    params = student_params(arguments, load_params())
    name = f"distill_sft_long@{arguments.student}-{seed}"
    tags = {"method": "sft_long", "student": arguments.student, "train_seed": str(seed)}
    with training_stage(name, params, seed, tags) as stage:
        inputs = load_sft_inputs(arguments)
        student = load_model(arguments.start, engine.dtype_of(params.engine)).to(stage.dist.device)
        budget = budget_checkpoint(arguments, params, student)
        # --out holds model/; only the main rank writes, and it appears whole only when training succeeded.
        with atomic_directory(arguments.out) if stage.dist.is_main else contextlib.nullcontext() as out:
            result = train_sft(
                model=student, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
                valid_records=inputs.valid_records, stage=params.distill.sft_long.train,
                stage_key="distill.sft_long.train", engine_config=params.engine, dist=stage.dist, seed=seed,
                log_metrics=stage.run.log_metrics, checkpointer=stage.checkpointer, budget=budget,
            )
            if stage.dist.is_main:
                best = copy_with_state(student, result.best_rouge_state)
                save_checkpoint(best, inputs.tokenizer, out / "model")
                save_at_budget(result.budget, best, arguments.start, inputs.tokenizer, out / "model_at_budget")
        if stage.dist.is_main:
            write_curves(result, arguments.plots)
            atomic_write_json(arguments.metrics, summarize(result) | {"parameters": count_parameters(best),
                                                                      "at_budget": result.budget.summary()})
            print(f"{name}: best validation Rouge-L {result.best_rouge_l:.2f}")


if __name__ == "__main__":
    exit_on_user_error(main)
