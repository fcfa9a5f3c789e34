"""Typed schema of params.yaml, validated before any stage does work.

Every stage loads the whole file through `load_params`, so a mistyped key fails every stage, not only the
stage that would have read it; the `check_params` DVC stage depends on the raw file so that `dvc repro`
rejects it even when no other stage would rerun. Errors name the key: `params.yaml: data.max_length: ...`.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

# The protocol's vocabulary, defined once: the models Table 1 compares (its rows, in order; every method but the
# teacher trains a student) and the evaluation sets (its columns, in order; the same names at paper scale).
METHODS: tuple[str, ...] = ("teacher", "sft", "sft_long", "kd", "seqkd", "minillm", "gkd", "distillm", "opd")
EVAL_SETS: tuple[str, ...] = ("dollyeval", "selfinst", "vicunaeval", "sni", "unni")

# The token-level divergences of pipeline/losses.py, by the name params.yaml gives them. Defined here, not there,
# so that loading params imports no loss code (every stage would then depend on pipeline/losses.py).
DIVERGENCE_NAMES: tuple[str, ...] = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "teacher_cross_entropy",
)


# Labels name directories and DVC stages (`distill_kd@120M`): no dots, no slashes.
LABEL_PATTERN = r"^[A-Za-z0-9_-]+$"


class ConfigError(Exception):
    """A problem with params or inputs that the user must fix; stages print it as one line, no traceback."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticData(Strict):
    n_train: int = Field(gt=0)
    n_valid: int = Field(gt=0)
    n_per_eval_set: int = Field(gt=0)


class PretrainCorpus(Strict):
    source: Literal["synthetic", "text", "jsonl"]
    path: str | None = None  # a text file (documents separated by blank lines) or JSONL with a "text" field
    n_documents: int = Field(gt=0)  # synthetic documents to generate, or the most to read from `path`
    block_size: int = Field(gt=1)

    @model_validator(mode="after")
    def _path_given(self):
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"path is required when source is '{self.source}'")
        return self


class SplitFiles(Strict):
    """Given splits (data.source: jsonl), e.g. the files the MiniLLM authors publish, so that DollyEval is exactly
    their 500 prompts: each a JSONL file in the Dolly or the MiniLLM format (pipeline.data.eval_set_records)."""

    train: str
    valid: str
    test: str  # DollyEval


class DataConfig(Strict):
    source: Literal["synthetic", "jsonl", "dolly"]
    jsonl_path: str | None = None  # jsonl: one file, split at random (valid_size, test_size, seed) ...
    splits: SplitFiles | None = None  # ... or its three splits as given
    synthetic: SyntheticData
    valid_size: int = Field(gt=0)  # jsonl/dolly: records held out for validation (the paper: 1000)
    test_size: int = Field(gt=0)  # jsonl/dolly: records held out as DollyEval (the paper: 500)
    max_length: int = Field(gt=1)
    max_prompt_length: int = Field(gt=0)
    # Evaluation prompts over max_prompt_length: dropped from the set (ours), or kept and cut to their first
    # max_prompt_length tokens at generation, as the official code's PromptDataset does. Training and validation
    # prompts over it are always dropped, as the official data script does; ECE skips a cut prompt's example.
    long_eval_prompts: Literal["drop", "truncate"] = "drop"
    tokenizer_vocab_size: int = Field(ge=300)  # size of the byte-level BPE trained for the synthetic source
    # jsonl/dolly: the paper's other evaluation sets, each a local JSONL path or "hub" (pipeline.data.eval_set_records
    # documents both accepted formats); DollyEval is always the held-out test split.
    eval_sets: dict[Literal["selfinst", "vicunaeval", "sni", "unni"], str] = {}
    pretrain: PretrainCorpus

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        if self.source == "jsonl" and (self.jsonl_path is None) == (self.splits is None):
            raise ValueError("source 'jsonl' needs exactly one of jsonl_path (split at random) and splits (as given)")
        if self.source != "jsonl" and self.splits is not None:
            raise ValueError(f"splits: only for source 'jsonl', not '{self.source}'")
        if self.source == "synthetic" and self.eval_sets:
            raise ValueError("eval_sets: the synthetic source generates its own five evaluation sets; leave it empty")
        return self


# The decoder-only families a model can be built from (pipeline/models.py: build_causal_lm). Pretrained models
# (`name_or_path`) load through AutoModelForCausalLM and may be of any decoder-only family.
Family = Literal["gpt2", "opt", "llama", "qwen2"]


