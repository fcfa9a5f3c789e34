"""Supervised fine-tuning recipe (spec §2), optionally with a word-level KD term (spec §3).

Used by: teacher SFT, student initialisation ("SFT w/o KD"), KD, and SeqKD (SFT on teacher samples).

    loss = (1 - kd_ratio) * CE(response tokens) + kd_ratio * D(teacher || student)   per response token

with D the teacher cross-entropy for the paper's KD, or any divergence of pipeline.losses. Every step's
loss is normalised by the global response-token count (pipeline.engine). Validation Rouge-L and loss are
measured every `eval_every` steps and at the end; the best weights by each are kept.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import checkpoint, engine, losses
from pipeline.checkpoint import Checkpointer
from pipeline.config import ConfigError, EngineConfig, SFTStage
from pipeline.cost import BudgetCheckpoint
from pipeline.data import TokenizedSplit, sft_batch
from pipeline.evaluation import evaluate_rouge_l
from pipeline.hidden_states import FUSED_CHUNK, lm_head_weight, with_lm_head
from pipeline.models import add_lora


@dataclass
class KDTerm:
    teacher: torch.nn.Module
    ratio: float
    divergence: str
    beta: float
    alpha: float


@dataclass
class SFTResult:
    best_rouge_state: dict
    best_loss_state: dict
    best_rouge_l: float
    best_loss: float
    train_curve: list[dict] = field(default_factory=list)
    valid_curve: list[dict] = field(default_factory=list)
    response_tokens_trained: int = 0
    teacher_forward_tokens: int = 0
    generated_tokens: int = 0  # SFT generates nothing while training; the field keeps the cost ledger uniform
    skipped_steps: int = 0
    wall_time_s: float = 0.0
    budget: BudgetCheckpoint | None = None  # the compute-matched checkpoint (pipeline/cost.py), by validation Rouge-L


def response_token_loss_parts(model, batch: dict, kd: KDTerm | None) -> tuple[dict[str, torch.Tensor], int]:
    """Sums over response tokens of the CE and (with a KD term) the divergence, and how many tokens they cover."""
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    if kd is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        ce_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return {"ce": ce_sum}, int(mask.sum())
    # KD: both LM heads run inside chunks of positions (losses.fused_head_kd), so neither model's [B, T, V] logits
    # exist: they would be most of the step's memory at a 128K vocabulary (benchmarks/bench_logits.py).
    student_hidden = last_hidden_states(model, batch)
    with torch.no_grad():
        teacher_hidden = last_hidden_states(kd.teacher, batch)
    sums = with_lm_head(model, lambda student_head: losses.fused_head_kd(
        kd.divergence, student_hidden, student_head, teacher_hidden, lm_head_weight(kd.teacher), targets, mask,
        beta=kd.beta, alpha=kd.alpha, chunk_size=FUSED_CHUNK,
    ))
    return {"ce": sums["ce"], "kd": sums["divergence"]}, int(mask.sum())


def last_hidden_states(model, batch: dict) -> torch.Tensor:
    """[B, T - 1, d]: the last hidden states (after the final norm) that predict tokens 1..T-1 of the batch."""
    # Through the model's own forward, as hidden_states.response_hidden and for its reason (ZeRO-3).
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                   logits_to_keep=1)
    return output.hidden_states[-1][:, :-1]


def response_token_loss_sum(model, batch: dict, kd: KDTerm | None) -> tuple[torch.Tensor, int]:
    """Sum over response tokens of the (KD-mixed) loss, and how many tokens it covers."""
    parts, tokens = response_token_loss_parts(model, batch, kd)
    if kd is None:
        return parts["ce"], tokens
    return (1.0 - kd.ratio) * parts["ce"] + kd.ratio * parts["kd"], tokens


@torch.no_grad()
def validation_loss(model, split: TokenizedSplit, batch_size: int, pad_token_id: int, device) -> float:
    """Token-mean CE on the validation responses: the student-init selection criterion of spec §2."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(split), batch_size):
        indices = np.arange(start, min(start + batch_size, len(split)))
        batch = {k: v.to(device) for k, v in sft_batch(split, indices, pad_token_id).items()}
        loss_sum, tokens = response_token_loss_sum(model, batch, kd=None)
        total += float(loss_sum)
        count += tokens
    return total / max(count, 1)


