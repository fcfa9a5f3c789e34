"""One MiniLLM optimisation step through the pipeline's own functions: speed, FLOP/s, and peak memory.

The step is what `pipeline.minillm.train_minillm` does per micro-batch: `surrogate_sums` (single-step reverse KL
and PPO-clipped long-term term; the teacher's hidden states come from the rollout, only its LM head runs),
`pt_loss_sum` (the PT loss), backward, AdamW step.
The rollout buffer comes from `pipeline.generation.sample` and `pipeline.minillm.make_buffer` with the params.yaml
MiniLLM settings, pt_coef set to 1 (the paper's) so the PT loss takes part. EOS is disabled: responses are full length.

Reported:
  tokens/s        tokens forwarded through the student per second: batch x (prompt + response) + PT tokens
  achieved FLOP/s the matmul FLOPs the step runs, 6 per parameter and token with backward, 2 without:
                  student body over batch x (prompt + response) and its LM head over the response tokens, the
                  teacher's LM head over the response tokens (forward only), the student over the PT tokens (and
                  the teacher too when pt_teacher_kd_ratio > 0). Parameters: all but position embeddings, the
                  tied LM head once. Attention-score FLOPs are left out (an underestimate of a few %).
  matmul peak     FLOP/s of a large square matmul in the models' dtype, measured in this run (issue 5 target:
                  achieved >= 40% of it on GPT-2-small shapes)
  peak memory     of the step's tensors above those held before it (benchmarks/common.py: tensor_peak)
  logits part     peak memory of everything after the last hidden states: surrogate_sums (both LM heads fused
                  into chunks of FUSED_CHUNK positions, recomputed in backward) and its backward, over the
                  memory held before it; compared with one model's fp32 logits for the batch,
                  [batch, response, V] x 4 bytes (target: <= 1.5x)
  full-logits ... the same two loss terms the way surrogate_sums computed them before the fusion (both models'
                  [batch, response, V] logits, log_softmax, losses.reverse_kl, policy_loss): memory and agreement
  chunk sweep     seconds and peak of the fused logits part at other chunk sizes (--chunks)

    python -m benchmarks.bench_step                                   # GPT-2-small student and teacher, CPU
    python -m benchmarks.bench_step --device cuda --dtype bf16 --pair gpt2-large:gpt2-xl --batch 8 --response-len 256
"""

import argparse
import types

import torch
import torch.nn.functional as F
import yaml

from benchmarks.common import (
    DTYPES,
    EOS,
    MIB,
    SHAPES,
    add_common_arguments,
    best_time,
    build_model,
    matmul_parameters,
    measure_matmul_peak,
    parse_pair,
    print_table,
    process_peak_rss,
    setup_device,
    tensor_peak,
)
from pipeline import losses
from pipeline.config import MiniLLMMethod
from pipeline.engine import build_optimizer
from pipeline.generation import left_pad, sample
from pipeline.hidden_states import FUSED_CHUNK
from pipeline.minillm import make_buffer, pt_loss_sum, surrogate_sums
from pipeline.minillm_loss import policy_loss


class LogitsPartOnly(torch.nn.Module):
    """Stands in for a model inside `surrogate_sums` (which runs its forward for the last hidden states and reads
    `get_output_embeddings()`), so that only the logits part of the step runs. The head weight does not require
    grad: its gradient is a parameter gradient of the model, not logits memory."""

    def __init__(self, hidden: torch.Tensor, head_weight: torch.Tensor):
        super().__init__()
        self.hidden = hidden
        self.head = torch.nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False, device=head_weight.device)
        self.head.weight = torch.nn.Parameter(head_weight.detach(), requires_grad=False)

    def forward(self, **inputs):
        return types.SimpleNamespace(hidden_states=(self.hidden,))

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


