"""DVC stage `init_student`: SFT of the student without KD (spec §2).

Two checkpoints: by validation Rouge-L (the "SFT w/o KD" baseline) and by validation loss (MiniLLM's start).
"""

from pipeline import engine
from pipeline.config import exit_on_user_error, load_params
from pipeline.io import atomic_write_json
from pipeline.models import load_model, save_checkpoint
from pipeline.sft import copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.tracking import StageRun


def main() -> None:
    params = load_params()
    engine.relaunch_if_data_parallel(params.engine)
    dist = engine.setup(params.engine)
    engine.seed_everything(params.seed)
    stage_params = {"seed": params.seed, "init_student": params.init_student.model_dump(), "engine": params.engine.model_dump()}

    with StageRun("init_student", stage_params, tags={"method": "sft", "student": params.models.student.label}, enabled=dist.is_main) as run:
        inputs = load_sft_inputs()
        model = load_model("models/base/student", engine.dtype_of(params.engine)).to(dist.device)
        result = train_sft(
            model=model, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
            valid_records=inputs.valid_records, stage=params.init_student, stage_key="init_student",
            engine_config=params.engine, dist=dist, seed=params.seed, log_metrics=run.log_metrics,
        )
        if dist.is_main:
            save_checkpoint(copy_with_state(model, result.best_rouge_state), inputs.tokenizer, "models/sft/best_rouge")
            save_checkpoint(copy_with_state(model, result.best_loss_state), inputs.tokenizer, "models/sft/best_loss")
            write_curves(result, "plots/init_student")
            atomic_write_json("metrics/init_student.json", summarize(result))
            print(f"init_student: best validation Rouge-L {result.best_rouge_l:.2f}, best validation loss {result.best_loss:.3f}")
    engine.teardown()


if __name__ == "__main__":
    exit_on_user_error(main)