def cpu_state(model) -> dict:
    """CPU copies of the parameters that train (all of them, or LoRA's adapters alone): what best-model selection
    keeps. Frozen weights never change, so copy_with_state takes them from the model itself; keeping them too would
    hold two more copies of a LoRA model's base (a 7B base in fp32: 56 GB). Under ZeRO-3 each parameter is gathered
    from every rank in turn (every rank calls this) and only rank 0 keeps the copies: it alone saves."""
    state, copies = {}, {}
    keep = not engine.partitioned(model) or engine.rank() == 0
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if not parameter.requires_grad:
            continue
        if id(parameter) not in copies:  # a tied weight is copied once
            with engine.gathered(parameter):
                copies[id(parameter)] = parameter.detach().to("cpu", copy=True) if keep else None
        if keep:
            state[name] = copies[id(parameter)]
    return state


def train_sft(
    *,
    model: torch.nn.Module,
    tokenizer,
    train_split: TokenizedSplit,
    valid_split: TokenizedSplit,
    valid_records: list[dict],
    stage: SFTStage,
    stage_key: str,
    engine_config: EngineConfig,
    dist: engine.Dist,
    seed: int,
    log_metrics,
    checkpointer: Checkpointer,
    kd: KDTerm | None = None,
    budget: BudgetCheckpoint | None = None,
) -> SFTResult:
    world = dist.world_size
    grad_accum = engine.accumulation_steps(stage.batch_size, stage.micro_batch_size, world, stage_key)
    steps_per_epoch = len(train_split) // stage.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{stage_key}.batch_size ({stage.batch_size}) is larger than the training set ({len(train_split)} examples)"
        )
    total_steps = stage.steps or stage.epochs * steps_per_epoch
    example_lengths = np.diff(train_split.offsets)
    add_lora(model, engine_config.lora)  # engine.lora: only adapters train
    model_engine = engine.initialize(model, stage.optimizer, total_steps, stage.micro_batch_size, grad_accum, engine_config)
    pad = tokenizer.pad_token_id
    if kd is not None:
        kd = dataclasses.replace(kd, teacher=engine.partition_teacher(kd.teacher, engine_config))
        kd.teacher.eval()

    result = SFTResult(best_rouge_state={}, best_loss_state={}, best_rouge_l=-math.inf, best_loss=math.inf, budget=budget)

    def validate(step: int) -> None:
        module = model_engine.module
        loss = validation_loss(module, valid_split, stage.micro_batch_size * 4, pad, dist.device)
        rouge = evaluate_rouge_l(
            module, tokenizer, valid_records, seed=seed, max_new_tokens=stage.eval_max_new_tokens, batch_size=64
        )
        module.train()
        if result.budget is not None:
            spent = result.budget.spent(result.response_tokens_trained, 0, result.teacher_forward_tokens)
            result.budget.before_validation(step, spent, result.best_rouge_state, result.best_rouge_l)
        if rouge > result.best_rouge_l:
            result.best_rouge_l, result.best_rouge_state = rouge, cpu_state(module)
        if loss < result.best_loss:
            result.best_loss, result.best_loss_state = loss, cpu_state(module)
        point = {"step": step, "valid_loss": loss, "valid_rouge_l": rouge}
        result.valid_curve.append(point)
        log_metrics({"valid/loss": loss, "valid/rouge_l": rouge}, step)

    step = 0
    if checkpointer.resume is not None:
        loop_state, _ = checkpointer.load(model_engine)
        step, result = loop_state["step"], loop_state["result"]
    wall_time_before, segment_started = result.wall_time_s, time.perf_counter()
    model_engine.train()
    progress = tqdm(total=total_steps, initial=step, desc=stage_key, disable=not dist.is_main)
    while step < total_steps:
        epoch, epoch_step = divmod(step, steps_per_epoch)
        # Same permutation on every rank: ranks then take disjoint slices of each global batch.
        permutation = np.random.default_rng(seed + epoch).permutation(len(train_split))
        started = time.perf_counter()
        step_indices = permutation[epoch_step * stage.batch_size : (epoch_step + 1) * stage.batch_size]
        # Micro-batches of similar lengths pad less (a shuffled batch of the embedded default is ~45% padding).
        # The step's examples are the same, and so are its loss and gradient: the loss is a sum normalised by the
        # global token count.
        step_indices = step_indices[np.argsort(example_lengths[step_indices], kind="stable")]
        micro_batches = [
            {k: v.to(dist.device) for k, v in sft_batch(train_split, indices, pad).items()}
            for indices in engine.micro_batch_indices(step_indices, stage.micro_batch_size, grad_accum, dist)
        ]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        global_tokens = engine.global_sum(local_tokens, dist.device)

        def micro_loss(batch):
            parts, _ = response_token_loss_parts(model_engine, batch, kd)
            loss_sum = parts["ce"] if kd is None else (1.0 - kd.ratio) * parts["ce"] + kd.ratio * parts["kd"]
            return loss_sum, {"loss": loss_sum, **parts}

        sums, grad_norm = engine.optimizer_step(model_engine, micro_batches, micro_loss, global_tokens, world)
        step += 1
        step_loss = engine.global_sum(sums.pop("loss"), dist.device) / global_tokens
        checked = {name: engine.global_sum(value, dist.device) for name, value in sums.items()} | {"grad_norm": grad_norm}
        bad_part = checkpoint.first_nonfinite(checked)
        if bad_part is not None:
            result.skipped_steps = checkpoint.skip_or_stop(stage_key, step, bad_part, result.skipped_steps,
                                                           checkpointer.max_nonfinite_skips)
        else:
            point = {
                "step": step,
                "train_loss": step_loss,
                "lr": model_engine.get_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": global_tokens / (time.perf_counter() - started),
            }
            result.train_curve.append(point)
            result.response_tokens_trained += int(global_tokens)
            if kd is not None:
                result.teacher_forward_tokens += int(global_tokens)
            log_metrics({f"train/{k.removeprefix('train_')}": v for k, v in point.items() if k != "step"}, step)
            progress.set_postfix(loss=f"{step_loss:.3f}")
        progress.update(1)
        if step % stage.eval_every == 0 or step == total_steps:
            validate(step)
        result.wall_time_s = wall_time_before + time.perf_counter() - segment_started
        if checkpointer.due(step) and step < total_steps:
            checkpointer.save(model_engine, step, {"step": step, "result": result}, rank_state={})
    progress.close()
    return result


