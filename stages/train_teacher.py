"""DVC stage `train_teacher`: SFT of the teacher (spec §2), checkpoint picked by validation Rouge-L."""

import argparse

from pipeline import engine
from pipeline.config import exit_on_user_error, load_params
from pipeline.io import atomic_write_json
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import add_sft_input_arguments, copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.stage import training_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    add_sft_input_arguments(parser)
    parser.add_argument("--base", required=True, help="the pre-trained teacher")
    parser.add_argument("--out", required=True, help="the SFT teacher directory to write")
    parser.add_argument("--metrics", required=True, help="the metrics file to write (.json)")
    parser.add_argument("--plots", required=True, help="the directory of the training curves to write")
    arguments = parser.parse_args()
    params = load_params()
    tags = {"method": "teacher", "student": params.models.teacher.label}
    with training_stage("train_teacher", params, params.seed, tags) as stage:
        inputs = load_sft_inputs(arguments)
        model = load_model(arguments.base, engine.dtype_of(params.engine)).to(stage.dist.device)
        result = train_sft(
            model=model, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
            valid_records=inputs.valid_records, stage=params.train_teacher, stage_key="train_teacher",
            engine_config=params.engine, dist=stage.dist, seed=params.seed, log_metrics=stage.run.log_metrics,
            checkpointer=stage.checkpointer,
        )
        if stage.dist.is_main:
            save_checkpoint(copy_with_state(model, result.best_rouge_state), inputs.tokenizer, arguments.out)
            write_curves(result, arguments.plots)
            atomic_write_json(arguments.metrics, summarize(result) | {"parameters": count_parameters(model)})
            print(f"train_teacher: best validation Rouge-L {result.best_rouge_l:.2f}")


if __name__ == "__main__":
    exit_on_user_error(main)
