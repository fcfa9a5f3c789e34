"""The training engine every stage shares: DeepSpeed, data parallelism, seeds, and global-token loss scaling.

Loss normalisation (spec §8): each micro-batch contributes sum(token losses) * G * W / N_global, where G is
the gradient-accumulation count, W the number of ranks and N_global the token count of the whole optimiser
step over all micro-batches and ranks. DeepSpeed divides by G when accumulating and averages gradients over
W, so the update is sum(all token losses) / N_global: independent of how the global batch is split.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import ConfigError, EngineConfig, Optimizer


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def relaunch_if_data_parallel(engine: EngineConfig) -> None:
    """With num_procs > 1, run this same stage under torchrun (or DeepSpeed's launcher) and exit with its status.

    Stages run as `python -m stages.<name>`, so the launcher runs the module, not the file, to keep imports working.
    """
    if engine.num_procs == 1 or "LOCAL_RANK" in os.environ:
        return
    module = sys.modules["__main__"].__spec__.name
    if engine.launcher == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={engine.num_procs}", "-m"]
    else:
        launcher = ["deepspeed", f"--num_gpus={engine.num_procs}", "--module"]
    # "--" ends the launcher's own options: argparse matches every later "--x" against them by prefix, so without
    # it the stages' `--start` is rejected as ambiguous (torchrun's --start-method) before the module is even read.
    completed = subprocess.run([*launcher, "--", module, *sys.argv[1:]], preexec_fn=die_with_parent)
    sys.exit(completed.returncode)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies. A SIGKILLed stage cannot stop its
    launcher, nor a killed launcher its ranks (torchrun starts them in sessions of their own): without this they
    train on as orphans and race the resumed run for scratch/ and the outputs. The launcher gets it from
    relaunch_if_data_parallel, each rank from setup."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def skip_shared_memory_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory communication op (`deepspeed_shm_comm`).

    DeepSpeed builds it at every `init_distributed` on the CPU (about a minute the first time, under a file lock in
    torch's extension directory), yet only its `inference_all_reduce` (tensor-parallel inference) calls it: training,
    ZeRO included, all-reduces through gloo. A stage killed while building it left the lock behind, and every later
    stage then waited on that lock forever, printing nothing. DeepSpeed skips the op when its compatibility table
    marks it incompatible, so marking it so means no build, no lock and no wait, whatever a killed run left behind.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def setup(engine: EngineConfig) -> Dist:
    """Initialise torch.distributed through DeepSpeed: gloo on the CPU, NCCL on GPUs; one process works too."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    elif "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_SIZE" in os.environ:
        die_with_parent()  # a rank started by torchrun or by DeepSpeed's launcher
    if engine.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device: cuda requested but no GPU is visible")
    if not dist.is_initialized():
        if engine.device == "cpu":
            skip_shared_memory_comm_op()
        deepspeed.init_distributed(dist_backend="gloo" if engine.device == "cpu" else "nccl", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if engine.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(engine: EngineConfig) -> torch.dtype:
    return DTYPES[engine.precision]


def teacher_dtype_of(engine: EngineConfig) -> torch.dtype:
    return DTYPES[engine.teacher_precision]


class FiniteStepAdamW(torch.optim.AdamW):
    """AdamW that leaves weights, moments and its step count untouched when a gradient holds a NaN or inf, and
    says so in `overflow`, the flag DeepSpeed reads to count the step as skipped and hold the LR schedule.
    DeepSpeed's ZeRO 1-2 optimisers already skip such steps before calling this one; this makes ZeRO 0 agree,
    so a non-finite step never reaches the weights and a recipe may stop or skip it (checkpoint.max_nonfinite_skips).
    """

    overflow = False

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, optimizer: Optimizer) -> FiniteStepAdamW:
    """AdamW with no weight decay on biases and LayerNorm weights (every 1-D parameter), as spec §2."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops an empty group (LoRA's adapters are all 2-D), which the LR schedule's group count must match.
    groups = [group for group in groups if group["params"]]
    return FiniteStepAdamW(groups, lr=optimizer.lr, betas=optimizer.betas)


def build_schedule(torch_optimizer: torch.optim.Optimizer, optimizer: Optimizer, total_steps: int):
    """Cosine from lr to min_lr over the run (spec §2), or constant after linear warmup (spec §4)."""

    def multiplier(step: int) -> float:
        if step < optimizer.warmup_steps:
            return (step + 1) / optimizer.warmup_steps
        if optimizer.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optimizer.warmup_steps) / max(1, total_steps - optimizer.warmup_steps))
        floor = optimizer.min_lr / optimizer.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(torch_optimizer, multiplier)


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int, key: str) -> int:
    if global_batch % (micro_batch * world_size):
        raise ConfigError(
            f"{key}.batch_size ({global_batch}) must be a multiple of micro_batch_size ({micro_batch}) "
            f"x processes ({world_size})"
        )
    return global_batch // (micro_batch * world_size)


class ZeRO3HeadCall(torch.nn.Module):
    """Runs `loss_of_head(W)`, W the LM-head weight, inside a forward of its own (hidden_states.with_lm_head). Under ZeRO-3 the weight is
    partitioned across ranks outside its module's forward, and a loss that multiplies it in chunks runs outside that
    forward. Registered with this module as an external parameter (initialize), the weight is gathered whole
    for this forward and its gradient reduce-scattered to its shards in backward, as for any ZeRO-3 layer: the loss
    never makes [B, T, V] logits, and the whole [V, d] weight exists only during the call."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.head_weight = (weight,)  # in a tuple: the model registers it already; this module must own no parameter

    def forward(self, loss_of_head):
        return loss_of_head(self.head_weight[0])


def initialize(model, optimizer: Optimizer, total_steps: int, micro_batch: int, grad_accum: int, engine: EngineConfig):
    """Wrap the model in a DeepSpeed engine with our AdamW and schedule; ZeRO stage, precision and gradient
    checkpointing from params. AdamW takes the parameters that require gradients: the adapters alone under LoRA."""
    import deepspeed

    if engine.gradient_checkpointing:
        # Non-reentrant: it needs no input that requires grad (LoRA's frozen embeddings give none) and is what
        # torch recommends; transformers applies it to each decoder layer, in training mode only (its
        # gradient_checkpointing_enable is a deprecated alias).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if engine.zero_stage == 3:
        # The fused losses multiply the LM-head weight outside its module's forward, where ZeRO-3 leaves each rank
        # only its shard: they run inside this module's forward instead, which gathers it (hidden_states.with_lm_head).
        head_call = ZeRO3HeadCall(model.get_output_embeddings().weight)
        model.add_module("zero3_head", head_call)
        deepspeed.zero.register_external_parameter(head_call, model.get_output_embeddings().weight)
    torch_optimizer = build_optimizer(model, optimizer)
    schedule = build_schedule(torch_optimizer, optimizer, total_steps)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optimizer.grad_clip,
        "zero_optimization": zero_config(engine),
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # ZeRO on a client optimizer that is not DeepSpeed's own needs this flag.
        "zero_allow_untested_optimizer": True,
    }
    model_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch_optimizer, lr_scheduler=schedule, config=config)
    return model_engine