class Architecture(Strict):
    family: Family = "gpt2"
    n_layer: int = Field(gt=0)
    n_embd: int = Field(gt=0)
    n_head: int = Field(gt=0)
    # Key/value heads of grouped-query attention (Llama-2-70B, Llama-3, Qwen2): llama and qwen2 only; default n_head.
    n_kv_head: int | None = Field(default=None, gt=0)
    # The MLP's hidden width; default 4 * n_embd (GPT-2's and OPT's ratio; Llama-7B's is 11008 for 4096).
    ffn_dim: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head is not None:
            if self.family not in ("llama", "qwen2"):
                raise ValueError(f"n_kv_head: grouped-query attention is for llama and qwen2, not {self.family}")
            if self.n_head % self.n_kv_head:
                raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        return self


class ModelSpec(Strict):
    """Either a pretrained model (`name_or_path`) or an architecture of a `Family` built from scratch (`arch`)."""

    name_or_path: str | None = None
    arch: Architecture | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.name_or_path is None) == (self.arch is None):
            raise ValueError("give exactly one of name_or_path and arch")
        return self


class TeacherSpec(ModelSpec):
    label: str = Field(min_length=1)  # the teacher's size label in reports, e.g. "1.5B"


# What a student may set for its own stages. Not distill.seqkd's sampling settings: teacher_generate, shared by every
# student, reads them.
STUDENT_OVERRIDABLE = {"init_student": None, "distill": {"sft_long": None, "kd": None, "seqkd": {"kd_ratio", "train"},
                                                        "minillm": None, "gkd": None, "distillm": None, "opd": None}}


class StudentSpec(ModelSpec):
    # This student's own settings, deep-merged over the shared ones for its stages only (Params.for_student), e.g.
    # spec §2's per-size SFT rate: {init_student: {optimizer: {lr: 1.0e-4}}}. Its stages declare
    # models.students.<label> in dvc.yaml, so changing it reruns that student's stages and no other's.
    overrides: dict = {}

    @model_validator(mode="after")
    def _overridable(self):
        for section, value in self.overrides.items():
            if section not in STUDENT_OVERRIDABLE:
                raise ValueError(f"overrides.{section}: not a student stage's section "
                                 f"({', '.join(STUDENT_OVERRIDABLE)})")
            allowed = STUDENT_OVERRIDABLE[section]
            if allowed is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"overrides.{section}: a mapping")
            for method, keys in value.items():
                if method not in allowed:
                    raise ValueError(f"overrides.{section}.{method}: not a student stage's section")
                extra = set(value[method]) - allowed[method] if allowed[method] and isinstance(value[method], dict) else set()
                if extra:
                    raise ValueError(f"overrides.{section}.{method}.{sorted(extra)[0]}: shared by every student "
                                     f"(teacher_generate reads it); a student may set {sorted(allowed[method])}")
        return self


