"""The recipe GKD and DistiLLM share: token-level distillation on batches that are sometimes the student's own
samples, from the student init picked by validation loss.

    for each of `steps` optimiser steps:
        draw `batch_size` training prompts
        the batch source picks their responses: the student samples them (KV-cached), or the fixed ones (gold, or
        the teacher's samples), or earlier student samples from a replay buffer           (GKDBatches, DistiLLMBatches)
        loss = sum over response tokens of D(teacher, student) / global response-token count
               D from both models' last hidden states through the fused LM heads (losses.fused_head_divergence)
        every `eval_every` steps: validation Rouge-L and loss; keep the best by Rouge-L

GKD's source flips a coin per step (pipeline/gkd.py); DistiLLM's adapts the share of student samples to the
validation loss and replays them (pipeline/distillm.py). Dropout stays off, as TRL's GKDTrainer has it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from pipeline import checkpoint, engine, losses
from pipeline.checkpoint import Checkpointer
from pipeline.config import EngineConfig
from pipeline.cost import BudgetCheckpoint
from pipeline.data import TokenizedSplit
from pipeline.evaluation import evaluate_rouge_l
from pipeline.generation import left_pad, sample
from pipeline.hidden_states import FUSED_CHUNK, lm_head_weight, response_hidden, with_lm_head
from pipeline.models import add_lora
from pipeline.sft import cpu_state, validation_loss


@dataclass
class Sequences:
    """[prompt; response] pairs in generation.Rollout's layout: prompts left-padded, responses right-padded."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] float, 1 on response tokens (EOS included)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[list[int], list[int]]], pad_token_id: int) -> Sequences:
        prompt_ids, prompt_mask = left_pad([prompt for prompt, _ in pairs], pad_token_id)
        width = max(len(response) for _, response in pairs)
        response_ids = torch.full((len(pairs), width), pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((len(pairs), width))
        for row, (_, response) in enumerate(pairs):
            response_ids[row, : len(response)] = torch.tensor(response, dtype=torch.long)
            response_mask[row, : len(response)] = 1.0
        return cls(prompt_ids, prompt_mask, response_ids, response_mask)

    def pairs(self) -> list[tuple[list[int], list[int]]]:
        """Each row's prompt and response tokens, padding removed (what a replay buffer keeps)."""
        return [(ids[mask > 0].tolist(), response[response_mask > 0].tolist())
                for ids, mask, response, response_mask
                in zip(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask)]

    def to(self, device) -> Sequences:
        return Sequences(*(tensor.to(device) for tensor in vars(self).values()))


def fixed_pairs(split: TokenizedSplit, indices) -> list[tuple[list[int], list[int]]]:
    """The split's (prompt, response + EOS) tokens of each example."""
    return [(ids[:prompt_length], ids[prompt_length:]) for ids, prompt_length in map(split.example, map(int, indices))]


@dataclass
class StudentSampler:
    """Samples the student's responses to given prompts at `temperature`, with its own random stream."""

    tokenizer: object
    max_new_tokens: int
    temperature: float
    generator: torch.Generator
    device: torch.device

    def __call__(self, student, prompts: list[list[int]]) -> Sequences:
        prompt_ids, prompt_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        with torch.no_grad():
            rollout = sample(student, prompt_ids.to(self.device), prompt_mask.to(self.device),
                             max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                             pad_token_id=self.tokenizer.pad_token_id, generator=self.generator,
                             temperature=self.temperature)
        return Sequences(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)


@dataclass
class StudentDataResult:
    best_state: dict
    best_rouge_l: float = -math.inf
    train_curve: list[dict] = field(default_factory=list)
    valid_curve: list[dict] = field(default_factory=list)
    generated_tokens: int = 0
    teacher_forward_tokens: int = 0
    response_tokens_trained: int = 0
    student_batches: int = 0  # steps whose responses were the student's (fresh or replayed)
    skipped_steps: int = 0
    wall_time_s: float = 0.0
    budget: BudgetCheckpoint | None = None  # the compute-matched checkpoint (pipeline/cost.py), by validation Rouge-L


def divergence_sums(model, teacher, batch: Sequences, rows: torch.Tensor, divergence: str, beta: float, alpha: float,
                    temperature: float) -> dict[str, torch.Tensor]:
    """Sum over the response tokens of `rows` of D(teacher, student), and of the diagnostics."""
    student_hidden = response_hidden(model, batch, rows)
    with torch.no_grad():
        teacher_hidden = response_hidden(teacher, batch, rows)
    return with_lm_head(model, lambda student_head: losses.fused_head_divergence(
        divergence, student_hidden, student_head, teacher_hidden, lm_head_weight(teacher), batch.response_ids[rows],
        batch.response_mask[rows], beta=beta, alpha=alpha, temperature=temperature, chunk_size=FUSED_CHUNK,
    ))


def train_on_student_data(
    *,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer,
    prompt_split: TokenizedSplit,
    valid_split: TokenizedSplit,
    valid_records: list[dict],
    source,
    config,
    divergence: str,
    beta: float,
    alpha: float,
    loss_temperature: float,
    sampling_temperature: float,
    engine_config: EngineConfig,
    dist: engine.Dist,
    seed: int,
    log_metrics,
    checkpointer: Checkpointer,
    stage_key: str,
    budget: BudgetCheckpoint | None = None,
) -> StudentDataResult:
    world, device = dist.world_size, dist.device
    grad_accum = engine.accumulation_steps(config.batch_size, config.micro_batch_size, world, stage_key)
    local_batch = config.batch_size // world
    add_lora(student, engine_config.lora)  # engine.lora: only adapters train
    model_engine = engine.initialize(student, config.optimizer, config.steps, config.micro_batch_size, grad_accum, engine_config)
    teacher = engine.partition_teacher(teacher, engine_config)
    teacher.eval()
    student.eval()
    # Prompts are drawn identically on every rank (each then takes its own rows); samples differ per rank.
    rng = np.random.default_rng(seed)
    sampler = StudentSampler(tokenizer, config.max_new_tokens, sampling_temperature,
                             torch.Generator(device=device).manual_seed(seed * 1000 + dist.rank), device)

    def validate(step: int) -> None:
        module = model_engine.module
        loss = validation_loss(module, valid_split, config.micro_batch_size * 4, tokenizer.pad_token_id, device)
        rouge = evaluate_rouge_l(module, tokenizer, valid_records, seed=seed, max_new_tokens=config.eval_max_new_tokens,
                                 batch_size=64)
        source.validated(step, loss)
        if result.budget is not None:
            spent = result.budget.spent(result.response_tokens_trained, result.generated_tokens,
                                        result.teacher_forward_tokens)
            result.budget.before_validation(step, spent, result.best_state, result.best_rouge_l)
        if rouge > result.best_rouge_l:
            result.best_rouge_l, result.best_state = rouge, cpu_state(module)
        result.valid_curve.append({"step": step, "valid_loss": loss, "valid_rouge_l": rouge})
        log_metrics({"valid/loss": loss, "valid/rouge_l": rouge}, step)

    done_steps = 0
    if checkpointer.resume is not None:
        loop, mine = checkpointer.load(model_engine)
        done_steps, result = loop["step"], loop["result"]
        source.load_state_dict(mine["source"])
        rng.bit_generator.state = mine["generators"]["batches"]
        sampler.generator.set_state(mine["generators"]["sampler"])
    else:
        result = StudentDataResult(best_state=cpu_state(student), budget=budget)
        validate(0)
    wall_time_before, segment_started = result.wall_time_s, time.perf_counter()

    for step in tqdm(range(done_steps + 1, config.steps + 1), initial=done_steps, total=config.steps, desc=stage_key,
                     disable=not dist.is_main):
        started = time.perf_counter()
        chosen = rng.choice(len(prompt_split), size=config.batch_size, replace=False)
        local = chosen[dist.rank * local_batch : (dist.rank + 1) * local_batch]
        pairs, origin = source.batch(step, local, rng, lambda prompts: sampler(model_engine.module, prompts).pairs())
        batch = Sequences.from_pairs(pairs, tokenizer.pad_token_id).to(device)
        response_tokens = engine.global_sum(float(batch.response_mask.sum()), device)
        micro = [torch.arange(i, min(i + config.micro_batch_size, len(pairs))) for i in range(0, len(pairs), config.micro_batch_size)]

        def micro_loss(rows):
            sums = divergence_sums(model_engine, teacher, batch, rows, divergence, beta, alpha, loss_temperature)
            return sums["divergence"], sums

        sums, grad_norm = engine.optimizer_step(model_engine, micro, micro_loss, response_tokens, world)
        totals = {name: engine.global_sum(value, device) for name, value in sums.items()}
        metrics = {
            "loss/divergence": totals["divergence"] / response_tokens,
            "train/student_batch": float(origin in ("student", "replay")),
            "train/response_length": response_tokens / config.batch_size,
            "train/reverse_kl_per_token": totals["reverse_kl"] / response_tokens,
            "train/log_ratio_mean": totals["log_ratio"] / response_tokens,
            "train/lr": model_engine.get_lr()[0],
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": response_tokens / (time.perf_counter() - started),
            **source.metrics(),
        }
        bad_part = checkpoint.first_nonfinite({"divergence": metrics["loss/divergence"], "grad_norm": grad_norm})
        if bad_part is not None:
            result.skipped_steps = checkpoint.skip_or_stop(stage_key, step, bad_part, result.skipped_steps,
                                                           checkpointer.max_nonfinite_skips)
        else:
            result.response_tokens_trained += int(response_tokens)
            result.teacher_forward_tokens += int(response_tokens)
            result.student_batches += origin in ("student", "replay")
            if origin == "student":
                result.generated_tokens += int(response_tokens)
            result.train_curve.append({"step": step, **{k.replace("/", "_"): v for k, v in metrics.items()}})
            log_metrics(metrics, step)
        if step % config.eval_every == 0 or step == config.steps:
            validate(step)
        result.wall_time_s = wall_time_before + time.perf_counter() - segment_started
        if checkpointer.due(step) and step < config.steps:
            checkpointer.save(model_engine, step, {"step": step, "result": result},
                              {"source": source.state_dict(),
                               "generators": {"batches": rng.bit_generator.state, "sampler": sampler.generator.get_state()}})
    return result


def summarize(result: StudentDataResult) -> dict:
    return {"best_valid_rouge_l": result.best_rouge_l, "steps": len(result.train_curve),
            "student_batches": result.student_batches, "skipped_steps": result.skipped_steps,
            "wall_time_s": result.wall_time_s, "response_tokens_trained": result.response_tokens_trained,
            "generated_tokens": result.generated_tokens, "teacher_forward_tokens": result.teacher_forward_tokens}
