"""DVC stage `init_student@<label>`: SFT of one student without KD (spec §2).

Two checkpoints: by validation Rouge-L (the "SFT w/o KD" baseline) and by validation loss (MiniLLM's start).
"""

import argparse

from pipeline import engine
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.io import atomic_write_json
from pipeline.models import load_model, save_checkpoint
from pipeline.sft import copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.tracking import StageRun


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True, help="a label of models.students")
    student = parser.parse_args().student
    params = load_params()
    if student not in params.models.students:
        raise ConfigError(f"--student {student}: not a label of models.students")
    engine.relaunch_if_data_parallel(params.engine)
    dist = engine.setup(params.engine)
    engine.seed_everything(params.seed)
    stage_params = {"seed": params.seed, "init_student": params.init_student.model_dump(), "engine": params.engine.model_dump()}

    with StageRun(f"init_student@{student}", stage_params, tags={"method": "sft", "student": student}, enabled=dist.is_main) as run:
        inputs = load_sft_inputs()
        model = load_model(f"models/{student}/base", engine.dtype_of(params.engine)).to(dist.device)
        result = train_sft(
            model=model, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
            valid_records=inputs.valid_records, stage=params.init_student, stage_key="init_student",
            engine_config=params.engine, dist=dist, seed=params.seed, log_metrics=run.log_metrics,
        )
        if dist.is_main:
            save_checkpoint(copy_with_state(model, result.best_rouge_state), inputs.tokenizer, f"models/{student}/sft/best_rouge")
            save_checkpoint(copy_with_state(model, result.best_loss_state), inputs.tokenizer, f"models/{student}/sft/best_loss")
            write_curves(result, f"plots/init_student/{student}")
            atomic_write_json(f"metrics/init_student/{student}.json", summarize(result))
            print(f"init_student@{student}: best validation Rouge-L {result.best_rouge_l:.2f}, best validation loss {result.best_loss:.3f}")
    engine.teardown()


if __name__ == "__main__":
    exit_on_user_error(main)
