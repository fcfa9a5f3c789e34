"""Ours against TRL, side by side: wall time per on-policy sample trained on, and peak memory.

Contenders, each in its own subprocess (so peak RSS is its own), on the same tiny random-init teacher and student
(params.yaml's default shapes: 4x128 and 2x64), the same byte-level BPE tokenizer trained here on the synthetic
suite, the same prompts (instruction prompts of that suite, spec §1 template), batch and generation length:
    ours     one on-policy round per optimiser step: `pipeline.generation.sample` (teacher-mixed, both models
             KV-cached through GPT2Decoder, alpha 0.2), `pipeline.minillm.make_buffer`, `surrogate_sums`
             (single-step reverse KL + PPO term; the teacher's hidden states are the rollout's), AdamW
    ours_gkd our GKD step at GKDTrainer's settings, equal work: student-only sampling (`sample`, KV-cached), the
             teacher's forward on the samples, generalised JSD with beta=1 (reverse KL) through the fused LM heads
             (`pipeline.student_data.divergence_sums`), AdamW
    ours_opd our OPD step (params.yaml's distill.opd through `OPDMethod.as_policy_gradient`), equal work with
             minillm_opd: student-only sampling with the teacher's cached forward alongside (its log-probabilities
             and hidden states), the token's own reward log p - log q as advantage (discount 0), the clipped ratio
             (one update per rollout, so it stays 1), no single-step term, no PT loss, AdamW; the batch is
             batch/2 prompts sampled twice each, as minillm_opd's num_generations=2
    gkd      trl.experimental.gkd.GKDTrainer, lmbda=1 (always on-policy: student `generate`), beta=1 (reverse KL)
    minillm  trl.experimental.minillm.MiniLLMTrainer (GRPO-based), num_generations=2, same samples per step, its
             defaults (single-step decomposition on)
    minillm_opd  MiniLLMTrainer at ours_opd's settings: rkl_advantage (per-token reward), gamma 0,
             single_step_decomposition off, GRPO's beta 0 (no reference KL), epsilon 0.2, one iteration per
             generation, loss_type dapo (summed over tokens, divided by their count, as ours)
    distillation  trl.DistillationTrainer (TRL's stable on-policy distiller; 1.16 dropped MiniLLMTrainer), equal
             work with ours_gkd and gkd: always on-policy (it has no lmbda), beta=1 (reverse KL), temperature 1,
             `generate` without vLLM, dropout off
No TRL contender checkpoints gradients (TRL's configs default to it; ours never does): with it on, GKDTrainer
samples without a KV cache, which made TRL look about twice as slow as it is at equal work.
EOS is disabled in every model, so every sample is exactly --new-tokens long. Every contender runs --steps
optimiser steps after one warm-up step (not timed); seconds per sample = timed wall time / (steps x batch).
Peak memory: the subprocess's peak RSS (VmHWM) and its rise above the RSS after models and trainer were built.
Sampling: the seconds of the timed steps spent sampling, per step (ours: `sample`, which for ours_opd includes the
teacher's forward over the finished samples; TRL's: the student's `generate`, timed by wrapping it); the rest of a
step is the teacher's forward, the loss, its backward and the optimiser.
Target (issue 5): ours >= 2x TRL's throughput at <= its peak memory.

Needs the benchmark extra (trl); see benchmarks/README.md. TRL 1.13 (the last with MiniLLMTrainer), then TRL 1.16:
    make bench-venv && .venv-bench/bin/python -m benchmarks.bench_trl
    make bench-venv-trl116 && .venv-bench-trl116/bin/python -m benchmarks.bench_trl --contenders ours_gkd gkd distillation
"""

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks.common import MIB, current_rss, print_table, process_peak_rss
from pipeline.config import Architecture
from pipeline.data import build_prompt, train_bpe_tokenizer
from pipeline.models import build_causal_lm
from pipeline.synthetic import build_suite

CONTENDERS = ("ours", "ours_gkd", "ours_opd", "gkd", "minillm", "minillm_opd", "distillation")
TEACHER_ARCH = Architecture(n_layer=4, n_embd=128, n_head=2)
STUDENT_ARCH = Architecture(n_layer=2, n_embd=64, n_head=2)
LEARNING_RATE = 5e-4


