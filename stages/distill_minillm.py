"""DVC stages `distill_minillm@<student>-<train seed>` and `distill_opd@...`: the policy-gradient methods, from the
student init picked by validation loss (--start), keeping the checkpoint with the best validation Rouge-L.

    minillm  reverse KL with teacher-mixed sampling, the single-step term and the PT loss (spec §4)
    opd      on-policy distillation with a per-token reverse-KL reward: MiniLLM's recipe with OPD's settings
Both run pipeline/minillm.py's train_minillm and save every round's rollouts next to the model.
"""

import argparse
import contextlib
import shutil

import numpy as np
import torch

from pipeline import engine
from pipeline.config import exit_on_user_error, load_params
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.minillm import summarize_minillm, train_minillm
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import copy_with_state, load_sft_inputs, write_curves
from pipeline.stage import add_distill_arguments, budget_checkpoint, save_at_budget, student_params, training_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser, ["minillm", "opd"])
    parser.add_argument("--pt-blocks", required=True, help="the PT blocks (.npy) of the PT loss")
    arguments = parser.parse_args()
    method, seed = arguments.method, arguments.seed
    params = student_params(arguments, load_params())
    config = params.distill.minillm if method == "minillm" else params.distill.opd.as_policy_gradient()
    name = f"distill_{method}@{arguments.student}-{seed}"
    tags = {"method": method, "student": arguments.student, "train_seed": str(seed)}
    with training_stage(name, params, seed, tags) as stage:
        dist = stage.dist
        inputs = load_sft_inputs(arguments)
        teacher = load_model(arguments.teacher, engine.teacher_dtype_of(params.engine)).to(dist.device).requires_grad_(False)
        student = load_model(arguments.start, engine.dtype_of(params.engine)).to(dist.device)
        budget = budget_checkpoint(arguments, params, student, teacher)
        # --out holds model/ and rollouts/; only the main rank writes, and it appears whole only when training succeeded.
        with atomic_directory(arguments.out) if dist.is_main else contextlib.nullcontext() as out:
            # Rounds are saved in scratch/ while training, so that those before a kill survive the resume.
            rollout_dir = stage.checkpointer.directory / "rollouts" if dist.is_main else None
            if rollout_dir is not None:
                rollout_dir.mkdir(exist_ok=True)
            pt_blocks = torch.from_numpy(np.load(arguments.pt_blocks).astype(np.int64))
            result = train_minillm(
                student=student, teacher=teacher, tokenizer=inputs.tokenizer, train_prompts=inputs.train_split.prompts(),
                pt_blocks=pt_blocks, valid_records=inputs.valid_records, config=config, engine_config=params.engine,
                dist=dist, seed=seed, log_metrics=stage.run.log_metrics, rollout_dir=rollout_dir,
                checkpointer=stage.checkpointer, budget=budget,
            )
            summary = summarize_minillm(result)
            if dist.is_main:
                shutil.copytree(rollout_dir, out / "rollouts")
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
