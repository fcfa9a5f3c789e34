"""Pre-training recipe: the base models the paper takes off the shelf (GPT-2), for our tiny models built from scratch.

    for each of `steps` optimiser steps:
        draw `batch_size` PT blocks uniformly (with replacement)
        loss = mean over every token of every block of CE(next token)

Every token is a target, so a step's token count is fixed: batch_size x (block_size - 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import checkpoint, engine
from pipeline.checkpoint import Checkpointer
from pipeline.config import EngineConfig, PretrainStage


@dataclass
class PretrainResult:
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    wall_time_s: float = 0.0


def lm_loss_sum(model, blocks: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=blocks).logits[:, :-1]
    return F.cross_entropy(logits.float().flatten(0, 1), blocks[:, 1:].flatten(), reduction="sum")


def train_lm(
    *,
    model: torch.nn.Module,
    blocks: torch.Tensor,
    config: PretrainStage,
    engine_config: EngineConfig,
    dist: engine.Dist,
    seed: int,
    log_metrics,
    checkpointer: Checkpointer,
    progress: str,
) -> PretrainResult:
    grad_accum = engine.accumulation_steps(config.batch_size, config.micro_batch_size, dist.world_size, "pretrain")
    model_engine = engine.initialize(model, config.optimizer, config.steps, config.micro_batch_size, grad_accum, engine_config)
    # Same stream on every rank: ranks then take disjoint slices of each global batch.
    rng = np.random.default_rng(seed)
    global_tokens = config.batch_size * (blocks.shape[1] - 1)
    result, done_steps = PretrainResult(), 0
    if checkpointer.resume is not None:
        loop, mine = checkpointer.load(model_engine)
        done_steps, result = loop["step"], loop["result"]
        rng.bit_generator.state = mine["generators"]["pretrain"]
    wall_time_before, segment_started = result.wall_time_s, time.perf_counter()
    model_engine.train()
    for step in tqdm(range(done_steps + 1, config.steps + 1), initial=done_steps, total=config.steps, desc=progress,
                     disable=not dist.is_main):
        started = time.perf_counter()
        step_indices = rng.integers(0, len(blocks), size=config.batch_size)
        micro_batches = [blocks[indices].to(dist.device)
                         for indices in engine.micro_batch_indices(step_indices, config.micro_batch_size, grad_accum, dist)]

        def micro_loss(batch):
            loss_sum = lm_loss_sum(model_engine, batch)
            return loss_sum, {"lm": loss_sum}

        sums, grad_norm = engine.optimizer_step(model_engine, micro_batches, micro_loss, global_tokens, dist.world_size)
        step_loss = engine.global_sum(sums["lm"], dist.device) / global_tokens
        bad_part = checkpoint.first_nonfinite({"lm": step_loss, "grad_norm": grad_norm})
        if bad_part is not None:
            result.skipped_steps = checkpoint.skip_or_stop("pretrain", step, bad_part, result.skipped_steps,
                                                           checkpointer.max_nonfinite_skips)
        else:
            result.losses.append(step_loss)
            log_metrics({"train/loss": step_loss, "train/lr": model_engine.get_lr()[0], "train/grad_norm": grad_norm,
                         "train/tokens_per_s": global_tokens / (time.perf_counter() - started)}, step)
        result.wall_time_s = wall_time_before + time.perf_counter() - segment_started
        if checkpointer.due(step) and step < config.steps:
            checkpointer.save(model_engine, step, {"step": step, "result": result},
                              {"generators": {"pretrain": rng.bit_generator.state}})
    return result