class Models(Strict):
    teacher: TeacherSpec
    # Student size label -> model. Several students make every student stage a DVC matrix over them.
    students: dict[Annotated[str, StringConstraints(pattern=LABEL_PATTERN)], StudentSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _labels_do_not_collide(self):
        if "teacher" in self.students:
            raise ValueError("'teacher' is reserved; choose another student label")
        return self


Precision = Literal["fp32", "bf16", "fp16"]


class LoRA(Strict):
    """Low-rank adapters (peft) on every fine-tuning stage's model: teacher SFT, the student init and each distillation
    method; from-scratch pre-training trains every weight. Only the adapters train, and each saved model has them
    merged into the weights they adapt: a plain checkpoint of its family (pipeline/models.py: add_lora)."""

    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    # Module names as peft matches them (the last part of a module's path): q_proj, v_proj (Llama, Qwen2, OPT),
    # c_attn (GPT-2). Never the LM head: the fused losses read its weight.
    target_modules: list[str] = Field(min_length=1)


class EngineConfig(Strict):
    num_procs: int = Field(ge=1)  # data-parallel processes; >1 relaunches the stage under torchrun
    launcher: Literal["torchrun", "deepspeed"]
    device: Literal["cpu", "cuda"]
    precision: Precision  # the trained model's; DeepSpeed keeps fp32 master weights under bf16 and fp16
    # ZeRO-3 partitions the parameters themselves, the student's and (ZeRO-3 inference) the frozen teacher's:
    # engine.initialize and engine.partition_teacher.
    zero_stage: int = Field(ge=0, le=3)
    # Under ZeRO-3, parameters of fewer elements stay whole on every rank (DeepSpeed's stage3_param_persistence_threshold).
    zero3_param_persistence_threshold: int = Field(default=100_000, ge=0)
    # The frozen teacher's weights, independent of `precision`: the official OPT and LLaMA scripts load their 13B
    # teachers in fp16 (half the memory of bf16 training's fp32 master copy, a quarter of fp32).
    teacher_precision: Precision = "fp32"
    # Recompute each layer's activations in backward instead of keeping them: activation memory of one layer for
    # about one more forward per step (the official OPT and LLaMA scripts turn it on).
    gradient_checkpointing: bool = False
    lora: LoRA | None = None

    @model_validator(mode="after")
    def _no_lora_under_zero3(self):
        if self.zero_stage == 3 and self.lora is not None:
            # Best-model selection and the merged save build a ZeRO-3 model afresh from its trained state, which
            # under LoRA would hold only the adapters; LoRA's frozen base is small enough for ZeRO-2 anyway.
            raise ValueError("engine.lora: not supported with zero_stage 3; use zero_stage 2 with LoRA")
        return self

    @model_validator(mode="after")
    def _cpu_is_fp32(self):
        if self.device == "cpu" and self.precision != "fp32":
            raise ValueError("the CPU path trains in fp32; use precision: fp32 with device: cpu")
        return self


class Optimizer(Strict):
    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(gt=0)
    schedule: Literal["cosine", "constant"]
    warmup_steps: int = Field(ge=0)


class PretrainStage(Strict):
    """From-scratch pre-training of the tiny `arch` models; skipped for `name_or_path` models."""

    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    optimizer: Optimizer


class SFTStage(Strict):
    epochs: int | None = Field(default=None, gt=0)
    steps: int | None = Field(default=None, gt=0)  # instead of epochs: this many optimiser steps, epochs running on
    batch_size: int = Field(gt=0)  # global batch, over all processes and accumulation steps
    micro_batch_size: int = Field(gt=0)
    optimizer: Optimizer
    eval_every: int = Field(gt=0)  # optimiser steps between validation Rouge-L / loss checks
    eval_max_new_tokens: int = Field(gt=0)

    @model_validator(mode="after")
    def _one_length(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs and steps")
        return self


class SFTLongMethod(Strict):
    """The longer-SFT control: SFT w/o KD continued from MiniLLM's start (the init picked by validation loss) for as
    many optimiser steps as MiniLLM takes, so that MiniLLM's gain can be told apart from more training."""

    train: SFTStage


class KDMethod(Strict):
    """Word-level KD (spec §3): (1 - ratio) CE + ratio D(teacher, student); D is any of pipeline.losses."""

    divergence: str
    ratio: float = Field(ge=0, le=1)
    beta: float = Field(ge=0, le=1)  # jsd only
    alpha: float = Field(ge=0, le=1)  # skew KLs only
    train: SFTStage

    @model_validator(mode="after")
    def _known_divergence(self):
        if self.divergence not in DIVERGENCE_NAMES:
            raise ValueError(f"divergence '{self.divergence}' is not one of {', '.join(DIVERGENCE_NAMES)}")
        return self


class SeqKDMethod(Strict):
    """SFT on one teacher sample per training prompt (spec §3); kd_ratio 0.5 is the official scripts' variant."""

    max_new_tokens: int = Field(gt=0)
    kd_ratio: float = Field(ge=0, le=1)
    train: SFTStage


class MiniLLMMethod(Strict):
    """Spec §4. Paper defaults unless a comment names the official code's value."""

    steps: int = Field(gt=0)  # optimiser steps
    rollouts_per_round: int = Field(gt=0)  # paper: 256
    inner_epochs: int = Field(gt=0)  # paper: 4
    batch_size: int = Field(gt=0)  # rollouts per optimiser step (paper: 64)
    micro_batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)
    teacher_mix: float = Field(ge=0, lt=1)  # alpha of p~ = alpha p + (1 - alpha) q (paper: 0.2)
    max_importance_weight: float | None = Field(default=None, gt=0)  # w_t <= 1/(1 - alpha) anyway
    reward_scale: float = Field(gt=0)  # paper: 1; code: 0.5
    reward_clip: float | None = Field(default=None, gt=0)  # code: 100
    returns: Literal["paper", "discounted"]  # mean of future rewards, or code's gamma-discounted return
    gamma: float = Field(ge=0, le=1)  # discounted form only (code: 0.95)
    length_normalized: bool
    whiten_advantages: bool
    # Where the whitening statistics come from (minillm_loss.whiten, whiten_padded): "round" (ours) over the round's
    # real tokens, once, per rank; "official_micro_batch" as LMOps: each micro-batch at the rollout's padded width,
    # padding zeros included, recomputed at every micro-step, pooled over data-parallel ranks.
    whitening: Literal["round", "official_micro_batch"] = "round"
    clip_eps: float = Field(gt=0)  # 0.2
    single_step: bool  # the exact per-token reverse KL term
    single_step_weighted: bool = True  # paper: weighted by w_t; the official code drops w_t on purpose (LMOps #255)
    pt_coef: float = Field(ge=0)  # 1
    pt_batch_size: int = Field(gt=0)
    pt_teacher_kd_ratio: float = Field(ge=0, le=1)  # code: 0.5 teacher KD mixed into the PT term
    optimizer: Optimizer
    eval_every: int = Field(gt=0)
    eval_max_new_tokens: int = Field(gt=0)

    @model_validator(mode="after")
    def _whole_rounds(self):
        if (self.inner_epochs * self.rollouts_per_round) % self.batch_size:
            raise ValueError(
                f"inner_epochs x rollouts_per_round ({self.inner_epochs * self.rollouts_per_round}) must be a "
                f"multiple of batch_size ({self.batch_size})"
            )
        if self.rollouts_per_round % self.batch_size:
            raise ValueError(f"rollouts_per_round ({self.rollouts_per_round}) must be a multiple of batch_size ({self.batch_size})")
        return self


class GKDMethod(Strict):
    """GKD (Agarwal et al. 2024; TRL's GKDTrainer, whose defaults the comments give), from the student init picked by
    validation loss, as MiniLLM: each step's batch is the student's own samples with probability
    `on_policy_fraction`, else the gold responses (the teacher's samples with `seq_kd`); the loss is the token-level
    generalised JSD(beta) between teacher and student on them."""

    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)  # prompts per optimiser step
    micro_batch_size: int = Field(gt=0)
    on_policy_fraction: float = Field(ge=0, le=1)  # lambda, TRL: 0.5
    beta: float = Field(ge=0, le=1)  # TRL: 0.5; 0 is forward KL(p || q), 1 reverse KL(q || p)
    temperature: float = Field(gt=0)  # of the student's sampling, TRL: 0.9
    loss_temperature: float = Field(gt=0)  # logits / T in the loss; TRL's default path: 1 (only its Liger path uses T)
    seq_kd: bool  # off-policy batches from the teacher's samples (teacher_generate), TRL: false
    max_new_tokens: int = Field(gt=0)
    optimizer: Optimizer
    eval_every: int = Field(gt=0)
    eval_max_new_tokens: int = Field(gt=0)


