"""DVC stages `distill_<method>@<student>-<train seed>` for the methods that train on the student's own samples, each
from the student init picked by validation loss (--start), keeping the checkpoint with the best validation Rouge-L:

    minillm   policy-gradient reverse KL with teacher-mixed sampling (spec §4, pipeline/minillm.py)
    opd       on-policy distillation, per-token reverse-KL reward: MiniLLM's recipe with OPD's settings
    gkd       generalised JSD on student samples with probability lambda (pipeline/gkd.py)
    distillm  skew KL with adaptive student-generated outputs and replay (pipeline/distillm.py)
"""

import argparse
import contextlib
import shutil

import numpy as np
import torch

from pipeline import engine
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.data import TokenizedSplit
from pipeline.distillm import train_distillm
from pipeline.gkd import train_gkd
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.minillm import summarize_minillm, train_minillm
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import copy_with_state, load_sft_inputs, write_curves
from pipeline.stage import add_distill_arguments, check_student_and_seed, training_stage
from pipeline.student_data import summarize


def main() -> None:
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser, ["minillm", "opd", "gkd", "distillm"])
    parser.add_argument("--pt-blocks", help="the PT blocks (.npy) of MiniLLM's PT loss (minillm and opd)")
    parser.add_argument("--teacher-samples", help="the teacher's samples (.npz): GKD's off-policy batches with seq_kd")
    arguments = parser.parse_args()
    method, seed = arguments.method, arguments.seed
    params = load_params()
    check_student_and_seed(arguments, params)
    if method in ("minillm", "opd") and not arguments.pt_blocks:
        raise ConfigError(f"--pt-blocks: required by --method {method}")
    if method == "gkd" and params.distill.gkd.seq_kd and not arguments.teacher_samples:
        raise ConfigError("--teacher-samples: required by --method gkd with distill.gkd.seq_kd")
    name = f"distill_{method}@{arguments.student}-{seed}"
    tags = {"method": method, "student": arguments.student, "train_seed": str(seed)}
    with training_stage(name, params, seed, tags) as stage:
        dist = stage.dist
        inputs = load_sft_inputs(arguments)
        dtype = engine.dtype_of(params.engine)
        teacher = load_model(arguments.teacher, dtype).to(dist.device).requires_grad_(False)
        student = load_model(arguments.start, dtype).to(dist.device)
        common = dict(student=student, teacher=teacher, tokenizer=inputs.tokenizer, valid_records=inputs.valid_records,
                      engine_config=params.engine, dist=dist, seed=seed, log_metrics=stage.run.log_metrics,
                      checkpointer=stage.checkpointer)
        # --out holds model/ (and rollouts/); only the main rank writes, and it appears whole only when training succeeded.
        with atomic_directory(arguments.out) if dist.is_main else contextlib.nullcontext() as out:
            if method in ("minillm", "opd"):
                # Rounds are saved in scratch/ while training, so that those before a kill survive the resume.
                rollout_dir = stage.checkpointer.directory / "rollouts" if dist.is_main else None
                if rollout_dir is not None:
                    rollout_dir.mkdir(exist_ok=True)
                config = params.distill.minillm if method == "minillm" else params.distill.opd.as_policy_gradient()
                pt_blocks = torch.from_numpy(np.load(arguments.pt_blocks).astype(np.int64))
                result = train_minillm(train_prompts=inputs.train_split.prompts(), pt_blocks=pt_blocks, config=config,
                                       rollout_dir=rollout_dir, **common)
                summary = summarize_minillm(result)
                if dist.is_main:
                    shutil.copytree(rollout_dir, out / "rollouts")
            else:
                if method == "gkd":
                    seq_kd = params.distill.gkd.seq_kd
                    split = TokenizedSplit.load(arguments.teacher_samples) if seq_kd else inputs.train_split
                    result = train_gkd(config=params.distill.gkd, train_split=split, valid_split=inputs.valid_split, **common)
                else:
                    result = train_distillm(config=params.distill.distillm, train_split=inputs.train_split,
                                            valid_split=inputs.valid_split, **common)
                summary = summarize(result)
            if dist.is_main:
                best = copy_with_state(student, result.best_state)
                save_checkpoint(best, inputs.tokenizer, out / "model")
                summary["parameters"] = count_parameters(best)
        if dist.is_main:
            write_curves(result, arguments.plots)
            atomic_write_json(arguments.metrics, summary)
            print(f"{name}: best validation Rouge-L {summary['best_valid_rouge_l']:.2f}")


if __name__ == "__main__":
    exit_on_user_error(main)
