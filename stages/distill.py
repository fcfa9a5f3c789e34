"""DVC stages `distill_<method>@<student>-<train seed>`: KD and SeqKD (spec §3) and MiniLLM (spec §4) for one student.

    kd       from the student base, on gold responses, loss (1 - r) CE + r D(teacher, student)
    seqkd    from the student base, on the teacher's samples (teacher_generate), optional KD term
    minillm  from the student init picked by validation loss, policy-gradient reverse KL
Every method keeps the checkpoint with the best validation Rouge-L. dvc.yaml passes each its start (--start) and
training split (--train).
"""

import argparse
import contextlib
import shutil

import numpy as np
import torch

from pipeline import engine
from pipeline.config import METHODS, ConfigError, exit_on_user_error, load_params
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.minillm import summarize_minillm, train_minillm
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import KDTerm, add_sft_input_arguments, copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.stage import training_stage

# What this stage trains: every method but the teacher and SFT w/o KD (stages train_teacher and init_student).
DISTILL_METHODS = [method for method in METHODS if method not in ("teacher", "sft")]


def run_kd_or_seqkd(method, params, seed, inputs, stage, teacher, student):
    config = params.distill.kd if method == "kd" else params.distill.seqkd
    kd_ratio = config.ratio if method == "kd" else config.kd_ratio
    divergence = config.divergence if method == "kd" else "teacher_cross_entropy"
    kd = KDTerm(teacher=teacher, ratio=kd_ratio, divergence=divergence,
                beta=params.distill.kd.beta, alpha=params.distill.kd.alpha) if kd_ratio > 0 else None
    result = train_sft(
        model=student, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
        valid_records=inputs.valid_records, stage=config.train, stage_key=f"distill.{method}.train",
        engine_config=params.engine, dist=stage.dist, seed=seed, log_metrics=stage.run.log_metrics,
        checkpointer=stage.checkpointer, kd=kd,
    )
    return copy_with_state(student, result.best_rouge_state), result, summarize(result)


def run_minillm(params, seed, inputs, pt_blocks_path, stage, teacher, student, rollout_dir):
    pt_blocks = torch.from_numpy(np.load(pt_blocks_path).astype(np.int64))
    result = train_minillm(
        student=student, teacher=teacher, tokenizer=inputs.tokenizer, train_prompts=inputs.train_split.prompts(),
        pt_blocks=pt_blocks, valid_records=inputs.valid_records, config=params.distill.minillm, engine_config=params.engine,
        dist=stage.dist, seed=seed, log_metrics=stage.run.log_metrics, rollout_dir=rollout_dir, checkpointer=stage.checkpointer,
    )
    return copy_with_state(student, result.best_state), result, summarize_minillm(result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=DISTILL_METHODS, required=True)
    parser.add_argument("--student", required=True, help="a label of models.students")
    parser.add_argument("--seed", type=int, required=True, help="the training seed, one of train_seeds")
    add_sft_input_arguments(parser)
    parser.add_argument("--teacher", required=True, help="the SFT teacher")
    parser.add_argument("--start", required=True, help="the student checkpoint training starts from")
    parser.add_argument("--pt-blocks", help="the PT blocks (.npy) of MiniLLM's PT loss")
    parser.add_argument("--out", required=True, help="the directory to write: model/ and, for MiniLLM, rollouts/")
    parser.add_argument("--metrics", required=True, help="the metrics file to write (.json)")
    parser.add_argument("--plots", required=True, help="the directory of the training curves to write")
    arguments = parser.parse_args()
    method, student_label, seed = arguments.method, arguments.student, arguments.seed
    params = load_params()
    if student_label not in params.models.students:
        raise ConfigError(f"--student {student_label}: not a label of models.students")
    if seed not in params.train_seeds:
        raise ConfigError(f"--seed {seed}: not one of train_seeds {params.train_seeds}")
    if method == "minillm" and not arguments.pt_blocks:
        raise ConfigError("--pt-blocks: required by --method minillm")
    name = f"distill_{method}@{student_label}-{seed}"
    tags = {"method": method, "student": student_label, "train_seed": str(seed)}
    with training_stage(name, params, seed, tags) as stage:
        dist = stage.dist
        inputs = load_sft_inputs(arguments)
        dtype = engine.dtype_of(params.engine)
        teacher = load_model(arguments.teacher, dtype).to(dist.device).requires_grad_(False)
        student = load_model(arguments.start, dtype).to(dist.device)
        # --out holds model/ and, for MiniLLM, rollouts/; only the main rank writes, and the directory appears whole
        # only when training succeeded.
        with atomic_directory(arguments.out) if dist.is_main else contextlib.nullcontext() as out:
            if method == "minillm":
                # Rounds are saved in scratch/ while training, so that those before a kill survive the resume.
                rollout_dir = stage.checkpointer.directory / "rollouts" if dist.is_main else None
                if rollout_dir is not None:
                    rollout_dir.mkdir(exist_ok=True)
                best, result, summary = run_minillm(params, seed, inputs, arguments.pt_blocks, stage, teacher, student, rollout_dir)
                if dist.is_main:
                    shutil.copytree(rollout_dir, out / "rollouts")
            else:
                best, result, summary = run_kd_or_seqkd(method, params, seed, inputs, stage, teacher, student)
            if dist.is_main:
                save_checkpoint(best, inputs.tokenizer, out / "model")
                summary["parameters"] = count_parameters(best)
        if dist.is_main:
            write_curves(result, arguments.plots)
            atomic_write_json(arguments.metrics, summary)
            print(f"{name}: best validation Rouge-L {summary['best_valid_rouge_l']:.2f}")


if __name__ == "__main__":
    exit_on_user_error(main)