def build_models_and_prompts(args):
    """Deterministic: every subprocess rebuilds the identical tokenizer, models and prompt token ids."""
    suite = build_suite(seed=0, n_train=200, n_valid=1, n_per_eval_set=1)
    texts = [build_prompt(r["instruction"], r["context"]) + r["response"] for r in suite["train"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=1024)
    prompt_texts = [build_prompt(r["instruction"], r["context"]) for r in suite["train"]]
    prompt_ids = [tokenizer.encode(text, add_special_tokens=False)[-args.prompt_len :] for text in prompt_texts]
    prompt_texts = [tokenizer.decode(ids) for ids in prompt_ids]
    models = []
    for seed, arch in ((2, TEACHER_ARCH), (1, STUDENT_ARCH)):
        torch.manual_seed(seed)
        model = build_causal_lm(arch, len(tokenizer), 256, tokenizer.eos_token_id)
        model.generation_config.eos_token_id = None  # never stop early: fixed-length samples for every contender
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        models.append(model)
    teacher, student = models
    return tokenizer, teacher, student, prompt_ids, prompt_texts


class SamplingTimer:
    """Seconds spent sampling in the timed steps (counting starts after the warm-up step)."""

    def __init__(self):
        self.seconds = 0.0
        self.counting = False

    @contextlib.contextmanager
    def __call__(self):
        started = time.perf_counter()
        yield
        if self.counting:
            self.seconds += time.perf_counter() - started

    def wrap_generate(self, model) -> None:
        """TRL's trainers sample with the student's `generate` (the same module, unwrapped, on one CPU process)."""
        generate = model.generate

        def timed_generate(*args, **kwargs):
            with self():
                return generate(*args, **kwargs)

        model.generate = timed_generate


SAMPLING = SamplingTimer()


def timed_steps(step, steps: int) -> float:
    """Seconds of steps 1..steps after the untimed warm-up step 0."""
    step(0)
    SAMPLING.counting = True
    started = time.perf_counter()
    for index in range(1, steps + 1):
        step(index)
    return time.perf_counter() - started


def run_ours(args, tokenizer, teacher, student, prompt_ids, prompt_texts) -> tuple[float, int]:
    import yaml

    from pipeline.config import MiniLLMMethod
    from pipeline.engine import build_optimizer
    from pipeline.generation import left_pad, sample
    from pipeline.minillm import make_buffer, surrogate_sums

    raw = yaml.safe_load(open("params.yaml"))["distill"]["minillm"]
    config = MiniLLMMethod.model_validate({**raw, "pt_coef": 0.0})
    optimizer = build_optimizer(student, config.optimizer.model_copy(update={"lr": LEARNING_RATE}))
    teacher.eval()
    student.eval()  # as train_minillm: dropout off, so the PPO ratio starts at exactly 1
    generator = torch.Generator().manual_seed(0)
    baseline = current_rss()

    def step(index: int) -> None:
        start = index * args.batch % (len(prompt_ids) - args.batch)
        ids, mask = left_pad(prompt_ids[start : start + args.batch], tokenizer.pad_token_id)
        with SAMPLING():
            rollout = sample(student, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=-1,
                             pad_token_id=tokenizer.pad_token_id, generator=generator, teacher=teacher,
                             teacher_mix=config.teacher_mix)
        buffer = make_buffer(rollout, config)
        sums = surrogate_sums(student, teacher, buffer, torch.arange(args.batch), config)
        ((sums["single"] + sums["long"]) / rollout.response_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, args.steps), baseline


def run_ours_gkd(args, tokenizer, teacher, student, prompt_ids, prompt_texts) -> tuple[float, int]:
    from pipeline.config import Optimizer
    from pipeline.engine import build_optimizer
    from pipeline.generation import left_pad, sample
    from pipeline.student_data import Sequences, divergence_sums

    optimizer = build_optimizer(student, Optimizer(lr=LEARNING_RATE, min_lr=0.0, weight_decay=0.0, grad_clip=1.0,
                                                   schedule="constant", warmup_steps=0))
    teacher.eval()
    student.eval()  # GKDTrainer disables dropout too
    generator = torch.Generator().manual_seed(0)
    baseline = current_rss()

    def step(index: int) -> None:
        start = index * args.batch % (len(prompt_ids) - args.batch)
        ids, mask = left_pad(prompt_ids[start : start + args.batch], tokenizer.pad_token_id)
        with SAMPLING():
            rollout = sample(student, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=-1,
                             pad_token_id=tokenizer.pad_token_id, generator=generator)
        batch = Sequences(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
        sums = divergence_sums(student, teacher, batch, torch.arange(args.batch), "jsd", 1.0, 0.0, 1.0)
        (sums["divergence"] / rollout.response_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, args.steps), baseline


def run_ours_opd(args, tokenizer, teacher, student, prompt_ids, prompt_texts) -> tuple[float, int]:
    import yaml

    from pipeline.config import OPDMethod
    from pipeline.engine import build_optimizer
    from pipeline.generation import left_pad, sample
    from pipeline.minillm import make_buffer, surrogate_sums

    raw = yaml.safe_load(open("params.yaml"))["distill"]["opd"]
    config = OPDMethod.model_validate({**raw, "discount": 0.0}).as_policy_gradient()
    optimizer = build_optimizer(student, config.optimizer.model_copy(update={"lr": LEARNING_RATE}))
    teacher.eval()
    student.eval()  # MiniLLMTrainer disables dropout too
    generator = torch.Generator().manual_seed(0)
    baseline = current_rss()
    prompts_per_step = args.batch // 2  # each sampled twice, as num_generations=2

    def step(index: int) -> None:
        start = index * prompts_per_step % (len(prompt_ids) - prompts_per_step)
        prompts = [ids for ids in prompt_ids[start : start + prompts_per_step] for _ in range(2)]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        with SAMPLING():  # the student's sampling, then the teacher's one forward over the finished samples
            rollout = sample(student, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=-1,
                             pad_token_id=tokenizer.pad_token_id, generator=generator, teacher=teacher,
                             teacher_mix=0.0)
        buffer = make_buffer(rollout, config)
        sums = surrogate_sums(student, teacher, buffer, torch.arange(len(prompts)), config)
        (sums["long"] / rollout.response_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, args.steps), baseline


class StepTimer(TrainerCallback):
    """Wall time from the end of the warm-up step to the end of training, and the RSS before training."""

    def __init__(self):
        self.started = None
        self.finished = None
        self.baseline = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.baseline = current_rss()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            SAMPLING.counting = True
            self.started = time.perf_counter()
        self.finished = time.perf_counter()


def common_training_arguments(args, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir, per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        gradient_checkpointing=False,  # TRL's default is on; ours recomputes nothing (see the module docstring)
    )


def run_gkd(args, tokenizer, teacher, student, prompt_ids, prompt_texts) -> tuple[float, int]:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    def collate(examples):
        # GKD's on-policy step replaces input_ids/attention_mask/labels by the student's samples; it reads prompts.
        from pipeline.generation import left_pad

        ids, mask = left_pad([example["prompt_ids"] for example in examples], tokenizer.pad_token_id)
        # The Trainer normalises the loss by the label count it reads here, before GKD swaps in the samples:
        # give it the samples' token count (all-padding labels would divide by zero).
        labels = torch.zeros(len(examples), args.new_tokens + 1, dtype=torch.long)
        return {"prompts": ids, "prompt_attention_mask": mask, "input_ids": ids, "attention_mask": mask,
                "labels": labels}

    timer = StepTimer()
    SAMPLING.wrap_generate(student)
    with tempfile.TemporaryDirectory() as output_dir:
        config = GKDConfig(**common_training_arguments(args, output_dir), lmbda=1.0, beta=1.0, temperature=1.0,
                           max_new_tokens=args.new_tokens, max_length=args.prompt_len + args.new_tokens)
        trainer = GKDTrainer(
            model=student, teacher_model=teacher, args=config, data_collator=collate, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt_ids": prompt_ids}), callbacks=[timer],
        )
        trainer.train()
    return timer.finished - timer.started, timer.baseline


def run_minillm(args, tokenizer, teacher, student, prompt_ids, prompt_texts, **options) -> tuple[float, int]:
    from datasets import Dataset
    from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

    timer = StepTimer()
    SAMPLING.wrap_generate(student)
    with tempfile.TemporaryDirectory() as output_dir:
        config = MiniLLMConfig(**common_training_arguments(args, output_dir), num_generations=2,
                               max_completion_length=args.new_tokens, temperature=1.0,
                               # GRPO stops at the tokenizer's EOS unless told otherwise: fixed-length samples
                               generation_kwargs={"eos_token_id": None}, **options)
        trainer = MiniLLMTrainer(
            model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": prompt_texts}), callbacks=[timer],
        )
        trainer.train()
    return timer.finished - timer.started, timer.baseline


def run_minillm_opd(args, tokenizer, teacher, student, prompt_ids, prompt_texts) -> tuple[float, int]:
    return run_minillm(args, tokenizer, teacher, student, prompt_ids, prompt_texts, rkl_advantage=True, gamma=0.0,
                       single_step_decomposition=False, kd_temperature=1.0, beta=0.0, epsilon=0.2, num_iterations=1,
                       loss_type="dapo")


def run_distillation(args, tokenizer, teacher, student, prompt_ids, prompt_texts) -> tuple[float, int]:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    timer = StepTimer()
    SAMPLING.wrap_generate(student)
    with tempfile.TemporaryDirectory() as output_dir:
        config = DistillationConfig(**common_training_arguments(args, output_dir), beta=1.0, temperature=1.0,
                                    max_completion_length=args.new_tokens, disable_dropout=True, use_vllm=False,
                                    generation_kwargs={"eos_token_id": None})  # `generate` would stop at EOS
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": prompt_texts}), callbacks=[timer],
        )
        # 1.16 also masks each completion after its first token in eos_token_ids (the tokenizer's EOS, id 0, which
        # sampling does draw): a stop id that never occurs keeps every sample's --new-tokens tokens in the loss, as
        # ours_gkd's. (1.13 masks after the tokenizer's EOS itself, about once in 1,000 tokens of these models; its
        # loss still runs over the whole [B, new tokens] tensor.)
        trainer.eos_token_ids = [-1]
        trainer.train()
    return timer.finished - timer.started, timer.baseline


def child(args) -> None:
    torch.manual_seed(0)
    built = build_models_and_prompts(args)
    runner = {"ours": run_ours, "ours_gkd": run_ours_gkd, "ours_opd": run_ours_opd, "gkd": run_gkd,
              "minillm": run_minillm, "minillm_opd": run_minillm_opd, "distillation": run_distillation}[args.child]
    seconds, baseline = runner(args, *built)
    peak = process_peak_rss()
    print("RESULT " + json.dumps({"seconds": seconds, "peak": peak, "baseline": baseline, "sampling": SAMPLING.seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompts keep their last PROMPT_LEN tokens")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in every contender")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    rows, results = [], {}
    for name in args.contenders:
        command = [sys.executable, "-m", "benchmarks.bench_trl", "--child", name, "--batch", str(args.batch),
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
        print(f"running {name} ...", flush=True)
        completed = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            print(f"{name} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        results[name] = result
        per_sample = result["seconds"] / (args.steps * args.batch)
        rows.append([name, per_sample * 1000, 1 / per_sample, result["sampling"] / args.steps * 1000,
                     (result["seconds"] - result["sampling"]) / args.steps * 1000, result["peak"] / MIB,
                     (result["peak"] - result["baseline"]) / MIB])

    from importlib.metadata import version

    print(f"\nbatch {args.batch}, prompt <= {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.steps} timed "
          f"steps, threads {args.threads}, trl {version('trl')}")
    print_table(["contender", "ms / sample", "samples/s", "sampling ms / step", "rest ms / step", "peak RSS MiB",
                 "peak over start MiB"], rows)
    equal_work = (("ours_gkd", "gkd"), ("ours_gkd", "distillation"), ("ours_opd", "minillm_opd"))
    for ours, peer in (*equal_work, ("ours", "gkd"), ("ours", "minillm")):
        if ours in results and peer in results:
            speedup = results[peer]["seconds"] / results[ours]["seconds"]
            memory = results[ours]["peak"] / results[peer]["peak"]
            work = "equal work" if (ours, peer) in equal_work else "not equal work"
            print(f"{ours} vs {peer} ({work}): {speedup:.2f}x throughput (target >= 2), {memory:.2f}x peak RSS "
                  "(target <= 1)")


if __name__ == "__main__":
    main()
