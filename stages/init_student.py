"""DVC stage `init_student@<label>-<train seed>`: SFT of one student without KD (spec §2).

Two checkpoints: by validation Rouge-L (the "SFT w/o KD" baseline) and by validation loss (MiniLLM's start).
"""

import argparse

from pipeline import engine
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.io import atomic_write_json
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import add_sft_input_arguments, copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.stage import training_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True, help="a label of models.students")
    parser.add_argument("--seed", type=int, required=True, help="the training seed, one of train_seeds")
    add_sft_input_arguments(parser)
    parser.add_argument("--base", required=True, help="the pre-trained student")
    parser.add_argument("--out-best-rouge", required=True, help="the checkpoint to write, picked by validation Rouge-L")
    parser.add_argument("--out-best-loss", required=True, help="the checkpoint to write, picked by validation loss")
    parser.add_argument("--metrics", required=True, help="the metrics file to write (.json)")
    parser.add_argument("--plots", required=True, help="the directory of the training curves to write")
    arguments = parser.parse_args()
    student, seed = arguments.student, arguments.seed
    params = load_params()
    if student not in params.models.students:
        raise ConfigError(f"--student {student}: not a label of models.students")
    if seed not in params.train_seeds:
        raise ConfigError(f"--seed {seed}: not one of train_seeds {params.train_seeds}")
    params = params.for_student(student)  # its models.students overrides applied
    name = f"init_student@{student}-{seed}"
    tags = {"method": "sft", "student": student, "train_seed": str(seed)}
    with training_stage(name, params, seed, tags) as stage:
        inputs = load_sft_inputs(arguments)
        model = load_model(arguments.base, engine.dtype_of(params.engine)).to(stage.dist.device)
        result = train_sft(
            model=model, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
            valid_records=inputs.valid_records, stage=params.init_student, stage_key="init_student",
            engine_config=params.engine, dist=stage.dist, seed=seed, log_metrics=stage.run.log_metrics,
            checkpointer=stage.checkpointer,
        )
        if stage.dist.is_main:
            save_checkpoint(copy_with_state(model, result.best_rouge_state), inputs.tokenizer, arguments.out_best_rouge)
            save_checkpoint(copy_with_state(model, result.best_loss_state), inputs.tokenizer, arguments.out_best_loss)
            write_curves(result, arguments.plots)
            atomic_write_json(arguments.metrics, summarize(result) | {"parameters": count_parameters(model)})
            print(f"{name}: best validation Rouge-L {result.best_rouge_l:.2f}, best validation loss {result.best_loss:.3f}")


if __name__ == "__main__":
    exit_on_user_error(main)
