"""DVC stage `distill_distillm@<student>-<train seed>`: DistiLLM (pipeline/distillm.py) from the student init picked
by validation loss (--start): skew KL on gold responses and student-generated outputs, whose share adapts to the
validation loss, replayed from a buffer. Keeps the checkpoint with the best validation Rouge-L.
"""

import argparse
import contextlib

from pipeline import engine
from pipeline.config import exit_on_user_error, load_params
from pipeline.distillm import train_distillm
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import copy_with_state, load_sft_inputs, write_curves
from pipeline.stage import add_distill_arguments, budget_checkpoint, save_at_budget, student_params, training_stage
from pipeline.student_data import summarize


def main() -> None:
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser, ["distillm"])
    arguments = parser.parse_args()
    params = student_params(arguments, load_params())
    seed = arguments.seed
    name = f"distill_distillm@{arguments.student}-{seed}"
    tags = {"method": "distillm", "student": arguments.student, "train_seed": str(seed)}
    with training_stage(name, params, seed, tags) as stage:
        dist = stage.dist
        inputs = load_sft_inputs(arguments)
        teacher = load_model(arguments.teacher, engine.teacher_dtype_of(params.engine)).to(dist.device).requires_grad_(False)
        student = load_model(arguments.start, engine.dtype_of(params.engine)).to(dist.device)
        budget = budget_checkpoint(arguments, params, student, teacher)
        # --out holds model/; only the main rank writes, and it appears whole only when training succeeded.
        with atomic_directory(arguments.out) if dist.is_main else contextlib.nullcontext() as out:
            result = train_distillm(
                config=params.distill.distillm, train_split=inputs.train_split, valid_split=inputs.valid_split,
                student=student, teacher=teacher, tokenizer=inputs.tokenizer, valid_records=inputs.valid_records,
                engine_config=params.engine, dist=dist, seed=seed, log_metrics=stage.run.log_metrics,
                checkpointer=stage.checkpointer, budget=budget,
            )
            summary = summarize(result)
            if dist.is_main:
                best = copy_with_state(student, result.best_state)
                save_checkpoint(best, inputs.tokenizer, out / "model")
                save_at_budget(result.budget, best, arguments.start, inputs.tokenizer, out / "model_at_budget")
                summary |= {"parameters": count_parameters(best), "at_budget": result.budget.summary()}
        if dist.is_main:
            write_curves(result, arguments.plots)
            atomic_write_json(arguments.metrics, summary)
            print(f"{name}: best validation Rouge-L {summary['best_valid_rouge_l']:.2f}")


if __name__ == "__main__":
    exit_on_user_error(main)
