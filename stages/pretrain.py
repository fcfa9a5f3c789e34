"""DVC stages `pretrain_teacher` and `pretrain_student@<label>`: the base model the paper takes off the shelf
(GPT-2), for our tiny models.

A `name_or_path` model is already pretrained: the stage only records a pointer to it (skipped).
An `arch` model is built from scratch and trained as a language model on the PT blocks, every token counted.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import checkpoint, engine
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.data import check_same_tokenizer
from pipeline.dvc_stages import declaration
from pipeline.io import atomic_write_json
from pipeline.models import build_gpt2, count_parameters, load_tokenizer, save_checkpoint, save_pointer
from pipeline.tracking import StageRun


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="teacher, or a student label of models.students")
    model_name = parser.parse_args().model
    params = load_params()
    if model_name != "teacher" and model_name not in params.models.students:
        raise ConfigError(f"--model {model_name}: not 'teacher' nor a label of models.students")
    spec = params.models.teacher if model_name == "teacher" else params.models.students[model_name]
    out_dir, metrics_path = f"models/{model_name}/base", f"metrics/pretrain/{model_name}.json"
    stage = "pretrain_teacher" if model_name == "teacher" else f"pretrain_student@{model_name}"
    engine.relaunch_if_data_parallel(params.engine)
    dist = engine.setup(params.engine)
    engine.seed_everything(params.seed)
    declared = declaration(stage)
    fingerprint = checkpoint.fingerprint(declared.params, declared.deps)
    resume = checkpoint.find(stage, fingerprint, dist)
    tags = {"model": model_name} | ({"resumed_from": resume.run_id} if resume and resume.run_id else {})

    with StageRun(stage, declared.params, tags=tags, enabled=dist.is_main) as run:
        checkpointer = checkpoint.Checkpointer(stage, fingerprint, params.checkpoint, dist, resume, run.run_id)
        tokenizer = load_tokenizer("data/tokenizer")
        if spec.name_or_path:
            # Distillation compares distributions token by token: one vocabulary, checked by content, not size.
            check_same_tokenizer(tokenizer, load_tokenizer(spec.name_or_path), "data/tokenizer", spec.name_or_path)
            if dist.is_main:
                save_pointer(spec.name_or_path, out_dir)
                atomic_write_json(metrics_path, {"skipped": 1, "steps": 0})
            checkpointer.finish()
            print(f"{stage}: pretrained model '{spec.name_or_path}', nothing to train")
            return

        blocks = torch.from_numpy(np.load("data/pretrain/blocks.npy").astype(np.int64))
        model = build_gpt2(spec.arch, len(tokenizer), params.data.max_length, tokenizer.eos_token_id).to(dist.device)
        config = params.pretrain
        grad_accum = engine.accumulation_steps(config.batch_size, config.micro_batch_size, dist.world_size, "pretrain")
        model_engine = engine.initialize(model, config.optimizer, config.steps, config.micro_batch_size, grad_accum, params.engine)
        rng = np.random.default_rng(params.seed)
        losses, done_steps, skipped, wall_time_before = [], 0, 0, 0.0
        if checkpointer.resume is not None:
            loop, mine = checkpointer.load(model_engine)
            losses, done_steps, skipped, wall_time_before = loop["losses"], loop["step"], loop["skipped"], loop["wall_time_s"]
            rng.bit_generator.state = mine["generators"]["pretrain"]
        segment_started = time.perf_counter()
        model_engine.train()
        steps = range(done_steps + 1, config.steps + 1)
        for step in tqdm(steps, initial=done_steps, total=config.steps, desc=stage, disable=not dist.is_main):
            started = time.perf_counter()
            step_indices = rng.integers(0, len(blocks), size=config.batch_size)
            micro = engine.micro_batch_indices(step_indices, config.micro_batch_size, grad_accum, dist)
            global_tokens = config.batch_size * (blocks.shape[1] - 1)  # every token is a target: count is fixed
            step_loss = 0.0
            for index, indices in enumerate(micro):
                batch = blocks[indices].to(dist.device)
                logits = model_engine(input_ids=batch).logits[:, :-1]
                loss_sum = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
                model_engine.backward(engine.scale_for_global_mean(loss_sum, global_tokens, model_engine, dist.world_size))
                if index == len(micro) - 1:
                    norm = engine.grad_norm_before_step(model_engine)
                model_engine.step()
                step_loss += loss_sum.item()
            step_loss = engine.global_sum(step_loss, dist.device) / global_tokens
            grad_norm = engine.grad_norm_after_step(model_engine, norm)
            bad_part = checkpoint.first_nonfinite({"lm": step_loss, "grad_norm": grad_norm})
            if bad_part is not None:
                skipped = checkpoint.skip_or_stop("pretrain", step, bad_part, skipped, params.checkpoint.max_nonfinite_skips)
            else:
                losses.append(step_loss)
                run.log_metrics(
                    {"train/loss": step_loss, "train/lr": model_engine.get_lr()[0], "train/grad_norm": grad_norm,
                     "train/tokens_per_s": global_tokens / (time.perf_counter() - started)},
                    step,
                )
            if checkpointer.due(step) and step < config.steps:
                loop = {"step": step, "losses": losses, "skipped": skipped,
                        "wall_time_s": wall_time_before + time.perf_counter() - segment_started}
                checkpointer.save(model_engine, step, loop, {"generators": {"pretrain": rng.bit_generator.state}})
        if dist.is_main:
            save_checkpoint(model_engine.module, tokenizer, out_dir)
            metrics = {"skipped": 0, "steps": config.steps, "final_loss": float(np.mean(losses[-20:])),
                       "parameters": count_parameters(model), "skipped_steps": skipped,
                       "wall_time_s": wall_time_before + time.perf_counter() - segment_started}
            atomic_write_json(metrics_path, metrics)
            run.log_metrics({"final_loss": metrics["final_loss"], "parameters": metrics["parameters"]})
            print(f"{stage}: {metrics['parameters']:,} parameters, final loss {metrics['final_loss']:.3f}")
        checkpointer.finish()
    engine.teardown()


if __name__ == "__main__":
    exit_on_user_error(main)