class DistiLLMMethod(Strict):
    """DistiLLM (Ko et al. 2024; its public code, jongwooko/distillm, whose defaults the comments give; the paper's
    algorithm text is not reproduced in the spec, so the code is the reference), from the student init picked by
    validation loss: skew KL on a mix of gold responses and student-generated outputs (SGO), whose share
    `student_share` adapts to the validation loss, with SGO replayed from a buffer."""

    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    divergence: Literal["skew_forward_kl", "skew_reverse_kl"]  # code: adaptive-sfkl (GPT-2), adaptive-srkl (OPT)
    alpha: float = Field(ge=0, le=1)  # skew, code: 0.1
    initial_student_share: float = Field(ge=0, le=1)  # code: init-threshold 0.0
    share_increment: float = Field(ge=0, le=1)  # code: +0.1 ...
    loss_increase: float = Field(ge=0)  # ... whenever the validation loss rose by at least this much (code: 0.1)
    adapt_every: int = Field(gt=0)  # steps between validation-loss checks (code: once per epoch)
    replay_capacity: int = Field(gt=0)  # SGO kept for replay, oldest dropped first (code: 1000)
    # Of the SGO batches, the share generated fresh: decreasing (code default) 1 - step/steps, constant 1/2, increasing.
    fresh_schedule: Literal["decreasing", "constant", "increasing"]
    max_new_tokens: int = Field(gt=0)
    optimizer: Optimizer
    eval_every: int = Field(gt=0)
    eval_max_new_tokens: int = Field(gt=0)

    @model_validator(mode="after")
    def _adapt_at_validations(self):
        # The schedule reads the validation loss, which exists at the validation steps only.
        if self.adapt_every % self.eval_every:
            raise ValueError(f"adapt_every ({self.adapt_every}) must be a multiple of eval_every ({self.eval_every})")
        if self.replay_capacity < self.batch_size:
            raise ValueError(f"replay_capacity ({self.replay_capacity}) must hold a batch ({self.batch_size})")
        return self


