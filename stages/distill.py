"""DVC stages `distill_kd@<student>-<train seed>` and `distill_seqkd@...`: word-level KD and SeqKD (spec §3), SFT
recipes with a teacher, for one student, from its pre-trained base (--start).

    kd       on gold responses, loss (1 - r) CE + r D(teacher, student)
    seqkd    on the teacher's samples (teacher_generate, passed as --train), optional KD term
Each keeps the checkpoint with the best validation Rouge-L.
"""

import argparse
import contextlib

from pipeline import engine
from pipeline.config import exit_on_user_error, load_params
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import KDTerm, copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.stage import add_distill_arguments, budget_checkpoint, save_at_budget, student_params, training_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser, ["kd", "seqkd"])
    arguments = parser.parse_args()
    method, seed = arguments.method, arguments.seed
    params = student_params(arguments, load_params())
    config = params.distill.kd if method == "kd" else params.distill.seqkd
    kd_ratio = config.ratio if method == "kd" else config.kd_ratio
    divergence = config.divergence if method == "kd" else "teacher_cross_entropy"
    name = f"distill_{method}@{arguments.student}-{seed}"
    tags = {"method": method, "student": arguments.student, "train_seed": str(seed)}
    with training_stage(name, params, seed, tags) as stage:
        dist = stage.dist
        inputs = load_sft_inputs(arguments)
        teacher = load_model(arguments.teacher, engine.teacher_dtype_of(params.engine)).to(dist.device).requires_grad_(False)
        student = load_model(arguments.start, engine.dtype_of(params.engine)).to(dist.device)
        kd = KDTerm(teacher=teacher, ratio=kd_ratio, divergence=divergence, beta=params.distill.kd.beta,
                    alpha=params.distill.kd.alpha) if kd_ratio > 0 else None
        budget = budget_checkpoint(arguments, params, student, teacher)
        # --out holds model/; only the main rank writes, and it appears whole only when training succeeded.
        with atomic_directory(arguments.out) if dist.is_main else contextlib.nullcontext() as out:
            result = train_sft(
                model=student, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
                valid_records=inputs.valid_records, stage=config.train, stage_key=f"distill.{method}.train",
                engine_config=params.engine, dist=dist, seed=seed, log_metrics=stage.run.log_metrics,
                checkpointer=stage.checkpointer, kd=kd, budget=budget,
            )
            if dist.is_main:
                best = copy_with_state(student, result.best_rouge_state)
                save_checkpoint(best, inputs.tokenizer, out / "model")
                save_at_budget(result.budget, best, arguments.start, inputs.tokenizer, out / "model_at_budget")
        if dist.is_main:
            write_curves(result, arguments.plots)
            atomic_write_json(arguments.metrics, summarize(result) | {"parameters": count_parameters(best),
                                                                      "at_budget": result.budget.summary()})
            print(f"{name}: best validation Rouge-L {result.best_rouge_l:.2f}")


if __name__ == "__main__":
    exit_on_user_error(main)
