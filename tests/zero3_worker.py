"""SFT, KD, GKD, MiniLLM and OPD on tiny Llama and OPT models under ZeRO-0 and ZeRO-3, on 2 gloo ranks; shared by
tests/test_zero3.py, which launches it:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/zero3_worker.py --world W --out OUT

`W` holds the tokenizer and splits (the test builds them once, so both ranks read the same). Rank 0 saves, in
OUT/results.pt, per (family, method, ZeRO stage), the final parameters gathered from every rank and the kept best
state; per family, how much of the ZeRO-3 student and teacher each rank holds, and the final parameters of a ZeRO-3
SFT run interrupted after its step-2 checkpoint and resumed; and, per family, the ZeRO-3 MiniLLM student saved as a
Hugging Face directory OUT/<family>-minillm.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch

from pipeline import engine
from pipeline.config import Architecture, EngineConfig, GKDMethod, MiniLLMMethod, Optimizer, SFTStage
from pipeline.gkd import train_gkd
from pipeline.minillm import train_minillm
from pipeline.models import build_causal_lm, save_checkpoint
from pipeline.sft import KDTerm, copy_with_state, cpu_state, train_sft
from tests.test_recipes import run_recipe

FAMILIES = ("llama", "opt")
OPTIMIZER = Optimizer(lr=2e-3, min_lr=2e-4, weight_decay=0.01, grad_clip=1.0, schedule="cosine", warmup_steps=1)
# Global batch 4 on 2 ranks: each rank takes 2 examples, as 2 micro-batches of 1 (gradient accumulation 2).
SFT = SFTStage(steps=4, batch_size=4, micro_batch_size=1, optimizer=OPTIMIZER, eval_every=2, eval_max_new_tokens=4)
MINILLM = MiniLLMMethod(
    steps=4, rollouts_per_round=4, inner_epochs=1, batch_size=4, micro_batch_size=1, max_new_tokens=5, teacher_mix=0.2,
    max_importance_weight=None, reward_scale=1.0, reward_clip=100.0, returns="paper", gamma=0.95, length_normalized=True,
    whiten_advantages=True, clip_eps=0.2, single_step=True, pt_coef=1.0, pt_batch_size=2, pt_teacher_kd_ratio=0.5,
    optimizer=OPTIMIZER.model_dump(), eval_every=2, eval_max_new_tokens=4,
)

# OPD's choices (OPDMethod.as_policy_gradient): no teacher mixing, no single-step term, no PT loss, so that no step
# runs the student's whole forward with its LM head.
OPD = MINILLM.model_copy(update={"teacher_mix": 0.0, "single_step": False, "pt_coef": 0.0, "returns": "discounted",
                                 "gamma": 0.0, "length_normalized": False, "whiten_advantages": False})

# On-policy half the time: student samples and the teacher's forward on them, the student's body without its LM head.
GKD = GKDMethod(steps=4, batch_size=4, micro_batch_size=1, max_new_tokens=5, optimizer=OPTIMIZER.model_dump(),
                eval_every=2, eval_max_new_tokens=4, on_policy_fraction=0.5, beta=0.5, temperature=1.0,
                loss_temperature=1.0, seq_kd=False)


def tiny_pair(family: str, vocab_size: int, eos: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same teacher and student weights on every rank and in every call; dropout off, so that the partitioned
    and the whole model compute the same function. OPT's dropout (0.1) is a float attribute of its layers, applied
    functionally, not a Dropout module."""
    torch.manual_seed(0)
    teacher = build_causal_lm(Architecture(family=family, n_layer=2, n_embd=32, n_head=4), vocab_size, 192, eos)
    student = build_causal_lm(Architecture(family=family, n_layer=1, n_embd=16, n_head=2), vocab_size, 192, eos)
    for module in [*teacher.modules(), *student.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "activation_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return teacher.eval().requires_grad_(False), student


def held_fraction(model: torch.nn.Module, dist) -> tuple[float, float]:
    """(this rank's share of the model's parameter elements, the share summed over ranks): each partition a
    parameter holds locally (ds_tensor) against its whole size (ds_numel); whole parameters count in full."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    whole = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    return local / whole, engine.global_sum(local, dist.device) / whole


def run(recipe, name: str, dist, engine_config, interrupt_at: int | None = None, **kwargs):
    """The recipe as its stage runs it (tests/test_recipes.py's run_recipe: a checkpointer in scratch/<name>, every
    2 steps); with `interrupt_at`, stopped right after that step's checkpoint is written. None when interrupted."""
    result, _ = run_recipe(recipe, {"dist": dist, "engine": engine_config}, name, interrupt_at, **kwargs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    world = torch.load(args.world / "world.pt", weights_only=False)
    tokenizer = world["tokenizer"]
    os.chdir(args.out)  # the checkpointers' scratch/ directories
    results = {}
    for zero_stage in (0, 3):
        config = EngineConfig(num_procs=2, launcher="torchrun", device="cpu", precision="fp32", zero_stage=zero_stage,
                              zero3_param_persistence_threshold=0)  # every parameter partitioned, norms included
        dist = engine.setup(config)
        for family in FAMILIES:
            teacher, student = tiny_pair(family, len(tokenizer), tokenizer.eos_token_id)
            results[(family, "initial")] = cpu_state(student)
            sft_inputs = dict(tokenizer=tokenizer, train_split=world["train"], valid_split=world["valid"],
                              valid_records=world["records"], stage=SFT, seed=3)
            for method in ("sft", "kd"):
                model = copy.deepcopy(student)
                kd = KDTerm(teacher=copy.deepcopy(teacher), ratio=0.5, divergence="forward_kl", beta=0.5, alpha=0.1)
                result = run(train_sft, f"{family}-{method}-{zero_stage}", dist, config, model=model,
                             stage_key=f"{family}.{method}", kd=kd if method == "kd" else None, **sft_inputs)
                results[(family, method, zero_stage)] = {"final": cpu_state(model), "best": result.best_rouge_state,
                                                         "valid_curve": result.valid_curve}
            model = copy.deepcopy(student)
            result = run(train_gkd, f"{family}-gkd-{zero_stage}", dist, config, student=model, teacher=copy.deepcopy(teacher),
                         tokenizer=tokenizer, train_split=world["train"], valid_split=world["valid"],
                         valid_records=world["records"], config=GKD, seed=5)
            results[(family, "gkd", zero_stage)] = {"final": cpu_state(model), "best": result.best_state,
                                                    "valid_curve": result.valid_curve}
            for method, method_config in (("opd", OPD), ("minillm", MINILLM)):  # MiniLLM's student is checked below
                model = copy.deepcopy(student)
                rollouts = args.out / f"rollouts-{family}-{method}-{zero_stage}"
                rollouts.mkdir(exist_ok=True)
                minillm_teacher = copy.deepcopy(teacher)
                result = run(train_minillm, f"{family}-{method}-{zero_stage}", dist, config, student=model,
                             teacher=minillm_teacher, tokenizer=tokenizer, train_prompts=world["train"].prompts(),
                             pt_blocks=world["blocks"], valid_records=world["records"], config=method_config, seed=5,
                             rollout_dir=rollouts)
                results[(family, method, zero_stage)] = {"final": cpu_state(model), "best": result.best_state,
                                                         "valid_curve": result.valid_curve}
            if zero_stage == 3:
                results[(family, "held")] = {"student": held_fraction(model, dist),
                                             "teacher": held_fraction(minillm_teacher, dist)}
                if dist.is_main:
                    save_checkpoint(copy_with_state(model, result.best_state), tokenizer, args.out / f"{family}-minillm")
                name = f"{family}-sft-resumed"
                assert run(train_sft, name, dist, config, interrupt_at=2, model=copy.deepcopy(student),
                           stage_key=name, **sft_inputs) is None
                model = copy.deepcopy(student)
                run(train_sft, name, dist, config, model=model, stage_key=name, **sft_inputs)
                results[(family, "sft-resumed", zero_stage)] = {"final": cpu_state(model)}
            engine.barrier()
    if dist.is_main:
        torch.save(results, args.out / "results.pt")
    engine.barrier()
    engine.teardown()


if __name__ == "__main__":
    main()
