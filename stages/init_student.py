"""DVC stage `init_student@<label>-<train seed>`: SFT of one student without KD (spec §2).

Two checkpoints: by validation Rouge-L (the "SFT w/o KD" baseline) and by validation loss (MiniLLM's start).
"""

import argparse

from pipeline import checkpoint, engine
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.dvc_stages import declaration
from pipeline.io import atomic_write_json
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.tracking import StageRun


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True, help="a label of models.students")
    parser.add_argument("--seed", type=int, required=True, help="the training seed, one of train_seeds")
    arguments = parser.parse_args()
    student, seed = arguments.student, arguments.seed
    params = load_params()
    if student not in params.models.students:
        raise ConfigError(f"--student {student}: not a label of models.students")
    if seed not in params.train_seeds:
        raise ConfigError(f"--seed {seed}: not one of train_seeds {params.train_seeds}")
    engine.relaunch_if_data_parallel(params.engine)
    dist = engine.setup(params.engine)
    engine.seed_everything(seed)
    name = f"{student}-seed{seed}"
    stage = f"init_student@{student}-{seed}"
    tags = {"method": "sft", "student": student, "train_seed": str(seed)}
    declared = declaration(stage)  # the train seed is in the stage's name and cmd, so in its declared deps' hash too
    fingerprint = checkpoint.fingerprint(declared.params | {"cmd": declared.cmd}, declared.deps)
    resume = checkpoint.find(stage, fingerprint, dist)
    if resume is not None and resume.run_id:
        tags["resumed_from"] = resume.run_id
    with StageRun(stage, declared.params, tags=tags, enabled=dist.is_main) as run:
        checkpointer = checkpoint.Checkpointer(stage, fingerprint, params.checkpoint, dist, resume, run.run_id)
        inputs = load_sft_inputs()
        model = load_model(f"models/{student}/base", engine.dtype_of(params.engine)).to(dist.device)
        result = train_sft(
            model=model, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
            valid_records=inputs.valid_records, stage=params.init_student, stage_key="init_student",
            engine_config=params.engine, dist=dist, seed=seed, log_metrics=run.log_metrics, checkpointer=checkpointer,
        )
        if dist.is_main:
            save_checkpoint(copy_with_state(model, result.best_rouge_state), inputs.tokenizer,
                            f"models/{student}/seed{seed}/sft/best_rouge")
            save_checkpoint(copy_with_state(model, result.best_loss_state), inputs.tokenizer, f"models/{student}/seed{seed}/sft/best_loss")
            write_curves(result, f"plots/init_student/{name}")
            atomic_write_json(f"metrics/init_student/{name}.json", summarize(result) | {"parameters": count_parameters(model)})
            print(f"init_student@{student}-{seed}: best validation Rouge-L {result.best_rouge_l:.2f}, "
                  f"best validation loss {result.best_loss:.3f}")
        checkpointer.finish()
    engine.teardown()


if __name__ == "__main__":
    exit_on_user_error(main)