def zero_config(engine: EngineConfig) -> dict:
    # ZeRO-3 keeps parameters smaller than the threshold whole on every rank (DeepSpeed's default, 1e5 elements: the
    # norms and biases), which saves their gathers; 0 partitions every parameter.
    persistence = {"stage3_param_persistence_threshold": engine.zero3_param_persistence_threshold}
    return {"stage": engine.zero_stage} | (persistence if engine.zero_stage == 3 else {})


def partition_teacher(teacher: torch.nn.Module, engine: EngineConfig):
    """The frozen teacher under ZeRO-3 inference: its parameters partitioned across ranks like the student's, each
    layer gathered for its forward and freed after, so a teacher larger than one device's memory runs. Its LM head
    stays whole on every rank (a [V, d] copy made before partitioning), because the fused losses read the weight
    outside any forward (lm_head_weight), and the teacher's head needs no gradient to gather back. Below ZeRO-3 the
    teacher is returned as it is, whole on every rank. Returns what to call as the teacher."""
    if engine.zero_stage != 3:
        return teacher
    import deepspeed

    head = teacher.get_output_embeddings()
    whole_head = torch.nn.Linear(head.in_features, head.out_features, bias=False, device=head.weight.device,
                                 dtype=head.weight.dtype).requires_grad_(False)
    whole_head.weight.copy_(head.weight.detach())
    config = {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed; nothing trains
        "zero_optimization": zero_config(engine),
        "bf16": {"enabled": engine.teacher_precision == "bf16"},
        "fp16": {"enabled": engine.teacher_precision == "fp16"},
        "steps_per_print": 10**9,
    }
    teacher_engine, _, _, _ = deepspeed.initialize(model=teacher, config=config)
    teacher_engine.module.set_output_embeddings(whole_head)
    teacher_engine.eval()
    return teacher_engine


