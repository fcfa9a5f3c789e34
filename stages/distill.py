"""DVC stages `distill_<method>@<student>-<train seed>`: KD and SeqKD (spec §3) and MiniLLM (spec §4) for one student.

    kd       from the student base, on gold responses, loss (1 - r) CE + r D(teacher, student)
    seqkd    from the student base, on the teacher's samples (teacher_generate), optional KD term
    minillm  from the student init picked by validation loss, policy-gradient reverse KL
Every method keeps the checkpoint with the best validation Rouge-L.
"""

import argparse
import contextlib
import shutil

import numpy as np
import torch

from pipeline import checkpoint, engine
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.dvc_stages import declaration
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.minillm import train_minillm
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import KDTerm, copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.tracking import StageRun

# Spec §3/§4: the baselines start from the pretrained student, MiniLLM from its SFT (same training seed) picked by
# validation loss.
START_CHECKPOINT = {"kd": "base", "seqkd": "base", "minillm": "seed{seed}/sft/best_loss"}


def run_kd_or_seqkd(method, params, seed, dist, run, teacher, student, checkpointer):
    config = params.distill.kd if method == "kd" else params.distill.seqkd
    inputs = load_sft_inputs("data/tokenized/train.npz" if method == "kd" else "teacher_data/train.npz")
    kd_ratio = config.ratio if method == "kd" else config.kd_ratio
    divergence = config.divergence if method == "kd" else "teacher_cross_entropy"
    kd = KDTerm(teacher=teacher, ratio=kd_ratio, divergence=divergence,
                beta=params.distill.kd.beta, alpha=params.distill.kd.alpha) if kd_ratio > 0 else None
    result = train_sft(
        model=student, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
        valid_records=inputs.valid_records, stage=config.train, stage_key=f"distill.{method}.train",
        engine_config=params.engine, dist=dist, seed=seed, log_metrics=run.log_metrics, checkpointer=checkpointer, kd=kd,
    )
    return copy_with_state(student, result.best_rouge_state), inputs.tokenizer, result, summarize(result)


def run_minillm(params, seed, dist, run, teacher, student, rollout_dir, checkpointer):
    config = params.distill.minillm
    inputs = load_sft_inputs()
    train_prompts = [inputs.train_split.example(i)[0][: inputs.train_split.example(i)[1]] for i in range(len(inputs.train_split))]
    pt_blocks = torch.from_numpy(np.load("data/pretrain/blocks.npy").astype(np.int64))
    result = train_minillm(
        student=student, teacher=teacher, tokenizer=inputs.tokenizer, train_prompts=train_prompts,
        pt_blocks=pt_blocks, valid_records=inputs.valid_records, config=config, engine_config=params.engine,
        dist=dist, seed=seed, log_metrics=run.log_metrics, rollout_dir=rollout_dir, checkpointer=checkpointer,
    )
    summary = {"best_valid_rouge_l": result.best_rouge_l, "steps": len(result.train_curve),
               "skipped_steps": result.skipped_steps, "wall_time_s": result.wall_time_s,
               "response_tokens_trained": result.response_tokens_trained, "generated_tokens": result.generated_tokens,
               "teacher_forward_tokens": result.teacher_forward_tokens,
               "final_reward_mean": result.train_curve[-1]["rollout_reward_mean"]}
    return copy_with_state(student, result.best_state), inputs.tokenizer, result, summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=sorted(START_CHECKPOINT), required=True)
    parser.add_argument("--student", required=True, help="a label of models.students")
    parser.add_argument("--seed", type=int, required=True, help="the training seed, one of train_seeds")
    arguments = parser.parse_args()
    method, student_label, seed = arguments.method, arguments.student, arguments.seed
    params = load_params()
    if student_label not in params.models.students:
        raise ConfigError(f"--student {student_label}: not a label of models.students")
    if seed not in params.train_seeds:
        raise ConfigError(f"--seed {seed}: not one of train_seeds {params.train_seeds}")
    engine.relaunch_if_data_parallel(params.engine)
    dist = engine.setup(params.engine)
    engine.seed_everything(seed)
    tags = {"method": method, "student": student_label, "train_seed": str(seed)}
    name = f"{student_label}-seed{seed}"
    stage = f"distill_{method}@{student_label}-{seed}"
    start = START_CHECKPOINT[method].format(seed=seed)
    declared = declaration(stage)
    fingerprint = checkpoint.fingerprint(declared.params | {"cmd": declared.cmd}, declared.deps)
    resume = checkpoint.find(stage, fingerprint, dist)
    if resume is not None and resume.run_id:
        tags["resumed_from"] = resume.run_id
    with StageRun(stage, declared.params, tags=tags, enabled=dist.is_main) as run:
        checkpointer = checkpoint.Checkpointer(stage, fingerprint, params.checkpoint, dist, resume, run.run_id)
        dtype = engine.dtype_of(params.engine)
        teacher = load_model("models/teacher/sft", dtype).to(dist.device).requires_grad_(False)
        student = load_model(f"models/{student_label}/{start}", dtype).to(dist.device)
        # models/<student>/seed<k>/<method>/ holds model/ and, for MiniLLM, rollouts/; only the main rank writes, and
        # the directory appears whole only when training succeeded.
        with atomic_directory(f"models/{student_label}/seed{seed}/{method}") if dist.is_main else contextlib.nullcontext() as out:
            if method == "minillm":
                # Rounds are saved in scratch/ while training, so that those before a kill survive the resume.
                rollout_dir = checkpointer.directory / "rollouts" if dist.is_main else None
                if rollout_dir is not None:
                    rollout_dir.mkdir(exist_ok=True)
                best, tokenizer, result, summary = run_minillm(params, seed, dist, run, teacher, student, rollout_dir, checkpointer)
                if dist.is_main:
                    shutil.copytree(rollout_dir, out / "rollouts")
            else:
                best, tokenizer, result, summary = run_kd_or_seqkd(method, params, seed, dist, run, teacher, student, checkpointer)
            if dist.is_main:
                save_checkpoint(best, tokenizer, out / "model")
                summary["parameters"] = count_parameters(best)
        if dist.is_main:
            write_curves(result, f"plots/distill/{method}/{name}")
            atomic_write_json(f"metrics/distill/{method}/{name}.json", summary)
            print(f"distill_{method}@{student_label}-{seed}: best validation Rouge-L {summary['best_valid_rouge_l']:.2f}")
        checkpointer.finish()
    engine.teardown()


if __name__ == "__main__":
    exit_on_user_error(main)