def last_hidden_states(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    output = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return output.last_hidden_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--pair", default="gpt2:gpt2", help="STUDENT:TEACHER shape names")
    parser.add_argument("--batch", type=int, default=2, help="rollouts in the step")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--pt-batch", type=int, default=2)
    parser.add_argument("--pt-len", type=int, default=128, help="pre-training block length")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunks", default="8,16,32,64", help="chunk sizes of the fused logits part to sweep")
    parser.add_argument("--nominal-tflops", type=float, default=None,
                        help="the chip's datasheet dense peak in this dtype (H200 bf16: 989), for MFU against it")
    args = parser.parse_args()
    device = setup_device(args)
    dtype = DTYPES[args.dtype]
    student_shape, teacher_shape = parse_pair(args.pair)
    vocab_size = SHAPES[student_shape][1]

    raw = yaml.safe_load(open("params.yaml"))["distill"]["minillm"]
    config = MiniLLMMethod.model_validate({**raw, "pt_coef": 1.0})
    student = build_model(student_shape, device, dtype, seed=1)
    teacher = build_model(teacher_shape, device, dtype, seed=2)
    optimizer = build_optimizer(student, config.optimizer)

    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab_size, (args.prompt_len,), generator=generator).tolist()
               for _ in range(args.batch)]
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, EOS))
    rollout = sample(
        student, prompt_ids, prompt_mask, max_new_tokens=args.response_len, eos_token_id=-1, pad_token_id=EOS,
        generator=torch.Generator(device=device).manual_seed(0), teacher=teacher, teacher_mix=config.teacher_mix,
    )
    buffer = make_buffer(rollout, config)
    rows = torch.arange(args.batch)
    pt_blocks = torch.randint(1, vocab_size, (args.pt_batch, args.pt_len), generator=generator).to(device)
    response_tokens = float(rollout.response_mask.sum())
    pt_tokens = float(args.pt_batch * (args.pt_len - 1))

    def step() -> None:
        sums = surrogate_sums(student, teacher, buffer, rows, config)
        pt_sum = pt_loss_sum(student, teacher, pt_blocks, config.pt_teacher_kd_ratio)
        loss = (sums["single"] + sums["long"]) / response_tokens + config.pt_coef * pt_sum / pt_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Measured before and after the step, the better kept: a busy machine can slow either one.
    matmul_peak = measure_matmul_peak(device, dtype)
    seconds = best_time(step, device, args.repeats)
    matmul_peak = max(matmul_peak, measure_matmul_peak(device, dtype))
    sequence_tokens = args.batch * (args.prompt_len + args.response_len)
    student_tokens = sequence_tokens + args.pt_batch * args.pt_len
    student_head, teacher_head = (model.lm_head.weight.numel() for model in (student, teacher))
    flops = (
        6 * (matmul_parameters(student) - student_head) * sequence_tokens
        + 6 * student_head * response_tokens
        + 2 * teacher_head * response_tokens
        + 6 * matmul_parameters(student) * args.pt_batch * args.pt_len
        + (2 * matmul_parameters(teacher) * args.pt_batch * args.pt_len if config.pt_teacher_kd_ratio > 0 else 0)
    )
    achieved = flops / seconds

    step_peak, _ = tensor_peak(step, device)

    # The logits part alone: surrogate_sums on a student stand-in whose body returns the last hidden states of
    # [prompt; response], computed once here the way surrogate_sums computes them; the teacher's are the rollout's.
    input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    response_attention = torch.ones_like(rollout.response_mask, dtype=rollout.prompt_mask.dtype)
    attention = torch.cat([rollout.prompt_mask, response_attention], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        student_hidden = last_hidden_states(student, input_ids, attention, positions).requires_grad_(True)
    teacher_hidden = rollout.teacher_hidden  # [batch, response, d]: already aligned with the response tokens
    student_part = LogitsPartOnly(student_hidden, student.lm_head.weight)

    def fused_logits_part() -> dict[str, torch.Tensor]:
        student_hidden.grad = None
        sums = surrogate_sums(student_part, teacher, buffer, rows, config)
        ((sums["single"] + sums["long"]) / response_tokens).backward()
        return {"single": sums["single"].detach(), "long": sums["long"].detach()}

    # The two terms as surrogate_sums computed them before the fusion: both models' full logits at once.
    prompt_width, mask = rollout.prompt_ids.shape[1], rollout.response_mask
    response_slice = slice(prompt_width - 1, prompt_width - 1 + args.response_len)

    def full_logits_part() -> dict[str, torch.Tensor]:
        student_hidden.grad = None
        student_logits = F.linear(student_hidden[:, response_slice], student.lm_head.weight.detach())
        teacher_logits = F.linear(teacher_hidden, teacher.lm_head.weight.detach())
        log_q = torch.log_softmax(student_logits.float(), dim=-1)
        logp_new = log_q.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
        long, _ = policy_loss(
            logp_new, rollout.student_logprobs, buffer.advantages, buffer.weights, mask, config.clip_eps
        )
        single = losses.reverse_kl(student_logits, teacher_logits, mask, weights=buffer.weights, reduction="sum")
        ((single + long) / response_tokens).backward()
        return {"single": single.detach(), "long": long.detach()}

    def fused_at(chunk_size: int):
        def run() -> None:
            student_hidden.grad = None
            logp_new, single, _ = losses.fused_head_reverse_kl(
                student_hidden[:, response_slice], student.lm_head.weight.detach(), teacher_hidden,
                teacher.lm_head.weight, rollout.response_ids, mask, weights=buffer.weights, chunk_size=chunk_size,
            )
            long, _ = policy_loss(
                logp_new, rollout.student_logprobs, buffer.advantages, buffer.weights, mask, config.clip_eps
            )
            ((single + long) / response_tokens).backward()
        return run

    logits_peak, sums = tensor_peak(fused_logits_part, device)
    full_peak, full_sums = tensor_peak(full_logits_part, device)
    fp32_logits = args.batch * args.response_len * vocab_size * 4
    fused_error = max(
        abs((sums[part] - full_sums[part]).item()) / max(abs(full_sums[part].item()), 1e-6) for part in sums
    )
    sweep = []
    for chunk_size in [int(c) for c in args.chunks.split(",")]:
        chunk_seconds = best_time(fused_at(chunk_size), device, args.repeats + 1)
        chunk_peak, _ = tensor_peak(fused_at(chunk_size), device)
        sweep.append(
            [f"  chunk {chunk_size}: logits part seconds / peak MiB", f"{chunk_seconds:.4f} / {chunk_peak / MIB:.1f}", ""]
        )

    print(f"device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, student {student_shape} "
          f"({matmul_parameters(student) / 1e6:.1f}M matmul params), teacher {teacher_shape} "
          f"({matmul_parameters(teacher) / 1e6:.1f}M), batch {args.batch} x (prompt {args.prompt_len} + response "
          f"{args.response_len}), PT {args.pt_batch} x {args.pt_len}, pt_coef {config.pt_coef}")
    print_table(
        ["measure", "value", "target"],
        [
            ["step seconds", seconds, ""],
            ["student tokens/s", student_tokens / seconds, ""],
            ["response tokens/s", response_tokens / seconds, ""],
            ["achieved GFLOP/s (matmul FLOPs run / s)", achieved / 1e9, ""],
            ["matmul peak GFLOP/s", matmul_peak / 1e9, ""],
            ["achieved / matmul peak", achieved / matmul_peak, ">= 0.4"],
            *([["MFU vs nominal peak", achieved / (args.nominal_tflops * 1e12), ""]] if args.nominal_tflops else []),
            ["step peak tensor memory over start MiB", step_peak / MIB, ""],
            *([["process peak RSS MiB", process_peak_rss() / MIB, ""]] if device.type == "cpu" else []),
            *([["GPU allocator peak MiB", torch.cuda.max_memory_allocated(device) / MIB, ""]]
              if device.type == "cuda" else []),
            [f"logits part peak MiB (fused, chunk {FUSED_CHUNK})", logits_peak / MIB, ""],
            ["one model's fp32 logits [B,R,V] MiB", fp32_logits / MIB, ""],
            ["logits part / fp32 logits", logits_peak / fp32_logits, "<= 1.5"],
            ["full-logits logits part peak MiB (before fusion)", full_peak / MIB, ""],
            ["full-logits logits part / fp32 logits", full_peak / fp32_logits, ""],
            ["fused vs full logits, max relative difference", fused_error, "~1e-6"],
            *sweep,
        ],
    )


if __name__ == "__main__":
    main()
