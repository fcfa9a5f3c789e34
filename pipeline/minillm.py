"""MiniLLM recipe (Gu et al. 2023, Algorithm 1; spec §4): policy-gradient reverse-KL distillation.

    repeat until `steps` optimiser steps:
        sample a round of prompts; roll out responses from p~ = alpha p + (1 - alpha) q_old   (teacher-mixed)
        w_t, r_t, A_t from the rollout (importance weights, rewards, detached advantages)    (pipeline.minillm_loss)
        save the rollout buffer
        for `inner_epochs` epochs, for each mini-batch of the buffer, one optimiser step on
            L = L_single + L_long + pt_coef * L_PT
              L_single = sum_t w_t KL(q_theta || p) at each response position           (exact, over the vocabulary)
              L_long   = PPO-clipped  -A_t rho_t,  rho_t = q_theta(y_t) / q_old(y_t) * w_t
              L_PT     = LM loss on a pre-training block batch (optionally mixed with teacher KD, official code)
        every `eval_every` steps: validation Rouge-L and the reverse KL of pure-student samples; keep the best

L_single and L_long are normalised by the global response-token count of the step, L_PT by its token count.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import engine, losses
from pipeline.config import EngineConfig, MiniLLMMethod
from pipeline.data import build_prompt
from pipeline.evaluation import score_records
from pipeline.generation import Rollout, decode_responses, left_pad, sample
from pipeline.minillm_loss import advantages, importance_weights, per_token_rewards, policy_loss
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


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_buffer(rollout: Rollout, config: MiniLLMMethod) -> RolloutBuffer:
    mask = rollout.response_mask
    weights = importance_weights(rollout.student_logprobs, rollout.teacher_logprobs, config.teacher_mix, config.max_importance_weight)
    rewards = per_token_rewards(rollout.teacher_logprobs, rollout.student_logprobs, mask, config.reward_scale, config.reward_clip)
    advantage = advantages(rewards, mask, config.returns, config.gamma, config.length_normalized, config.whiten_advantages)
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


def response_logits(model, rollout: Rollout, indices) -> torch.Tensor:
    """Logits that predict each response token, [n, R, V], from one forward pass over [prompt; response]."""
    prompt_ids, prompt_mask = rollout.prompt_ids[indices], rollout.prompt_mask[indices]
    response_ids, response_mask = rollout.response_ids[indices], rollout.response_mask[indices]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([prompt_mask, torch.ones_like(response_mask, dtype=prompt_mask.dtype)], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).logits
    prompt_width = prompt_ids.shape[1]
    return logits[:, prompt_width - 1 : prompt_width - 1 + response_ids.shape[1]]


def surrogate_sums(student, teacher, buffer: RolloutBuffer, rows: torch.Tensor, config: MiniLLMMethod) -> dict[str, torch.Tensor]:
    """L_single and L_long summed over the response tokens of `rows` (plus the clip count and the entropy sum)."""
    rollout, mask = buffer.rollout, buffer.rollout.response_mask[rows]
    student_logits = response_logits(student, rollout, rows)
    with torch.no_grad():
        teacher_logits = response_logits(teacher, rollout, rows)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    logp_new = log_q.gather(-1, rollout.response_ids[rows].unsqueeze(-1)).squeeze(-1)
    long_sum, clipped = policy_loss(
        logp_new, rollout.student_logprobs[rows], buffer.advantages[rows], buffer.weights[rows], mask, config.clip_eps
    )
    if config.single_step:
        single_sum = losses.reverse_kl(student_logits, teacher_logits, mask, weights=buffer.weights[rows], reduction="sum")
    else:
        single_sum = long_sum.new_zeros(())
    with torch.no_grad():
        entropy_sum = (-(log_q.exp() * log_q).sum(-1) * mask).sum()
    return {"single": single_sum, "long": long_sum, "clipped": clipped.float(), "entropy": entropy_sum}


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
) -> MiniLLMResult:
    world, device = dist.world_size, dist.device
    grad_accum = engine.accumulation_steps(config.batch_size, config.micro_batch_size, world, "distill.minillm")
    local_rollouts = config.rollouts_per_round // world
    local_batch = config.batch_size // world
    pt_rows_per_micro = max(1, config.pt_batch_size // (grad_accum * world))
    model_engine = engine.initialize(student, config.optimizer, config.steps, config.micro_batch_size, grad_accum, engine_config)
    teacher.eval()
    # Dropout stays off throughout: the PPO ratio q_theta / q_old must be exactly 1 before the first update.
    student.eval()
    # One stream per purpose, same on every rank where ranks must agree (prompt choice, PT batches).
    rng = np.random.default_rng(seed)
    rollout_generator = torch.Generator(device=device).manual_seed(seed * 1000 + dist.rank)

    result = MiniLLMResult(best_state=cpu_state(student))
    initial = validate(student, teacher, tokenizer, valid_records, config, seed, device)
    result.best_rouge_l = initial["valid/rouge_l"]
    result.valid_curve.append({"step": 0, "valid_rouge_l": initial["valid/rouge_l"], "valid_reverse_kl": initial["valid/reverse_kl_sequence"]})
    log_metrics(initial, 0)

    step, round_index = 0, 0
    progress = tqdm(total=config.steps, desc="distill minillm", disable=not dist.is_main)
    while step < config.steps:
        # 1. Rollouts from the teacher-mixed policy, both models KV-cached.
        round_started = time.perf_counter()
        chosen = rng.choice(len(train_prompts), size=config.rollouts_per_round, replace=False)
        local = chosen[dist.rank * local_rollouts : (dist.rank + 1) * local_rollouts]
        prompt_ids, prompt_mask = left_pad([train_prompts[i] for i in local], tokenizer.pad_token_id)
        generator_state = rollout_generator.get_state()
        checkpoint_hash = state_hash(student)
        rollout = sample(
            student, prompt_ids.to(device), prompt_mask.to(device), max_new_tokens=config.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=rollout_generator,
            teacher=teacher, teacher_mix=config.teacher_mix,
        )
        # 2. Importance weights, rewards and detached advantages: constants of this round's updates.
        buffer = make_buffer(rollout, config)
        generated = int(engine.global_sum(float(rollout.response_mask.sum()), device))
        result.generated_tokens += generated
        rollout_seconds = time.perf_counter() - round_started
        diagnostics = rollout_diagnostics(buffer, config.teacher_mix)
        if dist.is_main:
            torch.save(
                {"round": round_index, "step": step, "seed": seed, "rank": dist.rank, "checkpoint_sha256": checkpoint_hash,
                 "generator_state": generator_state, "prompt_indices": torch.from_numpy(local), "rollout": vars(rollout),
                 "weights": buffer.weights, "rewards": buffer.rewards, "advantages": buffer.advantages},
                rollout_dir / f"round_{round_index:04d}.pt",
            )

        # 3. PPO-style inner epochs over the buffer, one optimiser step per mini-batch.
        for _ in range(config.inner_epochs):
            order = rng.permutation(len(buffer))
            for start in range(0, len(buffer), local_batch):
                if step == config.steps:
                    break
                started = time.perf_counter()
                step_rows = order[start : start + local_batch]
                micro = [step_rows[i : i + config.micro_batch_size] for i in range(0, len(step_rows), config.micro_batch_size)]
                response_tokens = engine.global_sum(float(buffer.rollout.response_mask[step_rows].sum()), device)
                # Drawn identically on every rank, then each rank takes its own rows.
                pt_rows = rng.integers(0, len(pt_blocks), size=(world, grad_accum, pt_rows_per_micro))[dist.rank]
                pt_tokens = float(world * pt_rows.size * (pt_blocks.shape[1] - 1))
                parts = {"single": 0.0, "long": 0.0, "pt": 0.0, "clipped": 0.0, "entropy": 0.0}
                for index, (rows, pt_indices) in enumerate(zip(micro, pt_rows)):
                    sums = surrogate_sums(model_engine, teacher, buffer, torch.from_numpy(rows), config)
                    pt_sum = pt_loss_sum(model_engine, teacher, pt_blocks[pt_indices].to(device), config.pt_teacher_kd_ratio)
                    loss = (sums["single"] + sums["long"]) / response_tokens + config.pt_coef * pt_sum / pt_tokens
                    model_engine.backward(loss * (model_engine.gradient_accumulation_steps() * world))
                    if index == len(micro) - 1:
                        norm = engine.grad_norm_before_step(model_engine)
                    model_engine.step()
                    for part in ("single", "long", "clipped", "entropy"):
                        parts[part] += sums[part].item()
                    parts["pt"] += pt_sum.item()
                step += 1
                result.teacher_forward_tokens += int(response_tokens)
                totals = {k: engine.global_sum(v, device) for k, v in parts.items()}
                metrics = {
                    "loss/single_step": totals["single"] / response_tokens,
                    "loss/long_term": totals["long"] / response_tokens,
                    "loss/pt": totals["pt"] / pt_tokens,
                    "train/clip_fraction": totals["clipped"] / response_tokens,
                    "train/entropy": totals["entropy"] / response_tokens,
                    "train/lr": model_engine.get_lr()[0],
                    "train/grad_norm": engine.grad_norm_after_step(model_engine, norm),
                    "train/tokens_per_s": (response_tokens + pt_tokens) / (time.perf_counter() - started),
                    "rollout/tokens_per_s": generated / rollout_seconds,
                    **diagnostics,
                }
                metrics["loss/total"] = metrics["loss/single_step"] + metrics["loss/long_term"] + config.pt_coef * metrics["loss/pt"]
                for part in ("single_step", "long_term", "pt"):
                    if not math.isfinite(metrics[f"loss/{part}"]):
                        raise RuntimeError(f"distill.minillm: non-finite loss at step {step} (loss part: {part})")
                result.train_curve.append({"step": step, **{k.replace("/", "_"): v for k, v in metrics.items()}})
                log_metrics(metrics, step)
                progress.update(1)
                progress.set_postfix(reward=f"{diagnostics['rollout/reward_mean']:.2f}")
                if step % config.eval_every == 0 or step == config.steps:
                    scores = validate(model_engine.module, teacher, tokenizer, valid_records, config, seed, device)
                    result.valid_curve.append({"step": step, "valid_rouge_l": scores["valid/rouge_l"], "valid_reverse_kl": scores["valid/reverse_kl_sequence"]})
                    log_metrics(scores, step)
                    if scores["valid/rouge_l"] > result.best_rouge_l:
                        result.best_rouge_l, result.best_state = scores["valid/rouge_l"], cpu_state(model_engine.module)
        round_index += 1
    progress.close()
    return result