class OPDMethod(Strict):
    """On-policy distillation with a per-token reverse-KL reward (TRL, tinker-cookbook, verl, NeMo-RL), from the
    student init picked by validation loss: pure student rollouts, reward r_t = log p(y_t) - log q_old(y_t), advantage
    A_t = sum_{t' >= t} discount^(t' - t) r_t' (discount 0: the token's own reward, tinker's and TRL's default), a
    clipped importance ratio when a rollout is reused; no teacher mixing, no single-step term, no PT loss. It runs
    through MiniLLM's recipe (`as_policy_gradient`)."""

    steps: int = Field(gt=0)
    rollouts_per_round: int = Field(gt=0)
    inner_epochs: int = Field(gt=0)  # 1: every rollout used once, the ratio stays 1
    batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)
    discount: float = Field(ge=0, le=1)
    clip_eps: float = Field(gt=0)
    optimizer: Optimizer
    eval_every: int = Field(gt=0)
    eval_max_new_tokens: int = Field(gt=0)

    def as_policy_gradient(self) -> MiniLLMMethod:
        """MiniLLM's recipe with OPD's choices: the code's discounted return (which includes r_t) unnormalised and
        unwhitened, no teacher mixing, no single-step term, no PT loss (computed for logging on one block only)."""
        return MiniLLMMethod(
            steps=self.steps, rollouts_per_round=self.rollouts_per_round, inner_epochs=self.inner_epochs,
            batch_size=self.batch_size, micro_batch_size=self.micro_batch_size, max_new_tokens=self.max_new_tokens,
            teacher_mix=0.0, max_importance_weight=None, reward_scale=1.0, reward_clip=None, returns="discounted",
            gamma=self.discount, length_normalized=False, whiten_advantages=False, clip_eps=self.clip_eps,
            single_step=False, pt_coef=0.0, pt_batch_size=1, pt_teacher_kd_ratio=0.0, optimizer=self.optimizer,
            eval_every=self.eval_every, eval_max_new_tokens=self.eval_max_new_tokens,
        )


class Distill(Strict):
    sft_long: SFTLongMethod
    kd: KDMethod
    seqkd: SeqKDMethod
    minillm: MiniLLMMethod
    gkd: GKDMethod
    distillm: DistiLLMMethod
    opd: OPDMethod


class EvaluateStage(Strict):
    seeds: list[int] = Field(min_length=1)
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    temperature: float = Field(gt=0)
    # 0: pure sampling (paper, spec §5). The official final evaluation and exposure-bias script block repeated
    # 6-grams (LMOps #205, about 1 Rouge-L point); validation during training never does, here as there.
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    exposure_bias_skip_first: bool = False  # the official exposure-bias script's KL sums skip response position 1


class CheckpointConfig(Strict):
    """Resumable training (pipeline/checkpoint.py): state in scratch/<stage>/ every `every_steps` optimiser steps."""

    every_steps: int = Field(default=50, gt=0)  # not a DVC param of any stage: when it saves never changes results
    # A NaN/inf loss part or gradient norm stops the stage; up to this many such steps are skipped instead (the
    # optimiser leaves weights, moments and schedule untouched), counting over the whole stage.
    max_nonfinite_skips: int = Field(default=0, ge=0)