def summarize(result: SFTResult) -> dict:
    return {
        "best_valid_rouge_l": result.best_rouge_l,
        "best_valid_loss": result.best_loss,
        "final_train_loss": result.train_curve[-1]["train_loss"],
        "mean_tokens_per_s": statistics.fmean(p["tokens_per_s"] for p in result.train_curve),
        "steps": len(result.train_curve),
        "skipped_steps": result.skipped_steps,
        "wall_time_s": result.wall_time_s,
        "response_tokens_trained": result.response_tokens_trained,
        "teacher_forward_tokens": result.teacher_forward_tokens,
        "generated_tokens": result.generated_tokens,
    }


def copy_with_state(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """A CPU copy of `model` with the trained parameters of `state` (cpu_state) and the model's own frozen ones. A
    ZeRO-3 model's parameters live partitioned across ranks, so its copy is built afresh from its config: every one
    of its parameters trains (no LoRA under ZeRO-3), so `state` holds them all."""
    if engine.partitioned(model):
        selected = type(model)(model.config).to(next(iter(state.values())).dtype)
        trained = {name for name, _ in selected.named_parameters(remove_duplicate=False)}
    else:
        selected = copy.deepcopy(model).cpu()
        trained = {name for name, p in selected.named_parameters(remove_duplicate=False) if p.requires_grad}
    missing, unexpected = selected.load_state_dict(state, strict=False)
    if unexpected or trained & set(missing):
        raise ValueError(f"a kept state does not match its model: unexpected {unexpected[:3]}, "
                         f"missing trained {sorted(trained & set(missing))[:3]}")
    return selected


@dataclass
class SFTInputs:
    tokenizer: object
    train_split: TokenizedSplit
    valid_split: TokenizedSplit
    valid_records: list[dict]


def add_sft_input_arguments(parser) -> None:
    """The command-line arguments of every stage that trains on instruction data (dvc.yaml passes the paths)."""
    parser.add_argument("--tokenizer", required=True, help="the tokenizer directory")
    parser.add_argument("--train", required=True, help="the tokenized training split (.npz)")
    parser.add_argument("--valid", required=True, help="the tokenized validation split (.npz): validation loss")
    parser.add_argument("--valid-records", required=True, help="the validation records (.jsonl): validation Rouge-L")


def load_sft_inputs(arguments) -> SFTInputs:
    """What add_sft_input_arguments names, loaded."""
    from pipeline.data import read_jsonl
    from pipeline.models import load_tokenizer

    return SFTInputs(
        tokenizer=load_tokenizer(arguments.tokenizer),
        train_split=TokenizedSplit.load(arguments.train),
        valid_split=TokenizedSplit.load(arguments.valid),
        valid_records=read_jsonl(arguments.valid_records),
    )


def write_curves(result: SFTResult, plots_dir: str) -> None:
    """Training curves as DVC plots (CSV, one file per x-axis granularity)."""
    import pandas as pd

    from pipeline.io import atomic_write_text

    atomic_write_text(f"{plots_dir}/train.csv", pd.DataFrame(result.train_curve).to_csv(index=False))
    atomic_write_text(f"{plots_dir}/valid.csv", pd.DataFrame(result.valid_curve).to_csv(index=False))
