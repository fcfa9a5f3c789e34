"""Train a tiny GPT-2 for a few steps through pipeline.engine, the way the recipes do; shared by tests/test_engine.py.

As a script it is launched by torchrun with 1 or 2 processes (PYTHONPATH at the repository root):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py \
        --micro-batch 2 --zero-stages 0 2 --grad-clips 1000 0.1 --out results.pt

and rank 0 saves, per (ZeRO stage, grad_clip), the final parameters and AdamW's first moment. The first moment
is saved because Adam's update is almost invariant to the scale of the gradient, so a loss normalised by the
wrong count can still reach nearly the right parameters; the moment is linear in the gradient and shows it."""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from deepspeed import DeepSpeedEngine
from deepspeed.utils import safe_get_full_optimizer_state

from pipeline import engine
from pipeline.config import Architecture, EngineConfig, Optimizer
from pipeline.data import TokenizedExample, TokenizedSplit, sft_batch
from pipeline.models import build_causal_lm
from pipeline.sft import response_token_loss_sum

VOCAB_SIZE = 64
PAD_TOKEN_ID = 0
GLOBAL_BATCH = 8
STEPS = 3
MODEL_SEED = 1234
# Neighbouring examples' response lengths differ up to 40x, so a token mean per micro-batch or per rank
# weighs tokens differently from the global token mean.
RESPONSE_LENGTHS = [1, 40, 3, 25, 30, 2, 12, 1, 35, 4, 1, 20, 6, 33, 2, 9, 28, 1, 3, 38, 15, 2, 1, 24]
PROMPT_LENGTHS = [5, 2, 9, 3, 1, 12, 4, 7, 2, 6, 10, 3, 8, 1, 5, 11, 2, 6, 3, 1, 7, 4, 9, 2]


def tiny_split() -> TokenizedSplit:
    rng = np.random.default_rng(0)
    examples = [
        TokenizedExample(input_ids=rng.integers(1, VOCAB_SIZE, prompt + response).tolist(), prompt_length=prompt)
        for prompt, response in zip(PROMPT_LENGTHS, RESPONSE_LENGTHS)
    ]
    return TokenizedSplit.from_examples(examples)


def tiny_model() -> torch.nn.Module:
    """The same weights in every process and every call; dropout off so that splitting a batch is exact."""
    torch.manual_seed(MODEL_SEED)
    model = build_causal_lm(Architecture(n_layer=1, n_embd=32, n_head=2), VOCAB_SIZE, n_positions=64, eos_token_id=0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def tiny_optimizer(grad_clip: float) -> Optimizer:
    return Optimizer(lr=1e-3, min_lr=1e-5, weight_decay=0.1, grad_clip=grad_clip, schedule="cosine", warmup_steps=0)


def step_indices(step: int) -> np.ndarray:
    return np.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)


def train(
    model: torch.nn.Module,
    optimizer: Optimizer,
    micro_batch: int,
    engine_config: EngineConfig,
    dist_info: engine.Dist,
    per_micro_batch_mean: bool = False,
) -> DeepSpeedEngine:
    """STEPS optimiser steps of the SFT recipe's loop; per_micro_batch_mean swaps in the naive normalisation."""
    split = tiny_split()
    grad_accum = engine.accumulation_steps(GLOBAL_BATCH, micro_batch, dist_info.world_size, "test")
    model_engine = engine.initialize(model, optimizer, STEPS, micro_batch, grad_accum, engine_config)
    model_engine.train()
    for step in range(STEPS):
        micro_batches = [
            sft_batch(split, indices, PAD_TOKEN_ID)
            for indices in engine.micro_batch_indices(step_indices(step), micro_batch, grad_accum, dist_info)
        ]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        global_tokens = engine.global_sum(local_tokens, dist_info.device)
        for batch in micro_batches:
            loss_sum, tokens = response_token_loss_sum(model_engine, batch, kd=None)
            if per_micro_batch_mean:
                loss = loss_sum / tokens
            else:
                loss = engine.scale_for_global_mean(loss_sum, global_tokens, model_engine, dist_info.world_size)
            model_engine.backward(loss)
            model_engine.step()
    return model_engine


def first_moments(model_engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """AdamW's exp_avg per parameter name; under ZeRO 1/2 it is partitioned, and gathering it is collective."""
    if model_engine.zero_optimization_stage() > 0:
        # DeepSpeed links the optimizer state of every parameter group right after stepping the first group,
        # when the other groups have no state yet (our no-decay group would raise "exp_avg not found"): relink.
        model_engine.optimizer._hp_optimizer_states_linked = False
        model_engine.optimizer._lazy_init_hp_params_optimizer_state()
    moments = {}
    for name, parameter in model_engine.module.named_parameters():
        if model_engine.zero_optimization_stage() == 0:
            moments[name] = model_engine.optimizer.state[parameter]["exp_avg"].detach().clone()
        else:
            moments[name] = safe_get_full_optimizer_state(parameter, "exp_avg").detach().clone()
    return moments


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--zero-stages", type=int, nargs="+", required=True)
    parser.add_argument("--grad-clips", type=float, nargs="+", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    results = {}
    for zero_stage in args.zero_stages:
        world_size = int(os.environ["WORLD_SIZE"])  # set by torchrun
        config = EngineConfig(
            num_procs=world_size, launcher="torchrun", device="cpu", precision="fp32", zero_stage=zero_stage
        )
        dist_info = engine.setup(config)
        for grad_clip in args.grad_clips:
            model_engine = train(tiny_model(), tiny_optimizer(grad_clip), args.micro_batch, config, dist_info)
            results[(zero_stage, grad_clip)] = {
                "parameters": {k: v.detach().clone() for k, v in model_engine.module.named_parameters()},
                "exp_avg": first_moments(model_engine),
            }
    if dist_info.is_main:
        torch.save(results, args.out)
    engine.barrier()
    engine.teardown()


if __name__ == "__main__":
    main()