def grad_norm_before_step(model_engine) -> float | None:
    """The pre-clipping gradient norm. DeepSpeed reports it (after the step) only under ZeRO >= 1, so at stage 0
    it is read off the gradients: call this after the optimiser step's last backward, before `step()`."""
    if model_engine.zero_optimization_stage() > 0:
        return None
    norms = [p.grad.detach().float().norm() for p in model_engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def grad_norm_after_step(model_engine, before: float | None) -> float:
    return before if before is not None else float(model_engine.get_global_grad_norm() or 0.0)


def global_sum(value: float, device: torch.device) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def scale_for_global_mean(loss_sum: torch.Tensor, global_count: float, model_engine, world_size: int) -> torch.Tensor:
    """See the module docstring: makes DeepSpeed's mean-over-micro-batches-and-ranks a global token mean."""
    return loss_sum * (model_engine.gradient_accumulation_steps() * world_size / global_count)


def optimizer_step(model_engine, micro_batches: list, micro_loss, global_count: float, world_size: int) -> tuple[dict[str, float], float]:
    """One optimiser step over this rank's micro-batches, shared by every recipe.

    `micro_loss(batch)` returns the micro-batch's loss, a sum over the tokens it covers of a loss whose step value is
    that sum over all micro-batches and ranks divided by `global_count` (a recipe whose loss is already normalised
    passes 1), and a dict of scalars to sum over the step for logging. Returns this rank's sums of those scalars and
    the pre-clipping gradient norm."""
    sums: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        loss, parts = micro_loss(batch)
        model_engine.backward(scale_for_global_mean(loss, global_count, model_engine, world_size))
        if index == len(micro_batches) - 1:
            norm = grad_norm_before_step(model_engine)
        model_engine.step()  # DeepSpeed steps the optimiser only at the last micro-batch of the accumulation
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.item()
    return sums, grad_norm_after_step(model_engine, norm)


def micro_batch_indices(step_indices: np.ndarray, micro_batch: int, grad_accum: int, dist_info: Dist) -> list[np.ndarray]:
    """This rank's micro-batches of one optimiser step's global batch (rank r takes every W-th slice)."""
    slices = []
    for accumulation in range(grad_accum):
        start = (accumulation * dist_info.world_size + dist_info.rank) * micro_batch
        slices.append(step_indices[start : start + micro_batch])
    return slices


def partitioned(model: torch.nn.Module | None) -> bool:
    """Whether ZeRO-3 has partitioned `model`'s parameters across ranks (DeepSpeed gives each one a ds_id): outside
    a forward each rank then holds only its shard, and reading a weight needs `gathered`."""
    return model is not None and any(hasattr(parameter, "ds_id") for parameter in model.parameters())


def gathered(parameter: torch.nn.Parameter):
    """A context in which a ZeRO-3 parameter is whole on every rank (a collective: every rank enters it, in the same
    order); any other parameter is whole already."""
    if not hasattr(parameter, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([parameter])


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on at least one rank (a collective)."""
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