class Params(Strict):
    seed: int
    train_seeds: list[int] = Field(min_length=1)
    data: DataConfig
    models: Models
    engine: EngineConfig
    pretrain: PretrainStage
    train_teacher: SFTStage
    init_student: SFTStage
    distill: Distill
    evaluate: EvaluateStage
    # The common training-FLOPs budget of the compute-matched table (pipeline/cost.py), from the pre-trained student.
    compute_budget_flops: float = Field(gt=0)
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _train_seeds_distinct(self):
        if len(set(self.train_seeds)) != len(self.train_seeds):
            raise ValueError(f"train_seeds {self.train_seeds}: repeated seed (each one names a DVC stage)")
        return self

    @model_validator(mode="after")
    def _sft_long_matches_minillm(self):
        if self.distill.sft_long.train.steps != self.distill.minillm.steps:
            raise ValueError(f"distill.sft_long.train.steps ({self.distill.sft_long.train.steps}) must equal "
                             f"distill.minillm.steps ({self.distill.minillm.steps}): the control trains as many steps")
        return self

    @model_validator(mode="after")
    def _generation_fits(self):
        # Prompt + generated tokens must fit the models' context (max_length), as in the spec (256 + 256 = 512).
        room = self.data.max_length - self.data.max_prompt_length
        for key, new_tokens in (
            ("evaluate.max_new_tokens", self.evaluate.max_new_tokens),
            ("train_teacher.eval_max_new_tokens", self.train_teacher.eval_max_new_tokens),
            ("init_student.eval_max_new_tokens", self.init_student.eval_max_new_tokens),
            ("distill.seqkd.max_new_tokens", self.distill.seqkd.max_new_tokens),
            ("distill.minillm.max_new_tokens", self.distill.minillm.max_new_tokens),
            ("distill.minillm.eval_max_new_tokens", self.distill.minillm.eval_max_new_tokens),
            ("distill.gkd.max_new_tokens", self.distill.gkd.max_new_tokens),
            ("distill.distillm.max_new_tokens", self.distill.distillm.max_new_tokens),
            ("distill.opd.max_new_tokens", self.distill.opd.max_new_tokens),
        ):
            if new_tokens > room:
                raise ValueError(f"{key} ({new_tokens}) exceeds data.max_length - data.max_prompt_length ({room})")
        return self

    @model_validator(mode="after")
    def _student_overrides_valid(self):
        for label, spec in self.models.students.items():
            if spec.overrides:
                try:
                    self.for_student(label)
                except ValidationError as error:
                    raise ValueError(_format_validation_error(f"models.students.{label}.overrides", error)) from None
        return self

    def for_student(self, label: str) -> Params:
        """The params as the stages of student `label` read them: its overrides merged over the shared settings."""
        merged = deep_merge(self.model_dump(), self.models.students[label].overrides)
        for spec in merged["models"]["students"].values():
            spec["overrides"] = {}  # applied: the view of one student carries none
        return Params.model_validate(merged)


def deep_merge(base: dict, overlay: dict) -> dict:
    """`base` with `overlay`'s keys replacing its own, key by key: a mapping merges into a mapping."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(path: Path, error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    # A whole-params check (an empty location) names its keys itself.
    return f"{path}: {key}: {message}{more}" if key else f"{path}: {message}{more}"


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 ({error.reason})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(path, error)) from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    check_model_sources(params, path)
    return params


# A Hub repo id: `name` or `namespace/name`; anything else that is not a directory is a missing local path.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_model_sources(params: Params, path: Path) -> None:
    """Each `name_or_path` must be a local directory, a Hub id in the local cache, or a Hub id with the Hub
    reachable. Caught here, before any work: otherwise `from_pretrained` retries an unreachable Hub for
    half a minute and then fails deep inside a stage."""
    sources = [("models.teacher.name_or_path", params.models.teacher.name_or_path)]
    sources += [(f"models.students.{label}.name_or_path", spec.name_or_path) for label, spec in params.models.students.items()]
    for key, name_or_path in sources:
        if name_or_path is None or os.path.isdir(name_or_path):
            continue
        if not HUB_REPO_ID.match(name_or_path) or ".." in name_or_path:
            raise ConfigError(f"{path}: {key}: '{name_or_path}' is not an existing directory")
        from huggingface_hub import constants, try_to_load_from_cache

        try:
            if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
                continue
        except ValueError:  # the Hub's stricter id rules: no "--", no trailing "." or "-", at most 96 characters
            raise ConfigError(f"{path}: {key}: '{name_or_path}' is neither an existing directory nor a valid Hub id") from None
        if hub_offline():
            raise ConfigError(
                f"{path}: {key}: '{name_or_path}' is not a local directory nor in the Hugging Face cache, "
                "and HF_HUB_OFFLINE is set"
            )
        endpoint = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
        except OSError:
            raise ConfigError(
                f"{path}: {key}: '{name_or_path}' is not a local directory nor in the Hugging Face cache, "
                f"and {endpoint.hostname} is unreachable"
            ) from None


# Full disk, quota, read-only file system, no permission: the user's environment, not a bug.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def exit_on_user_error(main):
    """Run a stage's main; a ConfigError becomes one line on stderr and exit status 2, not a traceback."""
    try:
        main()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        # Atomic writes have already removed their temporary files: nothing half-written is left behind.
        print(f"error: {error.filename or 'output'}: {os.strerror(error.errno)}", file=sys.stderr)
        sys.exit(2)
