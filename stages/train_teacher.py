"""DVC stage `train_teacher`: SFT of the teacher (spec §2), checkpoint picked by validation Rouge-L."""

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
    stage_params = {"seed": params.seed, "train_teacher": params.train_teacher.model_dump(), "engine": params.engine.model_dump()}

    with StageRun("train_teacher", stage_params, tags={"method": "teacher", "student": params.models.teacher.label}, enabled=dist.is_main) as run:
        inputs = load_sft_inputs()
        model = load_model("models/teacher/base", engine.dtype_of(params.engine)).to(dist.device)
        result = train_sft(
            model=model, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
            valid_records=inputs.valid_records, stage=params.train_teacher, stage_key="train_teacher",
            engine_config=params.engine, dist=dist, seed=params.seed, log_metrics=run.log_metrics,
        )
        if dist.is_main:
            save_checkpoint(copy_with_state(model, result.best_rouge_state), inputs.tokenizer, "models/teacher/sft")
            write_curves(result, "plots/train_teacher")
            atomic_write_json("metrics/train_teacher.json", summarize(result))
            print(f"train_teacher: best validation Rouge-L {result.best_rouge_l:.2f}")
    engine.teardown()


if __name__ == "__main__":
    exit_on_user_error(main)
