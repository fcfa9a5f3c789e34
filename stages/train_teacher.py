"""DVC stage `train_teacher`: SFT of the teacher (spec §2), checkpoint picked by validation Rouge-L."""

from pipeline import checkpoint, engine
from pipeline.config import exit_on_user_error, load_params
from pipeline.dvc_stages import declaration
from pipeline.io import atomic_write_json
from pipeline.models import count_parameters, load_model, save_checkpoint
from pipeline.sft import copy_with_state, load_sft_inputs, summarize, train_sft, write_curves
from pipeline.tracking import StageRun


def main() -> None:
    params = load_params()
    engine.relaunch_if_data_parallel(params.engine)
    dist = engine.setup(params.engine)
    engine.seed_everything(params.seed)
    declared = declaration("train_teacher")
    fingerprint = checkpoint.fingerprint(declared.params, declared.deps)
    resume = checkpoint.find("train_teacher", fingerprint, dist)
    tags = {"method": "teacher", "student": params.models.teacher.label}
    if resume is not None and resume.run_id:
        tags["resumed_from"] = resume.run_id

    with StageRun("train_teacher", declared.params, tags=tags, enabled=dist.is_main) as run:
        checkpointer = checkpoint.Checkpointer("train_teacher", fingerprint, params.checkpoint, dist, resume, run.run_id)
        inputs = load_sft_inputs()
        model = load_model("models/teacher/base", engine.dtype_of(params.engine)).to(dist.device)
        result = train_sft(
            model=model, tokenizer=inputs.tokenizer, train_split=inputs.train_split, valid_split=inputs.valid_split,
            valid_records=inputs.valid_records, stage=params.train_teacher, stage_key="train_teacher",
            engine_config=params.engine, dist=dist, seed=params.seed, log_metrics=run.log_metrics, checkpointer=checkpointer,
        )
        if dist.is_main:
            save_checkpoint(copy_with_state(model, result.best_rouge_state), inputs.tokenizer, "models/teacher/sft")
            write_curves(result, "plots/train_teacher")
            atomic_write_json("metrics/train_teacher.json", summarize(result) | {"parameters": count_parameters(model)})
            print(f"train_teacher: best validation Rouge-L {result.best_rouge_l:.2f}")
        checkpointer.finish()
    engine.teardown()


if __name__ == "__main__":
    exit_on_user_error(main)
