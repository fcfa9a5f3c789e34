"""DVC stages `pretrain_teacher` and `pretrain_student@<label>`: the base model the paper takes off the shelf
(GPT-2), for our tiny models.

A `name_or_path` model is already pretrained: the stage only records a pointer to it (skipped).
An `arch` model is built from scratch and trained as a language model on the PT blocks (pipeline/pretrain.py).
"""

import argparse

import numpy as np
import torch

from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.data import check_same_tokenizer
from pipeline.io import atomic_write_json
from pipeline.models import build_causal_lm, count_parameters, load_tokenizer, save_checkpoint, save_pointer
from pipeline.pretrain import train_lm
from pipeline.sft import copy_with_state, cpu_state
from pipeline.stage import training_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="teacher, or a student label of models.students")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer directory")
    parser.add_argument("--blocks", required=True, help="the PT blocks (.npy)")
    parser.add_argument("--out", required=True, help="the base model directory to write")
    parser.add_argument("--metrics", required=True, help="the metrics file to write (.json)")
    arguments = parser.parse_args()
    model_name = arguments.model
    params = load_params()
    if model_name != "teacher" and model_name not in params.models.students:
        raise ConfigError(f"--model {model_name}: not 'teacher' nor a label of models.students")
    spec = params.models.teacher if model_name == "teacher" else params.models.students[model_name]
    name = "pretrain_teacher" if model_name == "teacher" else f"pretrain_student@{model_name}"

    with training_stage(name, params, params.seed, tags={"model": model_name}) as stage:
        tokenizer = load_tokenizer(arguments.tokenizer)
        if spec.name_or_path:
            # Distillation compares distributions token by token: one vocabulary, checked by content, not size.
            check_same_tokenizer(tokenizer, load_tokenizer(spec.name_or_path), arguments.tokenizer, spec.name_or_path)
            if stage.dist.is_main:
                save_pointer(spec.name_or_path, arguments.out)
                atomic_write_json(arguments.metrics, {"skipped": 1, "steps": 0})
            print(f"{name}: pretrained model '{spec.name_or_path}', nothing to train")
            return
        blocks = torch.from_numpy(np.load(arguments.blocks).astype(np.int64))
        model = build_causal_lm(spec.arch, len(tokenizer), params.data.max_length, tokenizer.eos_token_id).to(stage.dist.device)
        result = train_lm(
            model=model, blocks=blocks, config=params.pretrain, engine_config=params.engine, dist=stage.dist,
            seed=params.seed, log_metrics=stage.run.log_metrics, checkpointer=stage.checkpointer, progress=name,
        )
        trained = cpu_state(model)  # every rank: ZeRO-3 gathers the parameters from all of them
        if stage.dist.is_main:
            save_checkpoint(copy_with_state(model, trained), tokenizer, arguments.out)
            metrics = {"skipped": 0, "steps": params.pretrain.steps, "final_loss": float(np.mean(result.losses[-20:])),
                       "parameters": count_parameters(model), "skipped_steps": result.skipped_steps,
                       "wall_time_s": result.wall_time_s}
            atomic_write_json(arguments.metrics, metrics)
            stage.run.log_metrics({"final_loss": metrics["final_loss"], "parameters": metrics["parameters"]})
            print(f"{name}: {metrics['parameters']:,} parameters, final loss {metrics['final_loss']:.3f}")


if __name__ == "__main__":
    exit_on_user_error(main)
