"""MiniLLM recipe (Gu et al. 2023, Algorithm 1; spec §4): policy-gradient reverse-KL distillation.

    until `steps` optimiser steps:                                                          (train_minillm)
        for each round:                                                                     (collect_round)
            sample a round of prompts; roll out responses from p~ = alpha p + (1 - alpha) q_old   (teacher-mixed)
            w_t, r_t, A_t from the rollout (importance weights, rewards, detached advantages) (pipeline.minillm_loss)
            save the rollout buffer
            for each of `inner_epochs` epochs, for each mini-batch of the buffer:            (update_step)
                one optimiser step on L = L_single + L_long + pt_coef * L_PT
                  L_single = sum_t w_t KL(q_theta || p) at each response position      (exact, over the vocabulary)
                  L_long   = PPO-clipped  -A_t rho_t,  rho_t = q_theta(y_t) / q_old(y_t) * w_t
                  L_PT     = LM loss on a pre-training block batch (optionally mixed with teacher KD, official code)
                every `eval_every` steps: validation Rouge-L and the reverse KL of pure-student samples; keep the best

L_single and L_long are normalised by the global response-token count of the step, L_PT by its token count.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import checkpoint, engine, losses
from pipeline.checkpoint import Checkpointer
from pipeline.config import EngineConfig, MiniLLMMethod
from pipeline.cost import BudgetCheckpoint
from pipeline.data import build_prompt
from pipeline.evaluation import score_records
from pipeline.generation import Rollout, decode_responses, left_pad, sample
from pipeline.hidden_states import FUSED_CHUNK, lm_head_weight, response_hidden, with_lm_head
from pipeline.minillm_loss import advantages, importance_weights, per_token_rewards, policy_loss, whiten_padded
from pipeline.models import add_lora
from pipeline.sft import cpu_state


@dataclass
class RolloutBuffer:
    """One round: the rollout plus what the update needs, all [N, R] over response positions."""

    rollout: Rollout
    weights: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor

    def __len__(self) -> int:
        return self.rollout.response_ids.shape[0]


@dataclass
class MiniLLMResult:
    best_state: dict
    best_rouge_l: float = -math.inf
    train_curve: list[dict] = field(default_factory=list)
    valid_curve: list[dict] = field(default_factory=list)
    generated_tokens: int = 0
    teacher_forward_tokens: int = 0
    response_tokens_trained: int = 0
    pt_tokens_trained: int = 0  # the PT loss's pre-training tokens (pt_coef > 0): trained like the responses
    skipped_steps: int = 0
    wall_time_s: float = 0.0
    budget: BudgetCheckpoint | None = None  # the compute-matched checkpoint (pipeline/cost.py), by validation Rouge-L

    def before_validation(self, step: int) -> None:
        if self.budget is not None:
            spent = self.budget.spent(self.response_tokens_trained + self.pt_tokens_trained, self.generated_tokens,
                                      self.teacher_forward_tokens)
            self.budget.before_validation(step, spent, self.best_state, self.best_rouge_l)


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        with engine.gathered(tensor):  # ZeRO-3: whole for the hash, on every rank in the same order
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_buffer(rollout: Rollout, config: MiniLLMMethod) -> RolloutBuffer:
    mask = rollout.response_mask
    weights = importance_weights(rollout.student_logprobs, rollout.teacher_logprobs, config.teacher_mix, config.max_importance_weight)
    rewards = per_token_rewards(rollout.teacher_logprobs, rollout.student_logprobs, mask, config.reward_scale, config.reward_clip)
    # The official whitening happens per micro-batch, in update_step: the buffer keeps the raw returns for it.
    whiten_now = config.whiten_advantages and config.whitening == "round"
    advantage = advantages(rewards, mask, config.returns, config.gamma, config.length_normalized, whiten_now)
    return RolloutBuffer(rollout=rollout, weights=weights, rewards=rewards, advantages=advantage)


def rollout_diagnostics(buffer: RolloutBuffer, teacher_mix: float) -> dict[str, float]:
    """Per-round statistics. The reverse KL of pure-student samples is estimated from the mixed samples by
    importance weighting with unclipped weights (E_p~[w f] = E_q[f]): sum_t w_t (log q - log p) per token."""
    rollout, is_token = buffer.rollout, buffer.rollout.response_mask > 0
    unclipped = importance_weights(rollout.student_logprobs, rollout.teacher_logprobs, teacher_mix, None)
    log_ratio = rollout.student_logprobs - rollout.teacher_logprobs
    rewards = buffer.rewards[is_token]
    return {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "rollout/response_length": float(rollout.response_mask.sum(1).mean()),
        "rollout/teacher_token_share": float(rollout.from_teacher[is_token].float().mean()),
        "rollout/importance_weight_mean": float(buffer.weights[is_token].mean()),
        "rollout/reverse_kl_per_token": float((unclipped * log_ratio)[is_token].mean()),
    }


def surrogate_sums(student, teacher, buffer: RolloutBuffer, rows: torch.Tensor, config: MiniLLMMethod,
                   advantage: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """L_single and L_long summed over the response tokens of `rows` (plus the clip count and the entropy sum), with
    `advantage` the rows' A_t (default: the buffer's). Both models' logits exist one chunk of positions at a time
    (losses.fused_head_reverse_kl, spec §8 pitfall 1)."""
    rollout, mask = buffer.rollout, buffer.rollout.response_mask[rows]
    weights = buffer.weights[rows]
    advantage = buffer.advantages[rows] if advantage is None else advantage
    student_hidden = response_hidden(student, rollout, rows)
    # The teacher's hidden states come from the rollout: it is frozen, so re-running it on every inner epoch
    # would recompute what sampling already did.
    logp_new, kl_sum, entropy_sum = with_lm_head(student, lambda student_head: losses.fused_head_reverse_kl(
        student_hidden, student_head, rollout.teacher_hidden[rows], lm_head_weight(teacher), rollout.response_ids[rows], mask,
        weights=weights if config.single_step_weighted else None, kl_grad=config.single_step, chunk_size=FUSED_CHUNK,
    ))  # weights None: w_t = 1
    long_sum, clipped = policy_loss(logp_new, rollout.student_logprobs[rows], advantage, weights, mask, config.clip_eps)
    # Without the single-step term the KL is computed (without a graph) but left out of the loss.
    single_sum = kl_sum if config.single_step else long_sum.new_zeros(())
    return {"single": single_sum, "long": long_sum, "clipped": clipped.float(), "entropy": torch.as_tensor(entropy_sum)}


def pt_loss_sum(model, teacher, blocks: torch.Tensor, kd_ratio: float) -> torch.Tensor:
    """LM loss on every token of a pre-training batch; the official code mixes in teacher KD (kd_ratio 0.5)."""
    logits = model(input_ids=blocks).logits[:, :-1]
    ce = F.cross_entropy(logits.float().flatten(0, 1), blocks[:, 1:].flatten(), reduction="sum")
    if kd_ratio == 0.0:
        return ce
    with torch.no_grad():
        teacher_logits = teacher(input_ids=blocks).logits[:, :-1]
    mask = torch.ones(blocks[:, 1:].shape, device=blocks.device)
    kd = losses.teacher_cross_entropy(logits, teacher_logits, mask, reduction="sum")
    return (1.0 - kd_ratio) * ce + kd_ratio * kd


@torch.no_grad()
def validate(student, teacher, tokenizer, valid_records, config: MiniLLMMethod, seed: int, device) -> dict[str, float]:
    """Rouge-L of pure-student samples, and their sequence-level reverse KL estimate sum_t log q - log p."""
    encoded = [tokenizer.encode(build_prompt(r["instruction"], r["context"]), add_special_tokens=False) for r in valid_records]
    generator = torch.Generator(device=device).manual_seed(seed)
    responses, kl_per_sequence = [], []
    for start in range(0, len(encoded), 64):
        prompt_ids, prompt_mask = left_pad(encoded[start : start + 64], tokenizer.pad_token_id)
        rollout = sample(
            student, prompt_ids.to(device), prompt_mask.to(device), max_new_tokens=config.eval_max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=generator,
            teacher=teacher, teacher_mix=0.0,
        )
        responses += decode_responses(tokenizer, rollout)
        kl_per_sequence += ((rollout.student_logprobs - rollout.teacher_logprobs) * rollout.response_mask).sum(1).tolist()
    return {
        "valid/rouge_l": statistics.fmean(score_records(valid_records, responses)),
        "valid/reverse_kl_sequence": statistics.fmean(kl_per_sequence),
    }


def collect_round(student, teacher, tokenizer, train_prompts, config: MiniLLMMethod, rng, rollout_generator,
                  dist: engine.Dist, round_index: int, step: int, seed: int, rollout_dir: Path | None):
    """Steps 1-2 of a round: roll out responses from the teacher-mixed policy (both models KV-cached), then the
    importance weights, rewards and detached advantages that stay constant through the round's updates. The main rank
    saves the round to `rollout_dir`. -> (this rank's buffer, the round's diagnostics, tokens generated on all ranks)."""
    round_started = time.perf_counter()
    local_rollouts = config.rollouts_per_round // dist.world_size
    chosen = rng.choice(len(train_prompts), size=config.rollouts_per_round, replace=False)
    local = chosen[dist.rank * local_rollouts : (dist.rank + 1) * local_rollouts]
    prompt_ids, prompt_mask = left_pad([train_prompts[i] for i in local], tokenizer.pad_token_id)
    generator_state = rollout_generator.get_state()
    checkpoint_hash = state_hash(student)
    rollout = sample(
        student, prompt_ids.to(dist.device), prompt_mask.to(dist.device), max_new_tokens=config.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=rollout_generator,
        teacher=teacher, teacher_mix=config.teacher_mix,
    )
    buffer = make_buffer(rollout, config)
    generated = int(engine.global_sum(float(rollout.response_mask.sum()), dist.device))
    round_stats = rollout_diagnostics(buffer, config.teacher_mix)
    round_stats["rollout/tokens_per_s"] = generated / (time.perf_counter() - round_started)
    if dist.is_main:
        atomic_torch_save(
            {"round": round_index, "step": step, "seed": seed, "rank": dist.rank, "checkpoint_sha256": checkpoint_hash,
             "generator_state": generator_state, "prompt_indices": torch.from_numpy(local),
             # Left out: d floats per token would dwarf the five scalars per token kept here, and running the teacher
             # on the saved tokens gives them back.
             "rollout": {k: v for k, v in vars(rollout).items() if k != "teacher_hidden"},
             "weights": buffer.weights, "rewards": buffer.rewards, "advantages": buffer.advantages},
            rollout_dir / f"round_{round_index:04d}.pt",
        )
    return buffer, round_stats, generated


def update_step(model_engine, teacher, buffer: RolloutBuffer, step_rows: np.ndarray, pt_blocks: torch.Tensor, rng,
                config: MiniLLMMethod, dist: engine.Dist) -> dict[str, float]:
    """Step 3, one optimiser step on one mini-batch of the buffer: L = L_single + L_long + pt_coef L_PT, each part
    normalised by its global token count. -> the step's parts summed over ranks, the counts and the gradient norm."""
    world, device = dist.world_size, dist.device
    grad_accum = model_engine.gradient_accumulation_steps()
    micro = [step_rows[i : i + config.micro_batch_size] for i in range(0, len(step_rows), config.micro_batch_size)]
    response_tokens = engine.global_sum(float(buffer.rollout.response_mask[step_rows].sum()), device)
    # Drawn identically on every rank, then each rank takes its own rows.
    pt_rows_per_micro = max(1, config.pt_batch_size // (grad_accum * world))
    pt_rows = rng.integers(0, len(pt_blocks), size=(world, grad_accum, pt_rows_per_micro))[dist.rank]
    pt_tokens = float(world * pt_rows.size * (pt_blocks.shape[1] - 1))

    def micro_loss(micro_batch):
        rows, pt_indices = micro_batch
        rows = torch.from_numpy(rows)
        advantage = buffer.advantages[rows]
        if config.whiten_advantages and config.whitening == "official_micro_batch":
            advantage = whiten_padded(advantage, lambda total: engine.global_sum(total, device))
        sums = surrogate_sums(model_engine, teacher, buffer, rows, config, advantage)
        # With a zero coefficient the PT loss is only logged: its backward would add zeros, at full cost.
        with torch.set_grad_enabled(config.pt_coef > 0):
            pt_sum = pt_loss_sum(model_engine, teacher, pt_blocks[pt_indices].to(device), config.pt_teacher_kd_ratio)
        # Already the step's global mean (its parts have different token counts), so normalised by 1 below.
        loss = (sums["single"] + sums["long"]) / response_tokens
        if config.pt_coef > 0:
            loss = loss + config.pt_coef * pt_sum / pt_tokens
        return loss, {"single": sums["single"], "long": sums["long"], "clipped": sums["clipped"],
                      "entropy": sums["entropy"], "pt": pt_sum}

    sums, grad_norm = engine.optimizer_step(model_engine, list(zip(micro, pt_rows)), micro_loss, 1.0, world)
    totals = {name: engine.global_sum(value, device) for name, value in sums.items()}
    return totals | {"response_tokens": response_tokens, "pt_tokens": pt_tokens, "grad_norm": grad_norm}


def step_metrics(totals: dict[str, float], model_engine, config: MiniLLMMethod, seconds: float, round_stats: dict) -> dict:
    response_tokens, pt_tokens = totals["response_tokens"], totals["pt_tokens"]
    metrics = {
        "loss/single_step": totals["single"] / response_tokens,
        "loss/long_term": totals["long"] / response_tokens,
        "loss/pt": totals["pt"] / pt_tokens,
        "train/clip_fraction": totals["clipped"] / response_tokens,
        "train/entropy": totals["entropy"] / response_tokens,
        "train/lr": model_engine.get_lr()[0],
        "train/grad_norm": totals["grad_norm"],
        "train/tokens_per_s": (response_tokens + pt_tokens) / seconds,
        **round_stats,
    }
    metrics["loss/total"] = metrics["loss/single_step"] + metrics["loss/long_term"] + config.pt_coef * metrics["loss/pt"]
    return metrics


def train_minillm(
    *,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer,
    train_prompts: list[list[int]],
    pt_blocks: torch.Tensor,
    valid_records: list[dict],
    config: MiniLLMMethod,
    engine_config: EngineConfig,
    dist: engine.Dist,
    seed: int,
    log_metrics,
    rollout_dir: Path | None,
    checkpointer: Checkpointer,
    budget: BudgetCheckpoint | None = None,
) -> MiniLLMResult:
    world, device = dist.world_size, dist.device
    grad_accum = engine.accumulation_steps(config.batch_size, config.micro_batch_size, world, "distill.minillm")
    local_batch = config.batch_size // world
    batches_per_epoch = config.rollouts_per_round // config.batch_size  # a whole number (pipeline/config.py)
    add_lora(student, engine_config.lora)  # engine.lora: only adapters train
    model_engine = engine.initialize(student, config.optimizer, config.steps, config.micro_batch_size, grad_accum, engine_config)
    teacher = engine.partition_teacher(teacher, engine_config)
    teacher.eval()
    # Dropout stays off throughout: the PPO ratio q_theta / q_old must be exactly 1 before the first update.
    student.eval()
    # One stream per purpose, same on every rank where ranks must agree (prompt choice, PT batches).
    rng = np.random.default_rng(seed)
    rollout_generator = torch.Generator(device=device).manual_seed(seed * 1000 + dist.rank)

    # Where the loops stand: the next mini-batch to train is (round_index, inner_epoch, first_batch); mid-round, the
    # round's buffer and diagnostics and, mid-epoch, the epoch's order of the buffer come with it.
    step, round_index, inner_epoch, first_batch = 0, 0, 0, 0
    buffer, round_stats, order = None, {}, None
    if checkpointer.resume is not None:
        loop, mine = checkpointer.load(model_engine)
        step, result = loop["step"], loop["result"]
        round_index, inner_epoch, first_batch = loop["position"]
        round_stats, order, buffer = loop["round_stats"], loop["order"], mine["buffer"]
        rng.bit_generator.state = mine["generators"]["minillm"]
        rollout_generator.set_state(mine["generators"]["rollout"])
    else:
        result = MiniLLMResult(best_state=cpu_state(student), budget=budget)
        initial = validate(student, teacher, tokenizer, valid_records, config, seed, device)
        result.before_validation(0)
        result.best_rouge_l = initial["valid/rouge_l"]
        result.valid_curve.append({"step": 0, "valid_rouge_l": initial["valid/rouge_l"],
                                   "valid_reverse_kl": initial["valid/reverse_kl_sequence"]})
        log_metrics(initial, 0)
    wall_time_before, segment_started = result.wall_time_s, time.perf_counter()

    progress = tqdm(total=config.steps, initial=step, desc="distill minillm", disable=not dist.is_main)
    while step < config.steps:  # rounds
        if buffer is None:
            buffer, round_stats, generated = collect_round(student, teacher, tokenizer, train_prompts, config, rng,
                                                           rollout_generator, dist, round_index, step, seed, rollout_dir)
            result.generated_tokens += generated
            # The teacher runs on every generated token while sampling, and only its LM head in the updates.
            result.teacher_forward_tokens += generated
        for inner_epoch in range(inner_epoch, config.inner_epochs):
            if step == config.steps:
                break
            if first_batch == 0:
                order = rng.permutation(len(buffer))
            for batch in range(first_batch, batches_per_epoch):
                if step == config.steps:
                    break
                started = time.perf_counter()
                totals = update_step(model_engine, teacher, buffer, order[batch * local_batch : (batch + 1) * local_batch],
                                     pt_blocks, rng, config, dist)
                step += 1
                metrics = step_metrics(totals, model_engine, config, time.perf_counter() - started, round_stats)
                # The PT batch counts as trained when its loss is (pt_coef > 0), with the teacher's forward on it when
                # it mixes in teacher KD; with pt_coef 0 its forward only feeds the logged loss/pt and is not counted.
                pt_tokens = int(totals["pt_tokens"]) if config.pt_coef > 0 else 0
                pt_teacher_tokens = pt_tokens if config.pt_teacher_kd_ratio > 0 else 0
                record_step(result, metrics, step, int(totals["response_tokens"]), pt_tokens, pt_teacher_tokens,
                            checkpointer, log_metrics, progress)
                if step % config.eval_every == 0 or step == config.steps:
                    scores = validate(model_engine.module, teacher, tokenizer, valid_records, config, seed, device)
                    result.valid_curve.append({"step": step, "valid_rouge_l": scores["valid/rouge_l"],
                                               "valid_reverse_kl": scores["valid/reverse_kl_sequence"]})
                    log_metrics(scores, step)
                    result.before_validation(step)
                    if scores["valid/rouge_l"] > result.best_rouge_l:
                        result.best_rouge_l, result.best_state = scores["valid/rouge_l"], cpu_state(model_engine.module)
                result.wall_time_s = wall_time_before + time.perf_counter() - segment_started
                if checkpointer.due(step) and step < config.steps:
                    # Saved with the position of the next mini-batch: the last of an epoch moves on to the next epoch,
                    # the last of a round to the next round, which needs no buffer.
                    position = (round_index, inner_epoch, batch + 1)
                    if batch + 1 == batches_per_epoch:
                        position = (round_index, inner_epoch + 1, 0)
                    if position[1] == config.inner_epochs:
                        position = (round_index + 1, 0, 0)
                    mid_round = position[0] == round_index
                    checkpointer.save(
                        model_engine, step,
                        {"step": step, "result": result, "position": position, "round_stats": round_stats if mid_round else {},
                         "order": order if position[2] > 0 else None},
                        {"buffer": buffer if mid_round else None,
                         "generators": {"minillm": rng.bit_generator.state, "rollout": rollout_generator.get_state()}},
                    )
            first_batch = 0
        buffer, round_index, inner_epoch = None, round_index + 1, 0
    progress.close()
    return result


def record_step(result: MiniLLMResult, metrics: dict, step: int, response_tokens: int, pt_tokens: int,
                pt_teacher_tokens: int, checkpointer: Checkpointer, log_metrics, progress) -> None:
    """Stop or skip a non-finite step (checkpoint.max_nonfinite_skips); otherwise add it to the curve and log it."""
    bad_part = checkpoint.first_nonfinite(
        {"single_step": metrics["loss/single_step"], "long_term": metrics["loss/long_term"], "pt": metrics["loss/pt"],
         "grad_norm": metrics["train/grad_norm"]}
    )
    if bad_part is not None:
        result.skipped_steps = checkpoint.skip_or_stop("distill.minillm", step, bad_part, result.skipped_steps,
                                                       checkpointer.max_nonfinite_skips)
    else:
        result.response_tokens_trained += response_tokens
        result.pt_tokens_trained += pt_tokens
        result.teacher_forward_tokens += pt_teacher_tokens
        result.train_curve.append({"step": step, **{k.replace("/", "_"): v for k, v in metrics.items()}})
        log_metrics(metrics, step)
        progress.set_postfix(reward=f"{metrics['rollout/reward_mean']:.2f}")
    progress.update(1)


def summarize_minillm(result: MiniLLMResult) -> dict:
    return {"best_valid_rouge_l": result.best_rouge_l, "steps": len(result.train_curve),
            "skipped_steps": result.skipped_steps, "wall_time_s": result.wall_time_s,
            "response_tokens_trained": result.response_tokens_trained, "pt_tokens_trained": result.pt_tokens_trained,
            "generated_tokens": result.generated_tokens,
            "teacher_forward_tokens": result.teacher_forward_tokens,
            "final_reward_mean": result.train_curve[-1]["rollout_reward_mean"]}


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through a temporary file renamed into place: a kill mid-write leaves no truncated round file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
